# Supervised fine-tuning (report §5.1, sft.py) of config/domains_cpu.py's pretrained model on maths question/answer
# pairs in DeepSeek-V3's chat template; held-out accuracy: python bench.py --parts=posttrain (RESULTS.md).
#   python train.py config/domains_cpu.py --device=cpu          # the pretrained model, out-domains-cpu
#   python sft.py config/sft_cpu.py --device=cpu                # about 2 minutes on 2 cores
#   python sample.py --out_dir=out-sft-cpu --chat="What is 12 times 7?"
init_from = "out-domains-cpu"
out_dir = "out-sft-cpu"
worked = True            # answers after worked steps: measured against bare answers in RESULTS.md
pairs = 16000            # 2 epochs of 16,000 pairs in batches of 32: 1000 steps
epochs = 2
batch_size = 32
learning_rate = 1e-3     # the pretraining peak, cosine down to its final 1e-4 (the report: 5e-6 to 1e-6)
min_lr = 1e-4
eval_interval = 250
