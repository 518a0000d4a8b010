"""What the router of each MoE layer chose, shown in the text: sample.py --show_experts marks every generated
token by its top routed expert (benchmarks/specialization.py counts the same choices per domain).

    h, chosen = routing(model, idx)            # {MoE layer index: (gate values, experts)}
    print(mark_experts(pieces, top_experts(model, idx, layer).tolist(), terminal=True))
"""
import torch

from deepseek import MoE


@torch.no_grad()
def routing(model, idx):
    """What the router of each MoE layer of the main model chose for the tokens idx (B, S), read in one forward from
    position 0: (final hidden states h, {layer index: (gate values (B, S, k), chosen experts (B, S, k))})."""
    chosen = {}
    hooks = [layer.ffn.gate.register_forward_hook(lambda gate, x, out, i=i: chosen.update({i: out[1:]}))
             for i, layer in enumerate(model.layers) if isinstance(layer.ffn, MoE)]
    try:
        h = model.hidden(idx)
    finally:
        for hook in hooks:
            hook.remove()
    return h, {i: (w.view(*idx.shape, -1), e.view(*idx.shape, -1)) for i, (w, e) in chosen.items()}


def top_experts(model, idx, layer):
    """The top routed expert (largest gate value) of MoE layer `layer` for each token of idx (1, S), the text read
    in windows of the model's context from position 0, as in training -> (S,)."""
    tops = []
    for chunk in idx.split(model.args.max_seq_len, dim=1):
        weights, experts = routing(model, chunk)[1][layer]
        tops.append(experts.gather(-1, weights.argmax(-1, keepdim=True))[0, :, 0])
    return torch.cat(tops)


COLOURS = (203, 215, 227, 120, 87, 75, 141, 213, 167, 179, 149, 79, 116, 111, 183, 218)   # xterm-256 backgrounds


def mark_experts(pieces, experts, terminal):
    """Text from its tokens' pieces, each marked by its expert: on the expert's background colour on a terminal
    (a newline on a space before it), else followed by [expert]."""
    if not terminal:
        return "".join(f"{p}[{e}]" for p, e in zip(pieces, experts))
    return "".join("\n".join(f"\x1b[30;48;5;{COLOURS[e % len(COLOURS)]}m{line}\x1b[0m" if line else ""
                             for line in p.replace("\n", " \n").split("\n")) for p, e in zip(pieces, experts))
