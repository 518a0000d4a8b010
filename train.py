"""
Train the DeepSeek-V3 of deepseek.py (MLA, DeepSeekMoE with aux-loss-free balancing, MTP), nanoGPT style.

    python train.py                                     # Tiny Shakespeare, GPT-2 BPE (a small size on a CPU)
    python train.py config/shakespeare_char.py          # a preset ...
    python train.py config/shakespeare_char_cpu.py --device=cpu --max_iters=500   # ... then overrides
    python train.py --text=my_book.txt --tokenizer=char # your own text (a .txt file or a folder of them)
    python train.py --init_from=resume --out_dir=out    # continue the run saved in out/ckpt.pt
    torchrun --standalone --nproc_per_node=8 train.py config/shakespeare_char.py
    torchrun --standalone --nproc_per_node=8 train.py --expert_parallel=True   # experts sharded over the ranks

Configuration: the DEFAULTS below, then each preset file given (config/NAME.py: plain Python
assignments to the same keys), then --key=value overrides (--flag alone sets a bool key). An unknown
key or a value of the wrong type stops the script before any work, naming the valid keys. On resume
the checkpoint's config replaces the defaults and only the keys given again change.

Batches are a pure function of (seed, rank, step, micro-step), so a resumed run sees exactly the
batches an uninterrupted one would. Under torchrun every rank draws its own batches, gradients are
averaged by DistributedDataParallel, and the experts' token counts are summed over all micro-batches
and ranks before each bias update, so every rank applies the same update. With --expert_parallel=True
each rank holds only its slice of every MoE layer's routed experts and tokens travel to them by
all-to-all (deepseek.MoE.routed_parallel); checkpoints still hold all experts.
"""
import ast
import difflib
import gc
import inspect
import json
import math
import os
import sys
import time
import urllib.request
from contextlib import nullcontext
from dataclasses import asdict, fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from deepseek import MoE, ModelArgs, Transformer

# ----------------------------------------------------------------------------- defaults
# A GPU-sized run on Tiny Shakespeare with the GPT-2 BPE. Without a GPU (and without a preset),
# CPU_SIZE below replaces the keys it names unless you set them yourself.
DEFAULTS = dict(
    # I/O
    out_dir="out",
    eval_interval=250,            # evaluate (and checkpoint) every this many steps, and at the end
    eval_iters=100,               # batches per split in each evaluation
    log_interval=10,
    eval_only=False,
    always_save_checkpoint=True,  # False: save only when val loss improves
    init_from="scratch",          # "scratch" | "resume" (from out_dir/ckpt.pt)
    # data
    dataset="",                   # cache name under data_dir ("" : "shakespeare", or the --text file's name)
    text="",                      # your own text: a .txt file or a folder of .txt files ("": Tiny Shakespeare)
    data_dir="data",              # downloads and tokenised caches (train.bin, val.bin, meta.json)
    tokenizer="bpe",              # "bpe" (tiktoken) | "char"
    encoding="r50k_base",         # tiktoken encoding when tokenizer="bpe" (r50k_base: GPT-2's)
    batch_size=32,                # sequences per micro-batch, per process
    block_size=256,               # context length (the model's max_seq_len)
    gradient_accumulation_steps=1,  # micro-batches per optimizer step, per process
    # model: every deepseek.ModelArgs field is a key too, with its default there (the nano model:
    # 6 layers, dim 256, MLA, 16 routed experts top-4 in 4 groups, MTP depth 1), except:
    dropout=0.2,
    # MTP loss weight: mtp_lambda (a ModelArgs key, 0.3), then mtp_lambda_late from step mtp_lambda_step on
    # (the report: 0.3, then 0.1)
    mtp_lambda_late=0.1,
    mtp_lambda_step=-1,           # -1: never switch
    # AdamW, linear warmup then cosine decay to min_lr
    learning_rate=1e-3,
    max_iters=1500,
    weight_decay=0.1,             # on matrices only (not norms; the balancing bias is a buffer)
    beta1=0.9,
    beta2=0.95,
    grad_clip=1.0,                # 0: no clipping
    decay_lr=True,
    warmup_iters=100,
    lr_decay_iters=1500,
    min_lr=1e-4,
    # system
    device="auto",                # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    dtype="auto",                 # auto (bf16 on CUDA if supported, else fp16; fp32 elsewhere) | float32 | bfloat16 | float16
    compile=False,                # torch.compile the model
    expert_parallel=False,        # under torchrun: shard the routed experts over the ranks (all-to-all)
    seed=1337,
    peak_flops=0.0,               # per-device peak FLOP/s for MFU; 0: known GPUs' bf16 peak, else MFU not shown
)
MODEL_KEYS = [f.name for f in fields(ModelArgs) if f.name not in ("vocab_size", "max_seq_len")]
for _f in fields(ModelArgs):
    if _f.name in MODEL_KEYS and _f.name not in DEFAULTS:
        DEFAULTS[_f.name] = _f.default

# no GPU, no preset: a size that trains in about five minutes on 2 CPU cores
CPU_SIZE = dict(batch_size=8, block_size=64, n_layers=2, dim=64, n_heads=4, inter_dim=192, moe_inter_dim=64,
                n_routed_experts=8, n_activated_experts=2, n_expert_groups=1, n_limited_groups=1, q_lora_rank=0,
                kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, dropout=0.0,
                max_iters=600, lr_decay_iters=600, warmup_iters=30, eval_interval=100, eval_iters=20,
                log_interval=20, learning_rate=2e-3, min_lr=2e-4)

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
CKPT_KEYS = ("model", "model_args", "meta", "optimizer", "iter_num", "config")


class UserError(ValueError):
    """A mistake in the command, config or files: reported as one line `error: ...`, exit code 2."""


# ----------------------------------------------------------------------------- configuration

def _check_type(key, value, default, shown):
    want = type(default)
    if want is float and type(value) is int:
        value = float(value)
    if type(value) is not want:
        raise UserError(f"{key} must be {want.__name__}, not {shown!r}")
    return value


def _unknown(key, where):
    near = difflib.get_close_matches(key, DEFAULTS, n=1)
    hint = f" (did you mean {near[0]}?)" if near else ""
    return UserError(f"unknown config key {key!r}{where}{hint}; valid keys: {', '.join(sorted(DEFAULTS))}")


def parse_config(argv):
    """DEFAULTS, then preset files (config/NAME.py, or just NAME), then --key=value, in argv order.
    Returns (config dict, set of keys set explicitly, list of preset files)."""
    cfg, explicit, presets = dict(DEFAULTS), set(), []
    for arg in argv:
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            if key not in DEFAULTS:
                raise _unknown(key, "")
            if not eq:
                if type(DEFAULTS[key]) is not bool:
                    raise UserError(f"--{key} needs a value: --{key}=VALUE")
                value = True
            elif type(DEFAULTS[key]) is str:
                value = raw
            else:
                try:
                    value = ast.literal_eval(raw)
                except (ValueError, SyntaxError):
                    value = {"true": True, "false": False}.get(raw.lower(), raw)
            cfg[key] = _check_type(key, value, DEFAULTS[key], raw)
            explicit.add(key)
        else:
            here = Path(__file__).parent     # config/NAME.py, from any folder; or just NAME
            path = next((p for p in (Path(arg), here / arg, here / "config" / f"{arg}.py") if p.is_file()), None)
            if path is None:
                raise UserError(f"config file {arg} not found (presets: {', '.join(_presets())})")
            assigned = {}
            try:   # assignments land in `assigned`; earlier values stay readable (max_iters etc.)
                exec(path.read_text(), dict(cfg), assigned)
            except Exception as e:
                raise UserError(f"{path}: {_one_line(e)}") from None
            for key, value in assigned.items():
                if key.startswith("_") or callable(value) or type(value).__name__ == "module":
                    continue
                if key not in DEFAULTS:
                    raise _unknown(key, f" in {path}")
                cfg[key] = _check_type(key, value, DEFAULTS[key], value)
                explicit.add(key)
            presets.append(str(path))
    return cfg, explicit, presets


def _presets():
    return sorted(p.stem for p in (Path(__file__).parent / "config").glob("*.py"))


def check_config(c):
    """Value checks that need no data: ranges, choices, and the model's own (ModelArgs) checks."""
    for key in ("batch_size", "block_size", "gradient_accumulation_steps", "eval_interval", "eval_iters", "log_interval"):
        if getattr(c, key) < 1:
            raise UserError(f"{key} must be at least 1, not {getattr(c, key)}")
    if c.max_iters < 0:
        raise UserError(f"max_iters must be >= 0, not {c.max_iters}")
    choices = dict(init_from=("scratch", "resume"), tokenizer=("bpe", "char"),
                   dtype=("auto", "float32", "bfloat16", "float16"))
    for key, allowed in choices.items():
        if getattr(c, key) not in allowed:
            raise UserError(f"{key} must be one of {', '.join(allowed)}, not {getattr(c, key)!r}")
    model_args_from(vars(c), vocab_size=1)      # the model's own checks, before any work


def pick_device(spec):
    """'auto' -> cuda, then mps, then cpu; anything else is checked against this machine."""
    if spec == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise UserError(f"unknown device {spec!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UserError(f"device {spec!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= n:
            raise UserError(f"device {spec!r} does not exist: this machine has {n} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {spec!r}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unsupported device {spec!r}: use auto, cpu, cuda, cuda:N or mps")
    return str(dev)


# ----------------------------------------------------------------------------- data

def _one_line(e):
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0] if s else ''}"


def _tiktoken(encoding):
    import tiktoken
    try:
        return tiktoken.get_encoding(encoding)
    except ValueError as e:
        raise UserError(f"unknown tiktoken encoding {encoding!r} ({_one_line(e)})") from None
    except Exception as e:   # no network and no cached file
        raise UserError(f"could not load tiktoken encoding {encoding!r} ({_one_line(e)}); set TIKTOKEN_CACHE_DIR "
                        f"to a folder holding its cached file, or use --tokenizer=char") from None


def tokenizer_from_meta(meta):
    """(encode, decode) for a tokenizer meta dict: {"tokenizer": "bpe", "encoding": ...} or
    {"tokenizer": "char", "chars": ...}. The char encoder raises ValueError naming unknown characters."""
    kind = meta.get("tokenizer")
    if kind == "bpe":
        enc = _tiktoken(meta["encoding"])
        return (lambda s: enc.encode(s, allowed_special="all")), enc.decode
    if kind == "char":
        chars = meta["chars"]
        stoi = {ch: i for i, ch in enumerate(chars)}

        def encode(s):
            unknown = sorted(set(s) - stoi.keys())
            if unknown:
                raise ValueError(f"characters not in the vocabulary: {''.join(unknown)!r}")
            return [stoi[ch] for ch in s]
        return encode, lambda ids: "".join(chars[i] for i in ids)
    raise ValueError(f"unknown tokenizer {kind!r} in meta (expected 'bpe' or 'char')")


def _source_files(text):
    path = Path(text).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise UserError(f"no .txt files in folder {text}")
        return files
    if not path.is_file():
        raise UserError(f"text file {text} not found")
    return [path]


def _download(url, dest):
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            data = r.read()
    except Exception as e:
        raise UserError(f"could not download Tiny Shakespeare ({_one_line(e)}); place the file by hand at {dest} "
                        f"(it is {url}) or pass --text=PATH") from None
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, dest)


def _read(path):
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None


def prepare_data(data_dir="data", dataset="", text="", tokenizer="bpe", encoding="r50k_base", log=print):
    """Tokenise a text once into data_dir/NAME/TOKENIZER/{train,val}.bin (uint16, or uint32 for a large
    vocabulary; 90/10 split) plus meta.json; later calls reuse them while the source files are unchanged.
    The text is Tiny Shakespeare (downloaded into data_dir/shakespeare/input.txt on first use) unless
    `text` names a .txt file or a folder of .txt files (read in sorted order, joined by an end-of-text
    token or, for chars, a blank line). Returns (folder, meta)."""
    if text:
        files = _source_files(text)
        name = dataset or Path(text).expanduser().resolve().stem
    else:
        name = dataset or "shakespeare"
        files = [Path(data_dir) / name / "input.txt"]
        if not files[0].exists():
            files[0].parent.mkdir(parents=True, exist_ok=True)
            log(f"downloading Tiny Shakespeare to {files[0]}")
            _download(SHAKESPEARE_URL, files[0])
    folder = Path(data_dir) / name / ("char" if tokenizer == "char" else encoding)
    source = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    meta_path = folder / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("source") == source and (folder / "train.bin").exists() and (folder / "val.bin").exists():
            return folder, meta
    log(f"tokenising {len(files)} file(s) into {folder} ({tokenizer})")
    texts = [_read(p) for p in files]
    if tokenizer == "char":
        sep = "\n\n" if len(texts) > 1 else ""
        whole = sep.join(texts)
        chars = "".join(sorted(set(whole)))
        # code points -> ranks in the sorted vocabulary, without a Python loop over characters
        codes = np.frombuffer(whole.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32), codes)
        meta = dict(tokenizer="char", chars=chars, vocab_size=len(chars))
    else:
        enc = _tiktoken(encoding)
        parts = []
        for i, t in enumerate(texts):
            parts.append(np.array(([enc.eot_token] if i else []) + enc.encode_ordinary(t), dtype=np.int64))
        ids = np.concatenate(parts)
        meta = dict(tokenizer="bpe", encoding=encoding, vocab_size=enc.n_vocab)
    if len(ids) == 0:
        raise UserError(f"no text in {text or files[0]}")
    dtype = np.uint16 if meta["vocab_size"] <= 2 ** 16 else np.uint32
    n = int(0.9 * len(ids))
    folder.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", ids[:n]), ("val", ids[n:])):
        tmp = folder / f"{split}.bin.tmp"
        part.astype(dtype).tofile(tmp)
        os.replace(tmp, folder / f"{split}.bin")
    meta.update(dtype=np.dtype(dtype).name, train_tokens=n, val_tokens=len(ids) - n, source=source)
    tmp = folder / "meta.json.tmp"
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, meta_path)      # written last: a meta file means the .bin files are complete
    return folder, meta


def tokenizer_meta(meta):
    """The part of a data meta that defines the tokenizer (what checkpoints store)."""
    keys = ("tokenizer", "encoding", "vocab_size") if meta["tokenizer"] == "bpe" else ("tokenizer", "chars", "vocab_size")
    return {k: meta[k] for k in keys}


def load_split(folder, split, meta):
    return np.memmap(Path(folder) / f"{split}.bin", dtype=meta["dtype"], mode="r")


def batch_seed(*ints):
    """A 63-bit generator seed mixed from a tuple of ints (seed, stream, rank, step, ...)."""
    return int(np.random.SeedSequence([int(i) for i in ints]).generate_state(1, np.uint64)[0]) >> 1


def get_batch(data, batch_size, block_size, seed, device="cpu"):
    """batch_size windows of block_size + 1 tokens at positions drawn from a generator seeded with
    `seed` (so the same seed gives the same batch): inputs x and next-token targets y, int64 (B, T)."""
    g = torch.Generator().manual_seed(seed)
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=g).tolist()
    xy = torch.from_numpy(np.stack([data[i:i + block_size + 1] for i in ix]).astype(np.int64))
    x, y = xy[:, :-1].contiguous(), xy[:, 1:].contiguous()
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


# ----------------------------------------------------------------------------- model, optimizer, schedule

def model_args_from(cfg, vocab_size):
    """ModelArgs from a config dict: its model keys, the data's vocabulary, block_size as max_seq_len."""
    try:
        return ModelArgs(vocab_size=vocab_size, max_seq_len=cfg["block_size"], **{k: cfg[k] for k in MODEL_KEYS})
    except (AssertionError, ValueError, TypeError) as e:
        raise UserError(f"bad model config: {e}") from None


def configure_optimizer(model, learning_rate, weight_decay, betas, device_type):
    """AdamW with weight decay on matrices (linear and embedding weights, the router's e_i) only; norms
    are not decayed, and the balancing biases are buffers the optimizer never sees."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")


def get_lr(it, c):
    """Linear warmup over warmup_iters, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not c.decay_lr:
        return c.learning_rate
    if it < c.warmup_iters:
        return c.learning_rate * (it + 1) / (c.warmup_iters + 1)
    if it >= c.lr_decay_iters:
        return c.min_lr
    ratio = (it - c.warmup_iters) / max(1, c.lr_decay_iters - c.warmup_iters)
    return c.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c.learning_rate - c.min_lr)


def get_mtp_lambda(it, c):
    return c.mtp_lambda_late if 0 <= c.mtp_lambda_step <= it else c.mtp_lambda


PEAK_BF16 = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "L4": 121e12, "A10": 125e12}


def default_peak_flops(device):
    if torch.device(device).type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), 0.0)


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(ckpt, path):
    """Write to path.tmp, then rename over path: a crash mid-save leaves the previous checkpoint intact."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_checkpoint(path, device="cpu"):
    """The checkpoint dict at path, checked to be one of ours; UserError (a ValueError) with a one-line
    message when it is missing, unreadable or foreign."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({_one_line(e)})") from None
    missing = [k for k in CKPT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path} is not a train.py checkpoint (missing {', '.join(missing)})")
    return ckpt


def _load_state(model, state, path):
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit the model ({_one_line(e)})") from None


def load_checkpoint(path, device="cpu"):
    """(model in eval mode on device, checkpoint dict) from a train.py checkpoint. Raises ValueError
    with a one-line message for a missing, corrupt or foreign file. Tokenizer: tokenizer_from_meta(ckpt["meta"])."""
    ckpt = read_checkpoint(path, device)
    try:
        args = ModelArgs(**ckpt["model_args"])
    except (TypeError, AssertionError) as e:
        raise UserError(f"{path}: bad model_args ({_one_line(e)})") from None
    model = Transformer(args)
    _load_state(model, ckpt["model"], path)
    return model.to(device).eval(), ckpt


# ----------------------------------------------------------------------------- expert parallelism

def shard_experts(model, world):
    """Keep only this rank's slice of every MoE layer's routed experts (deepseek.MoE.shard). Their gradients
    come through the all-to-all backward summed over the ranks' losses: 1/world makes them the gradient of
    the mean loss, as DDP's average is for the replicated weights. -> {name: parameter} of the slices."""
    for m in model.modules():
        if isinstance(m, MoE):
            m.shard(dist.group.WORLD)
            for p in m.experts.parameters():
                p.register_hook(lambda g: g / world)
    return {f"{n}.experts.{k}": p for n, m in model.named_modules() if isinstance(m, MoE)
            for k, p in m.experts.named_parameters()}


def map_experts(model, optimizer, sharded, state, opt_state, fn):
    """Replace the expert weights and their AdamW moments in a model and an optimizer state dict by fn
    of them: gather (saving) or slice (resuming) along the expert dimension."""
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    for name, p in sharded.items():
        state[name] = fn(state[name])
        i = index[id(p)]
        if i in opt_state["state"]:     # a fresh dict: optimizer.state_dict() shares the live one
            opt_state["state"][i] = {k: fn(v) if k in ("exp_avg", "exp_avg_sq") else v
                                     for k, v in opt_state["state"][i].items()}


def gather(t, world):
    """The ranks' slices of a tensor, concatenated in rank order (a collective: every rank calls it)."""
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def grad_norm(model, sharded):
    """The norm of the whole model's gradient when each rank holds a slice of the experts: their squared
    norms are summed over the ranks (every rank then clips by the same factor)."""
    norm = lambda ps: torch.nn.utils.get_total_norm([p.grad for p in ps if p.grad is not None])   # noqa: E731
    experts = norm(sharded.values()) ** 2
    dist.all_reduce(experts)
    return (norm(p for n, p in model.named_parameters() if n not in sharded) ** 2 + experts).sqrt()


def all_to_all_volume(model, steps, device):
    """All ranks' training forwards since the last call (then cleared): per MoE layer, sends of a token
    to another rank per token (once to each rank holding any of its experts) and the expert copies they
    carry per token (what one send per copy would cost); bytes per step (dispatch and combine, forward;
    the backward moves as much again)."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    t = torch.tensor([m.traffic for m in moes], dtype=torch.float64, device=device)
    dist.all_reduce(t)                  # logging only
    for m in moes:
        m.traffic = [0, 0, 0, 0]
    per_token = lambda i: [round(v, 3) for v in (t[:, i] / t[:, 0].clamp(min=1)).tolist()]   # noqa: E731
    return dict(a2a_sends_per_token=per_token(1), a2a_copies_per_token=per_token(2),
                a2a_bytes_per_step=t[:, 3].sum().item() / steps)


# ----------------------------------------------------------------------------- training

def main(argv=None):
    cfg, explicit, presets = parse_config(sys.argv[1:] if argv is None else argv)
    # on resume the checkpoint's config is the base; only keys given again change
    ckpt = None
    if cfg["init_from"] == "resume":
        ckpt = read_checkpoint(Path(cfg["out_dir"]) / "ckpt.pt")
        # how the run is spread over processes is chosen afresh: expert_parallel is not inherited
        saved = {k: v for k, v in ckpt["config"].items() if k in DEFAULTS and k != "expert_parallel"}
        cfg = {**cfg, **saved, **{k: cfg[k] for k in explicit}, "init_from": "resume"}
    c = SimpleNamespace(**cfg)
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ     # under torchrun: one process per device
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    master = rank == 0
    if c.expert_parallel and not ddp:
        raise UserError("expert_parallel=True needs torchrun (one process per device), e.g. "
                        "torchrun --standalone --nproc_per_node=2 train.py --expert_parallel=True")
    if c.expert_parallel and c.n_routed_experts % world:
        raise UserError(f"expert_parallel=True: the world size {world} must divide n_routed_experts={c.n_routed_experts}")
    log = print if master else (lambda *a, **k: None)
    device = pick_device(c.device)
    device_type = torch.device(device).type
    if device_type == "cpu" and not presets and ckpt is None:
        auto = {k: v for k, v in CPU_SIZE.items() if k not in explicit}
        if auto:
            for k, v in auto.items():
                setattr(c, k, v)
            about = ", about 5 minutes on 2 CPU cores" if "max_iters" in auto else ""
            log(f"no GPU: a small model for {c.max_iters} steps{about} ({', '.join(f'{k}={v}' for k, v in auto.items())}); "
                f"a preset or --key=value sets any of these")
    check_config(c)
    if c.dtype == "auto":
        c.dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if device_type == "cuda" else "float32"
    if c.dtype == "float16" and device_type != "cuda":
        raise UserError("dtype float16 needs a CUDA device (use bfloat16 or float32)")
    if c.dtype == "float16" and c.expert_parallel:     # its loss scaler would skip steps on some ranks only
        raise UserError("expert_parallel=True needs dtype bfloat16 or float32, not float16")
    if ddp:
        if device_type == "cuda":
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")

    # data: rank 0 tokenises, the others then find the cache
    if master:
        folder, meta = prepare_data(c.data_dir, c.dataset, c.text, c.tokenizer, c.encoding, log)
    if ddp:
        dist.barrier()
    if not master:
        folder, meta = prepare_data(c.data_dir, c.dataset, c.text, c.tokenizer, c.encoding, log)
    if ckpt is not None and tokenizer_meta(meta) != ckpt["meta"]:
        raise UserError(f"the data's tokenizer ({meta['tokenizer']}, {meta['vocab_size']} tokens) differs "
                        f"from the checkpoint's ({ckpt['meta']['tokenizer']}, {ckpt['meta']['vocab_size']} tokens)")
    train_data, val_data = load_split(folder, "train", meta), load_split(folder, "val", meta)
    for split, data in (("train", train_data), ("val", val_data)):
        if len(data) < c.block_size + 1:
            raise UserError(f"the {split} split of {folder} has {len(data)} tokens, fewer than block_size + 1 = "
                            f"{c.block_size + 1}: lower block_size or use more text")
    if c.batch_size * c.block_size > len(train_data):
        raise UserError(f"a batch (batch_size * block_size = {c.batch_size * c.block_size} tokens) is larger than the "
                        f"train split ({len(train_data)} tokens): lower batch_size or block_size, or use more text")

    # model and optimizer
    torch.manual_seed(c.seed)                              # the same initial weights on every rank
    args = model_args_from(vars(c), meta["vocab_size"])
    raw = Transformer(args).to(device)
    sharded = shard_experts(raw, world) if c.expert_parallel else {}
    optimizer = configure_optimizer(raw, c.learning_rate, c.weight_decay, (c.beta1, c.beta2), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=c.dtype == "float16")
    iter_num, best_val_loss = 0, float("inf")
    if ckpt is not None:
        path = Path(c.out_dir) / "ckpt.pt"
        map_experts(raw, optimizer, sharded, ckpt["model"], ckpt["optimizer"], lambda t: t.chunk(world)[rank].clone())
        _load_state(raw, ckpt["model"], path)
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"{path}: optimizer state does not fit the model ({_one_line(e)})") from None
        if ckpt.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        log(f"resuming from {path} at step {iter_num} (best val loss {best_val_loss:.4f})")
    # dropout randomness: per rank; restored exactly for a single-process resume
    torch.manual_seed(batch_seed(c.seed, 3, rank, iter_num))
    if ckpt is not None and master and "rng" in ckpt:
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        if device_type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu())
    del ckpt

    model = torch.compile(raw) if c.compile else raw     # the MoE layers stay eager (see deepseek.MoE)
    if ddp:
        # buffers stay per rank: each counts its own tokens per expert (update_expert_bias sums them);
        # an expert that gets no token in a micro-batch is skipped, hence find_unused_parameters
        no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else "broadcast_buffers")    # the name before torch 2.13
        # each rank's own expert slices are not DDP's (their gradients come through the all-to-all)
        DDP._set_params_and_buffers_to_ignore_for_model(
            model, [n for n, _ in model.named_parameters() if n.removeprefix("_orig_mod.") in sharded])
        train_model = DDP(model, device_ids=[torch.device(device).index] if device_type == "cuda" else None,
                          find_unused_parameters=args.n_routed_experts > 0, **{no_sync: False})
    else:
        train_model = model
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[c.dtype]
    amp = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)

    tokens_per_step = c.batch_size * c.block_size * c.gradient_accumulation_steps * world
    flops_per_token = raw.flops_per_token(c.block_size)
    peak = c.peak_flops or default_peak_flops(device)
    log(f"model: {raw.num_params() / 1e6:.2f}M parameters, {raw.num_params(active=True) / 1e6:.2f}M active per token "
        f"(+{(raw.num_params(mtp=True) - raw.num_params()) / 1e6:.2f}M MTP); vocab {args.vocab_size} ({meta['tokenizer']})")
    log(f"training on {device} ({c.dtype}{', compiled' if c.compile else ''}"
        f"{f', {world} processes' if ddp else ''}): {tokens_per_step:,} tokens per step, {c.max_iters} steps; "
        f"data {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens")
    out_dir = Path(c.out_dir)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
    log_file = out_dir / "log.jsonl"

    def record(**entry):
        if master:
            with open(log_file, "a") as f:
                f.write(json.dumps(entry) + "\n")

    record(kind="config", step=iter_num, config=vars(c), world_size=world)

    @torch.no_grad()
    def evaluate():
        """Mean main (and MTP) loss over the same eval_iters batches per split every time, shared out
        over the ranks, so the numbers do not depend on the number of processes."""
        model.eval()
        out = {}
        for s, (split, data) in enumerate((("train", train_data), ("val", val_data))):
            sums = torch.zeros(2, device=device)
            # as many forwards on every rank (expert parallel layers exchange tokens), the extra ones not counted
            for k in range(rank, -(-c.eval_iters // world) * world, world):
                x, y = get_batch(data, c.batch_size, c.block_size, batch_seed(c.seed, 1 + s, k), device)
                with amp:
                    _, parts = model(x, y)
                sums += torch.stack([parts["main"], parts["mtp"]]).float() * (k < c.eval_iters)
            if ddp:
                dist.all_reduce(sums)
            out[split], out[f"{split}_mtp"] = (sums / c.eval_iters).tolist()
        model.train()
        return out

    # the loop: step iter_num trains on batches seeded by (seed, rank, iter_num, micro_step)
    start_iter, t_start = iter_num, time.time()
    t_last, steps_since, maxvio_sum = time.time(), 0, None
    raw.train()
    while True:
        just_resumed = iter_num == start_iter > 0 and not c.eval_only   # evaluated before it was saved
        if (iter_num % c.eval_interval == 0 or iter_num == c.max_iters or c.eval_only) and not just_resumed:
            losses = evaluate()
            improved = losses["val"] < best_val_loss
            best_val_loss = min(best_val_loss, losses["val"])
            saved, save = "", iter_num > start_iter and (improved or c.always_save_checkpoint)
            if save:
                state, opt_state = raw.state_dict(), optimizer.state_dict()
                map_experts(raw, optimizer, sharded, state, opt_state, lambda t: gather(t, world))   # all ranks
            if save and master:
                save_checkpoint(dict(
                    model=state, model_args=asdict(raw.args), meta=tokenizer_meta(meta),
                    optimizer=opt_state, scaler=scaler.state_dict(), iter_num=iter_num,
                    best_val_loss=best_val_loss, config=vars(c),
                    rng=dict(torch=torch.get_rng_state(),
                             cuda=torch.cuda.get_rng_state() if device_type == "cuda" else None),
                    # batches are drawn afresh from (seed, rank, step, micro_step): the step is the position
                    data=dict(step=iter_num, seed=c.seed, world_size=world)), out_dir / "ckpt.pt")
                saved = f" | saved {out_dir / 'ckpt.pt'}"
            log(f"eval step {iter_num}: train {losses['train']:.4f} val {losses['val']:.4f} "
                f"(mtp: train {losses['train_mtp']:.4f} val {losses['val_mtp']:.4f}) | best val {best_val_loss:.4f}{saved}")
            record(kind="eval", step=iter_num, best_val=best_val_loss, time_s=time.time() - t_start, **losses)
            t_last = time.time()      # keep evaluation out of the tokens/s figure
        if iter_num >= c.max_iters or c.eval_only:
            break

        lr = get_lr(iter_num, c)
        for group in optimizer.param_groups:
            group["lr"] = lr
        mtp_lambda = get_mtp_lambda(iter_num, c)
        parts = torch.zeros(4, device=device)       # total, main, mtp, balance: summed over micro-batches
        for micro in range(c.gradient_accumulation_steps):
            x, y = get_batch(train_data, c.batch_size, c.block_size, batch_seed(c.seed, 0, rank, iter_num, micro), device)
            last = micro == c.gradient_accumulation_steps - 1
            with (train_model.no_sync() if ddp and not last else nullcontext()):
                with amp:
                    _, losses = train_model(x, y, mtp_lambda=mtp_lambda)
                scaler.scale(losses["total"] / c.gradient_accumulation_steps).backward()
            parts += torch.stack([losses[k].detach() for k in ("total", "main", "mtp", "balance")]).float()
        if c.grad_clip > 0:
            scaler.unscale_(optimizer)
            if sharded:     # the whole model's gradient norm, with every rank's expert slices
                torch.nn.utils.clip_grads_with_norm_(raw.parameters(), c.grad_clip, grad_norm(raw, sharded))
            else:
                torch.nn.utils.clip_grad_norm_(raw.parameters(), c.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        maxvio = raw.update_expert_bias()   # counts of all micro-batches, summed over ranks inside
        maxvio_sum = maxvio if maxvio_sum is None else maxvio_sum + maxvio
        iter_num += 1
        steps_since += 1

        if iter_num % c.log_interval == 0 or iter_num == c.max_iters:
            total, main_l, mtp_l, bal = (parts / c.gradient_accumulation_steps).tolist()   # host sync: logging only
            mv = [round(v, 4) for v in (maxvio_sum / steps_since).tolist()]
            a2a = all_to_all_volume(raw, steps_since, device) if sharded else None
            dt = (time.time() - t_last) / steps_since
            tok_s = tokens_per_step / dt
            mfu = flops_per_token * tok_s / (peak * world) if peak else None
            eta = dt * (c.max_iters - iter_num)
            log(f"step {iter_num}/{c.max_iters} | loss {total:.4f} (main {main_l:.4f} mtp {mtp_l:.4f} bal {bal:.2e}) "
                f"| lr {lr:.2e} | {tok_s:,.0f} tok/s | mfu {f'{100 * mfu:.2f}%' if mfu is not None else '-'} "
                f"| maxvio {' '.join(f'{v:.2f}' for v in mv) or '-'} | eta {_hms(eta)}"
                + (f" | a2a sends/token {' '.join(f'{v:.2f}' for v in a2a['a2a_sends_per_token'])}, "
                   f"{a2a['a2a_bytes_per_step'] / 1e6:.2f} MB/step" if a2a else ""))
            record(kind="train", step=iter_num, loss=total, main=main_l, mtp=mtp_l, balance=bal, lr=lr,
                   mtp_lambda=mtp_lambda, tokens_per_s=tok_s, mfu=mfu, maxvio=mv, eta_s=eta,
                   time_s=time.time() - t_start, **(a2a or {}))
            t_last, steps_since, maxvio_sum = time.time(), 0, None

    wall = time.time() - t_start
    log(f"done: best val loss {best_val_loss:.4f}, {_hms(wall)} wall")
    record(kind="done", step=iter_num, best_val=best_val_loss, wall_s=wall)
    if ddp:
        # every rank must hold the same weights and balancing biases: compare them elementwise
        flat = torch.cat([t.detach().float().flatten() for k, t in raw.state_dict().items() if k not in sharded])
        hi, lo = flat.clone(), flat.clone()
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        same = bool(torch.equal(hi, lo))
        log(f"ddp check: {'replicated ' if sharded else ''}weights and balancing biases "
            + (f"identical on all {world} ranks" if same else f"DIFFER between the {world} ranks"))
        record(kind="ddp_check", identical=same, world_size=world)
        # free the DDP reducer before its process group: torch 2.13 with gloo otherwise aborts at exit
        # now and then ("terminate called without an active exception")
        del train_model
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return best_val_loss


def _hms(s):
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def cli(argv=None):
    """main() with user errors as one line on stderr (rank 0 only) and exit code 2."""
    try:
        main(argv)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        if dist.is_initialized():
            dist.destroy_process_group()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
