"""Sample from a trained model, decoding with the compressed MLA cache and, when the checkpoint has
an MTP module, lossless MTP speculative decoding (report §5.4.3).

    python sample.py                                    # from what `python train.py` wrote (out/ckpt.pt)
    python sample.py --out_dir=out-shakespeare-char --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python sample.py --start=FILE:prompt.txt --temperature=0 --speculative=False --attn_impl=naive
    python sample.py --out_dir=out-domains-cpu --show_experts=1    # each token marked by its expert in layer 1
    python sample.py --init_from=out-hf                 # a folder in DeepSeek's layout (checkpoint/hf.py)
    python sample.py --init_from=DeepSeek-V2-Lite --device=cuda --dtype=bfloat16 --start="The capital of France is"
    python sample.py --out_dir=out-grpo-cpu --chat="What is 12 times 7?"   # a chat checkpoint's answer (greedy)
    python sample.py --out_dir=out-grpo-cpu --chat=FILE:questions.txt     # one answer per line of the file, batched
    python sample.py --out_dir=out-grpo-cpu --chat="What is 12 times 7?" --show_thinking=True   # and its thinking
"""
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

import kernels
from checkpoint.ckpt import load_model
from deepseek import MoE
from inference.routing import mark_experts, top_experts
from inference.speculative import generate_speculative
from posttraining import chat
from pretraining.configurator import UserError, now, parse_config, pick_device, run_cli, set_threads
from pretraining.data import tokenizer_from_meta

DEFAULTS = dict(
    out_dir="out",            # the folder to sample from: a train.py out_dir (its ckpt.pt) or one in DeepSeek's layout
    init_from="",             # a folder of either kind to sample from instead of out_dir (export.py writes one)
    start="\n",               # the prompt, or FILE:path to read it from a file
    num_samples=3, max_new_tokens=300,
    temperature=0.8,          # 0: greedy; with --chat, 0 unless given
    top_k=200, seed=1337,
    device="auto",            # auto (cuda, then mps, then cpu) | cpu | cuda | cuda:N | mps
    dtype="float32",          # the weights' dtype: float32 | bfloat16 | float16 (bfloat16 halves a large model's memory)
    threads=0,                # CPU threads for torch on a CPU device (0: the cores idle at start)
    speculative=True,         # MTP drafts when the checkpoint has an MTP module; False: plain decoding
    attn_impl="absorb",       # MLA decode cache: latent + RoPE key (absorb) or full per-head K/V (naive)
    kernels=True,             # kernels.py's MoE paths (False: deepseek.py's reference loop over experts)
    show_experts=-1,          # LAYER: mark each token with its top routed expert in MoE layer LAYER (-1: off)
    chat="",                  # a chat checkpoint (sft.py, grpo.py) answers this question, or each line of FILE:path
    show_thinking=False,      # with --chat: print the whole reply, <think>thinking</think>answer, not the answer alone
)


def configure(argv):
    """The config for sample.py, checked: temperature 0 with --chat unless given; --speculative=True explicit
    means it must run (the checkpoint needs MTP), the default means "where it can"."""
    cfg, explicit, _ = parse_config(argv, DEFAULTS, __doc__)
    if cfg["chat"] and "temperature" not in explicit:
        cfg["temperature"] = 0.0
    if cfg["chat"] and (explicit & {"speculative", "show_experts"}):
        raise UserError("--chat answers in one batch from the latent cache: without --speculative or --show_experts")
    if cfg["show_thinking"] and not cfg["chat"]:
        raise UserError("--show_thinking shows a chat model's thinking: with --chat")
    if cfg["num_samples"] < 1 or cfg["max_new_tokens"] < 1 or cfg["temperature"] < 0 or cfg["top_k"] < 1:
        raise UserError("num_samples, max_new_tokens and top_k must be >= 1, temperature >= 0")
    for key, allowed in dict(dtype=("float32", "bfloat16", "float16"), attn_impl=("absorb", "naive")).items():
        if cfg[key] not in allowed:
            raise UserError(f"{key} must be one of {', '.join(allowed)}, not {cfg[key]!r}")
    return cfg, "speculative" in explicit


def read_prompt(start):
    if not start.startswith("FILE:"):
        return start
    path = Path(start[5:]).expanduser()
    if not path.is_file():
        raise UserError(f"prompt file {path} not found")
    return path.read_text(encoding="utf-8")


def answer(model, template, text, a, batch_size=256):
    """--chat: each question of text (a line of a FILE:, or the text itself) through the chat template, answered in
    batches (chat.generate) up to the end token or max_new_tokens; one printed line per question (a newline in it as
    \\n): the answer after </think>, or with show_thinking (or when the thinking never ended) the whole reply from
    <think>."""
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
            reply = template.decode(tokens)
            shown = chat.final_answer(reply)
            if a.show_thinking or shown is None:
                shown = template.decode([template.think]) + reply
            print(shown.replace("\n", "\\n"))


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    cfg, must_speculate = configure(sys.argv[1:] if argv is None else argv)
    a = SimpleNamespace(**cfg)
    device = pick_device(a.device)
    set_threads(a.threads, device)
    dtype, folder = getattr(torch, a.dtype), a.init_from or a.out_dir
    model, meta = load_model(folder, device, dtype, a.kernels)
    if meta is None:
        raise UserError(f"{folder} has no tokenizer.json to encode the prompt with")
    model.set_attn_impl(a.attn_impl)
    if a.chat:
        return answer(model, chat.Template(meta, folder), a.chat, a)
    moe = [i for i, layer in enumerate(model.layers) if isinstance(layer.ffn, MoE)]
    if a.show_experts >= 0 and not moe:
        raise UserError("--show_experts: the checkpoint's model is dense (n_routed_experts=0): no routed experts")
    if a.show_experts not in moe + [-1]:
        raise UserError(f"--show_experts={a.show_experts}: not an MoE layer of this model (those are "
                        f"{', '.join(map(str, moe))}; layers count from 0)")
    if must_speculate and a.speculative and not model.mtp:
        raise UserError("--speculative=True needs a checkpoint trained with MTP (n_mtp >= 1)")
    speculative = a.speculative and bool(model.mtp)
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
    if a.show_experts >= 0:
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
        if a.show_experts < 0:
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
