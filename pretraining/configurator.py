"""What every command line shares, as nanoGPT's configurator.py: a command's DEFAULTS, then each preset file
(config/NAME.py: plain Python assignments), then --key=value, in that order; --help lists the keys with the
values they would take. Then the values checked against each other and the machine, the device and its CPU
threads, and the one-line error (UserError, exit code 2) that a mistake in a command, config or file becomes.

    cfg, explicit, presets = parse_config(["config/shakespeare_char_cpu.py", "--max_iters=500"], DEFAULTS, __doc__)
    device = pick_device(cfg["device"]); set_threads(cfg["threads"], device)
"""
import ast
import difflib
import os
import sys
import time
from pathlib import Path

import torch

from deepseek import ModelArgs

MODEL_KEYS = [k for k in ModelArgs.__dataclass_fields__ if k not in ("vocab_size", "max_seq_len")]
CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


class UserError(ValueError):
    """A mistake in the command, config or files: reported as one line `error: ...`, exit code 2."""


class Stopped(KeyboardInterrupt):
    """Ctrl-C, with what a command has to say about it (where its last checkpoint is, how to resume): reported as
    one line `stopped: ...`, exit code 130."""


def one_line(e):
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0] if s else ''}"


def run_cli(main, argv=None, quiet=False):
    """main(argv) for a command line: a UserError becomes one line `error: ...` on stderr and exit code 2, Ctrl-C
    one line `stopped: ...` (what Stopped says) and exit code 130, the shell's for an interrupt. quiet: the code
    alone (the other ranks of a torchrun)."""
    try:
        main(argv)
    except UserError as e:
        if not quiet:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if not quiet:
            print(f"stopped: {e if str(e) else 'Ctrl-C'}", file=sys.stderr)
        return 130
    return 0


# ----------------------------------------------------------------------------- --key=value and presets

def parse_config(argv, defaults, doc=""):
    """defaults, then each preset file (config/NAME.py, or just NAME: plain Python assignments, which see the
    values so far and __file__), then --key=value (--flag alone sets a bool), in argv order. An unknown key
    or a wrong type is a UserError naming the nearest valid key. --help (or -h) prints doc and every key with
    the value it would take after what came before it, then exits. Returns (config, keys set, preset files)."""
    cfg, explicit, presets = dict(defaults), set(), []

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
        if arg in ("--help", "-h"):
            print(usage(doc, cfg))
            sys.exit(0)
        if arg.startswith("--"):
            key, eq, raw = arg[2:].partition("=")
            want = type(defaults.get(key))
            if key in defaults and not eq and want is not bool:
                raise UserError(f"--{key} needs a value: --{key}=VALUE")
            put(key, True if not eq else parse_value(raw, want), raw)
            continue
        path = next((p for p in (Path(arg), CONFIG_DIR / arg, CONFIG_DIR / f"{arg}.py") if p.is_file()), None)
        if path is None:
            names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.py")))
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


def parse_value(raw, want):
    """The value of --key=raw for a key of type want: the text itself for a str key (quotes around it
    dropped, as a shell would), else a Python literal, else true/false in any case, else the text."""
    if want is str:
        return raw[1:-1] if len(raw) > 1 and raw[0] == raw[-1] and raw[0] in "'\"" else raw
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return {"true": True, "false": False}.get(raw.lower(), raw)


def usage(doc, cfg):
    """--help's text: the command's docstring, then every key as --key=value (value a Python literal)."""
    keys = "\n".join(f"  --{k}={v!r}" for k, v in cfg.items())
    return f"{doc.strip()}\n\nkeys (presets: config/NAME.py; each --key=value after them):\n{keys}"


def model_args_from(cfg, vocab_size):
    """ModelArgs from a config dict: its model keys, the data's vocabulary, block_size as max_seq_len."""
    try:
        return ModelArgs(vocab_size=vocab_size, max_seq_len=cfg["block_size"], **{k: cfg[k] for k in MODEL_KEYS})
    except (ValueError, TypeError) as e:
        raise UserError(f"bad model config: {e}") from None


# ----------------------------------------------------------------------------- the machine

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


def idle_cores(seconds=0.1):
    """How many of this machine's cores are idle now: /proc/stat's idle share over `seconds` (Linux), else
    the cores less the 1-minute load average; a float."""
    cores = os.cpu_count() or 1
    try:
        def times():
            with open("/proc/stat") as f:
                values = [int(v) for v in f.readline().split()[1:]]
            return values[3] + values[4], sum(values)          # idle + iowait, all
        (idle0, total0), _, (idle1, total1) = times(), time.sleep(seconds), times()
        return cores * (idle1 - idle0) / max(total1 - total0, 1)
    except (OSError, ValueError, IndexError):
        return cores - os.getloadavg()[0] if hasattr(os, "getloadavg") else cores


def set_threads(threads, device):
    """torch's CPU threads when the model runs on a CPU: `threads`, or with 0 the cores idle at start (at
    least 1). With more threads than idle cores, threads wait for each other at every operation: a training
    step of the CPU preset with 2 threads on 2 cores, one of them busy, measured 3.4x slower than with 1.
    Other devices keep torch's default. -> the threads torch uses."""
    if threads < 0:
        raise UserError(f"threads must be at least 0 (0: the idle cores), not {threads}")
    if device == "cpu":
        torch.set_num_threads(threads or max(1, round(idle_cores())))
    return torch.get_num_threads()


def compute_dtype(dtype, device):
    """The dtype a run computes in: dtype, or for "auto" bf16 where the CUDA GPU has it natively (emulated bf16 is
    slow), else fp16, and fp32 off CUDA."""
    if dtype != "auto":
        return getattr(torch, dtype)
    if not device.startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def now():
    """time.perf_counter() once the current CUDA device has finished its queued work (kernels run
    asynchronously, so a clock read alone would time only their launch)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()
