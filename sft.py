"""Supervised fine-tuning (report §5.1): a pretrained checkpoint learns the chat template on maths question/answer
pairs, the loss on the assistant's tokens only, a few epochs with the learning rate decaying (cosine) to a lower value.

    python sft.py config/sft_cpu.py                      # out-domains-cpu -> out-sft-cpu
    python sft.py config/sft_cpu.py --worked=False --out_dir=out-sft-bare   # bare answers, no worked steps
    python sample.py --out_dir=out-sft-cpu --chat="What is 12 times 7?"

The template's tokens join the pretrained vocabulary (chat.chat_model). Each batch is padded, not packed: a sample
fills up to 64 of the context's positions, so a packed row would hold one or two of them, and padding needs no change to
the model (the padding share is logged). Evaluation: greedy exact match on the held-out questions (chat.evaluate).
"""
import itertools
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from checkpoint.ckpt import save_checkpoint
from posttraining import chat
from pretraining.configurator import UserError, run_cli
from pretraining.data import batch_seed
from pretraining.optim import configure_optimizer, get_lr

DEFAULTS = dict(
    out_dir="out-sft", init_from="out-domains-cpu",   # init_from: the folder whose ckpt.pt the run starts from
    worked=True,             # answers after worked steps ("45 + -23 = 45 - 23 = 22"); False: the bare answer
    pairs=16000, epochs=2, batch_size=32,             # max_iters = ceil(epochs * pairs / batch_size)
    block_size=128,          # the RoPE tables' length (room for generation's left padding); a sample takes <= 64
    learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, decay_lr=True, weight_decay=0.1, beta1=0.9, beta2=0.95,
    grad_clip=1.0,
    eval_interval=250, eval_questions=420, log_interval=50, device="auto", seed=1337, threads=0,
    overwrite=False,         # True: replace a ckpt.pt already in out_dir (else the run refuses, one line)
)
LEAST = dict(pairs=1, epochs=1, batch_size=1, block_size=65, eval_interval=1, eval_questions=1, log_interval=1)


def sft_examples(template, problems, worked):
    """(tokens, which are the assistant's) per (question, answer, worked answer, kind)."""
    try:
        return [template.example(q, steps if worked else answer) for q, answer, steps, _ in problems]
    except ValueError as e:              # a char vocabulary without some character of the pairs
        raise UserError(f"the training pairs{' (worked)' if worked else ''}: {e}") from None


def sft_batch(examples, pad, device):
    """Inputs x and targets y (B, T), T the longest example's length - 1, right-padded with `pad`; y is -1 (ignored)
    wherever the token predicted is not the assistant's or is padding."""
    T = max(len(tokens) for tokens, _ in examples) - 1
    x = torch.full((len(examples), T), pad, dtype=torch.long)
    y = torch.full((len(examples), T), -1, dtype=torch.long)
    for i, (tokens, assistant) in enumerate(examples):
        t = torch.tensor(tokens)
        x[i, :len(t) - 1] = t[:-1]
        y[i, :len(t) - 1] = t[1:].masked_fill(~torch.tensor(assistant[1:]), -1)
    return x.to(device), y.to(device)


def sft_loss(model, x, y):
    """Mean cross-entropy of the main model's next-token predictions over the targets y that are not -1."""
    logits, _ = model(x)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1)


def main(argv=None):
    c, ckpt, device = chat.configure(argv, DEFAULTS, LEAST, __doc__)
    model, meta = chat.chat_model(ckpt, c.init_from, c.block_size, device)
    del ckpt
    template = chat.Template(meta)
    examples = sft_examples(template, itertools.islice(chat.training_problems(batch_seed(c.seed, 5)), c.pairs), c.worked)
    held_out = chat.held_out_problems(c.eval_questions)
    c.max_iters = c.lr_decay_iters = math.ceil(c.epochs * c.pairs / c.batch_size)
    order = torch.cat([torch.randperm(c.pairs, generator=torch.Generator().manual_seed(batch_seed(c.seed, 6, e)))
                       for e in range(c.epochs)]).tolist()
    optimizer = configure_optimizer(model, c.learning_rate, c.weight_decay, (c.beta1, c.beta2), torch.device(device).type)
    record = chat.recorder(c.out_dir)
    record(kind="config", config=vars(c))
    print(f"sft: {c.pairs} pairs ({'worked steps' if c.worked else 'bare answers'}) x {c.epochs} epochs = {c.max_iters} "
          f"steps of {c.batch_size}, from {c.init_from} (vocabulary {model.args.vocab_size} with the chat tokens), on {device}")
    t_start, train_s, real, seen = time.time(), 0.0, 0, 0
    for it in range(c.max_iters + 1):
        if it % c.eval_interval == 0 or it == c.max_iters:
            acc = chat.held_out_eval(model, meta, held_out, it, record, train_s)
        if it == c.max_iters:
            break
        t0 = time.time()
        lr = get_lr(it, c)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = [examples[i] for i in order[it * c.batch_size:(it + 1) * c.batch_size]]
        x, y = sft_batch(batch, template.eos, device)
        loss = sft_loss(model, x, y)
        loss.backward()
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_s += time.time() - t0
        real, seen = real + sum(len(t) - 1 for t, _ in batch), seen + x.numel()
        if (it + 1) % c.log_interval == 0 or it + 1 == c.max_iters:
            loss = loss.item()       # host sync: logging only
            print(f"step {it + 1}/{c.max_iters} | loss {loss:.4f} | lr {lr:.2e} | padding {1 - real / seen:.0%} | "
                  f"{1000 * train_s / (it + 1):.0f} ms/step")
            record(kind="train", step=it + 1, loss=loss, lr=lr, padding=1 - real / seen, train_s=train_s)
    wall = time.time() - t_start
    save_checkpoint(dict(model=model.state_dict(), model_args=asdict(model.args), meta=meta, optimizer=optimizer.state_dict(),
                         iter_num=c.max_iters, config=vars(c), stage="sft", held_out=acc), Path(c.out_dir) / "ckpt.pt")
    print(f"done: held-out {chat.describe(acc)}; {train_s:.0f} s training, {wall:.0f} s wall; saved {c.out_dir}/ckpt.pt")
    record(kind="done", step=c.max_iters, accuracy=acc, train_s=train_s, wall_s=wall)
    return acc


if __name__ == "__main__":
    sys.exit(run_cli(main))
