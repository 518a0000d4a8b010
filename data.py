"""
The data side of train.py: a text (Tiny Shakespeare, or your own .txt files) tokenised once into
token files, the tokenizers (GPT-2's BPE from tiktoken, or characters), and the training batches.

    folder, meta = prepare_data("data", text="my_book.txt", tokenizer="char")
    x, y = get_batch(load_split(folder, "train", meta), batch_size=12, block_size=64, seed=batch_seed(1337, 0))
    encode, decode = tokenizer_from_meta(meta)
"""
import json
import os
import urllib.request
from pathlib import Path

import numpy as np
import torch

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


class UserError(ValueError):
    """A mistake in the command, config or files: reported as one line `error: ...`, exit code 2."""


def one_line(e):
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0] if s else ''}"


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
        raise UserError(f"could not load tiktoken encoding {encoding!r} ({one_line(e)}); set TIKTOKEN_CACHE_DIR "
                        f"to a folder holding its cached file, or use --tokenizer=char") from None


def tokenizer_from_meta(meta):
    """(encode, decode) for a tokenizer meta dict: {"tokenizer": "bpe", "encoding": ...} or
    {"tokenizer": "char", "chars": ...}. The char encoder raises ValueError naming unknown characters."""
    if meta.get("tokenizer") == "bpe":
        enc = _tiktoken(meta["encoding"])
        return (lambda s: enc.encode(s, allowed_special="all")), enc.decode
    if meta.get("tokenizer") != "char":
        raise ValueError(f"unknown tokenizer {meta.get('tokenizer')!r} in meta (expected 'bpe' or 'char')")
    chars = meta["chars"]
    stoi = {ch: i for i, ch in enumerate(chars)}

    def encode(s):
        if unknown := sorted(set(s) - stoi.keys()):
            raise ValueError(f"characters not in the vocabulary: {''.join(unknown)!r}")
        return [stoi[ch] for ch in s]
    return encode, lambda ids: "".join(chars[i] for i in ids)


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


def prepare_data(data_dir="data", dataset="", text="", tokenizer="bpe", encoding="r50k_base", log=print):
    """Tokenise a text once into data_dir/NAME/TOKENIZER/{train,val}.bin (uint16, or uint32 for a large
    vocabulary; 90/10 split) plus meta.json; later calls reuse them while the source files are unchanged.
    Several files are joined by an end-of-text token (for chars, a blank line). Returns (folder, meta)."""
    name = dataset or (Path(text).expanduser().resolve().stem if text else "shakespeare")
    files = _source_files(text, Path(data_dir) / name / "input.txt", log)
    folder = Path(data_dir) / name / ("char" if tokenizer == "char" else encoding)
    source = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
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
    if tokenizer == "char":
        whole = "\n\n".join(texts)
        chars = "".join(sorted(set(whole)))
        # code points -> ranks in the sorted vocabulary, without a Python loop over characters
        codes = np.frombuffer(whole.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(np.frombuffer(chars.encode("utf-32-le"), dtype=np.uint32), codes)
        meta = dict(tokenizer="char", chars=chars, vocab_size=len(chars))
    else:
        enc = _tiktoken(encoding)
        ids = np.concatenate([np.array(([enc.eot_token] if i else []) + enc.encode_ordinary(t), dtype=np.int64)
                              for i, t in enumerate(texts)])
        meta = dict(tokenizer="bpe", encoding=encoding, vocab_size=enc.n_vocab)
    if len(ids) == 0:
        raise UserError(f"no text in {text or files[0]}")
    dtype = np.uint16 if meta["vocab_size"] <= 2 ** 16 else np.uint32
    n = int(0.9 * len(ids))
    folder.mkdir(parents=True, exist_ok=True)
    for split, part in (("train", ids[:n]), ("val", ids[n:])):
        write_atomic(folder / f"{split}.bin", part.astype(dtype).tofile)
    meta.update(dtype=np.dtype(dtype).name, train_tokens=n, val_tokens=len(ids) - n, source=source)
    write_atomic(meta_path, lambda f: f.write(json.dumps(meta).encode()))   # last: a meta means complete .bin files
    return folder, meta


def tokenizer_meta(meta):
    """The part of a data meta that defines the tokenizer (what checkpoints store)."""
    return {k: meta[k] for k in ("tokenizer", "encoding" if meta["tokenizer"] == "bpe" else "chars", "vocab_size")}


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
