"""Group Relative Policy Optimization with rule-based rewards (report §5.2, from DeepSeekMath): an SFT checkpoint
answers maths questions, and the answers a rule finds right grow likelier.

    python grpo.py config/grpo_cpu.py                    # out-sft-cpu -> out-grpo-cpu
    python grpo.py config/grpo_cpu.py --kl_beta=0 --clip_eps=0 --out_dir=out-grpo-nokl   # without the KL and the clip
    python sample.py --out_dir=out-grpo-cpu --chat="What is 12 times 7?"

Each step: `questions` training questions, a group of G = group_size answers to each sampled from the policy at
temperature 1 (π_old; chat.generate: one prefill per question, its latent cache repeated G times, each row stopping at
its end token); rewards by rule (right, and well formed); advantages A_i = (r_i - mean r) / std r within each group; then
updates_per_batch AdamW steps on the batch, each maximising per token
    J = 1/G Σ_i 1/|o_i| Σ_t [ min(ρ A_i, clip(ρ, 1 - ε, 1 + ε) A_i) - β D_KL(π_θ || π_ref) ],  ρ = π_θ / π_old,
    D_KL = π_ref / π_θ - log(π_ref / π_θ) - 1 (per token, never negative), π_ref the SFT model.
"""
import copy
import itertools
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from checkpoint.ckpt import save_checkpoint
from posttraining import chat
from pretraining.configurator import run_cli
from pretraining.data import batch_seed
from pretraining.optim import configure_optimizer, get_lr

DEFAULTS = dict(
    out_dir="out-grpo", init_from="out-sft",          # init_from: the folder of the SFT checkpoint (the policy and π_ref)
    max_iters=80, questions=8, group_size=16,         # a step: questions x group_size sampled answers
    temperature=1.0, max_new_tokens=chat.ANSWER_TOKENS,   # sampling (1.0: the policy itself); the length limit
    format_reward=0.1,       # reward: 1 for the right answer, plus this for ending with the end token within the limit
    clip_eps=0.2, kl_beta=0.04, updates_per_batch=2,  # ε (0: no clip), β (0: no KL term), AdamW steps per batch (μ)
    learning_rate=3e-5, min_lr=3e-5, warmup_iters=0, decay_lr=False, weight_decay=0.0, beta1=0.9, beta2=0.95,
    grad_clip=1.0, block_size=128,
    eval_interval=20, eval_questions=420, log_interval=10, device="auto", seed=1337, threads=0,
    overwrite=False,         # True: replace a ckpt.pt already in out_dir (else the run refuses, one line)
)
LEAST = dict(max_iters=0, questions=1, group_size=2, max_new_tokens=1, updates_per_batch=1, block_size=2,
             eval_interval=1, eval_questions=1, log_interval=1)


def rewards(replies, answers, format_reward):
    """Rule-based rewards (G,) for replies [(text, stopped)] to one question: 1 for the right answer (chat.is_correct),
    plus format_reward for a well-formed reply (ended with the end token within the length limit)."""
    return torch.tensor([float(chat.is_correct(text, stopped, answer)) + format_reward * stopped
                         for (text, stopped), answer in zip(replies, answers)])


def group_advantages(r):
    """A = (r - mean r) / std r within each group (row) of rewards r (Q, G), the sample standard deviation; 0 for a group
    whose rewards are all equal (no signal)."""
    std = r.std(dim=1, keepdim=True)
    return torch.where(std > 0, (r - r.mean(dim=1, keepdim=True)) / std.clamp(min=1e-8), 0.0)


def grpo_objective(logp, old_logp, ref_logp, advantages, mask, clip_eps, kl_beta):
    """J (to maximise) of N sampled outputs: per-token log-probabilities logp (N, T) under π_θ, old_logp under π_old,
    ref_logp under π_ref (None when kl_beta is 0), advantages (N,), mask (N, T) 1 on the output's tokens. Per token
    min(ρA, clip(ρ, 1 - ε, 1 + ε) A) - β D_KL (clip_eps 0: ρA alone), averaged over each output's tokens, then over the
    outputs (1/G Σ_i per group, the groups of equal size). -> (J, {kl: mean per token, clipped: share of tokens whose
    clip binds})."""
    ratio, A, n = (logp - old_logp).exp(), advantages[:, None], mask.sum()
    surrogate = ratio * A
    clipped = torch.zeros_like(mask, dtype=torch.bool)
    if clip_eps > 0:
        bound = ratio.clamp(1 - clip_eps, 1 + clip_eps) * A
        clipped = bound < surrogate
        surrogate = torch.minimum(surrogate, bound)
    kl = torch.zeros_like(logp)
    if kl_beta > 0:
        log_ref_ratio = ref_logp - logp                            # log(π_ref / π_θ)
        kl = log_ref_ratio.exp() - log_ref_ratio - 1
    per_token = (surrogate - kl_beta * kl) * mask
    J = (per_token.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).mean()
    return J, dict(kl=(kl * mask).sum() / n, clipped=(clipped & mask.bool()).sum() / n)


def token_logprobs(model, x, y):
    """log π(y_t | x_..t) (N, T) of the model for inputs x and next tokens y (N, T); y -1 gives 0."""
    logits, _ = model(x)
    return -F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1, reduction="none").view(y.shape)


def rollout_batch(prompts, outputs, eos, group, device):
    """The sampled conversations as a batch: inputs x, next tokens y (-1 outside the outputs) and the outputs' mask, (N, T),
    right-padded, row i*group + j = prompt i + its j-th output (with its end token if it stopped)."""
    rows = [(prompts[i // group], tokens + [eos] * stopped) for i, (tokens, stopped) in enumerate(outputs)]
    T = max(len(p) + len(o) for p, o in rows) - 1
    x = torch.full((len(rows), T), eos, dtype=torch.long)
    y = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, (p, o) in enumerate(rows):
        seq = torch.tensor(p + o)
        x[i, :len(seq) - 1] = seq[:-1]
        y[i, len(p) - 1:len(seq) - 1] = seq[len(p):]
    return x.to(device), y.to(device), (y != -1).float().to(device)


def grpo_update(model, reference, optimizer, prompts, outputs, r, eos, c):
    """The policy update of a GRPO step: for the sampled outputs (chat.generate's, `c.group_size` per prompt) and their
    rewards r (questions, group_size), c.updates_per_batch AdamW steps on -J (grpo_objective, c.clip_eps, c.kl_beta; π_old
    the weights before the first, π_ref the reference model, None without the KL term), each gradient clipped to
    c.grad_clip. -> the last update's {kl, clipped} and the outputs' mean length in tokens (end token included)."""
    device = model.embed.weight.device
    advantages = group_advantages(r).flatten().to(device)
    x, y, mask = rollout_batch(prompts, outputs, eos, c.group_size, device)
    ref_logp = None
    if reference is not None:
        with torch.no_grad():
            ref_logp = token_logprobs(reference, x, y)
    for update in range(c.updates_per_batch):
        logp = token_logprobs(model, x, y)
        if update == 0:                                 # π_old: the policy that sampled the batch
            old_logp = logp.detach()
        J, stats = grpo_objective(logp, old_logp, ref_logp, advantages, mask, c.clip_eps, c.kl_beta)
        (-J).backward()
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {**{k: v.detach() for k, v in stats.items()}, "length": mask.sum(1).mean()}


def main(argv=None):
    c, ckpt, device = chat.configure(argv, DEFAULTS, LEAST, __doc__)
    template = chat.Template(ckpt["meta"], Path(c.init_from) / "ckpt.pt")      # GRPO starts from an SFT checkpoint
    model, meta = chat.chat_model(ckpt, c.init_from, c.block_size, device)
    del ckpt
    reference = copy.deepcopy(model).eval().requires_grad_(False) if c.kl_beta > 0 else None   # π_ref: the SFT model
    problems = chat.training_problems(batch_seed(c.seed, 8))
    held_out = chat.held_out_problems(c.eval_questions)
    c.lr_decay_iters = c.max_iters
    optimizer = configure_optimizer(model, c.learning_rate, c.weight_decay, (c.beta1, c.beta2), torch.device(device).type)
    record = chat.recorder(c.out_dir)
    record(kind="config", config=vars(c))
    print(f"grpo: {c.max_iters} steps of {c.questions} questions x {c.group_size} answers, ε {c.clip_eps}, β {c.kl_beta}, "
          f"{c.updates_per_batch} updates per batch, from {c.init_from}, on {device}")
    t_start, train_s, roll_s, roll_tokens, stats = time.time(), 0.0, 0.0, 0, []
    for it in range(c.max_iters + 1):
        if it % c.eval_interval == 0 or it == c.max_iters:
            acc = chat.held_out_eval(model, meta, held_out, it, record, train_s)
        if it == c.max_iters:
            break
        t0 = time.time()
        batch = list(itertools.islice(problems, c.questions))
        prompts = [template.prompt(q) for q, *_ in batch]
        torch.manual_seed(batch_seed(c.seed, 9, it))       # the samples: a function of (seed, step)
        outputs = chat.generate(model, prompts, c.max_new_tokens, template.eos, c.group_size, c.temperature)
        t1 = time.time()
        roll_s, roll_tokens = roll_s + t1 - t0, roll_tokens + sum(len(t) + s for t, s in outputs)
        answers = [a for _, a, *_ in batch for _ in range(c.group_size)]
        r = rewards([(template.decode(t), s) for t, s in outputs], answers, c.format_reward).view(c.questions, -1)
        lr = get_lr(it, c)
        for group in optimizer.param_groups:
            group["lr"] = lr
        update = grpo_update(model, reference, optimizer, prompts, outputs, r, template.eos, c)
        train_s += time.time() - t0
        right = (r >= 1).float()
        stats.append(torch.stack([r.mean(), right.mean(), right.amax(dim=1).mean(), update["kl"].cpu(),
                                  update["clipped"].cpu(), update["length"].cpu(), (r.std(dim=1) == 0).float().mean()]))
        if (it + 1) % c.log_interval == 0 or it + 1 == c.max_iters:
            reward, right, pass_g, kl, clipped, length, flat = torch.stack(stats).mean(0).tolist()
            print(f"step {it + 1}/{c.max_iters} | reward {reward:.3f} (right {right:.0%}, a group {pass_g:.0%}) | kl {kl:.4f} "
                  f"| clipped {clipped:.1%} | length {length:.1f} | no-signal groups {flat:.0%} | rollouts "
                  f"{roll_tokens / roll_s:.0f} tok/s | {train_s / (it + 1):.2f} s/step")
            record(kind="train", step=it + 1, reward=reward, right=right, group_right=pass_g, kl=kl, clipped=clipped,
                   length=length, no_signal=flat, lr=lr, rollout_tokens_per_s=roll_tokens / roll_s, train_s=train_s)
            stats = []
    wall = time.time() - t_start
    save_checkpoint(dict(model=model.state_dict(), model_args=asdict(model.args), meta=meta, optimizer=optimizer.state_dict(),
                         iter_num=c.max_iters, config=vars(c), stage="grpo", held_out=acc), Path(c.out_dir) / "ckpt.pt")
    print(f"done: held-out {chat.describe(acc)}; {train_s:.0f} s training ({roll_s:.0f} s rollouts), {wall:.0f} s wall; "
          f"saved {c.out_dir}/ckpt.pt")
    record(kind="done", step=c.max_iters, accuracy=acc, train_s=train_s, rollout_s=roll_s, wall_s=wall)
    return acc


if __name__ == "__main__":
    sys.exit(run_cli(main))
