"""The test suite: `python -m pytest -q` (conftest.py sets the environment up and holds the shared fixtures;
`-m "not slow"` is the quick part). Sections, in the order the code reads (search for "# ---- NAME"):

    the layout                  commands are leaves, libraries import forwards, at most 10 files at the top
    config .. generation        deepseek.py, as it reads: config, norm and RoPE, MLA, gate, experts and MoE,
                                balancing, MTP, model, generation (against the equations written out)
    kernels                     kernels.py against deepseek.py (gate, dispatch, the expert GEMMs)
    FP8                         systems/fp8.py against its definition (§3.3)
    training                    configuration, data and tokenizers, optimizers (AdamW, Muon) and schedule, the
                                loop, expert parallelism (systems/expert_parallel.py), checkpoints, context extension
    sampling                    sample.py, inference/ (speculative decoding, routing shown)
    DeepSeek's checkpoint format  checkpoint/hf.py both ways, and against transformers
    post-training               posttraining/chat.py, sft.py, grpo.py (§5)
    bench                       benchmarks/, from the numbers each part returns and the figures it draws
"""
import ast
import copy
import dataclasses
import hashlib
import itertools
import importlib.util
import json
import math
import os
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.functional import ScalingType

import bench
import deepseek as ds
import export
import grpo
import kernels
import sample
import sft
import train
from benchmarks import ablation as bench_ablation
from benchmarks import common as bench_common
from benchmarks import decode as bench_decode
from benchmarks import hf as bench_hf
from benchmarks import kernels as bench_kernels
from benchmarks import specialization as bench_specialization
from benchmarks import step as bench_step
from checkpoint import ckpt as ckpts
from checkpoint import hf
from inference import routing, speculative
from posttraining import chat, reasoning
from pretraining import configurator, data, optim
from systems import expert_parallel, fp8
from conftest import D, HAS_BPE, REPO, TINY, V, fit, model, preset, run, tiny


# ----------------------------------------------------------------------------- the layout

COMMANDS = ("train", "sample", "sft", "grpo", "export", "bench")   # what a user types: nothing imports them
# each library may import from its own place and those before it: the import graph has no back arrow
ORDER = ("deepseek", "kernels", "systems", "pretraining", "checkpoint", "inference", "posttraining", "benchmarks")


def imported(path):
    """The project modules a file imports (dotted names; `from X import Y` counts as X.Y and X)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n.split(".")[0] in ORDER + COMMANDS}


def test_layout_commands_are_leaves_and_libraries_import_forwards():
    """At most 10 .py files at the top (the commands, the model, the kernels, the tests); every folder of code a
    package; no file imports a command (the tests aside); each library imports only its own place or those before
    it in ORDER (deepseek.py nothing of ours)."""
    top = sorted(p.stem for p in REPO.glob("*.py"))
    assert len(top) <= 10 and set(top) == {*COMMANDS, "deepseek", "kernels", "test_all", "conftest"}, top
    folders = {p.parent.name for p in REPO.glob("*/*.py") if p.parent.name != "config"}
    assert folders == set(ORDER[2:]) and all((REPO / f / "__init__.py").is_file() for f in folders)
    for path in [*REPO.glob("*.py"), *REPO.glob("*/*.py")]:
        if path.stem in ("test_all", "conftest") or path.parent.name == "config":
            continue
        names = imported(path)
        assert not {n.split(".")[0] for n in names} & set(COMMANDS), (path, names)
        if path.stem not in COMMANDS:
            own = ORDER.index(path.parent.name if path.parent != REPO else path.stem)
            assert all(ORDER.index(n.split(".")[0]) <= own for n in names), (path, names)
    assert not imported(REPO / "deepseek.py")




# ----------------------------------------------------------------------------- config



def official(tmp_path, name, **extra):
    """DeepSeek's official inference config config/config_NAME.json, with extra keys if given."""
    path = REPO / "config" / f"config_{name}.json"
    if extra:
        path, keys = tmp_path / path.name, json.loads(path.read_text())
        path.write_text(json.dumps({**keys, **extra}))
    return ds.ModelArgs.from_json(path)


def test_from_json_official_defaults(tmp_path):
    """Absent keys take the official code's defaults; as in that code, no MTP module, and a softmax (V2)
    gate has no balancing bias (its update speed is 0)."""
    a = official(tmp_path, "16B")
    assert a.score_func == "softmax" and a.n_expert_groups == 1 and a.max_seq_len == 16384 and a.mscale == 0.707
    assert a.n_mtp == 0 and a.bias_update_speed == 0
    b = official(tmp_path, "671B")
    assert b.score_func == "sigmoid" and b.route_scale == 2.5 and b.q_lora_rank == 1536
    assert b.n_mtp == 0 and b.bias_update_speed == ds.ModelArgs.bias_update_speed


@pytest.mark.parametrize("field,value", [
    ("dim", 0), ("n_layers", -1), ("n_heads", 0), ("kv_lora_rank", 0), ("q_lora_rank", -8), ("qk_rope_head_dim", 7),
    ("v_head_dim", 0), ("moe_inter_dim", 0), ("n_shared_experts", -1), ("n_mtp", -1), ("rope_theta", 0.0),
    ("route_scale", -1.0), ("dropout", 1.0), ("seq_aux_alpha", -0.1), ("n_limited_groups", 5),
    ("n_activated_experts", 0), ("n_activated_experts", 9), ("n_expert_groups", 3), ("attn", "gqa")])
def test_model_args_checks_every_field(field, value):
    with pytest.raises(ValueError, match=f"ModelArgs: {field} "):
        tiny(**{field: value})


def test_from_json_rejects_unknown_key(tmp_path):
    with pytest.raises(ValueError, match="unknown config key.*n_expertz"):
        official(tmp_path, "16B", n_expertz=3)


@pytest.mark.parametrize("name,total,active", [
    # DeepSeek's inference/model.py built from its config_671B.json has 671,026,419,200 parameters (main
    # model, no MTP; the report's "671B"); its Gate.bias is an nn.Parameter there, a buffer here: 58 MoE
    # layers x 256 fewer, 671,026,404,352
    ("671B", 671_026_419_200 - 58 * 256, 37.6e9),
    ("16B", 15_706_484_224, 2.66e9),
])
def test_official_parameter_counts(tmp_path, name, total, active):
    a = official(tmp_path, name)
    with torch.device("meta"):
        m = ds.Transformer(a)
    assert m.num_params() == total
    assert abs(m.num_params(active=True) - active) < 0.01 * active
    assert sum(b.numel() for b in m.buffers() if b.dim() == 1 and b.numel() == a.n_routed_experts) \
        == 2 * (a.n_layers - a.n_dense_layers + a.n_mtp) * a.n_routed_experts   # bias + load per gate


# ----------------------------------------------------------------------------- norm and RoPE

def test_rmsnorm():
    n = ds.RMSNorm(16)
    n.weight.data.normal_()
    x = torch.randn(3, 16)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * n.weight
    torch.testing.assert_close(n(x), ref)


def official_freqs(a):
    """DeepSeek's precompute_freqs_cis, written out: frequencies with YaRN's correction."""
    dim, base = a.qk_rope_head_dim, a.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
    if a.max_seq_len > a.original_seq_len:
        def cdim(rot):
            return dim * math.log(a.original_seq_len / (rot * 2 * math.pi)) / (2 * math.log(base))
        low, high = max(math.floor(cdim(a.beta_fast)), 0), min(math.ceil(cdim(a.beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        smooth = 1 - torch.clamp((torch.arange(dim // 2).float() - low) / (high - low), 0, 1)
        freqs = freqs / a.rope_factor * (1 - smooth) + freqs * smooth
    return torch.polar(torch.ones(a.max_seq_len, dim // 2), torch.outer(torch.arange(a.max_seq_len).float(), freqs))


@pytest.mark.parametrize("max_seq_len", [64, 8192])   # YaRN off, on
def test_rope_matches_complex_form(max_seq_len):
    a = tiny(qk_rope_head_dim=32, max_seq_len=max_seq_len)
    cos, sin = ds.precompute_rope(a)
    cis = official_freqs(a)
    torch.testing.assert_close(cos, cis.real)
    torch.testing.assert_close(sin, cis.imag)
    x = torch.randn(2, 10, 3, 32)
    ref = torch.view_as_real(torch.view_as_complex(x.reshape(2, 10, 3, 16, 2)) * cis[:10, None]).flatten(-2)
    torch.testing.assert_close(ds.apply_rope(x, cos[:10], sin[:10]), ref)


def test_yarn_softmax_scale():
    short, long = ds.MLA(tiny()), ds.MLA(tiny(max_seq_len=8192))
    assert short.softmax_scale == pytest.approx(16 ** -0.5)
    assert long.softmax_scale == pytest.approx(16 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)


# ----------------------------------------------------------------------------- MLA

def test_mla_rope_key_is_shared_by_all_heads():
    """The naive cache holds per-head keys: their RoPE part (eq. 3's k^R) must be the same for every
    head and position-dependent; their no-RoPE part differs per head."""
    m = model().eval()
    m.set_attn_impl("naive")
    with torch.no_grad():
        m(torch.randint(0, V, (1, 6)), start_pos=0)
    k = m.layers[0].attn.cache["k"][0, :6]                       # (S, H, nope + rope)
    nope, rope = k.split([m.args.qk_nope_head_dim, m.args.qk_rope_head_dim], -1)
    assert torch.equal(rope, rope[:, :1].expand_as(rope)) and not torch.allclose(nope[:, 0], nope[:, 1])


def test_mla_matches_explicit_attention():
    """The training path (SDPA) equals eqs. 1-11 written out per head."""
    a = tiny()
    torch.manual_seed(0)
    mla = ds.Transformer(a).layers[0].attn
    x = torch.randn(2, 12, a.dim)
    cos, sin = ds.precompute_rope(a)
    cos, sin = cos[:12], sin[:12]
    H, dn, dr, dv = a.n_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
    q = mla.wq_b(mla.q_norm(mla.wq_a(x))).view(2, 12, H, dn + dr)
    c_kv, k_r = mla.wkv_a(x).split([a.kv_lora_rank, dr], -1)
    kv = mla.wkv_b(mla.kv_norm(c_kv)).view(2, 12, H, dn + dv)
    k_r = ds.apply_rope(k_r[:, :, None], cos, sin).expand(-1, -1, H, -1)
    q = torch.cat([q[..., :dn], ds.apply_rope(q[..., dn:], cos, sin)], -1)
    k = torch.cat([kv[..., :dn], k_r], -1)
    s = torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(dn + dr)
    s = s.masked_fill(torch.ones(12, 12, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    o = torch.einsum("bhst,bthd->bshd", s, kv[..., dn:])
    torch.testing.assert_close(mla(x, cos, sin), mla.wo(o.flatten(2)), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attn,impl", [("mla", "absorb"), ("mla", "naive"), ("mha", "absorb")])
@pytest.mark.parametrize("groups", [(1, 1), (4, 2)])
def test_cached_decoding_matches_full_forward(attn, impl, groups):
    m = model(attn=attn, n_expert_groups=groups[0], n_limited_groups=groups[1]).eval()
    m.set_attn_impl(impl)
    idx = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        full = m(idx)[0]
        parts = [m(idx[:, :7], start_pos=0)[0], m(idx[:, 7:10], start_pos=7)[0]]
        parts += [m(idx[:, t:t + 1], start_pos=t)[0] for t in range(10, 20)]    # chunk, then tokens
    assert (full - torch.cat(parts, 1)).abs().max() < 1e-4


def test_absorb_cache_holds_only_latent_and_rope_key():
    """Absorbed MLA caches the normalised latent and the RoPE key per token (576 numbers a layer at DeepSeek-V3's
    shape), naive MLA and MHA every head's keys and values; bench_decode counts them so."""
    for attn, impl, names in [("mla", "absorb", {"c_kv", "k_rope"}), ("mla", "naive", {"k", "v"}),
                              ("mha", "absorb", {"k", "v"})]:
        m = model(attn=attn).eval()
        m.set_attn_impl(impl)
        with torch.no_grad():
            m(torch.randint(0, V, (1, 5)), start_pos=0)
        cache = m.layers[0].attn.cache
        assert set(cache) == names
        per_token = sum(t[0, 0].numel() for t in cache.values())
        assert per_token == bench_decode.cache_numbers_per_token(m.args, impl)
    a = m.args
    assert per_token == a.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim)
    v3 = ds.ModelArgs.from_json(REPO / "config" / "config_671B.json")
    assert bench_decode.cache_numbers_per_token(v3) == 576                          # 512 latent + 64 RoPE key


# ----------------------------------------------------------------------------- gate

def gate(E, k=2, G=1, KG=1, f="sigmoid", scale=1.0, bias=None):
    """A Gate whose logits are its input (dim = E, e_i the unit vectors)."""
    g = ds.Gate(tiny(dim=E, n_routed_experts=E, n_activated_experts=k, n_expert_groups=G, n_limited_groups=KG,
                     score_func=f, route_scale=scale))
    with torch.no_grad():
        g.weight.copy_(torch.eye(E))
        g.bias.copy_(torch.zeros(E) if bias is None else bias)
    return g


def direct_route(s, bias, k, G, KG, score_func):
    """Eq. 16 with group limits, token by token in plain Python, ties -> the lower index (the kernel's rule). A
    group scores the sum of its two best biased scores with sigmoid (V3), its best score with softmax (V2)."""
    ids = []
    for t in range(s.size(0)):
        b = (s[t].float() + bias.float()).tolist()
        E = len(b)
        per = E // G
        top = 2 if score_func == "sigmoid" else 1
        gscore = [sum(sorted(b[g * per:(g + 1) * per], reverse=True)[:top]) for g in range(G)]
        groups = sorted(range(G), key=lambda g: (-gscore[g], g))[:KG]
        ids.append(sorted((e for e in range(E) if e // per in groups), key=lambda e: (-b[e], e))[:k])
    return torch.tensor(ids, dtype=torch.long)


def direct_gate(logits, bias, k, G, KG, score_func, scale):
    """Eqs. 13-16: direct_route's choice and its gate values, the unbiased scores of the chosen, normalised
    (sigmoid), times the route scale."""
    s = torch.sigmoid(logits) if score_func == "sigmoid" else logits.softmax(-1)
    ids = direct_route(s, bias, k, G, KG, score_func)
    w = s.gather(1, ids)
    if score_func == "sigmoid":
        w = w / w.sum(-1, keepdim=True)
    return w * scale, ids


def is_top_k(s, bias, ids, k, G, KG, score_func):
    """Whether ids is a choice eq. 16 allows whatever the tie-break: the groups it uses have group scores among the
    KG best, and its biased scores are the k best of all experts in some such KG groups."""
    b = s.float() + bias.float()
    grouped = b.unflatten(-1, (G, -1))
    best = grouped.topk(min(2, grouped.size(-1)), -1)[0]
    gscore = best.sum(-1) if score_func == "sigmoid" else best[..., 0]
    used = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, ids // (E := b.size(-1) // G), True)
    kth_group = gscore.sort(-1, descending=True)[0][:, KG - 1:KG]
    kept = (gscore > kth_group) | used                        # the groups better than the KG-th, and the ones used
    allowed = b.masked_fill(~kept.repeat_interleave(E, 1), float("-inf"))
    return bool(used.sum(-1).le(KG).all() and (gscore.masked_fill(~used, float("inf")) >= kth_group).all()
                and torch.equal(b.gather(1, ids).sort(-1)[0], allowed.topk(k, -1)[0].sort(-1)[0]))


@pytest.mark.parametrize("E,k,G,KG,f,scale", [(8, 2, 1, 1, "sigmoid", 1.0), (16, 4, 4, 2, "sigmoid", 2.5),
                                              (12, 3, 3, 1, "softmax", 1.0), (64, 6, 8, 3, "sigmoid", 1.0),
                                              (64, 6, 8, 3, "softmax", 1.0)])
def test_gate_matches_direct_equations(E, k, G, KG, f, scale):
    """The gate equals eqs. 13-16 written out token by token: the same experts, in the same order, and gate values.
    With exactly equal scores torch.topk (which the gate, as DeepSeek's, uses) may take any of them: the choice is
    then one the equations allow."""
    torch.manual_seed(E)
    logits, bias = torch.randn(40, E), torch.randn(E) * 0.1
    _, w, ids = gate(E, k, G, KG, f, scale, bias)(logits)
    w_ref, ids_ref = direct_gate(logits, bias, k, G, KG, f, scale)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref)
    ties = (logits * 2).round() / 2                   # many exact ties
    bias[: E // 2] = 0.0                              # ties in the bias too
    g = gate(E, k, G, KG, f, scale, bias)
    s, w, ids = g(ties)
    assert is_top_k(s, bias, ids, k, G, KG, f) and is_top_k(s, bias, direct_route(s, bias, k, G, KG, f), k, G, KG, f)
    assert not is_top_k(s, bias, ids.roll(1, 0), k, G, KG, f)              # the check can fail


def test_official_v2_config_routes_like_the_official_gate(tmp_path):
    """config_236B.json (softmax, 160 experts in 8 groups, keep 3, top-6, route_scale 16): the group
    score is the group's best score, the weights are the unnormalised softmax scores times 16."""
    a = official(tmp_path, "236B")
    g = ds.Gate(a)
    torch.nn.init.normal_(g.weight, std=0.02)
    x = torch.randn(50, a.dim)
    _, w, ids = g(x)
    w_ref, ids_ref = direct_gate(F.linear(x, g.weight), g.bias, 6, 8, 3, "softmax", 16.0)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(w, w_ref)


def test_group_score_v3_sums_two_best_v2_takes_best():
    """Group A = experts (0, 1), B = (2, 3), keep one group, k = 1. A holds the single best score, B
    the best pair: V3 (sigmoid) keeps B and routes to expert 2, V2 (softmax) keeps A and routes to 0."""
    logits = torch.tensor([[2.0, -3.0, 1.5, 1.4]])
    assert gate(4, 1, 2, 1, "sigmoid")(logits)[2].tolist() == [[2]]
    assert gate(4, 1, 2, 1, "softmax")(logits)[2].tolist() == [[0]]


def test_group_limit_masks_with_minus_inf():
    """The kept group holds one expert with a positive and one with a negative biased score, and k = 2
    exceeds the positives: the second choice must be the kept negative one. Masking the dropped
    groups with 0 instead of -inf would choose a dropped expert (biased score 0 > -0.3)."""
    logits = torch.zeros(1, 8)                                          # s = 0.5 everywhere
    bias = torch.tensor([-5., -5., 0.1, -0.8, -5., -5., -5., -5.])      # groups of 2; group 1 is the best
    assert gate(8, 2, 4, 1, bias=bias)(logits)[2].tolist() == [[2, 3]]


def test_bias_chooses_but_does_not_weigh():
    logits = torch.randn(30, 8)
    bias = torch.zeros(8)
    bias[7] = 10.0                                   # expert 7 is chosen by every token
    _, w, ids = gate(8, 2, bias=bias)(logits)
    assert (ids[:, 0] == 7).all()
    s = torch.sigmoid(logits)
    other = ids[:, 1]
    torch.testing.assert_close(w[:, 0], s[:, 7] / (s[:, 7] + s.gather(1, other[:, None])[:, 0]))


# ----------------------------------------------------------------------------- experts and MoE

def test_swiglu_is_silu_gate_times_up():
    """w2(silu(w1 x) * w3 x) at a point computed by hand: 1 * silu(2) * 3; the common slip
    silu(w1 x * w3 x) would give silu(6)."""
    e = ds.MLP(1, 1)
    with torch.no_grad():
        e.w1.weight.fill_(2.0), e.w3.weight.fill_(3.0), e.w2.weight.fill_(1.0)
    assert e(torch.ones(1, 1)).item() == pytest.approx(2 / (1 + math.exp(-2)) * 3)


def expert_ref(experts, e, x):
    """Routed expert e as the SwiGLU written out with its own slice of the stacked weights."""
    return (F.silu(x @ experts.w1[e].T) * (x @ experts.w3[e].T)) @ experts.w2[e].T


def test_moe_matches_per_token_loop():
    """The MoE layer, reference and installed, equals eq. 12 written out token by token, forward and backward (the
    gradients of the input, the experts, the shared expert and the router through the gate values)."""
    moe = model().layers[1].ffn
    x = torch.randn(2, 9, D)
    grads = []
    for how in ("direct", "reference", "installed"):
        xg = x.clone().requires_grad_()
        if how == "direct":
            xf = xg.view(-1, D)
            _, w, ids = moe.gate(xf)
            y = moe.shared_experts(xf)
            y = torch.stack([y[t] + sum(w[t, j] * expert_ref(moe.experts, ids[t, j], xf[t]) for j in range(ids.size(1)))
                             for t in range(xf.size(0))])
        else:
            y = (kernels.install(moe) if how == "installed" else moe)(xg).view(-1, D)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads.append([y.detach(), xg.grad] + [p.grad.clone() for p in moe.parameters()])
        moe.zero_grad()
    assert type(moe) is kernels.MoE and type(moe.gate) is kernels.Gate
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def moe_pair(empty=True, **kw):
    """A MoE layer of the test model (train mode) and the same layer with kernels.install's paths. empty: the bias
    sends every token to experts 0-3 (groups 0 and 1), so 4-7 have none."""
    moe = model(**kw).layers[1].ffn.train()
    if empty:
        moe.gate.bias[:4] += 1.0
    return moe, kernels.install(copy.deepcopy(moe))


def moe_run(moe, x, dtype):
    """Forward and backward of a MoE layer under autocast to dtype (as train.py): (output, loss and gate counts,
    gradients of the input and of every parameter); the gate's counts then cleared."""
    xg = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        y = moe(xg)
    (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().add(moe.balance * 1e3).backward()
    out = [y.float(), moe.balance, moe.gate.load.clone(), xg.grad] + [p.grad.clone() for p in moe.parameters()]
    moe.zero_grad()
    moe.gate.load.zero_()
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", ["grouped_mm", "padded", "loop", "grouped_mm, B200"])
def test_installed_moe_equals_reference(dtype, path, monkeypatch):
    """kernels.install's MoE (the pairs sorted by expert, each projection of all experts as one GEMM by each of
    expert_gemm's paths; on B200 the grouped GEMM with empty experts' gradients zeroed) equals deepseek.py's loop over
    experts: outputs, balance loss, token counts, and the gradients of the input and of every weight, in fp32 and
    under bf16 autocast, with experts that get no token."""
    moe, fast = moe_pair(seq_aux_alpha=0.01)
    if path.endswith("B200"):
        monkeypatch.setattr(kernels, "expert_gemm_here", lambda device, dtype: ("grouped_mm", True))
    else:
        kernels.install(fast, expert_gemm=path)
    x = torch.randn(2, 13, D)
    ref, got = moe_run(moe, x, dtype), moe_run(fast, x, dtype)
    assert ref[2][4:].sum() == 0 and ref[2][:4].min() > 0                # experts 4-7 are empty
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, **tol)


def test_describe_names_the_path_that_runs(monkeypatch):
    """What train.py and sample.py print about the MoE layers (kernels.describe) names the path their forward takes:
    deepseek.py's loop over experts; installed, the CPU's choice (torch._grouped_mm, measured fastest there) or a
    forced one; FP8 experts, whose projections run one expert at a time by their own forward."""
    ran = []
    for name in ("grouped_experts", "padded_experts", "dispatch"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, real=real, name=name: ran.append(name) or real(*a))
    for cls in (ds.Experts, fp8.Experts):
        monkeypatch.setattr(cls, "forward", lambda self, x, i, real=cls.forward: ran.append("one expert") or real(self, x, i))
    cases = [(model(), {"one expert"}, "deepseek.py's reference (a loop over experts"),
             (kernels.install(model()), {"dispatch", "grouped_experts"}, "routed experts by torch._grouped_mm"),
             (kernels.install(model(), "padded"), {"dispatch", "padded_experts"}, "batched GEMMs over padded rows"),
             (kernels.install(model(), "loop"), {"dispatch", "one expert"}, "a loop over experts (one host sync"),
             (fp8.convert(kernels.install(model())), {"dispatch", "one expert"}, "a loop over experts (one host sync")]
    x = torch.randint(0, V, (2, 6))
    for m, paths, words in cases:
        ran.clear()
        with torch.no_grad():
            m(x)
        assert set(ran) == paths and words in kernels.describe(m, "cpu", torch.float32), (paths, ran)


grouped_experts = kernels.grouped_experts       # the function itself (tests patch the module's name)


@pytest.mark.parametrize("garbage", [float("nan"), float("inf"), 1e3])
def test_grouped_gemm_guard_zeroes_empty_experts_gradients(garbage, monkeypatch):
    """On B200 (compute capability 10.x) _grouped_mm leaves the weight gradients of experts with no rows unset
    (pytorch#172439): whatever memory held, NaN and Inf included. The guard selects zeros there (a 0/1 mask times
    NaN would stay NaN, and one NaN makes the clipped step NaN everywhere) and leaves the others as they are."""
    torch.manual_seed(0)
    experts, counts = ds.Experts(4, 16, 16), torch.tensor([5, 0, 3, 0])
    for w in experts.parameters():
        torch.nn.init.normal_(w, std=0.2)
    x = torch.randn(8, 16)
    real = torch._grouped_mm

    def unset_memory(a, b, offs):                  # the op, its weight gradient garbage where a group is empty
        empty = torch.diff(offs, prepend=offs.new_zeros(1)) == 0
        if b.requires_grad:
            b.register_hook(lambda g: g + torch.where(empty.view(-1, 1, 1), garbage, 0.0))
        return real(a, b, offs=offs)
    monkeypatch.setattr(torch, "_grouped_mm", unset_memory)
    grads = []
    for zero_empty in (False, True):
        grouped_experts(x, counts, *experts.parameters(), zero_empty=zero_empty).square().sum().backward()
        grads.append([w.grad.clone() for w in experts.parameters()])
        experts.zero_grad()
    for plain, guarded in zip(*grads):
        assert (plain[1] == garbage).all() or plain[1].isnan().all()          # what the guard is for
        assert torch.equal(guarded[[1, 3]], torch.zeros_like(guarded[[1, 3]]))
        assert torch.equal(guarded[[0, 2]], plain[[0, 2]])
    assert torch.nn.utils.get_total_norm(grads[1]).isfinite()


def test_expert_gemm_decision():
    """On a CPU the grouped GEMM is chosen exactly where torch._grouped_mm runs (tried here, dtype by dtype; from torch
    2.9). On CUDA only where PyTorch runs it as one fused kernel, bf16 on compute capability 9.x (torch 2.8 on) or
    10.x (2.9 on), else the padded batched GEMM: never the per-expert loop, whose host syncs grow with the experts.
    MPS, with neither op, loops."""
    here = tuple(int(v) for v in torch.__version__.split(".")[:2])
    a, b, offs = torch.randn(6, 16), torch.randn(3, 16, 16), torch.tensor([2, 4, 6], dtype=torch.int32)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        try:
            torch._grouped_mm(a.to(dtype), b.to(dtype).transpose(-2, -1), offs=offs)
            runs = True
        except RuntimeError:
            runs = False
        assert (kernels.expert_gemm("cpu", (0, 0), dtype, here) == "grouped_mm") == runs, dtype
        assert kernels.expert_gemm("cpu", (0, 0), dtype, (2, 8)) == "loop"             # 2.8: no CPU _grouped_mm
    for cc, dtype, version in itertools.product([(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)],
                                                [torch.bfloat16, torch.float16, torch.float32], [(2, 8), (2, 9), (2, 13)]):
        fused = dtype == torch.bfloat16 and (cc[0] == 9 or cc[0] == 10 and version >= (2, 9))
        assert kernels.expert_gemm("cuda", cc, dtype, version) == ("grouped_mm" if fused else "padded")
    assert kernels.expert_gemm("mps", (0, 0), torch.float32, here) == "loop"


def test_fused_expert_gemm_is_guarded_on_b200(monkeypatch):
    """On this torch, by the device's compute capability: the fused path, with the empty-expert guard on 10.x only."""
    for cc, want in [((10, 0), ("grouped_mm", True)), ((9, 0), ("grouped_mm", False)), ((8, 9), ("padded", False))]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
        kernels.expert_gemm_here.cache_clear()                     # a new device, as far as the cache knows
        assert kernels.expert_gemm_here(torch.device("cuda"), torch.bfloat16) == want
    kernels.expert_gemm_here.cache_clear()


def test_moe_forward_host_syncs(monkeypatch):
    """On the installed grouped-GEMM path nothing in a MoE training forward reads a device value on the host; the
    padded and loop paths read one (their largest or all counts)."""
    moe, fast = moe_pair(empty=False)
    x = torch.randn(2, 9, D)
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__index__", "cpu", "numpy"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, real=real, name=name: reads.append(name) or real(t, *a))
    for path, n in (("grouped_mm", 0), ("padded", 1), ("loop", 1)):
        fast.expert_gemm = path
        reads.clear()
        fast(x)
        assert len(reads) == n, (path, reads)


@pytest.mark.slow
def test_moe_compiles_whole_and_equals_reference():
    """With its counts on the device and one grouped GEMM per projection (bf16 autocast, as on a GPU), torch.compile
    takes the whole installed MoE layer in one graph (fullgraph: a graph break would raise), and it computes what
    the reference does, forward and backward, with empty experts."""
    moe, fast = moe_pair(seq_aux_alpha=0.01)
    x = torch.randn(2, 9, D)
    ref, got = moe_run(moe, x, torch.bfloat16), moe_run(torch.compile(fast, fullgraph=True), x, torch.bfloat16)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, atol=3e-2, rtol=3e-2)


def test_dense_ablation_has_no_moe():
    m = ds.Transformer(tiny(n_routed_experts=0, attn="mha", n_mtp=0))
    assert not m.gates() and all(isinstance(b.ffn, ds.MLP) for b in m.layers)
    assert all(isinstance(b.attn, ds.MHA) for b in m.layers)
    assert m.num_params(active=True) == m.num_params()


# ----------------------------------------------------------------------------- balancing

def test_sequence_balance_loss():
    alpha, E, T = 1e-4, 4, 4
    uniform = torch.full((1, T, E), 0.3)
    balanced = torch.tensor([[[0, 1], [2, 3], [0, 1], [2, 3]]])
    assert ds.sequence_balance_loss(uniform, balanced, alpha).item() == pytest.approx(alpha)   # eq. 20 identity
    skewed = torch.tensor([[[0.9, 0.8, 0.1, 0.1]] * T])
    onesided = torch.tensor([[[0, 1]] * T])
    assert ds.sequence_balance_loss(skewed, onesided, alpha).item() > 1.5 * alpha


def test_balance_loss_in_training_loss():
    """The training loss carries the balance loss of every MoE layer (summed), with its gradient."""
    m = model(n_mtp=0, seq_aux_alpha=0.01).train()
    idx = torch.randint(0, V, (2, 16))
    _, losses = m(idx, idx)
    h, direct = m.embed(idx), 0.0
    for layer in m.layers:
        if isinstance(layer.ffn, ds.MoE):
            x = layer.attn_norm(h)
            x = h + layer.attn(x, *m.positions(None, 16)[:2])
            scores, _, ids = layer.ffn.gate(layer.ffn_norm(x).view(-1, D))
            direct = direct + ds.sequence_balance_loss(scores.view(2, 16, -1), ids.view(2, 16, -1), 0.01)
        h = layer(h, *m.positions(None, 16)[:2])
    torch.testing.assert_close(losses["balance"], direct)
    assert losses["balance"].requires_grad
    m.eval()
    assert m(idx, idx)[1]["balance"] == 0


def imbalanced_stream(gamma, steps=60):
    """Start every token on experts 0 and 1 (a large bias), then only run the bias update."""
    m = model(n_mtp=0, bias_update_speed=gamma, seq_aux_alpha=0.0, n_expert_groups=1, n_limited_groups=1).train()
    for g in m.gates():
        g.bias.zero_()
        g.bias[:2] = 0.05
    gen = torch.Generator().manual_seed(0)
    vio = []
    for _ in range(steps):
        with torch.no_grad():
            m(torch.randint(0, V, (4, 32), generator=gen))
        vio.append(m.update_expert_bias())
    return torch.stack(vio)


def test_bias_balancing_reduces_maxvio():
    on, off = imbalanced_stream(0.01), imbalanced_stream(0.0)
    assert on[0].min() > 2.0 and off[0].min() > 2.0                # most tokens start on 2 of 8 experts
    assert on[-10:].mean() < 0.5 * on[0].mean()
    assert off[-10:].mean() > 0.9 * off[0].mean()


def test_bias_update_rule_and_counting():
    m = model(bias_update_speed=0.5)
    g = m.gates()[0]
    g.bias.zero_()
    g.load.copy_(torch.tensor([4., 0., 2., 2., 2., 2., 2., 2.]))    # mean 2: 0 overloaded, 1 underloaded
    for other in m.gates()[1:]:
        other.load.fill_(1.0)
    vio = m.update_expert_bias()
    assert g.bias.tolist() == [-0.5, 0.5, 0, 0, 0, 0, 0, 0]
    assert vio[0].item() == pytest.approx(1.0) and (g.load == 0).all()
    idx = torch.randint(0, V, (2, 8))
    m.eval()
    with torch.no_grad():
        m(idx)
        m(idx, start_pos=0)
    assert all((x.load == 0).all() for x in m.gates())               # eval forwards do not count
    m.train()
    m(idx, idx)
    assert all(x.load.sum() == 2 * 8 * 2 for x in m.gates()[:-1])    # B * T * k per forward
    assert m.gates()[-1].load.sum() == 2 * 7 * 2                      # the MTP block sees T - 1 positions


def test_bias_is_buffer_without_gradient():
    m = model()
    names = {n for n, _ in m.named_parameters()}
    assert not any(n.endswith("gate.bias") for n in names)
    assert "layers.1.ffn.gate.bias" in m.state_dict() and "layers.1.ffn.gate.load" not in m.state_dict()
    idx = torch.randint(0, V, (2, 12))
    m.train()(idx, idx)[1]["total"].backward()
    assert all(g.bias.grad is None and not g.bias.requires_grad and g.bias.dtype == torch.float32 for g in m.gates())


# ----------------------------------------------------------------------------- MTP

def test_mtp_targets_follow_eq_21_to_24():
    """Depth k at position i sees h^{k-1}_i and Emb(t_{i+k}) and is scored on t_{i+k+1}."""
    m = model(n_mtp=2).eval()
    seq = torch.randint(0, V, (2, 17))                       # t_0 .. t_16
    idx, targets = seq[:, :-1], seq[:, 1:]
    mtp = m(idx, targets)[1]["mtp"]
    T = idx.size(1)
    cos, sin = ds.precompute_rope(m.args)
    h = m.hidden(idx)
    losses = []
    for k, mod in enumerate(m.mtp, 1):
        n = T - k
        emb = m.embed(seq[:, k:k + n])                        # t_{i+k} for i = 0 .. n-1
        h = mod(h[:, :n], emb, cos[:n], sin[:n])
        logits = m.head(mod.norm(h))
        losses.append(F.cross_entropy(logits.flatten(0, 1), seq[:, k + 1:k + 1 + n].flatten()))   # t_{i+k+1}
    torch.testing.assert_close(mtp, torch.stack(losses).mean())


def test_mtp_shares_embedding_and_head():
    m = model(n_mtp=1)
    own = {n for n, _ in m.mtp.named_parameters()}
    assert not any("embed" in n or n.startswith("head") for n in own)
    assert {"0.eh_proj.weight", "0.hnorm.weight", "0.enorm.weight", "0.norm.weight"} <= own
    assert m.mtp[0].eh_proj.in_features == 2 * m.args.dim


def test_loss_parts():
    m = model(mtp_lambda=0.3).train()
    idx = torch.randint(0, V, (2, 16))
    p = m(idx, idx)[1]
    torch.testing.assert_close(p["total"], p["main"] + 0.3 * p["mtp"] + p["balance"])
    torch.manual_seed(0)
    q = m(idx, idx, mtp_lambda=0.1)[1]                  # a schedule passes its weight; the config stays
    torch.testing.assert_close(q["total"], q["main"] + 0.1 * q["mtp"] + q["balance"])
    assert m.args.mtp_lambda == 0.3


# ----------------------------------------------------------------------------- model

def test_gradients_reach_every_learning_parameter():
    m = model(n_mtp=1).train()
    idx = torch.randint(0, V, (4, 16))
    m(idx, idx)[1]["total"].backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for moe in (x for x in m.modules() if isinstance(x, ds.MoE)):
        got = moe.experts.w1.grad.flatten(1).abs().sum(1) > 0            # exactly the routed experts learn
        assert torch.equal(got, moe.gate.load > 0)


@pytest.mark.slow
def test_overfits_one_batch():
    torch.manual_seed(0)
    m = ds.Transformer(tiny(n_layers=2, max_seq_len=16)).train()
    idx = torch.randint(0, V, (2, 16))
    losses = fit(m, lambda step: (idx[:, :-1], idx[:, 1:]), 200)
    assert losses["main"] < 0.05 and losses["mtp"] < 0.5


def test_num_params_active():
    m = model()
    a = m.args
    expert = 3 * a.dim * a.moe_inter_dim
    n_moe = a.n_layers - a.n_dense_layers
    assert m.num_params() - m.num_params(active=True) == n_moe * (a.n_routed_experts - a.n_activated_experts) * expert
    assert m.num_params(mtp=True) - m.num_params() == sum(p.numel() for p in m.mtp.parameters())


def test_context_overflow_is_an_error():
    m = model().eval()
    with pytest.raises(ValueError, match="exceed max_seq_len"):
        m(torch.zeros(1, 33, dtype=torch.long))


# ----------------------------------------------------------------------------- generation

def test_generate_greedy_matches_recompute():
    m = model().double().eval()
    idx = torch.randint(0, V, (2, 5))
    out = m.generate(idx, 12, temperature=0)
    ref = idx
    for _ in range(12):
        ref = torch.cat([ref, m(ref)[0][:, -1:].argmax(-1)], 1)
    assert torch.equal(out, ref)


def windowed_greedy(m, idx, n):
    """Greedy decoding by recomputation under generate's window rule: a token is predicted from every token
    since the window's start, which is the last max_seq_len tokens of the prompt; once a new token would make
    the window hold more than max_seq_len, it restarts at the last max_seq_len // 2."""
    S, out = m.args.max_seq_len, idx
    start = max(0, idx.size(1) - S)
    for _ in range(n):
        out = torch.cat([out, m(out[:, start:])[0][:, -1:].argmax(-1)], 1)
        if out.size(1) - start > S:
            start = out.size(1) - S // 2
    return out


@pytest.mark.parametrize("impl", ["absorb", "naive"])
@pytest.mark.parametrize("prompt", [8, 11] + [pytest.param(n, marks=pytest.mark.slow) for n in (3, 7)])
def test_generate_sliding_window_keeps_max_seq_len_tokens(impl, prompt):
    """Cached decoding past the context predicts each token from exactly the window's tokens, up to max_seq_len
    of them (not one fewer): a prompt longer than the context keeps its last max_seq_len tokens, and a full
    window slides to its last half. Recomputing from one token fewer or more gives other tokens."""
    m = model(max_seq_len=8, n_mtp=0).double().eval()
    m.set_attn_impl(impl)
    for seed in range(3):
        idx = torch.randint(0, V, (1, prompt), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(m.generate(idx, 20, temperature=0), windowed_greedy(m, idx, 20))
    # the rule can tell: from a full window, the prediction from max_seq_len - 1 tokens differs for some prompt
    full = torch.randint(0, V, (8, 8), generator=torch.Generator().manual_seed(9))
    assert not torch.equal(m(full)[0][:, -1].argmax(-1), m(full[:, 1:])[0][:, -1].argmax(-1))


def test_generate_absorb_equals_naive():
    m = model().double().eval()
    idx = torch.randint(0, V, (1, 4))
    absorb = m.generate(idx, 40, 0)
    m.set_attn_impl("naive")
    assert torch.equal(absorb, m.generate(idx, 40, 0))   # slides past max_seq_len


def test_probs_top_k_and_greedy():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [4.0, 3.0, 2.0, 5.0]])
    assert torch.equal(ds.sample(logits, 0), torch.tensor([[1], [3]]))
    p = ds.probs(logits, 1.0, top_k=2)
    assert p[0, 0] == 0 and p[0, 3] == 0 and p[1, 1] == 0 and p[1, 2] == 0
    torch.testing.assert_close(p.sum(-1), torch.ones(2))
    torch.testing.assert_close(p[0, 1] / p[0, 2], torch.tensor(math.e))
    torch.manual_seed(0)
    draws = ds.sample(logits, 0.5, top_k=2)
    assert draws.shape == (2, 1) and draws[0, 0] in (1, 2) and draws[1, 0] in (0, 3)


def test_speculative_greedy_equals_plain_greedy(pattern_model):
    m = pattern_model
    drafted = accepted = 0
    for prompt, n in [([3, 1, 4], 30), ([7, 7, 7, 0], 9), ([5], 50), ([2, 6, 5, 3, 5, 8], 1), ([11, 0, 13], 20)]:
        idx = torch.tensor([prompt])
        plain = m.generate(idx, n, temperature=0)
        spec, stats = speculative.generate_speculative(m, idx, n, temperature=0)
        assert torch.equal(plain, spec), prompt
        drafted, accepted = drafted + stats["drafted"], accepted + stats["accepted"]
    assert 0 < accepted < drafted                                   # both acceptances and rejections happened


def test_yarn_model_decodes_past_its_original_context(pattern_model):
    """The pattern model (trained on 16 tokens, context 24) extended with YaRN to 64: the caches give the full
    forward's logits past 16 and 24, greedy decoding runs to 64 without sliding (it equals recomputing the whole
    sequence each step), and speculative decoding gives the same tokens."""
    args = dict(pattern_model.args.__dict__, max_seq_len=64, original_seq_len=16, rope_factor=4.0)
    m = ds.Transformer(ds.ModelArgs(**args)).double().eval()
    m.load_state_dict(pattern_model.state_dict())
    idx = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 3, 1, 4, 1, 5, 9] * 3])
    with torch.no_grad():
        full = m(idx)[0]
        for impl in ("absorb", "naive"):
            m.set_attn_impl(impl)
            parts = [m(idx[:, :10], start_pos=0)[0], m(idx[:, 10:30], start_pos=10)[0]]
            parts += [m(idx[:, t:t + 1], start_pos=t)[0] for t in range(30, 60)]
            torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-5)     # RoPE runs in fp32
    prompt = idx[:, :5]
    plain = m.generate(prompt, 59, temperature=0)
    ref = prompt
    for _ in range(59):
        ref = torch.cat([ref, m(ref)[0][:, -1:].argmax(-1)], 1)
    spec, stats = speculative.generate_speculative(m, prompt, 59, temperature=0)
    assert plain.size(1) == 64 and torch.equal(plain, ref) and torch.equal(spec, plain) and stats["accepted"] > 0


def test_verify_draft_is_lossless():
    """Draft d ~ q, then the rule: the kept token is distributed as p, whatever q is."""
    torch.manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    for q in [torch.tensor([0.05, 0.05, 0.3, 0.3, 0.3]), p.clone(), torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0])]:
        N = 200_000
        d = torch.multinomial(q, N, replacement=True)
        ok, tok = speculative.verify_draft(p.expand(N, -1), q.expand(N, -1), d)
        freq = torch.bincount(tok, minlength=5).float() / N
        assert (freq - p).abs().max() < 0.005
        expected_accept = torch.minimum(p, q).sum()                 # P(accept) = sum_x min(p, q)
        assert ok.float().mean().item() == pytest.approx(expected_accept.item(), abs=0.005)


@pytest.mark.slow
def test_speculative_sampling_matches_main_distribution(pattern_model):
    """The first two tokens of a sampled speculative run (a verified draft, then the token drawn after
    it or after its replacement) follow the main model's joint distribution."""
    m = pattern_model
    idx = torch.tensor([[3, 1, 4, 1]])
    with torch.no_grad():
        ctx = m(idx)[0][0, -1]
    p1 = ds.probs(ctx, 1.0)
    # the second new token: main's distribution after appending each possible first token
    draws = 3000
    torch.manual_seed(1)
    pairs = torch.stack([speculative.generate_speculative(m, idx, 2, temperature=1.0)[0][0, -2:] for _ in range(draws)])
    joint = torch.zeros(16, 16)
    for a in range(16):
        with torch.no_grad():
            joint[a] = p1[a] * ds.probs(m(torch.cat([idx, torch.tensor([[a]])], 1))[0][0, -1], 1.0)
    emp = torch.zeros(16, 16).index_put_((pairs[:, 0], pairs[:, 1]), torch.ones(draws), accumulate=True) / draws
    assert (emp - joint).abs().max() < 0.04


# ----------------------------------------------------------------------------- kernels
# The Triton gate and dispatch against their references; without a GPU in the Triton interpreter.

needs_triton = pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton not installed")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def check_route(s, bias, k, G=1, KG=1, f="sigmoid"):
    """The kernel's choice on the affinities s equals eq. 16 written out with ties to the lower index, in order;
    deepseek.Gate.route (torch.topk) chooses the same experts where no two scores tie, and a choice the equations
    allow where they do."""
    ids = kernels.route_triton(s, bias, k, G, KG, f)
    assert ids.dtype == torch.int32 and ids.shape == (s.shape[0], k)
    assert torch.equal(ids.long().cpu(), direct_route(s.cpu(), bias.cpu(), k, G, KG, f))
    ref = gate(s.size(1), k, G, KG, f, bias=bias.cpu()).route(s.cpu().float())
    assert is_top_k(s.cpu(), bias.cpu(), ref, k, G, KG, f)
    return ids


def check_dispatch(ids, E):
    """dispatch_triton equals the sort it stands for: counts per expert, and the pairs in a stable sort by expert;
    so does dispatch, whichever it runs here."""
    flat = ids.flatten().long()
    want = (flat.bincount(minlength=E), torch.argsort(flat, stable=True))
    for out in (kernels.dispatch_triton(ids, E), kernels.dispatch(ids, E)):
        for a, b in zip(out, want, strict=True):
            assert a.dtype == torch.int64 and torch.equal(a, b)
    return want


# ----------------------------------------------------------------------------- kernels: gate

# (T, E, k, n_groups, topk_groups, score_func); T=37 and 100 are not multiples of any block
ROUTE_CASES = [
    (1, 8, 1, 1, 1, "sigmoid"),
    (1, 256, 8, 8, 4, "sigmoid"),
    (37, 8, 2, 1, 1, "softmax"),
    (37, 16, 2, 4, 2, "sigmoid"),       # the nano shape
    (37, 16, 2, 4, 2, "softmax"),
    (100, 64, 6, 1, 1, "softmax"),       # V2-Lite
    (100, 64, 6, 8, 3, "sigmoid"),
    (37, 256, 8, 8, 4, "sigmoid"),       # V3
    (37, 256, 8, 1, 1, "softmax"),
    (37, 96, 6, 4, 2, "sigmoid"),        # E not a power of two
    (37, 96, 5, 4, 1, "softmax"),        # odd k, one group kept
    (20, 8, 2, 8, 4, "sigmoid"),         # groups of one expert
    (20, 48, 3, 3, 2, "sigmoid"),        # 3 groups of 16
]


def scores(logits, f):
    return logits.sigmoid() if f == "sigmoid" else logits.softmax(-1)


@needs_triton
@pytest.mark.parametrize("T,E,k,G,KG,f", ROUTE_CASES)
def test_route_matches_ref(T, E, k, G, KG, f):
    g = torch.Generator().manual_seed(T * 1000 + E + k)
    s = scores(torch.randn(T, E, generator=g), f).to(DEV)
    bias = (0.1 * torch.randn(E, generator=g)).to(DEV)
    ids = check_route(s, bias, k, G, KG, f)
    ref = gate(E, k, G, KG, f, bias=bias.cpu()).route(s.cpu())
    assert torch.equal(ids.long().cpu(), ref)                                 # no ties: the reference's own choice


@needs_triton
def test_route_bf16_and_strided():
    check_route(torch.rand(64, 40, device=DEV).to(torch.bfloat16), torch.zeros(40, device=DEV), 4, 4, 2)
    check_route(torch.rand(64, 33, device=DEV).t(), torch.randn(64, device=DEV), 6, 8, 4)  # (33, 64), strides (1, 33)


@needs_triton
@pytest.mark.parametrize("f", ["sigmoid", "softmax"])
def test_route_ties(f):
    """Exactly equal scores: the kernel takes the lower expert (and group) index, the reference one of them."""
    g = torch.Generator().manual_seed(1)
    few = scores(torch.randint(0, 3, (50, 64), generator=g) / 2.0, f).to(DEV)  # lots of exact ties
    for bias in (torch.zeros(64, device=DEV), torch.randint(0, 2, (64,), generator=g).float().to(DEV) / 4):
        check_route(few, bias, 6, 8, 3, f)
        check_route(few, bias, 6, 1, 1, f)
    same = torch.full((9, 96), 0.5, device=DEV)                           # all equal: lowest groups, lowest experts
    ids = check_route(same, torch.zeros(96, device=DEV), 8, 4, 2, f)
    assert torch.equal(ids[0].cpu(), torch.arange(8, dtype=torch.int32))


@needs_triton
def test_route_bias_only_selects():
    s = torch.full((4, 16), 0.01, device=DEV)
    s[:, 0] = 0.8                                                          # expert 0 is the best unbiased
    bias = torch.zeros(16, device=DEV)
    bias[5] = 10.0                                                        # expert 5 wins with bias
    assert (check_route(s, bias, 1, 1, 1, "softmax") == 5).all()


@needs_triton
@pytest.mark.slow
def test_route_random():
    g = torch.Generator().manual_seed(1234)
    for _ in range(25):
        G = [1, 2, 4, 8][torch.randint(0, 4, (1,), generator=g).item()]
        S = torch.randint(1, 33, (1,), generator=g).item()
        E = G * S
        KG = torch.randint(1, G + 1, (1,), generator=g).item()
        k = torch.randint(1, min(9, (KG * S if G > 1 else E)) + 1, (1,), generator=g).item()
        T = torch.randint(1, 60, (1,), generator=g).item()
        f = ["sigmoid", "softmax"][torch.randint(0, 2, (1,), generator=g).item()]
        s = scores(3 * torch.randn(T, E, generator=g), f).to(DEV)
        bias = (0.3 * torch.randn(E, generator=g)).to(DEV)
        check_route(s, bias, k, G, KG, f)


@needs_triton
@pytest.mark.parametrize("f", ["sigmoid", "softmax"])
@pytest.mark.parametrize("E,k,G,KG", [(16, 4, 1, 1), (16, 4, 4, 2), (256, 8, 8, 4), (8, 2, 8, 4)])
def test_route_nonfinite_scores(E, k, G, KG, f):
    """NaN / +-inf scores (whole rows, single entries) give the kernel's k distinct ids in [0, E) within KG groups,
    and a valid dispatch; rows of finite scores are chosen as eq. 16 says."""
    nan, inf = float("nan"), float("inf")
    g = torch.Generator().manual_seed(E + k)
    x = scores(torch.randn(10, E, generator=g), f)
    for row, (cols, v) in enumerate([(slice(None), nan), (1, nan), (slice(None), inf), (2, inf),
                                     (slice(None), -inf), (3, -inf)]):
        x[row, cols] = v
    x[6, :3] = torch.tensor([nan, inf, -inf])
    bias = 0.1 * torch.randn(E, generator=g)
    ids = kernels.route_triton(x.to(DEV), bias.to(DEV), k, G, KG, f).cpu()
    assert ids.min() >= 0 and ids.max() < E and (ids.sort(1)[0].diff(1) > 0).all()
    assert (torch.zeros(10, G).scatter_(1, ids.long() // (E // G), 1).sum(1) <= KG).all()
    check_dispatch(ids.to(DEV), E)
    finite = x.isfinite().all(1)
    assert finite.sum() == 3 and torch.equal(ids[finite].long(), direct_route(x[finite], bias, k, G, KG, f))


@needs_triton
def test_gate_block_from_expert_shape_only(monkeypatch):
    """BLOCK_T (a constexpr) comes from the expert shape, never T: a new length compiles nothing."""
    launches, wrap = [], torch.library.wrap_triton

    class Recorded:                                  # wrap_triton(kernel)[grid](*args, **constexprs), recorded
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *a, **kw: launches.append((grid, kw)) or wrap(self.kernel)[grid](*a, **kw)
    monkeypatch.setattr(torch.library, "wrap_triton", Recorded)
    lengths = (1, 2, 37, 200)
    for T in lengths:
        kernels.route_triton(torch.rand(T, 16, device=DEV), torch.zeros(16, device=DEV), 4, 4, 2)
    assert all(kw == launches[0][1] for _, kw in launches)
    BT = kernels.GATE_TILE // 16
    assert launches[0][1]["BLOCK_T"] == BT and [grid for grid, _ in launches] == [(-(-T // BT),) for T in lengths]


# ----------------------------------------------------------------------------- kernels: dispatch

@needs_triton
@pytest.mark.parametrize("T,k,E", [(1, 1, 8), (1, 8, 256), (37, 2, 16), (100, 6, 64), (300, 8, 256), (129, 6, 96)])
def test_dispatch_matches_ref(T, k, E):
    g = torch.Generator().manual_seed(T + k + E)
    check_dispatch(torch.randint(0, E, (T, k), generator=g, dtype=torch.int32).to(DEV), E)


@needs_triton
def test_dispatch_edge_cases():
    ids = torch.randint(0, 16, (200, 2), dtype=torch.int32, device=DEV)
    ids[ids == 3] = 4                                                     # expert 3 gets no token
    counts = check_dispatch(ids, 16)[0]
    assert counts[3] == 0
    check_dispatch(torch.full((257, 2), 5, dtype=torch.int32, device=DEV), 16)  # all to one expert
    check_dispatch(torch.full((50, 1), 95, device=DEV), 96)                  # int64 ids, last expert
    check_dispatch(torch.zeros(0, 4, dtype=torch.int32, device=DEV), 8)      # no tokens


@needs_triton
def test_dispatch_clamps_bad_ids():
    """Ids outside [0, E) never index outside the buffers: they count as the nearest expert."""
    ids = torch.randint(0, 16, (300, 2), dtype=torch.int32)
    ids[::7, 0], ids[::11, 1], ids[3] = -5, 16, torch.tensor([2**31 - 1, -2**31], dtype=torch.int32)
    out = kernels.dispatch_triton(ids.to(DEV), 16)
    clamped = ids.clamp(0, 15).flatten().long()
    assert torch.equal(out[0].cpu(), clamped.bincount(minlength=16))
    assert torch.equal(out[1].cpu(), clamped.argsort(stable=True))


@needs_triton
@pytest.mark.slow
def test_route_then_dispatch_deterministic():
    s = torch.rand(77, 256, device=DEV)
    bias = 0.1 * torch.randn(256, device=DEV)
    a = kernels.route_triton(s, bias, 8, 8, 4, "sigmoid")
    b = kernels.route_triton(s, bias, 8, 8, 4, "sigmoid")
    assert torch.equal(a, b)                                              # bit-identical
    d1, d2 = check_dispatch(a, 256), kernels.dispatch_triton(a, 256)
    assert all(torch.equal(x, y) for x, y in zip(d1, d2))


@pytest.mark.slow
def test_kernels_only_on_cuda_and_model_runs_without_triton():
    assert not kernels.enabled(torch.zeros(1))                             # CPU tensors: the references
    code = ("import sys; sys.modules['triton'] = None; import kernels, deepseek, torch; "
            "assert not kernels.HAS_TRITON and not kernels.enabled(torch.zeros(1)); "
            "m = kernels.install(deepseek.Transformer(deepseek.ModelArgs(vocab_size=10, dim=32, n_layers=2))); "
            "m(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1]['total'].backward()")
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=here)


def test_triton_fallback_decision(monkeypatch, capsys):
    """The kernels on a CUDA GPU from MIN_CC with triton; else the references after one line."""
    assert kernels.fallback_reason(True, (7, 0)) == kernels.fallback_reason(True, (9, 0)) == ""
    assert kernels.fallback_reason(True, (6, 1)) == "compute capability 6.1 is below 7.0"
    assert kernels.fallback_reason(False, (9, 0)) == "triton is not installed"
    on = lambda i: types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", i))   # noqa: E731
    kernels._runs_on.cache_clear()
    monkeypatch.setattr(kernels, "HAS_TRITON", True)          # the same decisions with or without triton here
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (6, 1))
    assert not kernels.enabled(on(99)) and not kernels.enabled(on(99))
    err = capsys.readouterr().err                                           # one line, once
    assert err == "warning: compute capability 6.1 is below 7.0: the MoE routing falls back to PyTorch\n"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (8, 0))
    assert kernels.enabled(on(98))
    monkeypatch.setattr(kernels, "HAS_TRITON", False)
    assert not kernels.enabled(on(97))
    assert capsys.readouterr().err == "warning: triton is not installed: the MoE routing falls back to PyTorch\n"
    kernels._runs_on.cache_clear()


@needs_triton
@pytest.mark.slow
def test_kernels_compile_for_cuda(monkeypatch, capsys):
    """Every kernel, as launched at the V3 and preset gate shapes, compiles to PTX and a cubin for each
    CUDA target from MIN_CC (no GPU: the bundled ptxas), without spills; the gate keeps >= 1/4 occupancy."""
    bk = bench_kernels
    rows = bk.compile_kernels()
    names, shapes = ("_route_kernel", "_count_kernel", "_scatter_kernel"), [s for s, _ in bk.gate_shapes()]
    launched = [(n, s) for n in names for s in shapes] + [(n, "V3, E + 1") for n in names[1:]]   # + expert parallel
    assert sorted((r["kernel"], r["shape"], r["cc"]) for r in rows) == sorted((*ns, cc) for ns in launched for cc in bk.CCS)
    assert min(bk.CCS) == 10 * kernels.MIN_CC[0] + kernels.MIN_CC[1]
    for r in rows:
        assert r["target"].startswith(f"sm_{r['cc']}") and r["cubin"] > 0 and r["spills"] == 0
        assert r["kernel"] != "_route_kernel" or bk.occupancy(r["regs"], r["warps"], r["cc"]) >= 0.25
    monkeypatch.setattr(bk, "compile_kernels", lambda ccs: [r for r in rows if r["cc"] in ccs])
    bench.main(["--parts=kernels"])
    table = capsys.readouterr().out.splitlines()
    assert len([line for line in table if line.startswith("| _")]) == len(launched)


@needs_triton
def test_moe_layer_same_through_triton(monkeypatch):
    """A whole MoE layer, forward and backward, through the Triton gate and dispatch equals the reference."""
    moe, fast = moe_pair(empty=False, seq_aux_alpha=0.01)
    monkeypatch.setattr(kernels, "enabled", lambda t: True)
    x = torch.randn(2, 13, D)
    for a, b in zip(moe_run(moe, x, torch.float32), moe_run(fast, x, torch.float32)):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- FP8 (report §3.3)

def ref_quantize(x, tm, tk):
    """The definition, tile by tile: scale = max|tile| / 448 (1 for an all-zero tile), q = E4M3(x / scale)."""
    M, K = x.shape
    q, s = torch.empty(M, K, dtype=torch.float8_e4m3fn), torch.empty(-(-M // tm), -(-K // tk))
    for i in range(0, M, tm):
        for j in range(0, K, tk):
            t = x[i:i + tm, j:j + tk]
            a = t.abs().max()
            s[i // tm, j // tk] = sc = a / 448 if a > 0 else torch.tensor(1.0)
            q[i:i + tm, j:j + tk] = (t / sc).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, s


def fp8_error(x, tm, tk):
    """Bound on |x - dequantize(quantize(x))| per element: E4M3 keeps 3 mantissa bits, so rounding to nearest
    errs by at most 2^-4 |x| on normal values; below 2^-6 (subnormal) the spacing is 2^-9, so at most 2^-10,
    in units of the tile's scale."""
    s = ref_quantize(x, tm, tk)[1].repeat_interleave(tm, 0)[:x.size(0)].repeat_interleave(tk, 1)[:, :x.size(1)]
    return 2 ** -4 * x.abs() + 2 ** -10 * s


def gemm_bound(a, ea, b, eb):
    """|A^ B^^T - A B^T| for |A^ - A| <= ea, |B^ - B| <= eb, plus fp32 rounding of the sums."""
    A, B = a.abs(), b.abs()
    return ea @ B.T + A @ eb.T + ea @ eb.T + 1e-5 * A @ B.T


def uneven(M, K, seed=0):
    """Rows and 128-wide column blocks of very different sizes, so a scale shared across tiles would
    flush the small ones to zero and break the bounds below."""
    torch.manual_seed(seed)
    cols = torch.logspace(2, -2, -(-K // 128)).repeat_interleave(128)[:K]
    return torch.randn(M, K) * torch.logspace(-2, 2, M)[:, None] * cols


@pytest.mark.parametrize("M,K", [(5, 300), (130, 256), (1, 1), (200, 129)])
@pytest.mark.parametrize("tiles", ["1x128", "128x128", "128x1"])
def test_fp8_quantize_matches_definition(M, K, tiles):
    x = uneven(M, K)
    x[:min(M, 128), :128] = 0                                       # an all-zero tile
    x[-1, -1], x[0, -1] = 3e30, 1e-30                              # huge and tiny values
    if M > 2:
        x[1] *= 1e-30                                               # a row of tiny tiles
    tm, tk = dict(zip(["1x128", "128x128", "128x1"], [(1, 128), (128, 128), (128, 1)]))[tiles]
    q, s = ref_quantize(x, tm, tk)
    if tiles == "128x1":                                           # per channel per 128 tokens: 1x128 of x^T
        got_q, got_s = (t.t() for t in fp8.quantize(x.t()))
        back = fp8.dequantize(got_q.t(), got_s.t()).t()
    else:
        got_q, got_s = fp8.quantize(x, tm)
        back = fp8.dequantize(got_q, got_s, tm)
    assert torch.equal(got_s, s) and torch.equal(got_q.view(torch.uint8), q.view(torch.uint8))
    assert back.isfinite().all() and not (back[x == 0] != 0).any()
    assert ((back - x).abs() <= fp8_error(x, tm, tk)).all()
    assert x.numel() == 1 or ((back - x).abs() > 2 ** -5 * x.abs()).any()    # a 3-bit, not a wider, mantissa


def check_fp8_gemm(got, a, b, b_rows, ref, bound):
    """got: an FP8 GEMM of A (M, K) in 1x128 tiles and B (N, K) in b_rows x 128 tiles. It must be the product
    of the dequantized operands up to fp32 rounding, and within bound of the exact product ref."""
    da, db = fp8.dequantize(*fp8.quantize(a)), fp8.dequantize(*fp8.quantize(b, b_rows), b_rows)
    assert ((got - da @ db.T).abs() <= 1e-5 * da.abs() @ db.abs().T).all()
    assert ((got - ref).abs() <= bound).all()


ROWWISE = (("rowwise", torch.float32),)         # fp8 ops: torch._scaled_mm per chunk (it runs on a CPU); () emulates


@pytest.mark.parametrize("ops", [ROWWISE, ()])
def test_fp8_three_gemms_within_bound(ops):
    """Fprop x W^T, Dgrad dy W and Wgrad dy^T x against the fp32 products, each within the bound that the
    operands' own tile errors give."""
    T, n_in, n_out = 150, 300, 200
    x, w, dy = uneven(T, n_in, 0), uneven(n_out, n_in, 1) / 20, uneven(T, n_out, 2)
    cases = [(x, w, (128, 128)),                                   # Fprop: inner = in
             (dy, w.T, (128, 128)),                                # Dgrad: inner = out
             (dy.T, x.T, (1, 128))]                                # Wgrad: inner = tokens, 128x1 tiles of dy and x
    for a, b, (mb, kb) in cases:
        got = fp8.gemm(fp8.quantize(a), fp8.quantize(b, mb), mb, ops)
        check_fp8_gemm(got, a, b, mb, a @ b.T, gemm_bound(a, fp8_error(a, 1, 128), b, fp8_error(b, mb, kb)))


def blockwise_reference(a, b, scale_a, recipe_a, scale_b, recipe_b, output_dtype):
    """F.scaled_mm's block-wise recipes as PyTorch defines them (a (M, K) row-major, b (K, N) column-major): A's scale
    per row and 128 columns; B's per 128 rows and column (1x128) or per 128 x 128 block, read through their strides."""
    assert recipe_a == ScalingType.BlockWise1x128 and a.stride(1) == 1 and b.stride(0) == 1
    k = torch.arange(a.size(1)) // 128
    A = a.float() * scale_a[:, k]
    B = b.float() * (scale_b[:, k].t() if recipe_b == ScalingType.BlockWise1x128 else
                     scale_b[k][:, torch.arange(b.size(1)) // 128])
    return (A @ B).to(output_dtype)


def test_fp8_gemm_paths_agree(monkeypatch):
    """One block-wise F.scaled_mm per GEMM (checked against its definition: a CPU cannot run it), torch._scaled_mm
    per 128-wide chunk and the emulation give the same product; bf16 output differs by bf16 rounding only."""
    monkeypatch.setattr(F, "scaled_mm", blockwise_reference)
    for M, N, K, b_rows in [(37, 256, 300, 128), (5, 16, 128, 128), (1, 7, 3, 128), (64, 128, 756, 1)]:
        a, b = fp8.quantize(uneven(M, K)), fp8.quantize(uneven(N, K, 1), b_rows)
        scale = fp8.dequantize(*a).abs() @ fp8.dequantize(*b, b_rows).abs().T
        outs = []
        for ops in [(), ROWWISE, (("rowwise", torch.bfloat16),), (("blockwise", torch.float32),),
                    (("blockwise", torch.bfloat16),)]:
            outs.append(fp8.gemm(a, b, b_rows, ops))
            assert outs[-1].dtype == torch.float32
            bf16 = ops and ops[0][1] == torch.bfloat16 and (ops[0][0] == "rowwise" or N % 128 == 0)
            assert ((outs[-1] - outs[0]).abs() <= (2 ** -8 if bf16 else 1e-6) * scale).all(), (M, N, K, ops)


def test_fp8_blockwise_call_passes_pytorch_cuda_checks():
    """The block-wise call's operands and scales, as laid out for Fprop (128x128 weight blocks), Dgrad and Wgrad
    (1x128 tiles of both; its inner dimension, 756 tokens, padded to whole tiles), pass PyTorch's own checks for a
    CUDA device (its meta function, which checks meta tensors as CUDA ones: no GPU needed); a row-major scale does not."""
    q = lambda m, k: torch.empty(m, k, dtype=fp8.FP8, device="meta")       # noqa: E731
    s = lambda m, k: torch.empty(m, -(-k // 128), device="meta")           # noqa: E731
    for M, N, K, b_rows in [(150, 256, 384, 128), (150, 384, 256, 128), (256, 384, 756, 1)]:
        out = fp8.blockwise_mm(q(M, K), s(M, K), q(N, K), s(-(-N // b_rows), K), b_rows, torch.float32)
        assert out.shape == (M, N)
    with pytest.raises(RuntimeError, match="blockwise"):
        F.scaled_mm(q(M, 768), q(N, 768).t(), s(M, 768), ScalingType.BlockWise1x128,    # scale_a row-major
                    s(N, 768).t().contiguous().t(), ScalingType.BlockWise1x128, output_dtype=torch.float32)


def test_fp8_chunk_operands_are_16_byte_aligned(monkeypatch):
    """Every chunk handed to torch._scaled_mm starts 16-byte aligned with 16-byte aligned rows, also where the inner
    dimension is a token count such as 756 (Wgrad), and is 128 wide."""
    real, seen = torch._scaled_mm, []

    def checked(a, b, **kw):
        seen.append(a.size(1))
        assert a.size(1) == 128 and a.stride(0) % 16 == 0 and b.stride(1) % 16 == 0
        assert a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0
        return real(a, b, **kw)
    monkeypatch.setattr(torch, "_scaled_mm", checked)
    fp8.gemm(fp8.quantize(uneven(256, 756)), fp8.quantize(uneven(384, 756, 1)), ops=ROWWISE)
    assert len(seen) == 6


def test_fp8_emulation_runs_without_tf32(monkeypatch):
    """The emulated GEMM multiplies in full fp32 even where train.py turned TF32 on for the rest, and restores it."""
    flags = []
    real = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: flags.append(torch.backends.cuda.matmul.allow_tf32)
                        or real(a, b))
    cuda = types.SimpleNamespace(type="cuda")                                 # the flag matters on CUDA only
    # allow_tf32 is a property of torch.backends.cuda.matmul: set and restored here, not by monkeypatch, whose
    # undo differs between pytest versions for such attributes (9.2 deletes it, which raises)
    tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, True
    try:
        with fp8.full_fp32(cuda):
            fp8.dequantize(*fp8.quantize(uneven(4, 8))) @ torch.ones(8, 2)
        assert flags == [False] and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def fake_scaled_mms(cc, cublas):
    """torch._scaled_mm and F.scaled_mm as PyTorch 2.13's CUDA code accepts them on compute capability cc with this
    cuBLAS (ScaledBlas.cpp): the block-wise recipe on 9.x with cuBLAS 12.9+; row-wise scales through cuBLAS (any
    output) on 9.x with 12.9+, else through CUTLASS (bf16 output, 8.9 and 9.x)."""
    real = torch._scaled_mm

    def scaled_mm(a, b, *args, output_dtype, **kw):
        if cc[0] != 9 or cublas < (12, 9):
            raise NotImplementedError("DeepSeek style (1x128, 128x128) scaling only supported in CUDA for SM90")
        return blockwise_reference(a, b, *args, output_dtype=output_dtype)

    def _scaled_mm(a, b, scale_a, scale_b, out_dtype):
        cublas_ok = cc[0] == 9 and cublas >= (12, 9)
        if not cublas_ok and (out_dtype != torch.bfloat16 or cc not in ((8, 9), (9, 0))):
            raise RuntimeError("f8f8bf16_rowwise: bf16 output on sm89 / sm90 only")
        return real(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    return scaled_mm, _scaled_mm


FP32, BF16 = torch.float32, torch.bfloat16


@pytest.mark.parametrize("cc,cublas,ops", [
    ((8, 0), (12, 9), ()), ((8, 6), (12, 9), ()), ((7, 5), (12, 9), ()),        # no FP8 tensor cores: emulated
    ((8, 9), (12, 9), (("rowwise", BF16),)),                                   # RTX 4090, L4, L40S
    ((9, 0), (12, 9), (("blockwise", FP32), ("rowwise", FP32))),             # H100 / H200, recent cuBLAS
    ((9, 0), (12, 4), (("rowwise", BF16),)),                                  # H100, older cuBLAS
    ((10, 0), (12, 9), ()), ((12, 0), (12, 9), ())])                           # B200, RTX 5090: what these rules give
def test_fp8_gemm_ops_found_per_gpu(cc, cublas, ops, monkeypatch):
    """gemm_ops tries the candidates for the device's compute capability, fastest first, and keeps for each op the
    first output dtype that runs: against PyTorch's acceptance rules mocked per GPU, it finds what they allow."""
    scaled_mm, _scaled_mm = fake_scaled_mms(cc, cublas)
    monkeypatch.setattr(F, "scaled_mm", scaled_mm)
    monkeypatch.setattr(torch, "_scaled_mm", _scaled_mm)
    candidates = fp8.candidates
    monkeypatch.setattr(fp8, "candidates", lambda device_type, capability: candidates("cuda", cc))
    fp8.gemm_ops.cache_clear()                                   # found anew for the mocked GPU
    try:
        assert fp8.gemm_ops(torch.device("cpu")) == ops
        text = fp8.describe("cpu")                               # what train.py logs and the bench prints
    finally:
        fp8.gemm_ops.cache_clear()
    assert text.count("tensor-core FP8") == len(ops) and text.endswith("emulated (dequantized operands, one fp32 "
                                                                        "matmul, TF32 off)")


def test_fp8_probe_rejects_a_wrong_product(monkeypatch):
    """An op that runs but reads its scales wrongly (the block order of A's reversed; A's rows' scales reversed)
    equals the right one on operands whose tiles all share one scale, and is found out by the probe's operands, whose
    magnitudes vary by row and block: gemm_ops keeps only what computes the emulation's product."""
    real = torch._scaled_mm
    monkeypatch.setattr(F, "scaled_mm", lambda a, b, sa, ra, sb, rb, output_dtype:
                        blockwise_reference(a, b, sa.flip(1), ra, sb, rb, output_dtype=output_dtype))
    monkeypatch.setattr(torch, "_scaled_mm", lambda a, b, scale_a, scale_b, out_dtype:
                        real(a, b, scale_a=scale_a.flip(0).contiguous(), scale_b=scale_b, out_dtype=out_dtype))
    candidates = fp8.candidates
    monkeypatch.setattr(fp8, "candidates", lambda device_type, capability: candidates("cuda", (9, 0)))
    fp8.gemm_ops.cache_clear()
    ones = torch.ones(128, 128)                                  # every tile's scale the same: the wrong ops pass
    for op in (fp8.blockwise_mm, fp8.chunked_mm):
        (qa, sa), (qb, sb) = fp8.quantize(ones), fp8.quantize(ones, 128)
        want = fp8.dequantize(qa, sa) @ fp8.dequantize(qb, sb, 128).T
        assert torch.equal(op(qa, sa, qb, sb, 128, torch.float32).float(), want)
    try:
        assert fp8.gemm_ops(torch.device("cpu")) == ()
    finally:
        fp8.gemm_ops.cache_clear()
    assert not fp8.probe("blockwise", torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("ops", [ROWWISE, ()])
@pytest.mark.parametrize("zero_stride", [False, True])
def test_fp8_linear_gradients_within_bound(ops, zero_stride):
    """The autograd function against fp32 autograd, with leading batch dims; the output gradient of a
    .sum() is a zero-stride expand. Wgrad sees x twice quantized: 1x128 (saved), then 128x1."""
    x, w = uneven(74, 300).view(2, 37, 300).requires_grad_(), (uneven(150, 300, 1) / 20).requires_grad_()
    y = fp8.linear(x, w, ops)
    assert [t.dtype for t in y.grad_fn.saved_tensors] == [torch.float8_e4m3fn, torch.float32] * 2   # FP8 + scales
    g = torch.ones(2, 37, 150) if zero_stride else uneven(74, 150, 2).view(2, 37, 150)
    (y.sum() if zero_stride else (y * g).sum()).backward()
    X, G, W = x.detach().flatten(0, 1), g.flatten(0, 1), w.detach()
    assert y.shape == (2, 37, 150) and x.grad.shape == x.shape
    eW = fp8_error(W, 128, 128)
    check_fp8_gemm(y.detach().flatten(0, 1), X, W, 128, X @ W.T, gemm_bound(X, fp8_error(X, 1, 128), W, eW))
    check_fp8_gemm(x.grad.flatten(0, 1), G, W.T, 128, G @ W, gemm_bound(G, fp8_error(G, 1, 128), W.T, eW.T))
    X1 = fp8.dequantize(*fp8.quantize(X))                           # what the backward holds
    eX = fp8_error(X, 1, 128) + fp8_error(X1, 128, 1)
    check_fp8_gemm(w.grad, G.T, X1.T, 1, G.T @ X, gemm_bound(G.T, fp8_error(G.T, 1, 128), X.T, eX.T))


def test_fp8_empty_input_gives_zero_gradient():
    """An expert that got no token: an empty batch runs and leaves a zero weight gradient."""
    x, w = torch.zeros(0, 300, requires_grad=True), torch.randn(150, 300, requires_grad=True)
    fp8.linear(x, w).sum().backward()
    assert x.grad.shape == (0, 300) and torch.equal(w.grad, torch.zeros(150, 300))


@pytest.mark.parametrize("attn", ["mla", "mha"])
def test_fp8_model_forward_backward(attn, monkeypatch):
    """fp8.convert: exactly the blocks' projections (attention, dense FFN, shared and routed experts) run
    through fp8.linear, not the embedding, head, gate or MTP's eh_proj; both GEMM paths give the same
    loss and gradients, and these stay close to fp32's (E4M3 errs by ~2^-4 per operand). The converted
    model keeps the plain one's state dict names."""
    ref, m8 = model(attn=attn).train(), fp8.convert(model(attn=attn)).train()
    assert m8.state_dict().keys() == ref.state_dict().keys()
    m8.load_state_dict(ref.state_dict())
    idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    ref(idx, idx)[1]["total"].backward()
    seen, run = set(), fp8.linear
    monkeypatch.setattr(fp8, "linear", lambda x, w, ops: seen.add(w.untyped_storage().data_ptr()) or run(x, w, ops))
    out = {}
    for path in (True, False):
        fp8.convert(m8, ROWWISE if path else ())
        m8.zero_grad()
        loss = m8(idx, idx)[1]["total"]
        loss.backward()
        out[path] = loss.detach(), {n: p.grad.clone() for n, p in m8.named_parameters()}
    high = ("embed", "head", "gate", "eh_proj", "norm")
    assert {n for n, p in m8.named_parameters() if p.untyped_storage().data_ptr() in seen} == \
           {n for n, p in m8.named_parameters() if not any(h in n for h in high)}
    (l1, g1), (l2, g2) = out[True], out[False]
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=0)
    assert abs(l1 - ref(idx, idx)[1]["total"]) < 1e-2 * l1
    for n, p in ref.named_parameters():
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-5 * g2[n].abs().max())
        assert F.cosine_similarity(g1[n].flatten(), p.grad.flatten(), dim=0) > 0.95, n


# ----------------------------------------------------------------------------- training

def torchrun(tmp_path, text_file, data_dir, out, *args, **kw):
    """train.py under torchrun, 2 processes, on the tiny preset (gloo on CPU); returns the log.jsonl entries."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", str(preset(tmp_path, **kw)), f"--text={text_file}", f"--data_dir={data_dir}",
                        f"--out_dir={tmp_path / out}", "--device=cpu", *args],
                       cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "identical on all" in r.stdout
    return [json.loads(line) for line in (tmp_path / out / "log.jsonl").read_text().splitlines()]


def entries(log, kind):
    return [e for e in log if e["kind"] == kind]


# ----------------------------------------------------------------------------- training: configuration

@pytest.mark.parametrize("command", [train, sample, sft, grpo, export, bench])
def test_help_lists_every_key_with_its_value(command, capsys):
    """Every command takes --key=value the same way, and --help prints its docstring and every key with the value
    it would take after what came before --help (here: a preset), then exits 0."""
    argv = ["config/shakespeare_char_cpu.py", "--help"] if command is train else ["--help"]
    with pytest.raises(SystemExit) as e:
        command.main(argv)
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(command.__doc__.strip()[:40])
    listed = [line[4:].partition("=") for line in out.splitlines() if line.startswith("  --")]
    listed = {k: ast.literal_eval(v) for k, _, v in listed}
    assert list(listed) == list(command.DEFAULTS)
    preset = dict(max_iters=2000, dim=128, batch_size=12, out_dir="out-shakespeare-char-cpu") if command is train else {}
    changed = configurator.parse_config(argv[:-1], command.DEFAULTS)[1]          # the keys the preset sets
    assert set(preset) <= changed and all(listed[k] == v for k, v in preset.items())
    assert {k: v for k, v in listed.items() if k not in changed} == \
           {k: v for k, v in command.DEFAULTS.items() if k not in changed}


def test_config_order_defaults_preset_overrides(tmp_path):
    p = tmp_path / "p.py"
    p.write_text("max_iters = 50\nlr_decay_iters = max_iters * 2\nlearning_rate = 1\nimport math\n_private = 3\n")
    cfg, explicit, presets = configurator.parse_config([str(p), "--max_iters=7", "--compile", "--dtype=bfloat16"], train.DEFAULTS)
    assert cfg["max_iters"] == 7 and cfg["lr_decay_iters"] == 100          # the preset saw the earlier value
    assert cfg["learning_rate"] == 1.0 and type(cfg["learning_rate"]) is float   # int where a float is due
    assert cfg["compile"] is True and cfg["dtype"] == "bfloat16"
    assert cfg["batch_size"] == train.DEFAULTS["batch_size"]
    assert explicit == {"max_iters", "lr_decay_iters", "learning_rate", "compile", "dtype"} and presets == [str(p)]
    # every ModelArgs field but the derived two is a key
    assert {"rope_theta", "attn", "score_func"} <= set(train.DEFAULTS)
    assert "vocab_size" not in train.DEFAULTS and "max_seq_len" not in train.DEFAULTS


def test_presets_parse():
    post_training = {"sft_cpu": sft.DEFAULTS, "grpo_cpu": grpo.DEFAULTS}          # sft.py's and grpo.py's presets
    for p in sorted((REPO / "config").glob("*.py")):
        if p.stem in post_training:
            assert configurator.parse_config([str(p)], post_training[p.stem])[0] != post_training[p.stem]
            continue
        cfg, _, _ = configurator.parse_config([str(p)], train.DEFAULTS)
        train.check_config(types.SimpleNamespace(**cfg), "cpu", None)
        configurator.model_args_from(cfg, 65)
    by_path, _, _ = configurator.parse_config([str(REPO / "config" / "shakespeare_char_cpu.py")], train.DEFAULTS)
    assert configurator.parse_config(["shakespeare_char_cpu"], train.DEFAULTS)[0] == by_path != train.DEFAULTS     # a bare preset name
    fast = configurator.parse_config(["shakespeare_char_cpu_fast"], train.DEFAULTS)[0]   # nanoGPT's task and width
    same = ("text", "dataset", "tokenizer", "block_size", "eval_iters", "dim", "n_layers", "n_heads", "dropout")
    assert {k: fast[k] for k in same} == {k: by_path[k] for k in same}
    # the CPU default: the AdamW preset's model and data, only the optimizer and its schedule changed
    muon = configurator.parse_config(["shakespeare_char_cpu_muon"], train.DEFAULTS)[0]
    assert {k for k in muon if muon[k] != by_path[k]} == {"out_dir", "optimizer", "muon_experts", "learning_rate",
                                                          "muon_rms", "min_lr", "max_iters", "lr_decay_iters",
                                                          "mtp_lambda_step"}
    assert muon["lr_decay_iters"] == muon["max_iters"] and by_path["optimizer"] == "adamw"


@pytest.mark.parametrize("argv, msg", [
    (["--n_layer=4"], "unknown config key 'n_layer' (did you mean n_layers?); valid keys: "),
    (["--batch_size=1.5"], "batch_size must be int, not '1.5'"),
    (["--compile=yes"], "compile must be bool"),
    (["--learning_rate=fast"], "learning_rate must be float"),
    (["--max_iters"], "--max_iters needs a value"),
    (["config/nope.py"], "config file config/nope.py not found"),
])
def test_config_errors(argv, msg):
    with pytest.raises(configurator.UserError, match=None) as e:
        configurator.parse_config(argv, train.DEFAULTS)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_unknown_key_in_preset(tmp_path):
    p = tmp_path / "p.py"
    p.write_text("n_embd = 128\n")
    with pytest.raises(configurator.UserError, match="unknown config key 'n_embd' in .*valid keys: .*block_size"):
        configurator.parse_config([str(p)], train.DEFAULTS)


def test_shape_keys_are_the_keys_that_shape_the_weights():
    """train.SHAPE_KEYS (refused on resume and extension) are exactly the model keys whose change changes a
    weight's shape: each key set to another valid value in turn."""
    other = dict(dim=48, inter_dim=32, moe_inter_dim=8, n_layers=4, n_dense_layers=2, n_heads=2, n_routed_experts=16,
                 n_shared_experts=2, n_activated_experts=3, n_expert_groups=2, n_limited_groups=1, score_func="softmax",
                 route_scale=2.0, q_lora_rank=0, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4,
                 original_seq_len=8, rope_theta=500.0, rope_factor=4.0, beta_fast=16, beta_slow=2, mscale=0.5, n_mtp=0,
                 mtp_lambda=0.1, bias_update_speed=0.0, seq_aux_alpha=0.0, dropout=0.1, attn="mha")
    assert set(other) == set(configurator.MODEL_KEYS)

    def shapes(**kw):
        return {k: v.shape for k, v in ds.Transformer(tiny(**kw)).state_dict().items()}
    base = shapes()
    assert {k for k, v in other.items() if shapes(**{k: v}) != base} == set(train.SHAPE_KEYS)


@pytest.fixture
def small_text(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("To be, or not to be, that is the question.\n" * 3)    # ~130 characters
    return path


@pytest.mark.parametrize("case", ["unknown key", "wrong type", "missing text", "block > data", "batch > data",
                                  "bad device", "absent cuda", "bad model", "missing ckpt", "corrupt ckpt",
                                  "out_dir is a file", "bad optimizer"])
def test_bad_input_one_line_exit_2(case, tmp_path, small_text, text_file, capsys):
    out = tmp_path / "out"
    base = [str(preset(tmp_path)), f"--data_dir={tmp_path / 'data'}", f"--out_dir={out}", "--device=cpu"]
    argv = {
        "unknown key": ["--bach_size=4"],
        "wrong type": ["--block_size=big"],
        "missing text": [f"--text={tmp_path / 'nope.txt'}"],
        "block > data": [f"--text={small_text}", "--block_size=64"],
        "batch > data": [f"--text={small_text}", "--block_size=8", "--batch_size=64"],
        "bad device": ["--device=foo"],
        "absent cuda": ["--device=cuda:7"],
        "bad model": [f"--text={small_text}", "--block_size=8", "--n_routed_experts=6", "--n_expert_groups=4"],
        "missing ckpt": ["--init_from=resume"],
        "corrupt ckpt": ["--init_from=resume"],
        "out_dir is a file": [f"--text={small_text}", "--block_size=8", f"--out_dir={small_text}"],
        "bad optimizer": [f"--text={small_text}", "--block_size=8", "--optimizer=Muon"],
    }[case]
    if case == "corrupt ckpt":
        out.mkdir()
        (out / "ckpt.pt").write_bytes(b"PK\x03\x04 this is not a checkpoint")
    assert train.cli(base + argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert not (out / "log.jsonl").exists()          # stopped before any training work


@pytest.mark.slow
@pytest.mark.parametrize("arg,message", [("--n_layer=4", "error: unknown config key 'n_layer'"),
                                         ("--optimizer=sgd", "error: optimizer must be one of adamw, muon, not 'sgd'")])
def test_cli_exit_code_in_a_real_process(tmp_path, arg, message):
    r = subprocess.run([sys.executable, "train.py", arg, f"--out_dir={tmp_path / 'out'}"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith(message) and r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr


def test_threads_default_to_the_idle_cores(monkeypatch, tmp_path, text_file, data_dir, capsys):
    """On a CPU a command takes as many torch threads as cores are idle when it starts (a busy core makes threads
    wait for each other at every operation), at least one; --threads=N sets them; other devices keep torch's."""
    for idle, want in ((0.3, 1), (1.2, 1), (1.8, 2), (3.6, 4)):
        monkeypatch.setattr(configurator, "idle_cores", lambda seconds=0.1, idle=idle: idle)
        assert configurator.set_threads(0, "cpu") == want == torch.get_num_threads()
    assert configurator.set_threads(3, "cpu") == 3
    torch.set_num_threads(1)
    assert configurator.set_threads(0, "cuda:0") == 1
    with pytest.raises(configurator.UserError, match="threads must be at least 0"):
        configurator.set_threads(-1, "cpu")
    monkeypatch.setattr(configurator, "idle_cores", lambda seconds=0.1: 1.1)
    run(tmp_path, text_file, data_dir, "--threads=0", max_iters=1, eval_interval=1)
    assert "(float32, 1 CPU threads)" in capsys.readouterr().out
    assert 0 < configurator.idle_cores() <= os.cpu_count()              # the real measurement: a share of the cores


def test_quotes_around_a_text_value_are_dropped():
    """--out_dir='x' (quotes that reached Python, as from a script or an IDE) is the folder x, as a shell would read
    it; quotes inside a value stay."""
    cfg = configurator.parse_config(["--out_dir='x'", '--text="a b.txt"', "--dataset=it's"], train.DEFAULTS)[0]
    assert (cfg["out_dir"], cfg["text"], cfg["dataset"]) == ("x", "a b.txt", "it's")


def test_softmax_gate_trains_without_a_bias(capsys):
    """score_func=softmax (DeepSeek-V2's gate) has no balancing bias in DeepSeek's code: its bias_update_speed is 0
    (said in the log), and asking for one is a one-line error."""
    logs = []
    c, _, _ = train.configure(["--score_func=softmax", "--device=cpu", "--out_dir=/nonexistent/x"], log=logs.append)
    assert c.bias_update_speed == 0.0 and any("bias_update_speed 0" in line for line in logs)
    assert train.cli(["--score_func=softmax", "--bias_update_speed=0.001", "--device=cpu"]) == 2
    assert "bias_update_speed must be 0 with score_func=softmax" in capsys.readouterr().err


def test_device_pick():
    assert configurator.pick_device("cpu") == "cpu"
    assert configurator.pick_device("auto") in ("mps", "cpu") or configurator.pick_device("auto").startswith("cuda:")
    for bad in ("foo", "cuda:99", "meta"):
        with pytest.raises(configurator.UserError):
            configurator.pick_device(bad)


def test_the_chosen_cuda_device_is_made_current(monkeypatch):
    """Triton launches, RNG states and bf16 queries use the current device, so it must be the chosen one."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[-1] if current else 0)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert configurator.pick_device("cuda:1") == "cuda:1" and current == [1]
    assert configurator.pick_device("cuda") == "cuda:1" and current == [1, 1]      # cuda: the current one
    with pytest.raises(configurator.UserError, match="does not exist: this machine has 2 CUDA device"):
        configurator.pick_device("cuda:2")
    assert current == [1, 1]


def test_auto_dtype_is_bf16_only_where_native(monkeypatch):
    """dtype "auto" computes in bf16 on a GPU that has it natively, fp16 on one that emulates it, fp32 off CUDA; the
    config keeps "auto" (what a checkpoint saves, so a run continued elsewhere resolves it there)."""
    monkeypatch.setattr(train, "pick_device", lambda spec: "cuda:0")
    for native, want in ((True, torch.bfloat16), (False, torch.float16)):     # False: a T4 or V100 (emulated bf16)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
        c, _, device = train.configure(["--device=cuda"], log=lambda *a: None)
        assert device == "cuda:0" and c.dtype == "auto" and configurator.compute_dtype(c.dtype, device) == want
    assert configurator.compute_dtype("auto", "cpu") == torch.float32


@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_no_preset_trains_nanogpts_budget_into_out(device, monkeypatch):
    """python train.py with no preset runs DEFAULTS on a CUDA GPU (nanoGPT's train_shakespeare_char budget, keeping
    the best-val checkpoint), and elsewhere DEFAULTS with config/shakespeare_char_cpu_muon.py's changes (nanoGPT's
    CPU recipe by Muon, for the wall of its 2000 AdamW steps), into out/, where sample.py looks; keys still apply.
    config/shakespeare_char.py is DEFAULTS in a folder of its own."""
    monkeypatch.setattr(train, "pick_device", lambda spec: device)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    logs = []
    c, _, _ = train.configure(["--max_iters=7"], log=logs.append)
    want = train.DEFAULTS if device == "cuda:0" else configurator.parse_config(["shakespeare_char_cpu_muon"], train.DEFAULTS)[0]
    assert c.out_dir == "out" == sample.DEFAULTS["out_dir"]
    assert c.max_iters == 7 and all(getattr(c, k) == v for k, v in want.items() if k not in ("out_dir", "max_iters", "dtype"))
    assert c.tokenizer == "char" and not c.always_save_checkpoint
    assert ("config/shakespeare_char_cpu_muon.py" in logs[0]) == (device == "cpu") and "DEFAULTS" in logs[0]
    assert (c.optimizer, c.muon_experts) == (("adamw", True) if device == "cuda:0" else ("muon", False))
    gpu = configurator.parse_config(["shakespeare_char"], train.DEFAULTS)[0]
    assert [k for k in gpu if gpu[k] != train.DEFAULTS[k]] == ["out_dir"]
    c, _, _ = train.configure(["--out_dir=elsewhere", "--tokenizer=bpe"], log=logs.append)
    assert c.out_dir == "elsewhere" and c.tokenizer == "bpe" and c.block_size == want["block_size"]
    c, _, _ = train.configure(["shakespeare_char_cpu"], log=logs.append)   # a preset: as given, nothing said
    assert c.out_dir == "out-shakespeare-char-cpu" and c.block_size == 64 and len(logs) == 2


@pytest.mark.parametrize("cc,allowed", [((7, 5), False), ((8, 6), False), ((8, 9), True), ((9, 0), True)])
def test_compile_with_fp8_needs_sm89(cc, allowed, monkeypatch):
    """Inductor fuses the cast to E4M3 into a Triton kernel, which Triton cannot store below compute capability 8.9:
    there compile=True with fp8=True is one line, not a crash at the first step. Either alone runs."""
    monkeypatch.setattr(train, "pick_device", lambda spec: "cuda:0")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
    for argv in (["--fp8=True"], ["--compile=True"]):
        train.configure(["shakespeare_char", *argv], log=print)
    if allowed:
        train.configure(["shakespeare_char", "--compile=True", "--fp8=True"], log=print)
    else:
        with pytest.raises(configurator.UserError, match="compile=True with fp8=True needs compute capability 8.9"):
            train.configure(["shakespeare_char", "--compile=True", "--fp8=True"], log=print)


def test_mfu_peak_by_device_name():
    """Whole words, the longest table entry first: L4 is not L40S, H100 PCIe not H100; unknown cards get 0."""
    P = train.PEAK_BF16
    for name, key in [("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA L4", "L4"),
                      ("NVIDIA L40S", "L40S"), ("NVIDIA A100-SXM4-80GB", "A100"), ("NVIDIA GeForce RTX 4090", "RTX 4090")]:
        assert train.peak_flops(name) == P[key], name
    assert train.peak_flops("NVIDIA A10G") == train.peak_flops("Tesla T4") == 0.0


# ----------------------------------------------------------------------------- training: data and tokenizers

def test_char_data_roundtrip_and_cache(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("hello world, héllo wörld\n" * 20)
    logs = []
    folder, meta = data.prepare_data(tmp_path / "d", text=str(src), tokenizer="char", log=logs.append)
    assert folder == tmp_path / "d" / "a" / "char" and meta["dtype"] == "uint16"
    assert meta["tokenizer"] == "char" and meta["vocab_size"] == len(set(src.read_text()))
    encode, decode = data.tokenizer_from_meta(meta)
    tr, va = data.load_split(folder, "train", meta), data.load_split(folder, "val", meta)
    assert len(tr) == int(0.9 * len(src.read_text())) and decode(list(tr) + list(va)) == src.read_text()
    assert encode("hello") == [meta["chars"].index(ch) for ch in "hello"]
    with pytest.raises(ValueError, match="characters not in the vocabulary: 'QZ'"):
        encode("hello QZ")
    # a second call reuses the cache; a changed source is tokenised again
    data.prepare_data(tmp_path / "d", text=str(src), tokenizer="char", log=logs.append)
    assert sum("tokenising" in m for m in logs) == 1
    src.write_text("another text, longer than before\n" * 20)
    _, meta2 = data.prepare_data(tmp_path / "d", text=str(src), tokenizer="char", log=logs.append)
    assert sum("tokenising" in m for m in logs) == 2 and meta2["chars"] != meta["chars"]


def test_folder_of_texts_and_uint32(tmp_path):
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "b.txt").write_text("second")
    (tmp_path / "books" / "a.txt").write_text("first")
    (tmp_path / "books" / "skip.md").write_text("not text")
    folder, meta = data.prepare_data(tmp_path / "d", text=str(tmp_path / "books"), tokenizer="char", log=lambda m: None)
    _, decode = data.tokenizer_from_meta(meta)
    ids = list(data.load_split(folder, "train", meta)) + list(data.load_split(folder, "val", meta))
    assert decode(ids) == "first\n\nsecond"
    # more distinct characters than uint16 holds
    big = tmp_path / "big.txt"
    big.write_text("".join(chr(c) for c in range(0x20, 0x20 + 70000) if not 0xD800 <= c < 0xE000))
    folder, meta = data.prepare_data(tmp_path / "d", text=str(big), tokenizer="char", log=lambda m: None)
    assert meta["dtype"] == "uint32" and meta["vocab_size"] > 2 ** 16
    assert int(data.load_split(folder, "val", meta).max()) == meta["vocab_size"] - 1


@pytest.mark.skipif(not HAS_BPE, reason="no local tiktoken cache")
def test_bpe_data_roundtrip(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 10)
    folder, meta = data.prepare_data(tmp_path / "d", text=str(src), tokenizer="bpe", log=lambda m: None)
    assert meta["encoding"] == "r50k_base" and meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"
    assert data.tokenizer_meta(meta) == dict(tokenizer="bpe", encoding="r50k_base", vocab_size=50257)
    encode, decode = data.tokenizer_from_meta(meta)
    ids = list(data.load_split(folder, "train", meta)) + list(data.load_split(folder, "val", meta))
    assert decode([int(i) for i in ids]) == src.read_text() and encode("First")[0] == ids[0]


def test_download_failure_says_how_to_place_the_file(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(configurator.UserError) as e:
        data.prepare_data(tmp_path / "d", log=lambda m: None)
    msg = str(e.value)
    assert "place the file by hand at" in msg and str(tmp_path / "d" / "shakespeare" / "input.txt") in msg
    assert data.SHAKESPEARE_URL in msg and "\n" not in msg


def test_bpe_offline_says_where_tiktoken_looked(tmp_path, monkeypatch, capsys):
    """--tokenizer=bpe with neither network nor a cached file: one line naming the cache folder tiktoken read
    (TIKTOKEN_CACHE_DIR) and how to give it one, whatever the download error."""
    import tiktoken

    def offline(name):
        raise ConnectionError("HTTPSConnectionPool(host='openaipublic.blob.core.windows.net'): Max retries exceeded")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 200)
    assert train.cli([f"--text={text}", f"--data_dir={tmp_path}", "--tokenizer=bpe", "--device=cpu",
                      f"--out_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"not in its cache {tmp_path / 'cache'}" in err
    assert "set TIKTOKEN_CACHE_DIR to a folder holding its cached file" in err and "Max retries" not in err


def test_domains_corpus_is_deterministic_and_labelled(tmp_path):
    english = tmp_path / "english.txt"
    english.write_text("".join(f"Line {i}: to be, or not to be, that is the question.\n" for i in range(300)))
    (folder, meta), (again, _) = [data.prepare_data(tmp_path / d, dataset="domains", text=str(english), tokenizer="char",
                                                    log=lambda m: None) for d in ("a", "b")]
    for split in ("train", "val"):
        assert (folder / f"{split}.bin").read_bytes() == (again / f"{split}.bin").read_bytes()
    texts, n = data.domain_texts(english.read_text()), len(english.read_text())
    assert list(meta["domains"]) == ["english", "code", "math"] and [len(t) for t in texts] == [n] * 3
    # each domain split 90/10 by itself; train holds the domains' first 90% in order, val their last 10%
    cut = int(0.9 * n)
    _, decode = data.tokenizer_from_meta(meta)
    assert decode(data.load_split(folder, "train", meta).tolist()) == "".join(t[:cut] for t in texts)
    val = data.val_by_domain(data.load_split(folder, "val", meta), meta)
    assert [decode(v.tolist()) for v in val.values()] == [t[cut:] for t in texts]
    assert all(meta["domains"][d] == [cut, n - cut] for d in data.DOMAINS)
    # English as given; the code from the standard library's first public module on; every maths answer right
    first = sorted(p for p in data.STDLIB.glob("*.py") if not p.name.startswith("_"))[0].read_text()
    assert texts[0] == english.read_text() and texts[1].startswith(first[:n])
    rules = {r"What is (\S+) \+ (\S+)\?": lambda a, b: int(a) + int(b),
             r"Calculate (\S+) - (\S+)\.": lambda a, b: int(a) - int(b),
             r"What is (\S+) times (\S+)\?": lambda a, b: int(a) * int(b),
             r"Which is bigger: (\S+) or (\S+)\?": lambda a, b: max(float(a), float(b)),
             r"Is (\S+) less than (\S+)\?": lambda a, b: int(a) < int(b),
             r"What is the remainder when (\S+) is divided by (\S+)\?": lambda a, b: int(a) % int(b),
             r"Solve (\S+)\*\w ([+-]) (\d+) = (\S+) for \w\.": lambda k, sign, b, c: (int(c) - int(sign + b)) // int(k)}
    lines = data.math_text(20000).splitlines()
    for q, answer in zip(lines[::2], lines[1::2]):
        rule, m = next((f, m) for r, f in rules.items() if (m := re.fullmatch(r, q)))
        assert str(rule(*m.groups())) == answer, (q, answer)
    assert {next(r for r in rules if re.fullmatch(r, q)) for q in lines[::2]} == set(rules)      # every kind occurs


def test_domains_corpus_needs_the_standard_library_sources(tmp_path, small_text, monkeypatch, capsys):
    monkeypatch.setattr(data, "STDLIB", tmp_path / "no-stdlib")
    argv = [str(preset(tmp_path)), "--dataset=domains", f"--text={small_text}", f"--data_dir={tmp_path / 'data'}",
            f"--out_dir={tmp_path / 'out'}", "--device=cpu"]
    assert train.cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the domains corpus needs the Python standard library's .py sources, and "
                          f"{tmp_path / 'no-stdlib'} has none") and err.count("\n") == 1


def test_batches_are_a_function_of_the_seed():
    tokens = torch.arange(1000).numpy().astype("uint16")
    x, y = data.get_batch(tokens, 4, 16, data.batch_seed(1, 0, 0, 5, 0))
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64 and torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = data.get_batch(tokens, 4, 16, data.batch_seed(1, 0, 0, 5, 0))
    x3, _ = data.get_batch(tokens, 4, 16, data.batch_seed(1, 0, 1, 5, 0))     # another rank
    assert torch.equal(x, x2) and not torch.equal(x, x3)


# ----------------------------------------------------------------------------- training: optimizer and schedule

def test_weight_decay_on_matrices_only():
    model = ds.Transformer(ds.ModelArgs(vocab_size=50, dim=32, n_layers=2, n_heads=2, max_seq_len=16,
                                                    n_routed_experts=4, n_expert_groups=1, n_limited_groups=1,
                                                    n_activated_experts=2))
    opt = optim.configure_optimizer(model, 1e-3, 0.1, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] for p in no_decay["params"])
    biases = [g.bias for g in model.gates()]
    assert all(b is not p for b in biases for group in opt.param_groups for p in group["params"])
    assert opt.defaults["betas"] == (0.9, 0.95)
    assert opt.defaults["fused"]                           # one fused kernel over all tensors, CPU too
    ref = torch.optim.AdamW([{**g, "params": [p.detach().clone().requires_grad_() for p in g["params"]]}
                             for g in opt.param_groups], lr=1e-3, betas=(0.9, 0.95), foreach=False)
    pairs = [(a, b) for g, h in zip(opt.param_groups, ref.param_groups) for a, b in zip(g["params"], h["params"])]
    for _ in range(3):                                     # the same updates as the plain implementation
        for a, b in pairs:
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b in pairs:
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)



def test_muon_orthogonalizes_within_the_quintic_band():
    """Newton-Schulz maps G = U S V^T to about U V^T: singular values from 1/100 of the largest up end in
    the quintic coefficients' band (about 0.68 to 1.21, not 1), and the directions are G's (U V^T's)."""
    g = torch.Generator().manual_seed(0)
    for shape in ((32, 96), (96, 32), (48, 48)):
        U, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=g))
        V, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=g))
        k = min(shape)
        G = 3 * U[:, :k] @ torch.diag(torch.logspace(0, -2, k)) @ V[:, :k].T
        O = optim.orthogonalize(G)
        s = torch.linalg.svdvals(O)
        assert 0.65 < s.min() and s.max() < 1.25, (shape, s.min(), s.max())
        polar = U[:, :k] @ V[:, :k].T                                  # U V^T
        assert F.cosine_similarity(O.flatten(), polar.flatten(), dim=0) > 0.97


def test_muon_orthogonalizes_each_expert_on_its_own():
    """A stack of experts (E, m, n) takes the update its experts would take one by one (matrices of
    their own), not one orthogonalization of the stack; each update has RMS lr * rms (Moonlight's
    shape-matched scaling), after the decoupled weight decay, along Nesterov momentum."""
    g = torch.Generator().manual_seed(0)
    stack = torch.nn.Parameter(torch.randn(4, 16, 40, generator=g))
    alone = [torch.nn.Parameter(w.clone()) for w in stack.detach()]
    lr, wd, rms, mu = 0.01, 0.1, 0.5, 0.9
    opts = [optim.Muon([dict(params=ps, muon=True, weight_decay=wd)], lr=lr, betas=(0.9, 0.95), rms=rms,
                       momentum=mu) for ps in ([stack], alone)]
    grads = [torch.randn(4, 16, 40, generator=g) * torch.tensor([1, 10, 100, 0.1]).view(4, 1, 1)
             for _ in range(2)]
    W, M = stack.detach().clone(), torch.zeros_like(stack)
    for G in grads:
        stack.grad = G.clone()
        for p, gp in zip(alone, G):
            p.grad = gp.clone()
        for opt in opts:
            opt.step()
        M = mu * M + (1 - mu) * G                  # written out: W <- (1 - lr wd) W - lr rms sqrt(40) NS(...)
        decayed = (1 - lr * wd) * W
        W = decayed - lr * rms * 40 ** 0.5 * optim.orthogonalize(mu * M + (1 - mu) * G)
        torch.testing.assert_close(stack.detach(), W)
        rms_update = (W - decayed).pow(2).mean(dim=(1, 2)).sqrt()
        torch.testing.assert_close(rms_update, torch.full((4,), lr * rms), rtol=0.25, atol=0)
    torch.testing.assert_close(stack.detach(), torch.stack([p.detach() for p in alone]))


@pytest.mark.parametrize("muon_experts", [True, False])
def test_muon_groups_cover_every_parameter_once(muon_experts):
    """Muon takes the blocks' matrices (MLA's projections, FFNs, shared and routed experts, MTP's); AdamW the
    embedding, head and gate centroids (decayed) and the norms (not); the balancing biases are buffers."""
    m = model(n_mtp=1)
    opt = optim.configure_optimizer(m, 1e-3, 0.1, (0.9, 0.95), "cpu", "muon", muon_experts=muon_experts)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in m.parameters())              # each exactly once
    muon, adam, vectors = opt.param_groups
    names = {id(p): n for n, p in m.named_parameters()}
    experts = {n for n in names.values() if ".experts." in n}
    assert experts and {names[id(p)] for p in adam["params"]} == \
        {"embed.weight", "head.weight"} | {n for n in names.values() if n.endswith("gate.weight")} | \
        (set() if muon_experts else experts)
    matrices = {n for n, p in m.named_parameters() if p.dim() >= 2}
    assert {names[id(p)] for p in muon["params"]} == matrices - {names[id(p)] for p in adam["params"]}
    assert {"mtp.0.eh_proj.weight", "layers.1.attn.wkv_a.weight", "layers.1.ffn.shared_experts.w1.weight"} <= \
        {names[id(p)] for p in muon["params"]}
    assert muon["muon"] and not adam["muon"] and not vectors["muon"]
    assert muon["weight_decay"] == adam["weight_decay"] == 0.1 and vectors["weight_decay"] == 0
    assert all(p.dim() >= 2 for p in muon["params"] + adam["params"]) and all(p.dim() == 1 for p in vectors["params"])
    assert (experts <= {names[id(p)] for p in muon["params"]}) == muon_experts

def test_lr_and_mtp_schedule():
    c = types.SimpleNamespace(decay_lr=True, learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110,
                              mtp_lambda=0.3, mtp_lambda_late=0.1, mtp_lambda_step=50)
    assert optim.get_lr(0, c) == pytest.approx(1 / 11) and optim.get_lr(9, c) == pytest.approx(10 / 11)
    assert optim.get_lr(10, c) == pytest.approx(1.0) and optim.get_lr(60, c) == pytest.approx(0.55)
    assert optim.get_lr(110, c) == pytest.approx(0.1) and optim.get_lr(500, c) == pytest.approx(0.1)
    assert [train.get_mtp_lambda(i, c) for i in (0, 49, 50, 99)] == [0.3, 0.3, 0.1, 0.1]
    c.mtp_lambda_step = -1
    assert train.get_mtp_lambda(10 ** 6, c) == 0.3


# ----------------------------------------------------------------------------- training: the loop

def test_loss_falls(trained):
    out, log = trained
    evals = entries(log, "eval")
    assert [e["step"] for e in evals] == [0, 20, 40]
    assert evals[-1]["val"] < evals[0]["val"] - 0.8 and evals[-1]["train"] < evals[0]["train"] - 0.8
    steps = entries(log, "train")
    assert len(steps) == 40 and steps[-1]["main"] < steps[0]["main"] - 0.8
    first = steps[0]
    assert first["loss"] == pytest.approx(first["main"] + 0.3 * first["mtp"] + first["balance"], rel=1e-5)
    assert len(first["maxvio"]) == 2 and first["tokens_per_s"] > 0 and first["mfu"] is None   # MoE layer + MTP block
    model, ckpt = ckpts.load_checkpoint(out / "ckpt.pt")
    assert ckpt["iter_num"] == 40 and not model.training and ckpt["meta"]["tokenizer"] == "char"
    assert any(g.bias.abs().sum() > 0 for g in model.gates())          # the balancing biases moved and were saved


@pytest.mark.slow
def test_fp8_training_loss_falls_and_samples_without_fp8(tmp_path, text_file, data_dir, capsys):
    """--fp8=True trains (the loss falls as in fp32); its checkpoint holds fp32 masters, loads into a plain
    model and samples."""
    log = run(tmp_path, text_file, data_dir, "--fp8=True", max_iters=40, eval_interval=20)
    evals = entries(log, "eval")
    assert evals[-1]["val"] < evals[0]["val"] - 0.8 and evals[-1]["train"] < evals[0]["train"] - 0.8
    model, ckpt = ckpts.load_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert ckpt["config"]["fp8"] and not any(isinstance(m, (fp8.Linear, fp8.Experts)) for m in model.modules())
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())
    assert sample.cli(["--device=cpu", f"--out_dir={tmp_path / 'out'}", "--num_samples=1", "--max_new_tokens=20"]) == 0
    assert "20 tokens in" in capsys.readouterr().out


def test_bias_update_once_per_step_with_all_micro_batches(tmp_path, text_file, data_dir, monkeypatch):
    counted = []
    original = ds.Transformer.update_expert_bias

    def spy(self):
        counted.append([g.load.sum().item() for g in self.gates()])
        return original(self)
    monkeypatch.setattr(ds.Transformer, "update_expert_bias", spy)
    run(tmp_path, text_file, data_dir, "--gradient_accumulation_steps=3", max_iters=5, eval_interval=5)
    # once per optimizer step, with the tokens of all 3 micro-batches (the MTP block sees T - 1 positions
    # per sequence), each token routed to k experts
    B, T, k = TINY["batch_size"], TINY["block_size"], TINY["n_activated_experts"]
    assert counted == [[3 * B * T * k, 3 * B * (T - 1) * k]] * 5


def test_a_skipped_fp16_step_skips_the_bias_update(tmp_path, text_file, data_dir, monkeypatch):
    """When the fp16 loss scaler skips a step (an inf gradient), the balancing biases stay as they were, as the
    weights do; the steps before and after move both. (An enabled scaler on a CPU stands in for fp16 on CUDA.)"""
    scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device, enabled: scaler("cpu", init_scale=1024.0))
    original, snapshots, backwards = ds.Transformer.update_expert_bias, [], []

    def spy(self):
        out = original(self)
        snapshots.append(([g.bias.clone() for g in self.gates()], self.head.weight.detach().clone()))
        return out
    monkeypatch.setattr(ds.Transformer, "update_expert_bias", spy)
    real_init = train.init_model

    def init(*a):
        out = real_init(*a)                          # the third step's gradient overflows
        out[0].head.weight.register_hook(lambda g: backwards.append(1) or (g * float("inf") if len(backwards) == 3 else g))
        return out
    monkeypatch.setattr(train, "init_model", init)
    run(tmp_path, text_file, data_dir, max_iters=4, eval_interval=4)
    moved = [not all(torch.equal(a, b) for a, b in zip(x[0] + [x[1]], y[0] + [y[1]]))
             for x, y in zip(snapshots, snapshots[1:])]
    assert moved == [True, False, True]              # steps 2, 3 (skipped), 4 against the one before


def dropout_masks(tmp_path, text_file, data_dir, monkeypatch, *args, **kw):
    """The dropout masks of a training run's first three steps, one tensor per step (every training-mode dropout
    call of the step, in order: which units it zeroed), read by wrapping F.dropout."""
    masks, real = [], F.dropout

    def recorded(x, p=0.5, training=True, inplace=False):
        y = real(x, p, training, inplace)
        if training and p > 0:
            masks.append((y == 0) & (x != 0))
        return y
    monkeypatch.setattr(F, "dropout", recorded)
    run(tmp_path, text_file, data_dir, *args, max_iters=3, eval_interval=3, dropout=0.1, **kw)
    per_step = len(masks) // 3
    return [torch.cat([m.flatten() for m in masks[i * per_step:(i + 1) * per_step]]) for i in range(3)]


def test_dropout_masks_differ_between_steps_and_repeat_across_runs(tmp_path, text_file, data_dir, monkeypatch):
    """Dropout draws new masks every step (a mask seeded once would zero the same units all run long), and the
    masks are a function of (seed, rank, step): a second run draws the same ones, another seed others."""
    steps = dropout_masks(tmp_path, text_file, data_dir, monkeypatch, out="a")
    assert all(0.05 < m.float().mean() < 0.15 for m in steps)                       # p = 0.1 of the units
    assert not torch.equal(steps[0], steps[1]) and not torch.equal(steps[1], steps[2])
    again = dropout_masks(tmp_path, text_file, data_dir, monkeypatch, out="b")
    assert all(torch.equal(a, b) for a, b in zip(steps, again))
    other = dropout_masks(tmp_path, text_file, data_dir, monkeypatch, "--seed=7", out="c")
    assert not torch.equal(steps[0], other[0])


def test_tokens_per_second_leave_evaluations_out(tmp_path, text_file, data_dir, monkeypatch):
    """tok/s (and MFU, ETA) are the training steps' alone: on a clock where a step takes 1 s and an evaluation 100 s,
    every logged figure is one step's tokens a second, also when an evaluation falls between two log lines
    (eval_interval 3, log_interval 2)."""
    clock = [1000.0]
    monkeypatch.setattr(train.time, "time", lambda: clock[0])
    batch, evaluate = train.get_batch, train.evaluate
    monkeypatch.setattr(train, "get_batch", lambda *a: clock.__setitem__(0, clock[0] + 1) or batch(*a))
    monkeypatch.setattr(train, "evaluate", lambda *a: clock.__setitem__(0, clock[0] + 100) or evaluate(*a))
    log = run(tmp_path, text_file, data_dir, max_iters=8, eval_interval=3, log_interval=2)
    per_step = TINY["batch_size"] * TINY["block_size"]
    assert [round(e["tokens_per_s"], 6) for e in entries(log, "train")] == [per_step] * 4
    assert [e["eta_s"] for e in entries(log, "train")] == [6.0, 4.0, 2.0, 0.0]


@pytest.mark.slow
def test_a_rerun_refuses_to_overwrite_the_model(tmp_path, trained, text_file, data_dir):
    """python train.py again into a folder that holds a checkpoint refuses (one line, exit 2, naming the ways on:
    resume, another out_dir, --overwrite=True) and leaves the checkpoint as it was; a new run from a folder into
    that same folder too. --overwrite=True replaces it; a new run starts a new log.jsonl."""
    out = tmp_path / "out"
    shutil.copytree(trained[0], out)
    before = (out / "ckpt.pt").read_bytes()
    args = [sys.executable, "train.py", str(preset(tmp_path)), f"--text={text_file}", f"--data_dir={data_dir}",
            f"--out_dir={out}", "--device=cpu"]
    for extra in ([], [f"--init_from={out}"]):
        r = subprocess.run(args + extra, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        assert (out / "ckpt.pt").read_bytes() == before
    assert "--init_from=resume continues it, --out_dir=OTHER starts one beside it, --overwrite=True" in \
        subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120).stderr
    assert "needs an out_dir of its own" in r.stderr
    log = run(tmp_path, text_file, data_dir, "--overwrite=True", max_iters=2, eval_interval=2)
    assert (out / "ckpt.pt").read_bytes() != before and log[0]["kind"] == "config" and len(entries(log, "config")) == 1


@pytest.mark.slow
def test_ctrl_c_stops_with_one_line_that_says_how_to_resume(tmp_path, text_file, data_dir):
    """Ctrl-C (SIGINT) during training: the step ends, and one line on stderr says where the last checkpoint is and
    the command that resumes it (exit 130, no traceback); the checkpoint loads and the run resumes from it."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "train.py", str(preset(tmp_path, max_iters=100000, eval_interval=4)),
                             f"--text={text_file}", f"--data_dir={data_dir}", f"--out_dir={out}", "--device=cpu"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(600):
        if (out / "ckpt.pt").exists():
            break
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("stopped: Ctrl-C at step ") and "the last checkpoint is" in err
    assert f"python train.py --init_from=resume --out_dir={out} continues from it" in err
    step = ckpts.read_checkpoint(out / "ckpt.pt")["iter_num"]
    assert f"(step {step}, " in err
    log = run(tmp_path, text_file, data_dir, "--init_from=resume", f"--max_iters={step + 1}")
    assert entries(log, "train")[-1]["step"] == step + 1 and entries(log, "stopped")


def test_a_run_that_saves_nothing_says_so(trained, tmp_path, text_file, data_dir, capsys):
    """A new run from a checkpoint whose evaluations never improve on its start (here: learning rate 0) saves
    nothing (learning rate and bias speed 0: the weights stay), and its last line says so instead of reporting a
    best loss as if one were kept."""
    run(tmp_path, text_file, data_dir, f"--init_from={trained[0]}", "--learning_rate=0", "--min_lr=0",
        "--warmup_iters=0", "--bias_update_speed=0", max_iters=2, eval_interval=1)
    assert not (tmp_path / "out" / "ckpt.pt").exists()
    assert "nothing saved: no evaluation improved on step 0's val loss" in capsys.readouterr().out.splitlines()[-1]


def test_accumulated_gradient_is_that_of_the_mean_loss(tmp_path, text_file, data_dir, monkeypatch):
    """With 3 micro-batches, the gradient that reaches clipping and AdamW is d/dp of the mean of their
    total losses. AdamW is scale invariant, so a wrong factor would hardly show in the losses; clipping
    and the effective learning rate would."""
    seen, make_optimizer, clip = {}, train.configure_optimizer, torch.nn.utils.clip_grads_with_norm_

    def spy_optimizer(model, *args):
        seen["model"] = model
        return make_optimizer(model, *args)

    def spy_clip(params, max_norm, total_norm):      # step 0: the weights are still the initial ones
        if "grads" not in seen:
            seen["grads"] = {n: p.grad.clone() for n, p in seen["model"].named_parameters() if p.grad is not None}
            seen["before"] = copy.deepcopy(seen["model"])
        return clip(params, max_norm, total_norm)
    monkeypatch.setattr(train, "configure_optimizer", spy_optimizer)
    monkeypatch.setattr(torch.nn.utils, "clip_grads_with_norm_", spy_clip)
    log = run(tmp_path, text_file, data_dir, "--gradient_accumulation_steps=3", max_iters=1, eval_interval=1)
    # the same 3 micro-batches (seeded by seed, rank 0, step 0, micro-step k), by hand
    folder, meta = data.prepare_data(data_dir, text=str(text_file), tokenizer="char", log=lambda *a: None)
    split, m = data.load_split(folder, "train", meta), seen["before"]
    batches = [data.get_batch(split, 4, 32, data.batch_seed(train.DEFAULTS["seed"], 0, 0, 0, k)) for k in range(3)]
    mean = torch.stack([m(x, y)[1]["total"] for x, y in batches]).mean()
    mean.backward()
    assert entries(log, "train")[0]["loss"] == pytest.approx(mean.item(), rel=1e-5)
    want = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert want.keys() == seen["grads"].keys()
    for n in want:
        torch.testing.assert_close(seen["grads"][n], want[n], rtol=1e-4, atol=1e-7, msg=n)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_the_same_trajectory(tmp_path, text_file, data_dir, optimizer):
    """8 steps, and 4 then a resume for 4 more, agree to the bit: the weights, the optimizer's state (AdamW's
    moments; Muon's momentum and its AdamW part's), the data order and dropout's RNG."""
    kw = dict(dropout=0.1, max_iters=8, eval_interval=4)      # dropout: the RNG state is part of the resume
    extra = ["--gradient_accumulation_steps=2", "--mtp_lambda_step=6", f"--optimizer={optimizer}"]
    full = run(tmp_path, text_file, data_dir, *extra, out="full", **kw)
    half = run(tmp_path, text_file, data_dir, *extra, "--max_iters=4", out="half", **kw)
    resumed = run(tmp_path, text_file, data_dir, *extra, "--init_from=resume", out="half", **kw)
    keys = ("loss", "main", "mtp", "balance", "lr", "mtp_lambda", "maxvio")
    a = [{k: e[k] for k in keys} for e in entries(full, "train")]
    b = [{k: e[k] for k in keys} for e in entries(resumed, "train")]     # the log holds both halves
    assert len(a) == 8 and len(entries(half, "train")) == 4
    assert a == b
    assert entries(full, "eval")[-1]["val"] == entries(resumed, "eval")[-1]["val"]
    s1 = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)
    s2 = torch.load(tmp_path / "half" / "ckpt.pt", weights_only=True)
    assert s1["iter_num"] == s2["iter_num"] == 8
    for k in s1["model"]:
        assert torch.equal(s1["model"][k], s2["model"][k]), k
    assert s1["optimizer"]["state"].keys() == s2["optimizer"]["state"].keys()
    for i, state in s1["optimizer"]["state"].items():
        assert all(torch.equal(v, s2["optimizer"]["state"][i][k]) for k, v in state.items()), i
    assert ("momentum_buffer" in s1["optimizer"]["state"][3]) == (optimizer == "muon")    # a block matrix
    other = "adamw" if optimizer == "muon" else "muon"      # the saved state fits its own optimizer only
    with pytest.raises(configurator.UserError, match=f"trains with optimizer={optimizer}: a resumed run keeps it"):
        run(tmp_path, text_file, data_dir, *extra, "--init_from=resume", f"--optimizer={other}", out="half", **kw)


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on CPU needs a C++ compiler")
def test_compile_matches_eager(tmp_path, text_file, data_dir):
    kw = dict(max_iters=2, eval_interval=2, eval_iters=1, n_layers=1, n_dense_layers=0)
    eager = entries(run(tmp_path, text_file, data_dir, out="eager", **kw), "train")
    compiled = entries(run(tmp_path, text_file, data_dir, "--compile", out="compiled", **kw), "train")
    for a, b in zip(eager, compiled, strict=True):
        assert a["main"] == pytest.approx(b["main"], abs=1e-4) and a["mtp"] == pytest.approx(b["mtp"], abs=1e-4)
    model, _ = ckpts.load_checkpoint(tmp_path / "compiled" / "ckpt.pt")    # saved without compile's prefixes


@pytest.mark.slow
def test_ddp_two_processes_stay_identical_and_resume(tmp_path, text_file, data_dir):
    """2 processes stay identical; 3 steps + a resume for 3 more repeat 6 straight steps, dropout included
    (every rank's masks come from (seed, rank, step)). 8 tokens per micro-batch, each to 1 of 8 experts: most
    micro-batches leave some expert without tokens on one rank and not the other."""
    kw = dict(max_iters=6, eval_interval=3, batch_size=1, block_size=8, n_routed_experts=8, n_activated_experts=1,
              n_expert_groups=1, n_limited_groups=1, dropout=0.1)
    log = torchrun(tmp_path, text_file, data_dir, "full", "--gradient_accumulation_steps=2", **kw)
    assert entries(log, "config")[0]["world_size"] == 2
    assert len(entries(log, "train")) == 6                            # rank 0 alone logs
    assert entries(log, "ddp_check") == [dict(kind="ddp_check", identical=True, world_size=2)]
    model, ckpt = ckpts.load_checkpoint(tmp_path / "full" / "ckpt.pt")
    assert ckpt["iter_num"] == 6 and ckpt["data"]["world_size"] == 2
    assert sum(g.bias.abs().sum() for g in model.gates()) > 0         # balancing ran
    torchrun(tmp_path, text_file, data_dir, "half", "--gradient_accumulation_steps=2", "--max_iters=3", **kw)
    resumed = torchrun(tmp_path, text_file, data_dir, "half", "--gradient_accumulation_steps=2", "--init_from=resume", **kw)
    keys = ("loss", "main", "mtp", "balance", "maxvio")
    assert [{k: e[k] for k in keys} for e in entries(log, "train")] == \
        [{k: e[k] for k in keys} for e in entries(resumed, "train")]


# ----------------------------------------------------------------------------- training: expert parallelism

def ep_worker(rank, world, store, kw):
    """One rank of an expert-parallel model (DDP for the rest, as train.py sets it up) against a
    single-process copy on the whole global batch: loss, every gradient, an AdamW step (gathered weights
    and moments), a re-shard of the gathered state, the bias update and MaxVio, the node limit, a Muon step."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    ref, ep = model(**kw), model(**kw)
    sharded = expert_parallel.shard_experts(ep, world)
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(ep, list(sharded))
    ddp = torch.nn.parallel.DistributedDataParallel(ep, forward_sync_buffers=False)
    idx, tgt = torch.randint(0, V, (2, 2 * world, 16), generator=torch.Generator().manual_seed(1))
    _, want = ref(idx, tgt)                        # the global batch: the mean of the ranks' losses
    want["total"].backward()
    _, got = ddp(idx[2 * rank:2 * rank + 2], tgt[2 * rank:2 * rank + 2])
    got["total"].backward()
    total = got["total"].detach().clone()
    torch.distributed.all_reduce(total)
    assert abs(total.item() / world - want["total"].item()) < 1e-5
    full = dict(ref.named_parameters())
    for name, p in ep.named_parameters():
        assert p.shape[0] == (8 // world if name in sharded else full[name].shape[0]), name
        g = full[name].grad.chunk(world)[rank] if name in sharded else full[name].grad
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-5, msg=name)
    opts = [optim.configure_optimizer(m, 1e-3, 0.1, (0.9, 0.95), "cpu") for m in (ref, ep)]
    for opt in opts:
        opt.step()
    state, opt_state = ep.state_dict(), opts[1].state_dict()
    expert_parallel.map_experts(opts[1], sharded, state, opt_state, lambda t: expert_parallel.gather(t, world))
    for k, v in ref.state_dict().items():        # |Adam step| <= lr: near-zero gradients may differ in sign
        torch.testing.assert_close(state[k], v, rtol=0, atol=2e-3, msg=k)
    for i, m in opts[0].state_dict()["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_state["state"][i][k], m[k], rtol=0, atol=1e-6)
    # the gathered state re-sharded into a fresh model and optimizer: this rank's slices come back exactly
    fresh = model(seed=1, **kw)
    resharded = expert_parallel.shard_experts(fresh, world)
    opt = optim.configure_optimizer(fresh, 1e-3, 0.1, (0.9, 0.95), "cpu")
    expert_parallel.map_experts(opt, resharded, state, opt_state, lambda t: t.chunk(world)[rank].clone())
    fresh.load_state_dict(state)
    opt.load_state_dict(opt_state)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), ep.parameters()))
    for a, b in zip(opt.state.values(), opts[1].state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq"))
    # balancing: each rank counts its experts' tokens from all ranks; summed (as train.py does), the loads
    # are the global ones
    for g in ep.gates():
        torch.distributed.all_reduce(g.load)
    assert torch.equal(ref.update_expert_bias(), ep.update_expert_bias())
    assert all(torch.equal(a.bias, b.bias) for a, b in zip(ref.gates(), ep.gates()))
    # one expert group per rank: a token reaches at most n_limited_groups ranks, one of them maybe its own;
    # a send carries the token (dim fp32), its K gate values (fp32) and K expert ids (int32), and dim fp32 back
    K, moes = ep.args.n_activated_experts, [m for m in ep.modules() if isinstance(m, expert_parallel.ParallelMoE)]
    assert len(moes) == len(ep.gates())
    for m in moes:
        assert m.sends <= min(m.copies, m.tokens * ep.args.n_limited_groups) and m.copies <= K * m.tokens
        assert m.bytes == m.sends * (2 * D + 2 * K) * 4
    assert sum(m.sends for m in moes) > 0
    # under bf16 autocast the tokens and gate values travel in bf16 (half the bytes; the ids stay int32) and the
    # loss is the single process's within bf16 rounding
    for m in moes:
        m.sends = m.bytes = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, want = ref(idx, tgt)
        _, got = ddp(idx[2 * rank:2 * rank + 2], tgt[2 * rank:2 * rank + 2])
    total = got["total"].detach().clone()
    torch.distributed.all_reduce(total)
    assert abs(total.item() / world - want["total"].item()) < 2e-2
    for m in moes:
        assert m.bytes == m.sends * ((2 * D + K) * 2 + K * 4)
    # Muon (the same gradients): each rank orthogonalizes the experts it holds, one by one, so its update is the
    # single process's slice (one orthogonalization per rank's stack would not be)
    before, ep_before = ({n: p.detach().clone() for n, p in m.named_parameters()} for m in (ref, ep))
    for m in (ref, ep):
        optim.configure_optimizer(m, 1e-3, 0.1, (0.9, 0.95), "cpu", "muon").step()
    for name, p in ep.named_parameters():
        want = full[name].detach() - before[name]
        want = want.chunk(world)[rank] if name in sharded else want
        torch.testing.assert_close(p.detach() - ep_before[name], want, rtol=0, atol=1e-5, msg=name)
    del ddp
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world,kw", [(2, dict(n_expert_groups=2, n_limited_groups=1)),
                                      (4, dict(n_expert_groups=4, n_limited_groups=2, n_activated_experts=3))])
def test_expert_parallel_matches_single_process(tmp_path, world, kw):
    torch.multiprocessing.spawn(ep_worker, args=(world, str(tmp_path / "store"), kw), nprocs=world)


@pytest.mark.slow
def test_expert_parallel_training_matches_ddp(tmp_path, text_file, data_dir, capsys):
    # 2 ranks, one expert group each, n_limited_groups 1: every token is sent to at most one other rank;
    # 3 eval batches over 2 ranks: one rank runs an extra, uncounted forward so the exchanges pair up
    kw = dict(max_iters=6, eval_interval=3, eval_iters=3, n_expert_groups=2, n_limited_groups=1)
    ddp = torchrun(tmp_path, text_file, data_dir, "ddp", "--gradient_accumulation_steps=2", **kw)
    torchrun(tmp_path, text_file, data_dir, "ep", "--gradient_accumulation_steps=2", "--expert_parallel=True",
             "--max_iters=3", **kw)
    ep = torchrun(tmp_path, text_file, data_dir, "ep", "--init_from=resume", "--expert_parallel=True", **kw)
    a, b = entries(ddp, "train"), entries(ep, "train")
    sizes = ("params", "active_params", "mtp_params", "flops_per_token")    # the whole model's, counted before sharding
    assert [entries(ep, "config")[0][k] for k in sizes] == [entries(ddp, "config")[0][k] for k in sizes]
    assert [e["step"] for e in b] == list(range(1, 7)) and all("a2a_sends_per_token" not in e for e in a)
    for x, y in zip(a, b, strict=True):
        assert x["maxvio"] == y["maxvio"] and x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        assert all(0 < v <= 1 for v in y["a2a_sends_per_token"]) and y["a2a_bytes_per_step"] > 0
        assert all(s <= c <= 2 for s, c in zip(y["a2a_sends_per_token"], y["a2a_copies_per_token"]))
    assert entries(ddp, "eval")[-1]["val"] == pytest.approx(entries(ep, "eval")[-1]["val"], abs=1e-5)
    # rank 0 saved one ordinary checkpoint with all experts: as DDP's, to the last bit of Adam's noise
    m1, c1 = ckpts.load_checkpoint(tmp_path / "ddp" / "ckpt.pt")
    m2, c2 = ckpts.load_checkpoint(tmp_path / "ep" / "ckpt.pt")
    assert m2.layers[1].ffn.experts.w1.shape[0] == TINY["n_routed_experts"] and c2["iter_num"] == 6
    for (k, v), w in zip(c1["model"].items(), c2["model"].values()):
        torch.testing.assert_close(w, v, rtol=0, atol=0 if "gate.bias" in k else 1e-5, msg=k)
    for i, s in c1["optimizer"]["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(c2["optimizer"]["state"][i][k], s[k], rtol=0, atol=1e-6)
    assert sample.cli(["--device=cpu", f"--out_dir={tmp_path / 'ep'}", "--num_samples=1", "--max_new_tokens=5"]) == 0
    # and a single process resumes from it (expert_parallel is not inherited)
    log = run(tmp_path, text_file, data_dir, "--init_from=resume", "--max_iters=7", out="ep", **kw)
    assert entries(log, "train")[-1]["step"] == 7 and "a2a_sends_per_token" not in entries(log, "train")[-1]


@pytest.mark.parametrize("env,message", [
    ({}, "expert_parallel=True needs torchrun"),
    ({"RANK": "0", "WORLD_SIZE": "3"}, f"the world size 3 must divide n_routed_experts={TINY['n_routed_experts']}"),   # as torchrun sets it
])
def test_expert_parallel_bad_use_one_line_exit_2(tmp_path, text_file, monkeypatch, capsys, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    argv = [str(preset(tmp_path)), f"--text={text_file}", f"--data_dir={tmp_path / 'data'}",
            f"--out_dir={tmp_path / 'out'}", "--expert_parallel=True"]
    assert train.cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "data").exists()          # stopped before any work


# ----------------------------------------------------------------------------- training: checkpoints

@pytest.mark.slow
def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, text_file, data_dir, trained):
    shutil.copytree(trained[0], tmp_path / "out")
    path = tmp_path / "out" / "ckpt.pt"
    before = path.read_bytes()
    # a process killed (SIGKILL) halfway through writing the next checkpoint
    code = ("import os, signal, torch\nfrom checkpoint.ckpt import save_checkpoint\n"
            f"ckpt = torch.load({str(path)!r}, weights_only=True); ckpt['iter_num'] = 999\n"
            "real = torch.save\n"
            "def dying(obj, f):\n"
            "    real(obj, f); f.flush(); f.truncate(f.tell() // 2); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
            "torch.save = dying\n"
            f"save_checkpoint(ckpt, {str(path)!r})\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=120)
    assert r.returncode == -9
    tmp = path.with_name("ckpt.pt.tmp")
    assert tmp.exists() and path.read_bytes() == before
    _, ckpt = ckpts.load_checkpoint(path)
    assert ckpt["iter_num"] == 40
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        ckpts.load_checkpoint(tmp)
    # the run resumes from the intact checkpoint
    log = run(tmp_path, text_file, data_dir, "--init_from=resume", "--max_iters=42", max_iters=40, eval_interval=20)
    assert [e["step"] for e in entries(log, "train")][-3:] == [40, 41, 42]


def test_load_checkpoint_reads_to_cpu_and_moves_only_the_weights(trained, monkeypatch):
    maps, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: maps.append(k.get("map_location")) or load(*a, **k))
    model, ckpt = ckpts.load_checkpoint(trained[0] / "ckpt.pt", "meta")     # meta: any device but the CPU
    assert maps == ["cpu"] and all(p.is_meta for p in model.parameters())
    state = ckpt["optimizer"]["state"]
    assert state and all(t.device.type == "cpu" for s in state.values() for t in s.values())


def test_load_checkpoint_rejects_bad_files(tmp_path):
    cases = {"missing.pt": None, "garbage.pt": b"\x00\x01garbage" * 10,
             "foreign.pt": {"weights": torch.ones(2)}, "tensor.pt": torch.ones(3)}
    for name, content in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            torch.save(content, path)
        with pytest.raises(ValueError) as e:
            ckpts.load_checkpoint(path)
        assert "\n" not in str(e.value) and str(path) in str(e.value), name


def test_saved_config_keeps_dtype_as_given(trained, tmp_path, text_file, data_dir, capsys):
    """A checkpoint saves dtype as it was given ("auto"), so a run continued on another machine resolves it there;
    an explicit float16 that reaches a CPU from a checkpoint is a one-line error naming where it came from."""
    out, log = trained
    ckpt = ckpts.read_checkpoint(out / "ckpt.pt")
    assert ckpt["config"]["dtype"] == "auto" == log[0]["config"]["dtype"]
    ckpt["config"]["dtype"] = "float16"
    ckpts.save_checkpoint(ckpt, tmp_path / "fp16" / "ckpt.pt")
    assert train.cli([f"--init_from={tmp_path / 'fp16'}", f"--out_dir={tmp_path / 'x'}", "--device=cpu"]) == 2
    err = capsys.readouterr().err
    assert f"dtype float16, from {tmp_path / 'fp16' / 'ckpt.pt'}'s config, needs a CUDA device" in err
    c, _, _ = train.configure([f"--init_from={tmp_path / 'fp16'}", f"--out_dir={tmp_path / 'x'}", "--device=cpu",
                               "--dtype=auto"], log=lambda *a: None)
    assert configurator.compute_dtype(c.dtype, "cpu") == torch.float32


# ----------------------------------------------------------------------------- training: context extension (report §4.3)

@pytest.fixture(scope="module")
def rope_base(tmp_path_factory, text_file, data_dir):
    """A checkpoint trained at context 32 with 16 RoPE frequencies (one step is enough: only its weights matter)."""
    root = tmp_path_factory.mktemp("rope_base")
    run(root, text_file, data_dir, out="base", max_iters=1, eval_interval=1, eval_iters=1, qk_rope_head_dim=32)
    return root / "base"


def test_extension_keeps_the_weights_and_changes_only_rope(rope_base, tmp_path):
    """train.py --init_from=FOLDER at a longer block_size with YaRN's fields: the new run starts at step 0 from the
    checkpoint's weights bit for bit, and only the RoPE tables and the softmax scale differ, as YaRN says for the new
    fields: a dimension that turns more than beta_fast times over original_seq_len keeps its frequency, one that
    turns fewer than beta_slow times has it divided by rope_factor, one between lies on the ramp between."""
    L, s, beta_fast, beta_slow = 32, 4.0, 4, 1
    c, ckpt, device = train.configure([f"--init_from={rope_base}", f"--out_dir={tmp_path / 'ext'}", "--block_size=128",
                                       f"--original_seq_len={L}", f"--rope_factor={s}", f"--beta_fast={beta_fast}",
                                       "--device=cpu"])
    _, _, meta = data.load_data(c, ckpt, 0, lambda *a: None)
    ext, _, optimizer, _, step, best, _ = train.init_model(c, meta, ckpt, "cpu", torch.float32, 0, 1, lambda *a: None)
    base, _ = ckpts.load_checkpoint(rope_base / "ckpt.pt")
    assert step == 0 and best == float("inf") and not optimizer.state_dict()["state"]    # a fresh optimizer
    assert c.batch_size == TINY["batch_size"] and c.block_size == 128         # the base's config but the keys given
    a, b = ext.state_dict(), base.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)               # every weight and bias
    assert {k for k, v in ext.args.__dict__.items() if base.args.__dict__[k] != v} == \
        {"max_seq_len", "original_seq_len", "rope_factor", "beta_fast"}
    buffers = dict(base.named_buffers())
    assert {k for k, t in ext.named_buffers() if not torch.equal(t, buffers[k])} == {"rope_cos", "rope_sin"}
    scales = [[m.softmax_scale for m in model.modules() if isinstance(m, ds.Attention)] for model in (base, ext)]
    mscale = 0.1 * math.log(s) + 1                              # (the MTP block's attention too)
    assert scales[0] == [(8 + 32) ** -0.5] * 3 and scales[1] == pytest.approx([(8 + 32) ** -0.5 * mscale ** 2] * 3)
    # the frequencies: the angles at position 1; the tables as DeepSeek's precompute_freqs_cis
    theta = 10000.0 ** (-torch.arange(0, 32, 2, dtype=torch.float64) / 32)
    torch.testing.assert_close(torch.atan2(base.rope_sin[1], base.rope_cos[1]).double(), theta)
    freq = torch.atan2(ext.rope_sin[1], ext.rope_cos[1]).double()
    turns = L * theta / (2 * math.pi)
    fast, slow = turns > beta_fast, turns < beta_slow
    ramp = (1 - freq / theta) / (1 - 1 / s)                    # 0: kept, 1: divided by s
    assert fast.sum() >= 1 and slow.sum() >= 1 and (~fast & ~slow).sum() >= 2
    torch.testing.assert_close(freq[fast], theta[fast])
    torch.testing.assert_close(freq[slow], theta[slow] / s)
    assert ((0 < ramp[~fast & ~slow]) & (ramp[~fast & ~slow] < 1)).all() and (ramp.diff() >= -1e-6).all()
    cis = official_freqs(ext.args)
    torch.testing.assert_close(ext.rope_cos, cis.real)
    torch.testing.assert_close(ext.rope_sin, cis.imag)


@pytest.mark.parametrize("how", ["resume", "new run"])
def test_a_run_from_a_checkpoint_keeps_its_shapes_and_folder(rope_base, tmp_path, capsys, how):
    """A key that would change the weights' shapes is refused in one line naming it, before any work; a new run
    needs an out_dir of its own (the base's would be overwritten)."""
    before = {f: f.read_bytes() for f in rope_base.iterdir()}
    init = ["--init_from=resume", f"--out_dir={rope_base}"] if how == "resume" else [f"--init_from={rope_base}"]
    cases = [([*init, "--dim=48", "--n_layers=3", "--block_size=64", "--rope_factor=2.0"], "dim 32 -> 48, n_layers 2 -> 3 "
              "would change the shapes of")] + [([*init], "needs an out_dir of its own")] * (how == "new run")
    for argv, message in cases:
        assert train.cli(argv + ["--device=cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert {f: f.read_bytes() for f in rope_base.iterdir()} == before


# ----------------------------------------------------------------------------- sampling

CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def char_ckpt(tmp_path_factory, pattern_model):
    """A checkpoint as train.py writes it: the pattern-trained tiny model with a char tokenizer."""
    args = {**pattern_model.args.__dict__, "vocab_size": len(CHARS)}
    fresh = ds.Transformer(ds.ModelArgs(**args))
    state = {k: v.float() for k, v in pattern_model.state_dict().items() if k not in ("embed.weight", "head.weight")}
    fresh.load_state_dict({**fresh.state_dict(), **state})
    out = tmp_path_factory.mktemp("ckpt")
    ckpt = dict(model=fresh.state_dict(), model_args=args, meta={"tokenizer": "char", "chars": CHARS},
                optimizer={}, iter_num=0, best_val_loss=0.0, config={})
    ckpts.save_checkpoint(ckpt, out / "ckpt.pt")
    return out


def run_sample(capsys, *argv):
    rc = sample.cli(["--device=cpu", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_sample_speculative_greedy_text_equals_plain(char_ckpt, capsys):
    texts = []
    for spec in ("True", "False"):
        rc, out, _ = run_sample(capsys, f"--out_dir={char_ckpt}", "--start=ROMEO:", "--temperature=0",
                                "--num_samples=1", "--max_new_tokens=40", f"--speculative={spec}")
        assert rc == 0
        texts.append(out.split("---------------")[0])
        assert ("acceptance" in out) == (spec == "True")
    assert texts[0] == texts[1] and texts[0].startswith("ROMEO:") and len(texts[0]) == 6 + 40 + 1


def test_extended_checkpoint_samples_past_the_old_context(rope_base, tmp_path, text_file, data_dir, capsys):
    """The phase itself (train.py from rope_base at 128 with YaRN, 2 steps) writes a checkpoint of context 128 into
    its own folder; sample.py decodes from it to 100 tokens past the base's 32 without sliding, the speculative
    greedy text equal to the plain one."""
    before = (rope_base / "ckpt.pt").read_bytes()
    log = run(tmp_path, text_file, data_dir, f"--init_from={rope_base}", "--block_size=128", "--original_seq_len=32",
              "--rope_factor=4.0", out="ext", max_iters=2, eval_interval=2, eval_iters=1, qk_rope_head_dim=32)
    assert [e["step"] for e in entries(log, "train")] == [1, 2] and (rope_base / "ckpt.pt").read_bytes() == before
    capsys.readouterr()
    texts = []
    for spec in ("True", "False"):
        rc, out, err = run_sample(capsys, f"--out_dir={tmp_path / 'ext'}", "--start=and the ", "--temperature=0",
                                  "--num_samples=1", "--max_new_tokens=100", f"--speculative={spec}")   # in either text
        assert rc == 0 and "slides" not in err
        texts.append(out.split("\n---------------")[0])
    assert texts[0] == texts[1] and len(texts[0]) == 8 + 100


def test_sample_prompt_file_and_cropping(char_ckpt, capsys, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("A" * 50)
    rc, out, err = run_sample(capsys, f"--out_dir={char_ckpt}", f"--start=FILE:{prompt}", "--num_samples=1",
                              "--max_new_tokens=5", "--attn_impl=naive")
    assert rc == 0 and "cropped from the left" in err and "slides" in err
    text = out.split("\n---------------")[0]
    assert len(text) == 24 + 5 and text.startswith("A" * 24)      # cropped to the 24-token window


@pytest.mark.parametrize("argv,message", [
    (["--start=héllo"], "characters not in the vocabulary: 'é'"),
    (["--device=cuda:7"], "device 'cuda:7'"), (["--device=nonsense"], "unknown device"),   # devices
    (["--start=FILE:/no/such/prompt.txt"], "prompt file"),
    (["--speculative=maybe"], "speculative must be bool, not 'maybe'"),
    (["--top_k=0"], ">= 1"),
    (["--show_experts=0"], "--show_experts=0: not an MoE layer of this model (those are 1; layers count from 0)"),
    (["--show_experts=2"], "not an MoE layer"), (["--show_experts=one"], "show_experts must be int, not 'one'"),
])
def test_sample_bad_input(char_ckpt, capsys, argv, message):
    rc, out, err = run_sample(capsys, f"--out_dir={char_ckpt}", *argv)
    assert rc == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err


def show_experts_run(capsys, ckpt, *argv):
    """sample.py --show_experts=1, greedy: (its header line, the marked text of the one sample, exit code)."""
    rc, out, _ = run_sample(capsys, f"--out_dir={ckpt}", "--start=ROMEO:", "--temperature=0", "--num_samples=1",
                            "--max_new_tokens=34", "--show_experts=1", *argv)
    header, text = out.split("\n", 1)
    return header, text.split("\n---------------")[0], rc


def test_show_experts_marks_each_token_with_the_gates_choice(char_ckpt, capsys, monkeypatch):
    header, marked, rc = show_experts_run(capsys, char_ckpt)
    assert rc == 0 and header.endswith("(of 8) in MoE layer 1: token[expert]")
    pairs = re.findall(r"(.)\[(\d+)\]", marked, re.S)
    text, experts = "".join(c for c, _ in pairs), [int(e) for _, e in pairs]
    assert "".join(f"{c}[{e}]" for c, e in pairs) == marked and text.startswith("ROMEO:") and len(text) == 40
    # the reference: Gate.forward on layer 1's FFN input, the 40 tokens read in windows of the context (24)
    m, _ = ckpts.load_checkpoint(char_ckpt / "ckpt.pt")
    ref = []
    for chunk in torch.tensor([[CHARS.index(c) for c in text]]).split(m.args.max_seq_len, dim=1):
        cos, sin, _ = m.positions(None, chunk.size(1))
        h = m.layers[0](m.embed(chunk), cos, sin)
        block = m.layers[1]
        h = h + block.attn(block.attn_norm(h), cos, sin)
        _, weights, ids = block.ffn.gate(block.ffn_norm(h).flatten(0, 1))
        ref += ids.gather(1, weights.argmax(1, keepdim=True))[:, 0].tolist()
    assert experts == ref and len(set(ref)) > 1
    # on a terminal: the same tokens, each on its expert's colour, and a legend of all 8 colours
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    header, coloured, rc = show_experts_run(capsys, char_ckpt)
    assert rc == 0 and all(f"\x1b[30;48;5;{routing.COLOURS[e]}m {e} \x1b[0m" in header for e in range(8))
    assert coloured == routing.mark_experts(list(text), experts, terminal=True)
    assert re.sub(r"\x1b\[[\d;]*m", "", coloured) == text.replace("\n", " \n")


def test_show_experts_rejects_a_dense_checkpoint(tmp_path, capsys):
    args = dict(tiny(n_routed_experts=0, vocab_size=len(CHARS)).__dict__)
    ckpt = dict(model=ds.Transformer(ds.ModelArgs(**args)).state_dict(), model_args=args, optimizer={}, iter_num=0,
                meta={"tokenizer": "char", "chars": CHARS}, best_val_loss=0.0, config={})
    ckpts.save_checkpoint(ckpt, tmp_path / "ckpt.pt")
    rc, _, err = run_sample(capsys, f"--out_dir={tmp_path}", "--show_experts=1")
    assert rc == 2 and err == "error: --show_experts: the checkpoint's model is dense (n_routed_experts=0): no routed experts\n"


def test_printed_times_wait_for_cuda(char_ckpt, capsys, monkeypatch):
    """CUDA runs asynchronously: every clock read that a printed time uses synchronizes first."""
    syncs = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(a))
    rc, out, _ = run_sample(capsys, f"--out_dir={char_ckpt}", "--num_samples=2", "--max_new_tokens=2")
    assert rc == 0 and "tokens/s" in out and len(syncs) == 4                # before and after each sample
    times, outs = bench_common.timed([lambda: 1, lambda: 2], 3)
    assert len(syncs) == 4 + 12 and outs == [1, 2] and len(times) == 2 and min(times) >= 0


@pytest.mark.slow
def test_sample_flags_are_exact_with_a_suggestion(char_ckpt, tmp_path):
    """python sample.py takes whole keys only: a prefix (--max_new_token) or a typo (--temprature) is one line naming
    the nearest key, exit 2, nothing sampled."""
    for flag, near in (("--max_new_token=5", "max_new_tokens"), ("--temprature=0.5", "temperature")):
        r = subprocess.run([sys.executable, "sample.py", f"--out_dir={char_ckpt}", "--device=cpu", flag], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1
        assert f"(did you mean {near}?)" in r.stderr


def test_sample_bad_checkpoint(tmp_path, capsys):
    (tmp_path / "missing").mkdir()
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "ckpt.pt").write_bytes(b"\x80\x04 not a checkpoint")
    (tmp_path / "foreign").mkdir()
    torch.save({"state_dict": {}}, tmp_path / "foreign" / "ckpt.pt")
    for name, message in [("missing", "no checkpoint"), ("corrupt", "not a readable checkpoint"),
                          ("foreign", "not a train.py checkpoint")]:
        rc, _, err = run_sample(capsys, f"--out_dir={tmp_path / name}")
        assert rc == 2 and message in err and err.count("\n") == 1


# ----------------------------------------------------------------------------- DeepSeek's checkpoint format (hf.py)

CHAR_META = dict(tokenizer="char", chars="".join(chr(33 + i) for i in range(V)), vocab_size=V)
# the config families the format carries; the test model otherwise: MLA with a low-rank query, 4 groups keep 2, MTP
FAMILIES = {"v3": {}, "no q_lora": dict(q_lora_rank=0), "no groups": dict(n_expert_groups=1, n_limited_groups=1),
            "yarn": dict(max_seq_len=64, original_seq_len=16, rope_factor=4.0, mscale=0.707, beta_fast=16, beta_slow=2),
            "v2 softmax": dict(score_func="softmax", n_expert_groups=1, n_limited_groups=1, bias_update_speed=0.0),
            "v2 softmax, groups": dict(score_func="softmax", bias_update_speed=0.0),
            "no mtp": dict(n_mtp=0), "dense": dict(n_routed_experts=0)}
# widths past 128, so that DeepSeek-V3's 128 x 128 FP8 blocks come whole and partial at the edges
RELEASE = dict(dim=160, inter_dim=200, moe_inter_dim=136, q_lora_rank=136, kv_lora_rank=136)


def family(name, seed=0):
    m = model(seed, **FAMILIES[name]).eval()
    if m.args.score_func == "softmax":           # DeepSeek-V2's gate has no balancing bias
        for g in m.gates():
            g.bias.zero_()
    return m


def mtp_logits(m, x):
    """The first MTP module's logits for tokens x: from the main model's hidden states and the next tokens."""
    module = m.mtp[0]
    cos, sin, _ = m.positions(None, x.size(1) - 1)
    return m.logits(module(m.hidden(x)[:, :-1], m.embed(x[:, 1:]), cos, sin), module.norm)


def same_weights(a, b):
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", FAMILIES)
def test_hf_round_trip_is_bit_for_bit(name, tmp_path):
    """ours -> DeepSeek's layout (several shards and an index) -> ours: the same tensors bit for bit, the same config
    (a dense model's first_k_dense_replace covers all its layers), the same logits; V2's softmax gate as deepseek_v2."""
    m = family(name)
    files = hf.export(m, CHAR_META, tmp_path / "hf", max_shard_bytes=40_000)
    assert "model.safetensors.index.json" in files and "tokenizer.json" in files
    loaded, meta = hf.load(tmp_path / "hf")
    assert same_weights(m, loaded) and meta == CHAR_META
    changed = {f.name for f in dataclasses.fields(ds.ModelArgs)
               if getattr(m.args, f.name) != getattr(loaded.args, f.name)}
    assert changed == ({"n_dense_layers"} if name == "dense" else set())
    x = torch.randint(0, V, (2, 16))
    assert torch.equal(m(x)[0], loaded(x)[0])
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == ("deepseek_v2" if name.startswith("v2") else "deepseek_v3")
    assert (config["rope_scaling"] is not None) == (name == "yarn")


@pytest.mark.parametrize("rope_interleave", [True, False])
def test_hf_loads_deepseek_v3_release_layout(rope_interleave, tmp_path):
    """A folder as DeepSeek-V3 is released (bench_hf.write_release): FP8 weights with a scale per 128 x 128 block, edge
    blocks partial, two shards and an index, the MTP module as the layer after the last with eh_proj taking
    [embedding; h], and RoPE rows interleaved or [evens, odds]: it loads as the same weights (FP8 values times
    their scales) loaded directly, with their logits and MTP logits."""
    from safetensors import safe_open
    m = model(**RELEASE).eval()
    stored = bench_hf.write_release(m, tmp_path / "v3", shards=2, rope_interleave=rope_interleave)
    weight_map = json.loads((tmp_path / "v3" / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.experts.0.gate_proj.weight"       # (136, 160): 2 x 2 blocks, 3 of them partial
    with safe_open(tmp_path / "v3" / weight_map[name], "pt") as f:
        assert f.get_tensor(name).dtype == torch.float8_e4m3fn
    with safe_open(tmp_path / "v3" / weight_map[name + "_scale_inv"], "pt") as f:
        assert f.get_tensor(name + "_scale_inv").shape == (2, 2)
    assert len(set(weight_map.values())) == 2 and "model.layers.3.eh_proj.weight" in weight_map
    loaded, _ = hf.load(tmp_path / "v3")
    direct = model(**RELEASE).eval()
    direct.load_state_dict(stored)
    assert same_weights(direct, loaded) and not torch.equal(stored["layers.1.ffn.experts.w1"],
                                                            m.state_dict()["layers.1.ffn.experts.w1"])
    x = torch.randint(0, V, (2, 16))
    assert torch.equal(loaded(x)[0], direct(x)[0]) and torch.equal(mtp_logits(loaded, x), mtp_logits(direct, x))


def test_hf_reads_the_stacked_experts_transformers_5_holds(tmp_path):
    """Each layer's experts as transformers 5 stacks them (gate_up_proj (E, 2I, D) = [gate; up], down_proj) load as
    the per-expert tensors do."""
    from safetensors.torch import load_file, save_file
    m = family("v3")
    hf.export(m, None, tmp_path / "a")
    t = load_file(tmp_path / "a" / "model.safetensors")
    for layer in range(1, m.args.n_layers + m.args.n_mtp):
        p = f"model.layers.{layer}.mlp.experts."
        w = {proj: torch.stack([t.pop(f"{p}{e}.{proj}.weight") for e in range(m.args.n_routed_experts)])
             for proj in ("gate_proj", "up_proj", "down_proj")}
        t[p + "gate_up_proj"], t[p + "down_proj"] = torch.cat([w["gate_proj"], w["up_proj"]], dim=1), w["down_proj"]
    (tmp_path / "b").mkdir()
    save_file(t, tmp_path / "b" / "model.safetensors")
    shutil.copy(tmp_path / "a" / "config.json", tmp_path / "b")
    assert same_weights(m, hf.load(tmp_path / "b")[0])


def test_hf_folder_without_its_mtp_layer_loads_without_mtp(tmp_path):
    """transformers drops the MTP layer when it saves a model (config.json still counts it): such a folder loads as
    the main model alone; an MTP layer with a tensor missing is an error naming it."""
    from safetensors.torch import load_file, save_file
    m = family("v3")
    hf.export(m, None, tmp_path / "hf")
    t = load_file(tmp_path / "hf" / "model.safetensors")
    save_file({k: v for k, v in t.items() if not k.startswith("model.layers.3.")},
              tmp_path / "hf" / "model.safetensors")
    loaded = hf.load(tmp_path / "hf")[0]
    x = torch.randint(0, V, (2, 16))
    assert loaded.args.n_mtp == 0 and torch.equal(loaded(x)[0], m(x)[0])
    save_file({k: v for k, v in t.items() if k != "model.layers.3.enorm.weight"}, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(configurator.UserError, match="model.layers.3.enorm.weight is missing"):
        hf.load(tmp_path / "hf")


def test_hf_load_in_bfloat16_keeps_the_gate_bias_fp32(tmp_path):
    m = family("v3")
    hf.export(m, None, tmp_path / "hf")
    loaded, meta = hf.load(tmp_path / "hf", torch.bfloat16)
    assert meta is None and loaded.layers[1].ffn.gate.bias.dtype == torch.float32
    state = loaded.state_dict()
    assert all(state[k].dtype == (torch.float32 if k.endswith("gate.bias") else torch.bfloat16) and
               torch.equal(state[k], v.to(state[k].dtype)) for k, v in m.state_dict().items())
    assert loaded.generate(torch.tensor([[1, 2, 3]]), 4, temperature=0).shape == (1, 7)


def test_sample_in_bfloat16_keeps_gate_biases_and_rope_fp32(trained, tmp_path):
    """Loading a ckpt.pt in bf16 (sample.py --dtype=bfloat16) casts the weights alone: the gates' biases and the RoPE
    tables stay fp32, as a folder in DeepSeek's layout loads (hf.load), and both route every token alike."""
    out, _ = trained
    assert export.cli([f"--init_from={out}", f"--out_dir={tmp_path / 'hf'}"]) == 0
    a, _ = ckpts.load_model(out, dtype=torch.bfloat16)
    b, _ = ckpts.load_model(tmp_path / "hf", dtype=torch.bfloat16)
    for m in (a, b):
        assert all(p.dtype == torch.bfloat16 for p in m.parameters())
        assert all(g.bias.dtype == torch.float32 for g in m.gates()) and m.rope_cos.dtype == torch.float32
    idx = torch.randint(0, a.args.vocab_size, (4, 32), generator=torch.Generator().manual_seed(0))
    chosen = [{i: e for i, (_, e) in routing.routing(m, idx)[1].items()} for m in (a, b)]
    assert all(torch.equal(chosen[0][i], chosen[1][i]) for i in chosen[0])


def test_fine_tuning_a_folder_on_a_cpu_takes_the_cpu_budget(trained, tmp_path):
    """train.py --init_from=FOLDER in DeepSeek's layout on a CPU with no preset trains with the CPU preset's budget
    (batch 12 x the folder's context, 1610 Muon steps, no dropout), as a preset-less run from scratch does, and the
    folder's model."""
    out, _ = trained
    assert export.cli([f"--init_from={out}", f"--out_dir={tmp_path / 'hf'}"]) == 0
    c, ckpt, _ = train.configure([f"--init_from={tmp_path / 'hf'}", f"--out_dir={tmp_path / 'ft'}", "--device=cpu"],
                                 log=lambda *a: None)
    cpu = configurator.parse_config([train.CPU_PRESET], train.DEFAULTS)[0]
    assert (c.batch_size, c.max_iters, c.dropout, c.eval_iters, c.optimizer) == (12, 1610, 0.0, 20, "muon") == \
        tuple(cpu[k] for k in ("batch_size", "max_iters", "dropout", "eval_iters", "optimizer"))
    assert (c.dim, c.n_layers, c.block_size) == (TINY["dim"], TINY["n_layers"], TINY["block_size"])


def test_sample_takes_either_kind_of_folder_with_either_flag(trained, tmp_path, capsys):
    """sample.py reads a train.py out_dir (ckpt.pt) or a folder in DeepSeek's layout given as --out_dir or as
    --init_from, the same text from both; a folder with neither says what it lacks."""
    out, _ = trained
    assert export.cli([f"--init_from={out}", f"--out_dir={tmp_path / 'hf'}"]) == 0
    capsys.readouterr()
    texts = []
    for flag, folder in itertools.product(("--out_dir", "--init_from"), (out, tmp_path / "hf")):
        rc, text, _ = run_sample(capsys, f"{flag}={folder}", "--temperature=0", "--num_samples=1", "--max_new_tokens=8")
        assert rc == 0
        texts.append(text.split("---------------")[0])
    assert len(set(texts)) == 1
    (tmp_path / "empty").mkdir()
    rc, _, err = run_sample(capsys, f"--init_from={tmp_path / 'empty'}")
    assert rc == 2 and "holds neither a ckpt.pt nor DeepSeek's layout" in err


# DeepSeek-V2-Lite's and DeepSeek-V3's config.json as released (transformers 4.33 era, remote code)
V2_LITE = dict(architectures=["DeepseekV2ForCausalLM"], attention_bias=False, attention_dropout=0.0,
               auto_map={"AutoConfig": "configuration_deepseek.DeepseekV2Config"}, aux_loss_alpha=0.001,
               bos_token_id=100000, eos_token_id=100001, first_k_dense_replace=1, hidden_act="silu", hidden_size=2048,
               initializer_range=0.02, intermediate_size=10944, kv_lora_rank=512, max_position_embeddings=163840,
               model_type="deepseek_v2", moe_intermediate_size=1408, moe_layer_freq=1, n_group=1,
               n_routed_experts=64, n_shared_experts=2, norm_topk_prob=False, num_attention_heads=16,
               num_experts_per_tok=6, num_hidden_layers=27, num_key_value_heads=16, pretraining_tp=1, q_lora_rank=None,
               qk_nope_head_dim=128, qk_rope_head_dim=64, rms_norm_eps=1e-06,
               rope_scaling=dict(beta_fast=32, beta_slow=1, factor=40, mscale=0.707, mscale_all_dim=0.707,
                                 original_max_position_embeddings=4096, type="yarn"),
               rope_theta=10000, routed_scaling_factor=1.0, scoring_func="softmax", seq_aux=True,
               tie_word_embeddings=False, topk_group=1, topk_method="greedy", torch_dtype="bfloat16",
               transformers_version="4.33.1", use_cache=True, v_head_dim=128, vocab_size=102400)
V3 = dict(V2_LITE, architectures=["DeepseekV3ForCausalLM"], bos_token_id=0, eos_token_id=1, ep_size=1,
          first_k_dense_replace=3, hidden_size=7168, intermediate_size=18432, model_type="deepseek_v3",
          moe_intermediate_size=2048, n_group=8, n_routed_experts=256, n_shared_experts=1, norm_topk_prob=True,
          num_attention_heads=128, num_experts_per_tok=8, num_hidden_layers=61, num_key_value_heads=128,
          num_nextn_predict_layers=1, q_lora_rank=1536,
          quantization_config=dict(activation_scheme="dynamic", fmt="e4m3", quant_method="fp8",
                                   weight_block_size=[128, 128]),
          rope_scaling=dict(V2_LITE["rope_scaling"], mscale=1.0, mscale_all_dim=1.0), routed_scaling_factor=2.5,
          scoring_func="sigmoid", topk_group=4, topk_method="noaux_tc", vocab_size=129280)


def test_hf_released_configs_are_the_official_inference_configs(tmp_path):
    """DeepSeek-V2-Lite's and DeepSeek-V3's config.json map to the ModelArgs of DeepSeek's own inference configs for
    the same models (config_16B.json, config_671B.json), but for the context (163840 against the inference code's
    default 16384, YaRN on in both) and V3's MTP module (the inference code drops it)."""
    for cfg, name in ((V2_LITE, "16B"), (V3, "671B")):
        a, interleaved, block = hf.args_from_config(cfg, "config.json")
        b = official(tmp_path, name)
        changed = {f.name for f in dataclasses.fields(ds.ModelArgs) if getattr(a, f.name) != getattr(b, f.name)}
        assert changed == {"max_seq_len"} | ({"n_mtp"} if name == "671B" else set()), name
        assert a.max_seq_len == 163840 and interleaved and block == (128 if name == "671B" else None)
    # YaRN's attention scale: transformers' mscale_all_dim is DeepSeek's mscale (softmax scale times mscale^2)
    a = hf.args_from_config(V2_LITE, "config.json")[0]
    assert ds.MLA(a).softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * 0.707 * math.log(40) + 1) ** 2)


@pytest.mark.parametrize("change,message", [
    (dict(model_type="llama"), "model_type 'llama' is not supported (deepseek_v3 or deepseek_v2)"),
    (dict(use_sliding_window=True), "config key use_sliding_window is not supported"),
    (dict(hidden_size=None), "config key hidden_size is missing"),
    (dict(attention_bias=True), "attention_bias=True is not supported"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (dict(rms_norm_eps=1e-5), "rms_norm_eps=1e-05 is not supported"),
    (dict(moe_layer_freq=2), "moe_layer_freq=2 is not supported"),
    (dict(scoring_func="softmax"), "scoring_func='softmax' is not supported with model_type deepseek_v3"),
    (dict(norm_topk_prob=False), "norm_topk_prob=False is not supported"),
    (dict(model_type="deepseek_v2", topk_method="noaux_tc", scoring_func="softmax", norm_topk_prob=False),
     "topk_method='noaux_tc' is not supported with model_type deepseek_v2"),
    (dict(rope_scaling=dict(V3["rope_scaling"], mscale=0.707)), "rope_scaling.mscale=0.707 with mscale_all_dim=1.0"),
    (dict(rope_scaling=dict(V3["rope_scaling"], attention_factor=1.2)), "rope_scaling.attention_factor"),
    (dict(rope_scaling=dict(type="dynamic", factor=2.0)), "rope type 'dynamic' is not supported"),
    (dict(max_position_embeddings=4096), "max_position_embeddings=4096 with yarn must exceed"),
    (dict(quantization_config=dict(quant_method="fp8", fmt="e4m3", weight_block_size=[64, 64])), "quantization_config"),
    (dict(kv_lora_rank=0), "kv_lora_rank must be > 0"),
])
def test_hf_config_refuses_what_this_model_does_not_compute(change, message):
    cfg = {k: v for k, v in {**V3, **change}.items() if v is not None}
    with pytest.raises(configurator.UserError) as e:
        hf.args_from_config(cfg, "config.json")
    assert str(e.value).startswith("config.json: ") and message in str(e.value) and "\n" not in str(e.value)


def test_hf_export_refuses_what_the_layout_cannot_hold(tmp_path):
    with pytest.raises(configurator.UserError, match="DeepSeek's layout has MLA only"):
        hf.export(model(attn="mha"), None, tmp_path / "mha")
    with pytest.raises(configurator.UserError, match="softmax gate with a balancing bias"):
        hf.export(model(score_func="softmax"), None, tmp_path / "v2")          # model() gives the gates a bias
    assert not (tmp_path / "mha").exists() and not (tmp_path / "v2").exists()


def test_hf_char_tokenizer_round_trip(tmp_path, text_file):
    """The character vocabulary as tokenizer.json: the tokenizers package encodes and decodes as data.py does, an
    unknown character is an error in both; hf.tokenizer_meta recognises the file as the vocabulary it came from."""
    tokenizers = pytest.importorskip("tokenizers")
    text = text_file.read_text()[:20000] + "\t\r\n  é😀"
    meta = dict(tokenizer="char", chars="".join(sorted(set(text))), vocab_size=len(set(text)))
    (tmp_path / "tokenizer.json").write_text(json.dumps(hf.tokenizer_json(meta)))
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    encode, decode = data.tokenizer_from_meta(meta)
    ids = tok.encode(text).ids
    assert ids == encode(text) and tok.decode(ids) == decode(ids) == text
    with pytest.raises(Exception, match="UNK"):
        tok.encode("\x07")
    assert hf.tokenizer_meta(tmp_path) == meta


@pytest.mark.slow
@pytest.mark.skipif(not HAS_BPE, reason="no local tiktoken cache")
def test_hf_bpe_tokenizer_round_trip(tmp_path, text_file):
    """GPT-2's BPE (tiktoken r50k_base) as a byte-level BPE tokenizer.json: the same tokens as tiktoken on English,
    code-like text, other scripts, emoji and the end-of-text special token; the same text back."""
    tokenizers = pytest.importorskip("tokenizers")
    meta = dict(tokenizer="bpe", encoding="r50k_base", vocab_size=50257)
    (tmp_path / "tokenizer.json").write_text(json.dumps(hf.tokenizer_json(meta)))
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    encode, decode = data.tokenizer_from_meta(meta)
    text = (text_file.read_text()[:30000] + "\n\ndef f(x):\n\treturn x**2  # 1,000,000.5\n    \n"
            "Ünïcödé ΑΒΓ ñ 日本語のテキスト 😀👍🏽 it's we'll I'M<|endoftext|>next  \n\n\n  end")
    ids = tok.encode(text).ids
    assert ids == encode(text) and tok.decode(ids, skip_special_tokens=False) == decode(ids) == text and 50256 in ids
    assert hf.tokenizer_meta(tmp_path) == meta


def test_hf_foreign_tokenizer_runs_with_the_tokenizers_package(tmp_path, capsys, monkeypatch):
    """A tokenizer.json that is neither of ours (here: a chat special token in a character vocabulary) is run as it
    is by the tokenizers package: sample.py encodes the prompt with it; without the package, one line naming it."""
    pytest.importorskip("tokenizers")
    hf.export(family("v3"), CHAR_META, tmp_path / "hf")
    tok = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    tok["added_tokens"] = [dict(id=V - 1, content="<|end|>", single_word=False, lstrip=False, rstrip=False,
                                normalized=False, special=True)]
    tok["model"]["vocab"] = {k: v for k, v in tok["model"]["vocab"].items() if v < V - 1} | {"<|end|>": V - 1}
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps(tok))
    meta = hf.tokenizer_meta(tmp_path / "hf")
    assert meta == dict(tokenizer="hf", file=str(tmp_path / "hf" / "tokenizer.json"))
    encode, decode = data.tokenizer_from_meta(meta)
    assert encode("AB<|end|>") == [32, 33, V - 1] and decode([32, 33, V - 1]) == "AB<|end|>"
    rc, out, _ = run_sample(capsys, f"--init_from={tmp_path / 'hf'}", "--start=AB<|end|>", "--num_samples=1",
                            "--max_new_tokens=5", "--temperature=0")
    assert rc == 0 and out.startswith("AB<|end|>")
    rc, _, err = run_sample(capsys, f"--init_from={tmp_path / 'hf'}", "--start=abc")     # lower case: not in it
    assert rc == 2 and err.startswith("error: prompt: Exception: WordLevel error") and err.count("\n") == 1
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(configurator.UserError, match="needs the tokenizers package: pip install tokenizers"):
        data.tokenizer_from_meta(meta)


@pytest.mark.parametrize("case", ["truncated shard", "missing shard", "wrong shape", "unknown model_type",
                                  "unsupported key", "export target not empty"])
def test_hf_bad_input_one_line_exit_2(case, tmp_path, capsys):
    """Each command that reads a folder (train.py, sample.py, export.py) stops at bad input with one line naming it
    and exit code 2, before writing anything: no out_dir, no export folder, a non-empty target left as it was."""
    from safetensors.torch import load_file, save_file
    folder, out = tmp_path / "hf", tmp_path / "out"
    hf.export(family("v3"), CHAR_META, folder, max_shard_bytes=40_000)
    shards = sorted(folder.glob("*.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    if case == "truncated shard":
        shards[1].write_bytes(shards[1].read_bytes()[:-100])
        message = f"{shards[1]} is not a readable safetensors file"
    elif case == "missing shard":
        shards[2].unlink()
        message = f"{shards[2]}, named in model.safetensors.index.json, is missing"
    elif case == "wrong shape":
        name = "model.layers.0.self_attn.kv_b_proj.weight"
        shard = folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]
        t = load_file(shard)
        t[name] = t[name][:-1]
        save_file(t, shard)
        message = f"{name} has shape [63, 16], the config gives [64, 16]"
    elif case in ("unknown model_type", "unsupported key"):
        config.update(model_type="mixtral") if case == "unknown model_type" else config.update(sliding_window=128)
        (folder / "config.json").write_text(json.dumps(config))
        message = "model_type 'mixtral'" if case == "unknown model_type" else "config key sliding_window"
    else:
        (out / "sub").mkdir(parents=True)
        (out / "mine.txt").write_text("keep")
        message = f"{out} exists and is not an empty folder"
    runs = [export.cli([f"--init_from={folder}", f"--out_dir={out}"])]
    if case != "export target not empty":
        runs += [train.cli([f"--init_from={folder}", f"--out_dir={out}", "--device=cpu"]),
                 sample.cli([f"--init_from={folder}", "--device=cpu"])]
    errors = capsys.readouterr().err.splitlines()
    assert runs == [2] * len(runs) and len(errors) == len(runs), errors
    assert all(e.startswith("error: ") and message in e for e in errors), errors
    if case == "export target not empty":
        assert sorted(p.name for p in out.iterdir()) == ["mine.txt", "sub"] and (out / "mine.txt").read_text() == "keep"
    else:
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out"] if case == "export target not empty" else ["hf"]


@pytest.mark.slow
def test_hf_export_sample_and_fine_tune_commands(trained, tmp_path, text_file, data_dir, capsys):
    """python export.py out/ out-hf/; sample.py --init_from=out-hf gives the greedy text that sample.py gives from
    the checkpoint; train.py --init_from=out-hf trains as a new run from the checkpoint itself does (the same losses
    step for step), into its own out_dir, and refuses to change the weights' shapes."""
    out_dir, _ = trained
    assert export.cli([f"--init_from={out_dir}", f"--out_dir={tmp_path / 'hf'}"]) == 0
    assert "model_type deepseek_v3" in capsys.readouterr().out
    texts, prompt = [], text_file.read_text()[:6]          # characters of either test text
    for source in (f"--out_dir={out_dir}", f"--init_from={tmp_path / 'hf'}"):
        rc, out, _ = run_sample(capsys, source, f"--start={prompt}", "--temperature=0", "--num_samples=1",
                                "--max_new_tokens=20")
        texts.append(out.split("---------------")[0])
    assert rc == 0 and texts[0] == texts[1] and texts[0].startswith(prompt)
    logs = [run(tmp_path, text_file, data_dir, f"--init_from={source}", out=name, max_iters=2, eval_interval=2)
            for source, name in ((out_dir, "from-ckpt"), (tmp_path / "hf", "from-hf"))]
    losses = [[(e["kind"], e.get("loss"), e.get("val")) for e in log if e["kind"] in ("train", "eval")] for log in logs]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    assert train.cli([f"--init_from={tmp_path / 'hf'}", f"--out_dir={tmp_path / 'x'}", "--n_layers=3"]) == 2
    assert "n_layers 2 -> 3 would change the shapes" in capsys.readouterr().err


# transformers' side of test_hf_matches_transformers, run in a process of its own: transformers imports the PyPI
# package `kernels`, which this checkout's kernels.py would shadow
TRANSFORMERS_SIDE = '''
import glob, json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_layers import MtpLayer
from safetensors.torch import load_file
cases = json.loads(sys.argv[1])
x, prompt, h = torch.load(sys.argv[2])
results = {}
for name, folder in cases.items():
    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        r = dict(kind=type(m).__name__, logits=m(x).logits,
                 greedy=m.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12))
        if name in h and m.config.num_nextn_predict_layers:    # the MTP module, layer L, by transformers' MtpLayer
            L, E = m.config.num_hidden_layers, m.config.n_routed_experts
            layer = MtpLayer(m.config, type(m.model.layers[-1]), type(m.model.norm), L).eval()
            t = {k[len(f"model.layers.{L}."):]: v for f in glob.glob(folder + "/*.safetensors")
                 for k, v in load_file(f).items() if k.startswith(f"model.layers.{L}.")}
            if E:                                # transformers holds the experts stacked
                w = {p: torch.stack([t.pop(f"mlp.experts.{e}.{p}.weight") for e in range(E)])
                     for p in ("gate_proj", "up_proj", "down_proj")}
                t["mlp.experts.gate_up_proj"] = torch.cat([w["gate_proj"], w["up_proj"]], dim=1)
                t["mlp.experts.down_proj"] = w["down_proj"]
            del t["embed_tokens.weight"], t["shared_head.head.weight"]
            t = {("post_norm.weight" if k == "shared_head.norm.weight" else k if k.split(".")[0] in
                  ("enorm", "hnorm", "eh_proj") else "mtp_block." + k): v for k, v in t.items()}
            layer.load_state_dict(t, strict=True)
            pos = torch.arange(x.size(1) - 1)[None]
            out = layer(m.model.embed_tokens(x[:, 1:]), h[name][:, :-1], attention_mask=None, position_ids=pos,
                        position_embeddings=m.model.rotary_emb(h[name], pos), cache=None)
            r["mtp"] = m.lm_head(out)
    results[name] = r
    if name == "yarn":                           # transformers 5's own layout: rope_parameters, no MTP layer
        m.save_pretrained(folder + "-resaved")
texts = json.loads(sys.argv[3])
for name, text in texts.items():
    tok = AutoTokenizer.from_pretrained(cases[name])
    ids = tok(text)["input_ids"]
    results["tokenizer " + name] = dict(ids=ids, text=tok.decode(ids))
torch.save(results, sys.argv[4])
'''


@pytest.mark.slow
def test_hf_matches_transformers(tmp_path, text_file):
    """AutoModelForCausalLM.from_pretrained(exported folder) gives our logits within 1e-5 in fp32 and the same greedy
    tokens, for every config family (V2's softmax gate as DeepseekV2ForCausalLM) and for a folder with
    rope_interleave false; transformers' MtpLayer gives our MTP module's logits from the checkpoint's layer L
    (eh_proj taking [embedding; h]); AutoTokenizer encodes and decodes as our tokenizers; and what transformers'
    save_pretrained writes (rope_parameters, no MTP layer) loads back with our logits."""
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (pip install -r requirements-test.txt)")
    x, prompt = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(0)), torch.tensor([[5, 17, 3]])
    ours, cases, h = {}, {}, {}
    for name in FAMILIES:
        m = family(name)
        hf.export(m, CHAR_META, tmp_path / name, max_shard_bytes=40_000)
        ours[name], cases[name] = m, str(tmp_path / name)
    ours["rope_interleave false"] = model(1).eval()
    bench_hf.write_release(ours["rope_interleave false"], tmp_path / "ni", fp8_weights=False, rope_interleave=False)
    cases["rope_interleave false"] = str(tmp_path / "ni")
    texts = {"v3": "ABC!!\"[]XYZ"}
    if HAS_BPE:
        hf.export(model(vocab_size=50257, n_layers=2).eval(), dict(tokenizer="bpe", encoding="r50k_base",
                                                                  vocab_size=50257), tmp_path / "bpe")
        cases["bpe"] = str(tmp_path / "bpe")
        texts["bpe"] = text_file.read_text()[:2000] + " naïve café 😀<|endoftext|> it's  \n\n end"
    with torch.no_grad():
        h = {name: m.hidden(x) for name, m in ours.items()}
        torch.save((x, prompt, h), tmp_path / "inputs.pt")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        (tmp_path / "side.py").write_text(TRANSFORMERS_SIDE)
        r = subprocess.run([sys.executable, "side.py", json.dumps(cases), "inputs.pt", json.dumps(texts), "out.pt"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        theirs = torch.load(tmp_path / "out.pt", weights_only=False)
        for name, m in ours.items():
            t = theirs[name]
            assert t["kind"] == ("DeepseekV2ForCausalLM" if name.startswith("v2") else "DeepseekV3ForCausalLM")
            assert (t["logits"] - m(x)[0]).abs().max() < 1e-5, name
            assert torch.equal(t["greedy"], m.generate(prompt, 12, temperature=0)), name
            if m.mtp:
                assert (t["mtp"] - mtp_logits(m, x)).abs().max() < 1e-5, name
            assert ("mtp" in t) == bool(m.mtp), name
        resaved = hf.load(cases["yarn"] + "-resaved")[0]       # what transformers writes loads back
        assert resaved.args.n_mtp == 0 and torch.equal(resaved(x)[0], ours["yarn"](x)[0])
    for name, text in texts.items():
        encode, decode = data.tokenizer_from_meta(CHAR_META if name == "v3" else
                                                  dict(tokenizer="bpe", encoding="r50k_base"))
        assert theirs["tokenizer " + name] == dict(ids=encode(text), text=text), name


@pytest.mark.slow
def test_bench_hf_smoke(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_hf, "SHAPE", dict(bench_hf.SHAPE, vocab_size=2048, dim=256, inter_dim=512))
    rows = bench_hf.run(types.SimpleNamespace(hf_gb=0.03, quick=True, out=str(tmp_path)))
    out = capsys.readouterr().out
    assert "| bf16 (V2-Lite's release) |" in out and "| FP8 + block scales (V3's release) |" in out
    assert all(m["peak"] > 0 and m["model"] > 0 for _, _, m in rows)


# ----------------------------------------------------------------------------- post-training (report §5)

# what the maths corpus, the worked answers and the thinking traces write
MATH_CHARS = "".join(sorted(set("\n".join(
    "\n".join([*p[:3], reasoning.thinking(p)]) for p in itertools.islice(data.math_problems(2), 5000)))))


def test_math_corpus_unchanged_by_the_generator_refactor():
    """The domains corpus's maths for MATH_SEED, at the default corpus size, is the text math_text wrote before
    math_problems existed (its SHA-256 then), so cached data and published results stay valid."""
    text = data.math_text(1115394)
    assert len(text) == 1115417
    assert hashlib.sha256(text.encode()).hexdigest() == "09d3c10d429b8655327edeaf1454736be2f5d3e1c0338058ec823d33182569fd"


def test_worked_steps_are_true_and_end_in_the_answer():
    """Every step of a worked answer is an equation that holds (the unknown of an equation replaced by its solution),
    and the answer after the last "= " is the corpus's answer."""
    kinds = set()
    for p in itertools.islice(data.math_problems(3), 3000):
        assert p.worked.rsplit("= ", 1)[-1] == p.answer and p.worked.count("= ") >= 1
        env = {p.operands[1]: int(p.answer)} if p.kind == "solve" else {}
        for chain in re.split(r", (?=\w = )", p.worked):               # an equation's: "k*v = c - b = kx, v = x"
            sides = [eval(side, {"max": max}, env) for side in chain.split(" = ")]
            assert all(v == sides[0] for v in sides), p
        kinds.add(p.kind)
    assert kinds == set(data.MATH_KINDS)


def expected_answer(kind, operands):
    """The answer of a question from its operands, worked out here (not by the generator)."""
    a, b = operands[:2]
    return str({"sum": lambda: a + b, "difference": lambda: a - b, "product": lambda: a * b,
                "bigger": lambda: max(a, b) / 10, "less": lambda: a < b, "remainder": lambda: a % b,
                "solve": lambda: (operands[3] - operands[2]) // operands[0]}[kind]())


def check_trace(kind, operands, trace):
    """An evaluator independent of reasoning.py: every clause of the trace that states a relation holds when Python
    evaluates it (the unknown of an equation replaced by the answer); every count of multiples goes up by the divisor
    from it and stops at the first past its number; every block "EXPRESSION: steps, so X" ends in its expression's
    value; the trace ends with the answer."""
    answer = expected_answer(kind, operands)
    env = {operands[1]: int(answer)} if kind == "solve" else {}
    assert trace.endswith(answer), (trace, answer)
    for clause in re.split(r", |; |: ", trace):
        clause = clause.removeprefix("so ")
        if counted := re.fullmatch(r"(\d+(?: \d+)*)>(\d+)", clause):
            multiples, n = [int(v) for v in counted.group(1).split()], int(counted.group(2))
            assert multiples == [operands[1] * j for j in range(1, len(multiples) + 1)], trace
            assert all(v <= n for v in multiples[:-1]) and multiples[-1] > n, trace
        elif re.search(r"[=<>]", clause) and " vs " not in clause:
            assert eval(re.sub(r"(?<![<>=])=(?!=)", "==", clause), {}, env) is True, (clause, trace)
    for block in trace.split("; "):
        if ": " in block and ", so " in block.rpartition(": ")[2]:
            expression = re.split(r", |: ", block.rpartition(": ")[0])[-1].removeprefix("so ")
            if re.fullmatch(r"[-+*()\d ]+( = [-+*()\d ]+)*", expression):
                value = int(block.rpartition("so ")[2])
                assert all(eval(side) == value for side in expression.split(" = ")), (block, trace)


EDGES = dict(sum=[(0, 0), (0, -5), (-5, 0), (38, -38), (-38, 38), (99, 99), (-99, -99), (7, -16), (-16, 7), (50, -50)],
             difference=[(0, 0), (0, 5), (-5, 0), (38, 38), (-38, -38), (99, -99), (-99, 99), (7, 16), (16, 7)],
             product=[(0, 5), (7, 0), (0, 0), (-1, -99), (1, 99), (10, -43), (-10, -43), (11, -82), (-12, -99),
                      (12, 99), (12, 1), (-9, 89), (9, -9)],
             bigger=[(0, 0), (-5, 0), (0, -5), (45, 47), (-45, -47), (-47, -45), (99, -99), (3, 45), (45, 45)],
             less=[(0, 0), (-5, 0), (0, -5), (45, 47), (-45, -47), (-47, -45), (99, -99), (3, 45), (45, 45)],
             remainder=[(0, 3), (5, 7), (7, 7), (86, 7), (99, 2), (60, 12), (48, 8), (11, 12), (99, 11), (10, 10)],
             solve=[(3, "x", 5, 5), (-7, "n", 7, 21), (9, "m", -99, -9), (-2, "q", 0, 20), (2, "a", 99, 79),
                    (-9, "b", -99, -9), (5, "c", 0, 0)])


def test_every_thinking_trace_is_arithmetically_right():
    """The traces of 5,000 generated problems (all seven kinds) and of chosen edges (zero, equal sizes of opposite
    signs, the largest and smallest operands, multipliers 10 to 12, a remainder of a number below its divisor) pass
    check_trace; and check_trace catches a wrong fact, a wrong count and a wrong block value."""
    problems = [(p.kind, p.operands) for p in itertools.islice(data.math_problems(4), 5000)]
    problems += [(kind, ops) for kind, edges in EDGES.items() for ops in edges]
    for kind, operands in problems:
        check_trace(kind, operands, reasoning.thinking(data.MathProblem("", "", "", kind, operands)))
    assert {k for k, _ in problems} == set(data.MATH_KINDS)
    for kind, operands, wrong in [("sum", (45, 38), "45 + 38: 5+8=13, 4+3+1=9, so 83"),
                                  ("remainder", (43, 6), "43 mod 6: 43: 6 12 18 24 30 36 42>43, 43-36=7; so 1"),
                                  ("product", (12, 79), "12*79: 10*79=790, 2*79: 2*9=18, 2*7=14, 14+1=15, so 168; "
                                                        "790+158: 0+8=8, 9+5=14, 7+1+1=9, so 948")]:
        with pytest.raises(AssertionError):
            check_trace(kind, operands, wrong)
def test_readme_post_training_how_to_is_the_generator_and_the_results():
    """README's post-training table: each of the seven kinds with a question, the thinking trace SFT teaches for it
    (reasoning.thinking) and the generator's answer, and the accuracies of RESULTS.md's SFT and GRPO rows; its
    commands name presets that exist."""
    readme, results = (REPO / "README.md").read_text(), (REPO / "RESULTS.md").read_text()
    section = readme.split("## Post-training")[1].split("\n## ")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| kind")]
    written = {(p.question, reasoning.thinking(p), p.answer): p.kind for p in itertools.islice(data.math_problems(5), 500)}
    assert [r[0] for r in rows] == list(data.MATH_KINDS) + ["all"]
    for kind, q, thought, answer, *_ in rows[:-1]:
        assert written.get((q, thought.strip("`"), answer)) == kind, (q, thought)
    for label, column in (("SFT, thinking traces", 4), ("GRPO from the SFT model", 5)):
        line = next(line for line in results.splitlines() if line.startswith(f"| {label} |"))
        measured = [float(c.split()[0]) for c in line.strip("|").split("|")[1:9]]
        assert [float(r[column].rstrip("%")) for r in rows] == measured, label
    for preset in re.findall(r"^python \w+\.py (config/\S+\.py)", section, re.M):
        assert (REPO / preset).exists(), preset


def chat_meta():
    return dict(tokenizer="char", chars=MATH_CHARS, vocab_size=len(MATH_CHARS) + len(chat.SPECIAL),
                special=list(chat.SPECIAL))


def test_conversations_need_the_extended_context():
    """With its thinking trace the longest conversation takes 159 tokens (158 positions, the last only a target):
    more than the pretrained context (64), within the extended one (config/domains_cpu_256.py); its reply, 127
    tokens, within ANSWER_TOKENS."""
    template = chat.Template(chat_meta())
    longest, reply = 0, 0
    for p in itertools.islice(data.math_problems(0), 20000):
        tokens, assistant = template.example(p.question, chat.thought(p, "thinking"), p.answer)
        longest, reply = max(longest, len(tokens)), max(reply, sum(assistant))
    extended = runpy.run_path(str(REPO / "config" / "domains_cpu_256.py"))["block_size"]
    assert 64 < longest - 1 <= extended and reply <= chat.ANSWER_TOKENS        # the last token is only a target


@pytest.mark.slow
def test_held_out_questions_are_disjoint_from_training_pairs():
    """No held-out question among the SFT or RL questions of two seeds, whatever the mix (remainder questions, of
    which there are only 1,100, drawn most)."""
    held = chat.held_out_problems(700)
    assert [p.kind for p in held] == [k for k in data.MATH_KINDS for _ in range(100)] and len({p[0] for p in held}) == 700
    assert chat.HELD_OUT_SEED != data.MATH_SEED
    mixes = [{}, {"remainder": 1}, {"solve": 1.5, "remainder": 2, "product": 1}]
    pairs = {p.question for s in (1337, 1338) for stream, salt in ((5, 10), (8, 11)) for mix in mixes
             for p in itertools.islice(chat.mixed(chat.training_problems(data.batch_seed(s, stream)), mix,
                                                  data.batch_seed(s, salt)), 10000)}
    assert not pairs & {p.question for p in held}
    assert len({q for q in pairs if "remainder" in q}) > 850          # of the 1,100 less those held out
    assert len(chat.held_out_problems(10)) == 10 and chat.held_out_problems(10) == chat.held_out_problems(10)


def test_mix_draws_the_kinds_in_its_shares():
    problems = list(itertools.islice(chat.mixed(data.math_problems(5), {"sum": 2, "solve": 1}, 0), 3000))
    share = sum(p.kind == "sum" for p in problems) / len(problems)
    assert {p.kind for p in problems} == {"sum", "solve"} and 0.62 < share < 0.72
    assert list(itertools.islice(chat.mixed(data.math_problems(5), {}, 0), 50)) == list(
        itertools.islice(data.math_problems(5), 50))
    for bad in ({"sums": 1}, {"sum": -1}, {"sum": 0}):
        with pytest.raises(configurator.UserError, match="mix: "):
            chat.mixed(data.math_problems(5), bad, 0)


def test_wilson_interval():
    assert chat.wilson(30, 100) == pytest.approx((0.2189, 0.3958), abs=1e-4)     # the textbook example's values
    assert chat.wilson(0, 120)[0] == 0 and chat.wilson(120, 120)[1] == 1 and chat.wilson(0, 120)[1] == pytest.approx(
        1.96 ** 2 / (120 + 1.96 ** 2))


def test_answer_rule_reads_only_what_follows_the_thinking():
    """The answer is what follows </think>, exactly: a number inside the thinking never counts, a reply whose thinking
    never ended has no answer, and the format is the data's."""
    right, end = chat.is_correct, chat.SPECIAL[4]
    assert right(f"{end}22", True, "22") and right(f"5+8=13, so 22{end}22", True, "22")
    assert right(f"so 99{end}22", True, "22")                       # what the thinking says does not decide
    assert not right("22", True, "22") and not right("5+8=13, so 22", True, "22")   # no </think>: no answer
    assert not right(f"so 22{end}21", True, "22") and chat.final_answer(f"22{end}") == ""
    assert not right(f"{end}22", False, "22")                      # no end token within the length limit
    for reply in ("22 apples", " 22", "22 ", "22\n", "the answer is 22", f"22{end}22", "=22"):
        assert not right(f"{end}{reply}", True, "22"), reply
    assert not right(f"{end}-0", True, "0") and not right(f"{end}3.0", True, "3") and not right(f"{end}3", True, "3.0")
    assert right(f"{end}True", True, "True") and not right(f"{end}true", True, "True")


@pytest.fixture(scope="module")
def math_base(tmp_path_factory):
    """A pretrained checkpoint as train.py writes it: a tiny model trained a little on the maths corpus's characters,
    its RoPE tables long enough for a question and its thinking (max_seq_len 256, the context a checkpoint says it was
    trained at)."""
    encode, _ = data.tokenizer_from_meta(dict(tokenizer="char", chars=MATH_CHARS))
    tokens = torch.tensor(encode(data.math_text(20000)))
    torch.manual_seed(0)
    m = ds.Transformer(tiny(vocab_size=len(MATH_CHARS), max_seq_len=256, n_layers=2)).train()

    def batch(step):
        starts = torch.randint(0, len(tokens) - 33, (16,))
        seq = torch.stack([tokens[s:s + 33] for s in starts])
        return seq[:, :-1], seq[:, 1:]
    fit(m, batch, 150, lr=1e-2)
    out = tmp_path_factory.mktemp("math_base")
    ckpts.save_checkpoint(dict(model=m.state_dict(), model_args=vars(m.args).copy(), optimizer={}, iter_num=150,
                               meta=dict(tokenizer="char", chars=MATH_CHARS, vocab_size=len(MATH_CHARS)),
                               best_val_loss=0.0, config=dict(block_size=256)), out / "ckpt.pt")
    return out


@pytest.mark.slow
def test_chat_tokens_join_the_vocabulary_and_keep_the_old_rows(math_base):
    """chat_model adds SPECIAL after the vocabulary (new rows drawn, the old ones kept bit for bit, the pretrained
    model's logits unchanged); a conversation with its thinking encodes and decodes back, each chat token whole."""
    ckpt = ckpts.read_checkpoint(math_base / "ckpt.pt")
    model_, meta = chat.chat_model(ckpt, math_base, max_seq_len=256)
    n, k = len(MATH_CHARS), len(chat.SPECIAL)
    state = model_.state_dict()
    for name in ("embed.weight", "head.weight"):
        assert state[name].shape[0] == n + k and torch.equal(state[name][:n], ckpt["model"][name])
        assert not torch.equal(state[name][n], state[name][n + 1])
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in state.items() if k not in ("embed.weight", "head.weight"))
    base, _ = ckpts.load_checkpoint(math_base / "ckpt.pt")
    x = torch.randint(0, n, (2, 20))
    assert torch.allclose(model_.eval()(x)[0][..., :n], base(x)[0], atol=1e-6)     # the pretrained model, intact
    # the tokens: ids after the base vocabulary, each encoded whole; plain text as before
    assert meta["special"] == list(chat.SPECIAL) and meta["vocab_size"] == n + k
    template, (plain, _) = chat.Template(meta), data.tokenizer_from_meta(ckpt["meta"])
    bos, user, assistant, think, end_think, eos = range(n, n + k)
    tokens, reply = template.example("What is 3 + 4?", "3+4=7, so 7", "7")
    assert tokens == [bos, user, *plain("What is 3 + 4?"), assistant, think, *plain("3+4=7, so 7"), end_think,
                      *plain("7"), eos]
    assert reply == [False] * (len(plain("What is 3 + 4?")) + 4) + [True] * (len(plain("3+4=7, so 7")) + 3)
    text = "".join([*chat.SPECIAL[:4], "3+4=7, so 7", chat.SPECIAL[4], "7", chat.SPECIAL[5]]).replace(
        chat.SPECIAL[2], f"What is 3 + 4?{chat.SPECIAL[2]}")
    assert template.decode(tokens) == text and template.encode(text) == tokens
    # a chat checkpoint loads as it is
    again, meta2 = chat.chat_model(dict(ckpt, model=state, meta=meta, model_args=vars(model_.args).copy()), "x", 256)
    assert meta2 == meta and all(torch.equal(v, state[k]) for k, v in again.state_dict().items())


def test_the_prompt_is_how_training_examples_present_the_question():
    """What generation starts from ends with the assistant's token and the thinking opener, and is exactly the
    prefix of every training example before its reply, whatever the answers written (thinking, worked, bare: an
    empty thinking); the Jinja template (what transformers renders) writes the same text."""
    template = chat.Template(chat_meta())
    for p in itertools.islice(data.math_problems(6), 50):
        prompt = template.prompt(p.question)
        assert prompt[-2:] == [template.assistant, template.think] and prompt[0] == template.bos
        for answers in chat.ANSWERS:
            tokens, reply = template.example(p.question, chat.thought(p, answers), p.answer)
            assert tokens[:len(prompt)] == prompt and reply == [False] * len(prompt) + [True] * (len(tokens) - len(prompt))
            assert tokens[-1] == template.eos and template.decode(tokens[len(prompt):]).endswith(
                f"{chat.SPECIAL[4]}{p.answer}{chat.SPECIAL[5]}")
    jinja = pytest.importorskip("jinja2")
    rendered = jinja.Template(chat.CHAT_TEMPLATE).render(messages=[dict(role="user", content="What is 3 + 4?")],
                                                         add_generation_prompt=True, bos_token=chat.SPECIAL[0])
    assert template.encode(rendered) == template.prompt("What is 3 + 4?")


@pytest.mark.skipif(not HAS_BPE, reason="needs the local tiktoken cache")
def test_special_tokens_with_bpe():
    meta = dict(tokenizer="bpe", encoding="r50k_base", vocab_size=50257 + 6, special=list(chat.SPECIAL))
    encode, decode = data.tokenizer_from_meta(meta)
    plain, _ = data.tokenizer_from_meta(dict(tokenizer="bpe", encoding="r50k_base"))
    text = f"{chat.SPECIAL[1]}naïve café{chat.SPECIAL[2]}{chat.SPECIAL[3]}hm{chat.SPECIAL[4]}ok{chat.SPECIAL[5]}"
    assert encode(text) == [50258, *plain("naïve café"), 50259, 50260, *plain("hm"), 50261, *plain("ok"), 50262]
    assert decode(encode(text)) == text


def test_sft_loss_sees_only_the_assistants_tokens():
    template = chat.Template(chat_meta())
    examples = [template.example("What is 3 + 4?", "", "7"), template.example("Is 5 less than 70?", "5 < 70", "True")]
    x, y = sft.sft_batch(examples, template.eos, "cpu")
    for row, (tokens, assistant) in enumerate(examples):
        # target t is token t + 1: kept exactly where that token is the assistant's (reply and end token)
        kept = [t for t in range(x.size(1)) if y[row, t] != -1]
        assert kept == [t - 1 for t, a in enumerate(assistant) if a]
        assert y[row, kept].tolist() == [tok for tok, a in zip(tokens, assistant) if a]
        assert x[row, :len(tokens) - 1].tolist() == tokens[:-1]
    logits = torch.randn(*x.shape, len(MATH_CHARS) + len(chat.SPECIAL), requires_grad=True)
    loss = sft.sft_loss(lambda idx: (logits, None), x, y)
    keep = y != -1
    assert loss.item() == pytest.approx(F.cross_entropy(logits[keep], y[keep]).item(), rel=1e-6)
    loss.backward()
    assert (logits.grad[~keep] == 0).all() and (logits.grad[keep].abs().sum(-1) > 0).all()


def test_length_grouped_batches():
    """Every example once, in batches of batch_size (the last of a group shorter), each cut from a group of
    LENGTH_GROUP batches sorted by length: a batch's longest example is far shorter than at random."""
    lengths = torch.randint(20, 180, (1000,), generator=torch.Generator().manual_seed(0)).tolist()
    order = torch.randperm(1000, generator=torch.Generator().manual_seed(1)).tolist()
    batches = sft.length_grouped(order, lengths, 16, seed=2)
    assert sorted(i for b in batches for i in b) == list(range(1000)) and {len(b) for b in batches} <= {16, 8}
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 30 and batches != sft.length_grouped(order, lengths, 16, seed=3)


def test_group_advantages_by_hand():
    r = torch.tensor([[1.1, 0.1, 0.1, 0.0], [1.1, 1.1, 1.1, 1.1]])
    mean, sd = 1.3 / 4, math.sqrt(sum((v - 1.3 / 4) ** 2 for v in (1.1, 0.1, 0.1, 0.0)) / 3)   # sample std
    a = grpo.group_advantages(r)
    assert a[0].tolist() == pytest.approx([(v - mean) / sd for v in (1.1, 0.1, 0.1, 0.0)], rel=1e-5)
    assert a[1].tolist() == [0.0] * 4                             # all equal: no signal, no NaN
    a = grpo.group_advantages(r, divide_std=False)                # Dr. GRPO
    assert a[0].tolist() == pytest.approx([v - mean for v in (1.1, 0.1, 0.1, 0.0)], rel=1e-5) and a[1].eq(0).all()


def test_grpo_objective_by_hand():
    """Two outputs of one group, 3 and 2 tokens: ratios 1.5, 0.5, 1 (A = 1) and 0.5, 1.5 (A = -1), ε = 0.2: the clip
    binds on both sides (1.5 -> 1.2 for A > 0, 0.5 -> 0.8 for A < 0) and nowhere else."""
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    logp = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -1.2, 0.0]])
    old = logp - torch.tensor([[1.5, 0.5, 1.0], [0.5, 1.5, 1.0]]).log()
    A = torch.tensor([1.0, -1.0])
    J, s = grpo.grpo_objective(logp, old, logp, A, mask, clip_eps=0.2, kl_beta=0.5)
    assert J.item() == pytest.approx(((1.2 + 0.5 + 1.0) / 3 + (-0.8 - 1.5) / 2) / 2, rel=1e-5)
    assert s["clipped"].item() == pytest.approx(2 / 5) and s["kl"].item() == 0        # π_ref = π_θ: no KL
    J, s = grpo.grpo_objective(logp, old, None, A, mask, clip_eps=0.0, kl_beta=0.0)   # no clip: ρA itself
    assert J.item() == pytest.approx(((1.5 + 0.5 + 1.0) / 3 + (-0.5 - 1.5) / 2) / 2, rel=1e-5) and s["clipped"] == 0
    d = torch.tensor([[0.1, -0.2, 0.0], [0.3, 0.0, 0.7]])                              # log(π_ref / π_θ)
    kl = lambda v: math.exp(v) - v - 1                                                  # noqa: E731
    J, s = grpo.grpo_objective(logp, old, logp + d, A, mask, clip_eps=0.2, kl_beta=0.5)
    want = ((1.2 - 0.5 * kl(0.1) + 0.5 - 0.5 * kl(-0.2) + 1.0) / 3 + (-0.8 - 0.5 * kl(0.3) - 1.5) / 2) / 2
    assert J.item() == pytest.approx(want, rel=1e-5)
    assert s["kl"].item() == pytest.approx((kl(0.1) + kl(-0.2) + kl(0.3)) / 5, rel=1e-5) and kl(-0.2) > 0


def grpo_config(**kw):
    return types.SimpleNamespace(**{**dict(group_size=8, clip_eps=0.2, kl_beta=0.04, updates_per_batch=2,
                                           grad_clip=1.0, advantage_std=True), **kw})


def test_grpo_raises_the_probability_of_rewarded_outputs():
    """A constructed task: any output whose first token is below 30 earns 1. A few GRPO steps (the KL term and the clip
    on) raise that probability after each prompt."""
    m = model(seed=1).train()
    prompts, stop = [[5, 9, 2, 7], [11, 3]], 0
    reference = copy.deepcopy(m).eval().requires_grad_(False)

    def p_rewarded():
        with torch.no_grad():
            return [m.eval()(torch.tensor([p]))[0][0, -1].softmax(-1)[:30].sum().item() for p in prompts]
    before = p_rewarded()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(8):
        outputs = chat.generate(m, prompts, 3, stop, group=8, temperature=1.0)
        r = torch.tensor([float(bool(t) and t[0] < 30) for t, _ in outputs]).view(2, 8)
        grpo.grpo_update(m.train(), reference, opt, prompts, outputs, r, stop, grpo_config())
    after = p_rewarded()
    assert all(a > b + 0.2 for a, b in zip(after, before)), (before, after)


def test_grpo_logprobs_come_from_the_sampling_policy_with_dropout_off():
    """With dropout in the model (0.5), the log-probabilities GRPO trains on are those of the eval-mode forward that
    sampled the outputs, with their gradient, whatever mode the model is in; the mode is left as it was. A forward with
    dropout on gives others (so π_old would not be the sampler, and ρ and the KL noise)."""
    m = model(seed=2, dropout=0.5).train()
    x, y = torch.randint(0, V, (3, 9)), torch.randint(0, V, (3, 9))
    with torch.no_grad():
        sampler = torch.log_softmax(m.eval()(x)[0], -1).gather(-1, y[..., None])[..., 0]
        dropped = torch.log_softmax(m.train()(x)[0], -1).gather(-1, y[..., None])[..., 0]
    assert not torch.allclose(dropped, sampler, atol=1e-3)
    logp = grpo.token_logprobs(m, x, y)
    assert m.training and logp.requires_grad and torch.allclose(logp, sampler, atol=1e-5)


def test_dynamic_sampling_drops_groups_whose_rewards_are_all_equal():
    """keep_signal keeps, in the order drawn, only groups whose rewards differ, and exactly `questions` of them when
    there are that many (the batch keeps its size); rollouts draws rounds until it has them, or max_draws rounds."""
    rewards = [[1, 1, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1], [0.1, 0.1, 0.1, 0.1], [0, 0, 1, 0], [1, 0, 0, 0]]
    groups = [grpo.Group(i, None, None, torch.tensor(r, dtype=torch.float)) for i, r in enumerate(rewards)]
    assert [g.problem for g in grpo.keep_signal(groups, 3)] == [1, 3, 5]
    assert [g.problem for g in grpo.keep_signal(groups, 9)] == [1, 3, 5, 6]
    # through rollouts: a model that always answers "7" after </think>; of each round of 4 questions two have answer
    # 7 (all right), two another (all wrong): no group carries signal, so it draws max_draws rounds and keeps none
    template = chat.Template(chat_meta())
    problems = iter([data.MathProblem(f"What is {i} + 0?", "7" if i % 2 else "8", "", "sum", (i, 0))
                     for i in range(40)])
    reply = [template.end_think, *template.encode("7")]

    def always_seven(model_, prompts, n, stop, group, temperature):
        return [(reply, True)] * (len(prompts) * group)
    c = types.SimpleNamespace(questions=4, group_size=3, max_draws=3, dynamic_sampling=True, max_new_tokens=8,
                              temperature=1.0, format_reward=0.0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chat, "generate", always_seven)
        kept, drawn, tokens = grpo.rollouts(None, template, problems, c)
        assert kept == [] and len(drawn) == 12 and tokens == 12 * 3 * 3
        kept, drawn, _ = grpo.rollouts(None, template, problems, types.SimpleNamespace(**{**vars(c),
                                                                                          "dynamic_sampling": False}))
        assert len(kept) == len(drawn) == 4


def test_each_reward_belongs_to_its_own_question():
    """Several questions share a batch, replies grouped per question (G each): every reply answering its own
    question right earns 1, answering the neighbour's 0 (answers tiled over the batch instead of repeated per
    group would fail this)."""
    template = chat.Template(chat_meta())
    problems = [data.MathProblem("What is 3 + 4?", "7", "", "sum", (3, 4)),
                data.MathProblem("What is 5 + 7?", "12", "", "sum", (5, 7))]
    G = 3
    own = [(template.encode("3+4=7") + [template.end_think] + template.encode(a), True) for a in ("7", "12")]
    outputs = [own[0]] * G + [own[1]] * G
    assert grpo.group_rewards(problems, outputs, template.decode, G, 0.0).tolist() == [[1.0] * G] * 2
    swapped = [own[1]] * G + [own[0]] * G
    assert grpo.group_rewards(problems, swapped, template.decode, G, 0.0).tolist() == [[0.0] * G] * 2
    unfinished = [(template.encode("3+4=7"), False)] * G + [own[1]] * G
    assert grpo.group_rewards(problems, unfinished, template.decode, G, 0.5).tolist() == [[0.0] * G, [1.5] * G]


def test_grpo_loss_sees_only_the_outputs_tokens():
    """The batch GRPO trains on: each row a prompt and one of its replies (with its end token when it stopped); the
    mask covers the reply's tokens alone, and the objective's gradient reaches the logits at those positions only."""
    prompts, eos = [[5, 9, 2, 7], [11, 3]], 0
    outputs = [([4, 4], True), ([6], False), ([8, 1, 2], True), ([], True)]
    x, y, mask = grpo.rollout_batch(prompts, outputs, eos, 2, "cpu")
    for row, (tokens, stopped) in enumerate(outputs):
        prompt, reply = prompts[row // 2], tokens + [eos] * stopped
        assert x[row, :len(prompt) + len(reply) - 1].tolist() == (prompt + reply)[:-1]
        assert mask[row].nonzero().flatten().tolist() == list(range(len(prompt) - 1, len(prompt) - 1 + len(reply)))
        assert y[row][mask[row].bool()].tolist() == reply
    logits = torch.randn(*x.shape, V, requires_grad=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ds.Transformer, "__call__", lambda self, idx: (logits, None))
        logp = grpo.token_logprobs(model(), x, y)
    J, _ = grpo.grpo_objective(logp, logp.detach(), None, torch.tensor([1.0, -1.0, 0.5, 2.0]), mask, 0.2, 0.0)
    J.backward()
    touched = logits.grad.abs().sum(-1) > 0
    assert torch.equal(touched, mask.bool())


@pytest.mark.parametrize("attn, impl", [("mla", "absorb"), ("mla", "naive"), ("mha", "absorb")])
def test_left_padded_prefill_matches_each_prompt_alone(attn, impl):
    """A left-padded batch, its padding hidden by chat.padded_mask through Transformer.hidden's mask: each row's last
    logits and then a decoded step equal its prompt's run alone (RoPE is relative: the shift changes no score)."""
    m = model(attn=attn, max_seq_len=24).eval()
    m.set_attn_impl(impl)
    prompts = [torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 3, 5)]
    P = 7
    idx = torch.stack([torch.cat([torch.zeros(P - len(p), dtype=torch.long), p]) for p in prompts])
    keep = torch.stack([torch.arange(P) >= P - len(p) for p in prompts])
    with torch.no_grad():
        batched = m.logits(m.hidden(idx, 0, chat.padded_mask(keep, 0, P))[:, -1])
        nxt = torch.tensor([[4], [8], [15]])
        keep = torch.cat([keep, torch.ones(3, 1, dtype=torch.bool)], 1)
        step = m.logits(m.hidden(nxt, P, chat.padded_mask(keep, P, 1))[:, -1])
        for i, p in enumerate(prompts):
            alone = m.logits(m.hidden(p[None], 0)[:, -1])
            assert torch.allclose(batched[i], alone[0], atol=1e-5)
            alone = m.logits(m.hidden(nxt[i:i + 1], len(p))[:, -1])
            assert torch.allclose(step[i], alone[0], atol=1e-5)


def batched_equals_alone(model_, prompts, n, stop):
    """chat.generate's rows for prompts (3 replies each, greedy, one left-padded batch) are each prompt's greedy
    decoding alone by Transformer.generate (no padding, no mask): the same tokens up to the stop token, stopping
    where it does."""
    batched = chat.generate(model_, prompts, n, stop, group=3)
    for i, p in enumerate(prompts):
        alone = model_.generate(torch.tensor([p]), n, temperature=0)[0, len(p):].tolist()
        tokens = alone[:alone.index(stop)] if stop in alone else alone
        if batched[3 * i:3 * i + 3] != [(tokens, stop in alone)] * 3:
            return False
    return True


@pytest.mark.slow
def test_batched_generation_equals_each_prompt_alone(math_base):
    """Greedy, prompts of very different lengths (4 to over 40 tokens), a group of 3 rows each from one prefill: the
    tokens and where each row stopped are those of the prompt decoded alone by Transformer.generate; rows leave the
    batch at different steps. A key mask that hides each row's first prompt token (a mask off by one) fails it."""
    model_, ckpt = ckpts.load_checkpoint(math_base / "ckpt.pt", args=dict(max_seq_len=96))
    encode, _ = data.tokenizer_from_meta(ckpt["meta"])
    stop = encode("\n")[0]
    questions = [p.question for p in itertools.islice(data.math_problems(7), 6)]
    prompts = [encode(f"{questions[0]}\n{q}\n" if i % 2 else q[-4:]) for i, q in enumerate(questions)]
    assert min(map(len, prompts)) == 4 and max(map(len, prompts)) > 40
    assert batched_equals_alone(model_, prompts, 12, stop)
    batched = chat.generate(model_, prompts, 12, stop, group=3)
    assert len({len(t) for t, s in batched}) > 1 and any(s for _, s in batched)    # rows left at different steps
    padded_mask = chat.padded_mask

    def hides_the_first_prompt_token(keep, start_pos, S):
        first = keep.int().argmax(1)                   # each row's first real token
        return padded_mask(keep.scatter(1, first[:, None], False), start_pos, S)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(chat, "padded_mask", hides_the_first_prompt_token)
        assert not batched_equals_alone(model_, prompts, 12, stop)


def test_generation_stops_each_row_at_the_limit_or_its_stop_token():
    m = model(max_seq_len=32).eval()
    torch.manual_seed(0)
    outs = chat.generate(m, [[1, 2, 3], [4, 5]], 6, stop=7, group=4, temperature=1.0)
    assert len(outs) == 8
    for tokens, stopped in outs:
        assert 7 not in tokens and (stopped or len(tokens) == 6) and len(tokens) <= 6
    with pytest.raises(ValueError, match="exceed max_seq_len"):
        chat.generate(m, [[1] * 30], 6, stop=7)
@pytest.fixture(scope="module")
def chat_ckpt(math_base, tmp_path_factory):
    """math_base with the chat tokens, as sft.py would start it (no training)."""
    ckpt = ckpts.read_checkpoint(math_base / "ckpt.pt")
    model_, meta = chat.chat_model(ckpt, math_base, max_seq_len=256)
    out = tmp_path_factory.mktemp("chat_ckpt")
    ckpts.save_checkpoint(dict(ckpt, model=model_.state_dict(), meta=meta, model_args=vars(model_.args).copy()),
                          out / "ckpt.pt")
    return out


def test_sample_chat_answers_each_question_on_one_line(chat_ckpt, capsys, tmp_path):
    """--chat prints one line a question: the answer after </think> alone, or, with --show_thinking (or when the
    thinking never ended), the whole reply from <think>; each the greedy reply of its question alone."""
    questions = ["What is 3 + 4?", "Is 5 less than 7?", "Which is bigger: 0.5 or 0.3?"]
    (tmp_path / "q.txt").write_text("\n".join(questions) + "\n")
    rc, out, err = run_sample(capsys, f"--out_dir={chat_ckpt}", f"--chat=FILE:{tmp_path / 'q.txt'}", "--max_new_tokens=12")
    assert rc == 0 and err == "" and len(out.splitlines()) == 3
    model_, ckpt = ckpts.load_checkpoint(chat_ckpt / "ckpt.pt")
    template = chat.Template(ckpt["meta"])
    for q, line in zip(questions, out.splitlines()):         # each the greedy reply of its question alone
        reply = template.decode(chat.generate(model_, [template.prompt(q)], 12, template.eos)[0][0])
        answer = chat.final_answer(reply)
        assert line == (chat.SPECIAL[3] + reply if answer is None else answer).replace("\n", "\\n")
        rc, one, _ = run_sample(capsys, f"--out_dir={chat_ckpt}", f"--chat={q}", "--max_new_tokens=12")
        assert rc == 0 and one == line + "\n"
    finished = template.encode("3+4=7") + [template.end_think] + template.encode("7")
    with pytest.MonkeyPatch.context() as mp:                  # a reply whose thinking ended
        mp.setattr(chat, "generate", lambda model_, prompts, *a: [(finished, True)] * len(prompts))
        assert run_sample(capsys, f"--out_dir={chat_ckpt}", "--chat=What is 3 + 4?")[1] == "7\n"
        assert run_sample(capsys, f"--out_dir={chat_ckpt}", "--chat=What is 3 + 4?", "--show_thinking=True")[1] == \
            f"{chat.SPECIAL[3]}3+4=7{chat.SPECIAL[4]}7\n"


# transformers' side of test_a_chat_model_exports_with_its_template (a process of its own: see TRANSFORMERS_SIDE)
CHAT_SIDE = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, question, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
tok, m = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
text = tok.apply_chat_template([dict(role="user", content=question)], add_generation_prompt=True, tokenize=False)
ids = tok(text, add_special_tokens=False)["input_ids"]
out = m.eval().generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
print(json.dumps(dict(prompt=ids, answer=out, eos=m.generation_config.eos_token_id)))
"""


@pytest.mark.slow
def test_a_chat_model_exports_with_its_template(chat_ckpt, tmp_path, capsys):
    """export.py of a chat checkpoint writes its special tokens (after the vocabulary), its template and its end
    token: the folder reads back with the same tokenizer meta, and sample.py --chat answers from it as from the
    checkpoint. In transformers: apply_chat_template(add_generation_prompt=True) gives our prompt's tokens (the
    thinking opener included), and generate our greedy reply, stopping at the end-of-sentence token."""
    assert export.cli([f"--init_from={chat_ckpt}", f"--out_dir={tmp_path / 'hf'}"]) == 0
    capsys.readouterr()
    model_, ckpt = ckpts.load_checkpoint(chat_ckpt / "ckpt.pt")
    meta, n = ckpt["meta"], model_.args.vocab_size
    assert hf.tokenizer_meta(tmp_path / "hf") == meta and meta["chat_template"] == chat.CHAT_TEMPLATE
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (n - len(chat.SPECIAL), n - 1) == tuple(generation.values())
    q = "What is 3 + 4?"
    answers = [run_sample(capsys, source, f"--chat={q}", "--max_new_tokens=12")
               for source in (f"--out_dir={chat_ckpt}", f"--init_from={tmp_path / 'hf'}")]
    assert answers[0][0] == 0 and answers[0] == answers[1]
    if importlib.util.find_spec("transformers") is None:
        return
    template = chat.Template(meta)
    tokens, stopped = chat.generate(model_, [template.prompt(q)], 12, template.eos)[0]
    (tmp_path / "side.py").write_text(CHAT_SIDE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "side.py", str(tmp_path / "hf"), q, "12"], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = json.loads(r.stdout.splitlines()[-1])
    assert theirs["prompt"] == template.prompt(q) and theirs["eos"] == template.eos
    assert theirs["answer"] == tokens + [template.eos] * stopped


@pytest.mark.parametrize("case", ["plain checkpoint", "unknown characters", "unknown on a line", "chat token",
                                  "chat with speculative", "thinking without chat"])
@pytest.mark.slow
def test_sample_chat_bad_input(case, chat_ckpt, math_base, capsys, tmp_path):
    (tmp_path / "q.txt").write_text("What is 3 + 4?\nWhat is 3 × 4?\n")
    ckpt, question, extra, message = {
        "plain checkpoint": (math_base, "What is 3 + 4?", [], "has no chat tokens in its vocabulary"),
        "unknown characters": (chat_ckpt, "What is 3 × 4 ü?", [], "question: characters not in the vocabulary: '×ü'"),
        "unknown on a line": (chat_ckpt, f"FILE:{tmp_path / 'q.txt'}", [], "question on line 2: characters not in"),
        "chat token": (chat_ckpt, f"What{chat.SPECIAL[4]}", [], "holds the chat token"),
        "chat with speculative": (chat_ckpt, "What is 3 + 4?", ["--speculative=True"], "without --speculative"),
        "thinking without chat": (chat_ckpt, "", ["--show_thinking=True"], "--show_thinking shows a chat model's"),
    }[case]
    rc, out, err = run_sample(capsys, f"--out_dir={ckpt}", f"--chat={question}", *extra)
    assert rc == 2 and out == "" and err.startswith("error: ") and message in err and err.count("\n") == 1, err


def stage(module, tmp_path, *argv):
    """sft.py or grpo.py's cli in this process, tiny settings; -> (exit code, log entries or None)."""
    out = tmp_path / module.__name__
    rc = configurator.run_cli(module.main, [f"--out_dir={out}", "--device=cpu", "--eval_questions=14", *argv])
    log = out / "log.jsonl"
    return rc, [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else None


@pytest.mark.parametrize("case", ["sft from no checkpoint", "grpo from no checkpoint", "grpo from a pretrained one",
                                  "sft into its own folder", "sft over a finished run", "bad key", "group of one",
                                  "too many questions", "traces longer than the context", "unknown answers",
                                  "unknown optimizer", "unknown kind", "no kind"])
@pytest.mark.slow
def test_post_training_bad_input_one_line_exit_2(case, math_base, tmp_path, capsys):
    short = tmp_path / "short"                                 # math_base trained at 64 positions, never extended
    ckpt = ckpts.read_checkpoint(math_base / "ckpt.pt")
    ckpts.save_checkpoint(dict(ckpt, model_args={**ckpt["model_args"], "max_seq_len": 64}), short / "ckpt.pt")
    module, argv, message = {
        "sft from no checkpoint": (sft, [f"--init_from={tmp_path}"], "no checkpoint at"),
        "grpo from no checkpoint": (grpo, [f"--init_from={tmp_path}"], "no checkpoint at"),
        "grpo from a pretrained one": (grpo, [f"--init_from={math_base}"], "has no chat tokens in its vocabulary"),
        "sft into its own folder": (sft, [f"--init_from={math_base}", f"--out_dir={math_base}"], "is init_from's folder"),
        "sft over a finished run": (sft, [f"--init_from={math_base}"], "ckpt.pt exists and this run would overwrite it"),
        "bad key": (sft, [f"--init_from={math_base}", "--pair=3"], "unknown config key 'pair' (did you mean pairs?)"),
        "group of one": (grpo, [f"--init_from={math_base}", "--group_size=1"], "group_size must be at least 2"),
        "too many questions": (sft, [f"--init_from={math_base}", "--eval_questions=701"], "eval_questions must be at most 700"),
        "traces longer than the context": (sft, [f"--init_from={short}", "--pairs=300"],
                                           "short's context of 64: extend the context first"),
        "unknown answers": (sft, [f"--init_from={math_base}", "--answers=long"], "answers must be one of thinking"),
        "unknown optimizer": (sft, [f"--init_from={math_base}", "--optimizer=sgd"], "optimizer must be adamw or muon"),
        "unknown kind": (sft, [f"--init_from={math_base}", "--mix={'sums': 1}"], "mix: unknown kind sums"),
        "no kind": (sft, [f"--init_from={math_base}", "--mix={'sum': 0}"], "mix: the weights must be >= 0, one of"),
    }[case]
    if case == "sft over a finished run":
        shutil.copytree(math_base, tmp_path / "sft")
    rc, log = stage(module, tmp_path, *argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1 and log is None, err


@pytest.mark.slow
def test_sft_then_grpo_then_chat(math_base, tmp_path, capsys):
    """The stages end to end on the tiny model: sft.py from a pretrained checkpoint (the chat tokens added) on replies
    with thinking traces by config/sft_cpu.py's optimizer (Muon, the routed experts on AdamW), grpo.py from its output
    (with and without dynamic sampling), sample.py --chat from GRPO's; each logs and evaluates as it goes, and the SFT
    loss falls."""
    preset = runpy.run_path(str(REPO / "config" / "sft_cpu.py"))
    keys = [f"--{k}={preset[k]}" for k in ("optimizer", "muon_experts", "muon_rms")]
    rc, log = stage(sft, tmp_path, f"--init_from={math_base}", "--pairs=240", "--epochs=2", "--batch_size=16",
                    "--eval_interval=15", "--log_interval=5", "--learning_rate=3e-3", *keys)
    assert rc == 0 and [e["step"] for e in log if e["kind"] == "eval"] == [0, 15, 30]
    losses = [e["loss"] for e in log if e["kind"] == "train"]
    assert len(losses) == 6 and losses[-1] < losses[0] and 0 < log[-1]["train_s"] <= log[-1]["wall_s"]
    assert all(e["accuracy"]["all"][1] == 14 and 1 <= e["length"] <= chat.ANSWER_TOKENS for e in log if e["kind"] == "eval")
    ckpt = ckpts.read_checkpoint(tmp_path / "sft" / "ckpt.pt")
    assert ckpt["stage"] == "sft" and ckpt["meta"]["special"] == list(chat.SPECIAL) and ckpt["iter_num"] == 30
    groups = ckpt["optimizer"]["param_groups"]
    assert preset["optimizer"] == "muon" and [g["muon"] for g in groups] == [True, False, False]
    assert ckpt["config"]["muon_rms"] == preset["muon_rms"] and not preset["muon_experts"]
    for dynamic in (True, False):
        rc, log = stage(grpo, tmp_path, f"--init_from={tmp_path / 'sft'}", "--max_iters=3", "--questions=2",
                        "--group_size=4", "--eval_interval=3", "--log_interval=1", "--max_new_tokens=12",
                        f"--dynamic_sampling={dynamic}", "--max_draws=2", "--overwrite=True", "--format_reward=0.1")
        assert rc == 0
        steps = [e for e in log if e["kind"] == "train"]
        assert [e["step"] for e in steps] == [1, 2, 3] and [e["step"] for e in log if e["kind"] == "eval"] == [0, 3]
        for e in steps:
            assert 0 <= e["right"] <= e["group_right"] <= 1 and e["kl"] >= 0 and 0 <= e["clipped"] <= 1
            assert e["rollout_tokens_per_s"] > 0 and e["drawn"] in ((2, 4) if dynamic else (2,))
            assert e["kept"] == (min(2, round(e["signal"] * e["drawn"])) if dynamic else 2)
    capsys.readouterr()
    rc, out, _ = run_sample(capsys, f"--out_dir={tmp_path / 'grpo'}", "--chat=What is 3 + 4?")
    assert rc == 0 and len(out.splitlines()) == 1


# ----------------------------------------------------------------------------- bench

def saved_figures(monkeypatch):
    """{file name: figure} of every figure the bench saves (Figure.savefig recorded; the file is still written), or
    None where matplotlib is not installed (the bench then draws nothing)."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    from matplotlib.figure import Figure
    saved, real = {}, Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: saved.update({Path(path).name: fig}) or
                        real(fig, path, **kw))
    return saved


@pytest.mark.slow
def test_bench_step_times_every_row():
    """Every row of the step part, Muon's included, is timed (a positive median), and the rows differ in what they
    say: Muon's step costs more than AdamW's on the same model (its Newton-Schulz iterations)."""
    times = bench.main(["--parts=step", "--step_repeats=3"])["step"]
    assert list(times) == [name for name, *_ in bench_step.ROWS] and all(t > 0 for t in times.values())
    assert times["MoE + MTP, Muon"] > times["MoE + MTP (the preset)"]


@pytest.mark.slow
def test_bench_ablation_smoke(tmp_path, text_file, data_dir, monkeypatch):
    figures = saved_figures(monkeypatch)
    results = bench.main(["--parts=ablation", "--iters=4", "--timing_iters=3", "--quick", f"--out={tmp_path}",
                          f"--data_dir={data_dir}", f"--text={text_file}", "--optimizer=muon", "--jobs=2"])["ablation"]
    for budget in ("steps", "time"):                           # every run by the optimizer asked, from its preset
        assert {(c["optimizer"], c["muon_experts"], c["learning_rate"])
                for r in results[budget] for c in [ckpts.read_checkpoint(r["runs"][0]["out"] / "ckpt.pt")["config"]]} \
            == {("muon", False, 2e-3)}
    names = [name for name, _ in bench_ablation.ABLATION]
    for budget in ("steps", "time"):
        assert [r["name"] for r in results[budget]] == names and all(len(r["runs"]) == 1 for r in results[budget])
    assert all(r["runs"][0]["iters"] == 4 for r in results["steps"])
    moe = [r["load"] is not None for r in results["steps"]]                   # rows 1-2 dense, 3 on MoE
    assert moe == [False, False, True, True, True, True]
    assert all((r["runs"][0]["maxvio"] is not None) == m for r, m in zip(results["steps"], moe))
    assert all(r["load"].sum() > 0 for r in results["steps"] if r["load"] is not None)
    # same time: every row gets the steps that its timing run's step time fits into row 1's 4 steps by AdamW
    step_s, base_s = results["timing_step_s"], results["base_step_s"]
    assert ckpts.read_checkpoint(tmp_path / "timing_adamw_row1_seed0" / "ckpt.pt")["config"]["optimizer"] == "adamw"
    assert base_s != step_s[0]
    assert [r["runs"][0]["iters"] for r in results["time"]] == [max(1, round(4 * base_s / t)) for t in step_s]
    # two at a time, each on one thread
    assert {ckpts.read_checkpoint(r["runs"][0]["out"] / "ckpt.pt")["config"]["threads"]
            for r in results["steps"]} == {1}
    if figures is not None:   # one validation curve per row and budget, each the run's own evaluations
        axes = figures["ablation_val_loss.png"].axes
        for ax, budget, x in ((axes[0], "steps", 0), (axes[1], "time", 1)):
            assert [line.get_label() for line in ax.get_lines()] == names
            for line, r in zip(ax.get_lines(), results[budget]):
                curve = r["runs"][0]["curve"]
                kept = [c for c in curve if c[0] >= curve[-1][0] // 4]
                assert list(line.get_ydata()) == [c[2] for c in kept] and list(line.get_xdata()) == [c[x] for c in kept]
        assert len(figures["ablation_expert_load.png"].axes) >= 4                 # 4 MoE rows (+ colour bars)


@pytest.mark.parametrize("arg,message", [("--parts=ablation,nope", "unknown part(s) nope; choose from kernels"),
                                         ("--optimizer=sgd", "optimizer must be one of adamw, muon, not 'sgd'"),
                                         ("--jobs=0", "jobs must be at least 1, not 0")])
def test_bench_bad_input_one_line_exit_2(tmp_path, arg, message, capsys):
    assert configurator.run_cli(bench.main, [arg, f"--out={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()                                   # stopped before any work


def test_relative_load_of_a_constructed_router():
    """A model whose routers send every token of domain d to expert d (top-1): the residual stream stays each token's
    embedding (attention and FFN outputs zeroed), token t of domain t // 10 embeds as the d-th unit vector, and
    gate centroid d is that vector. Domain d's relative load is then E on expert d and 0 elsewhere, in every layer."""
    m = model(n_activated_experts=1, n_expert_groups=1, n_limited_groups=1, n_mtp=0).eval()
    with torch.no_grad():
        for layer in m.layers:
            ffn = layer.ffn
            for w in [layer.attn.wo.weight] + ([ffn.w2.weight] if isinstance(ffn, ds.MLP) else
                                                [ffn.experts.w2, ffn.shared_experts.w2.weight]):
                w.zero_()
        m.embed.weight.zero_()
        m.embed.weight[torch.arange(30), torch.arange(30) // 10] = 1.0
        for g in m.gates():
            g.weight.zero_()
            g.weight[:3, :3] = torch.eye(3)
            g.bias.zero_()
    gen = torch.Generator().manual_seed(0)
    domains = {d: (10 * i + torch.randint(0, 10, (100 + 37 * i,), generator=gen)).numpy().astype("uint16")
               for i, d in enumerate(data.DOMAINS)}
    counts, losses = bench_specialization.domain_routing(m, domains, T=8, batch_size=5)
    E = m.args.n_routed_experts
    assert counts.shape == (2, 3, E) and counts.sum(-1).tolist() == [[96, 136, 168]] * 2      # whole windows of 8
    assert torch.equal(bench_specialization.relative_load(counts), E * torch.eye(3, E, dtype=counts.dtype).expand(2, 3, E))
    # the expert tells the domain: I(domain; expert) is all of H(domain)
    p = torch.tensor([96, 136, 168], dtype=torch.float64) / 400
    assert bench_specialization.mutual_information(counts).tolist() == pytest.approx([-(p * p.log2()).sum().item()] * 2)
    # each domain's loss: the main cross-entropy over its windows
    x = torch.from_numpy(domains["math"][:169].astype("int64"))
    assert losses[2] == pytest.approx(F.cross_entropy(m(x[:-1].view(21, 8))[0].flatten(0, 1), x[1:]).item(), rel=1e-5)


def test_mutual_information_of_domain_and_expert():
    mi = bench_specialization.mutual_information
    spread = torch.tensor([5.0, 1, 3, 0, 7, 2, 2, 4], dtype=torch.float64)
    independent = torch.stack([spread, 3 * spread, spread / 2])          # three domain sizes, one routing
    one_to_one = torch.zeros(3, 8, dtype=torch.float64)                  # disjoint experts per domain, equal sizes
    one_to_one[0, :3], one_to_one[1, 3:5], one_to_one[2, 5:] = torch.tensor([4.0, 1, 7]), 6, torch.tensor([2.0, 9, 1])
    assert mi(independent).item() == pytest.approx(0, abs=1e-12)
    assert mi(one_to_one).item() == pytest.approx(math.log2(3), rel=1e-12)
    # any table, against H(expert) - H(expert | domain); a stack gives one number per table
    counts = torch.randint(0, 50, (4, 3, 8), generator=torch.Generator().manual_seed(0)).double()
    H = lambda p: -(p * p.log2()).nan_to_num().sum(-1)                       # noqa: E731
    p = counts / counts.sum((-2, -1), keepdim=True)
    ref = H(p.sum(-2)) - (p.sum(-1) * H(p / p.sum(-1, keepdim=True))).sum(-1)
    assert torch.allclose(mi(counts), ref) and (mi(counts) > 0).all()


@pytest.mark.slow
def test_bench_specialization_smoke(tmp_path, text_file, capsys, monkeypatch):
    figures = saved_figures(monkeypatch)
    english = tmp_path / "english.txt"
    english.write_text(text_file.read_text()[:30000])
    results = bench.main(["--parts=specialization", "--iters=4", "--quick", f"--out={tmp_path}",
                          f"--data_dir={tmp_path / 'data'}", f"--text={english}"])["specialization"]
    out = capsys.readouterr().out
    rows = [[c.strip() for c in line.strip("| ").split("|")] for line in out.splitlines() if line.startswith("| aux-loss-")]
    summary, loads = rows[:2], rows[2:]
    assert [r[0] for r in summary] == ["aux-loss-free (bias)", "aux-loss-based (alpha 0.01)"]
    for r, res in zip(summary, results):      # val loss per domain, I per layer and their mean, MaxVio
        x = res["runs"][0]
        assert r[1:4] == [f"{v:.4f}" for v in x["losses"]] and r[4:8] == [f"{v:.4f}" for v in [*x["mi"], x["mi"].mean()]]
    assert [r[1:3] for r in loads[:9]] == [[str(i), d] for i in (1, 2, 3) for d in data.DOMAINS] and len(loads) == 18
    assert all(sum(float(v) for v in r[3:]) == pytest.approx(8, abs=0.05) for r in loads)    # relative: mean 1
    if figures is not None:   # Figure 9: a panel per layer and model, each the first seed's relative loads
        panels = [ax for ax in figures["expert_specialization.png"].axes if ax.get_images()]
        rel = [bench_specialization.relative_load(r["runs"][0]["counts"]) for r in results]
        assert len(panels) == 6
        for k, ax in enumerate(panels):               # row-major: layer by layer, the models side by side
            want = rel[k % 2][k // 2]
            assert torch.allclose(torch.as_tensor(ax.get_images()[0].get_array().data).double(), want.double())


@pytest.mark.slow
def test_bench_fp8_smoke(tmp_path, text_file, data_dir, capsys):
    bench.main(["--parts=fp8", "--iters=2", "--quick", f"--out={tmp_path}", f"--data_dir={data_dir}", f"--text={text_file}"])
    out = capsys.readouterr().out
    fp32, fp8_row = ([c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
                     if line.startswith(("| fp32 |", "| fp8 (")))
    assert fp32[4] == "1.00x" and fp8_row[2].endswith("%")
    # the linear layers' inputs per token, written out for the preset (dim 128, kv_lora 64, 4 heads x v 32,
    # FFN 384, experts 128 wide, k = 2): attention, dense FFN, MoE (shared + 2 routed); 1 dense + 3 MoE layers
    # + the MTP block on 63 of 64 positions. fp32: 4 bytes a number, an input read by two layers kept once;
    # fp8: every layer's input, 1 byte a number + a 4-byte scale per 128
    att, dense, moe = 128 + 64 + 128, 128 + 384, 3 * (128 + 128)
    att8, dense8, moe8 = 3 * 132 + 68, 2 * 132 + 396, 3 * (3 * 132)
    layers = lambda a, d, m: a + d + (3 + 63 / 64) * (a + m)      # noqa: E731
    saved = [int(r[5].split()[0].replace(",", "")) for r in (fp32, fp8_row)]
    assert saved == [round(4 * layers(att, dense, moe)), round(layers(att8, dense8, moe8))]


@pytest.mark.slow
def test_bench_expert_parallel_volume():
    rows = bench.main(["--parts=ep", "--quick"])["ep"]
    assert [r["M"] for r in rows] == [4, 3, 2, 1]
    for r in rows:     # a token reaches at most M ranks, one send per rank however many of its 4 experts are there
        assert all(s <= min(r["M"], 3) and s <= c <= 4 for s, c in zip(r["sends"], r["copies"]))
    assert max(rows[-1]["sends"]) < min(rows[0]["sends"])
    # the bytes follow the sends: one send per token and rank, each of the same size, whatever M
    for r in rows:
        assert r["bytes_per_token"] / rows[0]["bytes_per_token"] == pytest.approx(sum(r["sends"]) / sum(rows[0]["sends"]),
                                                                                   rel=1e-2)


@pytest.mark.slow
def test_bench_context_smoke(tmp_path, text_file, data_dir, capsys, monkeypatch):
    figures = saved_figures(monkeypatch)
    result = bench.main(["--parts=context", "--iters=8", "--quick", f"--out={tmp_path}", f"--data_dir={data_dir}",
                         f"--text={text_file}"])
    out = capsys.readouterr().out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| (")]
    assert [r[0][2:5] for r in rows] == ["(a)", "(b)", "(c)", "(d)"] and all(len(r) == 6 for r in rows)
    assert "| yarn | 1 |" in out and "| rope | 1 |" in out
    assert re.search(r"context_yarn_seed0 \| 7\+249 \|.*\| yes \|", out)     # decoding to 256: all modes agree
    if figures is not None:   # one line per variant: its loss by position, averaged over 16 positions
        lines = figures["context_extension.png"].axes[0].get_lines()
        curves = result["context"]["curves"]
        assert [line.get_label() for line in lines if not line.get_label().startswith("_")] == [n for n, _ in curves]
        for line, (_, curve) in zip(lines, curves):
            assert torch.allclose(torch.as_tensor(line.get_ydata()).float(), curve.mean(0).view(-1, 16).mean(1))


@pytest.mark.slow
def test_bench_posttrain_smoke(tmp_path, text_file, capsys, monkeypatch):
    figures = saved_figures(monkeypatch)
    english = tmp_path / "english.txt"
    # the thinking traces' punctuation, which the synthetic text (no ../shared) and the code share may lack
    english.write_text(text_file.read_text()[:30000] + "\n(,/;<>)\n")
    result = bench.main(["--parts=posttrain", "--iters=4", "--quick", f"--out={tmp_path}", f"--data_dir={tmp_path / 'data'}",
                         f"--text={english}"])["posttrain"]
    out = capsys.readouterr().out
    rows = [[c.strip() for c in line.strip("| ").split("|")] for line in out.splitlines() if line.startswith("| ")]
    table9 = rows[1:5]
    assert [r[0] for r in table9] == ["pretrained, one solved example", "SFT, bare answers", "SFT, one worked line",
                                      "SFT, thinking traces"] and all(len(r) == 11 for r in table9)
    for r, name in zip(table9[1:], ("bare", "worked", "thinking")):     # pooled over the one seed: its final eval
        right, n = next(e for e in result["runs"][name][0] if e["kind"] == "done")["accuracy"]["all"]
        assert n == 14 and r[8].startswith(f"{100 * right / n:.1f} (") and float(r[10]) >= 1
    before = next(r for r in rows if r[:2] == ["all", "all"])
    greedy = [row[1] for row in result["before"][0]]
    assert int(before[2]) == 14 and float(before[3]) == pytest.approx(100 * sum(greedy) / 14, abs=0.05)
    assert greedy == result["evals"]["thinking"][0]["greedy"]            # one model, one greedy decoding
    preset = runpy.run_path(str(REPO / "config" / "grpo_cpu.py"))
    plain = preset.get("kl_beta", 0.04) > 0 or preset.get("updates_per_batch", 2) > 1   # else it would be GRPO itself
    assert ("grpo_plain" in result["runs"]) == plain and ("without the KL term and the clip" in out) != plain
    names = ("thinking", "grpo", "more_sft") + ("grpo_plain",) * plain
    models = [r for r in rows if r[0] in ("SFT, thinking traces", "GRPO from the thinking SFT",
                                          "GRPO's seconds as more SFT instead", "GRPO without KL and clip")]
    assert len(models) == 1 + 2 * len(names) and all(len(r) == 5 for r in models[1:])   # Table 9, GRPO's, the stages
    for r, name in zip(models[1:1 + len(names)], names):
        assert r[3].startswith(f"{100 * sum(result['evals'][name][0]['greedy']) / 14:.1f} (")
    for r, name in zip(models[1 + len(names):], [n for n in ("thinking", "grpo", "grpo_plain", "more_sft") if n in names]):
        assert r[1] == str(next(e for e in result["runs"][name][0] if e["kind"] == "done")["step"])
    paired = [r for r in rows if " - " in r[0]]
    assert len(paired) == 4 * (len(names) - 1) + 4 and {r[2] for r in paired} == {"greedy", "sampled"}
    grpo_s = next(e for e in result["runs"]["grpo"][0] if e["kind"] == "done")["train_s"]
    more = next(e for e in result["runs"]["more_sft"][0] if e["kind"] == "done")
    assert more["train_s"] >= grpo_s and more["step"] >= 1             # stopped once it had spent GRPO's seconds
    assert "| all questions in one batch (Q prefills, Q x G rows) |" in out and "| each sample alone" in out
    if figures is not None:   # GRPO's greedy accuracy on the aimed kinds at each evaluation, in percent
        acc = figures["posttrain.png"].axes[0]
        for line, name in zip(acc.get_lines(), ("grpo", "grpo_plain")[:1 + plain]):
            evals = [e["accuracy"] for e in result["runs"][name][0] if e["kind"] == "eval"]
            kinds = [k for k in data.MATH_KINDS if k in command_mix()] or data.MATH_KINDS
            want = [100 * sum(a[k][0] for k in kinds) / sum(a[k][1] for k in kinds) for a in evals]
            assert list(line.get_ydata()) == pytest.approx(want)


def command_mix():
    """The kinds config/grpo_cpu.py's GRPO draws."""
    return {k for k, w in runpy.run_path(str(REPO / "config" / "grpo_cpu.py")).get("mix", {}).items() if w > 0}


def test_bench_decode_reports_first_difference():
    ref = torch.tensor([[5, 1, 2, 3]])
    assert bench_decode.first_difference(ref, [ref.clone(), ref.clone()]) == "yes"
    assert bench_decode.first_difference(ref, [ref, torch.tensor([[5, 1, 9, 3]]), torch.tensor([[5, 1, 2, 0]])]) \
        == "differ from token 2"


@pytest.mark.slow
def test_bench_decode_smoke(char_ckpt, capsys):
    bench.main(["--parts=decode", f"--ckpts={char_ckpt}", "--long_tokens=2", "--timing_repeats=1"])
    out = capsys.readouterr().out
    assert re.search(rf"\| {re.escape(str(char_ckpt))} \| 7\+17 \|.*\| yes \|", out)    # all modes, the same tokens
    assert re.search(r"\((\d+) operator calls in a plain step\)", out) and "x |\n| main model, 2 tokens (verify [y, d]) |" in out
    assert "| MTP draft, 2 positions (after an acceptance) |" in out
    assert "| DeepSeek-V3 671B: MLA absorb | 576 |" in out and "| DeepSeek-V3 671B: MHA | 40,960 |" in out
