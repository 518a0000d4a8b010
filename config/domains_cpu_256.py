# Context extension (report §4.3) of config/domains_cpu.py's model for post-training: trained at 64 characters, it
# continues at 256 with YaRN for a short phase at a constant learning rate, the last one of its pretraining, so that a
# question with its thinking trace (up to 159 tokens) fits the context it was trained at. The recipe is
# config/shakespeare_char_cpu_256.py's (measured there: RESULTS.md, "Context extension"); only the folders differ.
#   python train.py config/domains_cpu.py --device=cpu          # first the base, into out-domains-cpu
#   python train.py config/domains_cpu_256.py --device=cpu      # then this phase, into out-domains-cpu-256
#   python sft.py config/sft_cpu.py --device=cpu                # post-training from it
import pathlib

exec(pathlib.Path(__file__).with_name("shakespeare_char_cpu_256.py").read_text())
init_from = "out-domains-cpu"
out_dir = "out-domains-cpu-256"
