# The CPU default (`python train.py` with no preset and no GPU): config/shakespeare_char_cpu.py (nanoGPT's CPU
# recipe's data, batch and context; MLA, DeepSeekMoE, MTP) trained by Muon, DeepSeek-V4's optimizer, for the wall
# that preset's 2000 AdamW steps take (measured: RESULTS.md, "The default CPU preset with Muon"):
#   python train.py config/shakespeare_char_cpu_muon.py --device=cpu
#   python train.py config/shakespeare_char_cpu.py --device=cpu     # DeepSeek-V3's AdamW, nanoGPT's 2000 steps
# - Muon for MLA's projections, the dense FFN, the shared experts and MTP's projection; the routed experts on
#   AdamW: orthogonalizing each expert's three matrices makes a step 1.62x AdamW's, against 1.21x without them;
# - 1610 steps: 2000 / 1.24, the larger of two measurements of that step ratio;
# - learning_rate 2e-3 for AdamW's part (the embedding, head, norms, gates and routed experts), Muon's updates at
#   RMS 0.7 x 2e-3 (muon_rms 1.0: 1.6633, 1.5: 1.7215; AdamW's part at 3e-3: 1.6754).
from pathlib import Path

exec(Path(__file__).with_name("shakespeare_char_cpu.py").read_text())
out_dir = "out-shakespeare-char-cpu-muon"

optimizer = "muon"
muon_experts = False
learning_rate = 2e-3
muon_rms = 0.7
min_lr = 2e-4
max_iters = 1610
lr_decay_iters = 1610
mtp_lambda_step = 1127          # 0.3, then 0.1 for the last 30% (as the report)
