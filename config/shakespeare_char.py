# Tiny Shakespeare, character level, on one GPU: nanoGPT's train_shakespeare_char budget (6 layers,
# block 256, batch 64, 5000 iters, dropout 0.2, lr 1e-3 -> best val loss 1.4697, ~3 min on an A100)
# with our architecture: MLA, DeepSeekMoE (16 fine-grained experts, top-2, group-limited), MTP.
#   python train.py config/shakespeare_char.py
#   torchrun --standalone --nproc_per_node=N train.py config/shakespeare_char.py
out_dir = "out-shakespeare-char"
eval_interval = 250
eval_iters = 200
log_interval = 10
always_save_checkpoint = False    # it overfits late: keep the best

tokenizer = "char"
batch_size = 64
block_size = 256

n_layers = 6
n_dense_layers = 1
dim = 384
n_heads = 6
inter_dim = 1024
moe_inter_dim = 256
n_routed_experts = 16
n_shared_experts = 1
n_activated_experts = 2
n_expert_groups = 4
n_limited_groups = 2
q_lora_rank = 0
kv_lora_rank = 128
qk_nope_head_dim = 64
qk_rope_head_dim = 32
v_head_dim = 64
dropout = 0.2
n_mtp = 1
mtp_lambda = 0.3
mtp_lambda_late = 0.1
mtp_lambda_step = 3500            # the report lowers the MTP weight for the last third of training

learning_rate = 1e-3
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
