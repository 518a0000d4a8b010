"""bench.py --parts=specialization: what the experts learn (report §4.5.3, Figure 9). The CPU preset's MoE model is
trained on the three-domain corpus of data.py (English, code, mathematics) twice, the same but for the balancing:
the aux-loss-free bias and the auxiliary loss (the ablation's rows 3 and 4a). Then, per model, MoE layer and domain,
the relative load of every routed expert on that domain's validation text, and the mutual information between
domain and chosen expert: how much routing depends on the domain."""
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.ablation import ABLATION, run_val, train_row
from benchmarks.common import pyplot, spread
from inference.routing import routing
from pretraining import data

# the ablation's rows 3 and 4a (no MTP): the bias alone; the sequence-wise auxiliary loss alone (bias update off)
MODELS = (("aux-loss-free (bias)", ABLATION[2][1]), ("aux-loss-based (alpha 0.01)", ABLATION[3][1]))


@torch.no_grad()
def domain_routing(model, domains, T, batch_size=64):
    """Every MoE layer's choices on each domain's tokens, read in consecutive windows of T tokens from position 0:
    counts (layers, domains, experts) of the token copies routed to each expert, and each domain's mean main loss."""
    counts, losses = [], []
    for tokens in domains.values():
        n = (len(tokens) - 1) // T
        xy = torch.from_numpy(tokens[:n * T + 1].astype("int64"))
        x, y = xy[:-1].view(n, T), xy[1:].view(n, T)
        per_layer, loss = 0, 0.0
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            h, chosen = routing(model, xb)
            loss += F.cross_entropy(model.logits(h).flatten(0, 1), yb.flatten(), reduction="sum").item()
            per_layer = per_layer + torch.stack([torch.bincount(e.flatten(), minlength=model.args.n_routed_experts)
                                                 for _, e in chosen.values()])
        counts.append(per_layer)
        losses.append(loss / y.numel())
    return torch.stack(counts, dim=1).double(), losses


def relative_load(counts):
    """The report's relative expert load: each expert's actual load over the perfectly balanced load (the same
    number of token copies for every expert). counts (..., experts) -> the same shape; 1 is balanced."""
    return counts * counts.size(-1) / counts.sum(-1, keepdim=True)


def mutual_information(counts):
    """I(domain; expert) in bits for token copies counted per (domain, expert): counts (..., domains, experts) ->
    (...). 0 when every domain spreads its tokens over the experts alike, log2(domains) when each expert serves
    a single domain."""
    p = counts / counts.sum((-2, -1), keepdim=True)
    independent = p.sum(-1, keepdim=True) * p.sum(-2, keepdim=True)          # p(domain) p(expert)
    return torch.where(p > 0, p * (p / independent).log2(), 0).sum((-2, -1))


def run(args):
    """Train both models (--repeats seeds each, --iters steps) on the three-domain corpus, measure each on every
    domain's whole val text; print the per-domain val losses, the mutual information per layer and its mean over
    layers (mean ± sd over seeds), the relative loads of the first seed; draw them as the report's Figure 9."""
    root, results = Path(args.out), []
    for name, over in MODELS:
        runs = []
        for seed in range(args.repeats):
            r = train_row(args, root, name, {**over, "dataset": "domains"}, seed, args.iters, "specialization")
            model, c, val, meta = run_val(r["out"], args.text, args.data_dir)
            print(f"specialization: measuring {r['out']} on every domain's val text ...", file=sys.stderr, flush=True)
            counts, losses = domain_routing(model, data.val_by_domain(val, meta), c["block_size"])
            runs.append(dict(r, counts=counts, losses=losses, mi=mutual_information(counts)))
        results.append(dict(name=name, runs=runs))
    layers, domains = range(model.args.n_dense_layers, model.args.n_layers), list(meta["domains"])
    E, runs0 = model.args.n_routed_experts, [r["runs"][0] for r in results]

    print(f"\nspecialization: the three-domain corpus ({', '.join(domains)}; {meta['domains'][domains[0]][1]:,} val "
          f"tokens each), {args.iters} steps, {args.repeats} seed(s) per model (mean ± sd), "
          f"{torch.get_num_threads()} CPU threads\n")
    print(f"| model | {' | '.join(f'val loss {d}' for d in domains)} | "
          f"{' | '.join(f'I(domain; expert) layer {i}, bits' for i in layers)} | mean over layers | final MaxVio (training) |")
    print("|---|" + "---:|" * (len(domains) + len(layers) + 2))
    for r in results:
        print(f"| {r['name']} | {' | '.join(spread([x['losses'][d] for x in r['runs']]) for d in range(len(domains)))} | "
              f"{' | '.join(spread([x['mi'][i].item() for x in r['runs']]) for i in range(len(layers)))} | "
              f"{spread([x['mi'].mean().item() for x in r['runs']])} | "
              f"{statistics.mean(x['maxvio'] for x in r['runs']):.2f} |")
    print(f"\n(I(domain; expert): 0 when routing ignores the domain, log2({len(domains)}) = "
          f"{math.log2(len(domains)):.2f} when every expert serves one domain alone)")
    print("\nrelative load of each routed expert on each domain's val text (actual / perfectly balanced), first seed:\n")
    print(f"| model | layer | domain | {' | '.join(f'e{e}' for e in range(E))} |")
    print("|---|---:|---|" + "---:|" * E)
    for r, x in zip(results, runs0):
        for i, rel in zip(layers, relative_load(x["counts"])):
            for d, row in zip(domains, rel):
                print(f"| {r['name']} | {i} | {d} | {' | '.join(f'{v:.2f}' for v in row.tolist())} |")
    plot(results, layers, domains, root)
    return results


def plot(results, layers, domains, root):
    """The report's Figure 9 at nano scale: per layer (rows) and model (columns), the relative load of each expert
    (columns of a panel) on each domain (rows of a panel), first seed."""
    if (plt := pyplot("specialization")) is None:
        return
    rel = [relative_load(r["runs"][0]["counts"]) for r in results]
    top = max(x.max().item() for x in rel)
    fig, axes = plt.subplots(len(layers), len(results), figsize=(5.2 * len(results), 1.0 + 1.3 * len(layers)),
                             sharex=True, sharey=True, squeeze=False, layout="constrained")
    for col, (r, loads) in enumerate(zip(results, rel)):
        for ax, i, load in zip(axes[:, col], layers, loads):
            im = ax.imshow(load.numpy(), cmap="viridis", vmin=0, vmax=top, aspect="auto")
            for d, row in enumerate(load.tolist()):
                for e, v in enumerate(row):
                    ax.text(e, d, f"{v:.1f}", ha="center", va="center", fontsize=7, color="w" if v < top / 2 else "k")
            ax.set_yticks(range(len(domains)), domains)
            ax.set_xticks(range(load.size(-1)))
            ax.set_title(f"{r['name']}: layer {i}, I = {r['runs'][0]['mi'][i - layers[0]]:.3f} bits", fontsize=9)
        axes[-1, col].set_xlabel("routed expert")
    fig.colorbar(im, ax=axes, fraction=0.03, label="relative expert load (1 = balanced)")
    fig.suptitle("Relative expert load per domain (validation text, first seed)", fontsize=10)
    fig.savefig(root / "expert_specialization.png", dpi=120)
    print(f"plot: {root / 'expert_specialization.png'}")
