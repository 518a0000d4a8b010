"""Benchmarks, one function per part.

    python bench.py --parts kernels      # registers / spills of the Triton kernels per CUDA target (no GPU
                                         # needed); on a GPU also their timings vs the PyTorch references
    python bench.py --parts step         # a training step: MoE (grouped GEMM, loop) vs dense of equal active size
    python bench.py --parts decode       # decoding: recompute vs naive / absorbed MLA cache vs MTP speculative
    python bench.py --parts ablation     # what each DeepSeek idea buys: a ladder of models, same steps and same time
    python bench.py --parts fp8          # FP8 training (report §3.3) beside fp32: loss, step time, saved activations
    python bench.py --parts ep           # expert parallelism: all-to-all volume with and without the node limit
    python bench.py --gpu                # everything worth measuring on one CUDA GPU (about 8 minutes)
    python bench.py --quick              # a smoke version of every CPU part
"""
import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import textwrap
from pathlib import Path

import torch

import deepseek as ds
from sample import now
import fp8


# ----------------------------------------------------------------------------- kernels

# (name, T tokens, E experts, k, groups, groups kept): V3's gate at three batch sizes, and the nano model's
KERNEL_SHAPES = [
    ("V3", 4096, 256, 8, 8, 4),
    ("V3", 16384, 256, 8, 8, 4),
    ("V3", 65536, 256, 8, 8, 4),
    ("nano", 12 * 64, 16, 2, 4, 2),
]
# (name, E, k, groups, groups kept) of deepseek.py's gates, compiled for each CUDA compute capability
COMPILE_SHAPES = [("V3", 256, 8, 8, 4), ("nano", 16, 4, 4, 2), ("nano cpu", 8, 2, 1, 1)]
CCS = (70, 75, 80, 86, 89, 90)                        # V100, T4, A100, RTX 30xx, RTX 40xx / L4, H100
MAX_WARPS = {70: 64, 75: 32, 80: 64, 86: 48, 89: 48, 90: 64}  # resident warps per SM; 64K registers each


def occupancy(regs, warps, cc):
    """Fraction of an SM's warp slots that blocks of `warps` warps using `regs` registers a thread can
    fill: registers are given out per warp in units of 256, from 64K per SM."""
    per_warp = -(-regs * 32 // 256) * 256
    return min(MAX_WARPS[cc], 65536 // per_warp) // warps * warps / MAX_WARPS[cc]


def compile_rows(ccs, shapes):
    """Compile each kernel at each shape for each compute capability (needs TRITON_INTERPRET and the
    Triton cache off, TRITON_DUMP_PTXAS_LOG=1): dicts of kernel, shape, cc, registers and spill bytes
    from Triton's own `ptxas -v`, warps, the PTX target and the cubin size."""
    import io
    import re
    import kernels
    rows = []
    for name, E, k, G, KG in shapes:
        meta = lambda *shape, dtype=torch.float32: torch.empty(*shape, dtype=dtype, device="meta")  # noqa: E731
        calls = [(kernels.route_triton, meta(4096, E), meta(E), k, G, KG, "sigmoid"),
                 (kernels.dispatch_triton, meta(4096, k, dtype=torch.int32), E)]
        for cc in ccs:
            for fn, *call_args in calls:
                log = io.StringIO()
                with contextlib.redirect_stdout(log):             # Triton prints the ptxas log
                    done = kernels.compile_launches(cc, fn, *call_args)
                for kname, ck in done:
                    m = re.search(rf"function '{kname}'.*?(\d+) bytes spill stores, (\d+) bytes spill loads"
                                  r".*?Used (\d+) registers", log.getvalue(), re.S)
                    rows.append(dict(kernel=kname, shape=name, cc=cc, regs=int(m[3]), spills=int(m[1]) + int(m[2]),
                                     warps=ck.metadata.num_warps, target=re.search(r"\.target (\w+)", ck.asm["ptx"])[1],
                                     cubin=len(ck.asm["cubin"])))
    return rows


def compile_kernels(ccs=CCS, shapes=COMPILE_SHAPES):
    """compile_rows in a fresh process: no GPU needed, and no interpreter (TRITON_INTERPRET unset)."""
    import os
    import subprocess
    import tempfile
    with tempfile.TemporaryDirectory() as cache:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(TRITON_CACHE_DIR=cache, TRITON_DUMP_PTXAS_LOG="1")
        code = f"import bench, json; print(json.dumps(bench.compile_rows({tuple(ccs)!r}, {list(shapes)!r})))"
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(__file__).parent,
                             capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"kernel compile failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def bench_kernels(args):
    """Without a GPU: registers, spills and occupancy of each kernel compiled for each CUDA target.
    On a GPU also a markdown table: microseconds of the reference and the Triton kernel, speed-up,
    and the achieved bandwidth against the bytes that must move (fp32 logits, sigmoid gate)."""
    ccs = (80, 90) if args.quick else CCS
    rows = compile_kernels(ccs)
    print("registers / spill bytes / occupancy per CUDA target (bundled ptxas -v; T never enters)")
    print("| kernel | shape | warps | " + " | ".join(f"sm_{cc}" for cc in ccs) + " |")
    print("|---|---|---:|" + "---:|" * len(ccs))
    for kname, shape in dict.fromkeys((r["kernel"], r["shape"]) for r in rows):
        cells = {r["cc"]: r for r in rows if (r["kernel"], r["shape"]) == (kname, shape)}
        print(f"| {kname} | {shape} | {cells[ccs[0]]['warps']} | " + " | ".join(
            f"{c['regs']} / {c['spills']} / {occupancy(c['regs'], c['warps'], cc):.0%}"
            for cc, c in cells.items()) + " |")
    if not torch.cuda.is_available():
        print("kernels: timings need a CUDA GPU, skipped")
        return
    import triton.testing
    import kernels
    device, do_bench = "cuda", triton.testing.do_bench
    print("| op | shape (T, E, k, groups) | ref µs | triton µs | speed-up | ref GB/s | triton GB/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, T, E, k, G, KG in KERNEL_SHAPES:
        torch.manual_seed(0)
        logits = torch.randn(T, E, device=device)
        gate = ds.Gate(ds.ModelArgs(n_routed_experts=E, n_activated_experts=k, n_expert_groups=G,
                                    n_limited_groups=KG)).to(device)
        gate.bias.normal_(0, 0.01)
        ids = gate.route(gate.scores(logits))
        rows = [
            # op, ref fn, triton fn, bytes: logits + bias read, ids written
            ("route", lambda: gate.route(gate.scores(logits)),
             lambda: kernels.route_triton(logits, gate.bias, k, G, KG, "sigmoid"), 4 * T * E + 4 * E + 4 * T * k),
            # ids read; counts, offsets, perm, inv written (int64)
            ("dispatch", lambda: ds.dispatch(ids, E), lambda: kernels.dispatch_triton(ids, E),
             4 * T * k + 8 * (2 * E + 1) + 16 * T * k),
        ]
        # correctness first: dispatch must be identical; gate ids may differ only on fp32 near-ties
        same_ids = (rows[0][2]() == ids).all(-1).float().mean().item()
        assert all(torch.equal(a, b) for a, b in zip(kernels.dispatch_triton(ids, E), ds.dispatch(ids, E)))
        for op, ref, tri, nbytes in rows:
            with torch.no_grad():
                t_ref, t_tri = do_bench(ref) * 1e3, do_bench(tri) * 1e3  # ms -> µs
            shape = f"{name} ({T}, {E}, {k}, {G}/{KG})"
            print(f"| {op} | {shape} | {t_ref:.1f} | {t_tri:.1f} | {t_ref / t_tri:.1f}x | "
                  f"{nbytes / t_ref / 1e3:.0f} | {nbytes / t_tri / 1e3:.0f} |")
        if same_ids < 1:
            print(f"note: {name} T={T}: {100 * (1 - same_ids):.3f}% of tokens chose differently (fp32 near-ties)")


# ----------------------------------------------------------------------------- training step

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


def bench_step(args):
    """Milliseconds per training step (forward, backward, AdamW, bias update) of the CPU preset's MoE
    model beside the dense model with the same activated FFN width (inter_dim = shared + k routed), timed
    interleaved in one process on the same batch; the routed experts by grouped GEMM and by a loop."""
    from unittest import mock
    import train
    cfg, _, _ = train.parse_config(["shakespeare_char_cpu"])
    rows = [("dense, same active FFN width", dict(n_routed_experts=0, n_mtp=0), False),
            ("MoE, grouped GEMM", dict(n_mtp=0), False),
            ("MoE, per-expert loop", dict(n_mtp=0), True),
            ("MoE + MTP (the preset)", dict(), False)]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 65, (2, cfg["batch_size"], cfg["block_size"]), generator=g)
    models = []
    for name, over, _ in rows:
        torch.manual_seed(0)
        m = ds.Transformer(train.model_args_from({**cfg, **over}, 65)).train()
        models.append((m, train.configure_optimizer(m, 1e-3, 0.1, (0.9, 0.99), "cpu")))

    def step(m, opt, use_loop):
        with mock.patch.object(ds.Experts, "forward", lambda s, a, c: orig(s, a, c, grouped=False)) if use_loop \
                else contextlib.nullcontext():
            m(x, y)[1]["total"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        m.update_expert_bias()
    orig = ds.Experts.forward
    times, _ = rounds([lambda m=m, opt=opt, u=u: step(m, opt, u) for (m, opt), (_, _, u) in zip(models, rows)],
                      args.step_repeats, warmup=3)
    print(f"step: CPU preset (batch {cfg['batch_size']} x {cfg['block_size']}), {torch.get_num_threads()} threads, "
          f"median of {args.step_repeats} interleaved steps")
    print("| model | active params | ms/step | vs dense |")
    print("|---|---:|---:|---:|")
    base = statistics.median(times[0])
    for (name, _, _), (m, _), t in zip(rows, models, times):
        print(f"| {name} | {m.num_params(active=True) / 1e6:.3f}M | {1000 * statistics.median(t):.1f} | "
              f"{statistics.median(t) / base:.2f}x |")
    ffn_floor(cfg, x.numel(), args.step_repeats)


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


# ----------------------------------------------------------------------------- decode

def timed(fns, repeats):
    """Best seconds of each function over `repeats` interleaved rounds; (times, last results)."""
    times, outs = rounds(fns, repeats)
    return [min(t) for t in times], outs


@torch.no_grad()
def recompute(model, idx, n):
    """Greedy decoding with no cache: the whole context again for every token (nanoGPT's sample.py)."""
    for _ in range(n):
        nxt = model(idx[:, -model.args.max_seq_len:])[0][:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, nxt], dim=1)
    return idx


def decode_row(name, model, idx, n, repeats):
    """Greedy tokens/s of each decoding mode on the same prompt; all modes must agree token for token."""
    model.eval()
    ctx = f"{idx.size(1)}+{n}"
    (t_re, t_na, t_ab, t_sp), (ref, naive, absorb, (spec, st)) = timed(
        [lambda: recompute(model, idx, n), lambda: model.generate(idx, n, temperature=0, attn_impl="naive"),
         lambda: model.generate(idx, n, temperature=0), lambda: model.generate_speculative(idx, n, temperature=0)], repeats)
    if idx.size(1) + n <= model.args.max_seq_len:        # no sliding: all four must be identical
        assert all(torch.equal(ref, o) for o in (naive, absorb, spec)), f"{name}: decoding modes disagree"
    torch.manual_seed(0)
    _, sampled = model.generate_speculative(idx, n, temperature=1.0)
    print(f"| {name} | {ctx} | {n / t_re:.0f} | {n / t_na:.0f} | {n / t_ab:.0f} | {n / t_sp:.0f} | "
          f"{t_re / t_ab:.1f}x | {t_re / t_sp:.1f}x | {t_ab / t_sp:.2f}x | "
          f"{st['accepted'] / max(st['drafted'], 1):.0%} / {sampled['accepted'] / max(sampled['drafted'], 1):.0%} | "
          f"{n / st['forwards']:.2f} |")


@torch.no_grad()
def step_profile(name, model, repeats, calls=20):
    """Where a speculative step's time goes, against one plain decoding step (the main model over one
    token): the main model over the two tokens [y, d], and the MTP draft (its block, the head, the
    argmax) over one or two positions, at the middle of the window; interleaved rounds, best kept.
    Also the operator calls of one main-model step: at small sizes the time goes per call."""
    from torch.profiler import profile
    if not model.mtp:
        return
    model.eval()
    S, mtp = model.args.max_seq_len // 2, model.mtp[0]
    t = torch.randint(0, model.args.vocab_size, (1, S + 3))
    model.trunk(t[:, :S], 0)
    h = model.trunk(t[:, S:S + 2], S)[0]

    def draft(n):
        hm = mtp(h[:, :n], model.embed(t[:, S + 1:S + 1 + n]), *model.positions(S, n))[0]
        return model.logits(hm[:, -1], mtp.norm).argmax(-1)

    def main(n):
        return model.logits(model.trunk(t[:, S:S + n], S)[0][0]).argmax(-1)
    parts = [("main model, 1 token (a plain step)", lambda: main(1)),
             ("main model, 2 tokens (verify [y, d])", lambda: main(2)),
             ("MTP draft, 1 position (after a rejection)", lambda: draft(1)),
             ("MTP draft, 2 positions (after an acceptance)", lambda: draft(2))]
    times, _ = timed([lambda f=f: [f() for _ in range(calls)] for _, f in parts], repeats)
    with profile() as prof:
        parts[0][1]()
    ops = sum(e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
              for e in prof.events())
    print(f"\n{name}: a speculative step against a plain one ({ops} operator calls in a plain step)")
    print("| part | ms | vs a plain step |")
    print("|---|---:|---:|")
    for (label, _), t_ in zip(parts, times):
        print(f"| {label} | {1000 * t_ / calls:.2f} | {t_ / times[0]:.2f}x |")
    print()


def decode_header():
    print("| model | prompt+new tokens | recompute tok/s | naive cache | absorb cache | speculative | "
          "absorb / recompute | speculative / recompute | speculative / absorb | acceptance greedy / T=1 | "
          "tokens per forward |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def bench_decode(args):
    """CPU decoding speed, side by side: tokens/s without cache, with the naive (per-head K/V) and the
    absorbed (latent) MLA cache, and with MTP speculative decoding; then cache sizes per token."""
    from data import tokenizer_from_meta
    from train import load_checkpoint
    torch.manual_seed(0)
    print(f"decode: CPU, {torch.get_num_threads()} threads, greedy, best of {args.timing_repeats} interleaved rounds")
    decode_header()
    for out_dir in filter(None, args.ckpts.split(",")):
        path = Path(out_dir) / "ckpt.pt"
        if not path.exists():
            print(f"| {out_dir} | no checkpoint: train it first (python train.py ...) | | | | | | | | | |")
            continue
        model, ckpt = load_checkpoint(path, "cpu")
        encode, _ = tokenizer_from_meta(ckpt["meta"])
        idx = torch.tensor([encode("ROMEO:\n")])
        decode_row(out_dir, model, idx, model.args.max_seq_len - idx.size(1), args.timing_repeats)
        step_profile(out_dir, model, args.timing_repeats)
    # long context: the default model shape (random weights: speed does not depend on training)
    long = ds.Transformer(ds.ModelArgs(max_seq_len=1024))
    idx = torch.randint(0, long.args.vocab_size, (1, 512))
    decode_row("default shape, untrained, 512 context", long, idx, args.long_tokens, args.timing_repeats)

    print("\n| attention | numbers cached per token per layer | KiB per token, all layers (bf16) | vs MLA absorb |")
    print("|---|---:|---:|---:|")
    for name, cfg in [("nano (default ModelArgs)", {}), ("DeepSeek-V3 671B", V3_SHAPE)]:
        a = ds.ModelArgs(**cfg)
        base = ds.cache_numbers_per_token(a)
        for label, attn, impl in [("MLA absorb", "mla", "absorb"), ("MLA naive", "mla", "naive"), ("MHA", "mha", "absorb")]:
            n = ds.cache_numbers_per_token(ds.ModelArgs(**{**cfg, "attn": attn}), impl)
            print(f"| {name}: {label} | {n:,} | {n * a.n_layers * 2 / 1024:,.1f} | {n / base:.1f}x |")


V3_SHAPE = dict(vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048, n_layers=61, n_dense_layers=3,
                n_heads=128, n_routed_experts=256, n_shared_experts=1, n_activated_experts=8, n_expert_groups=8,
                n_limited_groups=4, route_scale=2.5, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                qk_rope_head_dim=64, v_head_dim=128)


# ----------------------------------------------------------------------------- ablation

# the ladder: each row is config/shakespeare_char_cpu.py (nanoGPT's CPU budget) plus these overrides
ABLATION = [
    ("1 GPT: MHA + dense SwiGLU", dict(attn="mha", n_routed_experts=0, n_mtp=0)),
    ("2 + MLA", dict(n_routed_experts=0, n_mtp=0)),
    ("3 + DeepSeekMoE, aux-loss-free bias", dict(n_mtp=0)),
    ("4a MoE, auxiliary loss instead (alpha 0.01)", dict(n_mtp=0, bias_update_speed=0.0, seq_aux_alpha=0.01)),
    ("4b MoE, no balancing", dict(n_mtp=0, bias_update_speed=0.0, seq_aux_alpha=0.0)),
    ("5 + MTP: the full recipe", dict()),
]


def read_log(out_dir):
    with open(Path(out_dir) / "log.jsonl") as f:
        return [json.loads(line) for line in f]


@torch.no_grad()
def expert_load(out_dir, text, data_dir, batches=10):
    """Tokens per expert in each MoE layer of the trained model on val batches: (layers, experts)."""
    import data
    import train
    model, ckpt = train.load_checkpoint(Path(out_dir) / "ckpt.pt")
    c = ckpt["config"]
    folder, meta = data.prepare_data(data_dir, c["dataset"], text, c["tokenizer"], c["encoding"], log=lambda *a: None)
    val = data.load_split(folder, "val", meta)
    model.train()                                       # gates count tokens in training mode (dropout is 0)
    for k in range(batches):                            # with targets, so the MTP block runs too
        model(*data.get_batch(val, c["batch_size"], c["block_size"], data.batch_seed(1, k)))
    return model, torch.stack([g.load.clone() for g in model.gates()]) if model.gates() else None


def train_row(args, root, name, over, seed, iters, tag):
    """One run of an ablation row for `iters` steps (schedule scaled to them); its summary from log.jsonl."""
    import train
    out = root / f"{tag}_row{name.split()[0]}_seed{seed}"
    every = iters if tag == "timing" else max(iters // 8, 1)      # a timing run evaluates once, at the end
    argv = ["shakespeare_char_cpu", "--device=cpu", f"--out_dir={out}", f"--data_dir={args.data_dir}", f"--seed={1337 + seed}",
            "--always_save_checkpoint=True", f"--max_iters={iters}", f"--lr_decay_iters={iters}",
            f"--mtp_lambda_step={round(0.7 * iters)}", f"--eval_interval={every}", f"--log_interval={min(every, 10)}"]
    argv += (["--eval_iters=4"] if args.quick or tag == "timing" else []) + ([f"--text={args.text}"] if args.text else [])
    argv += [f"--{k}={v}" for k, v in over.items()]
    print(f"ablation: {name}, seed {seed}, {iters} steps ...", file=sys.stderr, flush=True)
    if out.exists():
        for f in out.iterdir():
            f.unlink()
    with open(root / f"{out.name}.log", "w") as log, contextlib.redirect_stdout(log):
        if train.cli(argv) != 0:
            raise SystemExit(f"ablation: training failed, see {root / out.name}.log")
    entries = read_log(out)
    c = entries[0]["config"]
    tokens_per_step = c["batch_size"] * c["block_size"] * c["gradient_accumulation_steps"]
    trains = [e for e in entries if e["kind"] == "train"]
    step_s = statistics.median(tokens_per_step / e["tokens_per_s"] for e in trains[1:] or trains)
    return dict(best=next(e for e in entries if e["kind"] == "done")["best_val"], iters=iters, step_s=step_s,
                maxvio=statistics.mean(trains[-1]["maxvio"]) if trains[-1]["maxvio"] else None, out=out,
                curve=[(e["step"], e["step"] * step_s, e["val"]) for e in entries if e["kind"] == "eval"],
                mtp=over.get("n_mtp", 1) > 0)


def bench_ablation(args):
    """Train every row of ABLATION on the same data and seeds, twice: for the same number of steps, and
    for the same training time as row 1 (each row's steps from a short timing run of every row in this
    process). Prints a Markdown table per budget with differences against row 1, and saves the
    validation curves (per step and per second) and the MoE expert loads as PNG."""
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    step_s = [train_row(args, root, name, over, 0, args.timing_iters, "timing")["step_s"] for name, over in ABLATION]
    budgets = {"steps": [args.iters] * len(ABLATION),
               "time": [max(1, round(args.iters * step_s[0] / s)) for s in step_s]}
    results = {}
    for budget, iters in budgets.items():
        results[budget] = []
        for (name, over), n in zip(ABLATION, iters):
            runs = [train_row(args, root, name, over, r, n, budget) for r in range(args.repeats)]
            results[budget].append(dict(name=name, runs=runs))
    for r in results["steps"]:
        model, r["load"] = expert_load(r["runs"][0]["out"], args.text, args.data_dir)
        r.update(total=model.num_params(), active=model.num_params(active=True),
                 flops=model.flops_per_token(model.args.max_seq_len))

    def spread(xs):
        return f"{statistics.mean(xs):.4f}" + (f" ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else "")

    mean = lambda r, k: statistics.mean(x[k] for x in r["runs"])   # noqa: E731
    print(f"\nablation: char-level Tiny Shakespeare, {args.repeats} seed(s) per row, {torch.get_num_threads()} CPU threads")
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
    print(f"\nsame training time ({args.iters} steps of row 1, {args.iters * step_s[0]:.0f} s at the timing run's "
          f"speed; steps per row from a {args.timing_iters}-step timing run):\n")
    print("| row | steps | ms/step (timing run) | best val loss | val vs row 1 |")
    print("|---|---:|---:|---:|---:|")
    base = results["time"][0]
    for r, s in zip(results["time"], step_s):
        print(f"| {r['name']} | {r['runs'][0]['iters']} | {1000 * s:.1f} | {spread([x['best'] for x in r['runs']])} | "
              f"{mean(r, 'best') - mean(base, 'best'):+.4f} |")
    plot_ablation(results, root)
    return results


def plot_ablation(results, root):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("ablation: matplotlib is not installed, no plots (pip install matplotlib)")
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


# ----------------------------------------------------------------------------- fp8

def fp8_saved_bytes(args, B=4):
    """Bytes per token that the FP8 linear layers of a model keep for the backward: each layer's input as
    E4M3 plus one fp32 scale per 1x128 tile, against fp32 autograd's 4 bytes a number, where layers that
    read the same tensor (w1 and w3, wq and wkv_a) share one saved copy. Counted on one forward."""
    model, inputs, run = ds.Transformer(args).train(), [], fp8.linear
    idx = torch.randint(0, args.vocab_size, (B, args.max_seq_len))
    fp8.linear = lambda x, w: inputs.append(x) or run(x, w)      # every FP8 layer's input, as it comes
    try:
        model(idx, idx)
    finally:
        fp8.linear = run
    quantized = sum(x.numel() + 4 * (x.numel() // x.size(-1)) * -(-x.size(-1) // fp8.C) for x in inputs)
    full = 4 * sum({(x.data_ptr(), x.shape): x.numel() for x in inputs}.values())
    return quantized / idx.numel(), full / idx.numel()


def bench_fp8(args):
    """The CPU preset trained with fp8=True beside the same run in fp32 (same seed, data and steps):
    best val loss, step time, and the activations kept for the backward by the linear layers."""
    import train
    root, iters = Path(args.out), min(args.iters, 50) if args.quick else args.iters
    root.mkdir(parents=True, exist_ok=True)
    a, b = (train_row(args, root, name, over, 0, iters, "fp8") for name, over in [("fp32", {}), ("fp8", {"fp8": True})])
    model, _ = train.load_checkpoint(b["out"] / "ckpt.pt")
    per_token_fp8, per_token_fp32 = fp8_saved_bytes(dataclasses.replace(model.args, fp8=True))
    print(f"\nfp8: char-level Tiny Shakespeare (config/shakespeare_char_cpu.py), {iters} steps, seed 1337, "
          f"{torch.get_num_threads()} CPU threads; GEMM path: "
          f"{'torch._scaled_mm' if fp8.scaled_mm_runs(torch.device('cpu')) else 'dequantize + fp32 matmul'}")
    print("| run | best val loss | vs fp32 | ms/step | step time vs fp32 | linear-layer activations kept, bytes/token |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| fp32 | {a['best']:.4f} | | {1000 * a['step_s']:.0f} | 1.00x | {per_token_fp32:,.0f} |")
    print(f"| fp8 (E4M3, 1x128 / 128x128 scales) | {b['best']:.4f} | {(b['best'] - a['best']) / a['best']:+.2%} | "
          f"{1000 * b['step_s']:.0f} | {b['step_s'] / a['step_s']:.2f}x | {per_token_fp8:,.0f} ({per_token_fp8 / per_token_fp32:.2f}x) |")
    fp8_gpu_speed(args)
    return a, b


def fp8_gpu_speed(args):
    """Tokens/s of config/shakespeare_char.py on this GPU in bf16 autocast, and with fp8=True: 60 steps each."""
    if not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)):
        print("fp8: no CUDA GPU with compute capability >= 8.9 here: FP8 vs bf16 tokens/s not measured")
        return
    import train
    speed = {}
    for name, over in [("bf16", []), ("fp8", ["--fp8=True"])]:
        out = Path(args.out) / f"gpu-fp8-{name}"
        with open(f"{out}.log", "w") as log, contextlib.redirect_stdout(log):
            train.cli(["shakespeare_char", f"--data_dir={args.data_dir}", "--device=cuda", "--dtype=bfloat16",
                       f"--out_dir={out}", "--max_iters=60", "--eval_interval=60", "--eval_iters=1", "--log_interval=10", *over])
        trains = [e for e in read_log(out) if e["kind"] == "train"]
        speed[name] = statistics.median(e["tokens_per_s"] for e in trains[1:])      # the first step compiles
    print(f"fp8: {torch.cuda.get_device_name()}, config/shakespeare_char.py: tokens/s bf16 {speed['bf16']:,.0f}, "
          f"fp8 {speed['fp8']:,.0f} ({speed['fp8'] / speed['bf16']:.2f}x)")


# ----------------------------------------------------------------------------- expert parallelism

# the nano model's MoE (16 experts, top-4, dim 256) with one expert group per rank
EP_MODEL = dict(vocab_size=256, n_layers=3, n_dense_layers=1, n_mtp=0, n_routed_experts=16, n_activated_experts=4)


def ep_volume(rank, world, store, out, batches):
    """One rank (gloo on CPU): the same weights run with every node limit M = world .. 1 over the same
    random tokens; rank 0 writes the all-to-all volume summed over the ranks to `out`."""
    import expert_parallel
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    rows = []
    for M in range(world, 0, -1):
        torch.manual_seed(0)
        model = ds.Transformer(ds.ModelArgs(**EP_MODEL, n_expert_groups=world, n_limited_groups=M))
        expert_parallel.shard_experts(model, world)
        g = torch.Generator().manual_seed(rank)
        with torch.no_grad():                   # training mode: the layers count their traffic
            for _ in range(batches):
                model(torch.randint(EP_MODEL["vocab_size"], (8, 64), generator=g))
        v, _ = expert_parallel.all_to_all_volume(model, batches, "cpu")
        rows.append(dict(M=M, sends=v["a2a_sends_per_token"], copies=v["a2a_copies_per_token"],
                         bytes_per_token=v["a2a_bytes_per_step"] / (world * 8 * 64)))
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def bench_ep(args):
    """Markdown table: token sends to other ranks per token and bytes per token with the node limit M
    (n_limited_groups, one expert group per rank) from M = world down to 1, at the same weights."""
    import tempfile
    world, batches = 4, 2 if args.quick else 8
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(ep_volume, args=(world, f"{tmp}/store", f"{tmp}/out.json", batches), nprocs=world)
        rows = json.loads(Path(f"{tmp}/out.json").read_text())
    a = ds.ModelArgs(**EP_MODEL)
    print(f"\nexpert parallelism: {world} ranks (gloo, CPU), {a.n_routed_experts} experts top-{a.n_activated_experts} "
          f"in {world} groups (one per rank), dim {a.dim}, fp32, same random-init weights for every M; "
          f"{batches} x 8 x 64 tokens per rank")
    print("| node limit M | token sends to other ranks per token (per MoE layer) | expert copies they carry "
          "(one send per copy) | bytes per token, forward, all layers | vs M = W |")
    print("|---:|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['M']} | {' '.join(f'{v:.2f}' for v in r['sends'])} | {' '.join(f'{v:.2f}' for v in r['copies'])} | "
              f"{r['bytes_per_token']:,.0f} | {r['bytes_per_token'] / rows[0]['bytes_per_token']:.2f}x |")
    return rows


# ----------------------------------------------------------------------------- one GPU

def bench_gpu(args):
    """What is worth measuring on one CUDA GPU, in about 8 minutes: the kernel table; config/shakespeare_char.py
    trained for as many of its 5000 steps as fit in --gpu_minutes (schedule scaled to them) beside nanoGPT's
    published 1.4697; decoding speeds of the checkpoint it wrote."""
    if not torch.cuda.is_available():
        print("gpu: no CUDA device on this machine: nothing measured")
        return
    import train
    bench_kernels(args)
    out, common = Path(args.out) / "gpu-char", ["shakespeare_char", f"--data_dir={args.data_dir}", "--device=cuda"]
    with open(Path(args.out) / "gpu-timing.log", "w") as log, contextlib.redirect_stdout(log):
        train.cli(common + [f"--out_dir={out}-timing", "--max_iters=60", "--eval_interval=60", "--eval_iters=1",
                            "--log_interval=10"])
    trains = [e for e in read_log(f"{out}-timing") if e["kind"] == "train"]
    step_s = statistics.median(64 * 256 / e["tokens_per_s"] for e in trains[1:])
    iters = min(5000, int(60 * args.gpu_minutes / (1.15 * step_s)))      # 15% for the evaluations
    print(f"\ngpu: config/shakespeare_char.py, {iters} of 5000 steps ({1000 * step_s:.0f} ms/step measured)")
    with open(Path(args.out) / "gpu-train.log", "w") as log, contextlib.redirect_stdout(log):
        train.cli(common + [f"--out_dir={out}", f"--max_iters={iters}", f"--lr_decay_iters={iters}",
                            f"--mtp_lambda_step={round(0.7 * iters)}"])
    entries = read_log(out)
    trains = [e for e in entries if e["kind"] == "train"]
    done = next(e for e in entries if e["kind"] == "done")
    mfu = [e["mfu"] for e in trains[1:] if e["mfu"]]
    print("| run | steps | best val loss | wall | tokens/s | MFU |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| ours ({torch.cuda.get_device_name()}) | {iters} | {done['best_val']:.4f} | {done['wall_s']:.0f} s | "
          f"{statistics.median(e['tokens_per_s'] for e in trains[1:]):,.0f} | "
          f"{f'{100 * statistics.median(mfu):.1f}%' if mfu else '-'} |")
    print("| nanoGPT, published (A100) | 5000 | 1.4697 | about 3 min | | |")
    from data import tokenizer_from_meta
    model, ckpt = train.load_checkpoint(out / "ckpt.pt", "cuda")
    idx = torch.tensor([tokenizer_from_meta(ckpt["meta"])[0]("ROMEO:\n")], device="cuda")
    print()
    decode_header()
    decode_row("shakespeare_char (GPU)", model, idx, model.args.max_seq_len - idx.size(1), args.timing_repeats)
    print()
    fp8_gpu_speed(args)


# ----------------------------------------------------------------------------- main

PARTS = {"kernels": bench_kernels, "step": bench_step, "decode": bench_decode, "ablation": bench_ablation,
         "fp8": bench_fp8, "ep": bench_ep, "gpu": bench_gpu}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="kernels,step,decode,ablation,fp8,ep", help=f"comma list of: {', '.join(PARTS)}")
    parser.add_argument("--ckpts", default="out-shakespeare-char-cpu", help="decode: checkpoint folders")
    parser.add_argument("--long_tokens", type=int, default=None, help="decode: tokens after the 512-token prompt (64, quick 16)")
    parser.add_argument("--repeats", type=int, default=1, help="ablation: seeds per row (mean and spread)")
    parser.add_argument("--timing_repeats", type=int, default=None, help="decode: interleaved timing rounds, best kept (5, quick 1)")
    parser.add_argument("--quick", action="store_true", help="a smoke version of each part (< 3 minutes on 2 cores)")
    parser.add_argument("--iters", type=int, default=None, help="ablation, fp8: iterations per run (default 2000, quick 200; fp8 quick 50)")
    parser.add_argument("--timing_iters", type=int, default=None, help="ablation: steps of each row's timing run (50, quick 10)")
    parser.add_argument("--step_repeats", type=int, default=None, help="step: timed steps per model (40, quick 5)")
    parser.add_argument("--gpu", action="store_true", help="run the gpu part alone (the same as --parts gpu)")
    parser.add_argument("--gpu_minutes", type=float, default=4.0, help="gpu: training time budget in minutes")
    parser.add_argument("--out", default="out-bench", help="ablation, fp8: runs, logs and plots go here")
    parser.add_argument("--data_dir", default="data", help="ablation, fp8: data cache (as train.py)")
    parser.add_argument("--text", default="", help="ablation, fp8: the text to train on (default: Tiny Shakespeare)")
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
    return {part: PARTS[part](args) for part in parts}


if __name__ == "__main__":
    from data import UserError
    try:
        main()
    except UserError as e:           # a missing checkpoint, data file, tokenizer: one line
        sys.exit(f"error: {e}")
