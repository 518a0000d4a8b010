# Context extension (report §4.3) of config/domains_cpu.py's model for post-training: trained at 64 characters, it
# continues at 256 with YaRN for a short phase at a constant learning rate, the last one of its pretraining, so that a
# question with its thinking trace (up to 179 tokens) fits the context it was trained at. As
# config/shakespeare_char_cpu_256.py does for Tiny Shakespeare (measured there: RESULTS.md, "Context extension").
#   python train.py config/domains_cpu.py --device=cpu          # first the base, into out-domains-cpu
#   python train.py config/domains_cpu_256.py --device=cpu      # then this phase, into out-domains-cpu-256
#   python sft.py config/sft_cpu.py --device=cpu                # post-training from it
# A new run from the base's weights (not a resume): the base's config for every key not set here, a fresh
# optimizer, steps from 0, its own out_dir (the base stays as it is).
init_from = "out-domains-cpu"
out_dir = "out-domains-cpu-256"
always_save_checkpoint = True   # the phase's last weights
eval_interval = 50

block_size = 256                # L' (the RoPE tables are rebuilt for it; the weights stay)
batch_size = 3                  # 3 x 256 = 12 x 64 tokens per step, as pretraining
original_seq_len = 64           # L: YaRN is on since block_size > original_seq_len
rope_factor = 4.0               # s = L'/L (beta_fast 32, beta_slow 1, mscale 1: DeepSeek's, the defaults)

max_iters = 250
decay_lr = False
learning_rate = 1e-4            # constant: the base's final (min_lr), as the report's 7.3e-6
mtp_lambda_step = 0             # the MTP weight's final value, 0.1, throughout
