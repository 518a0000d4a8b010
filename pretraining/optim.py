"""The optimizers and their schedule, as train.py, sft.py and grpo.py use them: AdamW with weight decay
on the matrices (DeepSeek-V3, report §4.2), or Muon for the blocks' matrices and AdamW for the rest
(DeepSeek-V4, Kimi K2, Moonlight); a linear warmup, then a cosine decay to a floor.

    optimizer = configure_optimizer(model, learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.95),
                                    device_type="cpu", optimizer="muon")
    for group in optimizer.param_groups:
        group["lr"] = get_lr(step, c)   # c: warmup_iters, lr_decay_iters, learning_rate, min_lr, ...
"""
import math

import torch
from torch.optim.adamw import adamw

from deepseek import Experts

OPTIMIZERS = ("adamw", "muon")      # configure_optimizer's choices (train.py, sft.py, bench.py check them)
# modded-nanogpt's quintic Newton-Schulz iteration (Keller Jordan), as nanochat and Moonlight run it
NS_COEFFICIENTS, NS_STEPS = (3.4445, -4.7750, 2.0315), 5


def configure_optimizer(model, learning_rate, weight_decay, betas, device_type, optimizer="adamw",
                        muon_rms=2.0, muon_momentum=0.95, muon_experts=True):
    """optimizer "adamw": AdamW with weight decay on matrices (linear and embedding weights, the router's
    e_i) only; norms are not decayed, and the balancing biases are buffers the optimizer never sees.
    "muon": the same, but the blocks' matrices (attention with MLA's low-rank projections, dense FFNs,
    shared and routed experts, MTP's eh_proj) by Muon; embedding, output head and gate centroids stay
    on AdamW, and the routed experts too with muon_experts=False. Fused (one kernel over all tensors)
    on CPU and CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    matrices, vectors = [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]
    fused = device_type in ("cuda", "cpu")
    if optimizer == "adamw":
        return torch.optim.AdamW([dict(params=matrices, weight_decay=weight_decay),
                                  dict(params=vectors, weight_decay=0.0)],
                                 lr=learning_rate, betas=betas, fused=fused)
    adam = {id(model.embed.weight), id(model.head.weight)} | {id(g.weight) for g in model.gates()}
    if not muon_experts:
        adam |= {id(p) for m in model.modules() if isinstance(m, Experts) for p in m.parameters()}
    hidden = [p for p in matrices if id(p) not in adam]
    return Muon([dict(params=hidden, muon=True, weight_decay=weight_decay),
                 dict(params=[p for p in matrices if id(p) in adam], weight_decay=weight_decay),
                 dict(params=vectors, weight_decay=0.0)],
                lr=learning_rate, betas=betas, rms=muon_rms, momentum=muon_momentum, fused=fused)


def orthogonalize(G, steps=NS_STEPS):
    """About U V^T for each matrix G = U S V^T in G (..., m, n): quintic Newton-Schulz iterations
    X <- aX + (bA + cA^2)X, A = XX^T, from X = G over its Frobenius norm (spectral norm at most 1).
    The coefficients buy speed, not exactness: a singular value from 1/100 of the largest up ends in
    about [0.68, 1.21], not at 1 (smaller ones lower). The leading dimensions are a batch of matrices,
    each on its own: a stack of experts (E, m, n) is orthogonalized expert by expert. In bf16 on CUDA
    (as modded-nanogpt), else in fp32."""
    X = G.to(torch.bfloat16 if G.is_cuda else torch.float32).reshape(-1, *G.shape[-2:])
    wide = X.size(-2) <= X.size(-1)
    X = X if wide else X.mT                        # A = XX^T on the smaller side
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        A = X @ X.mT
        X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)   # aX + (bA + cA^2)X
    return (X if wide else X.mT).reshape(G.shape).type_as(G)


class Muon(torch.optim.Optimizer):
    """Muon (MomentUm Orthogonalized by Newton-Schulz; Keller Jordan, 2024) for the param groups with
    muon=True, AdamW for the others: one optimizer, one state dict. A Muon matrix W (m x n) steps along
    its orthogonalized Nesterov momentum, with AdamW's decoupled weight decay:
        M <- mu M + (1 - mu) G
        W <- (1 - lr wd) W - lr rms sqrt(max(m, n)) orthogonalize(mu M + (1 - mu) G)
    An orthogonal m x n matrix has RMS 1 / sqrt(max(m, n)), so an update's RMS is lr * rms whatever the
    shape: Moonlight's scaling (arXiv 2502.16982), whose rms 0.2 matches AdamW's update so that both
    share one learning rate and weight decay. A stack of experts (E, m, n) is orthogonalized expert by
    expert. The step leaves the Nesterov momentum in the Muon matrices' .grad."""

    def __init__(self, groups, lr, betas, rms, momentum=0.95, eps=1e-8, fused=None):
        # fused in each group, as torch's AdamW keeps it: loading a state dict puts the step counts beside
        # the weights then, as the fused kernel wants them (None: torch picks, foreach where it can)
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, muon=False, rms=rms,
                                      momentum=momentum, fused=fused or None))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self.muon_step if group["muon"] else self.adamw_step)(group, params)

    def muon_step(self, group, params):
        lr, mu = group["lr"], group["momentum"]
        batches = {}        # one orthogonalization per shape: 2-D matrices stacked, experts alone
        for p in params:
            buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
            buf.lerp_(p.grad, 1 - mu)
            p.grad.lerp_(buf, mu)
            p.mul_(1 - lr * group["weight_decay"])
            batches.setdefault(p.shape if p.dim() == 2 else id(p), []).append(p)
        for ps in batches.values():
            m, n = ps[0].shape[-2:]
            O = orthogonalize(torch.cat([p.grad.reshape(-1, m, n) for p in ps]))
            for p, o in zip(ps, O.split([p.numel() // (m * n) for p in ps])):
                p.add_(o.view_as(p), alpha=-lr * group["rms"] * math.sqrt(max(m, n)))

    def adamw_step(self, group, params):
        for p in params:
            if not self.state[p]:           # the step count where torch's AdamW keeps it
                self.state[p].update(step=torch.zeros((), device=p.device if group["fused"] else "cpu"),
                                     exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        state = [self.state[p] for p in params]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in state],
              [s["exp_avg_sq"] for s in state], [], [s["step"] for s in state], fused=group["fused"],
              amsgrad=False, beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"],
              weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def get_lr(it, c):
    """Linear warmup over warmup_iters, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not c.decay_lr:
        return c.learning_rate
    if it < c.warmup_iters:
        return c.learning_rate * (it + 1) / (c.warmup_iters + 1)
    if it >= c.lr_decay_iters:
        return c.min_lr
    ratio = (it - c.warmup_iters) / max(1, c.lr_decay_iters - c.warmup_iters)
    return c.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c.learning_rate - c.min_lr)
