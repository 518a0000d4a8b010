"""What post-training's stages share (report §5): DeepSeek-V3's chat template and its special tokens added to a pretrained
checkpoint, the maths tasks (training pairs in unlimited supply, a held-out set), the rule that checks an answer,
batched generation from the latent cache, and the held-out evaluation. sft.py, grpo.py, sample.py --chat and
benchmarks/posttrain.py use them.

    model, meta = chat_model(read_checkpoint("out-domains-cpu/ckpt.pt"), "out-domains-cpu", max_seq_len=128)
    template = Template(meta)
    outs = generate(model, [template.prompt("What is 12 times 7?")], 16, template.eos)   # [(tokens, stopped)]
    results = evaluate(model, meta, held_out_problems(420))   # {kind: [right or not, ...]}
"""
import json
import math
import sys
import zlib
from pathlib import Path
from types import SimpleNamespace

import torch

import deepseek as ds
import kernels
from checkpoint.ckpt import checkpoint_path, load_state, read_checkpoint
from pretraining.configurator import UserError, parse_config, pick_device, set_threads
from pretraining.data import MATH_KINDS, math_problems, tokenizer_from_meta

# <｜begin▁of▁sentence｜><｜User｜>{question}<｜Assistant｜>{answer}<｜end▁of▁sentence｜>, ids after the base vocabulary
SPECIAL = ("<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>")
# the same template as transformers' apply_chat_template reads it (Jinja; export.py writes it to tokenizer_config.json)
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
                 "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>{% endif %}"
                 "{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")
HELD_OUT_SEED = 1           # the held-out draws; the corpus uses data.MATH_SEED (0), training pairs data.batch_seed(...)
HELD_OUT_SHARE = 5          # one question text in 5 (by its CRC-32) is reserved for the held-out set
HELD_OUT_MOST = 700         # 100 of each kind: the remainder kind has only 1,100 questions, about 220 of them held out
ANSWER_TOKENS = 40          # the length limit of an answer: a worked one takes up to 31 tokens with its end token
BASE_ANSWER_TOKENS = 8      # a pretrained model answers as its corpus does, on one line of at most 5 characters


# ----------------------------------------------------------------------------- template and special tokens

class Template:
    """The chat template over a chat checkpoint's tokenizer (meta["special"] == SPECIAL)."""

    def __init__(self, meta, path="the checkpoint"):
        if meta.get("special") != list(SPECIAL):
            raise UserError(f"{path} has no chat tokens in its vocabulary (a pretrained model: sft.py adds them)")
        self.encode, self.decode = tokenizer_from_meta(meta)
        first = meta["vocab_size"] - len(SPECIAL)
        self.bos, self.user, self.assistant, self.eos = range(first, first + len(SPECIAL))

    def question(self, text):
        """The question's tokens; ValueError (a one-line message) for characters outside a char vocabulary or a chat token."""
        if token := next((s for s in SPECIAL if s in text), None):
            raise ValueError(f"the question holds the chat token {token}")
        return self.encode(text)

    def prompt(self, question):
        """<BOS><User>{question}<Assistant>: what the assistant's answer follows."""
        return [self.bos, self.user, *self.question(question), self.assistant]

    def example(self, question, answer):
        """A training example: (tokens of the whole conversation, which of them are the assistant's: the answer and the
        end-of-sentence token, the only ones the SFT loss sees)."""
        prompt, reply = self.prompt(question), self.encode(answer) + [self.eos]
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
    """Endless (question, answer, worked, kind) from data.math_problems(seed), none of them a held-out question."""
    return (p for p in math_problems(seed) if not held_out_question(p[0]))


def held_out_problems(n):
    """n distinct held-out problems (n <= HELD_OUT_MOST), as evenly over the kinds as n allows, in kind order, drawn
    from HELD_OUT_SEED."""
    assert 0 < n <= HELD_OUT_MOST, n
    want = {kind: n // len(MATH_KINDS) + (i < n % len(MATH_KINDS)) for i, kind in enumerate(MATH_KINDS)}
    chosen, seen = {kind: [] for kind in MATH_KINDS}, set()
    for p in math_problems(HELD_OUT_SEED):
        if held_out_question(p[0]) and p[0] not in seen and len(chosen[p[3]]) < want[p[3]]:
            seen.add(p[0])
            chosen[p[3]].append(p)
            if len(seen) == n:
                return [p for kind in MATH_KINDS for p in chosen[kind]]


# ----------------------------------------------------------------------------- the rule

def final_answer(text):
    """The answer a reply states: what follows its last "= " (a worked reply), else the whole reply."""
    return text.rsplit("= ", 1)[-1]


def is_correct(text, stopped, answer):
    """Right when the reply is well formed (it ended with the end token within the length limit) and its final answer is
    the generator's text exactly: "3.0" for 3, "-0" for 0, "22 apples" or a trailing space are wrong, as is a right
    answer that never stopped. The required format is the one the data writes (report §5.2.1)."""
    return stopped and final_answer(text) == answer


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
    q, _, _, kind = problem
    example = next(p for p in training_problems(HELD_OUT_SEED) if p[3] == kind)
    return encode(f"{example[0]}\n{example[1]}\n{q}\n")[-(context - BASE_ANSWER_TOKENS):]


@torch.no_grad()
def evaluate(model, meta, problems, context=None, batch_size=256):
    """Greedy exact match on problems: {kind: [right or not, ...]} plus {"replies": [text, ...]}. A chat checkpoint
    answers through its template (up to ANSWER_TOKENS, stopping at the end token); a pretrained one (meta without chat
    tokens) as its corpus is written (base_prompt; context: its training length), its line ending at a newline."""
    encode, decode = tokenizer_from_meta(meta)
    if "special" in meta:
        template = Template(meta)
        prompts, stop, limit = [template.prompt(p[0]) for p in problems], template.eos, ANSWER_TOKENS
    else:
        prompts, stop = [base_prompt(encode, p, context) for p in problems], encode("\n")[0]
        limit = BASE_ANSWER_TOKENS
    results, replies = {kind: [] for kind in MATH_KINDS}, []
    for at in range(0, len(prompts), batch_size):
        for (q, answer, _, kind), (tokens, stopped) in zip(problems[at:at + batch_size],
                                                           generate(model, prompts[at:at + batch_size], limit, stop)):
            replies.append(decode(tokens))
            results[kind].append(is_correct(replies[-1], stopped, answer))
    return {**{k: v for k, v in results.items() if v}, "replies": replies}


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
    """record(**entry): one JSON line appended to out_dir/log.jsonl (created with its folder)."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)

    def record(**entry):
        with open(Path(out_dir) / "log.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
    return record


def describe(acc):
    """One line of evaluate's accuracy: overall, then per kind."""
    right, n = acc["all"]
    return f"{right}/{n} = {right / n:.1%} (" + ", ".join(f"{k} {r}/{m}" for k, (r, m) in acc.items() if k != "all") + ")"


def held_out_eval(model, meta, problems, step, record, train_s):
    """A stage's evaluation at `step`: evaluate's accuracy, printed and logged. -> the accuracy."""
    acc = accuracy(evaluate(model, meta, problems))
    print(f"eval step {step}: held-out {describe(acc)}")
    record(kind="eval", step=step, accuracy=acc, train_s=train_s)
    return acc
