"""DeepSeek-V3 in one file, to read beside the technical report (arXiv 2412.19437).

In the report's order: the config; RMSNorm and RoPE with YaRN (§4.3); Multi-head Latent Attention
(§2.1.1) and a standard multi-head baseline; DeepSeekMoE (§2.1.2): the gate, the experts, the
auxiliary-loss-free bias and the sequence-wise balance loss; the block; Multi-Token Prediction
(§2.2); the model with its losses and the bias update; generation. Weight names follow DeepSeek's
inference/model.py (wq_a, wkv_b, w1/w2/w3) except for the routed experts, stacked per layer
(experts.w1 is (E, moe_inter_dim, dim)). Embedding and output head are untied, as in DeepSeek-V3.

This file is the reference: plain PyTorch, the MoE layer a loop over experts as in DeepSeek's
code. Other files transform a built model and are tested equal to it: kernels.install (fused
routing, sorted dispatch, grouped expert GEMMs), fp8.convert (FP8 GEMMs, §3.3) and
expert_parallel.shard_experts (§3.2).
"""
import json
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------- config

@dataclass
class ModelArgs:
    # fields of DeepSeek's official inference config; defaults here are a nano model
    vocab_size: int = 50257
    dim: int = 384
    inter_dim: int = 1024           # dense FFN width (first n_dense_layers layers)
    moe_inter_dim: int = 256        # width of each (fine-grained) expert
    n_layers: int = 6
    n_dense_layers: int = 1
    n_heads: int = 6
    n_routed_experts: int = 16      # 0 builds a dense model
    n_shared_experts: int = 1
    n_activated_experts: int = 2
    n_expert_groups: int = 4
    n_limited_groups: int = 2
    score_func: str = "sigmoid"
    route_scale: float = 1.0
    q_lora_rank: int = 0            # 0: a single wq instead of wq_a -> q_norm -> wq_b
    kv_lora_rank: int = 128
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 64
    max_seq_len: int = 256
    original_seq_len: int = 4096    # YaRN is on when max_seq_len > original_seq_len
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    # ours: training and ablations
    n_mtp: int = 1                  # Multi-Token Prediction depth D (0 disables)
    mtp_lambda: float = 0.3         # weight of the MTP loss (eq. 25) unless forward gets another
    bias_update_speed: float = 0.001  # gamma of aux-loss-free balancing (0 disables)
    seq_aux_alpha: float = 1e-4     # alpha of the sequence-wise balance loss (eq. 17)
    dropout: float = 0.0
    attn: str = "mla"               # "mla" | "mha" (baseline with a full per-head K/V cache)

    def __post_init__(self):
        """Every field checked once, here, with a message naming it (ValueError)."""
        def need(ok, msg):
            if not ok:
                raise ValueError(f"ModelArgs: {msg}")
        for k in ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_heads",
                  "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                  "max_seq_len", "original_seq_len", "rope_theta", "rope_factor", "route_scale",
                  "mscale"):
            need(getattr(self, k) > 0, f"{k} must be > 0, not {getattr(self, k)}")
        for k in ("n_dense_layers", "n_routed_experts", "n_shared_experts", "q_lora_rank", "n_mtp",
                  "mtp_lambda", "bias_update_speed", "seq_aux_alpha"):
            need(getattr(self, k) >= 0, f"{k} must be >= 0, not {getattr(self, k)}")
        need(self.qk_rope_head_dim % 2 == 0,
             f"qk_rope_head_dim must be even (RoPE rotates pairs), not {self.qk_rope_head_dim}")
        need(0 <= self.dropout < 1, f"dropout must be in [0, 1), not {self.dropout}")
        need(self.attn in ("mla", "mha"), f"attn must be 'mla' or 'mha', not {self.attn!r}")
        need(self.score_func in ("sigmoid", "softmax"),
             f"score_func must be 'sigmoid' or 'softmax', not {self.score_func!r}")
        if self.n_routed_experts:
            E, G, KG = self.n_routed_experts, self.n_expert_groups, self.n_limited_groups
            need(G >= 1 and E % G == 0, f"n_expert_groups must divide n_routed_experts={E}, "
                                        f"not {G}")
            need(1 <= KG <= G, f"n_limited_groups must be in [1, n_expert_groups={G}], not {KG}")
            need(1 <= self.n_activated_experts <= KG * E // G,
                 f"n_activated_experts must be in [1, {KG * E // G}] (the experts in "
                 f"n_limited_groups groups), not {self.n_activated_experts}")

    # keys of the official ModelArgs that only matter to DeepSeek's serving code
    _ignored = ("max_batch_size", "dtype", "scale_fmt")
    # the official code's defaults for keys a file may leave out; no MTP module
    _official = dict(n_expert_groups=1, n_limited_groups=1, score_func="softmax", route_scale=1.0,
                     q_lora_rank=0, max_seq_len=16384, original_seq_len=4096, rope_theta=10000.0,
                     rope_factor=40, beta_fast=32, beta_slow=1, mscale=1.0, n_mtp=0)

    @classmethod
    def from_json(cls, path):
        """Load an official inference config (e.g. config/config_671B.json); absent keys take the
        official defaults, unknown keys are an error. A softmax (V2) gate has no bias to update."""
        with open(path) as f:
            cfg = json.load(f)
        valid = {f.name for f in fields(cls)}
        if unknown := sorted(set(cfg) - valid - set(cls._ignored)):
            raise ValueError(f"{path}: unknown config key(s) {', '.join(unknown)}; "
                             f"valid keys: {', '.join(sorted(valid))}")
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
    when the model runs past its original context (§4.3; DeepSeek's precompute_freqs_cis)."""
    dim, base = args.qk_rope_head_dim, args.rope_theta
    freqs = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if args.max_seq_len > args.original_seq_len:
        # dimensions that turn fewer than beta_slow times over the original context are
        # interpolated by rope_factor, those that turn more than beta_fast times are kept,
        # a linear ramp between
        def corr_dim(rotations):
            turns = args.original_seq_len / (rotations * 2 * math.pi)
            return dim * math.log(turns) / (2 * math.log(base))
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
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


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
        """Write this chunk's entries at positions start_pos.. and return each cache up to the
        chunk's end. start_pos 0 starts a new sequence (fresh buffers); later entries are simply
        overwritten, all a rollback needs."""
        end = start_pos + next(iter(new.values())).size(1)
        for name, t in new.items():
            if start_pos == 0 or name not in self.cache:
                self.cache[name] = t.new_zeros(t.size(0), self.args.max_seq_len, *t.shape[2:])
            self.cache[name][:, start_pos:end] = t
        return [self.cache[name][:, :end] for name in new]

    def attend(self, q, k, v, start_pos, mask):
        """Per-head attention. q, k (B, S, H, Dqk), v (B, S, H, Dv). Training (start_pos None):
        causal SDPA over the chunk. Decoding: cache k, v and attend over all positions so far."""
        if start_pos is None:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                               dropout_p=self.dropout if self.training else 0.0)
            return o.transpose(1, 2)
        k, v = self.fill_cache(start_pos, k=k, v=v)
        scores = torch.einsum("bshd,bthd->bsht", q, k) * self.softmax_scale
        return torch.einsum("bsht,bthd->bshd", masked_softmax(scores, mask), v)


def causal_mask(start_pos, S, device=None):
    """Additive mask (S, 1, start_pos + S) for decoding S queries at positions start_pos..: query s
    sees key t if t <= start_pos + s. None for one query and in training (SDPA is causal). Shared
    by the layers, as DeepSeek's."""
    if start_pos is None or S == 1:
        return None
    mask = torch.full((S, start_pos + S), float("-inf"), device=device)
    return mask.triu_(start_pos + 1).unsqueeze(1)


def masked_softmax(scores, mask):
    """Softmax over the keys, in fp32. scores (B, S, H, T); mask from causal_mask or None."""
    s = scores.float() if mask is None else scores.float() + mask
    return s.softmax(dim=-1).type_as(scores)


class MLA(Attention):
    """Multi-head Latent Attention (eqs. 1-11). Keys and values come from one low-rank latent c^KV
    (kv_lora_rank wide) plus one RoPE key k^R shared by all heads. Decoding caches either only those
    two, with wkv_b absorbed into the query and the output (attn_impl "absorb", the default), or the
    per-head keys and values rebuilt from them ("naive"), as DeepSeek's attn_impl."""

    def __init__(self, args):
        super().__init__(args)
        H, nope, rope = args.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        if args.q_lora_rank > 0:                                         # eqs. 6-8: low-rank query
            self.wq_a = nn.Linear(args.dim, args.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(args.q_lora_rank)
            self.wq_b = nn.Linear(args.q_lora_rank, H * (nope + rope), bias=False)
        else:
            self.wq = nn.Linear(args.dim, H * (nope + rope), bias=False)
        self.wkv_a = nn.Linear(args.dim, args.kv_lora_rank + rope, bias=False)          # eqs. 1, 3
        self.kv_norm = RMSNorm(args.kv_lora_rank)
        self.wkv_b = nn.Linear(args.kv_lora_rank, H * (nope + self.v_head_dim), bias=False)  # 2, 5
        self.attn_impl = "absorb"

    def forward(self, x, cos, sin, start_pos=None, mask=None):
        """start_pos None: training over a whole sequence. An int: cached decoding of a chunk
        starting there (mask: causal_mask)."""
        B, S, _ = x.shape
        H, nope, rope = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        q = self.wq(x) if self.args.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q_nope, q_rope = q.view(B, S, H, -1).split([nope, rope], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)                                        # eq. 8
        c_kv, k_rope = self.wkv_a(x).split([self.args.kv_lora_rank, rope], dim=-1)
        c_kv = self.kv_norm(c_kv)                       # the latent is normalised, k^R is not
        k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin)    # (B, S, 1, rope): one for all heads
        if start_pos is None or self.attn_impl == "naive":
            k_nope, v = self.wkv_b(c_kv).view(B, S, H, -1).split([nope, self.v_head_dim], dim=-1)
            k = torch.cat([k_nope, k_rope.expand(-1, -1, H, -1)], dim=-1)               # eq. 4
            o = self.attend(torch.cat([q_nope, q_rope], dim=-1), k, v, start_pos, mask)  # 9-10
        else:
            # absorb: q_nope . (W_UK c) == (q_nope W_UK) . c, and W_UV moves past the softmax,
            # so attention runs over the cached latents themselves
            wkv_b = self.wkv_b.weight.view(H, nope + self.v_head_dim, -1)
            q_nope = torch.einsum("bshd,hdc->bshc", q_nope, wkv_b[:, :nope])
            c_kv, k_rope = self.fill_cache(start_pos, c_kv=c_kv, k_rope=k_rope.squeeze(2))
            scores = (torch.einsum("bshc,btc->bsht", q_nope, c_kv) +
                      torch.einsum("bshr,btr->bsht", q_rope, k_rope)) * self.softmax_scale
            o = torch.einsum("bsht,btc->bshc", masked_softmax(scores, mask), c_kv)
            o = torch.einsum("bshc,hdc->bshd", o, wkv_b[:, nope:])
        return self.wo(o.flatten(2))                                                 # eq. 11


class MHA(Attention):
    """Baseline: standard multi-head attention, per-head keys and values, all cached at decode.
    Head sizes as MLA's (RoPE on the last qk_rope_head_dim dims of each head): the two compare."""

    def __init__(self, args):
        super().__init__(args)
        qk = args.n_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim)
        self.wq, self.wk = nn.Linear(args.dim, qk, bias=False), nn.Linear(args.dim, qk, bias=False)
        self.wv = nn.Linear(args.dim, args.n_heads * self.v_head_dim, bias=False)

    def forward(self, x, cos, sin, start_pos=None, mask=None):
        B, S, _ = x.shape
        nope = self.qk_nope_head_dim
        q, k = (w(x).view(B, S, self.n_heads, -1) for w in (self.wq, self.wk))
        q, k = (torch.cat([t[..., :nope], apply_rope(t[..., nope:], cos, sin)], -1) for t in (q, k))
        o = self.attend(q, k, self.wv(x).view(B, S, self.n_heads, -1), start_pos, mask)
        return self.wo(o.flatten(2))


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
    """Router (eqs. 13-16). The affinities s come from the centroids e_i; a bias b (a buffer: no
    gradient, no weight decay) is added for choosing the experts only; the gate values g are the
    unbiased s of the chosen, normalised (sigmoid), times route_scale."""

    def __init__(self, args):
        super().__init__()
        self.topk, self.n_groups = args.n_activated_experts, args.n_expert_groups
        self.topk_groups, self.route_scale = args.n_limited_groups, args.route_scale
        self.score_func = args.score_func
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))   # centroids e_i
        self.register_buffer("bias", torch.zeros(args.n_routed_experts, dtype=torch.float32))
        # tokens per expert counted by training forwards since the last bias update (§2.1.2)
        self.register_buffer("load", torch.zeros(args.n_routed_experts), persistent=False)

    def forward(self, x):
        """x (T, dim) -> affinities s (T, E), gate values g (T, k), chosen experts (T, k).
        §3.3.1 keeps the gate in BF16 or FP32; ours is fp32 under any autocast: the bias moves in
        steps of gamma = 0.001, finer than bf16 resolves scores near 1 (8 bits of mantissa)."""
        with torch.autocast(x.device.type, enabled=False):
            s = self.scores(F.linear(x.float(), self.weight.float()))
        ids = self.route(s)
        g = s.gather(1, ids)
        if self.score_func == "sigmoid":
            g = g / g.sum(dim=-1, keepdim=True)     # eq. 13 (V2's softmax gate: not renormalised)
        return s, g * self.route_scale, ids

    def scores(self, logits):
        """s_i (eq. 15): sigmoid(u e_i) in V3, softmax over the experts in V2."""
        return logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)

    def route(self, s):
        """The top-k experts by s + b (eq. 16) within each token's n_limited_groups best expert
        groups (§2.1.2's node limit). Among exactly equal scores torch.topk may take any."""
        biased = s + self.bias                                               # the bias only chooses
        if self.n_groups > 1:
            grouped = biased.unflatten(-1, (self.n_groups, -1))
            # V3 scores a group by the sum of its two best biased scores; V2 (softmax: DeepSeek's
            # gate then has no bias) by its best score
            best = grouped.topk(min(2, grouped.size(-1)), dim=-1)[0]
            group_scores = best.sum(dim=-1) if self.score_func == "sigmoid" else best[..., 0]
            keep = group_scores.topk(self.topk_groups, dim=-1)[1]
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            # -inf, not 0: a zeroed score could still beat a kept expert whose biased score is < 0
            biased = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        return biased.topk(self.topk, dim=-1)[1]


class Experts(nn.Module):
    """The routed experts of one MoE layer: SwiGLU FFNs, weights stacked (w1[i]: expert i's)."""

    def __init__(self, n, dim, inter_dim):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n, inter_dim, dim))

    def forward(self, x, i):
        """Expert i on its tokens x (N, dim)."""
        return F.linear(F.silu(F.linear(x, self.w1[i])) * F.linear(x, self.w3[i]), self.w2[i])


def sequence_balance_loss(s, ids, alpha):
    """Complementary sequence-wise balance loss (eqs. 17-20), averaged over the batch.
    s (B, T, E) affinities; ids (B, T, K) chosen experts. Equals alpha when perfectly balanced."""
    (B, T, K), E = ids.shape, s.size(-1)
    ones = torch.ones(B, T * K, device=s.device)
    f = torch.zeros(B, E, device=s.device).scatter_add_(1, ids.flatten(1), ones) * E / (K * T)  # 18
    P = (s / s.sum(dim=-1, keepdim=True)).mean(dim=1)                # eqs. 19-20
    return alpha * (f * P).sum(dim=-1).mean()                         # eq. 17


class MoE(nn.Module):
    """DeepSeekMoE (eq. 12): shared experts see every token, each token also goes to its top-k
    fine-grained routed experts, weighted by its gate values."""

    def __init__(self, args):
        super().__init__()
        self.args = args
        self.gate = Gate(args)
        self.experts = Experts(args.n_routed_experts, args.dim, args.moe_inter_dim)
        self.shared_experts = (MLP(args.dim, args.n_shared_experts * args.moe_inter_dim)
                               if args.n_shared_experts else None)
        self.balance = None             # a training forward's, until Transformer.forward reads it

    def forward(self, x):
        """x (B, T, dim) -> (B, T, dim). In training the gate counts each expert's tokens for the
        bias update, and self.balance keeps this batch's sequence-wise balance loss."""
        B, T, D = x.shape
        x = x.view(-1, D)
        s, g, ids = self.gate(x)
        y, counts = self.routed(x, g, ids)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        if self.training:
            self.gate.load += counts
            if (alpha := self.args.seq_aux_alpha) > 0:
                self.balance = sequence_balance_loss(s.view(B, T, -1), ids.view(B, T, -1), alpha)
        return y.view(B, T, D)

    def routed(self, x, g, ids):
        """Σ_i g_i FFN_i(x) over each token's chosen experts (eq. 12), one expert at a time as in
        DeepSeek's code: the tokens that chose expert i, through it, times their gate values.
        -> (y, tokens per expert)"""
        counts = torch.bincount(ids.flatten(), minlength=self.args.n_routed_experts)
        y = torch.zeros_like(x)
        for i, n in enumerate(counts.tolist()):
            if n > 0:
                rows, k = torch.where(ids == i)
                y[rows] += self.experts(x[rows], i) * g[rows, k, None]
        return y, counts


# ----------------------------------------------------------------------------- block

class Block(nn.Module):
    def __init__(self, layer_id, args):
        super().__init__()
        self.attn_norm, self.ffn_norm = RMSNorm(args.dim), RMSNorm(args.dim)
        self.attn = (MLA if args.attn == "mla" else MHA)(args)
        dense = layer_id < args.n_dense_layers or args.n_routed_experts == 0
        self.ffn = MLP(args.dim, args.inter_dim) if dense else MoE(args)
        self.drop = nn.Dropout(args.dropout)

    def forward(self, x, cos, sin, start_pos=None, mask=None):
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, start_pos, mask))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


# ------------------------------------------------------------------------- Multi-Token Prediction

class MTP(nn.Module):
    """MTP module k (eqs. 21-23): from the depth-(k-1) representation of token i and the embedding
    of token i+k, predict token i+k+1. Embedding and output head are the main model's."""

    def __init__(self, layer_id, args):
        super().__init__()
        self.hnorm, self.enorm = RMSNorm(args.dim), RMSNorm(args.dim)
        self.eh_proj = nn.Linear(2 * args.dim, args.dim, bias=False)     # M_k
        self.block = Block(layer_id, args)
        self.norm = RMSNorm(args.dim)                                    # before the shared head

    def forward(self, h, emb, cos, sin, start_pos=None, mask=None):
        h = self.eh_proj(torch.cat([self.hnorm(h), self.enorm(emb)], dim=-1))   # eq. 21
        return self.block(h, cos, sin, start_pos, mask)                          # eq. 22


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
        # every matrix from N(0, 0.02) as nanoGPT: the report (§4.2) uses 0.006 at its width of
        # 7168; 0.02 is the usual choice at nano widths. Norms at 1, biases 0.
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def positions(self, start_pos, S):
        """For a chunk of S tokens at start_pos (None: training from 0): RoPE's cos and sin there,
        and the causal mask of a chunk decoded from the cache."""
        p = start_pos or 0
        mask = causal_mask(start_pos, S, self.rope_cos.device)
        return self.rope_cos[p:p + S], self.rope_sin[p:p + S], mask

    def hidden(self, idx, start_pos=None, mask=None):
        """Final hidden states h (B, S, dim) before the last norm. start_pos None: a whole sequence
        from 0 without cache; an int: cached decoding of a chunk there (mask, else causal_mask)."""
        S = idx.size(1)
        if (start_pos or 0) + S > self.args.max_seq_len:
            raise ValueError(f"positions up to {(start_pos or 0) + S} exceed "
                             f"max_seq_len={self.args.max_seq_len}")
        cos, sin, causal = self.positions(start_pos, S)
        h, mask = self.embed(idx), causal if mask is None else mask
        for layer in self.layers:
            h = layer(h, cos, sin, start_pos, mask)
        return h

    def logits(self, h, norm=None):
        return self.head((norm or self.norm)(h))

    def forward(self, idx, targets=None, start_pos=None, mtp_lambda=None):
        """nanoGPT-style: (logits for every position, losses). losses is None without targets, else
        a dict of tensors: main cross-entropy, mean MTP loss, balance loss, and total = main +
        mtp_lambda * mtp + balance (eq. 25; mtp_lambda defaults to args.mtp_lambda). With start_pos,
        the cached inference path (no targets)."""
        h = self.hidden(idx, start_pos)
        logits = self.logits(h)
        if targets is None:
            return logits, None
        main = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        mtp = []
        for k, module in enumerate(self.mtp, 1):
            # depth k at position i: h^{k-1}_i and Emb(t_{i+k}) -> t_{i+k+1}; targets[:, i]: t_{i+1}
            cos, sin, _ = self.positions(None, h.size(1) - 1)
            h = module(h[:, :-1], self.embed(targets[:, k - 1:-1]), cos, sin)
            logits_k = self.logits(h, module.norm).flatten(0, 1).float()
            # L^k (eq. 24) is a mean over the T - k positions that have a target k + 1 ahead,
            # where the report writes 1/T: the same up to the factor T / (T - k)
            mtp.append(F.cross_entropy(logits_k, targets[:, k:].flatten(), ignore_index=-1))
        mtp = torch.stack(mtp).mean() if mtp else main.new_zeros(())                 # eq. 25
        balance = main.new_zeros(())
        for m in self.modules():
            if self.training and isinstance(m, MoE) and m.balance is not None:   # eq. 17, summed
                balance, m.balance = balance + m.balance, None
        lam = self.args.mtp_lambda if mtp_lambda is None else mtp_lambda
        return logits, dict(total=main + lam * mtp + balance, main=main, mtp=mtp, balance=balance)

    # ------------------------------------------------------------------------- balancing

    def gates(self):
        return [m for m in self.modules() if isinstance(m, Gate)]

    @torch.no_grad()
    def update_expert_bias(self):
        """Aux-loss-free balancing (§2.1.2), once per optimizer step: b_i += gamma * sign(mean load
        - load_i) per MoE layer, from the tokens its gate counted since the last call; then clear
        the counts. Returns each layer's MaxVio = max load / mean load - 1 (a tensor: no sync)."""
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
        """Parameters of the main model (plus the MTP modules if mtp); active: those one token uses,
        n_activated_experts of each layer's n_routed_experts. Buffers (biases) are not counted."""
        modules = [self.embed, self.layers, self.norm, self.head] + ([self.mtp] if mtp else [])
        n = sum(p.numel() for m in modules for p in m.parameters())
        E, K = self.args.n_routed_experts, self.args.n_activated_experts
        if active and E:
            routed = sum(p.numel() for m in modules for e in m.modules() if isinstance(e, Experts)
                         for p in e.parameters())
            n -= routed * (E - K) // E
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward), nanoGPT/PaLM style: 6 per activated weight
        (the embedding lookup is free; each MTP depth runs the head again) plus 6 per attention
        score and value product."""
        a = self.args
        n = (self.num_params(active=True, mtp=True) - self.embed.weight.numel()
             + a.n_mtp * self.head.weight.numel())
        head_dims = a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim
        return 6 * (n + (a.n_layers + a.n_mtp) * a.n_heads * head_dims * seq_len)

    # ------------------------------------------------------------------------- generation

    def set_attn_impl(self, attn_impl):
        """How MLA decodes: "absorb" (latent cache) or "naive" (per-head K/V cache); see MLA."""
        for m in self.modules():
            if isinstance(m, MLA):
                m.attn_impl = attn_impl

    def window(self, tokens, slide=False):
        """The tokens decoding caches: the last max_seq_len, or half as many to slide."""
        return tokens[:, -(self.args.max_seq_len // 2 if slide else self.args.max_seq_len):]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        """Prefill the prompt once, then decode a token per step from the cache (temperature 0:
        greedy)."""
        ctx = self.window(idx)
        h, pos = self.hidden(ctx, 0), ctx.size(1)
        for _ in range(max_new_tokens):
            nxt = sample(self.logits(h[:, -1]), temperature, top_k)
            idx = torch.cat([idx, nxt], dim=1)
            if pos == self.args.max_seq_len:               # the window is full: slide
                ctx = self.window(idx, slide=True)
                h, pos = self.hidden(ctx, 0), ctx.size(1)
            else:
                h, pos = self.hidden(nxt, pos), pos + 1
        return idx


def sample(logits, temperature=1.0, top_k=None):
    """One token per row of logits (N, V) -> (N, 1): greedy at temperature 0, else from probs()."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    return torch.multinomial(probs(logits, temperature, top_k), 1)


def probs(logits, temperature=1.0, top_k=None):
    """The next-token distribution at temperature > 0: softmax(logits / temperature) over top_k."""
    logits = logits.float() / temperature
    if top_k is not None:
        v = logits.topk(min(top_k, logits.size(-1)), dim=-1)[0][..., -1:]
        logits = logits.masked_fill(logits < v, float("-inf"))
    return logits.softmax(dim=-1)
