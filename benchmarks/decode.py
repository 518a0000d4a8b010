"""bench.py --parts=decode: greedy decoding speed with no cache (nanoGPT's way), with the naive and the
absorbed MLA cache and with MTP speculative decoding, side by side; where a speculative step's time goes;
the cache sizes per token of MLA and MHA at the nano and DeepSeek-V3 shapes."""
import dataclasses
from pathlib import Path

import torch

import deepseek as ds
import kernels
from benchmarks.common import V3_CONFIG, preset_args, timed
from checkpoint.ckpt import load_checkpoint
from inference.speculative import generate_speculative
from pretraining.data import tokenizer_from_meta


def cache_numbers_per_token(args, attn_impl="absorb"):
    """Numbers one layer caches per token at decode: the absorbed MLA latent + shared RoPE key,
    or full per-head K and V (MHA, or MLA in naive mode)."""
    if args.attn == "mla" and attn_impl == "absorb":
        return args.kv_lora_rank + args.qk_rope_head_dim
    return args.n_heads * (args.qk_nope_head_dim + args.qk_rope_head_dim + args.v_head_dim)


@torch.no_grad()
def recompute(model, idx, n):
    """Greedy decoding with no cache: the whole context again for every token (nanoGPT's sample.py)."""
    for _ in range(n):
        nxt = model(idx[:, -model.args.max_seq_len:])[0][:, -1].argmax(-1, keepdim=True)
        idx = torch.cat([idx, nxt], dim=1)
    return idx


def generate(model, idx, n, attn_impl):
    model.set_attn_impl(attn_impl)
    return model.generate(idx, n, temperature=0)


def first_difference(ref, outs):
    """'yes' when every output equals ref, else the first generated position where one differs."""
    d = [(ref[0] != o[0]).nonzero() for o in outs]
    d = [int(i[0]) for i in d if len(i)]
    return "yes" if not d else f"differ from token {min(d)}"


def header():
    print("| model | prompt+new tokens | recompute tok/s | naive cache | absorb cache | speculative | "
          "absorb / recompute | speculative / recompute | speculative / absorb | acceptance greedy / T=1 | "
          "tokens per forward | same greedy tokens |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")


def row(name, model, idx, n, repeats):
    """Greedy tokens/s of each decoding mode on the same prompt, in exact fp32 (TF32 off for the
    comparison: the modes multiply in different orders, and TF32 would flip near-ties)."""
    model.eval()
    tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    try:
        (t_re, t_na, t_ab, t_sp), (ref, naive, absorb, (spec, st)) = timed(
            [lambda: recompute(model, idx, n), lambda: generate(model, idx, n, "naive"),
             lambda: generate(model, idx, n, "absorb"), lambda: generate_speculative(model, idx, n, temperature=0)],
            repeats)
        torch.manual_seed(0)
        _, sampled = generate_speculative(model, idx, n, temperature=1.0)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    # past the window recompute crops where the caches slide: only the cached modes must agree there
    same = first_difference(ref, (naive, absorb, spec)) if idx.size(1) + n <= model.args.max_seq_len \
        else first_difference(absorb, (naive, spec))
    print(f"| {name} | {idx.size(1)}+{n} | {n / t_re:.0f} | {n / t_na:.0f} | {n / t_ab:.0f} | {n / t_sp:.0f} | "
          f"{t_re / t_ab:.1f}x | {t_re / t_sp:.1f}x | {t_ab / t_sp:.2f}x | "
          f"{st['accepted'] / max(st['drafted'], 1):.0%} / {sampled['accepted'] / max(sampled['drafted'], 1):.0%} | "
          f"{n / st['forwards']:.2f} | {same} |")


@torch.no_grad()
def step_profile(name, model, repeats, calls=20):
    """Where a speculative step's time goes, against one plain decoding step (the main model over one
    token): the main model over the two tokens [y, d], and the MTP draft (its block, the head, the
    argmax) over one or two positions, at the middle of the window; interleaved rounds, best kept.
    Also the operator calls of one main-model step: at small sizes the time goes per call."""
    from torch.profiler import profile
    if not model.mtp:
        return
    model.eval()
    S, mtp = model.args.max_seq_len // 2, model.mtp[0]
    t = torch.randint(0, model.args.vocab_size, (1, S + 3))
    model.hidden(t[:, :S], 0)
    h = model.hidden(t[:, S:S + 2], S)

    def draft(n):
        cos, sin, mask = model.positions(S, n)
        hm = mtp(h[:, :n], model.embed(t[:, S + 1:S + 1 + n]), cos, sin, S, mask)
        return model.logits(hm[:, -1], mtp.norm).argmax(-1)

    def main(n):
        return model.logits(model.hidden(t[:, S:S + n], S)[0]).argmax(-1)
    parts = [("main model, 1 token (a plain step)", lambda: main(1)),
             ("main model, 2 tokens (verify [y, d])", lambda: main(2)),
             ("MTP draft, 1 position (after a rejection)", lambda: draft(1)),
             ("MTP draft, 2 positions (after an acceptance)", lambda: draft(2))]
    times, _ = timed([lambda f=f: [f() for _ in range(calls)] for _, f in parts], repeats)
    with profile() as prof:
        parts[0][1]()
    ops = sum(e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
              for e in prof.events())
    print(f"\n{name}: a speculative step against a plain one ({ops} operator calls in a plain step)")
    print("| part | ms | vs a plain step |")
    print("|---|---:|---:|")
    for (label, _), t_ in zip(parts, times):
        print(f"| {label} | {1000 * t_ / calls:.2f} | {t_ / times[0]:.2f}x |")
    print()


def run(args):
    """CPU decoding speed, side by side: tokens/s without cache, with the naive (per-head K/V) and the
    absorbed (latent) MLA cache, and with MTP speculative decoding; then cache sizes per token."""
    torch.manual_seed(0)
    print(f"decode: CPU, {torch.get_num_threads()} threads, greedy, best of {args.timing_repeats} interleaved rounds")
    header()
    for out_dir in filter(None, args.ckpts.split(",")):
        path = Path(out_dir) / "ckpt.pt"
        if not path.exists():
            print(f"| {out_dir} | no checkpoint: train it first (python train.py ...) | | | | | | | | | | |")
            continue
        model, ckpt = load_checkpoint(path, "cpu")
        encode, _ = tokenizer_from_meta(ckpt["meta"])
        idx = torch.tensor([encode("ROMEO:\n")])
        row(out_dir, model, idx, model.args.max_seq_len - idx.size(1), args.timing_repeats)
        step_profile(out_dir, model, args.timing_repeats)
    # long context: the GPU preset's shape (random weights: speed does not depend on training)
    long = kernels.install(ds.Transformer(dataclasses.replace(preset_args("shakespeare_char"), max_seq_len=1024)))
    idx = torch.randint(0, long.args.vocab_size, (1, 512))
    row("GPU preset's shape, untrained, 512 context", long, idx, args.long_tokens, args.timing_repeats)

    print("\n| attention | numbers cached per token per layer | KiB per token, all layers (bf16) | vs MLA absorb |")
    print("|---|---:|---:|---:|")
    for name, a in [("CPU preset", preset_args("shakespeare_char_cpu")), ("GPU preset", preset_args("shakespeare_char")),
                    ("DeepSeek-V3 671B", ds.ModelArgs.from_json(V3_CONFIG))]:
        base = cache_numbers_per_token(a)
        for label, attn, impl in [("MLA absorb", "mla", "absorb"), ("MLA naive", "mla", "naive"), ("MHA", "mha", "absorb")]:
            n = cache_numbers_per_token(dataclasses.replace(a, attn=attn), impl)
            print(f"| {name}: {label} | {n:,} | {n * a.n_layers * 2 / 1024:,.1f} | {n / base:.1f}x |")
