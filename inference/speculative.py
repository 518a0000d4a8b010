"""Lossless speculative decoding with the MTP module as the drafter (report §5.4.3): the main model verifies
each draft in the same forward that extends the sequence, so it emits up to two tokens a forward and its
output follows the main model exactly (token for token when greedy). sample.py runs it when the checkpoint
has MTP; benchmarks/decode.py measures it.

    out, stats = generate_speculative(model, idx, max_new_tokens=200, temperature=0.8, top_k=200)
"""
import torch

from deepseek import probs, sample


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
