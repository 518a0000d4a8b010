"""The report's systems features (§3), each a transformation of a built deepseek.Transformer tested equal to
it: FP8 training (fp8.py, §3.3) and expert parallelism (expert_parallel.py, §3.2). kernels.py, at the top, is
the third: the MoE layer's fast paths."""
