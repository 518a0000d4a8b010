"""The optimizer and its schedule, as train.py, sft.py and grpo.py use them: AdamW with weight decay on the
matrices (report §4.2), a linear warmup, then a cosine decay to a floor.

    optimizer = configure_optimizer(model, learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu")
    for group in optimizer.param_groups:
        group["lr"] = get_lr(step, c)        # c: warmup_iters, lr_decay_iters, learning_rate, min_lr, decay_lr
"""
import math

import torch


def configure_optimizer(model, learning_rate, weight_decay, betas, device_type):
    """AdamW with weight decay on matrices (linear and embedding weights, the router's e_i) only; norms
    are not decayed, and the balancing biases are buffers the optimizer never sees. Fused (one kernel
    over all tensors) on CPU and CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))


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
