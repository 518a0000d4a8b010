"""bench.py --parts=context: context extension as in the report (§4.3), at nano scale. The CPU preset's model,
trained at 64 characters, read over windows of 512 of the val split: (a) as it is, plain RoPE past 64; (b) with
YaRN for 256 and no training; after a short phase at 256 (config/shakespeare_char_cpu_256.py) (c) with YaRN and
(d) with plain RoPE. The val loss in position buckets (a table) and along the window (a plot); then greedy
decoding of (c) up to 256 tokens: cached, speculative and recomputed, the same tokens."""
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks import decode
from benchmarks.common import command_config, pyplot, spread, train_run
from checkpoint.ckpt import load_checkpoint, read_checkpoint
from pretraining.data import load_split, prepare_data

BASE, PHASE = "shakespeare_char_cpu", "shakespeare_char_cpu_256"     # presets: pretraining at 64, the phase at 256
WINDOW, BUCKETS = 512, (0, 64, 128, 256, 384, 512)


@torch.no_grad()
def loss_by_position(model, data, windows, T=WINDOW, batch=8):
    """Next-token loss at each position 0..T-1 (T,): the mean over the first `windows` consecutive windows of T
    tokens of data, where position p predicts token p + 1 of its window from tokens 0..p."""
    xy = torch.from_numpy(data[:windows * T + 1].astype(np.int64))
    x, y = xy[:-1].view(windows, T), xy[1:].view(windows, T)
    total = torch.zeros(T)
    for xb, yb in zip(x.split(batch), y.split(batch)):
        total += F.cross_entropy(model(xb)[0].transpose(1, 2), yb, reduction="none").sum(0)
    return total / windows


def run(args):
    """Train the base if absent (the CPU preset, --iters steps; under --quick into --out) and each phase with
    --repeats seeds (iters / 8 steps: 250 of 2000), then measure the four variants on the same windows."""
    root = Path(args.out)
    data = ["--device=cpu", f"--data_dir={args.data_dir}"] + ([f"--text={args.text}"] if args.text else [])
    phase = command_config("train.py", PHASE)
    base = root / "context_base" if args.quick else Path(command_config("train.py", BASE)["out_dir"])
    if not (base / "ckpt.pt").exists():
        print(f"context: training the base model into {base} ...", file=sys.stderr, flush=True)
        train_run(args, base, [BASE, *data, f"--max_iters={args.iters}", f"--lr_decay_iters={args.iters}"],
                  root / "context_base.log")
    ckpt = read_checkpoint(base / "ckpt.pt")
    c, steps, plain = ckpt["config"], max(1, args.iters // 8), ckpt["model_args"]["original_seq_len"]
    L, L2, s = c["block_size"], phase["block_size"], phase["rope_factor"]
    folder, meta = prepare_data(args.data_dir, c["dataset"], args.text, c["tokenizer"], c["encoding"], lambda *a: None)
    val = load_split(folder, "val", meta)
    phases = {}
    for name, over in [("yarn", []), ("rope", [f"--original_seq_len={plain}"])]:   # the base's, > 512: YaRN off
        phases[name] = []
        for r in range(args.repeats):
            print(f"context: {steps} steps at {L2}, {name}, seed {r} ...", file=sys.stderr, flush=True)
            out = root / f"context_{name}_seed{r}"
            phases[name].append(train_run(args, out, [PHASE, *data, f"--init_from={base}", f"--max_iters={steps}",
                                                      f"--seed={c['seed'] + r}", *over], root / f"{out.name}.log"))
    yarn = dict(original_seq_len=phase["original_seq_len"], rope_factor=s)      # (b): the phase's fields on the base
    variants = [(f"(a) trained at {L}, plain RoPE", [base], {}),
                (f"(b) YaRN s = {s:g}, no training", [base], yarn),
                (f"(c) YaRN s = {s:g} + {steps} steps at {L2}", [r["out"] for r in phases["yarn"]], {}),
                (f"(d) plain RoPE + {steps} steps at {L2}", [r["out"] for r in phases["rope"]], {})]
    n = min((len(val) - 1) // WINDOW, 16 if args.quick else len(val))          # all of the val split's windows
    read = lambda out, over: load_checkpoint(out / "ckpt.pt", args=dict(over, max_seq_len=WINDOW))[0]   # noqa: E731
    curves = [(name, torch.stack([loss_by_position(read(out, over), val, n) for out in outs]))
              for name, outs, over in variants]
    buckets = list(zip(BUCKETS, BUCKETS[1:]))

    print(f"\ncontext: the base {ckpt['iter_num']} steps at {L} (val {ckpt['best_val_loss']:.4f}); val loss by position "
          f"over {n} windows of {WINDOW} tokens of the val split; phases: {args.repeats} seed(s), mean ± sd\n")
    print("| variant | " + " | ".join(f"{a}-{b - 1}" for a, b in buckets) + " |")
    print("|---|" + "---:|" * len(buckets))
    for name, curve in curves:
        print(f"| {name} | " + " | ".join(spread(curve[:, a:b].mean(1).tolist()) for a, b in buckets) + " |")
    print(f"\nthe phases: batch {phase['batch_size']} x {L2}, constant learning rate {phase['learning_rate']:g}, "
          f"fresh AdamW, {torch.get_num_threads()} threads\n")
    print(f"| phase | steps | ms/step | wall | val at {L2}: step 0 | last |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, runs in phases.items():
        print(f"| {name} | {steps} | {1000 * statistics.mean(r['step_s'] for r in runs):.0f} | "
              f"{statistics.mean(r['wall_s'] for r in runs):.0f} s | {spread([r['curve'][0][2] for r in runs])} | "
              f"{spread([r['curve'][-1][2] for r in runs])} |")
    plot([(name, curve.mean(0)) for name, curve in curves], root)

    out = phases["yarn"][0]["out"]                   # decoding past L, up to L2, without sliding
    model, ckpt = load_checkpoint(out / "ckpt.pt")
    idx = torch.from_numpy(val[:7].astype(np.int64))[None]          # a prompt: the val split's first 7 tokens
    print(f"\ndecoding (c) up to its context of {model.args.max_seq_len}, greedy, best of {args.timing_repeats}:")
    decode.header()
    decode.row(str(out), model, idx, model.args.max_seq_len - idx.size(1), args.timing_repeats)
    return dict(curves=curves, phases=phases)


def plot(curves, root, width=16):
    """Val loss against position (the mean over `width` positions), one line per variant."""
    plt = pyplot("context")
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, curve in curves:
        ax.plot(torch.arange(WINDOW // width) * width + width / 2, curve.view(-1, width).mean(1), label=name)
    for x in BUCKETS[1:-1]:
        ax.axvline(x, color="gray", lw=0.8, ls=":")
    ax.set(xlabel="position in the window", ylabel=f"val loss (mean over {width} positions)",
           title="Context extension, char-level Tiny Shakespeare: trained at 64, read at 512")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "context_extension.png", dpi=120)
    print(f"plot: {root / 'context_extension.png'}")
