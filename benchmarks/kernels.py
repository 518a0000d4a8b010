"""bench.py --parts=kernels: the Triton routing kernels (kernels.py) compiled for each CUDA target without a
GPU (registers, spills, occupancy from Triton's own ptxas), and on a GPU timed against the PyTorch references."""
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import deepseek as ds
from benchmarks.common import V3_CONFIG, preset_args

CCS = (70, 75, 80, 86, 89, 90, 100, 120)    # V100, T4, A100, RTX 30xx, RTX 40xx / L4, H100, B200, RTX 50xx
MAX_WARPS = {70: 64, 75: 32, 80: 64, 86: 48, 89: 48, 90: 64, 100: 64, 120: 48}  # resident warps per SM; 64K registers each


def gate_shapes():
    """(name, ModelArgs) of the gates worth compiling: DeepSeek-V3's and the two presets'."""
    return [("V3", ds.ModelArgs.from_json(V3_CONFIG)), ("GPU preset", preset_args("shakespeare_char")),
            ("CPU preset", preset_args("shakespeare_char_cpu"))]


def occupancy(regs, warps, cc):
    """Fraction of an SM's warp slots that blocks of `warps` warps using `regs` registers a thread can
    fill: registers are given out per warp in units of 256, from 64K per SM."""
    per_warp = -(-regs * 32 // 256) * 256
    return min(MAX_WARPS[cc], 65536 // per_warp) // warps * warps / MAX_WARPS[cc]


def compile_launches(cc, fn, *args):
    """Compile for CUDA compute capability cc, without a GPU, each Triton kernel launch that fn(*args) makes (give
    it meta tensors), specialised as that launch would be: [(kernel name, CompiledKernel)]. kernels.py launches by
    torch.library.wrap_triton(kernel)[grid](...): while fn runs, that compiles instead. Needs TRITON_INTERPRET
    unset."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import native_specialize_impl          # the launcher's own specialisation
    backend, done = triton.backends.backends["nvidia"].compiler, []

    def compile_one(kernel, *a, num_warps=4, **cx):
        spec = [native_specialize_impl(backend, x, False, True, True) for x in a]   # (type, attribute)
        sig = {n: t for n, (t, _) in zip(kernel.arg_names, spec)} | dict.fromkeys(cx, "constexpr")
        cx |= {n: v for n, (t, v) in zip(kernel.arg_names, spec) if t == "constexpr"}   # ints equal to 1
        attrs = {(i,): backend.parse_attr(v) for i, (t, v) in enumerate(spec) if isinstance(v, str)}
        src = triton.compiler.ASTSource(kernel, sig, cx, attrs)
        done.append((kernel.__name__, triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                                     options=dict(num_warps=num_warps))))

    class Launch:                       # wrap_triton(kernel)[grid](*args): compile_one(kernel, *args)
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *a, **kw: compile_one(self.kernel, *a, **kw)
    wrap = torch.library.wrap_triton
    torch.library.wrap_triton = Launch
    try:
        fn(*args)
    finally:
        torch.library.wrap_triton = wrap
    return done


def compile_rows(ccs):
    """Compile each kernel at each gate shape for each compute capability (needs TRITON_INTERPRET and the
    Triton cache off, TRITON_DUMP_PTXAS_LOG=1): dicts of kernel, shape, cc, registers and spill bytes
    from Triton's own `ptxas -v`, warps, the PTX target and the cubin size."""
    import kernels
    rows = []
    meta = lambda *shape, dtype=torch.float32: torch.empty(*shape, dtype=dtype, device="meta")  # noqa: E731
    calls = []                                                # (shape, function, its arguments)
    for name, a in gate_shapes():
        E, k = a.n_routed_experts, a.n_activated_experts
        calls += [(name, kernels.route_triton, meta(4096, E), meta(E), k, a.n_expert_groups, a.n_limited_groups,
                   a.score_func), (name, kernels.dispatch_triton, meta(4096, k, dtype=torch.int32), E)]
    # a rank of expert_parallel.py dispatches over its experts + 1 (the last bucket: other ranks'), 257 at most for V3
    v3 = gate_shapes()[0][1]
    calls.append(("V3, E + 1", kernels.dispatch_triton, meta(4096, v3.n_activated_experts, dtype=torch.int32),
                  v3.n_routed_experts + 1))
    for cc in ccs:
        for name, fn, *call_args in calls:
            log = io.StringIO()
            with contextlib.redirect_stdout(log):             # Triton prints the ptxas log
                done = compile_launches(cc, fn, *call_args)
            for kname, ck in done:
                m = re.search(rf"function '{kname}'.*?(\d+) bytes spill stores, (\d+) bytes spill loads"
                              r".*?Used (\d+) registers", log.getvalue(), re.S)
                rows.append(dict(kernel=kname, shape=name, cc=cc, regs=int(m[3]), spills=int(m[1]) + int(m[2]),
                                 warps=ck.metadata.num_warps, target=re.search(r"\.target (\w+)", ck.asm["ptx"])[1],
                                 cubin=len(ck.asm["cubin"])))
    return rows


def compile_kernels(ccs=CCS):
    """compile_rows in a fresh process: no GPU needed, and no interpreter (TRITON_INTERPRET unset)."""
    with tempfile.TemporaryDirectory() as cache:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(TRITON_CACHE_DIR=cache, TRITON_DUMP_PTXAS_LOG="1")
        code = f"from benchmarks import kernels; import json; print(json.dumps(kernels.compile_rows({tuple(ccs)!r})))"
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(__file__).parent.parent,
                             capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"kernel compile failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def run(args):
    """Without a GPU: registers, spills and occupancy of each kernel compiled for each CUDA target.
    On a GPU also a markdown table: microseconds of the reference and the Triton kernel, speed-up,
    and the achieved bandwidth against the bytes that must move (fp32 scores, sigmoid gate)."""
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
        return rows
    import triton.testing
    import kernels
    device, do_bench = "cuda", triton.testing.do_bench
    (_, v3), (_, nano), _ = gate_shapes()
    print("| op | shape (T, E, k, groups) | ref µs | triton µs | speed-up | ref GB/s | triton GB/s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, a, T in [("V3", v3, 4096), ("V3", v3, 16384), ("V3", v3, 65536), ("GPU preset", nano, 16384)]:
        torch.manual_seed(0)
        E, k, G, KG = a.n_routed_experts, a.n_activated_experts, a.n_expert_groups, a.n_limited_groups
        gate = ds.Gate(a).to(device)
        gate.bias.normal_(0, 0.01)
        s = gate.scores(torch.randn(T, E, device=device))
        ids = gate.route(s)
        sorted_dispatch = lambda: (ids.flatten().bincount(minlength=E), ids.flatten().argsort(stable=True))  # noqa: E731
        ops = [
            # op, ref fn, triton fn, bytes: scores + bias read, ids written
            ("route", lambda: gate.route(s), lambda: kernels.route_triton(s, gate.bias, k, G, KG, a.score_func),
             4 * T * E + 4 * E + 4 * T * k),
            # ids read; counts, perm written (int64)
            ("dispatch", sorted_dispatch, lambda: kernels.dispatch_triton(ids, E), 4 * T * k + 8 * E + 8 * T * k),
        ]
        # correctness first: dispatch must be identical; gate ids may differ only on fp32 ties
        same_ids = (ops[0][2]().sort(-1)[0] == ids.sort(-1)[0]).all(-1).float().mean().item()
        assert all(torch.equal(x, y) for x, y in zip(kernels.dispatch_triton(ids, E), sorted_dispatch()))
        for op, ref, tri, nbytes in ops:
            with torch.no_grad():
                t_ref, t_tri = do_bench(ref) * 1e3, do_bench(tri) * 1e3  # ms -> µs
            print(f"| {op} | {name} ({T}, {E}, {k}, {G}/{KG}) | {t_ref:.1f} | {t_tri:.1f} | {t_ref / t_tri:.1f}x | "
                  f"{nbytes / t_ref / 1e3:.0f} | {nbytes / t_tri / 1e3:.0f} |")
        if same_ids < 1:
            print(f"note: {name} T={T}: {100 * (1 - same_ids):.3f}% of tokens chose differently (fp32 ties)")
    return rows
