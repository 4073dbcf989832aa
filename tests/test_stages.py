"""pretrain.py and sft.py end to end: smoke runs, resume equivalence, bad input, learning."""
import json
import os

import torch

from conftest import run_script
from model import load_checkpoint


def losses(jsonl):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(jsonl)) if "loss" in r]


def test_tiny_pretrain_then_sft_write_checkpoints(tiny_sft):
    base, sft = load_checkpoint(tiny_sft / "base.pt"), load_checkpoint(tiny_sft / "sft.pt")
    assert base["stage"] == "pretrain" and sft["stage"] == "sft"
    assert sft["parent"] == str(tiny_sft / "base.pt")
    assert "val_loss" in sft["metrics"] and sft["config"]["preset"] == "tiny"
    assert os.path.exists(tiny_sft / "sft.jsonl")


def test_resume_gives_the_same_loss_curve(tmp_path):
    args = ["--preset", "tiny", "--steps", "12", "--save-every", "4", "--eval-every", "100"]
    run_script("pretrain.py", *args, "--out", tmp_path / "full.pt")
    run_script("pretrain.py", *args, "--out", tmp_path / "cut.pt", "--stop-after", "6")
    assert load_checkpoint(tmp_path / "cut.pt")["step"] == 6
    run_script("pretrain.py", *args, "--out", tmp_path / "cut.pt", "--resume", "true")
    full, cut = losses(tmp_path / "full.jsonl"), losses(tmp_path / "cut.jsonl")
    assert [s for s, _ in full] == [s for s, _ in cut]
    for (_, a), (_, b) in zip(full, cut):
        assert abs(a - b) < 1e-5
    wa = load_checkpoint(tmp_path / "full.pt")["model"].state_dict()
    wb = load_checkpoint(tmp_path / "cut.pt")["model"].state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_sft_resume_matches(tiny_sft, tmp_path):
    args = ["--preset", "tiny", "--init", tiny_sft / "base.pt", "--steps", "8", "--eval-tasks", "0"]
    run_script("sft.py", *args, "--out", tmp_path / "full.pt")
    run_script("sft.py", *args, "--out", tmp_path / "cut.pt", "--stop-after", "4")
    run_script("sft.py", *args, "--out", tmp_path / "cut.pt", "--resume", "true")
    wa = load_checkpoint(tmp_path / "full.pt")["model"].state_dict()
    wb = load_checkpoint(tmp_path / "cut.pt")["model"].state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_sft_packing_gives_the_same_update(tiny_sft, tmp_path):
    """Packed rows with document masking: the same loss and parameters as padded rows."""
    args = ["--preset", "tiny", "--init", tiny_sft / "base.pt", "--steps", "4", "--eval-every", "2",
            "--eval-tasks", "0"]
    run_script("sft.py", *args, "--out", tmp_path / "padded.pt")
    run_script("sft.py", *args, "--out", tmp_path / "packed.pt", "--pack", "true")
    padded, packed = losses(tmp_path / "padded.jsonl"), losses(tmp_path / "packed.jsonl")
    assert len(padded) == len(packed) > 0
    assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(padded, packed))
    wa = load_checkpoint(tmp_path / "padded.pt")["model"].state_dict()
    wb = load_checkpoint(tmp_path / "packed.pt")["model"].state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_sft_rejects_a_malformed_line_with_file_and_line(tiny_sft, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "hi", "completion": "hello"}\n{"messages": [{"role": "user", "content": 3}]}\n')
    proc = run_script("sft.py", "--preset", "tiny", "--init", tiny_sft / "base.pt", "--out", tmp_path / "x.pt",
                      "--data", data, check=False)
    assert proc.returncode != 0 and f"{data}:2" in proc.stderr and "Traceback" not in proc.stderr


def test_sft_accepts_both_formats(tiny_sft, tmp_path):
    data = tmp_path / "ok.jsonl"
    rows = [{"prompt": "What is 2+2?", "completion": "Answer: 4"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    run_script("sft.py", "--preset", "tiny", "--init", tiny_sft / "base.pt", "--out", tmp_path / "x.pt",
               "--data", data, "--eval-tasks", "0")
    assert load_checkpoint(tmp_path / "x.pt")["stage"] == "sft"


def test_missing_parent_is_a_clear_error(tmp_path):
    proc = run_script("sft.py", "--preset", "tiny", "--init", tmp_path / "nope.pt", "--out", tmp_path / "x.pt",
                      check=False)
    assert proc.returncode != 0 and "nope.pt" in proc.stderr and "Traceback" not in proc.stderr


def test_a_tiny_model_learns_a_trivial_task():
    """Masked next-token training on 'a+b=' -> the sum digit: the loss must fall far."""
    from model import GPT, GPTConfig, sequence_logprobs
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=8, n_layer=2, n_head=2, n_embd=32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)

    def batch():
        a, b = torch.randint(0, 5, (128,), generator=g), torch.randint(0, 5, (128,), generator=g)
        return torch.stack([a, torch.full_like(a, 10), b, torch.full_like(a, 11), a + b], 1)

    def loss_of(ids):
        return -sequence_logprobs(model, ids)[:, -1].mean()  # only the answer token

    first = loss_of(batch()).item()
    for _ in range(150):
        loss = loss_of(batch())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 2.0 and loss.item() < 0.2 * first
