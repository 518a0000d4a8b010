# Tiny Shakespeare, character level, within nanoGPT's CPU recipe budget: its README changes its GPU config as
#   python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
#     --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
#     --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0        -> val loss 1.88, ~3 min on a laptop
# and this preset changes train.py's DEFAULTS (nanoGPT's GPU config, our architecture) the same way: same data,
# batch, context, steps and evaluation, the model scaled down (MLA, DeepSeekMoE, MTP).
#   python train.py config/shakespeare_char_cpu.py --device=cpu
# Without a GPU, `python train.py` alone trains this too (into out/). Measured results: README.md.
out_dir = "out-shakespeare-char-cpu"
eval_iters = 20
log_interval = 50

batch_size = 12
block_size = 64

n_layers = 4
dim = 128
n_heads = 4
inter_dim = 384
moe_inter_dim = 128
n_routed_experts = 8
n_expert_groups = 1
n_limited_groups = 1
kv_lora_rank = 64
qk_nope_head_dim = 32
qk_rope_head_dim = 16
v_head_dim = 32
dropout = 0.0
mtp_lambda_step = 1400          # 0.3, then 0.1 for the last 30% (as the report)

max_iters = 2000
lr_decay_iters = 2000
