"""What the bench parts (benchmarks/*.py, run by bench.py) share: interleaved timing, a mean and spread, the
commands' settings and the presets' model shapes, plots, and runs of the commands (train.py, sft.py, grpo.py)
in processes of their own, summarised from their logs."""
import functools
import json
import statistics
import subprocess
import sys
from pathlib import Path

from pretraining.configurator import model_args_from, now, parse_value

REPO = Path(__file__).resolve().parent.parent


def rounds(fns, repeats, warmup=0):
    """Run the functions interleaved, `warmup` untimed rounds then `repeats` timed ones, so that a slow
    spell of the machine hits them all: (seconds of each function per round, last results). Each clock
    read waits for queued CUDA work."""
    times, outs = [[] for _ in fns], [None] * len(fns)
    for r in range(warmup + repeats):
        for i, fn in enumerate(fns):
            t0 = now()
            outs[i] = fn()
            if r >= warmup:
                times[i].append(now() - t0)
    return times, outs


def spread(xs):
    """'mean ± standard deviation' of numbers, the mean alone for one."""
    return f"{statistics.mean(xs):.4f}" + (f" ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else "")


def timed(fns, repeats):
    """Best seconds of each function over `repeats` interleaved rounds; (times, last results)."""
    times, outs = rounds(fns, repeats)
    return [min(t) for t in times], outs


V3_CONFIG = REPO / "config" / "config_671B.json"      # DeepSeek-V3's shapes, from one file


@functools.cache
def command_config(command, *argv):
    """The config a command (train.py, sft.py, grpo.py) would run with after argv (presets, --key=value), as its
    --help lists it: the bench reads a command's settings without importing it (nothing imports a command)."""
    out = subprocess.run([sys.executable, str(REPO / command), *argv, "--help"], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"bench: {command} {' '.join(argv)} --help failed: {out.stderr.strip()}")
    keys = [line[4:].partition("=") for line in out.stdout.splitlines() if line.startswith("  --")]
    return {key: parse_value(value, object) for key, _, value in keys}


def preset_args(name, vocab_size=65):
    """The ModelArgs train.py builds from a config/NAME.py preset (char-level vocabulary unless told)."""
    return model_args_from(command_config("train.py", name), vocab_size)


def pyplot(part):
    """matplotlib.pyplot drawing to files, or None (and a note) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"{part}: matplotlib is not installed, no plots (pip install matplotlib)")
        return None
    return plt


def read_log(out_dir):
    with open(Path(out_dir) / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def run_command(command, argv, out, quiet_log):
    """python COMMAND ARGV --out_dir=OUT in a process of its own (a fresh out: its files removed first), its
    output into quiet_log; -> the entries of the log.jsonl it wrote."""
    if out.exists():
        for f in out.iterdir():
            f.unlink()
    with open(quiet_log, "w") as log:
        done = subprocess.run([sys.executable, str(REPO / command), *argv, f"--out_dir={out}"], stdout=log,
                              stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"bench: {command} failed, see {quiet_log}")
    return read_log(out)


def train_run(args, out, argv, quiet_log):
    """python train.py ARGV into `out`, its output into `quiet_log`; the summary of its log.jsonl: best val
    loss, steps, median seconds per step (the first step, which warms up, left out), final MaxVio, curve
    of (step, seconds at that speed, val loss)."""
    entries = run_command("train.py", argv, out, quiet_log)
    c = entries[0]["config"]
    tokens_per_step = c["batch_size"] * c["block_size"] * c["gradient_accumulation_steps"]
    trains = [e for e in entries if e["kind"] == "train"]
    step_s = statistics.median(tokens_per_step / e["tokens_per_s"] for e in trains[1:] or trains)
    done = next(e for e in entries if e["kind"] == "done")
    return dict(best=done["best_val"], iters=c["max_iters"], step_s=step_s, wall_s=done["wall_s"], out=out,
                maxvio=statistics.mean(trains[-1]["maxvio"]) if trains[-1]["maxvio"] else None,
                tokens_per_s=tokens_per_step / step_s,
                mfu=statistics.median([e["mfu"] for e in trains[1:] if e["mfu"]] or [0]),
                curve=[(e["step"], e["step"] * step_s, e["val"]) for e in entries if e["kind"] == "eval"])


def gpu_speed(args, name, extra=()):
    """config/shakespeare_char.py for 60 steps on the GPU (one evaluation): its train_run summary."""
    out = Path(args.out) / f"gpu-{name}"
    return train_run(args, out, ["shakespeare_char", f"--data_dir={args.data_dir}", "--device=cuda", "--max_iters=60",
                                 "--eval_interval=60", "--eval_iters=1", "--log_interval=10", *extra], f"{out}.log")
