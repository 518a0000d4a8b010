"""Benchmarks: what each idea costs and buys, measured side by side in one process. One command line,
one file per part beside this one (bench_*.py); the shared timing and training helpers live here.

    python bench.py --parts kernels      # registers / spills of the Triton kernels per CUDA target (no GPU
                                         # needed); on a GPU also their timings vs the PyTorch references
    python bench.py --parts step         # a training step: MoE (grouped GEMM, loop) vs dense of equal active size
    python bench.py --parts decode       # decoding: recompute vs naive / absorbed MLA cache vs MTP speculative
    python bench.py --parts ablation     # what each DeepSeek idea buys: a ladder of models, same steps and same time
    python bench.py --parts specialization   # what the experts learn on English, code and maths (report Fig. 9)
    python bench.py --parts fp8          # FP8 training (report §3.3) beside fp32: loss, step time, saved activations
    python bench.py --parts ep           # expert parallelism: all-to-all volume with and without the node limit
    python bench.py --parts context      # context extension (§4.3): trained at 64, YaRN to 256; val loss by position
    python bench.py --parts hf           # peak memory of loading a checkpoint in DeepSeek's layout vs its size
    python bench.py --gpu                # everything worth measuring on one CUDA GPU (about 8 minutes)
    python bench.py --quick              # a smoke version of every CPU part
"""
import argparse
import contextlib
import importlib
import json
import statistics
import sys
from pathlib import Path

import torch

import deepseek as ds
from sample import now


# ----------------------------------------------------------------------------- shared helpers

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


V3_CONFIG = Path(__file__).parent / "config" / "config_671B.json"      # DeepSeek-V3's shapes, from one file


def preset_args(name, vocab_size=65):
    """The ModelArgs a config/NAME.py preset builds (char-level vocabulary unless told)."""
    import train
    return train.model_args_from(train.parse_config([name])[0], vocab_size)


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


def train_run(args, out, argv, quiet_log):
    """python train.py ARGV into `out`, its output into `quiet_log`; the summary of its log.jsonl: best val
    loss, steps, median seconds per step (the first step, which warms up, left out), final MaxVio, curve
    of (step, seconds at that speed, val loss)."""
    import train
    if out.exists():
        for f in out.iterdir():
            f.unlink()
    with open(quiet_log, "w") as log, contextlib.redirect_stdout(log):
        if train.cli([*argv, f"--out_dir={out}"]) != 0:
            raise SystemExit(f"bench: training failed, see {quiet_log}")
    entries = read_log(out)
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


# ----------------------------------------------------------------------------- training step

def bench_step(args):
    """Milliseconds per training step (forward, backward, AdamW, bias update) of the CPU preset's MoE
    model beside the dense model with the same activated FFN width (inter_dim = shared + k routed), timed
    interleaved in one process on the same batch: the routed experts by each of kernels.expert_gemm's
    paths, and the preset eager and under torch.compile."""
    import kernels
    import train
    cfg, _, _ = train.parse_config(["shakespeare_char_cpu"])
    rows = [("dense, same active FFN width", dict(n_routed_experts=0, n_mtp=0), None, False),
            ("MoE, grouped GEMM", dict(n_mtp=0), "grouped_mm", False),
            ("MoE, padded batched GEMM", dict(n_mtp=0), "padded", False),
            ("MoE, per-expert loop", dict(n_mtp=0), "loop", False),
            ("MoE + MTP (the preset)", dict(), None, False),
            ("MoE + MTP, torch.compile", dict(), None, True)]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 65, (2, cfg["batch_size"], cfg["block_size"]), generator=g)
    models = []
    for name, over, _, compiled in rows:
        torch.manual_seed(0)
        m = ds.Transformer(train.model_args_from({**cfg, **over}, 65)).train()
        models.append((m, torch.compile(m) if compiled else m, train.configure_optimizer(m, 1e-3, 0.1, (0.9, 0.99), "cpu")))

    def step(m, run, opt, path):
        kernels.EXPERT_GEMM = path
        try:
            run(x, y)[1]["total"].backward()
        finally:
            kernels.EXPERT_GEMM = None
        opt.step()
        opt.zero_grad(set_to_none=True)
        m.update_expert_bias()
    times, _ = rounds([lambda m=m, run=run, opt=opt, path=path: step(m, run, opt, path)
                       for (m, run, opt), (_, _, path, _) in zip(models, rows)], args.step_repeats, warmup=3)
    print(f"step: CPU preset (batch {cfg['batch_size']} x {cfg['block_size']}), {torch.get_num_threads()} threads, "
          f"median of {args.step_repeats} interleaved steps")
    print("| model | active params | ms/step | vs dense |")
    print("|---|---:|---:|---:|")
    base = statistics.median(times[0])
    for (name, *_), (m, _, _), t in zip(rows, models, times):
        print(f"| {name} | {m.num_params(active=True) / 1e6:.3f}M | {1000 * statistics.median(t):.1f} | "
              f"{statistics.median(t) / base:.2f}x |")
    ffn_floor(cfg, x.numel(), args.step_repeats)
    return {name: statistics.median(t) for (name, *_), t in zip(rows, times)}


def ffn_floor(cfg, N, repeats):
    """The GEMMs alone: one MoE layer's shared + routed experts (grouped GEMM over evenly loaded,
    pre-sorted copies: no gate, no dispatch) beside the dense FFN of the same active width, forward and
    backward on N tokens. What routing cannot get below on this machine."""
    import train
    a = train.model_args_from(cfg, 65)
    K, E = a.n_activated_experts, a.n_routed_experts
    dense, shared = ds.MLP(a.dim, a.inter_dim), ds.MLP(a.dim, a.n_shared_experts * a.moe_inter_dim)
    experts = ds.Experts(E, a.dim, a.moe_inter_dim)
    for p in [*dense.parameters(), *shared.parameters(), *experts.parameters()]:
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(N, a.dim, requires_grad=True)
    xs = x.detach().repeat(K, 1).requires_grad_()
    counts = torch.full((E,), N * K // E)
    rows = [("dense FFN", lambda: dense(x).square().sum().backward()),
            ("shared + routed experts", lambda: (shared(x).square().sum() + experts(xs, counts).square().sum()).backward())]
    times, _ = rounds([f for _, f in rows], repeats, warmup=3)
    print(f"\nThe FFN GEMMs alone, forward + backward on {N} tokens ({K} of {E} experts each, evenly loaded)")
    print("| FFN | ms | vs dense |")
    print("|---|---:|---:|")
    for (name, _), t in zip(rows, times):
        print(f"| {name} | {1000 * statistics.median(t):.2f} | {statistics.median(t) / statistics.median(times[0]):.2f}x |")


# ----------------------------------------------------------------------------- one GPU

def bench_gpu(args):
    """What is worth measuring on one CUDA GPU, in about 8 minutes: the kernel table; config/shakespeare_char.py
    trained for as many of its 5000 steps as fit in --gpu_minutes (schedule scaled to them) beside nanoGPT's
    published 1.4697; decoding speeds of the checkpoint it wrote; FP8 against bf16."""
    if not torch.cuda.is_available():
        print("gpu: no CUDA device on this machine: nothing measured")
        return
    import bench_decode
    import bench_kernels
    import bench_systems
    from data import tokenizer_from_meta
    from train import load_checkpoint
    bench_kernels.run(args)
    step_s = gpu_speed(args, "timing")["step_s"]
    iters = min(5000, int(60 * args.gpu_minutes / (1.15 * step_s)))      # 15% for the evaluations
    print(f"\ngpu: config/shakespeare_char.py, {iters} of 5000 steps ({1000 * step_s:.0f} ms/step measured)")
    out = Path(args.out) / "gpu-char"
    r = train_run(args, out, ["shakespeare_char", f"--data_dir={args.data_dir}", "--device=cuda", f"--max_iters={iters}",
                              f"--lr_decay_iters={iters}", f"--mtp_lambda_step={round(0.7 * iters)}"], f"{out}.log")
    print("| run | steps | best val loss | wall | tokens/s | MFU |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| ours ({torch.cuda.get_device_name()}) | {iters} | {r['best']:.4f} | {r['wall_s']:.0f} s | "
          f"{r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% |")
    print("| nanoGPT, published (A100) | 5000 | 1.4697 | about 3 min | | |\n")
    model, ckpt = load_checkpoint(out / "ckpt.pt", "cuda")
    idx = torch.tensor([tokenizer_from_meta(ckpt["meta"])[0]("ROMEO:\n")], device="cuda")
    bench_decode.header()
    bench_decode.row("shakespeare_char (GPU)", model, idx, model.args.max_seq_len - idx.size(1), args.timing_repeats)
    print()
    bench_systems.fp8_gpu_speed(args)


# ----------------------------------------------------------------------------- main

# part -> a function here, or "module:function" in its own file (imported when the part runs)
PARTS = {"kernels": "bench_kernels:run", "step": bench_step, "decode": "bench_decode:run",
         "ablation": "bench_ablation:run", "specialization": "bench_specialization:run", "fp8": "bench_systems:bench_fp8",
         "ep": "bench_systems:bench_ep", "context": "bench_context:run", "hf": "bench_hf:run", "gpu": bench_gpu}


def run_part(part, args):
    fn = PARTS[part]
    if isinstance(fn, str):
        module, name = fn.split(":")
        fn = getattr(importlib.import_module(module), name)
    return fn(args)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="kernels,step,decode,ablation,fp8,ep,context", help=f"comma list of: {', '.join(PARTS)}")
    parser.add_argument("--ckpts", default="out-shakespeare-char-cpu", help="decode: checkpoint folders")
    parser.add_argument("--long_tokens", type=int, default=None, help="decode: tokens after the 512-token prompt (64, quick 16)")
    parser.add_argument("--repeats", type=int, default=1, help="ablation, specialization, context: seeds per row, phase (mean and spread)")
    parser.add_argument("--timing_repeats", type=int, default=None, help="decode, context: interleaved timing rounds, best kept (5, quick 1)")
    parser.add_argument("--quick", action="store_true", help="a smoke version of each part (< 4 minutes on 2 cores)")
    parser.add_argument("--iters", type=int, default=None, help="ablation, specialization, fp8, context: iterations per run "
                        "(default 2000, quick 200; fp8 quick 50; context: the base's, its phases run iters / 8)")
    parser.add_argument("--timing_iters", type=int, default=None, help="ablation: steps of each row's timing run (50, quick 10)")
    parser.add_argument("--step_repeats", type=int, default=None, help="step: timed steps per model (40, quick 5)")
    parser.add_argument("--hf_gb", type=float, default=None, help="hf: size of each synthetic checkpoint in GB (1, quick 0.1)")
    parser.add_argument("--gpu", action="store_true", help="run the gpu part alone (the same as --parts gpu)")
    parser.add_argument("--gpu_minutes", type=float, default=4.0, help="gpu: training time budget in minutes")
    parser.add_argument("--out", default="out-bench", help="ablation, specialization, fp8, context: runs, logs and plots go here")
    parser.add_argument("--data_dir", default="data", help="ablation, specialization, fp8, context: data cache (as train.py)")
    parser.add_argument("--text", default="", help="ablation, fp8, context: the text to train on; specialization: its "
                        "English (default: Tiny Shakespeare)")
    args = parser.parse_args(argv)
    parts = ["gpu"] if args.gpu else [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
    args.iters = args.iters or (200 if args.quick else 2000)
    args.long_tokens = args.long_tokens or (16 if args.quick else 64)
    args.timing_repeats = args.timing_repeats or (1 if args.quick else 5)
    args.timing_iters = args.timing_iters or (10 if args.quick else 50)
    args.step_repeats = args.step_repeats or (5 if args.quick else 40)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return {part: run_part(part, args) for part in parts}


if __name__ == "__main__":
    from data import UserError
    try:
        main()
    except UserError as e:           # a missing checkpoint, data file, tokenizer: one line
        sys.exit(f"error: {e}")
