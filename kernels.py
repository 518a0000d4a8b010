"""The fast paths of DeepSeek-V3's MoE layer. install(model) puts them into a built deepseek.Transformer (as
fp8.convert does FP8), and each computes what deepseek.py's reference computes:

    Gate.route: route_triton(s, bias, ...) -> ids      the top-k of eqs. 14-16 in one Triton kernel (CUDA)
    MoE.routed: dispatch(ids, E) -> counts, perm       the (token, expert) pairs sorted by expert (Triton on CUDA)
                run_experts(experts, x, counts)        each projection of all experts as one GEMM, by the path
                                                       expert_gemm chooses per device (torch._grouped_mm / bmm)

The reference loops over experts, one host sync each; this path has none where the fused GEMM runs. Ties: the
kernel takes the lower expert (and group) index among exactly equal scores, where the reference's torch.topk may
take any. The Triton kernels are torch ops (torch.library.triton_op), so torch.compile sees through them. Without
a GPU they run under TRITON_INTERPRET=1 (set before triton is imported), which is how the tests check them
(benchmarks/kernels.py compiles them for each CUDA target, no GPU needed). describe says what a device runs.
"""
import functools
import sys

import torch
import torch.nn.functional as F

import deepseek

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # e.g. Mac / Windows: the PyTorch paths are used
    HAS_TRITON = False

MIN_CC = (7, 0)     # Volta on: the kernels compile for sm_70 up (tested), PyTorch's own floor for Triton
GATE_TILE = 1024    # token rows x padded experts per gate program: 8 values a thread at 4 warps


def install(model, expert_gemm=None):
    """The fast paths in every gate and MoE layer of a built deepseek.Transformer (the same modules, weights and
    names; a checkpoint loads either way). expert_gemm: None, the path expert_gemm chooses for the device and
    dtype each forward runs on; "grouped_mm", "padded" or "loop" forces that one (the bench and the tests set
    it to compare them). Returns model."""
    for m in model.modules():
        if type(m) is deepseek.Gate:
            m.__class__ = Gate
        elif type(m) is deepseek.MoE:
            m.__class__ = MoE
        if isinstance(m, MoE):
            m.expert_gemm = expert_gemm
    return model


class Gate(deepseek.Gate):
    """deepseek.Gate choosing by one Triton kernel on a CUDA GPU that can run it (elsewhere by the reference)."""

    def route(self, s):
        if not enabled(s):
            return super().route(s)
        return route_triton(s, self.bias, self.topk, self.n_groups, self.topk_groups, self.score_func).long()


class MoE(deepseek.MoE):
    """deepseek.MoE with its (token, expert) pairs sorted by expert: one gather of the tokens into expert order,
    each projection of all experts as one GEMM, the outputs added back into their rows times their gate values
    (index_select and index_add: each the other's backward). expert_gemm: install's."""
    expert_gemm = None

    def routed(self, x, g, ids):
        (N, D), K = x.shape, ids.size(1)
        counts, perm = dispatch(ids, self.args.n_routed_experts)
        rows = perm // K                                            # the row of each pair, in expert order
        ys = run_experts(self.experts, x.index_select(0, rows), counts, self.expert_gemm)
        gp = g.flatten()[perm].type_as(ys).unsqueeze(-1)            # and its gate value
        return ys.new_zeros(N, D).index_add(0, rows, gp * ys), counts


def fallback_reason(has_triton, capability):
    """Why a CUDA GPU of this compute capability cannot run the kernels ("" when it can)."""
    if not has_triton:
        return "triton is not installed"
    if tuple(capability) < MIN_CC:
        return "compute capability %d.%d is below %d.%d" % (*capability, *MIN_CC)
    return ""


@torch.compiler.assume_constant_result     # torch.compile: a constant, not traced
@functools.cache
def _runs_on(device):
    reason = fallback_reason(HAS_TRITON, torch.cuda.get_device_capability(device))
    if reason:  # once per device
        print(f"warning: {reason}: the MoE routing falls back to PyTorch", file=sys.stderr)
    return not reason


def enabled(t):
    """Whether the kernels run for tensor t: on a CUDA GPU that can run them (one warning line if not)."""
    return t.is_cuda and _runs_on(t.device)


# ----------------------------------------------------------------------------- dispatch

def dispatch(ids, n_experts):
    """Group the (token, slot) pairs by expert: ids (T, k) -> counts (E,), perm (T*k,), int64: pair perm[j] (a flat
    index t*k + slot) is the j-th in expert order, expert 0's first, pairs of one expert in token order (a stable
    sort). dispatch_triton on a GPU that runs the kernels; counts of a fixed size (torch.compile: no bincount)."""
    if enabled(ids):
        return dispatch_triton(ids, n_experts)
    flat = ids.flatten().long()
    counts = flat.new_zeros(n_experts).index_add_(0, flat, torch.ones_like(flat))
    return counts, torch.argsort(flat, stable=True)


# ----------------------------------------------------------------------------- the routed experts' GEMMs

def expert_gemm(device_type, capability, dtype, version):
    """How run_experts multiplies on a device (compute capability, compute dtype, torch version (major, minor)):
      "grouped_mm": one torch._grouped_mm per projection, no host sync: on CUDA where it is one fused kernel
                    (bf16 on compute capability 9.x from torch 2.8, 10.x from 2.9), and on a CPU from torch 2.9
                    in 32 and 16 bits (bench.py --parts=step: it beats both others there);
      "padded":     three batched matmuls over the experts' rows padded to the fullest expert, one host sync (its
                    size): elsewhere on CUDA, where _grouped_mm is a loop that reads its offsets on the host in
                    every call (9 host syncs per MoE layer and step) or raises (torch 2.8);
      "loop":       one expert at a time (deepseek.Experts), one host sync (MPS, and torch without either op)."""
    if device_type == "cpu":
        return "grouped_mm" if version >= (2, 9) and dtype in (torch.float32, torch.bfloat16, torch.float16) else "loop"
    fused = dtype == torch.bfloat16 and (capability[0] == 9 and version >= (2, 8) or capability[0] == 10 and version >= (2, 9))
    return "grouped_mm" if device_type == "cuda" and fused else "padded" if device_type == "cuda" else "loop"


@torch.compiler.assume_constant_result     # torch.compile: a constant, not traced
@functools.cache                           # once per device and dtype, not per layer and step
def expert_gemm_here(device, dtype):
    """expert_gemm on this device, and whether the fused op's gradients of experts with no rows need zeroing (on
    compute capability 10.x it reports non-zero ones: pytorch#172439)."""
    cc = torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)
    path = expert_gemm(device.type, cc, dtype, tuple(int(v) for v in torch.__version__.split(".")[:2]))
    return path, path == "grouped_mm" and cc[0] == 10


def run_experts(experts, x, counts, path=None):
    """Each expert of a deepseek.Experts on its rows of x (N, dim), sorted by expert, counts (E,) rows each, by
    `path`, or with None the path expert_gemm chooses for this device and compute dtype (the autocast one when
    autocast is on, as F.linear would run). Experts of another kind (fp8.Experts) run one at a time, each by its
    own forward."""
    dtype = compute_dtype(x)
    path, zero_empty = (path, False) if path else expert_gemm_here(x.device, dtype)
    if path == "grouped_mm" and any(d * dtype.itemsize % 16 for d in experts.w1.shape[1:]):  # 16-byte rows
        path = "padded"
    if type(experts) is not deepseek.Experts or path == "loop":
        return torch.cat([experts(xe, i) for i, xe in enumerate(x.split(counts.tolist()))])
    if path == "grouped_mm":
        return grouped_experts(x, counts, experts.w1, experts.w2, experts.w3, zero_empty)
    return padded_experts(x, counts, experts.w1, experts.w2, experts.w3)


def describe(model, device, dtype):
    """Which implementation the MoE layers of model run on device with this compute dtype, in words (train.py and
    sample.py print it): deepseek.py's reference, or install's paths."""
    moes = [m for m in model.modules() if isinstance(m, deepseek.MoE)]
    if not moes:
        return "MoE: none (a dense model)"
    if all(type(m) is deepseek.MoE for m in moes):
        return "MoE: deepseek.py's reference (a loop over experts, one host sync each)"
    device = torch.device(device)
    routing = "Triton kernels" if enabled(torch.empty(0, device=device)) else "PyTorch"
    path = moes[0].expert_gemm or expert_gemm_here(device, dtype)[0]
    if any(type(m.experts) is not deepseek.Experts for m in moes):     # fp8.Experts: run_experts' loop
        path = "loop"
    return f"MoE (kernels.py): routing by {routing}; routed experts by " + dict(
        grouped_mm=f"torch._grouped_mm{', one fused kernel a projection' if device.type == 'cuda' else ''}",
        padded="batched GEMMs over padded rows (one host sync a layer)",
        loop="a loop over experts (one host sync a layer)")[path]


def compute_dtype(x):
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def grouped_experts(x, counts, w1, w2, w3, zero_empty=False):
    """The experts with one torch._grouped_mm per projection over all of them: x (N, dim) sorted by expert,
    counts (E,) rows each; the group ends stay on the device. zero_empty: the weights of experts with no rows get
    a zero gradient whatever _grouped_mm reports there (on B200 it leaves memory unset: pytorch#172439)."""
    dtype, ends = compute_dtype(x), counts.cumsum(0).int()
    if zero_empty:
        empty = counts == 0
        w1, w2, w3 = (ZeroGradWhere.apply(w, empty) for w in (w1, w2, w3))
    grouped_mm = torch._grouped_mm if dtype == torch.bfloat16 else grouped_mm_eager
    mm = lambda a, w: grouped_mm(a, w.to(dtype).transpose(-2, -1), offs=ends)   # noqa: E731
    x = x.to(dtype)
    return mm(F.silu(mm(x, w1)) * mm(x, w3), w2)


class ZeroGradWhere(torch.autograd.Function):
    """w itself forward; backward its gradient with the experts where `empty` is set replaced by zeros: a
    selection, so NaN or Inf left there becomes 0 (a product with a 0/1 mask would keep NaN), and no copy of w."""

    @staticmethod
    def forward(ctx, w, empty):
        ctx.save_for_backward(empty)
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad):
        (empty,) = ctx.saved_tensors
        return grad.masked_fill(empty.view(-1, 1, 1), 0), None


@torch.compiler.disable     # torch.compile: the meta function of _grouped_mm takes bf16 only
def grouped_mm_eager(a, b, offs):
    return torch._grouped_mm(a, b, offs=offs)


def padded_experts(x, counts, w1, w2, w3):
    """The experts as three batched matmuls: expert e's rows at e * C.., C the largest count (the one host sync),
    zeros after them."""
    (N, D), E, C = x.shape, counts.numel(), int(counts.max())
    dtype, starts = compute_dtype(x), counts.cumsum(0) - counts
    expert = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=N)
    slot = expert * C + torch.arange(N, device=x.device) - starts[expert]           # row i's place in (E * C)
    x = x.to(dtype)
    xp = x.new_zeros(E * C, D).index_copy(0, slot, x).view(E, C, D)
    bmm = lambda a, w: a @ w.to(dtype).transpose(-2, -1)    # noqa: E731
    return bmm(F.silu(bmm(xp, w1)) * bmm(xp, w3), w2).flatten(0, 1).index_select(0, slot)


# ----------------------------------------------------------------------------- Triton kernels

if HAS_TRITON:

    @triton.jit
    def _route_kernel(s_ptr, bias_ptr, ids_ptr, T, stride_t, stride_e,
                      G: tl.constexpr, S: tl.constexpr, GP: tl.constexpr, SP: tl.constexpr,
                      K: tl.constexpr, KP: tl.constexpr, KG: tl.constexpr,
                      SIGMOID: tl.constexpr, BLOCK_T: tl.constexpr):
        """BLOCK_T token rows per program. A row of E = G*S experts is held as a (GP, SP) tile
        (groups x experts-in-group, padded to powers of two), so the tile is (BLOCK_T, GP, SP)."""
        NONE: tl.constexpr = GP * SP                                   # "no expert": sorts after all
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        r = rows.to(tl.int64)[:, None, None]                           # (BT, 1, 1)
        g = tl.arange(0, GP)[None, :, None]                            # (1, GP, 1) group
        j = tl.arange(0, SP)[None, None, :]                            # (1, 1, SP) expert in group
        real = (g < G) & (j < S)                                       # not padding
        eid = tl.where(real, g * S + j, NONE)                          # expert index
        # 1. the bias only chooses: sel = s + b in fp32, made finite (NaN lowest; a sum of two stays
        #    finite) so that -inf marks only padding, dropped groups and taken experts: each pick is
        #    real and new
        s = tl.load(s_ptr + r * stride_t + (g * S + j) * stride_e, mask=real & (r < T), other=0.0)
        sel = s.to(tl.float32) + tl.load(bias_ptr + g * S + j, mask=real, other=0.0).to(tl.float32)
        sel = tl.where(sel == sel, tl.minimum(tl.maximum(sel, -1e30), 1e30), -1e30)
        sel = tl.where(real, sel, float("-inf"))
        # 2. group-limited routing: group score = sum of its two best biased scores (V3, sigmoid),
        #    or its best score (V2, softmax)
        if G > 1:
            gscore = tl.max(sel, 2)                                                    # (BT, GP)
            if SIGMOID and S > 1:
                first = tl.min(tl.where(sel == gscore[:, :, None], eid, NONE), 2)      # where the best sits
                gscore += tl.max(tl.where(eid == first[:, :, None], float("-inf"), sel), 2)  # + best of the rest
            gid = tl.arange(0, GP)[None, :]
            gscore = tl.where(gid < G, gscore, float("-inf"))
            keep = tl.zeros((BLOCK_T, GP), tl.int32)
            for _ in tl.static_range(KG):                  # keep the KG best groups, ties -> lower group
                best = tl.max(gscore, 1)
                pick = tl.min(tl.where(gscore == best[:, None], gid, GP), 1)
                keep = tl.where(gid == pick[:, None], 1, keep)
                gscore = tl.where(gid == pick[:, None], float("-inf"), gscore)
            sel = tl.where(keep[:, :, None] != 0, sel, float("-inf"))  # -inf, never 0 (see Gate.route)
        # 3. top-k by repeated argmax; ties -> lower expert index
        kid = tl.arange(0, KP)[None, :]
        ids = tl.zeros((BLOCK_T, KP), tl.int32)
        for i in tl.static_range(K):
            best = tl.max(tl.max(sel, 2), 1)
            pick = tl.min(tl.min(tl.where(sel == best[:, None, None], eid, NONE), 2), 1)
            sel = tl.where(eid == pick[:, None, None], float("-inf"), sel)       # taken
            ids = tl.where(kid == i, pick[:, None], ids)
        out = rows.to(tl.int64)[:, None] * K + kid
        tl.store(ids_ptr + out, ids, mask=(rows[:, None] < T) & (kid < K))

    @triton.jit
    def _load_ids(ids_ptr, offs, ok, E: tl.constexpr):
        """Expert ids of pairs offs, clamped into [0, E): whatever the ids, the dispatch kernels
        stay inside their buffers (the gate never gives others)."""
        return tl.minimum(tl.maximum(tl.load(ids_ptr + offs, mask=ok, other=0), 0), E - 1)

    @triton.jit
    def _count_kernel(ids_ptr, bc_ptr, N, NB, EP: tl.constexpr, E: tl.constexpr, BLOCK: tl.constexpr):
        """Program b counts how many of pairs [b*BLOCK, (b+1)*BLOCK) go to each expert: bc[e, b]. A
        compare-and-sum over (BLOCK, EP) tiles, EP <= 256 experts at a time (tl.histogram takes no mask
        in older Triton; a wider tile spills registers)."""
        b = tl.program_id(0)
        offs = b * BLOCK + tl.arange(0, BLOCK)
        ok = offs < N
        e = _load_ids(ids_ptr, offs, ok, E)
        for c in tl.static_range(0, E, EP):
            col = c + tl.arange(0, EP)
            h = tl.sum(((e[:, None] == col[None, :]) & ok[:, None]).to(tl.int32), 0)
            tl.store(bc_ptr + col * NB + b, h, mask=col < E)

    @triton.jit
    def _scatter_kernel(ids_ptr, start_ptr, perm_ptr, N, NB, E: tl.constexpr, BLOCK: tl.constexpr):
        """Pair p (expert e, block b) lands at start[e, b] + (# earlier pairs of its block with
        expert e). start[e, b] already counts expert < e and same expert in blocks < b: stable."""
        b = tl.program_id(0)
        i = tl.arange(0, BLOCK)
        offs = b * BLOCK + i
        ok = offs < N
        e = _load_ids(ids_ptr, offs, ok, E)                 # the lanes past N come last: no rank effect
        earlier_same = (e[:, None] == e[None, :]) & (i[None, :] < i[:, None])   # (BLOCK, BLOCK)
        rank = tl.sum(earlier_same.to(tl.int32), 1)
        pos = tl.load(start_ptr + e * NB + b, mask=ok, other=0) + rank
        tl.store(perm_ptr + pos, offs.to(tl.int64), mask=ok)


def gate_config(n_experts, topk, n_groups, topk_groups, score_func):
    """The gate kernel's constexprs: from the expert shape only, so a new T compiles nothing."""
    S = n_experts // n_groups
    GP, SP = triton.next_power_of_2(n_groups), triton.next_power_of_2(S)
    return dict(G=n_groups, S=S, GP=GP, SP=SP, K=topk, KP=triton.next_power_of_2(topk),
                KG=topk_groups if n_groups > 1 else 1, SIGMOID=score_func == "sigmoid",
                BLOCK_T=max(1, GATE_TILE // (GP * SP)))


def triton_op(name):
    """torch.library.triton_op: a torch op torch.compile sees into. Registered only where Triton is installed (the
    registration looks for the Triton kernels, and warns on every import without it); never called elsewhere."""
    return torch.library.triton_op(name, mutates_args=()) if HAS_TRITON else lambda fn: fn


@triton_op("deepseek::route")
def route_triton(s: torch.Tensor, bias: torch.Tensor, topk: int, n_groups: int = 1, topk_groups: int = 1,
                 score_func: str = "sigmoid") -> torch.Tensor:
    """The experts deepseek.Gate.route chooses from the affinities s (T, E), one kernel launch: ids (T, topk)
    int32, in [0, E) and distinct whatever the scores (NaN, +-inf); among equal scores the lower index."""
    T, E = s.shape
    kept = topk_groups * E // n_groups if n_groups > 1 else E   # experts left after the group limit
    assert E % n_groups == 0 and topk_groups <= n_groups and topk <= kept
    ids = torch.empty(T, topk, dtype=torch.int32, device=s.device)
    cfg = gate_config(E, topk, n_groups, topk_groups, score_func)
    if T > 0:
        grid = (triton.cdiv(T, cfg["BLOCK_T"]),)     # wrap_triton: torch.compile sees the launch, no graph break
        torch.library.wrap_triton(_route_kernel)[grid](s, bias.contiguous(), ids, T, s.stride(0), s.stride(1), **cfg)
    return ids


@triton_op("deepseek::dispatch")
def dispatch_triton(ids: torch.Tensor, n_experts: int, BLOCK: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """dispatch's outputs (counts, perm; int64), bit-identical, deterministic (no atomics): 1) per-block counts
    bc[e, b]; 2) exclusive prefix sum over bc in (expert, block) order = where each block starts writing each
    expert; 3) each pair goes to its start + rank in block. Ids outside [0, E) count as the nearest expert: no
    input makes it write outside its buffers."""
    flat = ids.flatten().int()  # no copy for the kernel's int32 ids
    N, E = flat.numel(), n_experts
    NB = triton.cdiv(N, BLOCK)
    bc = torch.zeros(E, NB, dtype=torch.int32, device=flat.device)
    if NB > 0:
        torch.library.wrap_triton(_count_kernel)[(NB,)](flat, bc, N, NB, EP=min(triton.next_power_of_2(E), 256), E=E,
                                                         BLOCK=BLOCK)
    bc = bc.flatten()
    start = bc.cumsum(0) - bc                    # int64, exclusive prefix sum in (expert, block) order
    counts = bc.view(E, NB).sum(1)
    perm = torch.empty(N, dtype=torch.int64, device=flat.device)
    if NB > 0:
        torch.library.wrap_triton(_scatter_kernel)[(NB,)](flat, start, perm, N, NB, E=E, BLOCK=BLOCK)
    return counts, perm
