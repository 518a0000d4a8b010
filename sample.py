"""Sample from a trained model, decoding with the compressed MLA cache and, when the checkpoint has
an MTP module, lossless MTP speculative decoding (report §5.4.3).

    python sample.py                                    # from what `python train.py` wrote (out/ckpt.pt)
    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python sample.py --start=FILE:prompt.txt --temperature=0 --speculative=False --attn_impl=naive
    python sample.py --out_dir=out-domains-cpu --show_experts=1    # each token marked by its expert in layer 1
    python sample.py --init_from=out-hf                 # a folder in DeepSeek's layout (hf.py), with its tokenizer
    python sample.py --init_from=DeepSeek-V2-Lite --device=cuda --dtype=bfloat16 --start="The capital of France is"
    python sample.py --out_dir=out-grpo-cpu --chat="What is 12 times 7?"   # a chat checkpoint's answer (greedy)
    python sample.py --out_dir=out-grpo-cpu --chat=FILE:questions.txt     # one answer per line of the file, batched
"""
import argparse
import sys
import time
from pathlib import Path

import torch

import chat
import hf
import kernels
from configurator import pick_device
from data import UserError, run_cli, tokenizer_from_meta
from deepseek import MoE, probs, sample
from train import load_checkpoint


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(message)


def boolean(s):
    if s.lower() in ("true", "1", "yes"):
        return True
    if s.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, not {s!r}")


def parse(argv):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default="out", help="folder holding ckpt.pt")
    p.add_argument("--init_from", default="", help="a folder in DeepSeek's layout (config.json, safetensors, "
                   "tokenizer.json; hf.py) to sample from instead of out_dir")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="the weights' dtype (bfloat16 halves the memory of a large model)")
    p.add_argument("--start", default="\n", help="prompt text, or FILE:path to read it from a file")
    p.add_argument("--num_samples", type=int, default=3)
    p.add_argument("--max_new_tokens", type=int, default=300)
    p.add_argument("--temperature", type=float, default=None, help="0 is greedy; default 0.8, with --chat 0")
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--speculative", type=boolean, default=None, help="MTP drafts; default: on when the checkpoint has MTP")
    p.add_argument("--attn_impl", choices=["absorb", "naive"], default="absorb",
                   help="MLA decode cache: latent + RoPE key (absorb) or full per-head K/V (naive)")
    p.add_argument("--kernels", type=boolean, default=True,
                   help="kernels.py's MoE paths (False: deepseek.py's reference loop over experts)")
    p.add_argument("--show_experts", type=int, default=None, metavar="LAYER",
                   help="mark each token with its top routed expert in MoE layer LAYER (an index into model.layers)")
    p.add_argument("--chat", default=None, metavar="QUESTION", help="a chat checkpoint (sft.py, grpo.py) answers QUESTION "
                   "through its template, or each line of a file (FILE:path): only the answers are printed, one a line")
    a = p.parse_args(argv)
    a.temperature = (0.0 if a.chat is not None else 0.8) if a.temperature is None else a.temperature
    if a.chat is not None and (a.speculative or a.show_experts is not None):
        raise UserError("--chat answers in one batch from the latent cache: without --speculative or --show_experts")
    if a.num_samples < 1 or a.max_new_tokens < 1 or a.temperature < 0 or a.top_k < 1:
        raise UserError("num_samples, max_new_tokens and top_k must be >= 1, temperature >= 0")
    return a


def now():
    """time.perf_counter() once the current CUDA device has finished its queued work (kernels run
    asynchronously, so a clock read alone would time only their launch)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def read_prompt(start):
    if not start.startswith("FILE:"):
        return start
    path = Path(start[5:]).expanduser()
    if not path.is_file():
        raise UserError(f"prompt file {path} not found")
    return path.read_text(encoding="utf-8")


def answer(model, template, text, a, batch_size=256):
    """--chat: each question of text (a line of a FILE:, or the text itself) through the chat template, answered in
    batches (chat.generate) up to the end token or max_new_tokens; one printed line per answer (a newline in one as \\n)."""
    questions = read_prompt(text).splitlines() if text.startswith("FILE:") else [text]
    prompts = []
    for i, q in enumerate(questions):
        try:
            prompts.append(template.prompt(q))
        except ValueError as e:                   # characters the char tokenizer does not know, a chat token
            raise UserError(f"question{f' on line {i + 1}' if text.startswith('FILE:') else ''}: {e}") from None
    if not prompts:
        raise UserError("no questions: the file is empty")
    limit = min(a.max_new_tokens, model.args.max_seq_len - max(map(len, prompts)))
    if limit < 1:
        raise UserError(f"a question of {max(map(len, prompts))} tokens leaves no room in the context of "
                        f"{model.args.max_seq_len}")
    torch.manual_seed(a.seed)
    for at in range(0, len(prompts), batch_size):
        for tokens, _ in chat.generate(model, prompts[at:at + batch_size], limit, template.eos, 1, a.temperature, a.top_k):
            print(template.decode(tokens).replace("\n", "\\n"))


# ----------------------------------------------------------------------------- MTP speculative decoding

@torch.no_grad()
def generate_speculative(model, idx, max_new_tokens, temperature=1.0, top_k=None):
    """Speculative decoding with the first MTP module as drafter (report §5.4.3), one sequence.
    State: the caches hold `pos` tokens; y, the last token drawn, is pending (not yet cached);
    d is the MTP draft for the token after y, drawn from q. One step runs the main model over
    [y, d], keeps or replaces d by verify_draft and, when d is kept, draws the token after it
    too. The output follows the main model exactly (token for token when greedy, also past the
    context window: it slides where generate does). Rejected positions need no cache rollback:
    the next chunk starts there and overwrites them. Returns (idx, stats)."""
    assert idx.size(0) == 1, "speculative decoding runs one sequence at a time"
    assert model.mtp, "speculative decoding needs an MTP module (n_mtp >= 1)"
    mtp, window = model.mtp[0], model.args.max_seq_len
    stats = dict(forwards=0, drafted=0, accepted=0)

    def main(chunk, pos):
        """The main model over chunk at pos: hidden states, next-token logits."""
        stats["forwards"] += 1
        h = model.hidden(chunk, pos)
        return h, model.logits(h[0])

    def draft(h, nxt, pos):
        """MTP over positions pos.. from their main hidden states h and the tokens after them (nxt):
        a draft for the token after nxt's last, and its distribution q (None when greedy)."""
        cos, sin, mask = model.positions(pos, nxt.size(1))
        hm = mtp(h, model.embed(nxt), cos, sin, pos, mask)
        logits = model.logits(hm[:, -1], mtp.norm)
        if temperature == 0:
            return sample(logits, 0), None
        q = probs(logits, temperature, top_k)
        return torch.multinomial(q, 1), q

    def restart(tokens, slide):
        """Fresh caches from the window's tokens but the last, which becomes y. -> y, pos, d, q"""
        ctx = model.window(tokens, slide)
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


# ----------------------------------------------------------------------------- routing shown in the text

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


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    a = parse(sys.argv[1:] if argv is None else argv)
    device = pick_device(a.device)
    dtype = getattr(torch, a.dtype)
    if a.init_from:
        model, meta = hf.load(a.init_from, dtype, device)
        if meta is None:
            raise UserError(f"{a.init_from} has no tokenizer.json to encode the prompt with")
    else:
        model, ckpt = load_checkpoint(Path(a.out_dir) / "ckpt.pt", device, install_kernels=False)
        model, meta = model.to(dtype), ckpt["meta"]
    if a.kernels:
        kernels.install(model)
    model.set_attn_impl(a.attn_impl)
    if a.chat is not None:
        return answer(model, chat.Template(meta, a.init_from or Path(a.out_dir) / "ckpt.pt"), a.chat, a)
    moe = [i for i, layer in enumerate(model.layers) if isinstance(layer.ffn, MoE)]
    if a.show_experts is not None and not moe:
        raise UserError("--show_experts: the checkpoint's model is dense (n_routed_experts=0): no routed experts")
    if a.show_experts not in moe + [None]:
        raise UserError(f"--show_experts={a.show_experts}: not an MoE layer of this model (those are "
                        f"{', '.join(map(str, moe))}; layers count from 0)")
    encode, decode = tokenizer_from_meta(meta)
    speculative = bool(model.mtp) if a.speculative is None else a.speculative
    if speculative and not model.mtp:
        raise UserError("--speculative=True needs a checkpoint trained with MTP (n_mtp >= 1)")

    try:
        ids = encode(read_prompt(a.start))
    except ValueError as e:                          # characters the char tokenizer does not know
        raise UserError(f"prompt: {e}") from None
    if not ids:
        raise UserError("the prompt is empty after tokenisation")
    window = model.args.max_seq_len
    if len(ids) > window:
        print(f"note: prompt of {len(ids)} tokens cropped from the left to the context of {window}", file=sys.stderr)
        ids = ids[-window:]
    if len(ids) + a.max_new_tokens > window:
        print(f"note: {len(ids)} + {a.max_new_tokens} tokens exceed the context of {window}: when it is full, "
              f"generation slides (keeps the last {window // 2} tokens and prefills again)", file=sys.stderr)
    x = torch.tensor([ids], dtype=torch.long, device=device)
    if a.show_experts is not None:
        E, terminal = model.args.n_routed_experts, sys.stdout.isatty()
        legend = " ".join(mark_experts([f" {e} "], [e], True) for e in range(E)) if terminal else "token[expert]"
        print(f"each token marked by its top routed expert (of {E}) in MoE layer {a.show_experts}: {legend}")

    torch.manual_seed(a.seed)
    stats = dict(tokens=0, seconds=0.0, forwards=0, drafted=0, accepted=0)
    for _ in range(a.num_samples):
        t0 = now()
        if speculative:
            y, s = generate_speculative(model, x, a.max_new_tokens, a.temperature, a.top_k)
            for k in ("forwards", "drafted", "accepted"):
                stats[k] += s[k]
        else:
            y = model.generate(x, a.max_new_tokens, a.temperature, a.top_k)
        stats["seconds"] += now() - t0
        stats["tokens"] += y.size(1) - x.size(1)
        if a.show_experts is None:
            print(decode(y[0].tolist()))
        else:
            pieces = [decode([t]) for t in y[0].tolist()]
            print(mark_experts(pieces, top_experts(model, y, a.show_experts).tolist(), terminal))
        print("---------------")

    mode = "speculative (MTP drafts)" if speculative else "plain"
    line = (f"{stats['tokens']} tokens in {stats['seconds']:.2f}s: {stats['tokens'] / stats['seconds']:.1f} tokens/s, "
            f"{mode}, {a.attn_impl} cache")
    if speculative:
        line += (f"; acceptance {stats['accepted'] / max(stats['drafted'], 1):.1%} of {stats['drafted']} drafts, "
                 f"{stats['tokens'] / stats['forwards']:.2f} tokens per main-model forward")
    print(f"{line}\n{kernels.describe(model, device, dtype)}")
    return stats


def cli(argv=None):
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
