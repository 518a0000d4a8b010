"""DeepSeek-V3 in one file, to read beside the technical report (arXiv 2412.19437).

In the report's order: the config; RMSNorm and RoPE with YaRN (§4.3); Multi-head Latent Attention
(§2.1.1) and a standard multi-head baseline; DeepSeekMoE (§2.1.2): the gate, the dispatch of tokens to
experts, the experts, the auxiliary-loss-free bias and the sequence-wise balance loss; the block;
Multi-Token Prediction (§2.2); the model with its losses and the bias update; generation. Weight names
follow DeepSeek's inference/model.py (wq_a, wkv_b, w1/w2/w3) except for the routed experts, stacked per
layer (experts.w1 is (E, moe_inter_dim, dim)): hf.py stacks an official checkpoint's per-expert tensors on
load and splits them on export. Embedding and output head are untied, as in DeepSeek-V3.
Systems features plug into a built model from their own files: fp8.py (FP8 GEMMs, §3.3), expert_parallel.py
(§3.2), kernels.py (Triton routing, grouped expert GEMM); MTP speculative decoding is in sample.py.
"""
import json
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

import kernels


# ----------------------------------------------------------------------------- config

@dataclass
class ModelArgs:
    # fields of DeepSeek's official inference config; defaults here are a nano model
    vocab_size: int = 50257
    dim: int = 256
    inter_dim: int = 768            # dense FFN width (first n_dense_layers layers)
    moe_inter_dim: int = 128        # width of each (fine-grained) expert
    n_layers: int = 6
    n_dense_layers: int = 1
    n_heads: int = 8
    n_routed_experts: int = 16      # 0 builds a dense model
    n_shared_experts: int = 1
    n_activated_experts: int = 4
    n_expert_groups: int = 4
    n_limited_groups: int = 2
    score_func: str = "sigmoid"
    route_scale: float = 1.0
    q_lora_rank: int = 96           # 0: a single wq instead of wq_a -> q_norm -> wq_b
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    max_seq_len: int = 256
    original_seq_len: int = 4096    # YaRN is on when max_seq_len > original_seq_len
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    # ours: training and ablations
    n_mtp: int = 1                  # Multi-Token Prediction depth D (0 disables)
    mtp_lambda: float = 0.3         # weight of the MTP loss (eq. 25) unless forward is given another
    bias_update_speed: float = 0.001  # gamma of aux-loss-free balancing (0 disables)
    seq_aux_alpha: float = 1e-4     # alpha of the sequence-wise balance loss (eq. 17)
    dropout: float = 0.0
    attn: str = "mla"               # "mla" | "mha" (baseline with a full per-head K/V cache)

    def __post_init__(self):
        """Every field checked once, here, with a message naming it (ValueError)."""
        def need(ok, msg):
            if not ok:
                raise ValueError(f"ModelArgs: {msg}")
        for k in ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_heads", "kv_lora_rank", "qk_nope_head_dim",
                  "qk_rope_head_dim", "v_head_dim", "max_seq_len", "original_seq_len", "rope_theta", "rope_factor",
                  "route_scale", "mscale"):
            need(getattr(self, k) > 0, f"{k} must be > 0, not {getattr(self, k)}")
        for k in ("n_dense_layers", "n_routed_experts", "n_shared_experts", "q_lora_rank", "n_mtp", "mtp_lambda",
                  "bias_update_speed", "seq_aux_alpha"):
            need(getattr(self, k) >= 0, f"{k} must be >= 0, not {getattr(self, k)}")
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even (RoPE rotates pairs), not {self.qk_rope_head_dim}")
        need(0 <= self.dropout < 1, f"dropout must be in [0, 1), not {self.dropout}")
        need(self.attn in ("mla", "mha"), f"attn must be 'mla' or 'mha', not {self.attn!r}")
        need(self.score_func in ("sigmoid", "softmax"), f"score_func must be 'sigmoid' or 'softmax', not {self.score_func!r}")
        if self.n_routed_experts:
            E, G, KG, K = self.n_routed_experts, self.n_expert_groups, self.n_limited_groups, self.n_activated_experts
            need(G >= 1 and E % G == 0, f"n_expert_groups must divide n_routed_experts={E}, not {G}")
            need(1 <= KG <= G, f"n_limited_groups must be in [1, n_expert_groups={G}], not {KG}")
            need(1 <= K <= KG * E // G, f"n_activated_experts must be in [1, {KG * E // G}] (the experts in "
                                        f"n_limited_groups groups), not {K}")

    # keys of the official ModelArgs that only matter to DeepSeek's serving code
    _ignored = ("max_batch_size", "dtype", "scale_fmt")
    # the official code's defaults for keys a file may leave out; no MTP module, and a softmax (V2) gate has no bias
    _official = dict(n_expert_groups=1, n_limited_groups=1, score_func="softmax", route_scale=1.0,
                     q_lora_rank=0, max_seq_len=16384, original_seq_len=4096, rope_theta=10000.0,
                     rope_factor=40, beta_fast=32, beta_slow=1, mscale=1.0, n_mtp=0)

    @classmethod
    def from_json(cls, path):
        """Load an official inference config (e.g. configs/config_671B.json); absent keys take the
        official defaults, unknown keys are an error."""
        with open(path) as f:
            cfg = json.load(f)
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - valid - set(cls._ignored))
        if unknown:
            raise ValueError(f"{path}: unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(valid))}")
        kw = {**cls._official, **{k: v for k, v in cfg.items() if k in valid}}
        if kw["score_func"] == "softmax":
            kw["bias_update_speed"] = 0.0
        return cls(**kw)


# ----------------------------------------------------------------------------- norm and RoPE

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def precompute_rope(args):
    """cos/sin tables (max_seq_len, qk_rope_head_dim/2) for RoPE, with YaRN's frequency correction
    when the model is meant to run past its original context (report §4.3, DeepSeek's precompute_freqs_cis)."""
    dim, base = args.qk_rope_head_dim, args.rope_theta
    freqs = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if args.max_seq_len > args.original_seq_len:
        # dimensions that turn fewer than beta_slow times over the original context are interpolated
        # by rope_factor, those that turn more than beta_fast times are kept, a linear ramp between
        def corr_dim(rotations):
            return dim * math.log(args.original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))
        low = max(math.floor(corr_dim(args.beta_fast)), 0)
        high = min(math.ceil(corr_dim(args.beta_slow)), dim - 1)
        high = high + 0.001 if high == low else high
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        freqs = freqs / args.rope_factor * ramp + freqs * (1 - ramp)
    angles = torch.outer(torch.arange(args.max_seq_len, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate interleaved pairs (x[2i], x[2i+1]) by position-dependent angles, as DeepSeek's
    complex-number form does. x (B, S, H, D); cos, sin (S, D/2)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[:, None], sin[:, None]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).type_as(x)


# ----------------------------------------------------------------------------- attention

class Attention(nn.Module):
    """What MLA and the MHA baseline share: softmax scale (with YaRN's mscale), causal SDPA for
    training, and decoding over a per-layer cache filled position by position."""

    def __init__(self, args):
        super().__init__()
        self.args = args
        self.n_heads, self.dropout, self.v_head_dim = args.n_heads, args.dropout, args.v_head_dim
        self.qk_nope_head_dim, self.qk_rope_head_dim = args.qk_nope_head_dim, args.qk_rope_head_dim
        self.softmax_scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        if args.max_seq_len > args.original_seq_len:
            mscale = 0.1 * args.mscale * math.log(args.rope_factor) + 1.0
            self.softmax_scale *= mscale ** 2
        self.wo = nn.Linear(self.n_heads * self.v_head_dim, args.dim, bias=False)
        self.cache = {}

    def fill_cache(self, start_pos, **new):
        """Write this chunk's entries at positions start_pos.. and return each cache up to the chunk's end. start_pos 0
        starts a new sequence (fresh buffers); later entries are simply overwritten, all a rollback needs."""
        end = start_pos + next(iter(new.values())).size(1)
        for name, t in new.items():
            buf = self.cache.get(name)
            if start_pos == 0 or buf is None:
                buf = self.cache[name] = t.new_zeros(t.size(0), self.args.max_seq_len, *t.shape[2:])
            buf[:, start_pos:end] = t
        return [self.cache[name][:, :end] for name in new]

    def attend(self, q, k, v, start_pos, mask):
        """Per-head attention. q, k (B, S, H, Dqk), v (B, S, H, Dv). Training (start_pos None):
        causal SDPA over the chunk. Decoding: cache k, v and attend over all positions so far."""
        if start_pos is None:
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0, scale=self.softmax_scale)
            return o.transpose(1, 2)
        k, v = self.fill_cache(start_pos, k=k, v=v)
        scores = torch.einsum("bshd,bthd->bsht", q, k) * self.softmax_scale
        return torch.einsum("bsht,bthd->bshd", masked_softmax(scores, mask), v)


def causal_mask(start_pos, S, device=None):
    """Additive mask (S, 1, start_pos + S) for decoding S queries at positions start_pos..: query s sees key t if
    t <= start_pos + s. None for one query and in training (SDPA is causal). Shared by the layers, as DeepSeek's."""
    if start_pos is None or S == 1:
        return None
    return torch.full((S, start_pos + S), float("-inf"), device=device).triu_(start_pos + 1).unsqueeze(1)


def masked_softmax(scores, mask):
    """Softmax over the keys, in fp32. scores (B, S, H, T); mask from causal_mask or None."""
    s = scores.float() if mask is None else scores.float() + mask
    return s.softmax(dim=-1).type_as(scores)


class MLA(Attention):
    """Multi-head Latent Attention (eqs. 1-11). Keys and values come from one low-rank latent c^KV
    (kv_lora_rank wide) plus one RoPE key k^R shared by all heads. Decoding caches either only those two,
    with wkv_b absorbed into the query and the output (attn_impl "absorb", the default), or the per-head
    keys and values rebuilt from them ("naive"), as DeepSeek's attn_impl; Transformer.set_attn_impl sets it."""

    def __init__(self, args):
        super().__init__(args)
        H, qk = args.n_heads, self.qk_nope_head_dim + self.qk_rope_head_dim
        if args.q_lora_rank > 0:                                      # eqs. 6-8: low-rank query
            self.wq_a = nn.Linear(args.dim, args.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(args.q_lora_rank)
            self.wq_b = nn.Linear(args.q_lora_rank, H * qk, bias=False)
        else:
            self.wq = nn.Linear(args.dim, H * qk, bias=False)
        self.wkv_a = nn.Linear(args.dim, args.kv_lora_rank + self.qk_rope_head_dim, bias=False)    # eqs. 1, 3
        self.kv_norm = RMSNorm(args.kv_lora_rank)
        self.wkv_b = nn.Linear(args.kv_lora_rank, H * (self.qk_nope_head_dim + self.v_head_dim), bias=False)  # eqs. 2, 5
        self.attn_impl = "absorb"

    def forward(self, x, cos, sin, start_pos=None, mask=None):
        """start_pos None: training over a whole sequence. An int: cached decoding of a chunk starting
        there (mask: causal_mask)."""
        B, S, _ = x.shape
        nope, rope = self.qk_nope_head_dim, self.qk_rope_head_dim
        q = self.wq(x) if self.args.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q_nope, q_pe = q.view(B, S, self.n_heads, -1).split([nope, rope], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)                                             # eq. 8
        kv, k_pe = self.wkv_a(x).split([self.args.kv_lora_rank, rope], dim=-1)
        kv = self.kv_norm(kv)                                   # the latent c^KV is normalised, k^R is not
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin)          # (B, S, 1, rope): one key for all heads (eq. 3)
        if start_pos is None or self.attn_impl == "naive":
            k_nope, v = self.wkv_b(kv).view(B, S, self.n_heads, -1).split([nope, self.v_head_dim], dim=-1)
            k = torch.cat([k_nope, k_pe.expand(-1, -1, self.n_heads, -1)], dim=-1)   # eq. 4
            o = self.attend(torch.cat([q_nope, q_pe], dim=-1), k, v, start_pos, mask)  # eqs. 9-10
        else:
            # absorb: q_nope . (W_UK c) == (q_nope W_UK) . c, and W_UV moves past the softmax,
            # so attention runs over the cached latents themselves
            wkv_b = self.wkv_b.weight.view(self.n_heads, nope + self.v_head_dim, -1)
            q_nope = torch.einsum("bshd,hdc->bshc", q_nope, wkv_b[:, :nope])
            kv, k_pe = self.fill_cache(start_pos, kv=kv, pe=k_pe.squeeze(2))
            scores = (torch.einsum("bshc,btc->bsht", q_nope, kv) +
                      torch.einsum("bshr,btr->bsht", q_pe, k_pe)) * self.softmax_scale
            o = torch.einsum("bsht,btc->bshc", masked_softmax(scores, mask), kv)
            o = torch.einsum("bshc,hdc->bshd", o, wkv_b[:, nope:])
        return self.wo(o.flatten(2))                                                  # eq. 11


class MHA(Attention):
    """Baseline: standard multi-head attention, per-head keys and values, all cached at decode.
    Head sizes as MLA's (RoPE on the last qk_rope_head_dim dims of each head) so the two compare directly."""

    def __init__(self, args):
        super().__init__(args)
        qk = args.n_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim)
        self.wq, self.wk = nn.Linear(args.dim, qk, bias=False), nn.Linear(args.dim, qk, bias=False)
        self.wv = nn.Linear(args.dim, args.n_heads * self.v_head_dim, bias=False)

    def forward(self, x, cos, sin, start_pos=None, mask=None):
        B, S, _ = x.shape
        nope = self.qk_nope_head_dim
        q, k = (w(x).view(B, S, self.n_heads, -1) for w in (self.wq, self.wk))
        q, k = (torch.cat([t[..., :nope], apply_rope(t[..., nope:], cos, sin)], dim=-1) for t in (q, k))
        o = self.attend(q, k, self.wv(x).view(B, S, self.n_heads, -1), start_pos, mask)
        return self.wo(o.flatten(2))


def cache_numbers_per_token(args, attn_impl="absorb"):
    """Numbers one layer caches per token at decode: the absorbed MLA latent + shared RoPE key,
    or full per-head K and V (MHA, or MLA in naive mode)."""
    if args.attn == "mla" and attn_impl == "absorb":
        return args.kv_lora_rank + args.qk_rope_head_dim
    return args.n_heads * (args.qk_nope_head_dim + args.qk_rope_head_dim + args.v_head_dim)


# ----------------------------------------------------------------------------- DeepSeekMoE

class MLP(nn.Module):
    """SwiGLU feed-forward, w2(silu(w1 x) * w3 x): the dense FFN and the shared experts."""

    def __init__(self, dim, inter_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    """Router (eqs. 13-16). The affinities s are computed in fp32; a bias b (a buffer: no gradient, no
    weight decay) is added for choosing the experts only; the gate values are the unbiased s of the
    chosen, normalised (sigmoid), times route_scale."""

    def __init__(self, args):
        super().__init__()
        self.topk, self.n_groups, self.topk_groups = args.n_activated_experts, args.n_expert_groups, args.n_limited_groups
        self.score_func, self.route_scale = args.score_func, args.route_scale
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))   # the centroids e_i
        self.register_buffer("bias", torch.zeros(args.n_routed_experts, dtype=torch.float32))
        # tokens per expert counted by training forwards since the last bias update (§2.1.2)
        self.register_buffer("load", torch.zeros(args.n_routed_experts, dtype=torch.float32), persistent=False)

    def scores(self, logits):
        """s_i (eq. 15): sigmoid(u e_i) in V3, softmax over the experts in V2."""
        return logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)

    def forward(self, x):
        """x (T, dim) -> scores s (T, E), gate values g (T, k), chosen experts (T, k) int32."""
        with torch.autocast(x.device.type, enabled=False):            # gating stays in fp32 (§3.3.1)
            logits = F.linear(x.float(), self.weight.float())
        scores = self.scores(logits)
        if kernels.enabled(x):     # the same choice, fused into one Triton kernel (kernels.py)
            ids = kernels.route_triton(logits, self.bias, self.topk, self.n_groups, self.topk_groups, self.score_func)
        else:
            ids = self.route(scores)
        weights = scores.gather(1, ids.long())
        if self.score_func == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)        # eq. 13 (V2's softmax gate is not renormalised)
        return scores, weights * self.route_scale, ids

    def route(self, scores):
        """Choose each token's top-k experts by s + b (eq. 16), within its n_limited_groups best
        expert groups. Ties go to the lower expert (and group) index: stable sorts, not topk."""
        biased = scores + self.bias                                      # the bias only chooses
        if self.n_groups > 1:
            grouped = biased.unflatten(-1, (self.n_groups, -1))
            # V3 scores a group by the sum of its two best biased scores; V2 (softmax: DeepSeek's
            # gate then has no bias) by its best score
            best = grouped.sort(dim=-1, descending=True)[0]
            group_scores = best[..., :2].sum(dim=-1) if self.score_func == "sigmoid" else best[..., 0]
            keep = group_scores.sort(dim=-1, descending=True, stable=True)[1][:, :self.topk_groups]
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            # -inf, not 0: a zeroed score could still beat a kept expert whose biased score is negative
            biased = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        return biased.sort(dim=-1, descending=True, stable=True)[1][:, :self.topk].int()


def dispatch(ids, n_experts):
    """Group the (token, slot) pairs by expert with a stable sort. ids (T, k) -> counts (E,), perm (T*k,),
    inv (T*k,), int64: pair perm[j] (a flat index t*k + slot) is the j-th in expert order, expert 0's
    first, and inv[perm] == arange (inv[i] is where pair i landed)."""
    flat, counts = ids.flatten().long(), ids.new_zeros(n_experts, dtype=torch.long)   # counts: a bincount of fixed size
    perm = torch.argsort(flat, stable=True)
    return counts.index_add_(0, flat, torch.ones_like(flat)), perm, torch.argsort(perm)


class Experts(nn.Module):
    """The routed experts of one MoE layer: n SwiGLU FFNs whose weights are stacked, w1[e] being expert e's."""

    def __init__(self, n, dim, inter_dim):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n, inter_dim, dim))

    def expert(self, e, x):
        return F.linear(F.silu(F.linear(x, self.w1[e])) * F.linear(x, self.w3[e]), self.w2[e])

    def forward(self, x, counts):
        """x (N, dim) token copies sorted by expert, counts (n,) copies per expert -> each through its expert."""
        if fast := kernels.experts_impl(x, self.w2):   # the same as one GEMM per projection (kernels.py)
            return fast(x, counts, self.w1, self.w2, self.w3)
        return torch.cat([self.expert(e, xe) for e, xe in enumerate(x.split(counts.tolist()))])


def sequence_balance_loss(scores, ids, alpha):
    """Complementary sequence-wise balance loss (eqs. 17-20), averaged over the batch.
    scores (B, T, E) affinities s; ids (B, T, K) chosen experts. Equals alpha when perfectly balanced."""
    (B, T, K), E = ids.shape, scores.size(-1)
    counts = torch.zeros(B, E, device=ids.device).scatter_add_(1, ids.flatten(1).long(),
                                                               torch.ones(B, T * K, device=ids.device))
    f = counts * E / (K * T)                                         # eq. 18 (no gradient: counts)
    P = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)      # eqs. 19-20
    return alpha * (f * P).sum(dim=-1).mean()                         # eq. 17


class MoE(nn.Module):
    """DeepSeekMoE (eq. 12): shared experts see every token, each token also goes to its top-k
    fine-grained routed experts, weighted by its gate values."""

    def __init__(self, args):
        super().__init__()
        self.args = args
        self.gate = Gate(args)
        self.experts = Experts(args.n_routed_experts, args.dim, args.moe_inter_dim)
        self.shared_experts = MLP(args.dim, args.n_shared_experts * args.moe_inter_dim) if args.n_shared_experts else None

    def forward(self, x):
        """x (B, T, dim) -> output (B, T, dim), sequence-wise balance loss (0 unless training with alpha > 0)."""
        B, T, D = x.shape
        x = x.view(-1, D)
        scores, weights, ids = self.gate(x)
        y, counts = self.routed(x, weights, ids)
        balance = x.new_zeros((), dtype=torch.float32)
        if self.training:
            self.gate.load += counts              # for the bias update (§2.1.2)
            if self.args.seq_aux_alpha > 0:
                balance = sequence_balance_loss(scores.view(B, T, -1), ids.view(B, T, -1), self.args.seq_aux_alpha)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(B, T, D), balance

    def routed(self, x, weights, ids):
        """Σ_i g_i FFN_i(x) over each row's k chosen experts (eq. 12): the (row, slot) pairs grouped by
        expert, each expert run once over its pairs' rows, each output added back into its row times its gate
        value (index_select and index_add: each the other's backward). -> (y, pairs per expert)"""
        (N, D), K = x.shape, ids.size(1)
        counts, perm, _ = (kernels.dispatch_triton if kernels.enabled(ids) else dispatch)(ids, self.args.n_routed_experts)
        rows = perm // K                                            # the row of each pair, in expert order
        ys = self.experts(x.index_select(0, rows), counts)
        g = weights.flatten()[perm].type_as(ys).unsqueeze(-1)       # and its gate value
        return ys.new_zeros(N, D).index_add(0, rows, g * ys), counts


# ----------------------------------------------------------------------------- block

class Block(nn.Module):
    def __init__(self, layer_id, args):
        super().__init__()
        self.attn_norm, self.ffn_norm = RMSNorm(args.dim), RMSNorm(args.dim)
        self.attn = (MLA if args.attn == "mla" else MHA)(args)
        dense = layer_id < args.n_dense_layers or args.n_routed_experts == 0
        self.ffn = MLP(args.dim, args.inter_dim) if dense else MoE(args)
        self.drop = nn.Dropout(args.dropout)

    def forward(self, x, **pos):
        """pos: cos, sin, start_pos, mask (Transformer.positions) -> (output, balance loss of this layer's MoE or 0)."""
        x = x + self.drop(self.attn(self.attn_norm(x), **pos))
        y = self.ffn(self.ffn_norm(x))
        y, balance = y if isinstance(self.ffn, MoE) else (y, 0.0)
        return x + self.drop(y), balance


# ----------------------------------------------------------------------------- Multi-Token Prediction

class MTP(nn.Module):
    """MTP module k (eqs. 21-23): from the depth-(k-1) representation of token i and the embedding of
    token i+k, predict token i+k+1. Embedding and output head are the main model's."""

    def __init__(self, layer_id, args):
        super().__init__()
        self.hnorm, self.enorm = RMSNorm(args.dim), RMSNorm(args.dim)
        self.eh_proj = nn.Linear(2 * args.dim, args.dim, bias=False)     # M_k
        self.block = Block(layer_id, args)
        self.norm = RMSNorm(args.dim)                                    # before the shared head

    def forward(self, h, emb, **pos):
        h = self.eh_proj(torch.cat([self.hnorm(h), self.enorm(emb)], dim=-1))   # eq. 21
        return self.block(h, **pos)                                              # eq. 22


# ----------------------------------------------------------------------------- model

class Transformer(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim)
        self.head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTP(args.n_layers + k, args) for k in range(args.n_mtp))
        cos, sin = precompute_rope(args)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # every matrix from N(0, 0.02) as nanoGPT (the report's 0.006 is for its 7168 width); norms at 1, biases 0
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def positions(self, start_pos, S):
        """A layer's position arguments for a chunk of S tokens at start_pos (None: training from 0): RoPE's
        cos and sin, start_pos itself, and the causal mask of a chunk decoded from the cache."""
        p = start_pos or 0
        return dict(cos=self.rope_cos[p:p + S], sin=self.rope_sin[p:p + S], start_pos=start_pos,
                    mask=causal_mask(start_pos, S, self.rope_cos.device))

    def hidden(self, idx, start_pos=None):
        """Final hidden states h (B, S, dim) before the last norm, and the layers' summed balance loss. start_pos
        None: a whole sequence from position 0 without cache; an int: cached decoding of a chunk starting there."""
        S = idx.size(1)
        if (start_pos or 0) + S > self.args.max_seq_len:
            raise ValueError(f"positions up to {(start_pos or 0) + S} exceed max_seq_len={self.args.max_seq_len}")
        h, balance, pos = self.embed(idx), 0.0, self.positions(start_pos, S)
        for layer in self.layers:
            h, b = layer(h, **pos)
            balance = balance + b
        return h, balance

    def logits(self, h, norm=None):
        return self.head((norm or self.norm)(h))

    def forward(self, idx, targets=None, start_pos=None, mtp_lambda=None):
        """nanoGPT-style: (logits for every position, losses). losses is None without targets, else a dict of
        tensors: main cross-entropy, mean MTP loss, balance loss, and total = main + mtp_lambda * mtp + balance
        (eq. 25; mtp_lambda defaults to args.mtp_lambda). With start_pos, the cached inference path (no targets)."""
        h, balance = self.hidden(idx, start_pos)
        logits = self.logits(h)
        if targets is None:
            return logits, None
        main = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        mtp = []
        for k, module in enumerate(self.mtp, 1):
            # depth k at position i: h^{k-1}_i and Emb(t_{i+k}) -> t_{i+k+1}; targets[:, i] is t_{i+1}
            h, b = module(h[:, :-1], self.embed(targets[:, k - 1:-1]), **self.positions(None, h.size(1) - 1))
            mtp.append(F.cross_entropy(self.logits(h, module.norm).flatten(0, 1).float(), targets[:, k:].flatten(),
                                       ignore_index=-1))
            balance = balance + b
        mtp = torch.stack(mtp).mean() if mtp else main.new_zeros(())              # eq. 25
        balance = main.new_zeros(()) + balance
        lam = self.args.mtp_lambda if mtp_lambda is None else mtp_lambda
        return logits, dict(total=main + lam * mtp + balance, main=main, mtp=mtp, balance=balance)

    # ------------------------------------------------------------------------- balancing

    def gates(self):
        return [m for m in self.modules() if isinstance(m, Gate)]

    @torch.no_grad()
    def update_expert_bias(self):
        """Aux-loss-free balancing (§2.1.2), once per optimizer step: b_i += gamma * sign(mean load - load_i) per MoE
        layer, from the tokens its gate counted since the last call; then clear the counts. Returns each layer's
        MaxVio = max load / mean load - 1 (a tensor: no host sync)."""
        gates = self.gates()
        if not gates:
            return torch.zeros(0)
        load = torch.stack([g.load for g in gates])
        mean = load.mean(dim=-1, keepdim=True)
        for g, l, m in zip(gates, load, mean):
            g.bias += self.args.bias_update_speed * torch.sign(m - l)
            g.load.zero_()
        return (load.amax(dim=-1) / mean.squeeze(-1).clamp(min=1e-9) - 1).clamp(min=0)

    # ------------------------------------------------------------------------- parameters

    def num_params(self, active=False, mtp=False):
        """Parameters of the main model (plus MTP modules if mtp), the routed experts counted from the config (all,
        or n_activated_experts per MoE layer if active) whatever this process holds; buffers (biases) not counted."""
        a = self.args
        modules = [self.embed, self.layers, self.norm, self.head] + ([self.mtp] if mtp else [])
        experts = [e for m in modules for e in m.modules() if isinstance(e, Experts)]
        routed = {id(p) for e in experts for p in e.parameters()}
        n = sum(p.numel() for m in modules for p in m.parameters() if id(p) not in routed)
        per_layer = a.n_activated_experts if active else a.n_routed_experts
        return n + len(experts) * per_layer * 3 * a.dim * a.moe_inter_dim

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward), nanoGPT/PaLM style: 6 per activated weight (the embedding
        lookup is free; each MTP depth runs the head again) plus 6 per attention score and value product."""
        a = self.args
        n = self.num_params(active=True, mtp=True) - self.embed.weight.numel() + a.n_mtp * self.head.weight.numel()
        attn = (a.n_layers + a.n_mtp) * a.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim) * seq_len
        return 6 * (n + attn)

    # ------------------------------------------------------------------------- generation

    def set_attn_impl(self, attn_impl):
        """How MLA decodes: "absorb" (latent cache) or "naive" (per-head K/V cache); see MLA."""
        for m in self.modules():
            if isinstance(m, MLA):
                m.attn_impl = attn_impl

    def window(self, tokens, slide=False):
        """The tokens decoding keeps in its cache: the last max_seq_len, or their last half when sliding."""
        return tokens[:, -(self.args.max_seq_len // 2 if slide else self.args.max_seq_len):]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Prefill the prompt once, then decode one token per step from the cache (temperature 0: greedy)."""
        ctx = self.window(idx)
        h, pos = self.hidden(ctx, 0)[0], ctx.size(1)
        for _ in range(max_new_tokens):
            nxt = sample(self.logits(h[:, -1]), temperature, top_k)
            idx = torch.cat([idx, nxt], dim=1)
            if pos == self.args.max_seq_len:               # the window is full: slide
                ctx = self.window(idx, slide=True)
                h, pos = self.hidden(ctx, 0)[0], ctx.size(1)
            else:
                h, pos = self.hidden(nxt, pos)[0], pos + 1
        return idx


def sample(logits, temperature=1.0, top_k=None):
    """One token per row of logits (N, V) -> (N, 1): the argmax at temperature 0 (greedy), else drawn from probs()."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    return torch.multinomial(probs(logits, temperature, top_k), 1)


def probs(logits, temperature=1.0, top_k=None):
    """Next-token distribution for temperature > 0: softmax of logits / temperature restricted to the top_k tokens."""
    logits = logits.float() / temperature
    if top_k is not None:
        v = logits.topk(min(top_k, logits.size(-1)), dim=-1)[0][..., -1:]
        logits = logits.masked_fill(logits < v, float("-inf"))
    return logits.softmax(dim=-1)
