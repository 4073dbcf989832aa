"""evaluate.py (intervals, gate), chat.py, GPT-2 export/import, bench.py --quick."""
import dataclasses
import json
import os
import subprocess
import sys

import torch

import evaluate
import tasks
from conftest import ROOT, run_script
from data import render_chat
from model import GPT, GPTConfig, load_checkpoint, save_checkpoint, sequence_logprobs


def test_wilson_interval_by_hand():
    lo, hi = evaluate.wilson(8, 10)  # p = 0.8, z = 1.96: the textbook (0.490, 0.943)
    assert abs(lo - 0.4902) < 1e-3 and abs(hi - 0.9433) < 1e-3
    assert evaluate.wilson(0, 20)[0] == 0.0 and evaluate.wilson(20, 20)[1] == 1.0


def test_paired_bootstrap_brackets_the_change():
    a = [1.0] * 50 + [0.0] * 50
    b = [1.0] * 80 + [0.0] * 20
    lo, hi = evaluate.paired_bootstrap(a, b)
    assert 0 < lo < 0.3 < hi < 0.5
    assert evaluate.paired_bootstrap(a, a) == (0.0, 0.0)


def refuser(tok):
    """A tiny model overfitted to refuse every request: a baseline with a perfect refusal rate."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=1, n_head=2, n_embd=32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    convs = [[{"role": "user", "content": p}, {"role": "assistant", "content": "Sorry, I can't help with that."}]
             for p in ("How do I steal a car?", "What is 2+2?", "Write a function.", "Hi")]
    rendered = [render_chat(tok, c) for c in convs]
    T = max(len(r[0]) for r in rendered)
    ids = torch.tensor([r[0] + [tok.pad_id] * (T - len(r[0])) for r in rendered])
    mask = torch.tensor([r[1] + [0] * (T - len(r[1])) for r in rendered]).float()
    for _ in range(150):
        loss = -(sequence_logprobs(model, ids) * mask[:, 1:]).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_math_failure_names_the_first_wrong_line():
    # 75+47: reference '5+7+0=12', '7+4+1=12', '75+47=122', 'Answer: 122'
    t = tasks.Task("math", "What is 75+47?", "122", [{"role": "assistant", "content": "\n".join(
        tasks._columns(75, "+", 47)[0] + ["75+47=122", "Answer: 122"])}])
    assert t.reference_text().splitlines()[:2] == ["5+7+0=12", "7+4+1=12"]
    cases = {
        "5+7+0=12\n7+4+1=12\n75+47=122\nAnswer: 122": None,
        "Answer: 121": "no working",
        "5+7+0=13\n7+4+1=13\n75+47=133\nAnswer: 133": "column fact",
        "5+7+0=12\n7+4+0=11\n75+47=112\nAnswer: 112": "column digits",  # the carry dropped
        "5+7+0=12\n7+4+1=12\n75+47=121\nAnswer: 121": "step result",
        "5+7+0=12\n7+4+1=12\n75+47=122\nAnswer: 123": "answer",
        "Sure! 5+7+0=12\nAnswer: 12": "other",
    }
    for response, want in cases.items():
        assert evaluate.math_failure(t, response) == want, response
    counts = evaluate.math_failures([t] * len(cases), list(cases))
    assert counts["right"] == 1 and sum(counts.values()) == len(cases) and counts["column fact"] == 1


def test_several_samples_per_task_stay_with_their_task(monkeypatch):
    """--samples n: each task's n samples, task-major, answer that task's prompt (respond groups
    the tasks by family, so the order has to be put back), and the win rate counts each pair."""
    def echo(model, tok, prompts, max_new, temperature, generator=None, tools=True):
        return {"texts": list(prompts), "sampled": torch.ones(len(prompts), 3)}
    monkeypatch.setattr(evaluate, "generate_responses", echo)
    task_list = tasks.eval_tasks("test", 2)
    texts = evaluate.sample_texts(torch.nn.Linear(1, 1), None, task_list, n=3)
    assert texts == [t.prompt for t in task_list for _ in range(3)]
    repeated = [t for t in task_list for _ in range(3)]
    assert evaluate.gold_winrate(repeated, texts, texts) == 0.5  # every pair a tie


def test_rm_pair_accuracy_by_hand():
    """Pairs within a task only, gold ties skipped, reward-model ties half: 3 samples each of a
    math and a code task give 2 + 3 judged pairs."""
    math, code = dataclasses.replace(tasks.eval_tasks("test", 1)[0], family="math"), \
        dataclasses.replace(tasks.eval_tasks("test", 1)[0], family="code")
    task_list = [math] * 3 + [code] * 3
    gold = [1.0, 0.0, 0.0, 0.0, 1.0, 2.0]
    rm = [0.5, 0.9, 0.1, 1.0, 1.0, 3.0]  # math: (0,1) wrong, (0,2) right; code: tie, right, right
    acc = evaluate.rm_pair_accuracy(lambda prompts, texts: torch.tensor(rm), task_list, ["x"] * 6, gold, 3)
    assert acc == {"rm_pair_acc_code": 2.5 / 3, "rm_pair_acc_math": 0.5, "rm_pair_acc": 3.5 / 5}
    assert evaluate.by_family_text("dpo", acc, "rm_pair_acc") == "dpo 0.70 (code 0.83, math 0.50)"


def test_family_wins_by_hand():
    """The sampled win rate split by family: each family's pairs only, ties half."""
    math, code = dataclasses.replace(tasks.eval_tasks("test", 1)[0], family="math"), \
        dataclasses.replace(tasks.eval_tasks("test", 1)[0], family="code")
    task_list = [math, math, code, code, code]
    scores, baseline = [1.0, 0.0, 1.3, 1.3, 0.0], [0.0, 0.0, 1.0, 1.3, 1.3]  # math: win, tie; code: win, tie, loss
    got = evaluate.family_wins(task_list, scores, baseline, prefix="w")
    assert got == {"w_code": 1.5 / 3, "w_math": 1.5 / 2}
    row = dict(w=evaluate.wins(scores, baseline), **got)
    assert evaluate.by_family_text("ppo", row, "w") == "ppo 0.60 (code 0.50, math 0.75)"


def test_gate_passes_itself_and_fails_a_damaged_copy(tiny_sft, tmp_path):
    tok = load_checkpoint(tiny_sft / "sft.pt")["tokenizer"]
    model = refuser(tok)
    save_checkpoint(tmp_path / "good.pt", model, tok, "sft")
    with torch.no_grad():  # damage: scramble the output embedding
        model.transformer.wte.weight.copy_(torch.randn_like(model.transformer.wte.weight))
    save_checkpoint(tmp_path / "bad.pt", model, tok, "sft")
    same = run_script("evaluate.py", "--gate", tmp_path / "good.pt", tmp_path / "good.pt", "--n", "16", check=False)
    assert same.returncode == 0 and "gate: PASS" in same.stdout
    worse = run_script("evaluate.py", "--gate", tmp_path / "good.pt", tmp_path / "bad.pt", "--n", "16", check=False)
    assert worse.returncode == 1 and "gate: FAIL" in worse.stdout
    assert "refusal_unsafe" in worse.stdout and "REGRESSION" in worse.stdout


def test_report_dir_keeps_the_runs_own_report(tiny_sft, tmp_path):
    """A side evaluation (--n, --samples) writes its table under --report-dir, not over out/report.md."""
    run_script("evaluate.py", tiny_sft / "sft.pt", "--out-dir", tiny_sft, "--n", "3", "--samples", "2",
               "--passk-problems", "0", "--report-dir", tmp_path / "side")
    report = json.load(open(tmp_path / "side" / "report.json"))
    assert report["samples"] == 2 and report["rows"]["sft"]["gold_winrate_vs_sft_t1"] is not None
    md = open(tmp_path / "side" / "report.md").read()
    assert "2 samples per task" in md
    # SFT against its own samples (the same seed): every family's pairs tie
    assert "by family: sft 0.50 (code 0.50, math 0.50, safety 0.50, tool 0.50)" in md
    assert not os.path.exists(tiny_sft / "report.md")


def test_vs_compares_with_the_given_checkpoint(tiny_sft, tmp_path):
    """--vs puts a checkpoint in SFT's place: against itself its greedy answers tie and its KL is
    0; the report says what the win rates compare with."""
    tok = load_checkpoint(tiny_sft / "sft.pt")["tokenizer"]
    save_checkpoint(tmp_path / "refuser.pt", refuser(tok), tok, "sft")
    run_script("evaluate.py", tmp_path / "refuser.pt", tiny_sft / "sft.pt", "--vs", tmp_path / "refuser.pt",
               "--out-dir", tiny_sft, "--n", "4", "--passk-problems", "0", "--report-dir", tmp_path / "vs")
    report = json.load(open(tmp_path / "vs" / "report.json"))
    itself, sft = report["rows"]["refuser"], report["rows"]["sft"]
    assert itself["gold_winrate_vs_sft"] == 0.5 and abs(itself["kl_to_sft"]) < 1e-6
    assert sft["kl_to_sft"] > 0.1  # the tiny SFT model is far from one that always refuses
    assert f"compare with {tmp_path / 'refuser.pt'}" in open(tmp_path / "vs" / "report.md").read()
    missing = run_script("evaluate.py", tiny_sft / "sft.pt", "--vs", tmp_path / "nope.pt", check=False)
    assert missing.returncode != 0 and "nope.pt: no such checkpoint" in missing.stderr


def export(ckpt_path, folder):
    return subprocess.run([sys.executable, os.path.join(ROOT, "model.py"), "export", ckpt_path, folder],
                          capture_output=True, text=True, cwd=ROOT)


def test_export_then_import_gives_identical_logits_and_tokens(tiny_sft, tmp_path):
    rotary = load_checkpoint(tiny_sft / "sft.pt")
    proc = export(tiny_sft / "sft.pt", tmp_path / "rope_hf")  # GPT-2's format can't hold rotary positions
    assert proc.returncode != 0 and "sft.pt" in proc.stderr and "learned positions only" in proc.stderr
    # the same weights with a (randomly initialised) learned position table: GPT-2's architecture
    learned = GPT(dataclasses.replace(rotary["model"].config, pos_embedding="learned"))
    learned.load_state_dict(rotary["model"].state_dict(), strict=False)
    save_checkpoint(tmp_path / "learned.pt", learned, rotary["tokenizer"], "sft")
    ck = load_checkpoint(tmp_path / "learned.pt")
    proc = export(tmp_path / "learned.pt", tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr
    assert {"config.json", "pytorch_model.bin", "vocab.json", "merges.txt"} <= set(os.listdir(tmp_path / "hf"))
    back = load_checkpoint(f"gpt2:{tmp_path / 'hf'}")
    text = "What is 347*829? héllo 😀 def f(x):\n    return x <|end|>"
    assert back["tokenizer"].encode(text) == ck["tokenizer"].encode(text)
    ids = torch.tensor([ck["tokenizer"].encode(text)])
    assert torch.equal(back["model"].logits(ids), ck["model"].logits(ids))


def test_chat_answers_through_stdin_and_exits_cleanly(tiny_sft):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "chat.py"), tiny_sft / "sft.pt", "--max-new", "8"],
                          input="What is 2+3?\n/temp 0.7\nhello\n/reset\n", capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("bot> ") == 2 and "(temperature 0.7)" in proc.stdout
    assert "(conversation cleared)" in proc.stdout and "Traceback" not in proc.stderr


def test_bench_quick_prints_every_row(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--quick", "--out-dir", "/nonexistent",
                           "--json", tmp_path / "bench.json"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for row in ("matmul peak", "sampler", "log-prob kernel", "training", "MFU", "SFT step", "grpo step", "ppo step"):
        assert row in proc.stdout
    sft = json.load(open(tmp_path / "bench.json"))["sft_packing"]
    assert 0 < sft["packed_rows"] < sft["conversations"] and sft["packed_tok_s"] > 0 and sft["padded_tok_s"] > 0
    rl = json.load(open(tmp_path / "bench.json"))["rl_step"]  # the RL step breakdown, on random tiny models
    for name, phases in (("grpo", ("rollout", "reward", "logprobs", "update")),
                         ("ppo", ("rollout", "reward", "logprobs", "update", "critic_update"))):
        p = rl[name]
        assert all(p[k] > 0 for k in phases + ("total",)), p
        assert sum(p[k] for k in phases) <= p["total"] and 0 < p["rollout_frac"] < 1, p
