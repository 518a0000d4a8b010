"""FP8 training GEMMs as in DeepSeek-V3 (report §3.3), in plain PyTorch: convert(model) makes a built
deepseek.Transformer train its blocks' linear layers and routed experts in FP8.

Every tensor entering a GEMM is E4M3 (max 448) with fine-grained scales (§3.3.2): activations and
output gradients in 1x128 tiles along the GEMM's inner dimension, weights in 128x128 blocks, each
tile's scale from its own max-abs (online quantization). A GEMM is a sum over 128-wide chunks of the
inner dimension: each chunk is one FP8 x FP8 product with fp32 output, times its tile scales, added in
fp32 ("promotion to FP32 every N_C = 128 elements"). The activation saved for the backward stays FP8
(§3.3.3); the weight gradient re-quantizes it in 128x1 tiles since its inner dimension is the tokens.
"""
import torch
import torch.nn.functional as F
from torch import nn

import deepseek

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
TILE = 128              # tile width along the inner dimension, and N_C (the promotion interval)
SCALED_MM = None        # None: torch._scaled_mm where it runs; True / False: force one path (tests)
RUNS = {}               # device -> whether torch._scaled_mm runs there


def quantize(x, rows=1):
    """x (M, K) -> (q E4M3 (M, K), s fp32 (ceil(M/rows), ceil(K/128))): one scale per rows x 128 tile,
    max-abs / 448, so q * s ~ x. rows=1: activation tiles, rows=128: weight blocks. Tiles at the end
    take what is left; an all-zero tile gets scale 1 (no 0/0)."""
    M, K = x.shape
    x = x.float().contiguous()                      # q row-major, as _scaled_mm wants A
    padded = F.pad(x, (0, -K % TILE, 0, -M % rows))
    amax = padded.view(padded.size(0) // rows, rows, padded.size(1) // TILE, TILE).abs().amax(dim=(1, 3))
    s = torch.where(amax > 0, amax / FP8_MAX, 1.0)
    # round to nearest by the cast; it does not saturate everywhere, so clamp the rounding overshoot
    q = (x / expand(s, rows, M, K)).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, s


def expand(s, rows, M, K):
    """Tile scales (ceil(M/rows), ceil(K/128)) -> one per element (M, K)."""
    return s.repeat_interleave(rows, 0)[:M].repeat_interleave(TILE, 1)[:, :K]


def dequantize(q, s, rows=1):
    return q.float() * expand(s, rows, *q.shape)


@torch.compiler.assume_constant_result     # torch.compile: a constant, not traced
def scaled_mm_runs(device):
    """Whether torch._scaled_mm with per-row scales and fp32 output runs here (CPU; CUDA cc >= 8.9
    with a recent cuBLAS). Elsewhere the chunks are dequantized and multiplied in fp32: the same numbers."""
    if device not in RUNS:
        try:
            a, one = torch.zeros(16, 16, device=device).to(FP8), torch.ones(16, 1, device=device)
            torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one.t(), out_dtype=torch.float32)
            RUNS[device] = True
        except (RuntimeError, ValueError):
            RUNS[device] = False
    return RUNS[device]


def chunk_mm(qa, qb, sa, sb):
    """One chunk: (M, k) x (N, k)^T E4M3 product in fp32, times row scales sa (M, 1) and column scales sb (1, N)."""
    use = SCALED_MM if SCALED_MM is not None else \
        scaled_mm_runs(qa.device) and qa.size(1) % 16 == 0 and qb.size(0) % 16 == 0   # cuBLAS shape rule
    if use:
        return torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32)
    return (qa.float() * sa) @ (qb.float() * sb.t()).t()


def gemm(a, b, b_rows=1):
    """A B^T (M, N) in fp32 from quantized a = (q, s) (M, K) in 1x128 tiles and b (N, K) in b_rows x 128
    tiles. Within a chunk of 128 along K, A's tile scale is one per row and B's one per column."""
    (qa, sa), (qb, sb) = a, b
    sa = sa.t().contiguous()                                                      # (chunks, M)
    sb = sb.repeat_interleave(b_rows, 0)[:qb.size(0)].t().contiguous()           # (chunks, N)
    out = qa.new_zeros(qa.size(0), qb.size(0), dtype=torch.float32)
    with torch.autocast(qa.device.type, enabled=False):          # fp32 stays fp32 under autocast
        for c in range(sa.size(0)):
            k = slice(c * TILE, (c + 1) * TILE)
            out += chunk_mm(qa[:, k], qb[:, k], sa[c, :, None], sb[c, None])
    return out


class LinearFunction(torch.autograd.Function):
    """y = x W^T with all three GEMMs in FP8 (Fig. 6 of the report). x (..., in), W (out, in) the fp32
    master weight; y and dx in x's dtype, dW in fp32."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.shape, ctx.dtype = x.shape, x.dtype
        qx, qw = quantize(x.reshape(-1, x.size(-1))), quantize(w, TILE)
        ctx.save_for_backward(*qx, *qw)                                # the activation is kept in FP8
        return gemm(qx, qw, TILE).to(x.dtype).view(*x.shape[:-1], w.size(0))   # Fprop: inner dimension = in

    @staticmethod
    def backward(ctx, dy):
        qx, sx, qw, sw = ctx.saved_tensors
        dy = dy.contiguous().view(-1, dy.size(-1))       # an expanded (zero-stride) gradient becomes real
        # Dgrad dx = dy W: inner dimension = out; W^T's 128x128 blocks are W's, transposed
        dx = gemm(quantize(dy), (qw.t().contiguous(), sw.t()), TILE)
        # Wgrad dW = dy^T x: inner dimension = tokens, so dy and x go in 128x1 tiles (1x128 of the transposes)
        dw = gemm(quantize(dy.t()), quantize(dequantize(qx, sx).t()))
        return dx.to(ctx.dtype).view(ctx.shape), dw


def linear(x, w):
    return LinearFunction.apply(x, w)


class Linear(nn.Linear):
    """An nn.Linear (no bias) whose three GEMMs run in FP8; the weight stays the fp32 master."""

    def forward(self, x):
        return linear(x, self.weight)


class Experts(deepseek.Experts):
    """Routed experts whose projections run in FP8: one expert at a time (one host sync for the slice sizes)."""

    def expert(self, e, x):
        return linear(F.silu(linear(x, self.w1[e])) * linear(x, self.w3[e]), self.w2[e])

    def forward(self, x, counts):
        return torch.cat([self.expert(e, xe) for e, xe in enumerate(x.split(counts.tolist()))])


def convert(model):
    """Train a deepseek.Transformer in FP8 (§3.3): every nn.Linear and Experts inside its blocks (the main
    layers and the MTP modules' blocks) becomes its FP8 version, the same module with the same weights. The
    embedding, output head, gates, norms and attention core stay in higher precision (§3.3.1), and so does
    MTP's eh_proj (our choice: half its input is a token embedding; the report's list does not name it).
    A checkpoint holds the fp32 masters under the same names and loads into a plain model. Returns model."""
    for block in [*model.layers, *(m.block for m in model.mtp)]:
        for m in block.modules():
            if type(m) in (nn.Linear, deepseek.Experts):
                m.__class__ = Linear if type(m) is nn.Linear else Experts
    return model
