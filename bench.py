"""Benchmarks: what each idea costs and buys, measured side by side in one process. One command line,
one file per part beside this one (bench_*.py, their shared helpers in bench_common.py); this file only
dispatches.

    python bench.py --parts kernels      # registers / spills of the Triton kernels per CUDA target (no GPU
                                         # needed); on a GPU also their timings vs the PyTorch references
    python bench.py --parts step         # a training step: MoE (grouped GEMM, loop) vs dense of equal active size
    python bench.py --parts decode       # decoding: recompute vs naive / absorbed MLA cache vs MTP speculative
    python bench.py --parts ablation     # what each DeepSeek idea buys: a ladder of models, same steps and same time
    python bench.py --parts specialization   # what the experts learn on English, code and maths (report Fig. 9)
    python bench.py --parts fp8          # FP8 training (report §3.3) beside fp32: loss, step time, saved activations
    python bench.py --parts ep           # expert parallelism: all-to-all volume with and without the node limit
    python bench.py --parts context      # context extension (§4.3): trained at 64, YaRN to 256; val loss by position
    python bench.py --parts hf           # peak memory of loading a checkpoint in DeepSeek's layout vs its size
    python bench.py --parts posttrain    # post-training (§5): SFT, then GRPO, on maths; held-out accuracy per stage
    python bench.py --gpu                # everything worth measuring on one CUDA GPU (about 8 minutes)
    python bench.py --quick              # a smoke version of every CPU part
"""
import argparse
import importlib
import sys
from pathlib import Path

# part -> "module:function" in its own file (imported when the part runs)
PARTS = {"kernels": "bench_kernels:run", "step": "bench_step:run", "decode": "bench_decode:run",
         "ablation": "bench_ablation:run", "specialization": "bench_specialization:run", "fp8": "bench_systems:bench_fp8",
         "ep": "bench_systems:bench_ep", "context": "bench_context:run", "hf": "bench_hf:run",
         "posttrain": "bench_posttrain:run", "gpu": "bench_gpu:run"}


def run_part(part, args):
    module, name = PARTS[part].split(":")
    return getattr(importlib.import_module(module), name)(args)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="kernels,step,decode,ablation,fp8,ep,context", help=f"comma list of: {', '.join(PARTS)}")
    parser.add_argument("--ckpts", default="out-shakespeare-char-cpu", help="decode: checkpoint folders")
    parser.add_argument("--long_tokens", type=int, default=None, help="decode: tokens after the 512-token prompt (64, quick 16)")
    parser.add_argument("--repeats", type=int, default=1, help="ablation, specialization, context, posttrain: seeds per row, "
                        "phase (mean and spread)")
    parser.add_argument("--timing_repeats", type=int, default=None, help="decode, context, posttrain: interleaved timing rounds, "
                        "best kept (5, quick 1)")
    parser.add_argument("--quick", action="store_true", help="a smoke version of each part (< 4 minutes on 2 cores)")
    parser.add_argument("--iters", type=int, default=None, help="ablation, specialization, fp8, context: iterations per run "
                        "(default 2000, quick 200; fp8 quick 50; context, posttrain: the base's, context's phases run iters / 8)")
    parser.add_argument("--timing_iters", type=int, default=None, help="ablation: steps of each row's timing run (50, quick 10)")
    parser.add_argument("--step_repeats", type=int, default=None, help="step: timed steps per model (40, quick 5)")
    parser.add_argument("--hf_gb", type=float, default=None, help="hf: size of each synthetic checkpoint in GB (1, quick 0.1)")
    parser.add_argument("--gpu", action="store_true", help="run the gpu part alone (the same as --parts gpu)")
    parser.add_argument("--gpu_minutes", type=float, default=4.0, help="gpu: training time budget in minutes")
    parser.add_argument("--out", default="out-bench", help="ablation, specialization, fp8, context, posttrain: runs, logs and "
                        "plots go here")
    parser.add_argument("--data_dir", default="data", help="ablation, specialization, fp8, context, posttrain: data cache (as "
                        "train.py)")
    parser.add_argument("--text", default="", help="ablation, fp8, context: the text to train on; specialization, posttrain: "
                        "its English (default: Tiny Shakespeare)")
    args = parser.parse_args(argv)
    parts = ["gpu"] if args.gpu else [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
    args.iters = args.iters or (200 if args.quick else 2000)
    args.long_tokens = args.long_tokens or (16 if args.quick else 64)
    args.timing_repeats = args.timing_repeats or (1 if args.quick else 5)
    args.timing_iters = args.timing_iters or (10 if args.quick else 50)
    args.step_repeats = args.step_repeats or (5 if args.quick else 40)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    return {part: run_part(part, args) for part in parts}


if __name__ == "__main__":
    from data import UserError
    try:
        main()
    except UserError as e:           # a missing checkpoint, data file, tokenizer: one line
        sys.exit(f"error: {e}")
