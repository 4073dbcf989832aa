"""reward.py: the Bradley-Terry loss, the last-real-token read-out, gold-labelled pair sampling,
the normalised scorer other stages load, and a smoke run of the script."""
import json
import math

import pytest
import torch

import reward
import tasks
from conftest import run_script
from data import read_jsonl
from model import GPT, GPTConfig, load_checkpoint, save_checkpoint


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


@pytest.fixture
def rm(tok):
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32, scalar_head=True))
    with torch.no_grad():  # larger than GPT-2's init so positions and pads would visibly matter
        for name, p in m.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 / p.shape[1] ** 0.5)
    return m.eval()


# ----------------------------------------------------------------------------- loss

def test_bt_loss_at_equal_scores_is_log_2():
    for r in (0.0, 3.0, -7.5):
        assert abs(reward.bt_loss(t(r), t(r)).item() - math.log(2)) < 1e-12


def test_bt_loss_gradient_margin_and_centring_by_hand():
    rc, rr = t(1.5).requires_grad_(), t(-0.5).requires_grad_()
    reward.bt_loss(rc, rr).sum().backward()
    s = 1 / (1 + math.exp(2.0))  # dL/dr_c = -sigmoid(-(r_c - r_r))
    assert abs(rc.grad.item() + s) < 1e-12 and abs(rr.grad.item() - s) < 1e-12
    # Llama 2's margin: the pair must win by m; at r_c - r_r = m the loss is log 2 again
    assert abs(reward.bt_loss(t(2.0), t(1.0), margin=1.0).item() - math.log(2)) < 1e-12
    # centring: + eta (r_c + r_r)^2, zero when the pair straddles 0 symmetrically
    base = reward.bt_loss(t(3.0), t(1.0)).item()
    assert abs(reward.bt_loss(t(3.0), t(1.0), center_coef=0.1).item() - (base + 0.1 * 16)) < 1e-12
    assert abs(reward.bt_loss(t(1.0), t(-1.0), center_coef=0.1).item()
               - reward.bt_loss(t(1.0), t(-1.0)).item()) < 1e-12
    # and the loss falls as the score gap grows
    vals = [reward.bt_loss(t(d), t(0.0)).item() for d in (-3, -1, 0, 1, 3)]
    assert all(a > b for a, b in zip(vals, vals[1:]))


# ----------------------------------------------------------------------------- read-out

def test_score_is_read_at_the_last_real_token_under_right_padding(rm):
    a, b = [5, 9, 33, 70, 2], [11, 12, 13, 14, 15, 16, 17, 18, 19]
    alone = reward.last_token_scores(rm, torch.tensor([a]), torch.tensor([len(a)]))
    ids = torch.tensor([a + [0] * 4, b])
    batched = reward.last_token_scores(rm, ids, torch.tensor([len(a), len(b)]))
    assert abs(batched[0].item() - alone[0].item()) < 1e-5
    assert abs(batched[1].item() - reward.last_token_scores(rm, torch.tensor([b]), torch.tensor([9]))[0].item()) < 1e-5
    # different tokens (so different outputs) at the pad positions do not change the score ...
    ids2 = ids.clone()
    ids2[0, len(a):] = torch.tensor([200, 201, 202, 203])
    again = reward.last_token_scores(rm, ids2, torch.tensor([len(a), len(b)]))
    assert abs(again[0].item() - alone[0].item()) < 1e-5
    # ... while the head's output at the last position (a pad) does change: reading it would be a bug
    assert abs(rm.score(rm(ids2))[0, -1].item() - rm.score(rm(ids))[0, -1].item()) > 1e-3


def test_reward_scores_add_the_responses_log_likelihood(rm, tok):
    """r = head at the last real token + alpha * sum over mask-1 targets of log p(target), checked
    against a slow token-by-token log-softmax; alpha = 0 is the last-token read-out alone."""
    tool_answer = "calc(12*34)<|call|><|tool|>408<|end|><|assistant|>Answer: 408"
    ids, mask = reward.render_response(tok, "What is 12*34?", tool_answer)
    short, short_mask = reward.render_response(tok, "Hi?", "Hello.")
    batch = torch.tensor([ids, short + [0] * (len(ids) - len(short))])
    masks = torch.tensor([mask, short_mask + [0] * (len(ids) - len(short))])
    lengths = torch.tensor([len(ids), len(short)])
    head = reward.last_token_scores(rm, batch, lengths)
    assert torch.allclose(reward.reward_scores(rm, batch, lengths, masks, 0.0), head)
    got = reward.reward_scores(rm, batch, lengths, masks, 0.5)
    for row, (seq, m) in enumerate([(ids, mask), (short, short_mask)]):
        logits = rm.logits(torch.tensor([seq]))[0]
        loglik = sum(torch.log_softmax(logits[t - 1].double(), -1)[seq[t]].item()
                     for t in range(1, len(seq)) if m[t])
        assert sum(m) > 0 and loglik < 0  # m is 0 on the prompt and the tool output "408"
        assert abs(got[row].item() - (head[row].item() + 0.5 * loglik)) < 1e-4


def test_render_response_makes_tool_turns_special_tokens(tok):
    text = "calc(12*34)<|call|><|tool|>408<|end|><|assistant|>Answer: 408"
    ids, mask = reward.render_response(tok, "What is 12*34?", text)
    assert ids.count(tok.call_id) == 1 and ids.count(tok.role_id["tool"]) == 1
    tool_at = ids.index(tok.role_id["tool"])
    assert mask[tool_at:tool_at + 4] == [0, 0, 0, 0]  # header, '4','0','8' of the tool output
    assert ids[-1] == tok.end_id and mask[-1] == 1


def test_load_reward_model_normalises_and_batches(rm, tok, tmp_path):
    path = tmp_path / "rm.pt"
    save_checkpoint(path, rm, tok, "reward", extra=dict(reward_mean=0.25, reward_std=2.0, loglik_coef=0.3))
    score = reward.load_reward_model(str(path), batch_size=2)
    prompts = ["What is 2+3?", "What is 12*34?", "Help me cut a mango."]
    responses = ["Answer: 5", "calc(12*34)<|call|><|tool|>408<|end|><|assistant|>Answer: 408", "Slice it."]
    got = score(prompts, responses)
    assert got.shape == (3,) and not got.requires_grad
    one = lambda x: torch.tensor([x])  # a batch of one row
    for i in range(3):
        ids, mask = reward.render_response(tok, prompts[i], responses[i])
        raw = reward.reward_scores(rm, one(ids), one(len(ids)), one(mask), 0.3)[0].item()
        assert abs(got[i].item() - (raw - 0.25) / 2.0) < 1e-5
    save_checkpoint(tmp_path / "policy.pt", GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1,
                                                          n_head=1, n_embd=8)), tok, "sft")
    with pytest.raises(ValueError, match="not a reward model"):
        reward.load_reward_model(str(tmp_path / "policy.pt"))


# ----------------------------------------------------------------------------- pairs

def test_sampled_pairs_follow_the_gold_judge(tiny_sft):
    ckpt = load_checkpoint(tiny_sft / "sft.pt")
    pairs = reward.sample_preference_pairs(ckpt["model"], ckpt["tokenizer"], 12, seed=3)
    assert pairs and {p["family"] for p in pairs} <= set(tasks.FAMILIES)
    by_prompt = {t.prompt: t for f in tasks.FAMILIES for t in tasks.make_tasks(f, "train", 3, seed=3)}
    for p in pairs:
        task = by_prompt[p["prompt"]]  # a train-split prompt of the family it claims
        assert task.family == p["family"]
        assert tasks.gold_score(task, p["chosen"])["score"] > tasks.gold_score(task, p["rejected"])["score"]
    flipped = reward.sample_preference_pairs(ckpt["model"], ckpt["tokenizer"], 12, seed=3, label_noise=1.0)
    assert [(p["chosen"], p["rejected"]) for p in flipped] == [(p["rejected"], p["chosen"]) for p in pairs]


def test_k_samples_give_all_comparisons_or_the_widest_one(tiny_sft):
    """k=4: 'all' ranks the 4 samples and keeps every untied pair (<= 6 per prompt), each ordered
    by the gold judge; 'best_worst' keeps one pair per prompt, the one with the widest margin."""
    ckpt = load_checkpoint(tiny_sft / "sft.pt")
    model, tok = ckpt["model"], ckpt["tokenizer"]
    every = reward.sample_preference_pairs(model, tok, 8, seed=5, k=4, pairing="all")
    widest = reward.sample_preference_pairs(model, tok, 8, seed=5, k=4, pairing="best_worst")
    by_prompt = {t.prompt: t for f in tasks.FAMILIES for t in tasks.make_tasks(f, "train", 2, seed=5)}
    gap = lambda p: (tasks.gold_score(by_prompt[p["prompt"]], p["chosen"])["score"]
                     - tasks.gold_score(by_prompt[p["prompt"]], p["rejected"])["score"])
    assert every and all(gap(p) > 0 for p in every)
    assert all(sum(p["prompt"] == q for p in every) <= 6 for q in by_prompt)
    assert len({p["prompt"] for p in widest}) == len(widest) <= 8  # one pair per prompt at most
    for w in widest:  # the same samples (same seed), so its pair is the widest of that prompt's
        assert gap(w) == pytest.approx(max(gap(p) for p in every if p["prompt"] == w["prompt"]))
    with pytest.raises(ValueError, match="pairing"):
        reward.sample_preference_pairs(model, tok, 4, seed=5, pairing="random")


# ----------------------------------------------------------------------------- script

def test_reward_script_smoke(tiny_sft, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny model: a second thread only adds contention
    out = tmp_path / "rm.pt"
    run_script("reward.py", "--preset", "tiny", "--init", tiny_sft / "sft.pt", "--out", out)
    ckpt = load_checkpoint(out)
    assert ckpt["stage"] == "reward" and ckpt["model"].score_head is not None
    assert 0.0 <= ckpt["metrics"]["val_acc"] <= 1.0 and ckpt["extra"]["reward_std"] > 0
    fits = lambda p: max(len(reward.render_response(ckpt["tokenizer"], p["prompt"], p[k])[0])
                         for k in ("chosen", "rejected")) <= ckpt["model"].config.block_size
    pairs = [p for p in read_jsonl(tmp_path / "prefs_reward.jsonl", "pref") if fits(p)]  # as trained
    # the stored normalisation makes the training responses mean 0 / std 1
    score = reward.load_reward_model(str(out))
    r = score([p["prompt"] for p in pairs] * 2, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
    assert abs(r.mean().item()) < 0.05 and abs(r.std().item() - 1) < 0.05
    assert ckpt["extra"]["loglik_coef"] == 0.0  # the default: the classic last-token reward model
    rows = [json.loads(line) for line in open(tmp_path / "rm.jsonl")]
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-4  # zero-initialised head: every pair starts at log 2


def test_reward_script_rejects_a_malformed_line(tiny_sft, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    proc = run_script("reward.py", "--preset", "tiny", "--init", tiny_sft / "sft.pt", "--out", tmp_path / "x.pt",
                      "--data", data, check=False)
    assert proc.returncode == 2 and f"{data}:2" in proc.stderr and "Traceback" not in proc.stderr


def test_micro_batches_give_the_same_gradient(tiny_sft, tmp_path):
    # prompts of different lengths, several pairs each; micro-batches regroup them by length only
    rows = [{"prompt": f"What is {a}+{a}?" + " Please." * (a % 4), "chosen": f"Answer: {2 * a}",
             "rejected": f"Sure! It is {2 * a + 1}." + " I hope this helps!" * (a % 3)} for a in range(12) for _ in range(2)]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = {}
    for m in (1, 3):
        reward.main(["--preset", "tiny", "--init", str(tiny_sft / "sft.pt"), "--out", str(tmp_path / f"rm{m}.pt"),
                     "--data", str(data), "--batch-size", "6", "--micro-batches", str(m)])
        first[m] = json.loads(open(tmp_path / f"rm{m}.jsonl").readline())
    assert first[1]["loss"] == pytest.approx(first[3]["loss"], rel=1e-6)
    assert first[1]["grad_norm"] == pytest.approx(first[3]["grad_norm"], rel=1e-4) and first[1]["grad_norm"] > 0
