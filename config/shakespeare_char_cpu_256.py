# Context extension as in the report (§4.3), at nano scale: the CPU preset's model, trained at 64 characters,
# continues at 256 with YaRN for a short phase at a constant learning rate, the last one of its pretraining.
#   python train.py config/shakespeare_char_cpu.py --device=cpu     # first the base, into out-shakespeare-char-cpu
#   python train.py config/shakespeare_char_cpu_256.py --device=cpu
#   python sample.py --out_dir=out-shakespeare-char-cpu-256 --max_new_tokens=250   # the latent cache up to 256
# A new run from the base's weights (not a resume): the base's config for every key not set here, a fresh
# optimizer, steps from 0, its own out_dir (the base stays as it is). Measured: RESULTS.md, "Context extension".
init_from = "out-shakespeare-char-cpu"
out_dir = "out-shakespeare-char-cpu-256"
always_save_checkpoint = True   # the phase's last weights
eval_interval = 50

block_size = 256                # L' (the RoPE tables are rebuilt for it; the weights stay)
batch_size = 3                  # 3 x 256 = 12 x 64 tokens per step, as pretraining (the report keeps them too)
original_seq_len = 64           # L: YaRN is on since block_size > original_seq_len
rope_factor = 4.0               # s = L'/L (beta_fast 32, beta_slow 1, mscale 1: DeepSeek's, the defaults)

max_iters = 250
decay_lr = False
learning_rate = 1e-4            # constant: the base's final (min_lr), as the report's 7.3e-6
mtp_lambda_step = 0             # the MTP weight's final value, 0.1, throughout
