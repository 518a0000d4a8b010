"""MoE routing for DeepSeek-V3: a fused gate and a token dispatch, each as a plain
PyTorch reference that defines its meaning (and runs everywhere) beside a Triton kernel
used on a GPU.

    route(logits, bias, ...)  -> weights (T, k), ids (T, k)   gating top-k, eqs. 13-16
    dispatch(ids, n_experts)  -> counts, offsets, perm, inv   group the (token, slot) pairs by expert

The Triton versions (route_triton, dispatch_triton) give the same ids / permutations and the
same weights up to fp32 rounding. Without a GPU they still run under TRITON_INTERPRET=1 (set it
before triton is imported); without triton installed this file falls back to the references.
"""
import functools
import sys

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # e.g. Mac / Windows: the references are used
    HAS_TRITON = False


# ----------------------------------------------------------------------------- gate

def gate_scores(logits, score_func):
    """Token-to-expert affinity s_i (eq. 15): sigmoid in V3, softmax in V2. fp32 always."""
    logits = logits.float()
    return logits.sigmoid() if score_func == "sigmoid" else logits.softmax(dim=-1)


def gate_weights(scores, ids, score_func, route_scale):
    """Gate values g_i of the chosen experts: their *unbiased* scores, normalised to sum 1
    for sigmoid (eq. 13), times route_scale. Differentiable w.r.t. scores."""
    w = scores.gather(1, ids.long())
    if score_func == "sigmoid":
        w = w / w.sum(dim=-1, keepdim=True)
    return w * route_scale


def route_ref(logits, bias, topk, n_groups=1, topk_groups=1, score_func="sigmoid", route_scale=1.0):
    """Reference gate. logits (T, E) -> weights (T, topk) fp32, ids (T, topk) int32.
    The bias b only chooses experts (aux-loss-free balancing, §2.1.2); it never enters the weights.
    Ties go to the lower expert (and group) index: stable sorts instead of topk."""
    scores = gate_scores(logits, score_func)
    biased = scores + bias
    if n_groups > 1:
        T, E = biased.shape
        grouped = biased.view(T, n_groups, E // n_groups)
        # group score = sum of the two best biased scores in the group (V3)
        group_scores = grouped.sort(dim=-1, descending=True)[0][..., :2].sum(dim=-1)
        keep = group_scores.sort(dim=-1, descending=True, stable=True)[1][:, :topk_groups]
        dropped = torch.ones(T, n_groups, dtype=torch.bool, device=logits.device).scatter_(1, keep, False)
        # -inf, not 0: a zeroed sigmoid score could still beat a kept one with a negative bias
        biased = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).view(T, E)
    ids = biased.sort(dim=-1, descending=True, stable=True)[1][:, :topk].int()
    return gate_weights(scores, ids, score_func, route_scale), ids


# ----------------------------------------------------------------------------- dispatch

def dispatch_ref(ids, n_experts):
    """Reference dispatch. ids (T, k) -> counts (E,), offsets (E+1,), perm (T*k,), inv (T*k,), all int64.
    perm lists the flat (token, slot) pair indices ordered by expert, stably, so expert e owns
    perm[offsets[e]:offsets[e+1]]; inv[j] is where pair j landed (perm[inv] == arange)."""
    flat = ids.flatten().long()
    counts = torch.bincount(flat, minlength=n_experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    perm = torch.argsort(flat, stable=True)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return counts, offsets, perm, inv


# ----------------------------------------------------------------------------- Triton kernels

MIN_CC = (7, 0)     # Volta: the kernels compile from sm_70 on (tested), PyTorch's own floor for Triton
GATE_TILE = 1024    # token rows x padded experts per gate program: 8 values a thread at 4 warps (few registers)

if HAS_TRITON:

    @triton.jit
    def _route_kernel(logits_ptr, bias_ptr, w_ptr, ids_ptr, T, stride_t, stride_e, route_scale,
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
        # 1. scores s = sigmoid / softmax of the logits, in fp32; padding gets -inf logits -> s = 0
        x = tl.load(logits_ptr + r * stride_t + (g * S + j) * stride_e, mask=real & (r < T), other=0.0)
        x = tl.where(real, x.to(tl.float32), float("-inf"))
        if SIGMOID:
            s = tl.sigmoid(x)
        else:
            p = tl.exp(x - tl.max(tl.max(x, 2), 1)[:, None, None])
            s = p / tl.sum(tl.sum(p, 2), 1)[:, None, None]
        # 2. the bias only chooses: sel = s + b, made finite (NaN -> -1e30; sums of two stay finite), so
        # -inf marks only padding, dropped groups and taken experts: every pick is a real, free expert
        b = tl.load(bias_ptr + g * S + j, mask=real, other=0.0).to(tl.float32)
        sel = s + b
        sel = tl.where(sel == sel, tl.minimum(tl.maximum(sel, -1e30), 1e30), -1e30)
        sel = tl.where(real, sel, float("-inf"))
        # 3. group-limited routing: group score = sum of its two best biased scores
        if G > 1:
            top1 = tl.max(sel, 2)                                                      # (BT, GP)
            first = tl.min(tl.where(sel == top1[:, :, None], eid, NONE), 2)            # where top1 sits
            top2 = tl.max(tl.where(eid == first[:, :, None], float("-inf"), sel), 2)  # best of the rest
            if S > 1:
                gscore = top1 + top2
            else:
                gscore = top1
            gid = tl.arange(0, GP)[None, :]
            gscore = tl.where(gid < G, gscore, float("-inf"))
            keep = tl.zeros((BLOCK_T, GP), tl.int32)
            for _ in tl.static_range(KG):                  # keep the KG best groups, ties -> lower group
                best = tl.max(gscore, 1)
                pick = tl.min(tl.where(gscore == best[:, None], gid, GP), 1)
                keep = tl.where(gid == pick[:, None], 1, keep)
                gscore = tl.where(gid == pick[:, None], float("-inf"), gscore)
            sel = tl.where(keep[:, :, None] != 0, sel, float("-inf"))  # -inf, never 0 (see route_ref)
        # 4. top-k by repeated argmax; ties -> lower expert index. Collect ids and unbiased scores.
        kid = tl.arange(0, KP)[None, :]
        w = tl.zeros((BLOCK_T, KP), tl.float32)
        ids = tl.zeros((BLOCK_T, KP), tl.int32)
        for i in tl.static_range(K):
            best = tl.max(tl.max(sel, 2), 1)
            pick = tl.min(tl.min(tl.where(sel == best[:, None, None], eid, NONE), 2), 1)
            hit = eid == pick[:, None, None]
            w_i = tl.sum(tl.sum(tl.where(hit, s, 0.0), 2), 1)            # the unbiased score s
            sel = tl.where(hit, float("-inf"), sel)                        # taken
            w = tl.where(kid == i, w_i[:, None], w)
            ids = tl.where(kid == i, pick[:, None], ids)
        # 5. weights: normalise to sum 1 for sigmoid (eq. 13), times route_scale
        if SIGMOID:
            w = w / tl.sum(w, 1)[:, None]
        w = w * route_scale
        out = rows.to(tl.int64)[:, None] * K + kid
        ok = (rows[:, None] < T) & (kid < K)
        tl.store(w_ptr + out, w, mask=ok)
        tl.store(ids_ptr + out, ids, mask=ok)

    @triton.jit
    def _load_ids(ids_ptr, offs, ok, E: tl.constexpr):
        """Expert ids of pairs offs, clamped into [0, E): no id can make a dispatch kernel index
        outside its buffers (the gate never gives others)."""
        return tl.minimum(tl.maximum(tl.load(ids_ptr + offs, mask=ok, other=0), 0), E - 1)

    @triton.jit
    def _count_kernel(ids_ptr, bc_ptr, N, NB, EP: tl.constexpr, E: tl.constexpr, BLOCK: tl.constexpr):
        """Program b counts how many of pairs [b*BLOCK, (b+1)*BLOCK) go to each expert: bc[e, b].
        A compare-and-sum over a (BLOCK, EP) tile: tl.histogram takes no mask in older Triton."""
        b = tl.program_id(0)
        offs = b * BLOCK + tl.arange(0, BLOCK)
        ok = offs < N
        e = _load_ids(ids_ptr, offs, ok, E)
        col = tl.arange(0, EP)
        h = tl.sum(((e[:, None] == col[None, :]) & ok[:, None]).to(tl.int32), 0)
        tl.store(bc_ptr + col * NB + b, h, mask=col < E)

    @triton.jit
    def _scatter_kernel(ids_ptr, start_ptr, perm_ptr, inv_ptr, N, NB, E: tl.constexpr, BLOCK: tl.constexpr):
        """Pair p (expert e, block b) lands at start[e, b] + (# earlier pairs of its block with
        expert e). start[e, b] already counts expert < e and same expert in blocks < b: stable."""
        b = tl.program_id(0)
        i = tl.arange(0, BLOCK)
        offs = b * BLOCK + i
        ok = offs < N
        e = _load_ids(ids_ptr, offs, ok, E)                 # the padding lanes come last: no rank effect
        earlier_same = (e[:, None] == e[None, :]) & (i[None, :] < i[:, None])   # (BLOCK, BLOCK)
        rank = tl.sum(earlier_same.to(tl.int32), 1)
        pos = tl.load(start_ptr + e * NB + b, mask=ok, other=0) + rank
        tl.store(inv_ptr + offs, pos, mask=ok)
        tl.store(perm_ptr + pos, offs.to(tl.int64), mask=ok)


def _launch(kernel, grid, *args, **kw):
    """Every kernel launch goes through here, so compile_launches can compile exactly what is launched."""
    kernel[grid](*args, **kw)


def gate_config(n_experts, topk, n_groups, topk_groups, score_func):
    """The gate kernel's constexprs: from the expert shape only, so no new T recompiles it."""
    S = n_experts // n_groups
    GP, SP = triton.next_power_of_2(n_groups), triton.next_power_of_2(S)
    return dict(G=n_groups, S=S, GP=GP, SP=SP, K=topk, KP=triton.next_power_of_2(topk),
                KG=topk_groups if n_groups > 1 else 1, SIGMOID=score_func == "sigmoid",
                BLOCK_T=max(1, GATE_TILE // (GP * SP)))


class _RouteTriton(torch.autograd.Function):
    """Forward: the fused kernel. Backward: the VJP of gate_weights(gate_scores(.)) at the chosen
    ids, so the weight formula has one definition. ids and the bias get no gradient."""

    @staticmethod
    def forward(ctx, logits, bias, topk, n_groups, topk_groups, score_func, route_scale):
        T, E = logits.shape
        kept = topk_groups * E // n_groups if n_groups > 1 else E   # experts left after the group limit
        assert E % n_groups == 0 and topk_groups <= n_groups and topk <= kept
        weights = torch.empty(T, topk, dtype=torch.float32, device=logits.device)
        ids = torch.empty(T, topk, dtype=torch.int32, device=logits.device)
        cfg = gate_config(E, topk, n_groups, topk_groups, score_func)
        if T > 0:
            _launch(_route_kernel, (triton.cdiv(T, cfg["BLOCK_T"]),), logits, bias, weights, ids, T,
                    logits.stride(0), logits.stride(1), float(route_scale), **cfg)
        ctx.save_for_backward(logits, ids)
        ctx.score_func, ctx.route_scale = score_func, route_scale
        ctx.mark_non_differentiable(ids)
        return weights, ids

    @staticmethod
    def backward(ctx, grad_w, grad_ids):
        logits, ids = ctx.saved_tensors
        with torch.enable_grad():
            x = logits.detach().requires_grad_()
            w = gate_weights(gate_scores(x, ctx.score_func), ids, ctx.score_func, ctx.route_scale)
            (grad,) = torch.autograd.grad(w, x, grad_w)
        return grad, None, None, None, None, None, None


def route_triton(logits, bias, topk, n_groups=1, topk_groups=1, score_func="sigmoid", route_scale=1.0):
    """Same contract as route_ref, one kernel launch; the weights are differentiable. Ids stay in
    [0, E) whatever the logits (NaN, +-inf)."""
    return _RouteTriton.apply(logits, bias.contiguous(), topk, n_groups, topk_groups, score_func, route_scale)


def dispatch_triton(ids, n_experts, BLOCK=128):
    """Same outputs as dispatch_ref (int64), bit-identical, deterministic (no atomics):
    1) per-block counts bc[e, b]; 2) exclusive prefix sum over bc in (expert, block) order =
    where each block starts writing each expert; 3) each pair goes to its start + rank in block.
    Ids outside [0, E) count as the nearest expert: the buffers are never overrun."""
    flat = ids.flatten().int()  # no copy for the int32 ids of route
    N, E = flat.numel(), n_experts
    NB = triton.cdiv(N, BLOCK)
    bc = torch.zeros(E, NB, dtype=torch.int32, device=flat.device)
    if NB > 0:
        _launch(_count_kernel, (NB,), flat, bc, N, NB, EP=triton.next_power_of_2(E), E=E, BLOCK=BLOCK)
    bc = bc.flatten()
    start = bc.cumsum(0) - bc                    # int64, exclusive prefix sum in (expert, block) order
    counts = bc.view(E, NB).sum(1)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    perm = torch.empty(N, dtype=torch.int64, device=flat.device)
    inv = torch.empty(N, dtype=torch.int64, device=flat.device)
    if NB > 0:
        _launch(_scatter_kernel, (NB,), flat, start, perm, inv, N, NB, E=E, BLOCK=BLOCK)
    return counts, offsets, perm, inv


def compile_launches(cc, fn, *args):
    """Compile for CUDA compute capability cc, without a GPU, each kernel launch that fn(*args) makes
    (give it meta tensors), specialised as a launch would be: [(kernel name, CompiledKernel)].
    Run it with TRITON_INTERPRET unset."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import native_specialize_impl          # the launcher's own specialisation
    backend, done = triton.backends.backends["nvidia"].compiler, []

    def compile_one(kernel, grid, *a, num_warps=4, **cx):
        spec = [native_specialize_impl(backend, x, False, True, True) for x in a]
        sig = {n: t for n, (t, _) in zip(kernel.arg_names, spec)} | dict.fromkeys(cx, "constexpr")
        cx |= {n: v for n, (t, v) in zip(kernel.arg_names, spec) if t == "constexpr"}   # ints == 1
        attrs = {(i,): backend.parse_attr(v) for i, (t, v) in enumerate(spec) if isinstance(v, str)}
        src = triton.compiler.ASTSource(kernel, sig, cx, attrs)
        done.append((kernel.__name__, triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                                     options=dict(num_warps=num_warps))))
    global _launch
    launch, _launch = _launch, compile_one
    try:
        fn(*args)
    finally:
        _launch = launch
    return done


def fallback_reason(has_triton, capability):
    """Why a CUDA GPU of this compute capability cannot run the kernels ("" when it can)."""
    if not has_triton:
        return "triton is not installed"
    if tuple(capability) < MIN_CC:
        return "compute capability %d.%d is below %d.%d" % (*capability, *MIN_CC)
    return ""


@functools.cache
def use_triton(device):
    """Tensors on this device go through the kernels: a CUDA GPU that can run them. Otherwise the
    references, after one warning line on a CUDA device that cannot."""
    if device.type != "cuda":
        return False
    why = fallback_reason(HAS_TRITON, torch.cuda.get_device_capability(device))
    if why:
        print(f"warning: {why}: the MoE routing falls back to PyTorch", file=sys.stderr)
    return not why


# ----------------------------------------------------------------------------- entry points
# The Triton kernels on a supported CUDA GPU, the references elsewhere (CPU, Mac, no triton).

def route(logits, bias, topk, n_groups=1, topk_groups=1, score_func="sigmoid", route_scale=1.0):
    fn = route_triton if use_triton(logits.device) else route_ref
    return fn(logits, bias, topk, n_groups, topk_groups, score_func, route_scale)


def dispatch(ids, n_experts):
    return (dispatch_triton if use_triton(ids.device) else dispatch_ref)(ids, n_experts)
