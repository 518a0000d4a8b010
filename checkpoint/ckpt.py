"""The checkpoints train.py and the post-training stages write (out_dir/ckpt.pt), and what every command reads:
a ckpt.pt, or a folder in DeepSeek's layout (hf.py) wherever a folder is asked for.

    save_checkpoint(dict(model=..., model_args=..., meta=..., optimizer=..., iter_num=..., config=...), path)
    ckpt = read_checkpoint(checkpoint_path("out"))          # out/ckpt.pt, or the folder itself in DeepSeek's layout
    model, meta = load_model("out", device="cpu", dtype=torch.bfloat16)   # in eval mode, kernels installed
"""
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

import kernels
from checkpoint import hf
from deepseek import ModelArgs, Transformer
from pretraining.configurator import UserError, one_line
from pretraining.data import write_atomic

CKPT_KEYS = ("model", "model_args", "meta", "optimizer", "iter_num", "config")


def save_checkpoint(ckpt, path):
    """Atomic (via path.tmp, synced to disk): a crash mid-save leaves the previous checkpoint intact; rank 0 writes."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(path), lambda f: torch.save(ckpt, f))


def checkpoint_path(folder):
    """The checkpoint a folder holds: its ckpt.pt, or the folder itself when it holds DeepSeek's layout
    (config.json and safetensors: hf.py) and no ckpt.pt. A one-line UserError when it holds neither."""
    folder = Path(folder)
    if (folder / "ckpt.pt").is_file():
        return folder / "ckpt.pt"
    if hf.is_folder(folder):
        return folder
    what = "is not a folder" if not folder.is_dir() else "holds neither a ckpt.pt nor DeepSeek's layout (config.json)"
    raise UserError(f"no checkpoint at {folder}: it {what}" if folder.exists() else f"no checkpoint at {folder}")


def read_checkpoint(path):
    """The checkpoint dict at path (a ckpt.pt, or a folder in DeepSeek's layout), in CPU memory; a one-line
    UserError if it is missing, unreadable or foreign."""
    path = Path(path)
    if path.is_dir():                        # a folder in DeepSeek's layout (config.json, safetensors): hf.py
        return hf.checkpoint(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        with warnings.catch_warnings():      # a foreign file's unpickler warnings: the error says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({one_line(e)})") from None
    if missing := [k for k in CKPT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]:
        raise UserError(f"{path} is not a train.py checkpoint (missing {', '.join(missing)})")
    return ckpt


def load_state(model, state, path):
    """The weights of a state dict into model (a compiled or DDP model's prefixes dropped); one line if they
    do not fit."""
    try:
        model.load_state_dict({k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in state.items()})
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not fit the model ({one_line(e)})") from None


def load_checkpoint(path, device="cpu", dtype=None, install_kernels=True, args=None):
    """(model in eval mode on device, checkpoint): read into CPU memory, only the weights go to device; dtype
    casts the weights alone (None: as saved; the RoPE tables and the gates' biases stay fp32, as hf.load keeps
    them); kernels.py's MoE paths installed unless told; args: ModelArgs fields changed (max_seq_len, YaRN's:
    the weights stay, the RoPE tables and softmax scale follow). One-line UserError for a missing, corrupt or
    foreign file."""
    ckpt = read_checkpoint(path)
    try:
        model = Transformer(ModelArgs(**{**ckpt["model_args"], **(args or {})}))
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: bad model_args ({one_line(e)})") from None
    load_state(model, ckpt["model"], path)
    if dtype is not None:
        for p in model.parameters():
            p.data = p.data.to(dtype)
    if install_kernels:
        kernels.install(model)
    return model.to(device).eval(), ckpt


def load_model(folder, device="cpu", dtype=None, install_kernels=True):
    """(model in eval mode on device, weights in dtype; its tokenizer meta or None) from a folder of either kind:
    a train.py out_dir (its ckpt.pt) or a folder in DeepSeek's layout (any tokenizer.json, or none). dtype None:
    as saved (a folder in DeepSeek's layout: fp32, FP8 weights dequantized)."""
    path = checkpoint_path(folder)
    if path.is_dir():
        model, meta = hf.load(path, dtype or torch.float32, device)
        return kernels.install(model) if install_kernels else model, meta
    model, ckpt = load_checkpoint(path, device, dtype, install_kernels)
    return model, ckpt["meta"]
