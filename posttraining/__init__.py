"""What the post-training stages share (report §5; sft.py, grpo.py, sample.py --chat): chat.py."""
