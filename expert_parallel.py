"""Expert parallel training helpers for train.py (report §3.2): each rank holds a slice of every MoE
layer's routed experts (deepseek.MoE.shard) and tokens reach them by all-to-all (MoE.routed_parallel).
Here: the config checks, the slices' gradient scale, gathering them into one ordinary checkpoint and
re-sharding it on resume, the whole model's gradient norm for clipping, the all-to-all volume for the log."""
import torch
import torch.distributed as dist

from data import UserError
from deepseek import MoE


def check_expert_parallel(c, world):
    """One-line UserErrors for expert_parallel=True where it cannot run; world: torchrun's world size, None without."""
    if c.expert_parallel and world is None:
        raise UserError("expert_parallel=True needs torchrun (one process per device), e.g. "
                        "torchrun --standalone --nproc_per_node=2 train.py --expert_parallel=True")
    if c.expert_parallel and c.n_routed_experts % world:
        raise UserError(f"expert_parallel=True: the world size {world} must divide n_routed_experts={c.n_routed_experts}")
    if c.expert_parallel and c.dtype == "float16":     # its loss scaler would skip steps on some ranks only
        raise UserError("expert_parallel=True needs dtype bfloat16 or float32, not float16")


def shard_experts(model, world):
    """Keep only this rank's slice of every MoE layer's routed experts. Their gradients come through the
    all-to-all backward summed over the ranks' losses: 1/world makes them the gradient of the mean loss,
    as DDP's average is for the replicated weights. -> {name: parameter} of the slices."""
    for m in model.modules():
        if isinstance(m, MoE):
            m.shard(dist.group.WORLD)
            for p in m.experts.parameters():
                p.register_hook(lambda g: g / world)
    return {f"{n}.experts.{k}": p for n, m in model.named_modules() if isinstance(m, MoE)
            for k, p in m.experts.named_parameters()}


def map_experts(optimizer, sharded, state, opt_state, fn):
    """Replace the expert weights and their AdamW moments in a model and an optimizer state dict by fn
    of them: gather (saving) or slice (resuming) along the expert dimension."""
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    for name, p in sharded.items():
        state[name] = fn(state[name])
        i = index[id(p)]
        if i in opt_state["state"]:     # a fresh dict: optimizer.state_dict() shares the live one
            opt_state["state"][i] = {k: fn(v) if k in ("exp_avg", "exp_avg_sq") else v
                                     for k, v in opt_state["state"][i].items()}


def gather(t, world):
    """The ranks' slices of a tensor, concatenated in rank order (a collective: every rank calls it)."""
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def grad_norm(model, sharded):
    """The norm of the whole model's gradient; with expert slices their squared norms are summed over the
    ranks, so every rank clips by the same factor."""
    norm = lambda ps: torch.nn.utils.get_total_norm([p.grad for p in ps if p.grad is not None])   # noqa: E731
    if not sharded:
        return norm(model.parameters())
    experts = norm(sharded.values()) ** 2
    dist.all_reduce(experts)
    return (norm(p for n, p in model.named_parameters() if n not in sharded) ** 2 + experts).sqrt()


def all_to_all_volume(model, steps, device):
    """All ranks' training forwards since the last call (then cleared): per MoE layer, sends of a token
    to another rank per token (once to each rank holding any of its experts) and the expert copies they
    carry per token (what one send per copy would cost); bytes per step (dispatch and combine, forward;
    the backward moves as much again). -> (those figures, their text for the log line)"""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    t = torch.tensor([m.traffic for m in moes], dtype=torch.float64, device=device)
    dist.all_reduce(t)                  # logging only
    for m in moes:
        m.traffic = [0, 0, 0, 0]
    per_token = lambda i: [round(v, 3) for v in (t[:, i] / t[:, 0].clamp(min=1)).tolist()]   # noqa: E731
    v = dict(a2a_sends_per_token=per_token(1), a2a_copies_per_token=per_token(2),
             a2a_bytes_per_step=t[:, 3].sum().item() / steps)
    return v, (f" | a2a sends/token {' '.join(f'{s:.2f}' for s in v['a2a_sends_per_token'])}, "
               f"{v['a2a_bytes_per_step'] / 1e6:.2f} MB/step")
