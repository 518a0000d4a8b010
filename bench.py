"""Benchmarks, one function per part.

    python bench.py --parts kernels      # the Triton MoE gate / dispatch vs the PyTorch references
"""
import argparse

import torch


# ----------------------------------------------------------------------------- kernels

# (name, T tokens, E experts, k, groups, groups kept): V3's gate at three batch sizes, and the nano model's
KERNEL_SHAPES = [
    ("V3", 4096, 256, 8, 8, 4),
    ("V3", 16384, 256, 8, 8, 4),
    ("V3", 65536, 256, 8, 8, 4),
    ("nano", 12 * 64, 16, 2, 4, 2),
]


def bench_kernels(args):
    """Markdown table: microseconds of the reference and the Triton kernel, speed-up, and the
    achieved bandwidth against the bytes that must move (fp32 logits, sigmoid gate)."""
    if not torch.cuda.is_available():
        print("kernels: needs a CUDA GPU, skipped")
        return
    import triton.testing
    _bench_kernels_on("cuda", triton.testing.do_bench)


def _bench_kernels_on(device, do_bench):
    import kernels
    print("| op | shape (T, E, k, groups) | ref µs | triton µs | speed-up | ref GB/s | triton GB/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, T, E, k, G, KG in KERNEL_SHAPES:
        torch.manual_seed(0)
        logits = torch.randn(T, E, device=device)
        bias = 0.01 * torch.randn(E, device=device)
        ids = kernels.route_ref(logits, bias, k, G, KG, "sigmoid", 2.5)[1]
        gate = lambda fn: fn(logits, bias, k, G, KG, "sigmoid", 2.5)  # noqa: E731
        rows = [
            # op, ref fn, triton fn, bytes: logits + bias read, weights + ids written
            ("route", lambda: gate(kernels.route_ref), lambda: gate(kernels.route_triton),
             4 * T * E + 4 * E + 8 * T * k),
            # ids read; counts, offsets, perm, inv written (int64)
            ("dispatch", lambda: kernels.dispatch_ref(ids, E), lambda: kernels.dispatch_triton(ids, E),
             4 * T * k + 8 * (2 * E + 1) + 16 * T * k),
        ]
        # correctness first: dispatch must be identical; gate ids may differ only on fp32 near-ties
        same_ids = (gate(kernels.route_triton)[1] == ids).all(-1).float().mean().item()
        assert all(torch.equal(a, b) for a, b in zip(kernels.dispatch_triton(ids, E), kernels.dispatch_ref(ids, E)))
        for op, ref, tri, nbytes in rows:
            with torch.no_grad():
                t_ref, t_tri = do_bench(ref) * 1e3, do_bench(tri) * 1e3  # ms -> µs
            shape = f"{name} ({T}, {E}, {k}, {G}/{KG})"
            print(f"| {op} | {shape} | {t_ref:.1f} | {t_tri:.1f} | {t_ref / t_tri:.1f}x | "
                  f"{nbytes / t_ref / 1e3:.0f} | {nbytes / t_tri / 1e3:.0f} |")
        if same_ids < 1:
            print(f"note: {name} T={T}: {100 * (1 - same_ids):.3f}% of tokens chose differently (fp32 near-ties)")


# ----------------------------------------------------------------------------- main

PARTS = {"kernels": bench_kernels}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of: {', '.join(PARTS)}")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
    for part in parts:
        PARTS[part](args)


if __name__ == "__main__":
    main()
