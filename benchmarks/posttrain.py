"""bench.py --parts=posttrain: post-training as in the report (§5) at nano scale, on config/domains_cpu.py's model
(pretrained on English, code and generated maths at 64 positions) extended to 256 (config/domains_cpu_256.py):
1. Table 9 at nano scale: SFT (config/sft_cpu.py) at equal steps on replies that are a bare answer, one worked line,
   or a thinking trace (the preset's); held-out greedy accuracy per kind and the replies' mean length, the pretrained
   model (one solved example before the question) as the floor.
2. Before RL, the thinking model: greedy and sampled (temperature 1) accuracy, pass@G, majority vote and the share of
   groups of G replies with mixed rewards, per kind and difficulty (the trace's steps up to or above the kind's median).
3. GRPO (config/grpo_cpu.py, on the kinds of its mix) from the thinking model, against the same training seconds spent
   on more SFT of the same mix, and against GRPO without the KL term and the clip (where the preset has either: with
   β = 0 and one update per batch, ρ is 1 and the clip never binds, so that run would be GRPO itself): greedy and
   sampled accuracy on the held-out questions of the kinds it aimed at and on all of them, paired question by question
   within each seed (McNemar's test, the paired 95% interval of the difference).
Each with --repeats seeds; each stage's time; GRPO's curves (a plot); rollout tokens/s batched against generating each
sample alone, side by side."""
import collections
import statistics
import sys
from pathlib import Path

import torch

from benchmarks.common import command_config, pyplot, run_command, timed, train_run
from checkpoint.ckpt import load_checkpoint, read_checkpoint
from posttraining import chat, reasoning
from pretraining.data import MATH_KINDS, batch_seed, math_text, prepare_data

BASE, EXTENDED, SFT, GRPO = "domains_cpu", "domains_cpu_256", "sft_cpu", "grpo_cpu"      # the presets
QUICK = dict(sft=["--pairs=48", "--batch_size=16"], grpo=["--max_iters=2", "--questions=2", "--group_size=4",
             "--max_draws=2", "--eval_interval=1", "--max_new_tokens=40"], eval_questions=14, group_size=4)
NAMES = {"bare": "SFT, bare answers", "worked": "SFT, one worked line", "thinking": "SFT, thinking traces",
         "grpo": "GRPO from the thinking SFT", "more_sft": "GRPO's seconds as more SFT instead",
         "grpo_plain": "GRPO without KL and clip"}


def final(entries):
    """The done entry of a stage's log."""
    return next(e for e in entries if e["kind"] == "done")


def in_order(results):
    """evaluate's right-or-not as one list in the held-out problems' order (held_out_problems is in kind order)."""
    return [r for kind in MATH_KINDS for r in results.get(kind, [])]


def cell(right, n):
    lo, hi = chat.wilson(right, n)
    return f"{100 * right / n:.1f} ({100 * lo:.0f}-{100 * hi:.0f})"


def percent(rights):
    return f"{100 * sum(rights) / len(rights):.1f}"


def run(args):
    """Train the base and its extension if absent (under --quick a few steps, into --out), then per seed the three SFT
    runs, the measurements before RL, GRPO with and without the KL term and the clip, and the SFT that spends GRPO's
    seconds; evaluate each on the same held-out questions, greedy and sampled; time the rollouts; print the tables,
    draw the plot."""
    root, quick = Path(args.out), args.quick
    data = ["--device=cpu", f"--data_dir={args.data_dir}"] + ([f"--text={args.text}"] if args.text else [])
    base = root / "posttrain_base" if quick else Path(command_config("train.py", BASE)["out_dir"])
    extended = root / "posttrain_base_256" if quick else Path(command_config("train.py", EXTENDED)["out_dir"])
    if not (base / "ckpt.pt").exists():
        print(f"posttrain: training the base model into {base} ...", file=sys.stderr, flush=True)
        train_run(args, base, [BASE, *data, f"--max_iters={args.iters}", f"--lr_decay_iters={args.iters}"],
                  root / "posttrain_base.log")
    if not (extended / "ckpt.pt").exists():
        print(f"posttrain: extending its context into {extended} ...", file=sys.stderr, flush=True)
        train_run(args, extended, [EXTENDED, *data, f"--init_from={base}"] + ([f"--max_iters={max(1, args.iters // 8)}"]
                                                                             if quick else []), root / "posttrain_256.log")
    sft_cfg, grpo_cfg = command_config("sft.py", SFT), command_config("grpo.py", GRPO)
    n_eval = QUICK["eval_questions"] if quick else sft_cfg["eval_questions"]
    G = QUICK["group_size"] if quick else grpo_cfg["group_size"]
    held_out = chat.held_out_problems(n_eval)
    aimed = [i for i, p in enumerate(held_out) if not grpo_cfg["mix"] or grpo_cfg["mix"].get(p.kind, 0) > 0]
    plain = grpo_cfg["kl_beta"] > 0 or grpo_cfg["updates_per_batch"] > 1      # else the ablation is GRPO itself
    model, ckpt = load_checkpoint(base / "ckpt.pt", args=dict(max_seq_len=128))   # room for the batch's left padding
    floor = chat.evaluate(model, ckpt["meta"], held_out, ckpt["model_args"]["max_seq_len"])
    common = ["--device=cpu", f"--eval_questions={n_eval}"]
    runs, evals, before = collections.defaultdict(list), collections.defaultdict(list), []
    for r in range(args.repeats):
        seed = 1337 + r
        out = lambda name: root / f"posttrain_{name}_seed{r}"                                  # noqa: E731

        def go(command, preset, name, *argv):
            quick_argv = QUICK[command] if quick else []
            runs[name].append(run_command(f"{command}.py", [preset, *common, f"--seed={seed}", *quick_argv, *argv],
                                          out(name), root / f"posttrain_{name}_seed{r}.log"))
        print(f"posttrain: seed {r}: SFT, thinking traces, one worked line, bare answers ...", file=sys.stderr, flush=True)
        for answers in ("thinking", "worked", "bare"):
            go("sft", SFT, answers, f"--init_from={extended}", f"--answers={answers}")
        print(f"posttrain: seed {r}: before RL ...", file=sys.stderr, flush=True)
        before.append(before_rl(out("thinking"), held_out, G, seed))
        print(f"posttrain: seed {r}: GRPO{', and without the KL term and the clip' if plain else ''} ...",
              file=sys.stderr, flush=True)
        go("grpo", GRPO, "grpo", f"--init_from={out('thinking')}")
        if plain:
            go("grpo", GRPO, "grpo_plain", f"--init_from={out('thinking')}", "--kl_beta=0", "--clip_eps=0")
        # GRPO's training seconds spent on more SFT from the same model, on the same mix, at SFT's final learning rate
        seconds, steps = final(runs["grpo"][-1])["train_s"], final(runs["thinking"][-1])["step"]
        per_step = final(runs["thinking"][-1])["train_s"] / steps
        print(f"posttrain: seed {r}: {seconds:.0f} s of more SFT ...", file=sys.stderr, flush=True)
        go("sft", SFT, "more_sft", f"--init_from={out('thinking')}", f"--seed={batch_seed(seed, 1)}",
           f"--mix={grpo_cfg['mix']}", "--decay_lr=False", f"--learning_rate={sft_cfg['min_lr']}",
           f"--max_seconds={seconds}", f"--pairs={2 * sft_cfg['batch_size'] * (int(seconds / per_step) + 1)}",
           f"--eval_interval={10 ** 9}")
        for name in ("thinking", "grpo", "more_sft") + ("grpo_plain",) * plain:
            evals[name].append(evaluate_both(out(name), held_out, seed))
    report(floor, runs, evals, before, held_out, aimed, grpo_cfg, args, base, n_eval, G)
    rollout_speed(out("thinking"), args.timing_repeats, quick)
    plot(runs, evals, aimed, held_out, root)
    return dict(floor=floor, runs=dict(runs), evals=dict(evals), before=before)


def evaluate_both(folder, held_out, seed):
    """A stage's model on the held-out questions, greedy and with one sample each at temperature 1 (seeded):
    {"greedy": [right or not, ...], "sampled": [...]} in the problems' order."""
    model, meta = chat.chat_model(read_checkpoint(folder / "ckpt.pt"), folder, 256)
    greedy = chat.evaluate(model, meta, held_out)
    torch.manual_seed(batch_seed(seed, 12))
    return dict(greedy=in_order(greedy), sampled=in_order(chat.evaluate(model, meta, held_out, temperature=1.0)),
                lengths=greedy["lengths"])


def before_rl(folder, problems, G, seed, batch_size=32):
    """What RL could reinforce, before it: per problem, G replies sampled at temperature 1 and the greedy one ->
    [(problem, greedy right, replies right, majority right)], the majority among the answers given."""
    model, meta = chat.chat_model(read_checkpoint(folder / "ckpt.pt"), folder, 256)
    template = chat.Template(meta)
    greedy = in_order(chat.evaluate(model, meta, problems))
    torch.manual_seed(batch_seed(seed, 13))
    rows = []
    for at in range(0, len(problems), batch_size):
        batch = problems[at:at + batch_size]
        outputs = chat.generate(model, [template.prompt(p.question) for p in batch], chat.ANSWER_TOKENS, template.eos,
                                G, 1.0)
        for i, p in enumerate(batch):
            answers = [chat.final_answer(template.decode(t)) if s else None for t, s in outputs[i * G:(i + 1) * G]]
            votes = collections.Counter(a for a in answers if a is not None)
            majority = bool(votes) and votes.most_common(1)[0][0] == p.answer
            rows.append((p, greedy[at + i], [a == p.answer for a in answers], majority))
    return rows


def difficulty(problems):
    """{question: "fewer steps" or "more steps"}: its trace's steps (its "="s) up to or above its kind's median."""
    steps = {p.question: reasoning.thinking(p).count("=") for p in problems}
    medians = {k: statistics.median(steps[p.question] for p in problems if p.kind == k) for k in {p.kind for p in problems}}
    return {p.question: "fewer steps" if steps[p.question] <= medians[p.kind] else "more steps" for p in problems}


def report(floor, runs, evals, before, held_out, aimed, grpo_cfg, args, base, n_eval, G):
    seeds = args.repeats
    print(f"\nposttrain: Table 9 at nano scale, SFT at equal steps; held-out greedy exact match, % (95% Wilson "
          f"interval), {n_eval} questions x {seeds} seed(s) pooled; mean reply length in tokens\n")
    print("| model | " + " | ".join(MATH_KINDS) + " | all | all, per seed | reply tokens |")
    print("|---|" + "---:|" * (len(MATH_KINDS) + 3))
    acc = chat.accuracy(floor)
    print("| pretrained, one solved example | " + " | ".join(cell(*acc[k]) for k in MATH_KINDS) +
          f" | {cell(*acc['all'])} | {100 * acc['all'][0] / acc['all'][1]:.1f} | - |")
    for name in ("bare", "worked", "thinking"):
        accs = [{k: tuple(v) for k, v in final(e)["accuracy"].items()} for e in runs[name]]
        pooled = {k: tuple(map(sum, zip(*(a[k] for a in accs)))) for k in accs[0]}
        length = statistics.mean(e["length"] for entries in runs[name] for e in entries if e["kind"] == "eval"
                                 and e["step"] == final(entries)["step"])
        print(f"| {NAMES[name]} | " + " | ".join(cell(*pooled[k]) for k in MATH_KINDS) + f" | {cell(*pooled['all'])} | "
              + " / ".join(f"{100 * a['all'][0] / a['all'][1]:.1f}" for a in accs) + f" | {length:.1f} |")

    rows = [row for seed_rows in before for row in seed_rows]
    level = difficulty(held_out)
    print(f"\nbefore RL, the thinking SFT model: {G} replies a question at temperature 1, {seeds} seed(s) pooled; % of "
          f"questions (sampled: of the replies; mixed: groups with right and wrong replies, what GRPO learns from)\n")
    print("| kind | difficulty | questions | greedy | sampled | pass@G | majority | mixed groups |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for kind in [*MATH_KINDS, "all"]:
        for diff in ("fewer steps", "more steps", "all"):
            sel = [row for row in rows if kind in ("all", row[0].kind) and diff in ("all", level[row[0].question])]
            if not sel or (kind == "all" and diff != "all"):
                continue
            n = len(sel)
            print(f"| {kind} | {diff} | {n} | {100 * sum(r[1] for r in sel) / n:.1f} | "
                  f"{100 * sum(sum(r[2]) / G for r in sel) / n:.1f} | {100 * sum(any(r[2]) for r in sel) / n:.1f} | "
                  f"{100 * sum(r[3] for r in sel) / n:.1f} | {100 * sum(0 < sum(r[2]) < G for r in sel) / n:.1f} |")

    kinds = ", ".join(k for k in MATH_KINDS if any(held_out[i].kind == k for i in aimed))
    print(f"\nGRPO and its controls, from the thinking SFT model: held-out exact match, %, the set GRPO aimed at "
          f"({kinds}: {len(aimed)} questions) and all {n_eval}, greedy and sampled (one reply at temperature 1), "
          f"{seeds} seed(s) pooled (per seed after /)\n")
    print("| model | aimed, greedy | aimed, sampled | all, greedy | all, sampled |")
    print("|---|---:|---:|---:|---:|")
    for name in [n for n in ("thinking", "grpo", "more_sft", "grpo_plain") if n in evals]:
        cells = []
        for subset in (aimed, range(n_eval)):
            for mode in ("greedy", "sampled"):
                per_seed = [[e[mode][i] for i in subset] for e in evals[name]]
                cells.append(f"{percent(sum(per_seed, []))} ({' / '.join(map(percent, per_seed))})")
        print(f"| {NAMES[name]} | " + " | ".join(cells) + " |")
    print("\npaired, question by question within each seed, then pooled: difference in points (95% paired interval), "
          "McNemar's exact p\n")
    print("| comparison | set | decoding | difference | McNemar p | per seed |")
    print("|---|---|---|---:|---:|---:|")
    for first, second in [(a, b) for a, b in (("grpo", "more_sft"), ("grpo", "grpo_plain"), ("grpo", "thinking"),
                                              ("more_sft", "thinking")) if b in evals]:
        for label, subset in ((f"aimed ({len(aimed)})", aimed), (f"all ({n_eval})", range(n_eval))):
            for mode in ("greedy", "sampled"):
                a = [[e[mode][i] for i in subset] for e in evals[first]]
                b = [[e[mode][i] for i in subset] for e in evals[second]]
                diff, (lo, hi), p = chat.paired(sum(a, []), sum(b, []))
                per_seed = " / ".join(f"{100 * chat.paired(x, y)[0]:+.1f}" for x, y in zip(a, b))
                print(f"| {NAMES[first]} - {NAMES[second]} | {label} | {mode} | {100 * diff:+.1f} "
                      f"({100 * lo:+.1f} to {100 * hi:+.1f}) | {p:.3g} | {per_seed} |")

    print(f"\nthe stages, mean over seeds ({torch.get_num_threads()} threads):\n")
    print("| stage | steps | training s | s/step | wall s (with evaluations) |")
    print("|---|---:|---:|---:|---:|")
    for name in [n for n in ("thinking", "worked", "bare", "grpo", "grpo_plain", "more_sft") if n in runs]:
        done = [final(e) for e in runs[name]]
        steps = " / ".join(dict.fromkeys(str(d["step"]) for d in done))          # per seed where they differ
        print(f"| {NAMES[name]} | {steps} | {statistics.mean(d['train_s'] for d in done):.0f} | "
              f"{statistics.mean(d['train_s'] / max(d['step'], 1) for d in done):.3f} | "
              f"{statistics.mean(d['wall_s'] for d in done):.0f} |")
    for name in [n for n in ("grpo", "grpo_plain") if n in runs]:
        logs = [[e for e in entries if e["kind"] == "train"] for entries in runs[name]]
        mean = lambda k: statistics.mean(e[k] for log in logs for e in log)          # noqa: E731
        print(f"\n{NAMES[name]}, all its steps and seeds: right {mean('right'):.1%} of the replies drawn (a group "
              f"{mean('group_right'):.0%}), groups with signal {mean('signal'):.0%} of {mean('drawn'):.1f} drawn a "
              f"step ({mean('kept'):.1f} kept), KL {mean('kl'):.4f}, clipped {mean('clipped'):.2%}, replies of "
              f"{mean('length'):.1f} tokens, well formed {mean('well_formed'):.1%}", end="")
    if "grpo_plain" not in runs:
        print(f"\n(no run without the KL term and the clip: the preset has β = {grpo_cfg['kl_beta']} and one update a "
              f"batch, where ρ = 1 and the clip never binds: that run would be GRPO itself)", end="")
    print()
    n = sum(prepare_data(args.data_dir, "domains", args.text, "char", log=lambda *a: None)[1]["domains"]["math"])
    corpus = set(math_text(n)[:n].splitlines()[::2])
    seen = {k: sum(p.question in corpus for p in held_out if p.kind == k) for k in MATH_KINDS}
    print("held-out questions that also occur in the pretraining corpus: " + ", ".join(
        f"{k} {v}/{sum(p.kind == k for p in held_out)}" for k, v in seen.items()) + " (none in any post-training pair)")


def rollout_speed(sft_out, repeats, quick):
    """GRPO's rollouts from the SFT model, temperature 1: Q questions x G samples as one batch (one prefill per question,
    its cache repeated G times), per question (G rows), and each sample alone; tokens/s of each, interleaved rounds."""
    model, meta = chat.chat_model(read_checkpoint(sft_out / "ckpt.pt"), sft_out, 256)
    cfg = command_config("grpo.py", GRPO)
    Q, G = (2, 4) if quick else (cfg["questions"], cfg["group_size"])
    template = chat.Template(meta)
    prompts = [template.prompt(p.question) for p in chat.held_out_problems(Q)]
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


def plot(runs, evals, aimed, held_out, root):
    """GRPO's greedy accuracy on the aimed set at each evaluation, with and without the KL term and the clip (the mean
    over seeds), the thinking SFT model and the more-SFT control as lines; and the share of groups with signal."""
    plt = pyplot("posttrain")
    if plt is None:
        return
    kinds = {held_out[i].kind for i in aimed}
    fig, (acc_ax, signal_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for name in [n for n in ("grpo", "grpo_plain") if n in runs]:
        curves = [[(e["step"], 100 * sum(e["accuracy"][k][0] for k in kinds) / sum(e["accuracy"][k][1] for k in kinds))
                   for e in entries if e["kind"] == "eval"] for entries in runs[name]]
        signals = [[(e["step"], 100 * e["signal"]) for e in entries if e["kind"] == "train"] for entries in runs[name]]
        for ax, c in ((acc_ax, curves), (signal_ax, signals)):
            ax.plot([s for s, _ in c[0]], [statistics.mean(x[i][1] for x in c) for i in range(len(c[0]))], marker="o",
                    label=NAMES[name])
    for name, style in (("more_sft", "--"), ("thinking", ":")):
        acc_ax.axhline(statistics.mean(100 * sum(e["greedy"][i] for i in aimed) / len(aimed) for e in evals[name]),
                       color="gray", ls=style, label=NAMES[name])
    acc_ax.set(xlabel="GRPO step", ylabel="held-out accuracy, % (greedy)", title="The kinds GRPO aimed at")
    signal_ax.set(xlabel="GRPO step", ylabel="% of the groups drawn", title="Groups with mixed rewards (signal)")
    acc_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / "posttrain.png", dpi=120)
    print(f"plot: {root / 'posttrain.png'}")
