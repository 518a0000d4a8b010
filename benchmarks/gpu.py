"""bench.py --gpu: what is worth measuring on one CUDA GPU, in about 8 minutes."""
from pathlib import Path

import torch

from benchmarks import decode, kernels, systems
from benchmarks.common import gpu_speed, train_run
from checkpoint.ckpt import load_checkpoint
from pretraining.data import tokenizer_from_meta


def run(args):
    """What is worth measuring on one CUDA GPU, in about 8 minutes: the kernel table; config/shakespeare_char.py
    trained for as many of its 5000 steps as fit in --gpu_minutes (schedule scaled to them) beside nanoGPT's
    published 1.4697; decoding speeds of the checkpoint it wrote; FP8 against bf16."""
    if not torch.cuda.is_available():
        print("gpu: no CUDA device on this machine: nothing measured")
        return
    kernels.run(args)
    step_s = gpu_speed(args, "timing")["step_s"]
    iters = min(5000, int(60 * args.gpu_minutes / (1.15 * step_s)))      # 15% for the evaluations
    print(f"\ngpu: config/shakespeare_char.py, {iters} of 5000 steps ({1000 * step_s:.0f} ms/step measured)")
    out = Path(args.out) / "gpu-char"
    r = train_run(args, out, ["shakespeare_char", f"--data_dir={args.data_dir}", "--device=cuda", f"--max_iters={iters}",
                              f"--lr_decay_iters={iters}", f"--mtp_lambda_step={round(0.7 * iters)}"], f"{out}.log")
    print("| run | steps | best val loss | wall | tokens/s | MFU |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| ours ({torch.cuda.get_device_name()}) | {iters} | {r['best']:.4f} | {r['wall_s']:.0f} s | "
          f"{r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% |")
    print("| nanoGPT, published (A100) | 5000 | 1.4697 | about 3 min | | |\n")
    model, ckpt = load_checkpoint(out / "ckpt.pt", "cuda")
    idx = torch.tensor([tokenizer_from_meta(ckpt["meta"])[0]("ROMEO:\n")], device="cuda")
    decode.header()
    decode.row("shakespeare_char (GPU)", model, idx, model.args.max_seq_len - idx.size(1), args.timing_repeats)
    print()
    systems.fp8_gpu_speed(args)
