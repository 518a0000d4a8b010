# GRPO with rule-based rewards (report §5.2, grpo.py) from config/sft_cpu.py's model; held-out accuracy:
# python bench.py --parts=posttrain (RESULTS.md).
#   python grpo.py config/grpo_cpu.py --device=cpu              # about 3 minutes on 2 cores
#   python sample.py --out_dir=out-grpo-cpu --chat="What is 12 times 7?"
init_from = "out-sft-cpu"
out_dir = "out-grpo-cpu"
max_iters = 80
questions = 8            # a step: 8 questions x a group of 16 sampled answers (DeepSeekMath: 64 a question)
group_size = 16
learning_rate = 3e-5     # constant, as DeepSeekMath's RL (1e-6 there)
min_lr = 3e-5
clip_eps = 0.2           # ε, and β = 0.04 as DeepSeekMath
kl_beta = 0.04
updates_per_batch = 2    # μ: the second update is off-policy, where the clip can bind
eval_interval = 20
