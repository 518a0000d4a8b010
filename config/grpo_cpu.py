# GRPO with rule-based rewards (report §5.2, grpo.py) from config/sft_cpu.py's model, on the kinds where its sampled
# replies are sometimes right and sometimes wrong (measured before RL: RESULTS.md); held-out accuracy:
# python bench.py --parts=posttrain (RESULTS.md).
#   python grpo.py config/grpo_cpu.py --device=cpu
#   python sample.py --out_dir=out-grpo-cpu --chat="What is 12 times 7?"
init_from = "out-sft-cpu"
out_dir = "out-grpo-cpu"
mix = dict(solve=1, remainder=1, product=1)
max_iters = 40
questions = 8            # a step: 8 questions x a group of 16 sampled replies (DeepSeekMath: 64 a question), the groups
group_size = 16          # whose rewards are all equal dropped and refilled (dynamic sampling, up to 4 rounds)
learning_rate = 5e-5     # constant
min_lr = 5e-5
clip_eps = 0.2
kl_beta = 0.0
updates_per_batch = 1
eval_interval = 40
