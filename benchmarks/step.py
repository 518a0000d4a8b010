"""bench.py --parts=step: a training step of the CPU preset's MoE model beside the dense model of the same
active width, by each expert-GEMM path, eager and compiled, with AdamW and with Muon, and the FFN GEMMs alone."""
import statistics

import torch

import deepseek as ds
import kernels
from benchmarks.common import command_config, rounds
from pretraining.configurator import model_args_from
from pretraining.optim import configure_optimizer

# name, config changes (batch_size too), kernels.install'ed, the expert GEMM forced, compiled, optimizer changes
ADAMW, MUON = dict(optimizer="adamw"), dict(optimizer="muon")
ROWS = [("dense, same active FFN width", dict(n_routed_experts=0, n_mtp=0), False, None, False, ADAMW),
        ("MoE, deepseek.py's reference loop", dict(n_mtp=0), False, None, False, ADAMW),
        ("MoE, sorted + grouped GEMM", dict(n_mtp=0), True, "grouped_mm", False, ADAMW),
        ("MoE, sorted + padded batched GEMM", dict(n_mtp=0), True, "padded", False, ADAMW),
        ("MoE, sorted + per-expert loop", dict(n_mtp=0), True, "loop", False, ADAMW),
        ("MoE + MTP (the preset)", dict(), True, None, False, ADAMW),
        ("MoE + MTP, torch.compile", dict(), True, None, True, ADAMW),
        ("dense, Muon", dict(n_routed_experts=0, n_mtp=0), False, None, False, MUON),
        ("MoE, Muon", dict(n_mtp=0), True, None, False, MUON),
        ("MoE + MTP, Muon", dict(), True, None, False, MUON),
        ("MoE + MTP, Muon, routed experts by AdamW", dict(), True, None, False, dict(MUON, muon_experts=False)),
        ("MoE, Muon, batch 24", dict(n_mtp=0, batch_size=24), True, None, False, MUON),
        ("dense, Muon, batch 24 (the fast preset)", dict(n_routed_experts=0, n_mtp=0, batch_size=24), False, None,
         False, MUON)]


def run(args):
    """Milliseconds per training step (forward, backward, optimizer, bias update) of the CPU preset's MoE
    model beside the dense model with the same activated FFN width (inter_dim = shared + k routed), timed
    interleaved in one process on the same batch: deepseek.py's reference MoE, kernels.install's paths with
    the routed experts by each of kernels.expert_gemm's choices, and the preset (installed, as train.py runs
    it) eager and under torch.compile; AdamW, and Muon (train.py's muon_rms and muon_momentum; the routed
    experts by Muon, or by AdamW); the rows with a batch of 24 run twice the tokens a step."""
    cfg = command_config("train.py", "shakespeare_char_cpu")
    batches = [{**cfg, **over}["batch_size"] for _, over, *_ in ROWS]    # each row the first rows of one batch
    x, y = torch.randint(0, 65, (2, max(batches), cfg["block_size"]), generator=torch.Generator().manual_seed(0))
    models = []
    for (name, over, install, path, compiled, opt), b in zip(ROWS, batches):
        torch.manual_seed(0)
        m = ds.Transformer(model_args_from({**cfg, **over}, 65)).train()
        if install:
            kernels.install(m, expert_gemm=path)
        opt = {**cfg, **opt}
        models.append((m, torch.compile(m) if compiled else m,
                       configure_optimizer(m, 1e-3, 0.1, (0.9, 0.99), "cpu", opt["optimizer"], opt["muon_rms"],
                                           opt["muon_momentum"], opt["muon_experts"]), b))

    def step(m, run, opt, b):
        run(x[:b], y[:b])[1]["total"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        m.update_expert_bias()
    times, _ = rounds([lambda m=m, run=run, opt=opt, b=b: step(m, run, opt, b) for m, run, opt, b in models],
                      args.step_repeats, warmup=3)
    print(f"step: CPU preset (batch {cfg['batch_size']} x {cfg['block_size']}), {torch.get_num_threads()} threads, "
          f"median of {args.step_repeats} interleaved steps")
    print("| model | active params | ms/step | vs dense |")
    print("|---|---:|---:|---:|")
    base = statistics.median(times[0])
    for (name, *_), (m, *_), t in zip(ROWS, models, times):
        print(f"| {name} | {m.num_params(active=True) / 1e6:.3f}M | {1000 * statistics.median(t):.1f} | "
              f"{statistics.median(t) / base:.2f}x |")
    ffn_floor(cfg, cfg["batch_size"] * cfg["block_size"], args.step_repeats)
    return {name: statistics.median(t) for (name, *_), t in zip(ROWS, times)}


def ffn_floor(cfg, N, repeats):
    """The GEMMs alone: one MoE layer's shared + routed experts (grouped GEMM over evenly loaded,
    pre-sorted copies: no gate, no dispatch) beside the dense FFN of the same active width, forward and
    backward on N tokens. What routing cannot get below on this machine."""
    a = model_args_from(cfg, 65)
    K, E = a.n_activated_experts, a.n_routed_experts
    dense, shared = ds.MLP(a.dim, a.inter_dim), ds.MLP(a.dim, a.n_shared_experts * a.moe_inter_dim)
    experts = ds.Experts(E, a.dim, a.moe_inter_dim)
    for p in [*dense.parameters(), *shared.parameters(), *experts.parameters()]:
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(N, a.dim, requires_grad=True)
    xs = x.detach().repeat(K, 1).requires_grad_()
    counts = torch.full((E,), N * K // E)
    rows = [("dense FFN", lambda: dense(x).square().sum().backward()),
            ("shared + routed experts",
             lambda: (shared(x).square().sum() + kernels.run_experts(experts, xs, counts).square().sum()).backward())]
    times, _ = rounds([f for _, f in rows], repeats, warmup=3)
    print(f"\nThe FFN GEMMs alone, forward + backward on {N} tokens ({K} of {E} experts each, evenly loaded)")
    print("| FFN | ms | vs dense |")
    print("|---|---:|---:|")
    for (name, _), t in zip(rows, times):
        print(f"| {name} | {1000 * statistics.median(t):.2f} | {statistics.median(t) / statistics.median(times[0]):.2f}x |")
