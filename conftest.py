"""pytest's shared setup for test_all.py: the environment, the tiny test model, and the fixtures that
several tests share (a text, a data cache, one training run, a pattern-trained model)."""
import hashlib
import json
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest

REPO = Path(__file__).parent
SHARED = REPO.parent / "shared"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"
if (SHARED / "tiktoken_cache").is_dir():       # the local copy, unless TIKTOKEN_CACHE_DIR already points at one
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
# GPT-2's BPE offline: tiktoken's cached r50k_base file (named by the SHA-1 of its URL) where TIKTOKEN_CACHE_DIR says
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
HAS_BPE = (Path(os.environ.get("TIKTOKEN_CACHE_DIR", "/nonexistent")) / hashlib.sha1(R50K_URL.encode()).hexdigest()).is_file()

import deepseek as ds  # noqa: E402
import train  # noqa: E402

# tiny models gain nothing from more threads, and on a busy machine OpenMP threads waiting for
# each other can slow a step down a hundredfold
torch.set_num_threads(1)

# the test model, small enough for a step in a few milliseconds, with every part switched on: MLA with a
# low-rank query, 2 MoE layers of a shared and 8 routed experts with group-limited routing, MTP (depth 1)
TINY_MODEL = dict(vocab_size=61, dim=32, inter_dim=64, moe_inter_dim=16, n_layers=3, n_dense_layers=1, n_heads=4,
                  n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=4, n_limited_groups=2,
                  q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, max_seq_len=32)
V, D = TINY_MODEL["vocab_size"], TINY_MODEL["dim"]

# the training preset: the test model with one MoE layer, on characters, for a few steps
TINY = dict({k: v for k, v in TINY_MODEL.items() if k not in ("vocab_size", "max_seq_len")}, n_layers=2,
            batch_size=4, block_size=32, dropout=0.0, tokenizer="char", learning_rate=3e-3, min_lr=3e-4,
            warmup_iters=5, lr_decay_iters=60, max_iters=8, eval_interval=4, eval_iters=2, log_interval=1, threads=1)


def tiny(**kw):
    return ds.ModelArgs(**{**TINY_MODEL, **kw})


def model(seed=0, **kw):
    torch.manual_seed(seed)
    m = ds.Transformer(tiny(**kw))
    for g in m.gates():                         # a trained-looking bias, so selection depends on it
        g.bias.normal_(0, 0.05)
    return m


def fit(m, batch, steps, lr=3e-3):
    """Plain AdamW on the total loss with a bias update after every step, as train.py does for one
    process; batch(step) -> (x, y). Returns the last step's losses."""
    opt = torch.optim.AdamW(m.parameters(), lr=lr)
    for step in range(steps):
        _, losses = m(*batch(step))
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
        m.update_expert_bias()
    return losses


def preset(tmp_path, **kw):
    path = tmp_path / "tiny.py"
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in {**TINY, **kw}.items()))
    return path


def run(tmp_path, text_file, data_dir, *args, out="out", **kw):
    """train.main in this process on a tiny preset; returns the log.jsonl entries."""
    train.main([str(preset(tmp_path, **kw)), f"--text={text_file}", f"--data_dir={data_dir}",
                f"--out_dir={tmp_path / out}", "--device=cpu", *args])
    return [json.loads(line) for line in (tmp_path / out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    """Tiny Shakespeare when the shared copy is there, else a synthetic text with some structure."""
    if SHAKESPEARE.is_file():
        return SHAKESPEARE
    g = torch.Generator().manual_seed(0)
    words = ["the", "king", "and", "queen", "of", "my", "lord", "shall", "be", "thou", "art", "to", "love", "not"]
    lines = []
    for _ in range(8000):
        n = int(torch.randint(3, 9, (), generator=g))
        lines.append(" ".join(words[int(i)] for i in torch.randint(len(words), (n,), generator=g)).capitalize() + ".")
    path = tmp_path_factory.mktemp("text") / "synthetic.txt"
    path.write_text("\n".join(lines))
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def trained(tmp_path_factory, text_file, data_dir):
    """The shared training run (40 steps, evaluated at 0, 20, 40): its folder and log entries."""
    root = tmp_path_factory.mktemp("trained")
    return root / "out", run(root, text_file, data_dir, max_iters=40, eval_interval=20)


@pytest.fixture(scope="session")
def pattern_model():
    """A tiny model trained on a repeating pattern, so its MTP drafts are often right (trained once)."""
    torch.manual_seed(0)
    m = ds.Transformer(tiny(n_layers=2, vocab_size=16, max_seq_len=24)).train()
    pattern = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7])

    def batch(step):             # 8 windows of the pattern at random offsets, 10% of tokens replaced by noise
        starts = torch.randint(0, len(pattern), (8,))
        seq = torch.stack([pattern.roll(-int(s)).repeat(2)[:17] for s in starts])
        seq = torch.where(torch.rand(seq.shape) < 0.1, torch.randint(0, 16, seq.shape), seq)
        return seq[:, :-1], seq[:, 1:]
    fit(m, batch, 60)
    return m.double().eval()


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts and ends with one torch thread: a command run in this process (train.main, sample.cli)
    sets its own (the idle cores, by default), which must not leak into the tests after it."""
    yield
    torch.set_num_threads(1)
