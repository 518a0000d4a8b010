"""bench.py --parts=fp8 and --parts=ep: the systems features of the report's §3, each beside the plain model.
fp8: the CPU preset trained in FP8 (fp8.py) and in fp32, and the activations each keeps for the backward;
ep: the all-to-all volume of expert parallelism (expert_parallel.py) with and without the node limit."""
import json
import tempfile
from pathlib import Path

import torch

import deepseek as ds
import kernels
from benchmarks.ablation import train_row
from benchmarks.common import gpu_speed, preset_args
from checkpoint.ckpt import load_checkpoint
from systems import fp8
from systems.expert_parallel import all_to_all_volume, shard_experts


# ----------------------------------------------------------------------------- fp8

def fp8_saved_bytes(args, B=4):
    """Bytes per token that the FP8 linear layers of a model keep for the backward: each layer's input as
    E4M3 plus one fp32 scale per 1x128 tile, against fp32 autograd's 4 bytes a number, where layers that
    read the same tensor (w1 and w3, wq and wkv_a) share one saved copy. Counted on one forward."""
    model, inputs, linear = fp8.convert(ds.Transformer(args).train()), [], fp8.linear
    idx = torch.randint(0, args.vocab_size, (B, args.max_seq_len))
    fp8.linear = lambda x, w, ops: inputs.append(x) or linear(x, w, ops)      # every FP8 layer's input, as it comes
    try:
        model(idx, idx)
    finally:
        fp8.linear = linear
    quantized = sum(x.numel() + 4 * (x.numel() // x.size(-1)) * -(-x.size(-1) // fp8.TILE) for x in inputs)
    full = 4 * sum({(x.data_ptr(), x.shape): x.numel() for x in inputs}.values())
    return quantized / idx.numel(), full / idx.numel()


def bench_fp8(args):
    """The CPU preset trained with fp8=True beside the same run in fp32 (same seed, data and steps):
    best val loss, step time, and the activations kept for the backward by the linear layers."""
    root, iters = Path(args.out), min(args.iters, 50) if args.quick else args.iters
    a, b = (train_row(args, root, name, over, 0, iters, "fp8") for name, over in [("fp32", {}), ("fp8", {"fp8": True})])
    model, _ = load_checkpoint(b["out"] / "ckpt.pt")
    per_token_fp8, per_token_fp32 = fp8_saved_bytes(model.args)
    print(f"\nfp8: char-level Tiny Shakespeare (config/shakespeare_char_cpu.py), {iters} steps, seed 1337, "
          f"{torch.get_num_threads()} CPU threads; {fp8.describe('cpu')}")
    print("| run | best val loss | vs fp32 | ms/step | step time vs fp32 | linear-layer activations kept, bytes/token |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| fp32 | {a['best']:.4f} | | {1000 * a['step_s']:.0f} | 1.00x | {per_token_fp32:,.0f} |")
    print(f"| fp8 (E4M3, 1x128 / 128x128 scales) | {b['best']:.4f} | {(b['best'] - a['best']) / a['best']:+.2%} | "
          f"{1000 * b['step_s']:.0f} | {b['step_s'] / a['step_s']:.2f}x | {per_token_fp8:,.0f} ({per_token_fp8 / per_token_fp32:.2f}x) |")
    fp8_gpu_speed(args)
    return a, b


def fp8_gpu_speed(args):
    """Tokens/s of config/shakespeare_char.py on this GPU in bf16 autocast and with fp8=True, eager and compiled
    (where the two combine: train.py's check_config), 60 steps each; labelled with the GEMM path FP8 took."""
    if not torch.cuda.is_available():
        print("fp8: no CUDA GPU here: FP8 vs bf16 tokens/s not measured")
        return
    runs = [("bf16", []), ("bf16, compiled", ["--compile=True"]), ("fp8", ["--fp8=True"])]
    if torch.cuda.get_device_capability() >= fp8.FP8_CC:
        runs.append(("fp8, compiled", ["--fp8=True", "--compile=True"]))
    speed = {name: gpu_speed(args, name.replace(", ", "-"), ["--dtype=bfloat16", *extra])["tokens_per_s"]
             for name, extra in runs}
    with torch.device("meta"):                                    # the preset's model, as train.py builds it
        model = kernels.install(ds.Transformer(preset_args("shakespeare_char")))
    print(f"fp8: {torch.cuda.get_device_name()}, config/shakespeare_char.py, 60 steps each; "
          f"{kernels.describe(model, 'cuda', torch.bfloat16)}; {fp8.describe('cuda')}")
    print("| run | tokens/s | vs bf16 |\n|---|---:|---:|")
    for name, v in speed.items():
        print(f"| {name} | {v:,.0f} | {v / speed['bf16']:.2f}x |")


# ----------------------------------------------------------------------------- expert parallelism

# a nano model's MoE (16 experts, top-4, dim 256) with one expert group per rank
EP_MODEL = dict(vocab_size=256, dim=256, inter_dim=768, moe_inter_dim=128, n_layers=3, n_dense_layers=1, n_heads=8,
                n_routed_experts=16, n_shared_experts=1, n_activated_experts=4, q_lora_rank=96, kv_lora_rank=64,
                qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_mtp=0)


def ep_volume(rank, world, store, out, batches):
    """One rank (gloo on CPU): the same weights run with every node limit M = world .. 1 over the same
    random tokens; rank 0 writes the all-to-all volume summed over the ranks to `out`."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    rows = []
    for M in range(world, 0, -1):
        torch.manual_seed(0)
        model = ds.Transformer(ds.ModelArgs(**EP_MODEL, n_expert_groups=world, n_limited_groups=M))
        shard_experts(model, world)
        g = torch.Generator().manual_seed(rank)
        with torch.no_grad():                   # training mode: the layers count their traffic
            for _ in range(batches):
                model(torch.randint(EP_MODEL["vocab_size"], (8, 64), generator=g))
        v, _ = all_to_all_volume(model, batches, "cpu")
        rows.append(dict(M=M, sends=v["a2a_sends_per_token"], copies=v["a2a_copies_per_token"],
                         bytes_per_token=v["a2a_bytes_per_step"] / (world * 8 * 64)))
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def bench_ep(args):
    """Markdown table: token sends to other ranks per token and bytes per token with the node limit M
    (n_limited_groups, one expert group per rank) from M = world down to 1, at the same weights."""
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
