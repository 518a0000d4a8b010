"""bench.py --parts=hf: the peak memory of loading a checkpoint in DeepSeek's layout (hf.load streams it shard by
shard into a model built on the meta device) against its size on disk and the model's size in memory, measured in a
fresh process (/proc/self/status: VmHWM, the peak resident set, against VmRSS before the load). A synthetic
DeepSeek-V3-shaped model of about --hf_gb GB, written as DeepSeek publishes it (write_release): in bf16 as
DeepSeek-V2-Lite, and in FP8 with 128 x 128 block scales as DeepSeek-V3.

    python bench.py --parts=hf                    # about 1 GB per checkpoint, into --out
"""
import json
import subprocess
import sys
from pathlib import Path

import torch

import deepseek as ds
from checkpoint import hf
from pretraining.data import write_atomic
from systems import fp8

# DeepSeek-V3's structure at a width a CPU handles: MLA with a low-rank query, 1 dense layer then MoE layers of
# 1 shared + 64 routed experts (top-6 of 8 groups, 4 kept), MTP; n_layers sets the size
SHAPE = dict(vocab_size=32000, dim=1024, inter_dim=4096, moe_inter_dim=256, n_heads=16, n_dense_layers=1,
             n_routed_experts=64, n_shared_experts=1, n_activated_experts=6, n_expert_groups=8, n_limited_groups=4,
             q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_mtp=1,
             max_seq_len=4096)


def release_args(gb):
    """SHAPE with as many layers as make about gb GB of weights in bf16."""
    size = [sum(t.numel() for t in hf.empty_model(ds.ModelArgs(**SHAPE, n_layers=n), torch.float32).state_dict()
                .values()) * 2 for n in (2, 3)]
    return ds.ModelArgs(**SHAPE, n_layers=max(2, 2 + round((gb * 1e9 - size[0]) / (size[1] - size[0]))))


def random_model(args, dtype=torch.bfloat16, seed=0):
    """A model of these args with N(0, 0.02) weights built directly in dtype (no fp32 copy first)."""
    torch.manual_seed(seed)
    model = hf.empty_model(args, dtype).to_empty(device="cpu")
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    for g in model.gates():
        g.bias.normal_(0, 0.05)
    return model


def write_release(model, folder, shards=2, fp8_weights=True, rope_interleave=True):
    """model written as DeepSeek publishes DeepSeek-V3, independently of hf.export: config.json (with
    quantization_config when fp8_weights), the linear weights inside the layers in FP8 E4M3, each with its
    weight_scale_inv per 128 x 128 block (fp8.quantize; edge blocks partial), the embedding, head, norms,
    router and eh_proj in the model's dtype; eh_proj taking [enorm(embedding); hnorm(h)]; with rope_interleave
    False the RoPE rows of the query and of kv_a_proj_with_mqa stored [evens, odds]; the MTP module as layer
    n_layers with copies of the embedding and head; `shards` files with model.safetensors.index.json. Returns the
    weights as they are stored, dequantized, in our names (what the folder must load as)."""
    from safetensors.torch import save
    args, state = model.args, model.state_dict()
    rope, D = args.qk_rope_head_dim, args.dim
    tensors, stored = {}, {k: v.clone() for k, v in state.items()}
    for ours, e, theirs, fix in hf.layout(args):
        t = state[ours] if e is None else state[ours][e]
        rows = torch.arange(t.size(0))                # the file's row i is our row rows[i]
        if fix == "eh":                               # the checkpoint's order: embedding first
            t = torch.cat([t[:, D:], t[:, :D]], dim=1)
        if fix in ("q_rope", "kv_rope") and not rope_interleave:
            g = rows.view(-1, args.qk_nope_head_dim + rope if fix == "q_rope" else args.kv_lora_rank + rope)
            rows = torch.cat([g[:, :-rope], g[:, -rope::2], g[:, -rope + 1::2]], dim=1).flatten()
            t = t[rows]
        if fp8_weights and theirs.startswith("model.layers.") and t.dim() == 2 and fix != "eh" and \
                not theirs.endswith(("gate.weight", "embed_tokens.weight", "shared_head.head.weight")):
            t, tensors[theirs + "_scale_inv"] = fp8.quantize(t, rows=128)
            (stored[ours] if e is None else stored[ours][e]).copy_(
                fp8.dequantize(t, tensors[theirs + "_scale_inv"], rows=128)[rows.argsort()])
        tensors[theirs] = t
    folder.mkdir(parents=True)
    names, weight_map = list(tensors), {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].contiguous() for n in names[k * len(names) // shards:(k + 1) * len(names) // shards]}
        write_atomic(folder / file, lambda f: f.write(save(part, dict(format="pt"))))
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps(dict(metadata={}, weight_map=weight_map)))
    config = dict(hf.config_from_args(args, None), rope_interleave=rope_interleave)
    if fp8_weights:
        config["quantization_config"] = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                             weight_block_size=[128, 128])
    (folder / "config.json").write_text(json.dumps(config))
    return stored


def measure(folder, dtype):
    """Load folder with hf.load in a fresh process: its peak resident memory during the load, above what it held
    before (torch imported), the model's bytes and the largest tensor's."""
    code = f"""
import json, torch
from checkpoint import hf
torch.set_num_threads(1)      # memory is measured, not time: no OpenMP threads contending on a busy machine
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(key + ':'))
before = status('VmRSS')
model, _ = hf.load({str(folder)!r}, dtype=torch.{dtype})
ts = [*model.parameters(), *model.buffers()]
print(json.dumps(dict(peak=status('VmHWM') - before, model=sum(t.numel() * t.element_size() for t in ts),
                      largest=max(t.numel() * t.element_size() for t in ts))))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent.parent, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"bench hf: loading {folder} failed:\n{out.stderr}")
    return json.loads(out.stdout.splitlines()[-1])


def run(args):
    """A bf16 and an FP8 release of about args.hf_gb GB each, loaded in bf16: disk size, model size, peak."""
    gb = args.hf_gb or (0.1 if args.quick else 1.0)
    a = release_args(gb)
    model = random_model(a)
    root = Path(args.out) / "hf"
    rows = []
    for name, fp8_weights in (("bf16 (V2-Lite's release)", False), ("FP8 + block scales (V3's release)", True)):
        folder = root / ("fp8" if fp8_weights else "bf16")
        if not folder.exists():
            write_release(model, folder, shards=4, fp8_weights=fp8_weights)
        disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        rows.append((name, disk, measure(folder, "bfloat16")))
    del model
    print(f"hf: hf.load of a synthetic DeepSeek-V3-shaped model ({a.n_layers} layers, dim {a.dim}, "
          f"{a.n_routed_experts} experts, MTP; 4 shards), loaded in bf16 on the CPU, peak resident memory above "
          f"the process's before the load")
    print("| checkpoint | on disk | model in memory | largest tensor | peak during load | peak / model |")
    print("|---|---:|---:|---:|---:|---:|")
    mb = lambda n: f"{n / 1e6:,.0f} MB"      # noqa: E731
    for name, disk, m in rows:
        print(f"| {name} | {mb(disk)} | {mb(m['model'])} | {mb(m['largest'])} | {mb(m['peak'])} | "
              f"{m['peak'] / m['model']:.2f} |")
    return rows
