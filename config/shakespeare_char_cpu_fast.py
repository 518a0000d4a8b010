# nanoGPT's quality on 2 CPU cores in the least wall time: val loss <= 1.8857 (nanoGPT's CPU recipe after
# 2000 steps) on Tiny Shakespeare's characters, the CPU preset's data, context and width changed where a CPU
# second buys more (measured: RESULTS.md, "The fastest path to nanoGPT's quality"):
#   python train.py config/shakespeare_char_cpu_fast.py --device=cpu
# - Muon (DeepSeek-V4's optimizer) for the blocks' matrices: 0.09 lower than AdamW at 500 steps here;
# - dense FFNs, no routed experts: at 12-24 x 64 tokens a step, 8 experts' small GEMMs and their per-expert
#   Newton-Schulz iterations cost more per second than MoE buys; no MTP: its extra block costs 30-40% a step;
# - 24 sequences a step, 300 steps: Muon gains from the bigger batch, AdamW does not;
# - two evaluations (the first step and the last), 20 batches each as nanoGPT's recipe.
out_dir = "out-shakespeare-char-cpu-fast"
eval_iters = 20
eval_interval = 300
log_interval = 50

batch_size = 24
block_size = 64

n_layers = 4
dim = 128
n_heads = 4
inter_dim = 384
n_routed_experts = 0            # every FFN dense (DeepSeekMoE off)
n_mtp = 0                       # no multi-token prediction
kv_lora_rank = 64
qk_nope_head_dim = 32
qk_rope_head_dim = 16
v_head_dim = 32
dropout = 0.0

optimizer = "muon"
learning_rate = 2e-3            # AdamW's part (embedding, head, norms); Muon's update RMS is learning_rate x muon_rms
muon_rms = 1.0
min_lr = 2e-4
max_iters = 300
lr_decay_iters = 300
