"""Export a checkpoint to the layout DeepSeek publishes its weights in (checkpoint/hf.py): config.json,
safetensors (sharded with model.safetensors.index.json past max_shard_size), the MTP module as layer
num_hidden_layers, and the tokenizer as tokenizer.json. transformers' AutoModelForCausalLM and AutoTokenizer
load the folder.

    python export.py --init_from=out --out_dir=out-hf                # out/ckpt.pt -> out-hf/ (a new or empty folder)
    python export.py --init_from=out --out_dir=out-hf --dtype=bfloat16 --max_shard_size=2GB
    python export.py --init_from=DeepSeek-V3 --out_dir=v3-bf16 --dtype=bfloat16   # FP8 weights dequantized
"""
import json
import re
import sys
from pathlib import Path

import torch

from checkpoint import hf
from checkpoint.ckpt import load_model
from pretraining.configurator import UserError, parse_config, run_cli

DEFAULTS = dict(
    init_from="out",          # what to export: a train.py out_dir (its ckpt.pt), or a folder in DeepSeek's layout
    out_dir="out-hf",         # the folder to write: new, or empty
    dtype="",                 # the weights' dtype in the files: float32 | bfloat16 | float16 ("": the checkpoint's;
                              # the gates' biases stay fp32)
    max_shard_size="5GB",     # the largest safetensors file
)


def size(text):
    """'5GB', '500MB', '64kB' (powers of 10, as transformers) or a number of bytes -> bytes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kKMG]?B)?", text.strip())
    if not m:
        raise UserError(f"--max_shard_size={text}: expected a size such as 5GB, 500MB or 1000000")
    return int(float(m[1]) * {None: 1, "B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9}[m[2]])


def main(argv=None):
    a = parse_config(sys.argv[1:] if argv is None else argv, DEFAULTS, __doc__)[0]
    limit, target = size(a["max_shard_size"]), Path(a["out_dir"])
    if a["dtype"] not in ("", "float32", "bfloat16", "float16"):
        raise UserError(f"dtype must be one of float32, bfloat16, float16 (or empty: the checkpoint's), not {a['dtype']!r}")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):   # before reading anything
        raise UserError(f"{target} exists and is not an empty folder: export writes a new one")
    dtype = getattr(torch, a["dtype"]) if a["dtype"] else None
    model, meta = load_model(a["init_from"], dtype=dtype, install_kernels=False)
    files = hf.export(model, meta, target, dtype, limit)
    gb = sum((target / f).stat().st_size for f in files) / 1e9
    kind = json.loads((target / "config.json").read_text())["model_type"]
    print(f"wrote {target}: {', '.join(files)} ({gb:.3f} GB), model_type {kind}")
    return files


def cli(argv=None):
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
