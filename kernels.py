"""MoE routing for DeepSeek-V3: a fused gate and a token dispatch, each as a plain
PyTorch reference that defines its meaning (and runs everywhere) beside a Triton kernel
used on a GPU.

    route(logits, bias, ...)  -> weights (T, k), ids (T, k)   gating top-k, eqs. 13-16
    dispatch(ids, n_experts)  -> counts, offsets, perm, inv   group the (token, slot) pairs by expert
"""
import torch


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


# ----------------------------------------------------------------------------- entry points

def route(logits, bias, topk, n_groups=1, topk_groups=1, score_func="sigmoid", route_scale=1.0):
    return route_ref(logits, bias, topk, n_groups, topk_groups, score_func, route_scale)


def dispatch(ids, n_experts):
    return dispatch_ref(ids, n_experts)
