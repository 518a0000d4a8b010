"""Triton kernels for DeepSeek-V3's MoE routing, used on a CUDA GPU. Each one computes exactly what
a plain PyTorch function of deepseek.py defines (and what runs everywhere else):

    route_triton(logits, bias, ...) -> ids (T, k)                     deepseek.Gate.route, eqs. 14-16
    dispatch_triton(ids, n_experts) -> counts, offsets, perm, inv     deepseek.dispatch

Same ids and permutations, bit for bit (up to fp32 near-ties in the gate). Without a GPU they run
under TRITON_INTERPRET=1 (set before triton is imported), which is how the tests check them.
"""
import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # e.g. Mac / Windows: the references are used
    HAS_TRITON = False


def enabled(t):
    """Whether the kernels run for tensor t: Triton installed and t on a CUDA device."""
    return HAS_TRITON and t.is_cuda


# ----------------------------------------------------------------------------- Triton kernels

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
        # 2. the bias only chooses: sel = s + b (padding -inf so it is never chosen)
        b = tl.load(bias_ptr + g * S + j, mask=real, other=0.0).to(tl.float32)
        sel = tl.where(real, s + b, float("-inf"))
        # 3. group-limited routing: group score = sum of its two best biased scores (V3, sigmoid),
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
    def _count_kernel(ids_ptr, bc_ptr, N, NB, EP: tl.constexpr, E: tl.constexpr, BLOCK: tl.constexpr):
        """Program b counts how many of pairs [b*BLOCK, (b+1)*BLOCK) go to each expert: bc[e, b]."""
        b = tl.program_id(0)
        offs = b * BLOCK + tl.arange(0, BLOCK)
        e = tl.load(ids_ptr + offs, mask=offs < N, other=0)
        h = tl.histogram(e, EP, mask=offs < N)
        col = tl.arange(0, EP)
        tl.store(bc_ptr + col * NB + b, h, mask=col < E)

    @triton.jit
    def _scatter_kernel(ids_ptr, start_ptr, perm_ptr, inv_ptr, N, NB, BLOCK: tl.constexpr):
        """Pair p (expert e, block b) lands at start[e, b] + (# earlier pairs of its block with
        expert e). start[e, b] already counts expert < e and same expert in blocks < b: stable."""
        b = tl.program_id(0)
        i = tl.arange(0, BLOCK)
        offs = b * BLOCK + i
        ok = offs < N
        e = tl.load(ids_ptr + offs, mask=ok, other=-1)
        earlier_same = (e[:, None] == e[None, :]) & (i[None, :] < i[:, None])   # (BLOCK, BLOCK)
        rank = tl.sum(earlier_same.to(tl.int32), 1)
        pos = tl.load(start_ptr + e * NB + b, mask=ok, other=0) + rank
        tl.store(inv_ptr + offs, pos, mask=ok)
        tl.store(perm_ptr + pos, offs.to(tl.int64), mask=ok)


def route_triton(logits, bias, topk, n_groups=1, topk_groups=1, score_func="sigmoid"):
    """The experts chosen by deepseek.Gate.route, one kernel launch: ids (T, topk) int32."""
    T, E = logits.shape
    S = E // n_groups
    kept = topk_groups * S if n_groups > 1 else E   # experts left after the group limit
    assert E % n_groups == 0 and topk_groups <= n_groups and topk <= kept
    GP, SP, KP = triton.next_power_of_2(n_groups), triton.next_power_of_2(S), triton.next_power_of_2(topk)
    weights = torch.empty(T, topk, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, topk, dtype=torch.int32, device=logits.device)
    BLOCK_T = min(triton.next_power_of_2(max(T, 1)), max(1, 4096 // (GP * SP)))
    if T > 0:
        _route_kernel[(triton.cdiv(T, BLOCK_T),)](
            logits, bias.contiguous(), weights, ids, T, logits.stride(0), logits.stride(1), 1.0,
            G=n_groups, S=S, GP=GP, SP=SP, K=topk, KP=KP, KG=topk_groups if n_groups > 1 else 1,
            SIGMOID=score_func == "sigmoid", BLOCK_T=BLOCK_T)
    return ids


def dispatch_triton(ids, n_experts, BLOCK=128):
    """Same outputs as dispatch_ref (int64), bit-identical, deterministic (no atomics):
    1) per-block histogram bc[e, b]; 2) exclusive prefix sum over bc in (expert, block) order =
    where each block starts writing each expert; 3) each pair goes to its start + rank in block."""
    flat = ids.flatten().int()  # no copy for the int32 ids of route
    N, E = flat.numel(), n_experts
    NB = triton.cdiv(N, BLOCK)
    bc = torch.zeros(E, NB, dtype=torch.int32, device=flat.device)
    if NB > 0:
        _count_kernel[(NB,)](flat, bc, N, NB, EP=triton.next_power_of_2(E), E=E, BLOCK=BLOCK)
    bc = bc.flatten()
    start = bc.cumsum(0) - bc                    # int64, exclusive prefix sum in (expert, block) order
    counts = bc.view(E, NB).sum(1)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    perm = torch.empty(N, dtype=torch.int64, device=flat.device)
    inv = torch.empty(N, dtype=torch.int64, device=flat.device)
    if NB > 0:
        _scatter_kernel[(NB,)](flat, start, perm, inv, N, NB, BLOCK=BLOCK)
    return counts, offsets, perm, inv
