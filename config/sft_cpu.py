# Supervised fine-tuning (report §5.1, sft.py) of config/domains_cpu.py's model, extended to 256 positions
# (config/domains_cpu_256.py), on maths questions answered after a thinking trace (posttraining/reasoning.py) in
# DeepSeek's thinking template; held-out accuracy: python bench.py --parts=posttrain (RESULTS.md).
#   python train.py config/domains_cpu.py --device=cpu          # the pretrained model, out-domains-cpu
#   python train.py config/domains_cpu_256.py --device=cpu      # its context extended, out-domains-cpu-256
#   python sft.py config/sft_cpu.py --device=cpu
#   python sample.py --out_dir=out-sft-cpu --chat="What is 12 times 7?" --show_thinking=True
init_from = "out-domains-cpu-256"
out_dir = "out-sft-cpu"
answers = "thinking"     # a trace before the answer (worked, bare: the comparison of bench.py --parts=posttrain)
# the comparisons, learned first, half as often; the kinds with the most errors more often (a choice from the
# prototype runs' errors, not measured against equal shares)
mix = dict(sum=1, difference=1, product=1.5, bigger=0.5, less=0.5, remainder=2, solve=1.5)
pairs = 48000            # fresh pairs, one epoch, in batches of 16: 3000 steps
epochs = 1
batch_size = 16
learning_rate = 1e-3     # the pretraining peak, cosine down to its final 1e-4 (the report: 5e-6 to 1e-6)
min_lr = 1e-4
# Muon for the blocks' matrices at RMS 0.7 x the learning rate, the routed experts, embedding and head on AdamW
# (config/shakespeare_char_cpu_muon.py's split): 95.9% held out against AdamW's 85.7% from one base at these steps,
# 94.3% in README's pipeline (RESULTS.md)
optimizer = "muon"
muon_experts = False
muon_rms = 0.7
eval_interval = 3000     # the held-out evaluation at the end (700 questions)
