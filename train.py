"""Train the DeepSeek-V3 of deepseek.py (MLA, DeepSeekMoE with aux-loss-free balancing, MTP), nanoGPT style.

    python train.py                                     # Tiny Shakespeare's characters, nanoGPT's budget (GPU or CPU;
                                                        # on a CPU by Muon: config/shakespeare_char_cpu_muon.py)
    python train.py config/shakespeare_char.py          # a preset ...
    python train.py config/shakespeare_char_cpu.py --device=cpu --max_iters=500   # ... then overrides (V3's AdamW)
    python train.py --text=my_book.txt --tokenizer=bpe  # your own text (a .txt file or a folder of them)
    python train.py --init_from=resume --out_dir=out    # continue the run saved in out/ckpt.pt
    python train.py config/shakespeare_char_cpu_256.py  # a new run from its weights: context 64 -> 256 with YaRN
    python train.py config/shakespeare_char_cpu_fast.py # nanoGPT's CPU quality in the least wall: dense, Muon, no MTP
    python train.py --optimizer=muon                    # Muon (DeepSeek-V4's) for the matrices: pretraining/optim.py
    python train.py --init_from=out-hf --out_dir=out-ft # fine-tune a folder in DeepSeek's layout (checkpoint/hf.py, export.py)
    torchrun --standalone --nproc_per_node=8 train.py config/shakespeare_char.py
    torchrun --standalone --nproc_per_node=8 train.py --expert_parallel=True   # experts sharded: systems/expert_parallel.py

Batches and dropout masks are a pure function of (seed, rank, step), so a resumed run repeats an uninterrupted
one (bit for bit on a CPU; on CUDA, index_add and the attention backward accumulate with atomics in whatever order
the threads run, so expect the same run statistically, not bitwise). Under torchrun every rank draws its own
batches, DistributedDataParallel averages the gradients, and the experts' token counts are summed over
micro-batches and ranks before each bias update: every rank applies the same.
"""
import gc
import inspect
import json
import os
import re
import signal
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import kernels
from checkpoint.ckpt import checkpoint_path, load_state, read_checkpoint, save_checkpoint
from deepseek import ModelArgs, Transformer
from pretraining.configurator import (MODEL_KEYS, Stopped, UserError, compute_dtype, model_args_from, one_line,
                                      parse_config, pick_device, run_cli, set_threads)
from pretraining.data import batch_seed, get_batch, load_data, tokenizer_meta
from pretraining.optim import OPTIMIZERS, configure_optimizer, get_lr
from systems import fp8
from systems.fp8 import FP8_CC
from systems.expert_parallel import all_to_all_volume, grad_norm, gather, map_experts, shard_experts

# ----------------------------------------------------------------------------- defaults
# What `python train.py` runs on a CUDA GPU: nanoGPT's train_shakespeare_char budget (its best val loss 1.4697) with
# our architecture. Without a GPU and with no preset, config/shakespeare_char_cpu_muon.py's changes apply on top
# (nanoGPT's CPU recipe, trained by Muon for the wall of 2000 AdamW steps). Preset files (config/*.py) and --key=value
# change any key (pretraining/configurator.py).
DEFAULTS = dict(
    # I/O: evaluate (and checkpoint) every eval_interval steps and at the end, on eval_iters batches per split
    out_dir="out", eval_interval=250, eval_iters=200, log_interval=10, eval_only=False,
    always_save_checkpoint=False,  # False: save only when val loss improves (the run overfits late); True: always
    overwrite=False,              # True: a new run may replace the ckpt.pt in out_dir (else it refuses, one line)
    init_from="scratch",          # "scratch" | "resume" (out_dir/ckpt.pt) | a folder: a new run from its ckpt.pt's
                                  # weights, or from a folder in DeepSeek's layout (config.json + safetensors: checkpoint/hf.py)
    # data: Tiny Shakespeare or your text (a .txt file or a folder of them), tokenised once into data_dir/NAME/TOKENIZER/
    text="", dataset="", data_dir="data",  # NAME: dataset, else "shakespeare" or the text file's name
    tokenizer="char", encoding="r50k_base",  # "char" | "bpe" (tiktoken's encoding; r50k_base is GPT-2's)
    # per micro-batch and process: batch_size sequences of block_size tokens (the model's max_seq_len)
    batch_size=64, block_size=256, gradient_accumulation_steps=1,
    # model: each deepseek.ModelArgs field is a key, its default there (6 layers, dim 384, MLA, 16 experts top-2), and
    dropout=0.2,
    # MTP loss weight: mtp_lambda (a ModelArgs key, 0.3), mtp_lambda_late from step mtp_lambda_step on (-1: never);
    # the report lowers it for the last part of training
    mtp_lambda_late=0.1, mtp_lambda_step=3500,
    # AdamW (weight decay on matrices only), linear warmup then cosine decay to min_lr; grad_clip 0: none
    learning_rate=1e-3, max_iters=5000, weight_decay=0.1, beta1=0.9, beta2=0.99, grad_clip=1.0,
    decay_lr=True, warmup_iters=100, lr_decay_iters=5000, min_lr=1e-4,
    # optimizer: "adamw" (DeepSeek-V3's) | "muon" (DeepSeek-V4's: the blocks' matrices by Muon, each routed expert
    # on its own unless muon_experts=False puts them on AdamW; embedding, head, norms and gate centroids by AdamW;
    # pretraining/optim.py). muon_rms: a Muon update's RMS per unit of learning rate (Moonlight's 0.2 is AdamW's;
    # 2.0 measured best at the CPU preset's size)
    optimizer="adamw", muon_rms=2.0, muon_momentum=0.95, muon_experts=True,
    # system; compile: torch.compile the model; peak_flops: per-device peak FLOP/s for MFU (0: PEAK_BF16)
    device="auto",                # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    dtype="auto",                 # auto (CUDA: bf16 where native, else fp16; fp32 elsewhere) | float32 | bfloat16 | float16
    compile=False, seed=1337, peak_flops=0.0,
    threads=0,                    # CPU threads for torch on a CPU device (0: the cores idle at start)
    kernels=True,                 # kernels.py's MoE paths (False: deepseek.py's reference, a loop over experts)
    fp8=False,                    # the blocks' linear layers and experts train in FP8 (report §3.3, systems/fp8.py)
    expert_parallel=False,        # the routed experts sharded over the ranks (report §3.2, systems/expert_parallel.py)
)
DEFAULTS.update({k: ModelArgs.__dataclass_fields__[k].default for k in MODEL_KEYS if k not in DEFAULTS})
CPU_PRESET = "shakespeare_char_cpu_muon"   # no preset and no CUDA device: nanoGPT's CPU budget, in wall time
# the ModelArgs keys that set the weights' shapes: a run from a checkpoint keeps them
SHAPE_KEYS = ("dim", "inter_dim", "moe_inter_dim", "n_layers", "n_dense_layers", "n_heads", "n_routed_experts",
              "n_shared_experts", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
              "n_mtp", "attn")


def configure(argv, world=None, log=print):
    """(config, checkpoint to start from or None, device); world: torchrun's world size, None without. The config:
    DEFAULTS, with CPU_PRESET's changes when no preset is given and no CUDA device runs it, then the config saved with
    the checkpoint the run starts from (a folder in DeepSeek's layout saves only its model's), then the presets and
    keys given. c.dtype stays as given ("auto"; configurator.compute_dtype says what runs)."""
    cfg, explicit, presets = parse_config(argv, DEFAULTS, __doc__)
    ckpt, path = None, init_path(cfg)
    saved = {}
    if path:
        ckpt = read_checkpoint(path)
        saved = {k: v for k, v in ckpt["config"].items() if k in DEFAULTS and k != "expert_parallel"}   # chosen afresh
    device = pick_device({**cfg, **saved, **{k: cfg[k] for k in explicit}}["device"])
    if device.startswith("cuda") and "LOCAL_RANK" in os.environ:     # torchrun: one GPU per process
        device = pick_device(f"cuda:{os.environ['LOCAL_RANK']}")
    cpu_default = not (presets or device.startswith("cuda"))
    base = parse_config([CPU_PRESET, *argv], DEFAULTS)[0] if cpu_default else cfg
    cfg = {**base, "out_dir": cfg["out_dir"], **saved, **{k: cfg[k] for k in explicit}}   # out_dir: still "out"
    if path:
        if changed := [f"{k} {ckpt['model_args'][k]} -> {cfg[k]}" for k in SHAPE_KEYS if cfg[k] != ckpt["model_args"][k]]:
            raise UserError(f"{', '.join(changed)} would change the shapes of {path}'s weights: a run from them keeps them")
        if cfg["init_from"] != "resume" and ("out_dir" not in explicit or
                                             Path(cfg["out_dir"]).resolve() == Path(cfg["init_from"]).resolve()):
            raise UserError(f"a new run from {path} needs an out_dir of its own (--out_dir=...): it would overwrite "
                            f"what it starts from")
        was = saved.get("optimizer", "adamw")
        if cfg["init_from"] == "resume" and cfg["optimizer"] != was:     # its optimizer state would not fit
            raise UserError(f"{path} trains with optimizer={was}: a resumed run keeps it (a new run from its "
                            f"weights, --init_from=FOLDER, may take another)")
        if cfg["dtype"] == "float16" and not device.startswith("cuda") and "dtype" not in explicit:
            raise UserError(f"dtype float16, from {path}'s config, needs a CUDA device: --dtype=auto (or float32, "
                            f"bfloat16) runs it here")
    c = SimpleNamespace(**cfg)
    if c.score_func == "softmax" and c.bias_update_speed > 0:   # DeepSeek's V2 gate: no bias (as ModelArgs.from_json)
        if "bias_update_speed" in explicit:
            raise UserError("bias_update_speed must be 0 with score_func=softmax: DeepSeek's softmax (V2) gate has no "
                            "balancing bias")
        c.bias_update_speed = 0.0
        log("score_func=softmax: bias_update_speed 0, as DeepSeek's V2 gate, which has no balancing bias")
    if (Path(c.out_dir) / "ckpt.pt").exists() and c.init_from != "resume" and not c.overwrite:
        raise UserError(f"{c.out_dir}/ckpt.pt exists and a new run would overwrite it: --init_from=resume continues it, "
                        f"--out_dir=OTHER starts one beside it, --overwrite=True replaces it")
    check_config(c, device, world)
    if not presets and not ckpt:
        log(f"no preset: {f'config/{CPU_PRESET}.py on DEFAULTS' if cpu_default else 'DEFAULTS'}, nanoGPT's "
            f"{'CPU budget in wall time' if cpu_default else 'GPU budget'} ({c.max_iters} steps), into {c.out_dir}; "
            f"a preset or --key=value changes any key (GPT-2 BPE: --tokenizer=bpe)")
    return c, ckpt, device


def check_config(c, device, world):
    """Value checks that need no data: ranges, choices, out_dir, the model's own (ModelArgs) checks, and what the
    device and torchrun's world size (None without) allow (c.dtype as compute_dtype resolves it there)."""
    for key, least in dict(batch_size=1, block_size=1, gradient_accumulation_steps=1, eval_interval=1, eval_iters=1,
                           log_interval=1, max_iters=0).items():
        if getattr(c, key) < least:
            raise UserError(f"{key} must be at least {least}, not {getattr(c, key)}")
    for key, allowed in dict(tokenizer=("bpe", "char"), dtype=("auto", "float32", "bfloat16", "float16"),
                             optimizer=OPTIMIZERS).items():
        if getattr(c, key) not in allowed:
            raise UserError(f"{key} must be one of {', '.join(allowed)}, not {getattr(c, key)!r}")
    if blocked := next((p for p in (Path(c.out_dir), *Path(c.out_dir).parents) if p.exists() and not p.is_dir()), None):
        raise UserError(f"out_dir {c.out_dir}: {blocked} is a file, not a folder")
    model_args_from(vars(c), vocab_size=1)
    cuda = device.startswith("cuda")
    float16 = compute_dtype(c.dtype, device) == torch.float16
    if float16 and not cuda:
        raise UserError("dtype float16 needs a CUDA device (use bfloat16 or float32)")
    if c.expert_parallel and world is None:
        raise UserError("expert_parallel=True needs torchrun (one process per device), e.g. "
                        "torchrun --standalone --nproc_per_node=2 train.py --expert_parallel=True")
    if c.expert_parallel and c.n_routed_experts % world:
        raise UserError(f"expert_parallel=True: the world size {world} must divide n_routed_experts={c.n_routed_experts}")
    if c.expert_parallel and float16:     # its loss scaler would skip steps on some ranks only
        raise UserError("expert_parallel=True needs dtype bfloat16 or float32, not float16")
    # Inductor fuses the cast to E4M3 into a Triton kernel, and Triton stores E4M3 only from FP8_CC on
    if c.compile and c.fp8 and cuda and torch.cuda.get_device_capability(device) < FP8_CC:
        raise UserError("compile=True with fp8=True needs compute capability 8.9 or newer (Triton cannot store E4M3 "
                        "below it): drop one of the two")


def init_path(cfg):
    """The checkpoint a run starts from: out_dir's ckpt.pt on resume, what the init_from folder holds (its ckpt.pt,
    or the folder itself in DeepSeek's layout: checkpoint_path), None from scratch."""
    if cfg["init_from"] in ("scratch", "resume"):
        return None if cfg["init_from"] == "scratch" else Path(cfg["out_dir"]) / "ckpt.pt"
    return checkpoint_path(cfg["init_from"])


# ----------------------------------------------------------------------------- model, schedule, MFU

def get_mtp_lambda(it, c):
    return c.mtp_lambda_late if 0 <= c.mtp_lambda_step <= it else c.mtp_lambda


# Dense bf16 tensor-core peaks, FLOP/s: NVIDIA datasheets (data-centre cards: half the "with sparsity" figure),
# architecture whitepapers (GeForce: with fp32 accumulation, as PyTorch's matmuls; GA102, Ada, Blackwell RTX).
PEAK_BF16 = {"B200": 2250e12, "H200": 989e12, "H200 NVL": 835e12, "H100": 989e12, "H100 NVL": 835e12,
             "H100 PCIe": 756e12, "A100": 312e12, "A40": 150e12, "A10": 125e12, "L40S": 362e12, "L40": 181e12,
             "L4": 121e12, "RTX 6000 Ada": 364e12, "RTX A6000": 155e12, "RTX 5090": 209.5e12,
             "RTX 4090": 165.2e12, "RTX 3090": 71e12}


def peak_flops(name):
    """PEAK_BF16 for a CUDA device name ('NVIDIA H100 PCIe'): whole words, the longest entry first (L4 is
    not L40S, H100 not H100 PCIe); 0.0 when unknown."""
    return next((PEAK_BF16[k] for k in sorted(PEAK_BF16, key=len, reverse=True) if re.search(rf"\b{k}\b", name, re.I)), 0.0)


# ----------------------------------------------------------------------------- training

def init_model(c, meta, ckpt, device, dtype, rank, world, log):
    """(model, expert slices {name: parameter} or {}, optimizer, grad scaler, step, best val loss, sizes: parameter
    counts and training FLOPs per token): fresh or from ckpt; kernels.py's MoE paths, FP8 and expert parallelism
    put in as the config asks."""
    torch.manual_seed(c.seed)                              # the same initial weights on every rank
    device_type = torch.device(device).type
    model = Transformer(model_args_from(vars(c), meta["vocab_size"])).to(device)
    # the whole model's, before expert parallelism slices the experts
    sizes = dict(params=model.num_params(), active_params=model.num_params(active=True),
                 mtp_params=model.num_params(mtp=True) - model.num_params(), flops_per_token=model.flops_per_token(c.block_size))
    if c.kernels:
        kernels.install(model)
    if c.fp8:
        fp8.convert(model)
    sharded = shard_experts(model, world) if c.expert_parallel else {}
    optimizer = configure_optimizer(model, c.learning_rate, c.weight_decay, (c.beta1, c.beta2), device_type,
                                    c.optimizer, c.muon_rms, c.muon_momentum, c.muon_experts)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    iter_num, best_val_loss = 0, float("inf")
    if ckpt is not None:
        path = init_path(vars(c))
        map_experts(optimizer, sharded, ckpt["model"], ckpt["optimizer"], lambda t: t.chunk(world)[rank].clone())
        load_state(model, ckpt["model"], path)
        if c.init_from == "resume":    # else a new run (a phase: context extension) from the weights alone, step 0
            try:
                optimizer.load_state_dict(ckpt["optimizer"])
            except (ValueError, KeyError) as e:
                raise UserError(f"{path}: optimizer state does not fit the model ({one_line(e)})") from None
            if ckpt.get("scaler") and scaler.is_enabled():
                scaler.load_state_dict(ckpt["scaler"])
            iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        log(f"resuming from {path} at step {iter_num} (best val loss {best_val_loss:.4f})" if c.init_from == "resume" else
            f"from {path}'s weights, a fresh optimizer: context {c.block_size}, YaRN {c.block_size > c.original_seq_len}")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # CUDA fp32 matmuls: TF32
    log(f"model: {sizes['params'] / 1e6:.2f}M parameters, {sizes['active_params'] / 1e6:.2f}M active per token "
        f"(+{sizes['mtp_params'] / 1e6:.2f}M MTP); vocab {model.args.vocab_size} ({meta['tokenizer']})")
    return model, sharded, optimizer, scaler, iter_num, best_val_loss, sizes


def drop_counts_if_skipped(model, scaler, optimizer):
    """A step the fp16 loss scaler skipped (inf or NaN gradients) skips the bias update too: its token counts are
    zeroed, and b_i += gamma * sign(0) changes nothing. On the device (no host sync); call between scaler.step and
    scaler.update, while the scaler still holds what it found."""
    if scaler.is_enabled():
        found_inf = sum(scaler._found_inf_per_device(optimizer).values())
        for g in model.gates():
            g.load.mul_(found_inf == 0)


def wrap_ddp(model, device, sharded):
    """DDP with per-rank buffers: each rank counts its own tokens per expert (summed before the bias update). Every
    parameter gets a gradient every step (an expert with no token still gets zeros: the weights are stacked)."""
    DDP._set_params_and_buffers_to_ignore_for_model(    # expert slices: their gradients come by the all-to-all
        model, [n for n, _ in model.named_parameters() if n.removeprefix("_orig_mod.") in sharded])
    sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    return DDP(model, device_ids=[torch.device(device).index] if device.startswith("cuda") else None,
               **{sync: False})   # broadcast_buffers: torch < 2.13


@torch.no_grad()
def evaluate(model, splits, c, amp, device, rank, world):
    """Mean main (and MTP) loss over the same eval_iters batches per split every time, shared out over
    the ranks, so the numbers do not depend on the number of processes."""
    model.eval()
    out = {}
    for s, (split, data) in enumerate(splits.items()):
        sums = torch.zeros(2, device=device)
        for k in range(rank, -(-c.eval_iters // world) * world, world):   # as many on every rank: EP exchanges
            x, y = get_batch(data, c.batch_size, c.block_size, batch_seed(c.seed, 1 + s, k), device)
            with amp:
                _, losses = model(x, y)
            sums += torch.stack([losses["main"], losses["mtp"]]).float() * (k < c.eval_iters)   # extras: 0
        if world > 1:
            dist.all_reduce(sums)
        out[split], out[f"{split}_mtp"] = (sums / c.eval_iters).tolist()
    model.train()
    return out


def checkpoint(model, sharded, optimizer, scaler, meta, c, iter_num, best_val_loss, world):
    """Everything a resume needs (batches and dropout masks come from (seed, rank, step): no RNG state)."""
    state, opt_state = model.state_dict(), optimizer.state_dict()
    map_experts(optimizer, sharded, state, opt_state, lambda t: gather(t, world))   # all experts: every rank calls this
    return dict(model=state, model_args=asdict(model.args), meta=tokenizer_meta(meta),
                optimizer=opt_state, scaler=scaler.state_dict(), iter_num=iter_num,
                best_val_loss=best_val_loss, config=vars(c), data=dict(step=iter_num, seed=c.seed, world_size=world))


def ranks_identical(model, sharded):
    """True when all ranks hold the same weights (expert slices aside) and balancing biases: per tensor, max == min."""
    same = []
    for t in [v.detach().float() for k, v in model.state_dict().items() if k not in sharded]:
        hi = torch.stack([t, -t])                      # max over ranks of t and of -t: -min
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        same.append(torch.equal(hi[0], -hi[1]))
    return all(same)


def main(argv=None):
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ     # under torchrun: one process per device
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    log = print if rank == 0 else (lambda *a, **k: None)
    c, ckpt, device = configure(sys.argv[1:] if argv is None else argv, world if ddp else None, log)
    device_type, dtype = torch.device(device).type, compute_dtype(c.dtype, device)
    threads = set_threads(c.threads, device)
    if ddp:
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    train_data, val_data, meta = load_data(c, ckpt, rank, log)
    raw, sharded, optimizer, scaler, iter_num, best_val_loss, sizes = init_model(c, meta, ckpt, device, dtype, rank,
                                                                                 world, log)
    del ckpt
    model = torch.compile(raw) if c.compile else raw
    train_model = wrap_ddp(model, device, sharded) if ddp else model
    amp = nullcontext() if dtype == torch.float32 else torch.autocast(device_type, dtype=dtype)
    accum = c.gradient_accumulation_steps
    tokens_per_step = c.batch_size * c.block_size * accum * world
    peak = c.peak_flops or (peak_flops(torch.cuda.get_device_name(device)) if device_type == "cuda" else 0.0)
    log(f"training on {device} ({str(dtype).removeprefix('torch.')}{', compiled' if c.compile else ''}"
        f"{f', {world} processes' if ddp else ''}{f', {threads} CPU threads' if device_type == 'cpu' else ''}): "
        f"{tokens_per_step:,} tokens per step, {c.max_iters} steps; "
        f"data {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens")
    log(kernels.describe(raw, device, dtype) + (f"; {fp8.describe(device)}" if c.fp8 else ""))
    out_dir = Path(c.out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)

    def record(**entry):
        if rank == 0:
            with open(out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
    if rank == 0 and c.init_from != "resume":     # a new run: a new log (a resumed one goes on with its own)
        (out_dir / "log.jsonl").unlink(missing_ok=True)
    record(kind="config", step=iter_num, config=vars(c), world_size=world, **sizes)
    start_iter, t_start, t_last, maxvios = iter_num, time.time(), time.time(), []
    saved_at = (iter_num, best_val_loss) if c.init_from == "resume" else None     # out_dir's checkpoint: step, val
    hms = lambda s: time.strftime("%H:%M:%S", time.gmtime(s))     # noqa: E731
    stop = ctrl_c_stops() if not ddp else None       # under torchrun, ranks would stop at different steps
    raw.train()
    while True:
        # evaluate (and save) every eval_interval steps and at the end; a resumed step was evaluated already
        if (iter_num % c.eval_interval == 0 or iter_num == c.max_iters or c.eval_only) and \
                not (iter_num == start_iter > 0 and not c.eval_only):
            t_eval = time.time()
            losses = evaluate(model, dict(train=train_data, val=val_data), c, amp, device, rank, world)
            improved, best_val_loss = losses["val"] < best_val_loss, min(best_val_loss, losses["val"])
            saved = ""
            if iter_num > start_iter and (improved or c.always_save_checkpoint):
                save_checkpoint(checkpoint(raw, sharded, optimizer, scaler, meta, c, iter_num, best_val_loss, world),
                                out_dir / "ckpt.pt")                         # every rank: the experts are gathered
                saved, saved_at = f" | saved {out_dir / 'ckpt.pt'}", (iter_num, best_val_loss)
            log(f"eval step {iter_num}: train {losses['train']:.4f} val {losses['val']:.4f} (mtp: train "
                f"{losses['train_mtp']:.4f} val {losses['val_mtp']:.4f}) | best val {best_val_loss:.4f}{saved}")
            record(kind="eval", step=iter_num, best_val=best_val_loss, time_s=time.time() - t_start, **losses)
            t_last += time.time() - t_eval      # keep evaluation out of the tokens/s figure
        if iter_num >= c.max_iters or c.eval_only or stop and stop.is_set():
            break

        # one optimizer step on the gradient of the mean loss over accum micro-batches
        lr = get_lr(iter_num, c)
        for group in optimizer.param_groups:
            group["lr"] = lr
        mtp_lambda = get_mtp_lambda(iter_num, c)
        torch.manual_seed(batch_seed(c.seed, 3, rank, iter_num))   # dropout masks: a function of (seed, rank, step)
        parts = torch.zeros(4, device=device)       # total, main, mtp, balance: summed over micro-batches
        for micro in range(accum):
            x, y = get_batch(train_data, c.batch_size, c.block_size, batch_seed(c.seed, 0, rank, iter_num, micro), device)
            with train_model.no_sync() if ddp and micro < accum - 1 else nullcontext():   # all-reduce on the last
                with amp:
                    _, losses = train_model(x, y, mtp_lambda=mtp_lambda)
                scaler.scale(losses["total"] / accum).backward()
            parts += torch.stack([losses[k].detach() for k in ("total", "main", "mtp", "balance")]).float()
        if c.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grads_with_norm_(raw.parameters(), c.grad_clip, grad_norm(raw, sharded))
        scaler.step(optimizer)
        drop_counts_if_skipped(raw, scaler, optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        for g in raw.gates() if ddp else []:            # the counts of all micro-batches and ranks
            dist.all_reduce(g.load)
        maxvios.append(raw.update_expert_bias())
        iter_num += 1

        if iter_num % c.log_interval == 0 or iter_num == c.max_iters:
            total, main_l, mtp_l, bal = (parts / accum).tolist()   # host sync: logging only
            mv = [round(v, 4) for v in torch.stack(maxvios).mean(0).tolist()]
            dt = (time.time() - t_last) / len(maxvios)
            tok_s, eta = tokens_per_step / dt, dt * (c.max_iters - iter_num)
            mfu = sizes["flops_per_token"] * tok_s / (peak * world) if peak else None
            a2a, a2a_text = all_to_all_volume(raw, len(maxvios), device) if sharded else ({}, "")
            log(f"step {iter_num}/{c.max_iters} | loss {total:.4f} (main {main_l:.4f} mtp {mtp_l:.4f} bal {bal:.2e}) "
                f"| lr {lr:.2e} | {tok_s:,.0f} tok/s | mfu {f'{100 * mfu:.2f}%' if mfu is not None else '-'} "
                f"| maxvio {' '.join(f'{v:.2f}' for v in mv) or '-'} | eta {hms(eta)}{a2a_text}")
            record(kind="train", step=iter_num, loss=total, main=main_l, mtp=mtp_l, balance=bal, lr=lr, eta_s=eta,
                   mtp_lambda=mtp_lambda, tokens_per_s=tok_s, mfu=mfu, maxvio=mv, time_s=time.time() - t_start, **a2a)
            t_last, maxvios = time.time(), []

    wall = time.time() - t_start
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if stop and stop.is_set():
        record(kind="stopped", step=iter_num, saved_step=saved_at and saved_at[0], wall_s=wall)
        raise Stopped(f"Ctrl-C at step {iter_num}; " + (
            f"the last checkpoint is {out_dir / 'ckpt.pt'} (step {saved_at[0]}, best val {saved_at[1]:.4f}): "
            f"python train.py --init_from=resume --out_dir={c.out_dir} continues from it" if saved_at else
            "no checkpoint saved yet (the first comes at the first evaluation that improves on step "
            f"{start_iter}'s val loss)"))
    nothing = "" if saved_at and saved_at[0] > start_iter or c.eval_only else (
        f"; nothing saved: no evaluation improved on step {start_iter}'s val loss (--always_save_checkpoint=True "
        f"keeps the last weights)")
    log(f"done: best val loss {best_val_loss:.4f}, {hms(wall)} wall{nothing}")
    record(kind="done", step=iter_num, best_val=best_val_loss, wall_s=wall)
    if ddp:
        same = ranks_identical(raw, sharded)
        log(f"ddp check: weights and balancing biases {'identical on all' if same else 'DIFFER between the'} {world} ranks")
        record(kind="ddp_check", identical=same, world_size=world)
        # free the DDP reducer before its process group (else torch 2.13 + gloo now and then aborts at exit)
        del train_model
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return best_val_loss


def ctrl_c_stops():
    """From now on the first Ctrl-C (SIGINT) sets the event returned, and the loop stops at the end of the step;
    a second one interrupts at once, as Python does by default."""
    stop = threading.Event()

    def handler(signum, frame):
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def cli(argv=None):
    """main() with user errors as one line on stderr (rank 0 only) and exit code 2, Ctrl-C as one line (where the
    last checkpoint is, how to resume) and exit code 130."""
    try:
        return run_cli(main, argv, quiet=os.environ.get("RANK", "0") != "0")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(cli())
