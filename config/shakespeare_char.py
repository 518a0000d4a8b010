# Tiny Shakespeare, character level, on one GPU: train.py's DEFAULTS, nanoGPT's train_shakespeare_char budget
# (6 layers, block 256, batch 64, 5000 iters, dropout 0.2, lr 1e-3 -> best val loss 1.4697, ~3 min on an A100)
# with our architecture: MLA, DeepSeekMoE (16 fine-grained experts, top-2, group-limited), MTP. This preset
# only gives the run a folder of its own.
#   python train.py config/shakespeare_char.py
#   torchrun --standalone --nproc_per_node=N train.py config/shakespeare_char.py
out_dir = "out-shakespeare-char"
