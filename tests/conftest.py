"""Shared fixtures: a tiny BPE tokenizer and a tiny GPT, both deterministic and fast on a CPU."""
import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Tiny models on 2 shared cores: a second intra-op thread makes each forward ~100x slower.
torch.set_num_threads(1)

from data import Tokenizer  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402


def make_corpus(n, seed=0):
    """n short strings of arithmetic and code text, generated (with known content), not downloaded."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randrange(1000), rng.randrange(1000)
        out.append(rng.choice([
            f"What is {a}+{b}?\n{a}+{b}={a + b}\nAnswer: {a + b}",
            f"def add_{a}(x):\n    return x + {b}\n",
            f"calc({a}*{b}) = {a * b}",
            f"for i in range({a}):\n    print(i * {b})\n",
        ]))
    return out


@pytest.fixture(scope="session")
def tok():
    """Byte-level BPE with vocab 300 (292 byte/merge tokens + 8 specials)."""
    t = Tokenizer.train(make_corpus(400), vocab_size=300)
    assert t.vocab_size == 300 and len(t.ranks) == 292
    return t


def tiny_gpt(tok, pos_embedding="learned"):
    """A tiny GPT (2 layers, 2 heads, 32 wide, block 64), seed 0, in eval mode.

    Weights are re-drawn larger than GPT-2's init: with tied embeddings and std 0.02 a random
    GPT greedily repeats its last token forever, which would let cache/padding bugs hide.
    """
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32,
                      pos_embedding=pos_embedding))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name == "transformer.wte.weight":
                p.normal_(0, 0.5)
            elif name == "transformer.wpe.weight":
                p.normal_(0, 1.0)
            elif p.dim() == 2:
                p.normal_(0, 2.0 / p.shape[1] ** 0.5)
    return m.eval()


@pytest.fixture
def model(tok):
    return tiny_gpt(tok)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, *args, check=True):
    """Run a stage script as users do (a fresh process), returning the CompletedProcess."""
    import subprocess
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_sft(tmp_path_factory):
    """base.pt and sft.pt from the tiny presets, made once per test session."""
    d = tmp_path_factory.mktemp("tiny")
    run_script("pretrain.py", "--preset", "tiny", "--out", d / "base.pt")
    run_script("sft.py", "--preset", "tiny", "--init", d / "base.pt", "--out", d / "sft.pt")
    return d
