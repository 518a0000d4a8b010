"""Group Relative Policy Optimization with rule-based rewards (report §5.2, from DeepSeekMath): an SFT checkpoint
answers maths questions, and the answers a rule finds right grow likelier.

    python grpo.py config/grpo_cpu.py                    # out-sft-cpu -> out-grpo-cpu
    python grpo.py config/grpo_cpu.py --kl_beta=0 --clip_eps=0 --out_dir=out-grpo-nokl   # without the KL and the clip
    python sample.py --out_dir=out-grpo-cpu --chat="What is 12 times 7?"

Each step: questions of the kinds it aims at, a group of G = group_size replies to each sampled from the policy at
temperature 1 (π_old; chat.generate: one prefill per question, its latent cache repeated G times, each row stopping at
its end token); rewards by rule (chat.is_correct on what follows </think>); with dynamic sampling (DAPO) a group whose
rewards are all equal, which gives no gradient, is dropped and more questions are drawn, up to max_draws rounds, until
`questions` groups carry signal; advantages A_i = (r_i - mean r) / std r within each group (Dr. GRPO: without the
division); then updates_per_batch AdamW steps on the batch, each maximising per token
    J = 1/G Σ_i 1/|o_i| Σ_t [ min(ρ A_i, clip(ρ, 1 - ε, 1 + ε) A_i) - β D_KL(π_θ || π_ref) ],  ρ = π_θ / π_old,
    D_KL = π_ref / π_θ - log(π_ref / π_θ) - 1 (per token, never negative), π_ref the SFT model.
The log-probabilities come from the model with dropout off (eval mode), the policy that sampled: ρ is exactly 1 at
the first update, where the clip never binds, so it acts from the second.
"""
import collections
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
    mix={},                  # {kind: weight}: the kinds of question RL draws and their shares ({}: all, equal shares)
    max_iters=60, questions=8, group_size=16,         # a step: questions x group_size sampled replies
    dynamic_sampling=True,   # DAPO: groups with all rewards equal dropped, more questions drawn ...
    max_draws=4,             # ... up to this many rounds of `questions` a step
    temperature=1.0, max_new_tokens=chat.ANSWER_TOKENS,   # sampling (1.0: the policy itself); the length limit
    format_reward=0.0,       # added for a well-formed reply (its thinking ended, and then the end token)
    advantage_std=True,      # A = (r - mean) / std (GRPO); False: r - mean (Dr. GRPO)
    clip_eps=0.2, kl_beta=0.04, updates_per_batch=2,  # ε (0: no clip), β (0: no KL term), AdamW steps per batch (μ)
    learning_rate=3e-5, min_lr=3e-5, warmup_iters=0, decay_lr=False, weight_decay=0.0, beta1=0.9, beta2=0.95,
    grad_clip=1.0, block_size=256,
    eval_interval=30, eval_questions=700, log_interval=10, device="auto", seed=1337, threads=0,
    overwrite=False,         # True: replace a ckpt.pt already in out_dir (else the run refuses, one line)
)
Group = collections.namedtuple("Group", "problem prompt outputs rewards")   # a question's G sampled replies, rewarded
LEAST = dict(max_iters=0, questions=1, group_size=2, max_draws=1, max_new_tokens=1, updates_per_batch=1, block_size=2,
             eval_interval=1, eval_questions=1, log_interval=1)


def group_rewards(problems, outputs, decode, group_size, format_reward):
    """Rule-based rewards (questions, G) of the replies `outputs` [(tokens, stopped)], problem i's at i*G..(i+1)*G: 1
    for the right answer (chat.is_correct), plus format_reward for a well-formed reply (its thinking ended, and then
    the end token within the length limit)."""
    r = []
    for i, (tokens, stopped) in enumerate(outputs):
        reply = decode(tokens)
        well_formed = stopped and chat.final_answer(reply) is not None
        r.append(float(chat.is_correct(reply, stopped, problems[i // group_size].answer)) + format_reward * well_formed)
    return torch.tensor(r).view(len(problems), group_size)


def keep_signal(groups, questions):
    """Dynamic sampling (DAPO): of groups (Group, rewards (G,)) in the order drawn, the first `questions` whose rewards
    are not all equal (a group of equal rewards has no advantage, so no gradient)."""
    return [g for g in groups if g.rewards.max() > g.rewards.min()][:questions]


def group_advantages(r, divide_std=True):
    """A = (r - mean r) / std r within each group (row) of rewards r (Q, G), the sample standard deviation (Dr. GRPO,
    divide_std False: r - mean r); 0 for a group whose rewards are all equal (no signal)."""
    std = r.std(dim=1, keepdim=True)
    centred = r - r.mean(dim=1, keepdim=True)
    return torch.where(std > 0, centred / std.clamp(min=1e-8) if divide_std else centred, 0.0)


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
    """log π(y_t | x_..t) (N, T) of the model for inputs x and next tokens y (N, T); y -1 gives 0. With dropout off
    (eval mode, gradients kept): the policy that sampled the outputs, so that ρ and the KL compare the same policy."""
    was_training = model.training
    logits, _ = model.eval()(x)
    model.train(was_training)
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
    advantages = group_advantages(r, c.advantage_std).flatten().to(device)
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


def rollouts(model, template, problems, c):
    """One step's sampling: rounds of c.questions problems (an iterator), c.group_size replies each, rewarded; with
    dynamic sampling, rounds until c.questions groups carry signal (keep_signal) or c.max_draws rounds were drawn.
    -> (the groups to train on, every group drawn, tokens generated)."""
    drawn, tokens = [], 0
    for _ in range(c.max_draws if c.dynamic_sampling else 1):
        batch = list(itertools.islice(problems, c.questions))
        prompts = [template.prompt(p.question) for p in batch]
        outputs = chat.generate(model, prompts, c.max_new_tokens, template.eos, c.group_size, c.temperature)
        tokens += sum(len(t) + s for t, s in outputs)
        r = group_rewards(batch, outputs, template.decode, c.group_size, c.format_reward)
        G = c.group_size
        drawn += [Group(p, prompt, outputs[i * G:(i + 1) * G], r[i]) for i, (p, prompt) in enumerate(zip(batch, prompts))]
        if not c.dynamic_sampling:
            return drawn, drawn, tokens
        if len(kept := keep_signal(drawn, c.questions)) == c.questions:
            break
    return kept, drawn, tokens


def main(argv=None):
    c, ckpt, device = chat.configure(argv, DEFAULTS, LEAST, __doc__)
    template = chat.Template(ckpt["meta"], Path(c.init_from) / "ckpt.pt")      # GRPO starts from an SFT checkpoint
    model, meta = chat.chat_model(ckpt, c.init_from, c.block_size, device)
    del ckpt
    reference = copy.deepcopy(model).eval().requires_grad_(False) if c.kl_beta > 0 else None   # π_ref: the SFT model
    problems = chat.mixed(chat.training_problems(batch_seed(c.seed, 8)), c.mix, batch_seed(c.seed, 11))
    held_out = chat.held_out_problems(c.eval_questions)
    c.lr_decay_iters = c.max_iters
    optimizer = configure_optimizer(model, c.learning_rate, c.weight_decay, (c.beta1, c.beta2), torch.device(device).type)
    record = chat.recorder(c.out_dir)
    record(kind="config", config=vars(c))
    print(f"grpo: {c.max_iters} steps of {c.questions} questions{f' (mix {c.mix})' if c.mix else ''} x {c.group_size} replies, "
          f"{'dynamic sampling, ' if c.dynamic_sampling else ''}ε {c.clip_eps}, β {c.kl_beta}, {c.updates_per_batch} "
          f"updates per batch, from {c.init_from}, on {device}")
    t_start, train_s, roll_s, roll_tokens, stats = time.time(), 0.0, 0.0, 0, []
    for it in range(c.max_iters + 1):
        if it % c.eval_interval == 0 or it == c.max_iters:
            acc = chat.held_out_eval(model, meta, held_out, it, record, train_s)
        if it == c.max_iters:
            break
        t0 = time.time()
        torch.manual_seed(batch_seed(c.seed, 9, it))       # the samples: a function of (seed, step)
        kept, drawn, tokens = rollouts(model, template, problems, c)
        roll_s, roll_tokens = roll_s + time.time() - t0, roll_tokens + tokens
        lr = get_lr(it, c)
        for group in optimizer.param_groups:
            group["lr"] = lr
        update = dict(kl=torch.zeros(()), clipped=torch.zeros(()), length=torch.zeros(()))
        if kept:
            update = grpo_update(model, reference, optimizer, [g.prompt for g in kept],
                                 [o for g in kept for o in g.outputs], torch.stack([g.rewards for g in kept]),
                                 template.eos, c)
        train_s += time.time() - t0
        right = torch.stack([g.rewards for g in drawn]) >= 1                  # of every group drawn
        well_formed = [s and template.end_think in t for g in drawn for t, s in g.outputs]
        stats.append(torch.tensor([right.float().mean(), right.any(1).float().mean(),
                                   len(keep_signal(drawn, len(drawn))) / len(drawn), len(drawn), len(kept),
                                   sum(well_formed) / len(well_formed), update["kl"], update["clipped"],
                                   update["length"]]))
        if (it + 1) % c.log_interval == 0 or it + 1 == c.max_iters:
            right, pass_g, signal, n_drawn, n_kept, formed, kl, clipped, length = torch.stack(stats).mean(0).tolist()
            print(f"step {it + 1}/{c.max_iters} | right {right:.0%} of the replies (a group {pass_g:.0%}) | groups with "
                  f"signal {signal:.0%} of {n_drawn:.1f} drawn, {n_kept:.1f} kept | well formed {formed:.0%} | kl "
                  f"{kl:.4f} | clipped {clipped:.1%} | length {length:.1f} | rollouts {roll_tokens / roll_s:.0f} tok/s "
                  f"| {train_s / (it + 1):.2f} s/step")
            record(kind="train", step=it + 1, right=right, group_right=pass_g, signal=signal, drawn=n_drawn,
                   kept=n_kept, well_formed=formed, kl=kl, clipped=clipped, length=length, lr=lr,
                   rollout_tokens_per_s=roll_tokens / roll_s, train_s=train_s)
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
