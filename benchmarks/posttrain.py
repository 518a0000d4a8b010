"""bench.py --parts=posttrain: post-training as in the report (§5) at nano scale, on config/domains_cpu.py's model
(pretrained on English, code and generated maths). Held-out greedy exact match per kind of question for (a) the
pretrained model (one solved example before the question, as its corpus writes them); (b) after SFT (config/sft_cpu.py);
(c) after GRPO from (b) (config/grpo_cpu.py); (d) (c)'s training time spent on more SFT from (b) instead (fresh pairs,
at SFT's final learning rate); (e) GRPO from (b) without the KL term and the clip (nanochat's simplification); and
(b2) SFT with the other answer format (bare answers against worked steps). Each with --repeats seeds, accuracies pooled
over them with 95% Wilson intervals; each stage's time; GRPO's curves (a plot); rollout tokens/s batched against
generating each sample alone, side by side."""
import statistics
import sys
from pathlib import Path

import torch

from benchmarks.common import command_config, pyplot, run_command, timed, train_run
from checkpoint.ckpt import load_checkpoint, read_checkpoint
from posttraining import chat
from pretraining.data import MATH_KINDS, batch_seed, math_text, prepare_data

BASE, SFT, GRPO = "domains_cpu", "sft_cpu", "grpo_cpu"      # the presets
QUICK = dict(sft=["--pairs=48", "--batch_size=16", "--epochs=1"], grpo=["--max_iters=2", "--questions=2", "--group_size=4",
             "--eval_interval=1"], eval_questions=14)


def final(entries):
    """(the last held-out evaluation's results {kind: (right, asked)}, the done entry)."""
    done = next(e for e in entries if e["kind"] == "done")
    return {k: tuple(v) for k, v in done["accuracy"].items()}, done


def pooled(accs):
    """Several runs' accuracies {kind: (right, asked)} summed."""
    return {k: tuple(map(sum, zip(*(a[k] for a in accs)))) for k in accs[0]}


def cell(right, n):
    lo, hi = chat.wilson(right, n)
    return f"{100 * right / n:.1f} ({100 * lo:.0f}-{100 * hi:.0f})"


def run(args):
    """Train the base if absent (config/domains_cpu.py, --iters steps; under --quick into --out), then per seed the
    SFT in both answer formats, GRPO with and without the KL term and the clip, and the SFT that spends GRPO's time;
    evaluate each on the same held-out questions; time the rollouts; print the tables, draw the plot."""
    root, quick = Path(args.out), args.quick
    data = ["--device=cpu", f"--data_dir={args.data_dir}"] + ([f"--text={args.text}"] if args.text else [])
    base = root / "posttrain_base" if quick else Path(command_config("train.py", BASE)["out_dir"])
    if not (base / "ckpt.pt").exists():
        print(f"posttrain: training the base model into {base} ...", file=sys.stderr, flush=True)
        train_run(args, base, [BASE, *data, f"--max_iters={args.iters}", f"--lr_decay_iters={args.iters}"],
                  root / "posttrain_base.log")
    n_eval = QUICK["eval_questions"] if quick else command_config("sft.py", SFT)["eval_questions"]
    common = ["--device=cpu", f"--eval_questions={n_eval}"]
    worked = command_config("sft.py", SFT)["worked"]
    held_out = chat.held_out_problems(n_eval)
    model, ckpt = load_checkpoint(base / "ckpt.pt", args=dict(max_seq_len=128))   # room for the batch's left padding
    context = ckpt["model_args"]["max_seq_len"]                              # the one it was trained at
    results = {"(a)": [chat.accuracy(chat.evaluate(model, ckpt["meta"], held_out, context))]}
    runs = {name: [] for name in ("(b)", "(b2)", "(c)", "(d)", "(e)")}
    for r in range(args.repeats):
        seed = 1337 + r
        out = lambda name: root / f"posttrain_{name}_seed{r}"                                  # noqa: E731

        def go(command, preset, key, *argv):
            name, quick_argv = key.strip("()"), QUICK[command] if quick else []
            runs[key].append(run_command(f"{command}.py", [preset, *common, f"--seed={seed}", *quick_argv, *argv],
                                         out(name), root / f"posttrain_{name}_seed{r}.log"))
        print(f"posttrain: seed {r}: SFT ...", file=sys.stderr, flush=True)
        go("sft", SFT, "(b)", f"--init_from={base}")
        go("sft", SFT, "(b2)", f"--init_from={base}", f"--worked={not worked}")
        print(f"posttrain: seed {r}: GRPO ...", file=sys.stderr, flush=True)
        go("grpo", GRPO, "(c)", f"--init_from={out('b')}")
        go("grpo", GRPO, "(e)", f"--init_from={out('b')}", "--kl_beta=0", "--clip_eps=0")
        # (d): SFT from (b) for as long as (c) trained, at (b)'s final learning rate, on pairs of another seed
        b, c = final(runs["(b)"][-1])[1], final(runs["(c)"][-1])[1]
        cfg = runs["(b)"][-1][0]["config"]
        steps = max(1, round(c["train_s"] / (b["train_s"] / cfg["max_iters"])))
        print(f"posttrain: seed {r}: {steps} more SFT steps ...", file=sys.stderr, flush=True)
        go("sft", SFT, "(d)", f"--init_from={out('b')}", f"--seed={batch_seed(seed, 1)}", "--decay_lr=False",
           f"--learning_rate={cfg['min_lr']}", f"--pairs={steps * cfg['batch_size']}", "--epochs=1",
           f"--eval_interval={steps}")
    for name, logs in runs.items():
        results[name] = [final(entries)[0] for entries in logs]
    report(results, runs, held_out, worked, args, base, n_eval)
    rollout_speed(out("b"), args.timing_repeats, quick)
    plot(runs, results, root)
    return dict(results=results, runs=runs)


def report(results, runs, held_out, worked, args, base, n_eval):
    names = {"(a)": "(a) pretrained, one solved example", "(b)": f"(b) SFT, {'worked steps' if worked else 'bare answers'}",
             "(b2)": f"(b2) SFT, {'bare answers' if worked else 'worked steps'}", "(c)": "(c) GRPO from (b)",
             "(d)": "(d) (c)'s time as more SFT from (b)", "(e)": "(e) GRPO from (b), no KL, no clip"}
    print(f"\nposttrain: held-out greedy exact match, % (95% Wilson interval), {n_eval} questions x {args.repeats} "
          f"seed(s) pooled; base {base}\n")
    print("| model | " + " | ".join(MATH_KINDS) + " | all | all, per seed |")
    print("|---|" + "---:|" * (len(MATH_KINDS) + 2))
    for key in ("(a)", "(b)", "(c)", "(d)", "(e)", "(b2)"):
        acc = pooled(results[key])
        seeds = " / ".join(f"{100 * a['all'][0] / a['all'][1]:.1f}" for a in results[key])
        print(f"| {names[key]} | " + " | ".join(cell(*acc[k]) for k in MATH_KINDS) + f" | {cell(*acc['all'])} | {seeds} |")
    print(f"\nthe stages, mean over seeds ({torch.get_num_threads()} threads):\n")
    print("| stage | steps | training s | s/step | wall s (with evaluations) |")
    print("|---|---:|---:|---:|---:|")
    for key in ("(b)", "(b2)", "(c)", "(d)", "(e)"):
        done = [final(e)[1] for e in runs[key]]
        steps = " / ".join(dict.fromkeys(str(d["step"]) for d in done))          # per seed where they differ
        print(f"| {names[key]} | {steps} | {statistics.mean(d['train_s'] for d in done):.0f} | "
              f"{statistics.mean(d['train_s'] / d['step'] for d in done):.3f} | "
              f"{statistics.mean(d['wall_s'] for d in done):.0f} |")
    for key in ("(c)", "(e)"):
        logs = [[e for e in entries if e["kind"] == "train"] for entries in runs[key]]
        mean = lambda k: statistics.mean(e[k] for log in logs for e in log)          # noqa: E731
        print(f"\n{key}, all its steps and seeds: mean reward {mean('reward'):.3f} (right {mean('right'):.1%}, a group "
              f"{mean('group_right'):.0%}), KL {mean('kl'):.4f}, clipped {mean('clipped'):.2%}, length "
              f"{mean('length'):.1f}, no-signal groups {mean('no_signal'):.0%}", end="")
    print()
    n = sum(prepare_data(args.data_dir, "domains", args.text, "char", log=lambda *a: None)[1]["domains"]["math"])
    corpus = set(math_text(n)[:n].splitlines()[::2])
    seen = {k: sum(p[0] in corpus for p in held_out if p[3] == k) for k in MATH_KINDS}
    print("held-out questions that also occur in the pretraining corpus: " + ", ".join(
        f"{k} {v}/{sum(p[3] == k for p in held_out)}" for k, v in seen.items()) + " (none in any post-training pair)")


def rollout_speed(sft_out, repeats, quick):
    """GRPO's rollouts from the SFT model, temperature 1: Q questions x G samples as one batch (one prefill per question,
    its cache repeated G times), per question (G rows), and each sample alone; tokens/s of each, interleaved rounds."""
    model, meta = chat.chat_model(read_checkpoint(sft_out / "ckpt.pt"), sft_out, 128)
    cfg = command_config("grpo.py", GRPO)
    Q, G = (2, 4) if quick else (cfg["questions"], cfg["group_size"])
    template = chat.Template(meta)
    prompts = [template.prompt(p[0]) for p in chat.held_out_problems(Q)]
    tokens = lambda outs: sum(len(t) + s for t, s in outs)                  # noqa: E731
    gen = lambda ps, g: chat.generate(model, ps, cfg["max_new_tokens"], template.eos, g, 1.0)   # noqa: E731
    rows = [("all questions in one batch (Q prefills, Q x G rows)", lambda: gen(prompts, G)),
            ("one question at a time (1 prefill, G rows)", lambda: [o for p in prompts for o in gen([p], G)]),
            ("each sample alone (Q x G prefills, 1 row)", lambda: [o for p in prompts for _ in range(G) for o in gen([p], 1)])]
    torch.manual_seed(0)
    times, outs = timed([fn for _, fn in rows], max(1, repeats))
    print(f"\nrollouts: {Q} questions x {G} samples, temperature 1, up to {cfg['max_new_tokens']} tokens, "
          f"best of {max(1, repeats)} interleaved rounds\n")
    print("| rollouts | tokens | s | tokens/s | vs alone |")
    print("|---|---:|---:|---:|---:|")
    speed = [tokens(o) / t for o, t in zip(outs, times)]
    for (name, _), o, t, s in zip(rows, outs, times, speed):
        print(f"| {name} | {tokens(o)} | {t:.2f} | {s:,.0f} | {s / speed[-1]:.1f}x |")
    return speed


def plot(runs, results, root):
    """Held-out accuracy and mean reward against GRPO steps, (c) and (e), the mean over seeds; (a) and (d) as lines."""
    plt = pyplot("posttrain")
    if plt is None:
        return
    fig, (acc_ax, reward_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("(c)", "(c) GRPO"), ("(e)", "(e) no KL, no clip")):
        evals = [[(e["step"], 100 * e["accuracy"]["all"][0] / e["accuracy"]["all"][1]) for e in log
                  if e["kind"] == "eval"] for log in runs[key]]
        trains = [[(e["step"], e["reward"]) for e in log if e["kind"] == "train"] for log in runs[key]]
        for ax, curves in ((acc_ax, evals), (reward_ax, trains)):
            steps = [s for s, _ in curves[0]]
            ax.plot(steps, [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))], marker="o", label=label)
    acc = lambda key: statistics.mean(100 * a["all"][0] / a["all"][1] for a in results[key])     # noqa: E731
    acc_ax.axhline(acc("(d)"), color="gray", ls="--", label="(d) more SFT instead, final")
    acc_ax.axhline(acc("(a)"), color="gray", ls=":", label="(a) pretrained")
    acc_ax.set(xlabel="GRPO step", ylabel="held-out accuracy, % (greedy)", ylim=(0, 50),
               title="Held-out exact match (mean of the seeds)")
    reward_ax.set(xlabel="GRPO step", ylabel="mean reward of the rollouts (per log interval)",
                  title="Mean reward: 1 right + 0.1 well formed")
    acc_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "posttrain.png", dpi=120)
    print(f"plot: {root / 'posttrain.png'}")
