"""What train.py is built from, and the later stages reuse: the configurator (presets, --key=value, --help,
checks), the data (texts, tokenizers, batches, the maths generator) and the optimizer with its schedule."""
