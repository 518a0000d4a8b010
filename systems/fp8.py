"""FP8 training GEMMs as in DeepSeek-V3 (report §3.3), in plain PyTorch: convert(model) makes a built
deepseek.Transformer train its blocks' linear layers and routed experts in FP8.

Every tensor entering a GEMM is E4M3 (max 448) with fine-grained scales (§3.3.2): activations and
output gradients in 1x128 tiles along the GEMM's inner dimension, weights in 128x128 blocks, each
tile's scale from its own max-abs (online quantization). A GEMM is a sum over 128-wide chunks of the
inner dimension: each chunk is one FP8 x FP8 product with fp32 output, times its tile scales, added in
fp32 ("promotion to FP32 every N_C = 128 elements"). The activation saved for the backward stays FP8
(§3.3.3); the weight gradient re-quantizes it in 128x1 tiles since its inner dimension is the tokens.
On a GPU with FP8 tensor cores a GEMM is one block-scaled call or a loop of per-chunk calls, whichever
runs there; elsewhere (a CPU, older GPUs) it is emulated with the same numbers (gemm, describe).
"""
import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

import deepseek

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
TILE = 128              # tile width along the inner dimension, and N_C (the promotion interval)
FP8_CC = (8, 9)         # CUDA compute capability from which GPUs have FP8 tensor cores and Triton stores E4M3


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


# ----------------------------------------------------------------------------- the GEMM, and which op runs it

def gemm(a, b, b_rows=1, ops=None):
    """A B^T (M, N) in fp32 from quantized a = (q, s) (M, K) in 1x128 tiles and b (N, K) in b_rows x 128 tiles, by
    the first of the ops that takes the shape: those that run on this device (gemm_ops), or with `ops` those
    ((op, output dtype), ...; the tests force them); else emulated: the product of the dequantized operands in
    one fp32 matmul, exactly what the FP8 GEMM computes up to the order of the sum."""
    (qa, sa), (qb, sb) = a, b
    ops = dict(gemm_ops(qa.device) if ops is None else ops)
    with torch.autocast(qa.device.type, enabled=False):          # fp32 stays fp32 under autocast
        if "blockwise" in ops and qb.size(0) % TILE == 0:
            return blockwise_mm(qa, sa, qb, sb, b_rows, ops["blockwise"]).float()
        if "rowwise" in ops and qb.size(0) % 16 == 0:
            return chunked_mm(qa, sa, qb, sb, b_rows, ops["rowwise"])
        with full_fp32(qa.device):
            return dequantize(qa, sa) @ dequantize(qb, sb, b_rows).t()


def blockwise_mm(qa, sa, qb, sb, b_rows, dtype):
    """One F.scaled_mm with DeepSeek's recipe: A's scales per 1x128 tile, B's per 1x128 tile (b_rows=1: Wgrad) or
    per 128x128 block, laid out as PyTorch wants them (outer-dimension-major; block rows padded to a multiple of 4)."""
    qa, qb, tile, block = pad_k(qa), pad_k(qb), F.ScalingType.BlockWise1x128, F.ScalingType.BlockWise128x128
    sa = sa.t().contiguous().t()                                                  # (M, K/128), strides (1, M)
    if b_rows == 1:
        recipe, sb = tile, sb.t().contiguous().t()                                # (N, K/128), strides (1, N)
    else:
        recipe, sb = block, F.pad(sb, (0, -sb.size(1) % 4)).t()                   # (K/128 up to 4k, N/128)
    return F.scaled_mm(qa, qb.t(), sa, tile, sb, recipe, output_dtype=dtype)


def chunked_mm(qa, sa, qb, sb, b_rows, dtype):
    """Σ over the 128-wide chunks of the inner dimension of one torch._scaled_mm each, with A's tile scale per row
    and B's per column, added in fp32 ("promotion to FP32 every N_C = 128 elements")."""
    qa, qb = pad_k(qa), pad_k(qb)
    sa = sa.t().contiguous()                                                      # (chunks, M)
    sb = sb.repeat_interleave(b_rows, 0)[:qb.size(0)].t().contiguous()           # (chunks, N)
    out = qa.new_zeros(qa.size(0), qb.size(0), dtype=torch.float32)
    for c in range(sa.size(0)):
        k = slice(c * TILE, (c + 1) * TILE)
        out += torch._scaled_mm(qa[:, k], qb[:, k].t(), scale_a=sa[c, :, None], scale_b=sb[c, None], out_dtype=dtype)
    return out


def pad_k(q):
    """q (M, K) with zero columns up to a multiple of 128: every 128-wide chunk then starts 16-byte aligned, with a
    row stride that is too (cuBLAS wants both; a token count such as 756 is not), and block-wise GEMMs get whole tiles."""
    K = q.size(1)
    if K % TILE == 0:
        return q
    out = q.new_zeros(q.size(0), K + -K % TILE)
    out[:, :K] = q
    return out


@contextlib.contextmanager
def full_fp32(device):
    """fp32 matmuls in full fp32 on a GPU, whatever train.py chose for the rest (TF32 keeps 10 mantissa bits)."""
    if device.type != "cuda":
        yield
        return
    tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def candidates(device_type, capability):
    """The FP8 GEMMs worth trying on a device, fastest first, as (op, output dtype), where FP8 tensor cores exist
    (CUDA compute capability 8.9 on). "blockwise": one torch.nn.functional.scaled_mm per GEMM with the 1x128 /
    128x128 scales (PyTorch runs it on 9.x with cuBLAS 12.9+); "rowwise": torch._scaled_mm per 128-wide chunk
    (fp32 output on 9.x with cuBLAS 12.9+, bf16 output from 8.9). Elsewhere, a CPU included, none: emulated."""
    if device_type != "cuda" or tuple(capability) < FP8_CC:
        return ()
    ops = ("blockwise", "rowwise") if hasattr(F, "scaled_mm") else ("rowwise",)      # F.scaled_mm: recent torch only
    return tuple((op, dtype) for op in ops for dtype in (torch.float32, torch.bfloat16))


@torch.compiler.assume_constant_result     # torch.compile: a constant, not traced
@functools.cache                           # tried once per device
def gemm_ops(device):
    """For each op of candidates(device), the first output dtype with which it runs here and gives the emulation's
    product (probe says how): ((op, output dtype), ...)."""
    cc = torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)
    found = {}
    for op, dtype in candidates(device.type, cc):
        if op not in found and probe(op, dtype, device):
            found[op] = dtype
    return tuple(found.items())


def probe(op, dtype, device):
    """Whether op with this output dtype runs on device and equals the emulated GEMM (within bf16 rounding), with
    weight blocks (Fprop) and with 1x128 tiles (Wgrad). The operands' magnitudes vary by row and by 128-wide block
    (1e-2 to 1e2), so every tile has its own scale and a transposed or mis-strided scale gives another product."""
    g = torch.Generator().manual_seed(0)
    mags = lambda n: torch.logspace(-2, 2, n)[torch.randperm(n, generator=g)]    # noqa: E731
    a = torch.randn(2 * TILE, 3 * TILE, generator=g) * mags(2 * TILE)[:, None] * mags(3).repeat_interleave(TILE)
    b = torch.randn(2 * TILE, 3 * TILE, generator=g) * mags(2).repeat_interleave(TILE)[:, None] * mags(3 * TILE)
    a, b, mm = a.to(device), b.to(device), blockwise_mm if op == "blockwise" else chunked_mm
    try:
        for rows in (TILE, 1):
            (qa, sa), (qb, sb) = quantize(a), quantize(b, rows)
            out = mm(qa, sa, qb, sb, rows, dtype).float()
            with full_fp32(device):
                want = dequantize(qa, sa) @ dequantize(qb, sb, rows).t()
            if not (out - want).norm() <= 1e-2 * want.norm():
                return False
    except (RuntimeError, ValueError, NotImplementedError):   # not on this device, cuBLAS or torch
        return False
    return True


def describe(device, ops=None):
    """How the FP8 GEMMs run on device (or with `ops` forced, as gemm), in words (train.py logs it; bench.py labels
    its FP8 figures with it)."""
    names = dict(blockwise="tensor-core FP8, one F.scaled_mm per GEMM (1x128 / 128x128 scales)",
                 rowwise="tensor-core FP8, torch._scaled_mm per 128-wide chunk summed in fp32")
    ops = gemm_ops(torch.device(device)) if ops is None else ops
    ops = [f"{names[op]}, {str(dtype).removeprefix('torch.')} out" for op, dtype in ops]
    return "FP8 GEMMs: " + "".join(f"{o}; other shapes: " for o in ops) + \
        "emulated (dequantized operands, one fp32 matmul, TF32 off)"


class LinearFunction(torch.autograd.Function):
    """y = x W^T with all three GEMMs in FP8 (Fig. 6 of the report). x (..., in), W (out, in) the fp32
    master weight; y and dx in x's dtype, dW in fp32; ops: gemm's."""

    @staticmethod
    def forward(ctx, x, w, ops):
        ctx.shape, ctx.dtype, ctx.ops = x.shape, x.dtype, ops
        qx, qw = quantize(x.reshape(-1, x.size(-1))), quantize(w, TILE)
        ctx.save_for_backward(*qx, *qw)                                # the activation is kept in FP8
        return gemm(qx, qw, TILE, ops).to(x.dtype).view(*x.shape[:-1], w.size(0))   # Fprop: inner dimension = in

    @staticmethod
    def backward(ctx, dy):
        qx, sx, qw, sw = ctx.saved_tensors
        dy = dy.contiguous().view(-1, dy.size(-1))       # an expanded (zero-stride) gradient becomes real
        # Dgrad dx = dy W: inner dimension = out; W^T's 128x128 blocks are W's, transposed
        dx = gemm(quantize(dy), (qw.t().contiguous(), sw.t()), TILE, ctx.ops)
        # Wgrad dW = dy^T x: inner dimension = tokens, so dy and x go in 128x1 tiles (1x128 of the transposes)
        dw = gemm(quantize(dy.t()), quantize(dequantize(qx, sx).t()), 1, ctx.ops)
        return dx.to(ctx.dtype).view(ctx.shape), dw, None


def linear(x, w, ops=None):
    return LinearFunction.apply(x, w, ops)


class Linear(nn.Linear):
    """An nn.Linear (no bias) whose three GEMMs run in FP8; the weight stays the fp32 master. ops: convert's."""
    ops = None

    def forward(self, x):
        return linear(x, self.weight, self.ops)


class Experts(deepseek.Experts):
    """Routed experts whose projections run in FP8, one expert at a time. ops: convert's."""
    ops = None

    def forward(self, x, i):
        mm = lambda a, w: linear(a, w, self.ops)      # noqa: E731
        return mm(F.silu(mm(x, self.w1[i])) * mm(x, self.w3[i]), self.w2[i])


def convert(model, ops=None):
    """Train a deepseek.Transformer in FP8 (§3.3): every nn.Linear and Experts inside its blocks (the main
    layers and the MTP modules' blocks) becomes its FP8 version, the same module with the same weights. The
    embedding, output head, gates, norms and attention core stay in higher precision (§3.3.1), and so does
    MTP's eh_proj (our choice: half its input is a token embedding; the report's list does not name it).
    ops: None, the FP8 GEMMs found on the device each forward runs on; else gemm's `ops`, forced (converting again
    changes them). A checkpoint holds the fp32 masters under the same names and loads into a plain model. Returns model."""
    fp8_kind = {nn.Linear: Linear, deepseek.Experts: Experts, Linear: Linear, Experts: Experts}
    for block in [*model.layers, *(m.block for m in model.mtp)]:
        for m in block.modules():
            if type(m) in fp8_kind:
                m.__class__, m.ops = fp8_kind[type(m)], ops
    return model
