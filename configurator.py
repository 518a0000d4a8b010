"""train.py's configuration, as nanoGPT's configurator.py: its DEFAULTS, then each preset file
(config/NAME.py: plain Python assignments), then --key=value from the command line; then every value
checked against the others and the machine. A mistake is one line (data.UserError), with a suggestion
where one helps: an unknown key names the nearest valid one.

    cfg, explicit, presets = parse_config(["config/shakespeare_char_cpu.py", "--max_iters=500"], DEFAULTS)
    check_config(SimpleNamespace(**cfg), device=pick_device("auto"), world=None)
"""
import ast
import difflib
from pathlib import Path

import torch

from data import UserError, one_line
from deepseek import ModelArgs
from fp8 import FP8_CC

MODEL_KEYS = [k for k in ModelArgs.__dataclass_fields__ if k not in ("vocab_size", "max_seq_len")]


def parse_config(argv, defaults):
    """defaults, then each preset file (config/NAME.py, or just NAME: plain Python assignments, which see the
    values so far and __file__), then --key=value (--flag alone sets a bool), in argv order. An unknown key
    or a wrong type is a UserError naming the valid keys. Returns (config, keys set, preset files)."""
    cfg, explicit, presets, here = dict(defaults), set(), [], Path(__file__).parent

    def put(key, value, shown, where=""):
        if key not in defaults:
            near = difflib.get_close_matches(key, defaults, n=1)
            raise UserError(f"unknown config key {key!r}{where}{f' (did you mean {near[0]}?)' if near else ''}; "
                            f"valid keys: {', '.join(sorted(defaults))}")
        want = type(defaults[key])
        cfg[key] = float(value) if want is float and type(value) is int else value
        if type(cfg[key]) is not want:
            raise UserError(f"{key} must be {want.__name__}, not {shown!r}")
        explicit.add(key)

    for arg in argv:
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            want = type(defaults.get(key))
            if key in defaults and not eq and want is not bool:
                raise UserError(f"--{key} needs a value: --{key}=VALUE")
            try:   # a Python literal, else true/false in any case, else the text itself
                value = True if not eq else raw if want is str else ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = {"true": True, "false": False}.get(raw.lower(), raw)
            put(key, value, raw)
            continue
        path = next((p for p in (Path(arg), here / arg, here / "config" / f"{arg}.py") if p.is_file()), None)
        if path is None:
            names = ", ".join(sorted(p.stem for p in (here / "config").glob("*.py")))
            raise UserError(f"config file {arg} not found (presets: {names})")
        assigned = {}
        try:
            exec(path.read_text(), dict(cfg, __file__=str(path)), assigned)
        except Exception as e:
            raise UserError(f"{path}: {one_line(e)}") from None
        for key, value in assigned.items():
            if not (key.startswith("_") or callable(value) or type(value).__name__ == "module"):
                put(key, value, value, f" in {path}")
        presets.append(str(path))
    return cfg, explicit, presets


def model_args_from(cfg, vocab_size):
    """ModelArgs from a config dict: its model keys, the data's vocabulary, block_size as max_seq_len."""
    try:
        return ModelArgs(vocab_size=vocab_size, max_seq_len=cfg["block_size"], **{k: cfg[k] for k in MODEL_KEYS})
    except (ValueError, TypeError) as e:
        raise UserError(f"bad model config: {e}") from None


def pick_device(spec):
    """'auto' -> cuda, then mps, then cpu; anything else is checked against this machine. A CUDA device
    comes back as cuda:N and is made current: Triton launches, RNG states and capability queries use it."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device {spec!r}: use auto, cpu, cuda, cuda:N or mps")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if dev.type == "cuda" and n == 0 or dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {spec!r}: {dev.type.upper()} is not available on this machine")
    if dev.type != "cuda":
        return str(dev)
    if (dev.index or 0) >= n:
        raise UserError(f"device {spec!r} does not exist: this machine has {n} CUDA device(s)")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    torch.cuda.set_device(index)
    return f"cuda:{index}"


def check_config(c, device, world):
    """Value checks that need no data: ranges, choices, out_dir, the model's own (ModelArgs) checks, and what the
    device and torchrun's world size (None without) allow. c.dtype is already resolved (not "auto")."""
    for key, least in dict(batch_size=1, block_size=1, gradient_accumulation_steps=1, eval_interval=1, eval_iters=1,
                           log_interval=1, max_iters=0).items():
        if getattr(c, key) < least:
            raise UserError(f"{key} must be at least {least}, not {getattr(c, key)}")
    for key, allowed in dict(tokenizer=("bpe", "char"), dtype=("auto", "float32", "bfloat16", "float16")).items():
        if getattr(c, key) not in allowed:
            raise UserError(f"{key} must be one of {', '.join(allowed)}, not {getattr(c, key)!r}")
    if blocked := next((p for p in (Path(c.out_dir), *Path(c.out_dir).parents) if p.exists() and not p.is_dir()), None):
        raise UserError(f"out_dir {c.out_dir}: {blocked} is a file, not a folder")
    model_args_from(vars(c), vocab_size=1)
    cuda = device.startswith("cuda")
    if c.dtype == "float16" and not cuda:
        raise UserError("dtype float16 needs a CUDA device (use bfloat16 or float32)")
    if c.expert_parallel and world is None:
        raise UserError("expert_parallel=True needs torchrun (one process per device), e.g. "
                        "torchrun --standalone --nproc_per_node=2 train.py --expert_parallel=True")
    if c.expert_parallel and c.n_routed_experts % world:
        raise UserError(f"expert_parallel=True: the world size {world} must divide n_routed_experts={c.n_routed_experts}")
    if c.expert_parallel and c.dtype == "float16":     # its loss scaler would skip steps on some ranks only
        raise UserError("expert_parallel=True needs dtype bfloat16 or float32, not float16")
    # Inductor fuses the cast to E4M3 into a Triton kernel, and Triton stores E4M3 only from FP8_CC on
    if c.compile and c.fp8 and cuda and torch.cuda.get_device_capability(device) < FP8_CC:
        raise UserError("compile=True with fp8=True needs compute capability 8.9 or newer (Triton cannot store E4M3 "
                        "below it): drop one of the two")
