"""DeepSeek's checkpoint format (the Hugging Face layout) both ways. A folder as DeepSeek publishes it (config.json,
safetensors shards with model.safetensors.index.json, DeepSeek-V3's FP8 weights with one scale per 128 x 128 block,
the MTP module as the layers after the last) loads into deepseek.Transformer, streamed shard by shard; a model trained
here exports to such a folder, with its tokenizer as tokenizer.json, which transformers' AutoModelForCausalLM and
AutoTokenizer (and the serving engines that read this layout) load unchanged.

    model, meta = hf.load("DeepSeek-V2-Lite", dtype=torch.bfloat16, device="cuda")   # meta: the folder's tokenizer
    hf.export(model, meta, "out-hf")                                                  # python export.py out/ out-hf/

The names differ (ours follow DeepSeek's inference/model.py: wq_a, wkv_b, w1/w2/w3; the files transformers':
q_a_proj, kv_b_proj, gate_proj/down_proj/up_proj), our routed experts are stacked per layer where the files hold
one tensor per expert, and two traps hide in the layout: the checkpoint's eh_proj takes [enorm(embedding); hnorm(h)],
eq. 21's order reversed (ours: MTP.forward), so its two column halves swap; and with rope_interleave false the RoPE
rows of the query and of kv_a_proj_with_mqa are stored [evens, odds] (for rotate_half) instead of our interleaved pairs.
"""
import json
import math
import os
import dataclasses
import secrets
import shutil
from pathlib import Path

import torch

import deepseek as ds
from pretraining.configurator import UserError, one_line
from pretraining.data import _tiktoken, write_atomic
from systems import fp8

# ----------------------------------------------------------------------------- config.json <-> ModelArgs

# config.json keys that are ModelArgs fields under another name
RENAMED = dict(vocab_size="vocab_size", hidden_size="dim", intermediate_size="inter_dim",
               moe_intermediate_size="moe_inter_dim", num_hidden_layers="n_layers",
               first_k_dense_replace="n_dense_layers", num_attention_heads="n_heads",
               n_shared_experts="n_shared_experts", num_experts_per_tok="n_activated_experts",
               routed_scaling_factor="route_scale", kv_lora_rank="kv_lora_rank", qk_nope_head_dim="qk_nope_head_dim",
               qk_rope_head_dim="qk_rope_head_dim", v_head_dim="v_head_dim", max_position_embeddings="max_seq_len")
# keys a file may leave out, with the value transformers' DeepseekV3Config / DeepseekV2Config then takes
# (model-wide values outside these, such as a bias in the attention, are maths this model does not have)
OPTIONAL = dict(rope_theta=10000.0, rope_scaling=None, rope_parameters=None, rope_interleave=True,
                num_nextn_predict_layers=0, quantization_config=None, n_routed_experts=0, hidden_act="silu",
                attention_bias=False, mlp_bias=False, tie_word_embeddings=False, rms_norm_eps=1e-6, moe_layer_freq=1)
MODEL_TYPES = {
    "deepseek_v3": dict(OPTIONAL, scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True),
    "deepseek_v2": dict(OPTIONAL, scoring_func="softmax", topk_method="greedy", norm_topk_prob=False, n_group=None,
                        topk_group=None),
}
# the only values this model computes (our RMSNorm's eps; every layer after the dense ones is MoE; V3: sigmoid gate
# normalised over the chosen, with the balancing bias; V2: softmax, not renormalised, greedy or group-limited)
FIXED = dict(hidden_act="silu", attention_bias=False, mlp_bias=False, tie_word_embeddings=False, rms_norm_eps=1e-6,
             moe_layer_freq=1)
GATES = {"deepseek_v3": dict(scoring_func=("sigmoid",), topk_method=("noaux_tc",), norm_topk_prob=(True,)),
         "deepseek_v2": dict(scoring_func=("softmax",), topk_method=("greedy", "group_limited_greedy"),
                             norm_topk_prob=(False,))}
# keys that leave the maths alone: serving and runtime settings, token ids (the tokenizer's), training-only
# settings, bookkeeping, and the key-value head count that MLA does not use (each head's keys come from wkv_b)
IGNORED = ("architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "use_cache",
           "ep_size", "pretraining_tp", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range",
           "attention_dropout", "aux_loss_alpha", "seq_aux", "output_router_logits", "router_aux_loss_coef",
           "num_key_value_heads", "head_dim", "qk_head_dim")
MOE_KEYS = ("moe_intermediate_size", "num_experts_per_tok", "n_shared_experts")   # a dense model may leave out
GROUP_KEYS = ("n_group", "topk_group")
YARN_KEYS = ("type", "rope_type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
             "mscale", "mscale_all_dim", "truncate")


def args_from_config(cfg, where):
    """(ModelArgs, rope_interleave, FP8 block size or None) from a config.json dict of model_type deepseek_v3 or
    deepseek_v2. A key or value that would change the maths and that this model lacks is a UserError naming it;
    keys in IGNORED leave the maths alone and are skipped."""
    kind = cfg.get("model_type")
    if kind not in MODEL_TYPES:
        raise UserError(f"{where}: model_type {kind!r} is not supported (deepseek_v3 or deepseek_v2)")
    c = {**MODEL_TYPES[kind], **cfg}
    known = {*RENAMED, *MODEL_TYPES[kind], *IGNORED, "model_type", "q_lora_rank", "n_group", "topk_group"}
    if unknown := sorted(set(cfg) - known):
        raise UserError(f"{where}: config key {unknown[0]} is not supported (it may change the maths; "
                        f"hf.py lists the keys it reads and those it ignores)")
    moe = bool(c["n_routed_experts"])
    grouped = kind == "deepseek_v3" or c["topk_method"] == "group_limited_greedy"
    need = ["q_lora_rank", *(k for k in RENAMED if moe or k not in MOE_KEYS), *(GROUP_KEYS if grouped and moe else ())]
    if missing := [k for k in need if k not in cfg]:
        raise UserError(f"{where}: config key {missing[0]} is missing")
    for key, value in FIXED.items():
        if c[key] != value:
            raise UserError(f"{where}: {key}={c[key]!r} is not supported (this model computes {key}={value!r})")
    for key, allowed in GATES[kind].items():
        if moe and c[key] not in allowed:
            raise UserError(f"{where}: {key}={c[key]!r} is not supported with model_type {kind} "
                            f"({' or '.join(map(repr, allowed))})")
    kw = {field: c[key] for key, field in RENAMED.items() if key in c}
    kw.update(n_routed_experts=c["n_routed_experts"] or 0, q_lora_rank=c["q_lora_rank"] or 0,
              n_shared_experts=kw.get("n_shared_experts") or 0, moe_inter_dim=kw.get("moe_inter_dim") or 1,
              n_activated_experts=kw.get("n_activated_experts") or 1, n_mtp=c["num_nextn_predict_layers"] or 0,
              score_func=c["scoring_func"], n_expert_groups=(grouped and c.get("n_group")) or 1,
              n_limited_groups=(grouped and c.get("topk_group")) or 1, **rope_args(c, where))
    if c["scoring_func"] == "softmax":
        kw["bias_update_speed"] = 0.0          # a softmax (V2) gate has no balancing bias, as ModelArgs.from_json
    try:
        args = ds.ModelArgs(**kw)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {one_line(e)}") from None
    return args, c["rope_interleave"] is not False, block_size(c["quantization_config"], where)


def rope_args(c, where):
    """ModelArgs' RoPE fields from rope_theta and rope_scaling (or transformers 5's rope_parameters). YaRN as
    DeepSeek's code computes it: frequencies corrected, softmax scale times mscale^2 (transformers' mscale_all_dim),
    cos and sin unscaled (transformers' rope mscale / mscale_all_dim = 1), only past the original context."""
    rope = c["rope_scaling"] or c["rope_parameters"] or {}
    theta = rope.get("rope_theta", c["rope_theta"])
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return dict(rope_theta=theta)
    if kind != "yarn":
        raise UserError(f"{where}: rope type {kind!r} is not supported (default or yarn)")
    if unknown := sorted(set(rope) - set(YARN_KEYS)):
        raise UserError(f"{where}: rope_scaling.{unknown[0]} is not supported")
    if "factor" not in rope or "original_max_position_embeddings" not in rope:
        raise UserError(f"{where}: rope_scaling (yarn) needs factor and original_max_position_embeddings")
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if not mscale or mscale != mscale_all_dim:
        raise UserError(f"{where}: rope_scaling.mscale={mscale} with mscale_all_dim={mscale_all_dim} scales cos and "
                        f"sin, which DeepSeek's YaRN does not: only equal values (> 0) are supported")
    if rope.get("truncate", True) is not True or rope["factor"] < 1:
        raise UserError(f"{where}: rope_scaling.truncate false or factor < 1 is not supported")
    if c["max_position_embeddings"] <= rope["original_max_position_embeddings"]:
        raise UserError(f"{where}: max_position_embeddings={c['max_position_embeddings']} with yarn must exceed "
                        f"original_max_position_embeddings={rope['original_max_position_embeddings']} "
                        f"(DeepSeek's YaRN is on only past the original context)")
    return dict(rope_theta=theta, rope_factor=rope["factor"], original_seq_len=rope["original_max_position_embeddings"],
                beta_fast=rope.get("beta_fast", 32), beta_slow=rope.get("beta_slow", 1), mscale=mscale)


def block_size(q, where):
    """The FP8 block height of a quantization_config (DeepSeek-V3: fp8 E4M3 in 128 x 128 blocks), None without one."""
    if q is None:
        return None
    if q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3" or q.get("weight_block_size") != [128, 128]:
        raise UserError(f"{where}: quantization_config {q} is not supported (fp8, e4m3, weight_block_size [128, 128])")
    return 128


def config_from_args(args, meta):
    """config.json for a model: model_type deepseek_v3 (a sigmoid gate, or dense) or deepseek_v2 (softmax gate)."""
    if args.attn != "mla":
        raise UserError(f"attn={args.attn!r}: DeepSeek's layout has MLA only")
    if args.max_seq_len > args.original_seq_len and args.rope_factor < 1:
        raise UserError(f"rope_factor={args.rope_factor}: YaRN in DeepSeek's layout needs a factor >= 1")
    v2 = args.score_func == "softmax" and args.n_routed_experts > 0
    grouped = args.n_expert_groups > 1
    yarn = dict(type="yarn", factor=args.rope_factor, original_max_position_embeddings=args.original_seq_len,
                beta_fast=args.beta_fast, beta_slow=args.beta_slow, mscale=args.mscale, mscale_all_dim=args.mscale)
    bos, eos = special_ids(meta)
    cfg = dict(
        architectures=["DeepseekV2ForCausalLM" if v2 else "DeepseekV3ForCausalLM"],
        model_type="deepseek_v2" if v2 else "deepseek_v3",
        **{key: getattr(args, field) for key, field in RENAMED.items() if key != "first_k_dense_replace"},
        # transformers makes every layer from first_k_dense_replace on (MTP ones too) MoE: a dense model's are all dense
        first_k_dense_replace=args.n_dense_layers if args.n_routed_experts else args.n_layers + args.n_mtp,
        n_routed_experts=args.n_routed_experts, q_lora_rank=args.q_lora_rank or None, num_key_value_heads=args.n_heads,
        n_group=args.n_expert_groups, topk_group=args.n_limited_groups, scoring_func=args.score_func,
        topk_method=("group_limited_greedy" if grouped else "greedy") if v2 else "noaux_tc",
        norm_topk_prob=not v2, rope_theta=args.rope_theta,
        rope_scaling=yarn if args.max_seq_len > args.original_seq_len else None,
        num_nextn_predict_layers=args.n_mtp, rope_interleave=True, **FIXED,
        bos_token_id=bos, eos_token_id=eos)
    return cfg


def special_ids(meta):
    """(bos, eos) token ids: a chat tokenizer's begin- and end-of-sentence tokens (its first and last special token,
    as posttraining/chat.py orders them), else GPT-2's end of text as eos (BPE), else none."""
    if meta and meta.get("special"):
        first = meta["vocab_size"] - len(meta["special"])
        return first, meta["vocab_size"] - 1
    if meta and meta.get("tokenizer") == "bpe":
        return None, _tiktoken(meta["encoding"]).eot_token
    return None, None


# ----------------------------------------------------------------------------- names

FFN = (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj"))


def layout(args):
    """Every tensor of DeepSeek's layout for a model of these args, as (ours, expert, theirs, fix): ours is our
    state-dict name (expert: the index into a stacked experts tensor, else None), theirs the file's name, fix how the
    two differ: "" not at all, "q_rope" / "kv_rope" the RoPE rows under rope_interleave false, "eh" eh_proj's
    halves, "shared" an MTP layer's copy of the main model's embedding or head (ours shares them)."""
    out = [("embed.weight", None, "model.embed_tokens.weight", ""), ("norm.weight", None, "model.norm.weight", ""),
           ("head.weight", None, "lm_head.weight", "")]
    for i in range(args.n_layers + args.n_mtp):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        if i >= args.n_layers:      # MTP module k: layer n_layers + k
            q = f"mtp.{i - args.n_layers}."
            out += [(q + "hnorm.weight", None, p + "hnorm.weight", ""),
                    (q + "enorm.weight", None, p + "enorm.weight", ""),
                    (q + "eh_proj.weight", None, p + "eh_proj.weight", "eh"),
                    (q + "norm.weight", None, p + "shared_head.norm.weight", ""),
                    ("embed.weight", None, p + "embed_tokens.weight", "shared"),
                    ("head.weight", None, p + "shared_head.head.weight", "shared")]
            q += "block."
        attn = [("attn_norm", "input_layernorm", ""), ("ffn_norm", "post_attention_layernorm", ""),
                ("attn.wkv_a", "self_attn.kv_a_proj_with_mqa", "kv_rope"),
                ("attn.kv_norm", "self_attn.kv_a_layernorm", ""),
                ("attn.wkv_b", "self_attn.kv_b_proj", ""), ("attn.wo", "self_attn.o_proj", "")]
        attn += ([("attn.wq_a", "self_attn.q_a_proj", ""), ("attn.q_norm", "self_attn.q_a_layernorm", ""),
                  ("attn.wq_b", "self_attn.q_b_proj", "q_rope")] if args.q_lora_rank else
                 [("attn.wq", "self_attn.q_proj", "q_rope")])
        if i < args.n_dense_layers or args.n_routed_experts == 0:
            attn += [(f"ffn.{w}", f"mlp.{proj}", "") for w, proj in FFN]
        else:
            attn += [("ffn.gate", "mlp.gate", "")]
            attn += [(f"ffn.shared_experts.{w}", f"mlp.shared_experts.{proj}", "") for w, proj in FFN
                     if args.n_shared_experts]
            out += [(f"{q}ffn.experts.{w}", e, f"{p}mlp.experts.{e}.{proj}.weight", "")
                    for e in range(args.n_routed_experts) for w, proj in FFN]
            if args.score_func == "sigmoid":     # V2's softmax gate has no bias (ours: zeros)
                out.append((f"{q}ffn.gate.bias", None, f"{p}mlp.gate.e_score_correction_bias", ""))
        out += [(f"{q}{ours}.weight", None, f"{p}{theirs}.weight", fix) for ours, theirs, fix in attn]
    return out


def interleave_rope(w, rows, rope):
    """Rows stored [evens, odds] in the last `rope` of each group of `rows` rows (rope_interleave false) back to
    interleaved pairs: file row i -> our row 2i, file row rope/2 + i -> our row 2i + 1."""
    w = w.unflatten(0, (-1, rows))
    r = w[:, rows - rope:]
    pairs = torch.stack([r[:, :rope // 2], r[:, rope // 2:]], dim=2).flatten(1, 2)
    return torch.cat([w[:, :rows - rope], pairs], dim=1).flatten(0, 1)


def swap_halves(w):
    """eh_proj between eq. 21's order [h; emb] (ours) and the checkpoint's [emb; h]: the column halves swap."""
    return torch.cat(w.chunk(2, dim=1)[::-1], dim=1)


# ----------------------------------------------------------------------------- load

def is_folder(path):
    return (Path(path) / "config.json").is_file()


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not JSON ({one_line(e)})") from None


def shards(folder):
    """{tensor name: safetensors file} from model.safetensors.index.json, else from every *.safetensors file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index} has no weight_map")
        if missing := sorted({f for f in weight_map.values() if not (folder / f).is_file()}):
            raise UserError(f"{folder / missing[0]}, named in {index.name}, is missing")
        return {name: folder / f for name, f in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} holds no *.safetensors file")
    names = {}
    for path in files:
        with open_shard(path) as f:
            for name in f.keys():
                if name in names:
                    raise UserError(f"{name} is in both {names[name].name} and {path.name}")
                names[name] = path
    return names


def open_shard(path):
    """A safetensors file opened to read tensors one at a time into memory of their own (pread: no memory map,
    whose pages would stay resident and whose tensors would alias the file)."""
    from safetensors import safe_open
    try:
        return safe_open(path, framework="pt", device="cpu", backend="pread")
    except Exception as e:      # truncated or not safetensors at all
        raise UserError(f"{path} is not a readable safetensors file ({one_line(e)})") from None


def get_tensor(f, path, name, shape):
    """The tensor `name` of an open shard, its shape checked against the model's before any data is read."""
    try:
        got = tuple(f.get_slice(name).get_shape())
    except Exception as e:
        raise UserError(f"{path}: no tensor {name} ({one_line(e)})") from None
    if shape is not None and got != tuple(shape):
        raise UserError(f"{path}: {name} has shape {list(got)}, the config gives {list(shape)}")
    try:
        return f.get_tensor(name)
    except Exception as e:
        raise UserError(f"{path}: {name} cannot be read ({one_line(e)})") from None


def read_tensor(f, path, name, shape, files, block, device):
    """A file's tensor in its stored dtype, or an FP8 one dequantized to fp32 on device with its weight_scale_inv
    (found by the index)."""
    t = get_tensor(f, path, name, shape)
    if t.dtype != torch.float8_e4m3fn:
        return t
    scale_name = name + "_scale_inv"
    if block is None or scale_name not in files:
        raise UserError(f"{path}: {name} is FP8 without {'a quantization_config' if block is None else scale_name}")
    blocks = (math.ceil(t.size(0) / block), math.ceil(t.size(1) / block))
    if files[scale_name] == path:
        scale = get_tensor(f, path, scale_name, blocks)
    else:
        with open_shard(files[scale_name]) as g:
            scale = get_tensor(g, files[scale_name], scale_name, blocks)
    return fp8.dequantize(t.to(device), scale.to(device), rows=block)   # times its 128 x 128 block's scale


def empty_model(args, dtype):
    """The model's modules with parameters on the meta device (no memory, no random init) in dtype; the gates'
    biases in fp32, as DeepSeek's inference code keeps them (bf16 cannot resolve their 0.001 steps near 1)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = ds.Transformer(args)
            for g in model.gates():
                g.bias = g.bias.float()
        return model
    finally:
        torch.set_default_dtype(default)


def load(folder, dtype=torch.float32, device="cpu"):
    """(model in eval mode on device in dtype, tokenizer meta or None) from a folder in DeepSeek's layout. Streams
    shard by shard into a model built on the meta device: peak memory about one copy of the model plus the largest
    tensor (bench.py --parts=hf). One-line UserError for a bad config, a missing, truncated or foreign shard, a
    tensor of the wrong shape or one that has no place in the model. A folder without its MTP layers (transformers
    drops them when it saves) loads without MTP modules."""
    folder = Path(folder)
    args, interleaved, block = args_from_config(read_json(folder / "config.json"), folder / "config.json")
    files = shards(folder)
    if args.n_mtp and not any(n.startswith(f"model.layers.{args.n_layers}.") for n in files):
        args = dataclasses.replace(args, n_mtp=0)      # transformers drops the MTP layers when it saves a model
    model = empty_model(args, dtype)
    targets = model.state_dict()                       # meta tensors: the shapes and dtypes to fill
    state = read_state(folder, files, args, targets, interleaved, block, device)
    for name, t in targets.items():                    # V2's softmax gate has no bias in the files: ours is 0
        if name not in state and name.endswith("gate.bias") and args.score_func == "softmax":
            state[name] = torch.zeros(t.shape, dtype=t.dtype, device=device)
    if missing := [n for n in targets if n not in state]:
        theirs = next((t for o, _, t, _ in layout(args) if o == missing[0]), missing[0])
        raise UserError(f"{folder}: {theirs} is missing ({len(missing)} of our tensors have none)")
    model.load_state_dict(state, assign=True)
    # the buffers no file holds: RoPE tables and the gates' token counts
    model.rope_cos, model.rope_sin = (t.to(device) for t in ds.precompute_rope(args))
    for g in model.gates():
        g.load = torch.zeros_like(g.bias)
    if left := [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]:
        raise RuntimeError(f"hf.load left {left[0]} unset")
    return model.eval(), tokenizer_meta(folder)


def read_state(folder, files, args, targets, interleaved, block, device):
    """Our state dict from a folder's shards ({tensor name: file}), read file by file, each converted on arrival."""
    plan = layout(args)
    entries = {theirs: (ours, e, fix) for ours, e, theirs, fix in plan}
    # transformers 5 holds each layer's experts stacked: gate_up_proj (E, 2I, D) = [w1; w3], down_proj = w2
    stacked = {theirs.rsplit(".", 3)[0]: ours.rsplit(".", 1)[0] for ours, e, theirs, _ in plan if e == 0}
    state, shared, filled = {}, [], {}

    def put(ours, t, e=None):
        target = targets[ours]
        if e is None:
            state[ours] = t.to(device=device, dtype=target.dtype).contiguous()
            return
        if ours not in state:
            state[ours] = torch.empty(target.shape, dtype=target.dtype, device=device)
        state[ours][e].copy_(t)
        filled.setdefault(ours, set()).add(e)

    by_file = {}
    for name, path in files.items():
        by_file.setdefault(path, []).append(name)
    for path, names in by_file.items():
        with open_shard(path) as f:
            for name in names:
                if name.endswith("_scale_inv") or name.endswith("rotary_emb.inv_freq"):
                    continue                   # scales go with their weights; old files' RoPE buffers
                prefix, _, leaf = name.rpartition(".")
                if name in entries:
                    ours, e, fix = entries[name]
                    shape = targets[ours].shape[1:] if e is not None else targets[ours].shape
                    if fix == "shared":        # compared with the main model's once that is read
                        shared.append((name, ours, shape))
                        continue
                    t = read_tensor(f, path, name, shape, files, block, device)
                    if fix == "eh":
                        t = swap_halves(t)
                    elif fix and not interleaved:
                        t = interleave_rope(t, args.qk_nope_head_dim + args.qk_rope_head_dim if fix == "q_rope"
                                            else args.kv_lora_rank + args.qk_rope_head_dim, args.qk_rope_head_dim)
                    put(ours, t, e)
                elif prefix in stacked and leaf in ("gate_up_proj", "down_proj"):
                    E, I, D = targets[stacked[prefix] + ".w1"].shape
                    t = read_tensor(f, path, name, (E, 2 * I, D) if leaf == "gate_up_proj" else (E, D, I), files, block,
                                    device)
                    for w, part in zip(("w1", "w3"), t.split(I, dim=1)) if leaf == "gate_up_proj" else [("w2", t)]:
                        put(f"{stacked[prefix]}.{w}", part)
                else:
                    raise UserError(f"{path}: tensor {name} has no place in this model (config.json: "
                                    f"{args.n_layers} layers + {args.n_mtp} MTP, {args.n_routed_experts} experts)")
    for ours, got in filled.items():
        if len(got) < targets[ours].size(0):
            e = min(set(range(targets[ours].size(0))) - got)
            raise UserError(f"{folder}: {next(t for o, x, t, _ in plan if (o, x) == (ours, e))} is missing")
    for name, ours, shape in shared:           # an MTP layer's embedding or head: ours shares the main model's
        with open_shard(files[name]) as f:
            t = read_tensor(f, files[name], name, shape, files, block, device)
        if not torch.equal(t.to(device=device, dtype=state[ours].dtype), state[ours]):
            raise UserError(f"{files[name]}: {name} differs from the main model's {ours} (this model shares them)")
    return state


# ModelArgs fields that only training uses, which a folder does not define (train.py's defaults apply)
TRAINING = ("mtp_lambda", "bias_update_speed", "seq_aux_alpha", "dropout")


def checkpoint(folder):
    """A folder read as train.py reads its ckpt.pt: the weights (fp32, CPU), model_args, the tokenizer meta, and a
    config of the keys the folder defines (block_size: max_position_embeddings); no optimizer state. Fine-tuning
    needs a tokenizer that data.py makes: characters or GPT-2's BPE."""
    model, meta = load(folder)
    if meta is None or meta["tokenizer"] not in ("char", "bpe"):
        raise UserError(f"{folder}: train.py tokenises with characters or GPT-2's BPE, and this folder's tokenizer "
                        f"{'is missing (no tokenizer.json)' if meta is None else 'is neither'}")
    a = model.args
    config = {k: v for k, v in dataclasses.asdict(a).items() if k not in ("vocab_size", "max_seq_len", *TRAINING)}
    config.update(block_size=a.max_seq_len, tokenizer=meta["tokenizer"])
    if meta["tokenizer"] == "bpe":
        config["encoding"] = meta["encoding"]
    if a.score_func == "softmax":              # DeepSeek-V2's layout has no balancing bias to train
        config["bias_update_speed"] = 0.0
    return dict(model=model.state_dict(), model_args=dataclasses.asdict(a), meta=meta, config=config, iter_num=0,
                best_val_loss=float("inf"), optimizer=dict(state={}, param_groups=[]))


# ----------------------------------------------------------------------------- tokenizers

def byte_chars():
    """GPT-2's byte-level alphabet: each byte as a printable character (printable Latin-1 bytes as themselves, the
    others as the code points from 256 up, in byte order), so that a byte string is a string of vocabulary symbols."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in keep else chr(next(extra)) for b in range(256)}


def tokenizer_json(meta):
    """tokenizer.json (the tokenizers package's format, which AutoTokenizer reads) for our tokenizer meta: GPT-2
    style byte-level BPE from a tiktoken encoding (its regex, its ranks as the vocabulary, a merge for every way
    to split a token into two others, ordered by the token's rank: tiktoken's lowest-rank-first merging; a word
    that is itself a token is taken whole, as tiktoken does), or one token per character; a chat template's
    special tokens (meta["special"]) as added tokens after them, each matched whole."""
    added, model, pre, decoder = [], None, None, None
    token = lambda i, s: dict(id=i, content=s, single_word=False, lstrip=False, rstrip=False,  # noqa: E731
                              normalized=False, special=True)
    if meta["tokenizer"] == "bpe":
        enc = _tiktoken(meta["encoding"])
        sym = byte_chars()
        ranks = {"".join(sym[b] for b in token): rank for token, rank in enc._mergeable_ranks.items()}
        merges = sorted(((a, b, ranks[a + b]) for t in ranks for a, b in ((t[:i], t[i:]) for i in range(1, len(t)))
                         if a in ranks and b in ranks), key=lambda m: (m[2], ranks[m[0]], ranks[m[1]]))
        added = [token(i, s) for s, i in sorted(enc._special_tokens.items(), key=lambda x: x[1])]
        model = dict(type="BPE", dropout=None, unk_token=None, continuing_subword_prefix=None, end_of_word_suffix=None,
                     fuse_unk=False, byte_fallback=False, ignore_merges=True,
                     vocab={**ranks, **{a["content"]: a["id"] for a in added}}, merges=[[a, b] for a, b, _ in merges])
        pre = dict(type="Sequence", pretokenizers=[
            dict(type="Split", pattern=dict(Regex=enc._pat_str), behavior="Isolated", invert=False),
            dict(type="ByteLevel", add_prefix_space=False, trim_offsets=True, use_regex=False)])
        decoder = dict(type="ByteLevel", add_prefix_space=False, trim_offsets=True, use_regex=False)
    else:
        model = dict(type="WordLevel", vocab={ch: i for i, ch in enumerate(meta["chars"])}, unk_token="[UNK]")
        pre = dict(type="Split", pattern=dict(Regex=r"[\s\S]"), behavior="Isolated", invert=False)
        decoder = dict(type="Fuse")
    special = meta.get("special", [])
    added += [token(meta["vocab_size"] - len(special) + i, s) for i, s in enumerate(special)]
    return dict(version="1.0", truncation=None, padding=None, added_tokens=added, normalizer=None, pre_tokenizer=pre,
                post_processor=None, decoder=decoder, model=model)


def tokenizer_config(meta, args):
    """tokenizer_config.json: the fast tokenizer, the context, and a chat model's template and its bos/eos tokens
    (transformers' apply_chat_template then writes the prompt our template does)."""
    special = dict(eos_token="<|endoftext|>") if meta["tokenizer"] == "bpe" else {}
    if meta.get("special"):
        special = dict(bos_token=meta["special"][0], eos_token=meta["special"][-1])
        if meta.get("chat_template"):
            special["chat_template"] = meta["chat_template"]
    return dict(tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False,
                model_max_length=args.max_seq_len, **special)


def tokenizer_meta(folder):
    """The folder's tokenizer as a data.py meta: characters or GPT-2's BPE (with a chat template's special tokens
    after them, and its template) when its tokenizer.json is exactly the one export writes for them (train.py can
    then tokenise data for it, sample.py --chat use the template), else {"tokenizer": "hf", "file": ...}
    (data.tokenizer_from_meta runs it with the tokenizers package); None without a tokenizer.json."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None
    tok = read_json(path)
    model = tok.get("model") or {}
    vocab = model.get("vocab") or {}
    n = len(vocab)
    extra = {}                                 # a chat template's special tokens: added after the vocabulary
    special = [a.get("content") for a in sorted(tok.get("added_tokens") or [], key=lambda a: a.get("id", -1))
               if a.get("id", -1) >= n]
    if special:
        config = read_json(path.with_name("tokenizer_config.json")) if path.with_name("tokenizer_config.json").is_file() \
            else {}
        extra = dict(special=special, **({"chat_template": config["chat_template"]} if "chat_template" in config else {}))
    candidates = []
    if model.get("type") == "WordLevel" and all(isinstance(k, str) and len(k) == 1 for k in vocab):
        chars = "".join(sorted(vocab, key=vocab.get))
        candidates.append(dict(tokenizer="char", chars=chars))
    if model.get("type") == "BPE" and n == 50257:       # the size of GPT-2's, data.py's default BPE
        candidates.append(dict(tokenizer="bpe", encoding="r50k_base"))
    for meta in candidates:
        meta.update(vocab_size=n + len(special), **extra)
        try:
            if tokenizer_json(meta) == tok:
                return meta
        except UserError:                      # no tiktoken data here: run the file as it is
            pass
    return dict(tokenizer="hf", file=str(path))


# ----------------------------------------------------------------------------- export

def export(model, meta, out, dtype=None, max_shard_bytes=5 * 10 ** 9):
    """Write model (and its tokenizer, meta) to the new or empty folder out in DeepSeek's layout: config.json,
    the weights in dtype (default: the model's; the gates' biases stay fp32) as model.safetensors, or as shards
    model-0000k-of-0000n.safetensors of at most max_shard_bytes with model.safetensors.index.json, the MTP modules as
    layers n_layers.., tokenizer.json where the tokenizer is characters or tiktoken BPE. Written into out.tmp and
    renamed: a crash or an error leaves no half folder. Returns the files written."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder: export writes a new one")
    args = model.args
    config = config_from_args(args, meta)
    if args.score_func == "softmax" and any(g.bias.any() for g in model.gates()):
        raise UserError("a softmax gate with a balancing bias has no place in DeepSeek-V2's layout (bias_update_speed "
                        "0 trains it without one)")
    state = model.state_dict()
    tensors = []                             # (name, tensor, dtype to write): the gates' biases stay fp32
    for ours, e, theirs, fix in layout(args):
        t = state[ours] if e is None else state[ours][e]
        tensors.append((theirs, swap_halves(t) if fix == "eh" else t,
                        t.dtype if dtype is None or ours.endswith("gate.bias") else dtype))
    groups, size = [[]], 0
    for name, t, dt in tensors:              # consecutive tensors into shards of at most max_shard_bytes
        n = t.numel() * dt.itemsize
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, t, dt))
        size += n
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")           # renamed to out once complete
    tmp.mkdir(parents=True)
    try:
        files = write_folder(tmp, tensors, groups, config, meta, args, dtype or state["embed.weight"].dtype)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files


def write_folder(tmp, tensors, groups, config, meta, args, dtype):
    """export's files, into the folder tmp: the shards (and their index), config.json, the tokenizer's files."""
    from safetensors.torch import save

    def write(name, obj):
        write_atomic(tmp / name, lambda f: f.write(json.dumps(obj, indent=2).encode()))
    names = ["model.safetensors"] if len(groups) == 1 else \
        [f"model-{k:05d}-of-{len(groups):05d}.safetensors" for k in range(1, len(groups) + 1)]
    for file, group in zip(names, groups):
        shard = save({n: t.detach().to("cpu", dt, copy=True).contiguous() for n, t, dt in group}, dict(format="pt"))
        write_atomic(tmp / file, lambda f, shard=shard: f.write(shard))
        del shard                                                    # one shard's bytes in memory at a time
    files = [*names, "config.json"]
    if len(groups) > 1:
        total = sum(t.numel() * dt.itemsize for _, t, dt in tensors)
        write("model.safetensors.index.json", dict(metadata=dict(total_size=total),
                                                   weight_map={n: f for f, g in zip(names, groups) for n, _, _ in g}))
        files.append("model.safetensors.index.json")
    write("config.json", dict(config, torch_dtype=str(dtype).removeprefix("torch.")))
    bos, eos = special_ids(meta)
    if meta and meta.get("tokenizer") in ("char", "bpe"):
        write("tokenizer.json", tokenizer_json(meta))
        write("tokenizer_config.json", tokenizer_config(meta, args))
        files += ["tokenizer.json", "tokenizer_config.json"]
        if eos is not None:                  # what transformers' generate starts and stops at
            write("generation_config.json", dict(bos_token_id=bos, eos_token_id=eos))
            files.append("generation_config.json")
    elif meta and meta.get("tokenizer") == "hf":     # a folder's own tokenizer (re-export): copied as it is
        for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (Path(meta["file"]).parent / name).is_file():
                shutil.copyfile(Path(meta["file"]).parent / name, tmp / name)
                files.append(name)
    return files
