"""Benchmarks: what each idea costs and buys, measured side by side in one process. One command line,
one file per part in benchmarks/ (their shared helpers in benchmarks/common.py); this file only dispatches.

    python bench.py --parts=kernels      # registers / spills of the Triton kernels per CUDA target (no GPU
                                         # needed); on a GPU also their timings vs the PyTorch references
    python bench.py --parts=step         # a training step: MoE (grouped GEMM, loop) vs dense of equal active size,
                                         # AdamW vs Muon
    python bench.py --parts=decode       # decoding: recompute vs naive / absorbed MLA cache vs MTP speculative
    python bench.py --parts=ablation     # what each DeepSeek idea buys: a ladder of models, same steps and same time
                                         # (--optimizer=muon: every row by Muon)
    python bench.py --parts=specialization   # what the experts learn on English, code and maths (report Fig. 9)
    python bench.py --parts=fp8          # FP8 training (report §3.3) beside fp32: loss, step time, saved activations
    python bench.py --parts=ep           # expert parallelism: all-to-all volume with and without the node limit
    python bench.py --parts=context      # context extension (§4.3): trained at 64, YaRN to 256; val loss by position
    python bench.py --parts=hf           # peak memory of loading a checkpoint in DeepSeek's layout vs its size
    python bench.py --parts=posttrain    # post-training (§5): SFT, then GRPO, on maths; held-out accuracy per stage
    python bench.py --gpu                # everything worth measuring on one CUDA GPU (about 8 minutes)
    python bench.py --quick              # a smoke version of every CPU part
"""
import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

from pretraining.configurator import UserError, parse_config, run_cli, set_threads
from pretraining.optim import OPTIMIZERS

# part -> "module:function" in benchmarks/ (imported when the part runs)
PARTS = {"kernels": "kernels:run", "step": "step:run", "decode": "decode:run", "ablation": "ablation:run",
         "specialization": "specialization:run", "fp8": "systems:bench_fp8", "ep": "systems:bench_ep",
         "context": "context:run", "hf": "hf:run", "posttrain": "posttrain:run", "gpu": "gpu:run"}
DEFAULTS = dict(
    parts="kernels,step,decode,ablation,fp8,ep,context",   # a comma list of PARTS
    quick=False,              # a smoke version of each part (< 4 minutes on 2 cores)
    gpu=False,                # the gpu part alone (the same as --parts=gpu)
    out="out-bench",          # ablation, specialization, fp8, context, posttrain: runs, logs and plots go here
    data_dir="data",          # ablation, specialization, fp8, context, posttrain: the data cache (as train.py's)
    text="",                  # ablation, fp8, context: the text to train on; specialization, posttrain: its English
    repeats=1,                # ablation, specialization, context, posttrain: seeds per row (mean and spread)
    jobs=1,                   # ablation: trainings at once, each on 1 CPU thread (1: one at a time on the idle
                              # cores); every run's timing is then under that load
    optimizer="adamw",        # ablation: every row's optimizer and its CPU preset (adamw: shakespeare_char_cpu,
                              # muon: shakespeare_char_cpu_muon)
    iters=0,                  # ablation, specialization, fp8, context: steps per run (0: 2000, quick 200; fp8 quick
                              # 50; context, posttrain: the base's, context's phases run iters / 8)
    timing_iters=0,           # ablation: steps of each row's timing run (0: 50, quick 10)
    timing_repeats=0,         # decode, context, posttrain: interleaved timing rounds, best kept (0: 5, quick 1)
    step_repeats=0,           # step: timed steps per model (0: 40, quick 5)
    ckpts="out-shakespeare-char-cpu",   # decode: checkpoint folders, a comma list
    long_tokens=0,            # decode: tokens after the 512-token prompt (0: 64, quick 16)
    hf_gb=0.0,                # hf: size of each synthetic checkpoint in GB (0: 1, quick 0.1)
    gpu_minutes=4.0,          # gpu: the training time budget in minutes
    threads=0,                # CPU threads of this process (0: the cores idle at start)
)


def main(argv=None):
    args = parse_config(sys.argv[1:] if argv is None else argv, DEFAULTS, __doc__)[0]
    parts = ["gpu"] if args["gpu"] else [p.strip() for p in args["parts"].split(",") if p.strip()]
    if unknown := [p for p in parts if p not in PARTS]:
        raise UserError(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    if args["optimizer"] not in OPTIMIZERS:
        raise UserError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {args['optimizer']!r}")
    if args["jobs"] < 1:
        raise UserError(f"jobs must be at least 1, not {args['jobs']}")
    set_threads(args["threads"], "cpu")
    quick = args["quick"]
    args.update(iters=args["iters"] or (200 if quick else 2000), long_tokens=args["long_tokens"] or (16 if quick else 64),
                timing_repeats=args["timing_repeats"] or (1 if quick else 5),
                timing_iters=args["timing_iters"] or (10 if quick else 50),
                step_repeats=args["step_repeats"] or (5 if quick else 40))
    args = SimpleNamespace(**args)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = {}
    for part in parts:
        module, name = PARTS[part].split(":")
        results[part] = getattr(importlib.import_module(f"benchmarks.{module}"), name)(args)
    return results


if __name__ == "__main__":
    sys.exit(run_cli(main))
