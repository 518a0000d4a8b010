"""Expert parallelism (report §3.2): shard_experts(model, world) turns every MoE layer of a built
deepseek.Transformer into a ParallelMoE, whose rank holds a slice of the routed experts and reaches
them by all-to-all (sorted and multiplied by kernels.py's paths). Below it, what training needs around
it (train.py): gathering the slices into one ordinary checkpoint and re-sharding it on resume
(map_experts, gather), the whole model's gradient norm for clipping (grad_norm), and the all-to-all
volume for the log (all_to_all_volume). The config checks are train.check_config's.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import kernels
from deepseek import MoE


class ParallelMoE(MoE):
    """A MoE layer whose routed experts are sharded over a process group: rank r holds experts
    [r*n, (r+1)*n), n = n_routed_experts / world size; the gate and the shared experts are replicated.
    Training forwards count their traffic in tokens, sends, copies and bytes (read by all_to_all_volume).
    expert_gemm: kernels.install's, when it was installed before."""
    expert_gemm = None

    def shard(self, group):
        """Keep only this rank's slice of the routed experts."""
        W, r = dist.get_world_size(group), dist.get_rank(group)
        n = self.args.n_routed_experts // W
        for name, p in list(self.experts.named_parameters()):
            setattr(self.experts, name, nn.Parameter(p.detach()[r * n:(r + 1) * n].clone()))
        self.group = group
        self.tokens = self.sends = self.copies = self.bytes = 0

    def routed(self, x, weights, ids):
        """MoE.routed under expert parallelism (§3.2.2), sending each token once to each rank that holds
        any of its experts, with its expert ids and gate values; that rank runs them, sums their weighted
        outputs and sends one vector back. With one expert group per rank, n_limited_groups = M caps the
        ranks a token reaches (node-limited routing). -> (y, copies per expert: this rank's experts counted
        over all ranks' tokens, 0 elsewhere)"""
        g, (T, D), K = self.group, x.shape, ids.size(1)
        W, r, n = dist.get_world_size(g), dist.get_rank(g), self.experts.w1.size(0)
        x = x.to(kernels.compute_dtype(x))           # under autocast the tokens travel in its dtype (bf16: half the bytes)
        on = ids.unsqueeze(-1) // n == torch.arange(W, device=x.device)          # (T, K, W): slot k's expert is on rank j
        to = on.any(dim=1)                                                        # (T, W): token t goes to rank j
        # split sizes both ways, tokens and the expert copies they carry per rank: the layer's one host sync
        sizes = torch.stack([to.sum(0), on.sum((0, 1))], dim=1)
        got = torch.empty_like(sizes)
        dist.all_to_all_single(got, sizes, group=g)
        sizes, got = torch.stack([sizes, got]).tolist()
        send, recv, copies = [s[0] for s in sizes], [s[0] for s in got], sum(s[1] for s in got)
        dest, tok = torch.nonzero_static(to.t(), size=sum(send)).unbind(1)      # sends, by rank then token
        local = torch.where(ids[tok] // n == dest[:, None], ids[tok] % n, n).int()   # expert there, n: elsewhere
        local_in = local.new_empty(sum(recv), K)
        dist.all_to_all_single(local_in, local, recv, send, group=g)
        xw = AllToAll.apply(torch.cat([x[tok], weights[tok].type_as(x)], dim=1), send, recv, g)
        y, counts = self.run_local(xw[:, :D], xw[:, D:], local_in, copies)
        y = AllToAll.apply(y, recv, send, g)                                      # back to the tokens' ranks
        if self.training:
            sends, copies = (sum(c) - c[r] for c in zip(*sizes))                  # to other ranks
            row = (xw.size(1) + D) * xw.element_size() + K * local.element_size()  # bytes per send, there and back
            self.tokens, self.sends, self.copies = self.tokens + T, self.sends + sends, self.copies + copies
            self.bytes += sends * row
        return y.new_zeros(T, D).index_add(0, tok, y), F.pad(counts, (r * n, (W - r - 1) * n))

    def run_local(self, x, weights, ids, copies):
        """MoE.routed over the experts held here. An id equal to their number n marks a slot whose expert
        is on another rank: it sorts last and is skipped (output 0), so only the first `copies` pairs run."""
        (N, D), K, n = x.shape, ids.size(1), self.experts.w1.size(0)
        counts, perm = kernels.dispatch(ids, n + 1)
        ys = kernels.run_experts(self.experts, x[perm[:copies] // K], counts[:n], self.expert_gemm)
        ys = ys.new_zeros(N * K, D).index_copy(0, perm[:copies], ys).view(N, K, D)   # back in (token, slot) order
        return (weights.type_as(ys).unsqueeze(-1) * ys).sum(1), counts[:n]


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


def shard_experts(model, world):
    """Make every MoE layer a ParallelMoE over all ranks holding its slice of the routed experts. Their
    gradients come through the all-to-all backward summed over the ranks' losses: 1/world makes them the
    gradient of the mean loss, as DDP's average is for the replicated weights. -> {name: parameter} of the slices."""
    assert model.args.n_routed_experts % world == 0, "the world size must divide n_routed_experts"
    for m in model.modules():
        if isinstance(m, MoE):
            m.__class__ = ParallelMoE              # the same module, its routed experts reached by all-to-all
            m.shard(dist.group.WORLD)
            for p in m.experts.parameters():
                p.register_hook(lambda g: g / world)
    return {f"{n}.experts.{k}": p for n, m in model.named_modules() if isinstance(m, MoE)
            for k, p in m.experts.named_parameters()}


# ----------------------------------------------------------------------------- what train.py needs around it

def map_experts(optimizer, sharded, state, opt_state, fn):
    """Replace the expert weights and their optimizer state (AdamW's moments, Muon's momentum) in a model and an
    optimizer state dict by fn of them: gather (saving) or slice (resuming) along the expert dimension."""
    index = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    for name, p in sharded.items():
        state[name] = fn(state[name])
        i = index[id(p)]
        if i in opt_state["state"]:     # a fresh dict: optimizer.state_dict() shares the live one
            opt_state["state"][i] = {k: fn(v) if k in ("exp_avg", "exp_avg_sq", "momentum_buffer") else v
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
    moes = [m for m in model.modules() if isinstance(m, ParallelMoE)]
    t = torch.tensor([[m.tokens, m.sends, m.copies, m.bytes] for m in moes], dtype=torch.float64, device=device)
    dist.all_reduce(t)                  # logging only
    for m in moes:
        m.tokens = m.sends = m.copies = m.bytes = 0
    per_token = lambda i: [round(v, 3) for v in (t[:, i] / t[:, 0].clamp(min=1)).tolist()]   # noqa: E731
    v = dict(a2a_sends_per_token=per_token(1), a2a_copies_per_token=per_token(2),
             a2a_bytes_per_step=t[:, 3].sum().item() / steps)
    return v, (f" | a2a sends/token {' '.join(f'{s:.2f}' for s in v['a2a_sends_per_token'])}, "
               f"{v['a2a_bytes_per_step'] / 1e6:.2f} MB/step")
