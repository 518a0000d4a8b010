"""The data side of train.py: a text (Tiny Shakespeare, or your own .txt files) tokenised once into
token files, the tokenizers (GPT-2's BPE from tiktoken, or characters), the splits train.py reads
(load_data, checked against its config) and the training batches;
and a three-domain corpus (English, code, mathematics) for the report's expert-specialization figure (§4.5.3).

    folder, meta = prepare_data("data", text="my_book.txt", tokenizer="char")
    folder, meta = prepare_data("data", dataset="domains", tokenizer="char")   # val_by_domain(val, meta) splits it
    x, y = get_batch(load_split(folder, "train", meta), batch_size=12, block_size=64, seed=batch_seed(1337, 0))
    encode, decode = tokenizer_from_meta(meta)
"""
import collections
import itertools
import json
import os
import platform
import random
import re
import sysconfig
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pretraining.configurator import UserError, one_line

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DOMAINS = ("english", "code", "math")                  # the three-domain corpus, in the order its splits hold them
STDLIB = Path(sysconfig.get_paths()["stdlib"])         # its code: this Python's own standard library
MATH_SEED = 0


def write_atomic(path, write):
    """write(f) into path.tmp opened for bytes, synced to disk, then renamed over path: a crash midway
    leaves the previous file intact."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _tiktoken(encoding):
    import tiktoken
    try:
        return tiktoken.get_encoding(encoding)
    except ValueError as e:
        raise UserError(f"unknown tiktoken encoding {encoding!r} ({one_line(e)})") from None
    except Exception as e:   # no network and no cached file
        cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
            f"{tempfile.gettempdir()}/data-gym-cache (tiktoken's default)"
        raise UserError(f"tiktoken's {encoding!r} is not in its cache {cache} and could not be downloaded "
                        f"({type(e).__name__}): set TIKTOKEN_CACHE_DIR to a folder holding its cached file, or use "
                        f"--tokenizer=char") from None


def tokenizer_from_meta(meta):
    """(encode, decode) for a tokenizer meta dict: {"tokenizer": "bpe", "encoding": ...},
    {"tokenizer": "char", "chars": ...} or {"tokenizer": "hf", "file": a tokenizer.json}; plus "special": a list of
    strings (a chat template's tokens, chat.py) whose ids follow the base vocabulary, each encoded whole wherever it
    occurs. The char encoder raises ValueError naming unknown characters."""
    encode, decode, n = _base_tokenizer(meta)
    special = meta.get("special", [])
    if not special:
        return encode, decode
    ids, pattern = {s: n + i for i, s in enumerate(special)}, re.compile(f"({'|'.join(map(re.escape, special))})")

    def encode_special(s):           # split gives text, special, text, ..., text
        return [t for i, part in enumerate(pattern.split(s)) for t in ([ids[part]] if i % 2 else encode(part))]

    def decode_special(tokens):      # runs of base tokens decoded together (a BPE character may span tokens)
        return "".join("".join(special[t - n] for t in run) if is_special else decode(list(run))
                       for is_special, run in itertools.groupby(tokens, lambda t: t >= n))
    return encode_special, decode_special


def _base_tokenizer(meta):
    """(encode, decode, vocabulary size) of tokenizer_from_meta's three tokenizers."""
    if meta.get("tokenizer") == "bpe":
        enc = _tiktoken(meta["encoding"])
        return (lambda s: enc.encode(s, allowed_special="all")), enc.decode, enc.n_vocab
    if meta.get("tokenizer") == "hf":           # a folder's tokenizer.json that is neither of ours (hf.tokenizer_meta)
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UserError(f"{meta['file']} needs the tokenizers package: pip install tokenizers") from None
        try:
            tok = Tokenizer.from_file(meta["file"])
        except Exception as e:
            raise UserError(f"{meta['file']} is not a tokenizer the tokenizers package reads ({one_line(e)})") from None

        def encode(s):
            try:
                return tok.encode(s).ids
            except Exception as e:          # a character a word-level vocabulary lacks
                raise ValueError(one_line(e)) from None
        return encode, lambda ids: tok.decode(ids, skip_special_tokens=False), tok.get_vocab_size()
    if meta.get("tokenizer") != "char":
        raise ValueError(f"unknown tokenizer {meta.get('tokenizer')!r} in meta (expected 'bpe', 'char' or 'hf')")
    chars = meta["chars"]
    stoi = {ch: i for i, ch in enumerate(chars)}

    def encode(s):
        if unknown := sorted(set(s) - stoi.keys()):
            raise ValueError(f"characters not in the vocabulary: {''.join(unknown)!r}")
        return [stoi[ch] for ch in s]
    return encode, lambda ids: "".join(chars[i] for i in ids), len(chars)


def _source_files(text, shakespeare, log):
    """`text` (a file, or a folder's .txt files in sorted order), else Tiny Shakespeare at the path
    `shakespeare`, downloaded on first use."""
    if not text:
        if not shakespeare.exists():
            shakespeare.parent.mkdir(parents=True, exist_ok=True)
            log(f"downloading Tiny Shakespeare to {shakespeare}")
            try:
                with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as r:
                    data = r.read()
            except Exception as e:
                raise UserError(f"could not download Tiny Shakespeare ({one_line(e)}); place the file by hand at "
                                f"{shakespeare} (it is {SHAKESPEARE_URL}) or pass --text=PATH") from None
            write_atomic(shakespeare, lambda f: f.write(data))
        return [shakespeare]
    path = Path(text).expanduser()
    if not path.is_dir() and not path.is_file():
        raise UserError(f"text file {text} not found")
    files = sorted(p for p in path.rglob("*.txt") if p.is_file()) if path.is_dir() else [path]
    if not files:
        raise UserError(f"no .txt files in folder {text}")
    return files


def stdlib_code(size):
    """The corpus's code: the standard library's public top-level modules (no leading underscore), in sorted
    order, those in plain ASCII (a printable vocabulary), joined until they hold `size` characters."""
    files = sorted(p for p in STDLIB.glob("*.py") if not p.name.startswith("_"))
    if not files:
        raise UserError(f"the domains corpus needs the Python standard library's .py sources, and {STDLIB} has none: "
                        f"install them (e.g. your distribution's full python3 package) or use another dataset")
    texts, n = [], 0
    for p in files:
        if n >= size:
            break
        if (t := p.read_text(encoding="utf-8")).isascii():
            texts.append(t)
            n += len(t) + 2
    return "\n\n".join(texts)


MATH_KINDS = ("sum", "difference", "product", "bigger", "less", "remainder", "solve")
MathProblem = collections.namedtuple("MathProblem", "question answer worked kind operands")


def math_problems(seed=MATH_SEED):
    """The maths generator, endless, in the spirit of DM Mathematics: MathProblem(question, answer, worked, kind,
    operands) of the seven MATH_KINDS (sums, differences, products, comparisons, remainders, linear equations in one
    unknown). answer is the text the corpus writes; worked reaches it after short steps the generator knows ("45 + -23
    = 45 - 23 = 22"): the answer always follows the last "= "; operands are the numbers the question is made of, for
    whoever writes longer solutions (posttraining/reasoning.py): (a, b) for sums, differences and less, (m, b) for
    products, tenths (a, b) for bigger, (n, d) for remainders, (k, v, b, c) for k*v + b = c."""
    rng = random.Random(seed)
    while True:
        a, b, m, d = rng.randint(-99, 99), rng.randint(-99, 99), rng.randint(-12, 12), rng.randint(2, 12)
        x, k, v = rng.randint(-10, 10), rng.choice((-1, 1)) * rng.randint(2, 9), rng.choice("abcfgjklmnpqrstuvwxyz")
        kind, operands = rng.choice(MATH_KINDS), (a, b)
        if kind == "sum":
            q, answer, steps = f"What is {a} + {b}?", a + b, [f"{a} + {b}"] + [f"{a} - {-b}"] * (b < 0)
        elif kind == "difference":
            q, answer, steps = f"Calculate {a} - {b}.", a - b, [f"{a} - {b}"] + [f"{a} + {-b}"] * (b < 0)
        elif kind == "product":          # the sign first, then the product of the sizes
            q, answer, steps, operands = f"What is {m} times {b}?", m * b, [f"{m}*{b}"], (m, b)
            if m * b and min(m, b) < 0:
                steps.append(f"{-m}*{-b}" if m < 0 and b < 0 else f"-({abs(m)}*{abs(b)})")
        elif kind == "bigger":
            q, answer, steps = f"Which is bigger: {a / 10} or {b / 10}?", max(a, b) / 10, [f"max({a / 10}, {b / 10})"]
        elif kind == "less":
            q, answer, steps = f"Is {a} less than {b}?", a < b, [f"{a} < {b}"]
        elif kind == "remainder":
            q, answer, operands = f"What is the remainder when {abs(a)} is divided by {d}?", abs(a) % d, (abs(a), d)
            steps = [f"{abs(a)} - {abs(a) // d}*{d}"]
        else:                            # k*v + b = c: k*v = c - b, then v
            c, op = k * x + b, "+" if b < 0 else "-"
            q, answer, operands = f"Solve {k}*{v} {'-' if b < 0 else '+'} {abs(b)} = {c} for {v}.", x, (k, v, b, c)
            steps = [f"{k}*{v} = {c} {op} {abs(b)} = {c - b}, {v}"]
        yield MathProblem(q, str(answer), " = ".join(steps + [str(answer)]), kind, operands)


def math_text(size, seed=MATH_SEED):
    """The corpus's mathematics: a question line and its answer line from math_problems, until `size` characters."""
    lines, n = [], 0
    for p in math_problems(seed):
        if n >= size:
            break
        lines.append(f"{p.question}\n{p.answer}\n")
        n += len(lines[-1])
    return "".join(lines)


def domain_texts(english):
    """The three domains in equal shares: the English text, the standard library's code, generated mathematics,
    each cut to the same number of characters (the English text's, or the code's if that is less)."""
    code = stdlib_code(len(english))
    n = min(len(english), len(code))
    return [english[:n], code[:n], math_text(n)[:n]]


def val_by_domain(val, meta):
    """{domain: its validation tokens} of the domains corpus: the val split holds them one after the other."""
    ends = np.cumsum([n for _, n in meta["domains"].values()])
    return {d: val[e - n:e] for (d, (_, n)), e in zip(meta["domains"].items(), ends)}


def prepare_data(data_dir="data", dataset="", text="", tokenizer="bpe", encoding="r50k_base", log=print):
    """Tokenise a text once into data_dir/NAME/TOKENIZER/{train,val}.bin (uint16, or uint32 for a large
    vocabulary; 90/10 split) plus meta.json; later calls reuse them while the source files are unchanged.
    Several files are joined by an end-of-text token (for chars, a blank line). Returns (folder, meta).
    dataset "domains": the three-domain corpus of domain_texts, `text` (default Tiny Shakespeare) its English;
    each domain is split 90/10 by itself, the splits hold the domains in DOMAINS order, and meta["domains"]
    gives each one's [train, val] tokens."""
    domains = dataset == "domains"
    name = dataset or (Path(text).expanduser().resolve().stem if text else "shakespeare")
    files = _source_files(text, Path(data_dir) / ("shakespeare" if domains else name) / "input.txt", log)
    folder = Path(data_dir) / name / ("char" if tokenizer == "char" else encoding)
    source = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    source += [[str(STDLIB), platform.python_version(), MATH_SEED]] if domains else []
    meta_path = folder / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("source") == source and (folder / "train.bin").exists() and (folder / "val.bin").exists():
            return folder, meta
    log(f"tokenising {len(files)} file(s) into {folder} ({tokenizer})")
    texts = []
    for p in files:
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"{p} is not UTF-8 text") from None
    parts = [[t] for t in domain_texts("\n\n".join(texts))] if domains else [texts]   # each split 90/10 by itself
    if tokenizer == "char":
        wholes = ["\n\n".join(p) for p in parts]
        chars = "".join(sorted(set().union(*wholes)))
        # code points -> ranks in the sorted vocabulary, without a Python loop over characters
        code_points = lambda s: np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32)   # noqa: E731
        ids = [np.searchsorted(code_points(chars), code_points(w)) for w in wholes]
        meta = dict(tokenizer="char", chars=chars, vocab_size=len(chars))
    else:
        enc = _tiktoken(encoding)
        ids = [np.concatenate([np.array(([enc.eot_token] if i else []) + enc.encode_ordinary(t), dtype=np.int64)
                               for i, t in enumerate(p)]) for p in parts]
        meta = dict(tokenizer="bpe", encoding=encoding, vocab_size=enc.n_vocab)
    if sum(map(len, ids)) == 0:
        raise UserError(f"no text in {text or files[0]}")
    dtype = np.uint16 if meta["vocab_size"] <= 2 ** 16 else np.uint32
    cut = [int(0.9 * len(i)) for i in ids]
    folder.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", [i[:n] for i, n in zip(ids, cut)]), ("val", [i[n:] for i, n in zip(ids, cut)])):
        write_atomic(folder / f"{split}.bin", np.concatenate(part).astype(dtype).tofile)
    meta.update(dtype=np.dtype(dtype).name, train_tokens=sum(cut), val_tokens=sum(map(len, ids)) - sum(cut), source=source)
    if domains:
        meta["domains"] = {d: [n, len(i) - n] for d, i, n in zip(DOMAINS, ids, cut)}
    write_atomic(meta_path, lambda f: f.write(json.dumps(meta).encode()))   # last: a meta means complete .bin files
    return folder, meta


def tokenizer_meta(meta):
    """The part of a data meta that defines the tokenizer (what checkpoints store): with a chat template's special
    tokens and its Jinja text where the meta has them (posttraining/chat.py adds them)."""
    keys = ("tokenizer", "encoding" if meta["tokenizer"] == "bpe" else "chars", "vocab_size", "special", "chat_template")
    return {k: meta[k] for k in keys if k in meta}


def load_split(folder, split, meta):
    return np.memmap(Path(folder) / f"{split}.bin", dtype=meta["dtype"], mode="r")


def batch_seed(*ints):
    """A 63-bit generator seed mixed from a tuple of ints (seed, stream, rank, step, ...)."""
    return int(np.random.SeedSequence([int(i) for i in ints]).generate_state(1, np.uint64)[0]) >> 1


def get_batch(data, batch_size, block_size, seed, device="cpu"):
    """batch_size windows of block_size + 1 tokens at positions drawn from a generator seeded with
    `seed` (so the same seed gives the same batch): inputs x and next-token targets y, int64 (B, T)."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=torch.Generator().manual_seed(seed))
    xy = torch.from_numpy(np.stack([data[i:i + block_size + 1] for i in ix.tolist()]).astype(np.int64))
    xy = xy.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else xy.to(device)
    return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()


def load_data(c, ckpt, rank, log):
    """train.py's (train, val, meta) for config c, checked against it and the checkpoint it starts from (None
    from scratch); under torchrun rank 0 tokenises first, the others then read its files."""
    if rank == 0:
        folder, meta = prepare_data(c.data_dir, c.dataset, c.text, c.tokenizer, c.encoding, log)
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        folder, meta = prepare_data(c.data_dir, c.dataset, c.text, c.tokenizer, c.encoding, log)
    if ckpt is not None and tokenizer_meta(meta) != ckpt["meta"]:
        raise UserError(f"the data's tokenizer ({meta['tokenizer']}, {meta['vocab_size']} tokens) differs "
                        f"from the checkpoint's ({ckpt['meta']['tokenizer']}, {ckpt['meta']['vocab_size']} tokens)")
    train, val = load_split(folder, "train", meta), load_split(folder, "val", meta)
    for split, data in (("train", train), ("val", val)):
        if len(data) < c.block_size + 1:
            raise UserError(f"the {split} split of {folder} has {len(data)} tokens, fewer than block_size + 1 = "
                            f"{c.block_size + 1}: lower block_size or use more text")
    if c.batch_size * c.block_size > len(train):
        raise UserError(f"a batch (batch_size * block_size = {c.batch_size * c.block_size} tokens) is larger than the "
                        f"train split ({len(train)} tokens): lower batch_size or block_size, or use more text")
    return train, val, meta
