# The three-domain corpus of pretraining/data.py, character level, equal shares: English (Tiny Shakespeare), code (the
# Python standard library's own .py files) and mathematics (generated question/answer lines), with the model,
# batch and steps of the CPU preset. What its experts learn: python bench.py --parts=specialization (README.md).
#   python train.py config/domains_cpu.py --device=cpu
#   python sample.py --out_dir=out-domains-cpu --show_experts=1
from pathlib import Path

exec(Path(__file__).with_name("shakespeare_char_cpu.py").read_text())
out_dir = "out-domains-cpu"
dataset = "domains"
