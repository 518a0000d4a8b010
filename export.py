"""Export a checkpoint to the layout DeepSeek publishes its weights in (hf.py): config.json, safetensors (sharded
with model.safetensors.index.json past --max_shard_size), the MTP module as layer num_hidden_layers, and the
tokenizer as tokenizer.json. transformers' AutoModelForCausalLM and AutoTokenizer load the folder.

    python export.py out/ out-hf/                        # out/ckpt.pt -> out-hf/ (a new or empty folder)
    python export.py out/ out-hf/ --dtype=bfloat16 --max_shard_size=2GB
    python export.py DeepSeek-V3/ v3-bf16/ --dtype=bfloat16   # a folder in the layout: FP8 weights dequantized
"""
import argparse
import json
import re
import sys
from pathlib import Path

import torch

import hf
from data import UserError, run_cli
from sample import Parser
from train import load_checkpoint


def size(text):
    """'5GB', '500MB', '64kB' (powers of 10, as transformers) or a number of bytes -> bytes."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kKMG]?B)?", text.strip())
    if not m:
        raise UserError(f"--max_shard_size={text}: expected a size such as 5GB, 500MB or 1000000")
    return int(float(m[1]) * {None: 1, "B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9}[m[2]])


def main(argv=None):
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a train.py out_dir (its ckpt.pt), or a folder in DeepSeek's layout")
    p.add_argument("target", help="the folder to write: new, or empty")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="the weights' dtype in the files (default: the checkpoint's; the gates' biases stay fp32)")
    p.add_argument("--max_shard_size", default="5GB", help="largest safetensors file (default 5GB)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    limit = size(a.max_shard_size)
    target = Path(a.target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):   # before reading anything
        raise UserError(f"{target} exists and is not an empty folder: export writes a new one")
    source, dtype = Path(a.source), a.dtype and getattr(torch, a.dtype)
    if hf.is_folder(source):
        model, meta = hf.load(source, dtype or torch.float32)
    else:
        model, ckpt = load_checkpoint(source / "ckpt.pt" if source.is_dir() else source, install_kernels=False)
        meta = ckpt["meta"]
    files = hf.export(model, meta, target, dtype, limit)
    gb = sum((target / f).stat().st_size for f in files) / 1e9
    kind = json.loads((target / "config.json").read_text())["model_type"]
    print(f"wrote {target}: {', '.join(files)} ({gb:.3f} GB), model_type {kind}")
    return files


def cli(argv=None):
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
