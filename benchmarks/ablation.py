"""bench.py --parts=ablation: what each DeepSeek idea buys. A ladder of models on char-level Tiny Shakespeare,
each row a CPU preset with some ideas turned off, trained for the same steps and for the same time, every row
by one optimizer: --optimizer=adamw (V3's, config/shakespeare_char_cpu.py) or muon (V4's,
config/shakespeare_char_cpu_muon.py)."""
import statistics
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks.common import pyplot, spread, train_run
from checkpoint.ckpt import load_checkpoint
from pretraining import data

# each optimizer's CPU preset: DeepSeek-V3's AdamW at nanoGPT's CPU budget, and Muon as tuned for that wall
PRESETS = {"adamw": "shakespeare_char_cpu", "muon": "shakespeare_char_cpu_muon"}
# the ladder: each row is the optimizer's preset plus these overrides, --iters steps
ABLATION = [
    ("1 GPT: MHA + dense SwiGLU", dict(attn="mha", n_routed_experts=0, n_mtp=0)),
    ("2 + MLA", dict(n_routed_experts=0, n_mtp=0)),
    ("3 + DeepSeekMoE, aux-loss-free bias", dict(n_mtp=0)),
    ("4a MoE, auxiliary loss instead (alpha 0.01)", dict(n_mtp=0, bias_update_speed=0.0, seq_aux_alpha=0.01)),
    ("4b MoE, no balancing", dict(n_mtp=0, bias_update_speed=0.0, seq_aux_alpha=0.0)),
    ("5 + MTP: the full recipe", dict()),
]


def run_val(out_dir, text, data_dir):
    """A bench run's trained model (from its checkpoint), its config, and its data's val split and meta."""
    model, ckpt = load_checkpoint(Path(out_dir) / "ckpt.pt")
    c = ckpt["config"]
    folder, meta = data.prepare_data(data_dir, c["dataset"], text, c["tokenizer"], c["encoding"], log=lambda *a: None)
    return model, c, data.load_split(folder, "val", meta), meta


@torch.no_grad()
def expert_load(out_dir, text, data_dir, batches=10):
    """Tokens per expert in each MoE layer of the trained model on val batches: (layers, experts)."""
    model, c, val, _ = run_val(out_dir, text, data_dir)
    model.train()                                       # gates count tokens in training mode (dropout is 0)
    for k in range(batches):                            # with targets, so the MTP block runs too
        model(*data.get_batch(val, c["batch_size"], c["block_size"], data.batch_seed(1, k)))
    return model, torch.stack([g.load.clone() for g in model.gates()]) if model.gates() else None


def train_row(args, root, name, over, seed, iters, tag, optimizer=None):
    """One run of an ablation row for `iters` steps (schedule scaled to them) by `optimizer` (None:
    args.optimizer); with args.jobs > 1 on one CPU thread, else on the cores idle when it starts."""
    optimizer = optimizer or args.optimizer
    out = root / f"{tag}_{optimizer}_row{name.split()[0]}_seed{seed}"
    every = iters if tag == "timing" else max(iters // 8, 1)      # a timing run evaluates once, at the end
    argv = [PRESETS[optimizer], "--device=cpu", f"--data_dir={args.data_dir}", f"--seed={1337 + seed}",
            "--always_save_checkpoint=True", f"--optimizer={optimizer}", f"--max_iters={iters}",
            f"--lr_decay_iters={iters}", f"--threads={1 if args.jobs > 1 else 0}",
            f"--mtp_lambda_step={round(0.7 * iters)}", f"--eval_interval={every}", f"--log_interval={min(every, 10)}"]
    argv += (["--eval_iters=4"] if args.quick or tag == "timing" else []) + ([f"--text={args.text}"] if args.text else [])
    argv += [f"--{k}={v}" for k, v in over.items()]
    print(f"bench: {name}, {optimizer}, seed {seed}, {iters} steps ...", file=sys.stderr, flush=True)
    return dict(train_run(args, out, argv, root / f"{out.name}.log"), mtp=over.get("n_mtp", 1) > 0)


def run(args):
    """Train every row of ABLATION on the same data and seeds, twice: for the same number of steps, and
    for the same training time as row 1 trained by AdamW (DeepSeek-V3's optimizer, so that both optimizers'
    tables share one budget; each row's steps from a short timing run of every row in this process).
    args.jobs runs train at once. Prints a Markdown table per budget with differences against row 1, and
    saves the validation curves (per step and per second) and the MoE expert loads as PNG."""
    root = Path(args.out)
    timed = [(name, over, args.optimizer) for name, over in ABLATION]
    timed += [(ABLATION[0][0], ABLATION[0][1], "adamw")] if args.optimizer != "adamw" else []
    times = [r["step_s"] for r in train_rows(args, root, [
        (name, over, 0, args.timing_iters, "timing", optimizer) for name, over, optimizer in timed])]
    step_s, base_s = times[:len(ABLATION)], times[-1] if args.optimizer != "adamw" else times[0]
    budgets = {"steps": [args.iters] * len(ABLATION),
               "time": [max(1, round(args.iters * base_s / s)) for s in step_s]}
    runs = iter(train_rows(args, root, [(name, over, seed, n, budget, args.optimizer)
                                        for budget, iters in budgets.items()
                                        for (name, over), n in zip(ABLATION, iters)
                                        for seed in range(args.repeats)]))
    results = {"timing_step_s": step_s, "base_step_s": base_s}
    for budget in budgets:
        results[budget] = [dict(name=name, runs=[next(runs) for _ in range(args.repeats)]) for name, _ in ABLATION]
    for r in results["steps"]:
        model, r["load"] = expert_load(r["runs"][0]["out"], args.text, args.data_dir)
        r.update(total=model.num_params(), active=model.num_params(active=True),
                 flops=model.flops_per_token(model.args.max_seq_len))

    mean = lambda r, k: statistics.mean(x[k] for x in r["runs"])   # noqa: E731
    threads = (f"{args.jobs} runs at once, 1 CPU thread each" if args.jobs > 1
               else f"{torch.get_num_threads()} CPU threads")
    print(f"\nablation: char-level Tiny Shakespeare, {args.optimizer}, {args.repeats} seed(s) per row, {threads}")
    print(f"\nsame steps ({args.iters}):\n")
    print("| row | params | active | train GFLOPs/token | best val loss | final MaxVio | ms/step | val vs row 1 | time vs row 1 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = results["steps"][0]
    for r in results["steps"]:
        mv = [x["maxvio"] for x in r["runs"] if x["maxvio"] is not None]
        print(f"| {r['name']} | {r['total'] / 1e6:.2f}M | {r['active'] / 1e6:.2f}M | {r['flops'] / 1e9:.4f} | "
              f"{spread([x['best'] for x in r['runs']])} | {f'{statistics.mean(mv):.2f}' if mv else '-'} | "
              f"{1000 * mean(r, 'step_s'):.1f} | {mean(r, 'best') - mean(base, 'best'):+.4f} | "
              f"{mean(r, 'step_s') / mean(base, 'step_s'):.2f}x |")
    print(f"\nsame training time ({args.iters} steps of row 1 by AdamW, {args.iters * base_s:.0f} s at the timing "
          f"run's speed; steps per row from a {args.timing_iters}-step timing run):\n")
    print("| row | steps | ms/step (timing run) | best val loss | val vs row 1 |")
    print("|---|---:|---:|---:|---:|")
    base = results["time"][0]
    for r, s in zip(results["time"], step_s):
        print(f"| {r['name']} | {r['runs'][0]['iters']} | {1000 * s:.1f} | {spread([x['best'] for x in r['runs']])} | "
              f"{mean(r, 'best') - mean(base, 'best'):+.4f} |")
    plot(results, root)
    return results


def train_rows(args, root, rows):
    """train_row for each (name, over, seed, iters, tag, optimizer) of rows, args.jobs at once; their
    summaries in order."""
    with ThreadPoolExecutor(args.jobs) as pool:
        return list(pool.map(lambda row: train_row(args, root, *row), rows))


def plot(results, root):
    if (plt := pyplot("ablation")) is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, budget, x, label in [(axes[0], "steps", 0, "step"), (axes[1], "time", 1, "training seconds")]:
        for r in results[budget]:                       # the first quarter of training is off the scale
            curve = r["runs"][0]["curve"]
            xs, vals = zip(*[(c[x], c[2]) for c in curve if c[0] >= curve[-1][0] // 4])
            ax.plot(xs, vals, marker=".", label=r["name"])
        ax.set(xlabel=label, ylabel="val loss (main next-token)", title=f"Char-level Tiny Shakespeare, same {budget}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "ablation_val_loss.png", dpi=120)
    moe = [r for r in results["steps"] if r["load"] is not None]
    fig, axes = plt.subplots(1, len(moe), figsize=(3.2 * len(moe), 2.8), squeeze=False)
    for ax, r in zip(axes[0], moe):
        share = r["load"] / r["load"].sum(-1, keepdim=True)
        im = ax.imshow(share.numpy(), cmap="viridis", vmin=0, aspect="auto")
        ax.set_title(textwrap.fill(r["name"], 26), fontsize=9)
        ax.set(xlabel="expert", ylabel="MoE layer (last: MTP)" if r["runs"][0]["mtp"] else "MoE layer")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("Share of routed tokens per expert (val batches)", fontsize=10)
    fig.tight_layout()
    fig.savefig(root / "ablation_expert_load.png", dpi=120)
    print(f"plots: {root / 'ablation_val_loss.png'}, {root / 'ablation_expert_load.png'}")
