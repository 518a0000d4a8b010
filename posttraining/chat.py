"""What post-training's stages share (report §5): DeepSeek's chat template with its thinking tokens, added to a
pretrained checkpoint, the maths tasks (training pairs in unlimited supply, a held-out set) and the three ways an answer
is written (after a thinking trace, after one worked line, bare), the rule that checks an answer, batched generation
from the latent cache, and the held-out evaluation. sft.py, grpo.py, sample.py --chat and benchmarks/posttrain.py use
them.

    model, meta = chat_model(read_checkpoint("out-domains-cpu-256/ckpt.pt"), "out-domains-cpu-256", max_seq_len=256)
    template = Template(meta)
    outs = generate(model, [template.prompt("What is 12 times 7?")], ANSWER_TOKENS, template.eos)  # [(tokens, stopped)]
    final_answer(template.decode(outs[0][0]))   # what follows </think>
    results = evaluate(model, meta, held_out_problems(700))   # {kind: [right or not, ...], "replies": .., "lengths": ..}
"""
import json
import math
import random
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import torch

import deepseek as ds
import kernels
from checkpoint.ckpt import checkpoint_path, load_state, read_checkpoint
from pretraining.configurator import UserError, parse_config, pick_device, set_threads
from posttraining.reasoning import thinking
from pretraining.data import MATH_KINDS, math_problems, tokenizer_from_meta

# <｜begin▁of▁sentence｜><｜User｜>{question}<｜Assistant｜><think>{thinking}</think>{answer}<｜end▁of▁sentence｜>: DeepSeek's
# thinking template (R1, V3.1's thinking mode), the thinking empty for a bare answer; ids after the base vocabulary,
# the begin-of-sentence token first and the end-of-sentence token last (checkpoint/hf.py's bos and eos)
SPECIAL = ("<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>", "<｜end▁of▁sentence｜>")
# the same template as transformers' apply_chat_template reads it (Jinja; export.py writes it to tokenizer_config.json):
# an assistant message's content is its thinking, </think> and its answer
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
                 "{% elif m['role'] == 'assistant' %}<｜Assistant｜><think>{{ m['content'] }}<｜end▁of▁sentence｜>"
                 "{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜><think>{% endif %}")
ANSWERS = ("thinking", "worked", "bare")   # what precedes the answer: a trace (reasoning.py), one worked line, nothing
HELD_OUT_SEED = 1           # the held-out draws; the corpus uses data.MATH_SEED (0), training pairs data.batch_seed(...)
HELD_OUT_SHARE = 5          # one question text in 5 (by its CRC-32) is reserved for the held-out set
HELD_OUT_MOST = 700         # 100 of each kind: the remainder kind has only 1,100 questions, about 220 of them held out
ANSWER_TOKENS = 160         # the length limit of a reply: the longest trace, </think>, answer and end token take 127
BASE_ANSWER_TOKENS = 8      # a pretrained model answers as its corpus does, on one line of at most 5 characters


# ----------------------------------------------------------------------------- template and special tokens

class Template:
    """The chat template over a chat checkpoint's tokenizer (meta["special"] == SPECIAL)."""

    def __init__(self, meta, path="the checkpoint"):
        if not meta.get("special"):
            raise UserError(f"{path} has no chat tokens in its vocabulary (a pretrained model: sft.py adds them)")
        if meta["special"] != list(SPECIAL):
            raise UserError(f"{path}'s chat tokens are not this template's {', '.join(SPECIAL)} (an older chat "
                            f"checkpoint: run sft.py on its pretrained model again)")
        self.encode, self.decode = tokenizer_from_meta(meta)
        first = meta["vocab_size"] - len(SPECIAL)
        self.bos, self.user, self.assistant, self.think, self.end_think, self.eos = range(first, first + len(SPECIAL))

    def question(self, text):
        """The question's tokens; ValueError (a one-line message) for characters outside a char vocabulary or a chat token."""
        if token := next((s for s in SPECIAL if s in text), None):
            raise ValueError(f"the question holds the chat token {token}")
        return self.encode(text)

    def prompt(self, question):
        """<BOS><User>{question}<Assistant><think>: what the assistant's reply follows."""
        return [self.bos, self.user, *self.question(question), self.assistant, self.think]

    def example(self, question, thought, answer):
        """A training example: (tokens of the whole conversation, which of them are the assistant's reply: the thinking,
        </think>, the answer and the end-of-sentence token, the only ones the SFT loss sees)."""
        prompt = self.prompt(question)
        reply = self.encode(thought) + [self.end_think] + self.encode(answer) + [self.eos]
        return prompt + reply, [False] * len(prompt) + [True] * len(reply)


def chat_model(ckpt, path, max_seq_len, device="cpu"):
    """(model in training mode, kernels.py's MoE paths installed; tokenizer meta) from a train.py-style checkpoint dict
    read from `path`: a chat checkpoint as it is; a pretrained one with SPECIAL added to its vocabulary (new embedding and
    output-head rows drawn as the model's init, N(0, 0.02); the old rows kept bit for bit) and CHAT_TEMPLATE to its meta. max_seq_len sets the RoPE
    tables only (room for generate's left padding); the routing bias stays as trained (bias_update_speed 0: the balance
    counts would include padding)."""
    meta, args, state = dict(ckpt["meta"]), dict(ckpt["model_args"]), dict(ckpt["model"])
    if "special" not in meta:
        n = args["vocab_size"]
        if meta["tokenizer"] == "char" and n != len(meta["chars"]):
            raise UserError(f"{path}: the model's vocabulary ({n}) is not its tokenizer's ({len(meta['chars'])} characters)")
        g = torch.Generator().manual_seed(0)
        for name in ("embed.weight", "head.weight"):
            rows = torch.randn(len(SPECIAL), state[name].size(1), generator=g) * 0.02
            state[name] = torch.cat([state[name], rows.to(state[name].dtype)])
        meta.update(special=list(SPECIAL), vocab_size=n + len(SPECIAL), chat_template=CHAT_TEMPLATE)
        args["vocab_size"] = n + len(SPECIAL)
    try:
        model = ds.Transformer(ds.ModelArgs(**{**args, "max_seq_len": max_seq_len, "bias_update_speed": 0.0}))
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: bad model_args ({e})") from None
    load_state(model, state, path)
    return kernels.install(model).to(device).train(), meta


# ----------------------------------------------------------------------------- tasks

def held_out_question(question):
    return zlib.crc32(question.encode()) % HELD_OUT_SHARE == 0


def training_problems(seed):
    """Endless problems from data.math_problems(seed), none of them a held-out question."""
    return (p for p in math_problems(seed) if not held_out_question(p.question))


def mixed(problems, mix, seed):
    """The problems of an endless stream in the shares `mix` says ({kind: weight}; a kind absent or 0: none of it;
    an empty mix: the stream as it is, the kinds in equal shares): each kept with probability weight / the largest
    weight (seeded). A one-line UserError for a kind data.MATH_KINDS has not or a negative weight."""
    if unknown := [k for k in mix if k not in MATH_KINDS]:
        raise UserError(f"mix: unknown kind {', '.join(unknown)} (the kinds are {', '.join(MATH_KINDS)})")
    if any(w < 0 for w in mix.values()) or mix and max(mix.values()) <= 0:
        raise UserError(f"mix: the weights must be >= 0, one of them > 0, not {mix}")
    if not mix:
        return problems
    rng, most = random.Random(seed), max(mix.values())
    return (p for p in problems if rng.random() * most < mix.get(p.kind, 0))


def thought(problem, answers):
    """What the reply thinks before its answer, written as `answers` says (ANSWERS): the trace, the worked line, or
    nothing."""
    return {"thinking": thinking(problem), "worked": problem.worked, "bare": ""}[answers]


def held_out_problems(n):
    """n distinct held-out problems (n <= HELD_OUT_MOST), as evenly over the kinds as n allows, in kind order, drawn
    from HELD_OUT_SEED."""
    assert 0 < n <= HELD_OUT_MOST, n
    want = {kind: n // len(MATH_KINDS) + (i < n % len(MATH_KINDS)) for i, kind in enumerate(MATH_KINDS)}
    chosen, seen = {kind: [] for kind in MATH_KINDS}, set()
    for p in math_problems(HELD_OUT_SEED):
        if held_out_question(p.question) and p.question not in seen and len(chosen[p.kind]) < want[p.kind]:
            seen.add(p.question)
            chosen[p.kind].append(p)
            if len(seen) == n:
                return [p for kind in MATH_KINDS for p in chosen[kind]]


# ----------------------------------------------------------------------------- the rule

def final_answer(reply):
    """The answer a reply states: what follows its first </think> (the thinking ended there); None when it never ended.
    Nothing inside the thinking counts."""
    thought, ended, answer = reply.partition(SPECIAL[4])
    return answer if ended else None


def is_correct(reply, stopped, answer):
    """Right when the reply is well formed (its thinking ended, and it ended with the end token within the length
    limit) and its final answer is the generator's text exactly: "3.0" for 3, "-0" for 0, "22 apples" or a trailing
    space are wrong, as is a right answer that never stopped. The required format is the one the data writes (report
    §5.2.1)."""
    return stopped and final_answer(reply) == answer


# ----------------------------------------------------------------------------- generation

def padded_mask(keep, start_pos, S):
    """deepseek.causal_mask for S queries at start_pos, plus keep (B, start_pos + S) False on each row's left padding:
    an additive (B, S, 1, start_pos + S) mask. Finite on the padding: a padded query sees only padding, and -inf there
    would give it NaN, which its cached keys would then carry into every real row."""
    pad = torch.zeros(keep.shape, device=keep.device).masked_fill_(~keep, torch.finfo(torch.float32).min)[:, None, None]
    causal = ds.causal_mask(start_pos, S, keep.device)
    return pad if causal is None else pad + causal


@torch.no_grad()
def generate(model, prompts, max_new_tokens, stop, group=1, temperature=0.0, top_k=None):
    """`group` continuations of each prompt (lists of token ids, any lengths), all in one batch: the prompts left-padded
    to the longest (RoPE is relative: a padded row's scores are its own alone) and prefilled once, each prompt's cache
    (MLA: the latent and the RoPE key) then repeated `group` times, one token per row and step, a row leaving the batch
    at its `stop` token. -> len(prompts) * group (tokens without the stop token, stopped), prompt i's at i*group.. ."""
    device, P = model.embed.weight.device, max(map(len, prompts))
    if P + max_new_tokens > model.args.max_seq_len:
        raise ValueError(f"a prompt of {P} tokens and {max_new_tokens} new ones exceed max_seq_len={model.args.max_seq_len}")
    was_training = model.training
    model.eval()
    idx = torch.full((len(prompts), P), stop, dtype=torch.long)
    keep = torch.zeros(len(prompts), P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        idx[i, P - len(p):], keep[i, P - len(p):] = torch.tensor(p, dtype=torch.long), True
    idx, keep = idx.to(device), keep.to(device)
    attn = [layer.attn for layer in model.layers]
    logits = model.logits(model.hidden(idx, 0, padded_mask(keep, 0, P))[:, -1]).repeat_interleave(group, 0)
    for a in attn:
        a.cache = {name: t.repeat_interleave(group, 0) for name, t in a.cache.items()}
    keep, rows = keep.repeat_interleave(group, 0), torch.arange(len(prompts) * group, device=device)
    out, stopped = [[] for _ in range(len(prompts) * group)], [False] * (len(prompts) * group)
    for pos in range(P, P + max_new_tokens):
        nxt = ds.sample(logits, temperature, top_k)
        for r, t in zip(rows.tolist(), nxt[:, 0].tolist()):     # one host sync per step
            if t == stop:
                stopped[r] = True
            else:
                out[r].append(t)
        alive = nxt[:, 0] != stop
        if pos + 1 == P + max_new_tokens or not alive.any():
            break
        if not alive.all():                                      # finished rows leave the batch and its caches
            rows, nxt, keep = rows[alive], nxt[alive], keep[alive]
            for a in attn:
                a.cache = {name: t[alive] for name, t in a.cache.items()}
        keep = torch.cat([keep, keep.new_ones(len(rows), 1)], dim=1)
        logits = model.logits(model.hidden(nxt, pos, padded_mask(keep, pos, 1))[:, -1])
    model.train(was_training)
    return list(zip(out, stopped))


# ----------------------------------------------------------------------------- evaluation

def base_prompt(encode, problem, context):
    """How the pretraining corpus writes a question, after one solved example of its kind (a training pair): its last
    context - BASE_ANSWER_TOKENS tokens, as a sliding window would see them."""
    example = next(p for p in training_problems(HELD_OUT_SEED) if p.kind == problem.kind)
    return encode(f"{example.question}\n{example.answer}\n{problem.question}\n")[-(context - BASE_ANSWER_TOKENS):]


@torch.no_grad()
def evaluate(model, meta, problems, context=None, batch_size=256, temperature=0.0):
    """Exact match on problems, greedy (or one sample each at `temperature`): {kind: [right or not, ...]} plus
    "replies" (their text) and "lengths" (their tokens, the end token included). A chat checkpoint answers through its
    template (up to ANSWER_TOKENS, stopping at the end token; is_correct); a pretrained one (meta without chat tokens)
    as its corpus is written (base_prompt; context: its training length), its line ending at a newline and right
    when it is the answer."""
    encode, decode = tokenizer_from_meta(meta)
    if "special" in meta:
        template = Template(meta)
        prompts, stop, limit = [template.prompt(p.question) for p in problems], template.eos, ANSWER_TOKENS
    else:
        prompts, stop = [base_prompt(encode, p, context) for p in problems], encode("\n")[0]
        limit = BASE_ANSWER_TOKENS
    results, replies, lengths = {kind: [] for kind in MATH_KINDS}, [], []
    for at in range(0, len(prompts), batch_size):
        outputs = generate(model, prompts[at:at + batch_size], limit, stop, temperature=temperature)
        for p, (tokens, stopped) in zip(problems[at:at + batch_size], outputs):
            replies.append(decode(tokens))
            lengths.append(len(tokens) + stopped)
            right = is_correct(replies[-1], stopped, p.answer) if "special" in meta else stopped and replies[-1] == p.answer
            results[p.kind].append(right)
    return {**{k: v for k, v in results.items() if v}, "replies": replies, "lengths": lengths}


def accuracy(results):
    """{kind: (right, asked)} and "all", from evaluate's results (or several runs' concatenated)."""
    counts = {k: (sum(v), len(v)) for k, v in results.items() if k in MATH_KINDS}
    return {**counts, "all": tuple(map(sum, zip(*counts.values())))}


def wilson(right, n, z=1.96):
    """The 95% Wilson score interval (low, high) of a proportion right / n."""
    if n == 0:
        return 0.0, 1.0
    p = right / n
    mid, half = (p + z * z / (2 * n)), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (mid - half) / (1 + z * z / n)), min(1.0, (mid + half) / (1 + z * z / n))   # 0/n, n/n: exactly


def paired(first, second, z=1.96):
    """Two models' right-or-not on the same questions (lists of bools, question by question): the difference in
    accuracy, first - second, with its 95% paired interval (low, high), and McNemar's exact two-sided p-value (the
    binomial test of the b questions only the first gets right against the c only the second does)."""
    n = len(first)
    b = sum(f and not s for f, s in zip(first, second))
    c = sum(s and not f for f, s in zip(first, second))
    diff = (b - c) / n
    half = z * math.sqrt(max(b + c - (b - c) ** 2 / n, 0.0)) / n
    tail = sum(math.comb(b + c, k) for k in range(min(b, c) + 1)) / 2 ** (b + c)
    return diff, (diff - half, diff + half), min(1.0, 2 * tail)


# ----------------------------------------------------------------------------- what the stage scripts share

def configure(argv, defaults, least, doc):
    """(config, checkpoint dict to start from, device) for sft.py and grpo.py: their defaults, presets and --key=value as
    train.py parses its own (doc: the command's, for --help); least: {key: smallest value}. init_from is a folder of
    either kind (checkpoint_path); a missing checkpoint, or one in out_dir that the run would overwrite (without
    overwrite=True), is a one-line UserError. Sets the CPU threads (threads)."""
    c = SimpleNamespace(**parse_config(sys.argv[1:] if argv is None else argv, defaults, doc)[0])
    for key, low in least.items():
        if getattr(c, key) < low:
            raise UserError(f"{key} must be at least {low}, not {getattr(c, key)}")
    if Path(c.out_dir).resolve() == Path(c.init_from).resolve():
        raise UserError(f"out_dir {c.out_dir} is init_from's folder: a run from a checkpoint writes into one of its own")
    if c.eval_questions > HELD_OUT_MOST:
        raise UserError(f"eval_questions must be at most {HELD_OUT_MOST}, not {c.eval_questions}")
    if (Path(c.out_dir) / "ckpt.pt").exists() and not c.overwrite:
        raise UserError(f"{c.out_dir}/ckpt.pt exists and this run would overwrite it: --out_dir=OTHER writes beside it, "
                        f"--overwrite=True replaces it")
    device = pick_device(c.device)
    set_threads(c.threads, device)
    return c, read_checkpoint(checkpoint_path(c.init_from)), device


def recorder(out_dir):
    """record(**entry): one JSON line appended to out_dir/log.jsonl (created with its folder); a new run starts the
    log afresh, as train.py does."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "log.jsonl").unlink(missing_ok=True)

    def record(**entry):
        with open(Path(out_dir) / "log.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
    return record


def describe(acc):
    """One line of evaluate's accuracy: overall, then per kind."""
    right, n = acc["all"]
    return f"{right}/{n} = {right / n:.1%} (" + ", ".join(f"{k} {r}/{m}" for k, (r, m) in acc.items() if k != "all") + ")"


def held_out_eval(model, meta, problems, step, record, train_s):
    """A stage's evaluation at `step`: evaluate's accuracy and the replies' mean length in tokens, printed and logged.
    -> the accuracy."""
    results = evaluate(model, meta, problems)
    acc, length = accuracy(results), sum(results["lengths"]) / len(results["lengths"])
    print(f"eval step {step}: held-out {describe(acc)}, replies of {length:.1f} tokens")
    record(kind="eval", step=step, accuracy=acc, length=length, train_s=train_s)
    return acc
