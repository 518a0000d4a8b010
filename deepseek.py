"""DeepSeek-V3 in one file, small enough to read beside the technical report (arXiv 2412.19437).

Order follows the report: config, the blocks' linear layer (FP8 when asked, §3.3: fp8.py), norm
and RoPE, Multi-head Latent Attention (§2.1.1), the MoE gate and experts with auxiliary-loss-free
balancing (§2.1.2; expert parallelism, §3.2, in MoE.routed_parallel), the block, Multi-Token
Prediction (§2.2), the model, generation. Names follow DeepSeek's inference/model.py (wq_a, wkv_b,
w1/w2/w3). Embedding and output head are untied, as in DeepSeek-V3.
"""
import json
import math
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fp8
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
    rope_factor: float = 40
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
    fp8: bool = False               # the blocks' linear layers train in FP8 (§3.3, fp8.py)

    def __post_init__(self):
        """Every field checked once, here, with a message naming it (ValueError)."""
        def need(ok, msg):
            if not ok:
                raise ValueError(f"ModelArgs: {msg}")
        for k in ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_heads", "kv_lora_rank",
                  "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_seq_len", "original_seq_len"):
            need(getattr(self, k) >= 1, f"{k} must be at least 1, not {getattr(self, k)}")
        for k in ("n_dense_layers", "n_routed_experts", "n_shared_experts", "q_lora_rank", "n_mtp", "mtp_lambda",
                  "bias_update_speed", "seq_aux_alpha"):
            need(getattr(self, k) >= 0, f"{k} must be >= 0, not {getattr(self, k)}")
        for k in ("rope_theta", "rope_factor", "route_scale", "mscale"):
            need(getattr(self, k) > 0, f"{k} must be > 0, not {getattr(self, k)}")
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
    # the official code's defaults for keys an official file may leave out
    _official = dict(n_expert_groups=1, n_limited_groups=1, score_func="softmax", route_scale=1.0,
                     q_lora_rank=0, max_seq_len=16384, original_seq_len=4096, rope_theta=10000.0,
                     rope_factor=40, beta_fast=32, beta_slow=1, mscale=1.0)

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
        return cls(**kw)


# ----------------------------------------------------------------------------- FP8 linear layers

class Linear(nn.Linear):
    """A linear layer without bias whose three GEMMs (forward, input and weight gradients) run in FP8
    when fp8 is set (report §3.3, fp8.py); the weight stays an fp32 master. The blocks' projections
    are these; the embedding, output head, gate, norms and attention core stay in higher precision (§3.3.1)."""

    def __init__(self, in_features, out_features, fp8=False):
        super().__init__(in_features, out_features, bias=False)
        self.fp8 = fp8

    def forward(self, x):
        return fp8.linear(x, self.weight) if self.fp8 else super().forward(x)


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
        self.n_heads, self.dropout = args.n_heads, args.dropout
        self.nope, self.rope, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.softmax_scale = (self.nope + self.rope) ** -0.5
        if args.max_seq_len > args.original_seq_len:
            mscale = 0.1 * args.mscale * math.log(args.rope_factor) + 1.0
            self.softmax_scale *= mscale ** 2
        self.wo = Linear(self.n_heads * self.v_dim, args.dim, args.fp8)
        self.cache = {}

    def fill_cache(self, start_pos, **new):
        """Write this chunk's entries at positions start_pos.. and return each cache up to the chunk's end.
        A chunk at start_pos == 0 starts a new sequence (fresh zeroed buffers). Later entries
        are simply overwritten, which is all a rollback needs."""
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
    """Additive mask (S, 1, start_pos + S) for decoding a chunk of S queries at positions start_pos..:
    key t is seen by query s if t <= start_pos + s. None for one query (it sees every cached key) and
    in training (SDPA is causal). Built once per forward and shared by the layers, as in DeepSeek's code."""
    if start_pos is None or S == 1:
        return None
    return torch.full((S, start_pos + S), float("-inf"), device=device).triu_(start_pos + 1).unsqueeze(1)


def masked_softmax(scores, mask):
    """Softmax over the keys, in fp32. scores (B, S, H, T); mask from causal_mask or None."""
    s = scores.float() if mask is None else scores.float() + mask
    return s.softmax(dim=-1).type_as(scores)


class MLA(Attention):
    """Multi-head Latent Attention (eqs. 1-11). Keys and values come from one low-rank latent c^KV
    (kv_lora_rank wide) plus one RoPE key k^R shared by all heads; decoding caches only those two."""

    def __init__(self, args):
        super().__init__(args)
        H, qk = args.n_heads, self.nope + self.rope
        if args.q_lora_rank > 0:                                      # eqs. 6-8: low-rank query
            self.wq_a = Linear(args.dim, args.q_lora_rank, args.fp8)
            self.q_norm = RMSNorm(args.q_lora_rank)
            self.wq_b = Linear(args.q_lora_rank, H * qk, args.fp8)
        else:
            self.wq = Linear(args.dim, H * qk, args.fp8)
        self.wkv_a = Linear(args.dim, args.kv_lora_rank + self.rope, args.fp8)      # eqs. 1, 3
        self.kv_norm = RMSNorm(args.kv_lora_rank)
        self.wkv_b = Linear(args.kv_lora_rank, H * (self.nope + self.v_dim), args.fp8)     # eqs. 2, 5

    def forward(self, x, cos, sin, start_pos=None, mask=None, attn_impl="absorb"):
        """start_pos None: training over a whole sequence. An int: cached decoding of a chunk starting
        there (mask: causal_mask), with the latent cache (attn_impl "absorb") or per-head K/V rebuilt
        from it ("naive")."""
        B, S, _ = x.shape
        q = self.wq(x) if self.args.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q_nope, q_pe = q.view(B, S, self.n_heads, -1).split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)                                             # eq. 8
        kv, k_pe = self.wkv_a(x).split([self.args.kv_lora_rank, self.rope], dim=-1)
        kv = self.kv_norm(kv)                                   # the latent c^KV is normalised, k^R is not
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin)          # (B, S, 1, rope): one key for all heads (eq. 3)
        if start_pos is None or attn_impl == "naive":
            k_nope, v = self.wkv_b(kv).view(B, S, self.n_heads, -1).split([self.nope, self.v_dim], dim=-1)
            k = torch.cat([k_nope, k_pe.expand(-1, -1, self.n_heads, -1)], dim=-1)   # eq. 4
            o = self.attend(torch.cat([q_nope, q_pe], dim=-1), k, v, start_pos, mask)  # eqs. 9-10
        else:
            # absorb: q_nope . (W_UK c) == (q_nope W_UK) . c, and W_UV moves past the softmax,
            # so attention runs over the cached latents themselves
            wkv_b = self.wkv_b.weight.view(self.n_heads, self.nope + self.v_dim, -1)
            q_nope = torch.einsum("bshd,hdc->bshc", q_nope, wkv_b[:, :self.nope])
            kv, k_pe = self.fill_cache(start_pos, kv=kv, pe=k_pe.squeeze(2))
            scores = (torch.einsum("bshc,btc->bsht", q_nope, kv) +
                      torch.einsum("bshr,btr->bsht", q_pe, k_pe)) * self.softmax_scale
            o = torch.einsum("bsht,btc->bshc", masked_softmax(scores, mask), kv)
            o = torch.einsum("bshc,hdc->bshd", o, wkv_b[:, self.nope:])
        return self.wo(o.flatten(2))                                                  # eq. 11


class MHA(Attention):
    """Baseline: standard multi-head attention, per-head keys and values, all cached at decode.
    Head sizes as MLA's (RoPE on the last qk_rope_head_dim dims of each head) so the two compare directly."""

    def __init__(self, args):
        super().__init__(args)
        H = args.n_heads
        self.wq = Linear(args.dim, H * (self.nope + self.rope), args.fp8)
        self.wk = Linear(args.dim, H * (self.nope + self.rope), args.fp8)
        self.wv = Linear(args.dim, H * self.v_dim, args.fp8)

    def forward(self, x, cos, sin, start_pos=None, mask=None, attn_impl=None):   # one cache layout: attn_impl unused
        B, S, _ = x.shape
        q, k = (w(x).view(B, S, self.n_heads, -1) for w in (self.wq, self.wk))
        q, k = (torch.cat([t[..., :self.nope], apply_rope(t[..., self.nope:], cos, sin)], dim=-1) for t in (q, k))
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

    def __init__(self, dim, inter_dim, fp8=False):
        super().__init__()
        self.w1 = Linear(dim, inter_dim, fp8)
        self.w2 = Linear(inter_dim, dim, fp8)
        self.w3 = Linear(dim, inter_dim, fp8)

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
        with torch.autocast(x.device.type, enabled=False):            # routing stays in fp32
            logits = F.linear(x.float(), self.weight.float())
        scores = self.scores(logits)
        if kernels.enabled(x):     # the same choice, fused into one Triton kernel
            ids = kernels.route_triton(logits, self.bias, self.topk, self.n_groups, self.topk_groups, self.score_func)
        else:
            ids = self.route(scores)
        weights = scores.gather(1, ids.long())
        if self.score_func == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)        # eq. 13 (V2's softmax gate is not renormalised)
        return scores, weights * self.route_scale, ids

    def route(self, scores):
        """Choose each token's top-k experts by s + b (eq. 16), within its n_limited_groups best
        expert groups. Ties go to the lower expert (and group) index: stable sorts, not topk.
        The plain PyTorch reference of kernels.route_triton."""
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
    """Group the (token, slot) pairs by expert with a stable sort. ids (T, k) -> counts (E,),
    offsets (E+1,), perm (T*k,), inv (T*k,), int64: expert e owns the pairs perm[offsets[e]:offsets[e+1]],
    and inv[j] is where pair j landed (perm[inv] == arange). The reference of kernels.dispatch_triton."""
    flat = ids.flatten().long()
    counts = torch.bincount(flat, minlength=n_experts)
    perm = torch.argsort(flat, stable=True)
    return counts, F.pad(counts.cumsum(0), (1, 0)), perm, torch.argsort(perm)


class Gather(torch.autograd.Function):
    """x[rows] when each row of x is taken `copies` times: back[i * copies + c] says where copy c of
    row i landed. The backward is then a gather too (g[back], summed over the copies) instead of
    indexing's accumulating scatter; both ways run index_select, several times faster on CPU."""

    @staticmethod
    def of(x, rows, back, copies=1):
        return Gather.apply(x, rows, back, copies) if x.requires_grad else x.index_select(0, rows)

    @staticmethod
    def forward(ctx, x, rows, back, copies):
        ctx.save_for_backward(back)
        ctx.copies = copies
        return x.index_select(0, rows)

    @staticmethod
    def backward(ctx, g):
        g = g.index_select(0, ctx.saved_tensors[0])
        return g.unflatten(0, (-1, ctx.copies)).sum(1) if ctx.copies > 1 else g, None, None, None


def sequence_balance_loss(scores, ids, alpha):
    """Complementary sequence-wise balance loss (eqs. 17-20), averaged over the batch.
    scores (B, T, E) affinities s; ids (B, T, K) chosen experts. Equals alpha when perfectly balanced."""
    B, T, K = ids.shape
    E = scores.size(-1)
    counts = torch.zeros(B, E, device=ids.device).scatter_add_(1, ids.flatten(1).long(),
                                                               torch.ones(B, T * K, device=ids.device))
    f = counts * E / (K * T)                                         # eq. 18 (no gradient: counts)
    P = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)      # eqs. 19-20
    return alpha * (f * P).sum(dim=-1).mean()                         # eq. 17


class Experts(nn.Module):
    """The routed experts of one MoE layer, n SwiGLU FFNs held as stacked weights so that each
    projection runs for all experts in one grouped GEMM over the token copies sorted by expert."""

    def __init__(self, n, dim, inter_dim, fp8=False):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n, inter_dim, dim))
        self.fp8 = fp8

    def forward(self, x, counts, grouped=None):
        """x (N, dim) token copies, expert 0's first; counts (n,) copies per expert. grouped: one
        grouped GEMM per projection (default where torch has it and the shapes allow), else a loop.
        FP8 (§3.3): the loop, each projection through fp8.linear on the fp32 master weights."""
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        w1, w2, w3 = (w if self.fp8 else w.to(dtype) for w in (self.w1, self.w2, self.w3))
        x = x.to(dtype)
        if grouped is None:      # what torch._grouped_mm takes: 16-bit or fp32, rows a multiple of 16 bytes
            grouped = (not self.fp8 and hasattr(torch, "_grouped_mm") and dtype in (torch.float32, torch.bfloat16, torch.float16)
                       and all(d * x.element_size() % 16 == 0 for d in self.w2.shape[1:]))
        if grouped:      # no host sync: the group sizes stay on the device
            ends = counts.cumsum(0).int()
            mm = lambda a, w: torch._grouped_mm(a, w.transpose(-2, -1), offs=ends)   # noqa: E731
            return mm(F.silu(mm(x, w1)) * mm(x, w3), w2)
        lin = fp8.linear if self.fp8 else F.linear
        xs = x.split(counts.tolist())                    # one host sync: the slice sizes
        return torch.cat([lin(F.silu(lin(a, w1[e])) * lin(a, w3[e]), w2[e]) for e, a in enumerate(xs)])


class MoE(nn.Module):
    """DeepSeekMoE (eq. 12): shared experts see every token, each token also goes to its top-k
    fine-grained routed experts, weighted by its gate values."""

    def __init__(self, args):
        super().__init__()
        self.args = args
        self.gate = Gate(args)
        self.experts = Experts(args.n_routed_experts, args.dim, args.moe_inter_dim, args.fp8)
        self.shared_experts = MLP(args.dim, args.n_shared_experts * args.moe_inter_dim, args.fp8) if args.n_shared_experts else None
        self.group = None              # expert parallelism: the process group the routed experts are sharded over
        # expert parallel training forwards: tokens; sent to other ranks: tokens, the expert copies they carry, bytes
        self.traffic = [0, 0, 0, 0]

    def shard(self, group):
        """Expert parallelism (§3.2): keep only this rank's slice of the routed experts, rank r holding
        experts [r*n, (r+1)*n) with n = n_routed_experts / world size. Everything else stays replicated."""
        W, r = dist.get_world_size(group), dist.get_rank(group)
        assert self.args.n_routed_experts % W == 0, "the world size must divide n_routed_experts"
        n = self.args.n_routed_experts // W
        for name, p in list(self.experts.named_parameters()):
            setattr(self.experts, name, nn.Parameter(p.detach()[r * n:(r + 1) * n].clone()))
        self.group = group

    @torch.compiler.disable   # routing and dispatch are data-dependent: torch.compile leaves this layer eager
    def forward(self, x):
        """x (B, T, dim) -> output (B, T, dim), sequence-wise balance loss (0 unless training with alpha > 0)."""
        B, T, D = x.shape
        x = x.view(-1, D)
        scores, weights, ids = self.gate(x)
        if self.group is None:
            y, counts = self.routed(x, ids, weights, ids.numel())
        else:
            y, counts = self.routed_parallel(x, ids, weights)
        balance = x.new_zeros((), dtype=torch.float32)
        if self.training:
            self.gate.load += counts              # for the bias update (§2.1.2), summed over ranks there
            if self.args.seq_aux_alpha > 0:
                balance = sequence_balance_loss(scores.view(B, T, -1), ids.view(B, T, -1), self.args.seq_aux_alpha)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(B, T, D), balance

    def routed(self, x, ids, weights, copies):
        """Σ_k g_k FFN_{ids_k}(x) for each row of x (eq. 12) over the experts held here: the (row, slot)
        pairs are grouped by expert (dispatch), run in one grouped GEMM and summed back per row with their
        gate values. An id equal to the number n of experts held here marks a slot for another rank: it
        sorts last and is skipped, so only the first `copies` pairs run. -> (y, copies per expert (n,))"""
        (N, D), K, n = x.shape, ids.size(1), self.experts.w1.size(0)
        counts, _, perm, inv = (kernels.dispatch_triton if kernels.enabled(ids) else dispatch)(ids, n + 1)
        xs = Gather.of(x, perm // K, inv, K)                                     # K copies of each row
        ys = self.experts(xs[:copies], counts[:n])                              # expert 0's copies first
        if copies < N * K:                                                      # slots for other ranks: 0
            ys = F.pad(ys, (0, 0, 0, N * K - copies))
        ys = Gather.of(ys, inv, perm).view(N, K, D)                             # back in (row, slot) order
        return (weights.type_as(ys).unsqueeze(-1) * ys).sum(1), counts[:n]

    def routed_parallel(self, x, ids, weights):
        """routed() under expert parallelism (§3.2.2), sending each token once to each rank that holds
        any of its experts, with its expert ids and gate values; that rank runs them, sums their weighted
        outputs and sends one vector back. With one expert group per rank, n_limited_groups = M caps the
        ranks a token reaches (node-limited routing). -> (y, copies per expert: this rank's experts counted
        over all ranks' tokens, 0 elsewhere)"""
        g, (T, D), K = self.group, x.shape, ids.size(1)
        W, r, n = dist.get_world_size(g), dist.get_rank(g), self.experts.w1.size(0)
        on = ids.unsqueeze(-1) // n == torch.arange(W, device=x.device)          # (T, K, W): slot k's expert is on rank j
        to = on.any(dim=1)                                                        # (T, W): token t goes to rank j
        # split sizes both ways, tokens and the expert copies they carry per rank: the layer's one host sync
        sizes = torch.stack([to.sum(0), on.sum((0, 1))], dim=1)
        got = torch.empty_like(sizes)
        dist.all_to_all_single(got, sizes, group=g)
        sizes, got = torch.stack([sizes, got]).tolist()
        send, recv, copies = [s[0] for s in sizes], [s[0] for s in got], sum(s[1] for s in got)
        dest, tok = torch.nonzero_static(to.t(), size=sum(send)).unbind(1)      # sends, by rank then token
        local = torch.where(ids[tok] // n == dest[:, None], ids[tok] % n, n)    # expert there, n: elsewhere
        local_in = local.new_empty(sum(recv), K)
        dist.all_to_all_single(local_in, local, recv, send, group=g)
        xw = AllToAll.apply(torch.cat([x[tok], weights[tok].type_as(x)], dim=1), send, recv, g)
        y, counts = self.routed(xw[:, :D], local_in, xw[:, D:], copies)
        y = AllToAll.apply(y, recv, send, g)                                      # back to the tokens' ranks
        if self.training:
            sends, copies = (sum(c) - c[r] for c in zip(*sizes))                  # to other ranks
            row = (xw.size(1) + D) * xw.element_size() + K * local.element_size()  # bytes per send, there and back
            self.traffic = [a + b for a, b in zip(self.traffic, (T, sends, copies, sends * row))]
        return y.new_zeros(T, D).index_add(0, tok, y), F.pad(counts, (r * n, (W - r - 1) * n))


class AllToAll(torch.autograd.Function):
    """dist.all_to_all_single with uneven splits, differentiable: the gradients go back the way the
    values came (the same exchange with send and receive sizes swapped)."""

    @staticmethod
    def forward(ctx, x, send, recv, group):
        ctx.args = recv, send, group
        out = x.new_empty(sum(recv), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return AllToAll.apply(grad, *ctx.args), None, None, None


# ----------------------------------------------------------------------------- block

class Block(nn.Module):
    def __init__(self, layer_id, args):
        super().__init__()
        self.attn_norm, self.ffn_norm = RMSNorm(args.dim), RMSNorm(args.dim)
        self.attn = (MLA if args.attn == "mla" else MHA)(args)
        dense = layer_id < args.n_dense_layers or args.n_routed_experts == 0
        self.ffn = MLP(args.dim, args.inter_dim, args.fp8) if dense else MoE(args)
        self.drop = nn.Dropout(args.dropout)

    def forward(self, x, cos, sin, start_pos=None, mask=None, attn_impl="absorb"):
        """-> (output, balance loss of this layer's MoE or 0)."""
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, start_pos, mask, attn_impl))
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
        # M_k stays in higher precision with the embedding (§3.3.1): half its input is a token embedding
        self.eh_proj = nn.Linear(2 * args.dim, args.dim, bias=False)
        self.block = Block(layer_id, args)
        self.norm = RMSNorm(args.dim)                                    # before the shared head

    def forward(self, h, emb, cos, sin, start_pos=None, mask=None, attn_impl="absorb"):
        h = self.eh_proj(torch.cat([self.hnorm(h), self.enorm(emb)], dim=-1))   # eq. 21
        return self.block(h, cos, sin, start_pos, mask, attn_impl)               # eq. 22


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
        for p in self.parameters():
            if p.dim() >= 2:                            # every matrix; norms start at 1, the bias at 0
                nn.init.normal_(p, std=0.02)

    def positions(self, start_pos, S):
        """A layer's position arguments for a chunk of S tokens at start_pos (None: training from 0):
        RoPE's cos and sin, start_pos itself, and the causal mask of a chunk decoded from the cache."""
        p = start_pos or 0
        mask = causal_mask(start_pos, S, self.rope_cos.device)
        return self.rope_cos[p:p + S], self.rope_sin[p:p + S], start_pos, mask

    def trunk(self, idx, start_pos=None, attn_impl="absorb"):
        """Final hidden states h (B, S, dim) before the last norm, and the layers' summed balance loss.
        start_pos None: a whole sequence from position 0 without cache; an int: cached decoding of a
        chunk starting there."""
        S = idx.size(1)
        if (start_pos or 0) + S > self.args.max_seq_len:
            raise ValueError(f"positions up to {(start_pos or 0) + S} exceed max_seq_len={self.args.max_seq_len}")
        h, balance, pos = self.embed(idx), 0.0, self.positions(start_pos, S)
        for layer in self.layers:
            h, b = layer(h, *pos, attn_impl=attn_impl)
            balance = balance + b
        return h, balance

    def logits(self, h, norm=None):
        return self.head((norm or self.norm)(h))

    def forward(self, idx, targets=None, start_pos=None, mtp_lambda=None, attn_impl="absorb"):
        """nanoGPT-style: (logits for every position, losses). losses is None without targets, else a
        dict of tensors: main cross-entropy, mean MTP loss, balance loss, and their weighted sum
        total = main + mtp_lambda * mtp + balance (eq. 25; mtp_lambda defaults to args.mtp_lambda).
        With start_pos, runs the cached inference path (no targets)."""
        h, balance = self.trunk(idx, start_pos, attn_impl)
        logits = self.logits(h)
        if targets is None:
            return logits, None
        main = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        mtp = []
        for k, module in enumerate(self.mtp, 1):
            # depth k at position i: h^{k-1}_i and Emb(t_{i+k}) -> t_{i+k+1}; targets[:, i] is t_{i+1}
            S = h.size(1) - 1
            h, b = module(h[:, :-1], self.embed(targets[:, k - 1:-1]), *self.positions(None, S))
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
        """Aux-loss-free balancing (§2.1.2), once per optimizer step: b_i += gamma * sign(mean load - load_i)
        from the tokens counted since the last call (summed over ranks), then clear the counts.
        Returns each MoE layer's MaxVio = max load / mean load - 1 (a tensor: no host sync)."""
        gates = self.gates()
        if not gates:
            return torch.zeros(0)
        load = torch.stack([g.load for g in gates])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)
        mean = load.mean(dim=-1, keepdim=True)
        for g, l, m in zip(gates, load, mean):
            g.bias += self.args.bias_update_speed * torch.sign(m - l)
            g.load.zero_()
        return (load.amax(dim=-1) / mean.squeeze(-1).clamp(min=1e-9) - 1).clamp(min=0)

    # ------------------------------------------------------------------------- parameters

    def num_params(self, active=False, mtp=False):
        """Parameter count of the main model (plus MTP modules if mtp). active: per token, i.e. only
        n_activated_experts of each MoE layer's routed experts. Buffers (the gate biases) are not counted."""
        modules = [self.embed, self.layers, self.norm, self.head] + ([self.mtp] if mtp else [])
        n = sum(p.numel() for m in modules for p in m.parameters())
        if active:
            for m in modules:
                for moe in (x for x in m.modules() if isinstance(x, MoE)):
                    per_expert = sum(p[0].numel() for p in moe.experts.parameters())
                    n -= (self.args.n_routed_experts - self.args.n_activated_experts) * per_expert
        return n

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward), nanoGPT/PaLM style: 6 per activated weight
        (the embedding lookup is free; each MTP depth runs the head again) plus 6 per attention
        score and value product over a seq_len context, in every layer and MTP block."""
        a = self.args
        n = self.num_params(active=True, mtp=True) - self.embed.weight.numel() + a.n_mtp * self.head.weight.numel()
        attn = (a.n_layers + a.n_mtp) * a.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim) * seq_len
        return 6 * (n + attn)

    # ------------------------------------------------------------------------- generation

    def window(self, tokens, slide=False):
        """The tokens that decoding keeps in its cache: the last max_seq_len, or when the window is full
        (slide) its last half, so the other half is decoded from the cache before the next slide."""
        return tokens[:, -(self.args.max_seq_len // 2 if slide else self.args.max_seq_len):]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, attn_impl="absorb"):
        """Prefill the prompt once, then decode one token per step from the cache (temperature 0: greedy)."""
        ctx = self.window(idx)
        h, pos = self.trunk(ctx, 0, attn_impl)[0], ctx.size(1)
        for _ in range(max_new_tokens):
            nxt = sample(self.logits(h[:, -1]), temperature, top_k)
            idx = torch.cat([idx, nxt], dim=1)
            if pos == self.args.max_seq_len:               # the window is full: slide
                ctx = self.window(idx, slide=True)
                h, pos = self.trunk(ctx, 0, attn_impl)[0], ctx.size(1)
            else:
                h, pos = self.trunk(nxt, pos, attn_impl)[0], pos + 1
        return idx

    @torch.no_grad()
    def generate_speculative(self, idx, max_new_tokens, temperature=1.0, top_k=None, attn_impl="absorb"):
        """Speculative decoding with the first MTP module as drafter (report §5.4.3), one sequence.
        State: the caches hold `pos` tokens; y, the last token drawn, is pending (not yet cached);
        d is the MTP draft for the token after y, drawn from q. One step runs the main model over
        [y, d], keeps or replaces d by verify_draft and, when d is kept, draws the token after it
        too. The output follows the main model exactly (token for token when greedy, also past the
        context window: it slides where generate does). Rejected positions need no cache rollback:
        the next chunk starts there and overwrites them. Returns (idx, stats)."""
        assert idx.size(0) == 1, "speculative decoding runs one sequence at a time"
        assert self.mtp, "speculative decoding needs an MTP module (n_mtp >= 1)"
        mtp, window = self.mtp[0], self.args.max_seq_len
        stats = dict(forwards=0, drafted=0, accepted=0)

        def main(chunk, pos):
            """The main model over chunk at pos: hidden states, next-token logits."""
            stats["forwards"] += 1
            h = self.trunk(chunk, pos, attn_impl)[0]
            return h, self.logits(h[0])

        def draft(h, nxt, pos):
            """MTP over positions pos.. from their main hidden states h and the tokens after them (nxt):
            a draft for the token after nxt's last, and its distribution q (None when greedy)."""
            hm = mtp(h, self.embed(nxt), *self.positions(pos, nxt.size(1)), attn_impl=attn_impl)[0]
            logits = self.logits(hm[:, -1], mtp.norm)
            if temperature == 0:
                return sample(logits, 0), None
            q = probs(logits, temperature, top_k)
            return torch.multinomial(q, 1), q

        def restart(tokens, slide):
            """Fresh caches from the window's tokens but the last, which becomes y. -> y, pos, d, q"""
            ctx = self.window(tokens, slide)
            if ctx.size(1) == 1:                  # nothing to draft from: the first step is a plain one
                return ctx, 0, None, None
            h, _ = main(ctx[:, :-1], 0)
            return ctx[:, -1:], ctx.size(1) - 1, *draft(h, ctx[:, 1:], 0)

        out = idx
        y, pos, d, q = restart(idx, slide=False)
        while out.size(1) - idx.size(1) < max_new_tokens:
            if d is None or pos + 1 == window:    # no draft, or room for y alone: a plain step
                h, logits = main(y, pos)
                new = sample(logits, temperature, top_k)
            else:                                  # verify d, and draw the token after it if kept
                h, logits = main(torch.cat([y, d], dim=1), pos)
                if q is None:                      # greedy: d is kept iff it is the main model's argmax
                    tok = sample(logits[:1], 0)[0]
                    ok = tok == d[0]
                else:
                    ok, tok = verify_draft(probs(logits[:1], temperature, top_k), q, d[0])
                stats["drafted"] += 1
                stats["accepted"] += int(ok)
                new = torch.cat([d, sample(logits[1:], temperature, top_k)], dim=1) if ok else tok.view(1, 1)
            out, pos = torch.cat([out, new], dim=1), pos + new.size(1)
            if pos == window:                      # the window is full: slide as generate does
                y, pos, d, q = restart(out, slide=True)
            else:
                y, (d, q) = new[:, -1:], draft(h[:, :new.size(1)], new, pos - new.size(1))
        return out[:, :idx.size(1) + max_new_tokens], stats


def verify_draft(p, q, d):
    """Lossless speculative sampling: keep the draft d ~ q with probability min(1, p(d)/q(d)), else
    draw from the residual max(0, p - q), normalised. The token returned is distributed as p.
    p, q (N, V) target and draft distributions; d (N,) drafts. Returns (accepted (N,), token (N,))."""
    pd, qd = p.gather(-1, d[:, None])[:, 0], q.gather(-1, d[:, None])[:, 0]
    accepted = torch.rand(pd.shape, device=p.device) * qd < pd
    residual = (p - q).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)   # p == q: always accepted
    token = torch.where(accepted, d, torch.multinomial(residual, 1)[:, 0])
    return accepted, token


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
