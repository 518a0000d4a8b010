"""Supervised fine-tuning (report §5.1): a pretrained checkpoint learns the chat template on maths questions answered
after a thinking trace (the reasoning data of §5.1: steps a small model can carry out, posttraining/reasoning.py), the
loss on the assistant's reply only, the learning rate decaying (cosine) to a lower value; AdamW or Muon
(`optimizer`, as train.py's: config/sft_cpu.py trains by Muon).

    python train.py config/domains_cpu_256.py            # first the context the traces need (YaRN, report §4.3)
    python sft.py config/sft_cpu.py                      # out-domains-cpu-256 -> out-sft-cpu
    python sft.py config/sft_cpu.py --answers=bare --out_dir=out-sft-bare   # no thinking: <think></think>answer
    python sample.py --out_dir=out-sft-cpu --chat="What is 12 times 7?" --show_thinking=True

The template's tokens join the pretrained vocabulary (chat.chat_model). Each batch is padded, not packed, and made of
conversations of similar lengths (those of LENGTH_GROUP batches sorted by length, then cut): 7% padding instead of 37%
(the padding share is logged). Every conversation must fit the context the checkpoint was trained at. Evaluation:
greedy exact match on the held-out questions (chat.evaluate) and the replies' mean length.
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
from pretraining.optim import OPTIMIZERS, configure_optimizer, get_lr

DEFAULTS = dict(
    out_dir="out-sft", init_from="out-domains-cpu-256",   # init_from: the folder whose checkpoint the run starts from
    answers="thinking",      # what the reply thinks before its answer: thinking (a trace), worked (one line), bare
    mix={},                  # {kind: weight}: the kinds of question trained on and their shares ({}: all, equal shares)
    pairs=48000, epochs=1, batch_size=16,             # max_iters = ceil(epochs * pairs / batch_size)
    max_seconds=0.0,         # > 0: stop once training took this many seconds (a compute budget; evaluations aside)
    block_size=256,          # the RoPE tables' length (room for generation's left padding)
    learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, decay_lr=True, weight_decay=0.1, beta1=0.9, beta2=0.95,
    grad_clip=1.0,
    optimizer="adamw", muon_rms=2.0, muon_momentum=0.95, muon_experts=True,   # as train.py's (pretraining/optim.py)
    eval_interval=2000, eval_questions=700, log_interval=100, device="auto", seed=1337, threads=0,
    overwrite=False,         # True: replace a ckpt.pt already in out_dir (else the run refuses, one line)
)
LEAST = dict(pairs=1, epochs=1, batch_size=1, block_size=2, eval_interval=1, eval_questions=1, log_interval=1)
LENGTH_GROUP = 8             # batches whose conversations are sorted by length together


def sft_examples(template, problems, answers):
    """(tokens, which are the assistant's) per problem, its reply written as `answers` says (chat.thought)."""
    try:
        return [template.example(p.question, chat.thought(p, answers), p.answer) for p in problems]
    except ValueError as e:              # a char vocabulary without some character of the pairs
        raise UserError(f"the training pairs ({answers}): {e}") from None


def length_grouped(order, lengths, batch_size, seed):
    """The examples' order cut into batches of batch_size, each LENGTH_GROUP batches' worth sorted by length first
    (so that a batch pads little), the batches then shuffled (seeded)."""
    group = batch_size * LENGTH_GROUP
    batches = []
    for at in range(0, len(order), group):
        chunk = sorted(order[at:at + group], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    shuffle = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed)).tolist()
    return [batches[i] for i in shuffle]


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
    if c.answers not in chat.ANSWERS:
        raise UserError(f"answers must be one of {', '.join(chat.ANSWERS)}, not {c.answers!r}")
    if c.optimizer not in OPTIMIZERS:
        raise UserError(f"optimizer must be {' or '.join(OPTIMIZERS)}, not {c.optimizer!r}")
    context = ckpt["model_args"]["max_seq_len"]                          # the context it was trained at
    model, meta = chat.chat_model(ckpt, c.init_from, c.block_size, device)
    del ckpt
    template = chat.Template(meta)
    problems = chat.mixed(chat.training_problems(batch_seed(c.seed, 5)), c.mix, batch_seed(c.seed, 10))
    examples = sft_examples(template, itertools.islice(problems, c.pairs), c.answers)
    longest = max(len(tokens) - 1 for tokens, _ in examples)            # the last token is only a target
    if longest > min(context, c.block_size):
        raise UserError(f"the longest conversation ({longest} tokens) does not fit {c.init_from}'s context of {context}"
                        f"{f' (block_size {c.block_size})' if c.block_size < context else ''}: extend the context first "
                        f"(python train.py config/domains_cpu_256.py), or shorter answers (--answers=worked or bare)")
    held_out = chat.held_out_problems(c.eval_questions)
    c.max_iters = c.lr_decay_iters = math.ceil(c.epochs * c.pairs / c.batch_size)
    lengths = [len(tokens) for tokens, _ in examples]
    batches = [b for e in range(c.epochs) for b in length_grouped(
        torch.randperm(c.pairs, generator=torch.Generator().manual_seed(batch_seed(c.seed, 6, e))).tolist(), lengths,
        c.batch_size, batch_seed(c.seed, 7, e))]
    optimizer = configure_optimizer(model, c.learning_rate, c.weight_decay, (c.beta1, c.beta2),
                                    torch.device(device).type, c.optimizer, c.muon_rms, c.muon_momentum, c.muon_experts)
    record = chat.recorder(c.out_dir)
    record(kind="config", config=vars(c))
    print(f"sft: {c.pairs} pairs ({c.answers}{f', mix {c.mix}' if c.mix else ''}) x {c.epochs} epochs = {c.max_iters} steps of "
          f"{c.batch_size}, the longest {longest} tokens, from {c.init_from} (vocabulary {model.args.vocab_size} with "
          f"the chat tokens), on {device}")
    t_start, train_s, real, seen = time.time(), 0.0, 0, 0
    for it in range(c.max_iters + 1):
        out_of_time = 0 < c.max_seconds <= train_s
        if it % c.eval_interval == 0 or it == c.max_iters or out_of_time:
            acc = chat.held_out_eval(model, meta, held_out, it, record, train_s)
        if it == c.max_iters or out_of_time:
            break
        t0 = time.time()
        lr = get_lr(it, c)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = [examples[i] for i in batches[it]]
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
                         iter_num=it, config=vars(c), stage="sft", held_out=acc), Path(c.out_dir) / "ckpt.pt")
    print(f"done: held-out {chat.describe(acc)}; {train_s:.0f} s training, {wall:.0f} s wall; saved {c.out_dir}/ckpt.pt")
    record(kind="done", step=it, accuracy=acc, train_s=train_s, wall_s=wall)
    return acc


if __name__ == "__main__":
    sys.exit(run_cli(main))
