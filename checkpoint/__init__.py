"""Checkpoints both ways: ckpt.py, the ckpt.pt files train.py and the post-training stages write and every
command reads; hf.py, the layout DeepSeek publishes its weights in (Hugging Face's)."""
