"""dpo.py: every loss against its closed form and hand-derived gradients, the completion
log-prob kernel (off-by-one, padding), KTO's reference point, smoke runs, and learning."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import dpo
from conftest import run_script
from model import load_checkpoint

BETA = 0.1
PAIRED = ("dpo", "ipo", "cdpo", "robust", "hinge", "simpo", "orpo")


def t(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def loss_at(h, loss, beta=BETA, eps=0.1, gamma=0.5, requires_grad=False):
    """The loss of one pair whose log-ratio margin is h (policy chosen = h, all else 0)."""
    pc = t(h).requires_grad_(requires_grad)
    return dpo.preference_loss(pc, t(0.0), t(0.0), t(0.0), beta, loss, eps, gamma), pc


# ----------------------------------------------------------------------------- closed forms

@pytest.mark.parametrize("loss,expected", [
    ("dpo", math.log(2)), ("cdpo", math.log(2)), ("robust", math.log(2)),
    ("ipo", (1 / (2 * BETA)) ** 2), ("hinge", 1.0),
])
def test_every_reference_based_loss_at_zero_margin(loss, expected):
    for logp in (-3.0, -17.5):  # only the margin matters, not the log-probs themselves
        got = dpo.preference_loss(t(logp), t(logp - 1), t(logp), t(logp - 1), BETA, loss, 0.2)
        assert got.shape == (1,) and abs(got.item() - expected) < 1e-12


def test_reference_free_losses_at_equal_average_logprobs():
    c, r, nc, nr = t(-6.0), t(-12.0), t(3.0), t(6.0)  # both average -2 per token
    simpo = dpo.preference_loss(c, r, beta=2.0, loss="simpo", gamma=0.7, chosen_len=nc, rejected_len=nr)
    assert abs(simpo.item() - math.log(1 + math.exp(0.7))) < 1e-12  # -log sigmoid(-gamma)
    orpo = dpo.preference_loss(c, r, beta=0.25, loss="orpo", chosen_len=nc, rejected_len=nr)
    assert abs(orpo.item() - (2.0 + 0.25 * math.log(2))) < 1e-12  # NLL + lambda log 2


def test_orpo_log_odds_by_hand():
    a, b, lam = -0.5, -1.5, 0.3
    log_odds = lambda x: math.log(math.exp(x) / (1 - math.exp(x)))
    expected = -a - lam * math.log(1 / (1 + math.exp(-(log_odds(a) - log_odds(b)))))
    assert abs(dpo.orpo_loss(t(a), t(b), lam).item() - expected) < 1e-12


def test_kto_at_the_reference_point_is_half_its_weight():
    r = t(0.3, 0.3)
    got = dpo.kto_loss(r, torch.tensor([True, False]), t(0.3), BETA, lambda_d=1.0, lambda_u=1.5)
    assert torch.allclose(got, t(0.5, 0.75))


def test_cdpo_is_dpo_without_smoothing_and_robust_unbiases_flips():
    h = t(-3.0, 0.5, 4.0)
    assert torch.allclose(dpo.cdpo_loss(h, BETA, 0.0), dpo.dpo_loss(h, BETA))
    assert torch.allclose(dpo.robust_loss(h, BETA, 0.0), dpo.dpo_loss(h, BETA))
    # robust DPO: its expectation over a flip with prob eps is the clean loss (Chowdhury eq. 8)
    eps = 0.2
    expected = (1 - eps) * dpo.robust_loss(h, BETA, eps) + eps * dpo.robust_loss(-h, BETA, eps)
    assert torch.allclose(expected, dpo.dpo_loss(h, BETA))


# ----------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("h", [-20.0, -1.0, 0.0, 2.5, 30.0])
def test_dpo_gradient_matches_hand_derivation(h):
    pc, pr = t(h).requires_grad_(), t(0.0).requires_grad_()
    rc, rr = t(0.0).requires_grad_(), t(0.0).requires_grad_()
    dpo.preference_loss(pc, pr, rc, rr, BETA, "dpo").sum().backward()
    g = BETA * torch.sigmoid(t(-BETA * h))  # dL/dlog pi(y_w) = -beta sigmoid(-beta h)
    assert torch.allclose(pc.grad, -g) and torch.allclose(pr.grad, g)
    assert torch.allclose(rc.grad, g) and torch.allclose(rr.grad, -g)


@pytest.mark.parametrize("h", [-4.0, 0.0, 3.0, 12.0])
def test_other_gradients_match_hand_derivations(h):
    s = lambda x: 1 / (1 + math.exp(-x))
    eps = 0.1
    expected = {
        "ipo": 2 * (h - 1 / (2 * BETA)),
        "hinge": -BETA if BETA * h < 1 else 0.0,
        "cdpo": -BETA * ((1 - eps) * s(-BETA * h) - eps * s(BETA * h)),
        "robust": -BETA * ((1 - eps) * s(-BETA * h) + eps * s(BETA * h)) / (1 - 2 * eps),
    }
    for loss, g in expected.items():
        out, pc = loss_at(h, loss, eps=eps, requires_grad=True)
        out.sum().backward()
        assert abs(pc.grad.item() - g) < 1e-12, loss
    # KTO, desirable: L = lambda - lambda sigmoid(beta (r - z0)) -> dL/dr = -lambda beta s (1 - s)
    r = t(h).requires_grad_()
    dpo.kto_loss(r, torch.tensor([True]), t(1.0), BETA, 2.0, 1.0).sum().backward()
    sv = s(BETA * (h - 1.0))
    assert abs(r.grad.item() + 2.0 * BETA * sv * (1 - sv)) < 1e-12


@pytest.mark.parametrize("loss", PAIRED)
def test_loss_falls_as_the_margin_grows(loss):
    # IPO is minimal at its target margin 1/(2 beta) = 5: scan below it
    hs = [-8.0, -2.0, 0.0, 1.0, 2.5, 4.0]
    if loss in ("simpo", "orpo"):  # reference-free: the margin is in average log-probs
        vals = [dpo.preference_loss(t(-1.0 + h / 20), t(-1.0 - h / 20), beta=2.0, loss=loss,
                                    chosen_len=t(1.0), rejected_len=t(1.0)).item() for h in hs]
    else:
        vals = [loss_at(h, loss)[0].item() for h in hs]
    assert all(a > b for a, b in zip(vals, vals[1:])), vals
    # KTO: desirable loss falls and undesirable loss rises as the log-ratio grows
    r = t(*hs)
    good = dpo.kto_loss(r, torch.ones(len(hs), dtype=torch.bool), t(0.0), BETA)
    bad = dpo.kto_loss(r, torch.zeros(len(hs), dtype=torch.bool), t(0.0), BETA)
    assert (good.diff() < 0).all() and (bad.diff() > 0).all()


def test_unknown_loss_is_an_error():
    with pytest.raises(ValueError, match="kto_loss"):
        dpo.preference_loss(t(0.0), t(0.0), t(0.0), t(0.0), loss="kto")


# ----------------------------------------------------------------------------- log-probs

def slow_completion_logp(model, ids, mask):
    """The obvious implementation: one full forward per row, a Python loop over positions."""
    out = []
    for row, m in zip(ids, mask):
        logits = model.logits(row[None])[0].double()
        out.append(sum(torch.log_softmax(logits[i - 1], -1)[row[i]] for i in range(1, len(row)) if m[i]))
    return torch.stack(out)


def test_completion_logps_excludes_prompt_and_pads_and_includes_the_first_token(model):
    p1, c1 = [3, 17, 40, 8], [50, 61, 9]
    p2, c2 = [5, 6], [70, 71, 72, 73, 74, 9]
    rows = [(p1, c1, [1] * 3), (p2, c2, [1, 1, 0, 0, 1, 1])]  # row 2: a tool output in the middle
    ids, mask = dpo.collate(rows, 0, "cpu")
    assert mask.tolist() == [[0, 0, 0, 0, 1, 1, 1, 0], [0, 0, 1, 1, 0, 0, 1, 1]]
    logp, n = dpo.completion_logps(model, ids, mask)
    assert torch.allclose(logp.double(), slow_completion_logp(model, ids, mask), atol=1e-4)
    assert n.tolist() == [3.0, 4.0]
    # the classic off-by-one: the first completion token is predicted from the last prompt token
    only_first = torch.zeros_like(mask)
    only_first[0, len(p1)] = 1
    first, _ = dpo.completion_logps(model, ids, only_first)
    expected = torch.log_softmax(model.logits(ids[:1])[0, len(p1) - 1], -1)[c1[0]]
    assert abs(first[0].item() - expected.item()) < 1e-5


def test_completion_logps_is_padding_invariant(model):
    short = ([3, 17, 40], [50, 61, 9], [1, 1, 1])
    alone, _ = dpo.completion_logps(model, *dpo.collate([short], 0, "cpu"))
    partner = ([1] * 20, [2] * 15, [1] * 15)
    batched, _ = dpo.completion_logps(model, *dpo.collate([partner, short], 0, "cpu"))
    ids, mask = dpo.collate([short], 0, "cpu")
    padded = torch.cat([ids, torch.full((1, 9), 0)], 1), torch.cat([mask, torch.zeros(1, 9, dtype=mask.dtype)], 1)
    extra, _ = dpo.completion_logps(model, *padded)
    ids2 = padded[0].clone()
    ids2[0, ids.shape[1]:] = 123  # garbage in the pad positions changes nothing either
    garbage, _ = dpo.completion_logps(model, ids2, padded[1])
    for other in (batched[1], extra[0], garbage[0]):
        assert abs(other.item() - alone[0].item()) < 1e-5


def test_encode_turns_tool_text_into_special_tokens_with_the_tool_output_masked(tok):
    text = "calc(12*34)<|call|><|tool|>408<|end|><|assistant|>Answer: 408"
    p, c, m = dpo.encode(tok, "What is 12*34?", text)
    assert p[-1] == tok.role_id["assistant"] and tok.call_id in c and tok.role_id["tool"] in c
    tool_at = c.index(tok.role_id["tool"])
    assert m[c.index(tok.call_id)] == 1 and m[tool_at:tool_at + 4] == [0] * 4
    assert c[-1] == tok.end_id and m[-1] == 1


def test_encode_pairs_drops_a_side_with_no_policy_token(tok):
    """A sample opening with a stray <|tool|> is all tool output to the template (mask 0): its
    log-prob would be an empty sum, and RPO's per-token NLL 0/0 (a NaN that once killed a run)."""
    good = dict(prompt="Help me smoke a brisket.", chosen="Cook it low and slow.", rejected="Sorry, I can't help.")
    stray = dict(good, chosen="<|tool|> smell cook it low")
    chosen, rejected, prompts = dpo.encode_pairs(tok, [good, stray, good], 256)
    assert len(chosen) == len(rejected) == len(prompts) == 2
    assert all(sum(x[2]) > 0 for x in chosen + rejected)
    assert sum(dpo.encode(tok, stray["prompt"], stray["chosen"])[2]) == 0  # what was dropped


# ----------------------------------------------------------------------------- KTO reference point

def test_kto_reference_point_is_detached_clamped_mean():
    x = t(0.5, 1.5, -0.5).requires_grad_()
    z0 = dpo.kto_reference_point(x)
    assert not z0.requires_grad and abs(z0.item() - 0.5) < 1e-12
    assert dpo.kto_reference_point(t(-2.0, -1.0, 0.5)).item() == 0.0  # a KL is never negative
    loss = dpo.kto_loss(x, torch.tensor([True, False, True]), z0, BETA).sum()
    loss.backward()  # the gradient reaches the log-ratios only through r, never through z0
    s = torch.sigmoid(BETA * (x.detach() - 0.5))
    assert torch.allclose(x.grad, t(-1, 1, -1) * BETA * s * (1 - s))


def test_kto_reference_point_comes_from_mismatched_pairs():
    prompts = ["a", "a", "b", "b", "c", "d"]  # chosen and rejected of one prompt share it
    partner = dpo.mismatched_partners(prompts, seed=0)
    assert sorted(partner) == list(range(6))  # every completion is used once
    assert all(prompts[j] != prompts[i] for i, j in enumerate(partner))
    examples = [([i], [10 + i, 20 + i], [1, 1]) for i in range(6)]
    rows = dpo.mismatched_rows(examples, partner, block_size=8)
    assert [r[0] for r in rows] == [[i] for i in range(6)]
    assert [r[1][0] - 10 for r in rows] == partner
    assert dpo.mismatched_rows(examples, partner, block_size=2)[0][1] == [10 + partner[0]]  # cut to fit
    # hand-built log-ratios: matched pairs rose a lot (trained on), mismatched ones a little
    logratio = {(i, j): (5.0 if i == j else 0.1 * (i + j)) for i in range(6) for j in range(6)}
    z0 = dpo.kto_reference_point(t(*[logratio[i, j] for i, j in enumerate(partner)]))
    expected = sum(0.1 * (i + j) for i, j in enumerate(partner)) / 6
    assert abs(z0.item() - expected) < 1e-12 and z0.item() < 5.0
    with pytest.raises(ValueError):
        dpo.mismatched_partners(["a", "a", "a", "b"], seed=0)


# ----------------------------------------------------------------------------- runs

def fixed_pairs(n=24):
    """Right and wrong answers to sums: a fixed preference set with a clear signal."""
    out = []
    for i in range(n):
        a, b = 10 + 7 * i, 3 + 5 * i
        out.append({"prompt": f"What is {a}+{b}?", "chosen": f"Answer: {a + b}",
                    "rejected": f"Sure! I think it is {a + b + 11}. I hope this helps!"})
    return out


@pytest.fixture(scope="module")
def pref_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in fixed_pairs()))
    return path


def test_cli_smoke_samples_pairs_trains_and_reports(tiny_sft, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny model: a second thread only adds contention
    out = tmp_path / "dpo.pt"
    run_script("dpo.py", "--preset", "tiny", "--init", tiny_sft / "sft.pt", "--out", out)
    ckpt = load_checkpoint(out)
    assert ckpt["stage"] == "dpo" and ckpt["parent"] == str(tiny_sft / "sft.pt")
    for key in ("gold_winrate_vs_sft", "refusal_unsafe", "overrefusal_safe", "train_reward_acc"):
        assert 0.0 <= ckpt["metrics"][key] <= 1.0, key
    rows = [json.loads(line) for line in open(tmp_path / "dpo.jsonl")]
    assert {"rewards_chosen", "rewards_rejected", "reward_acc", "margin", "logps_chosen"} <= set(rows[0])
    from data import read_jsonl
    assert read_jsonl(tmp_path / "prefs_dpo.jsonl", "pref")


@pytest.mark.parametrize("loss", PAIRED + ("kto",))
def test_every_loss_runs(loss, tiny_sft, pref_file, tmp_path):
    # in-process (one interpreter start for all eight); the CLI path is covered above
    out = tmp_path / f"{loss}.pt"
    dpo.main(["--preset", "tiny", "--init", str(tiny_sft / "sft.pt"), "--out", str(out), "--loss", loss,
              "--data", str(pref_file), "--eval-tasks", "1"])
    m = load_checkpoint(out)["metrics"]
    assert m["loss_type"] == loss and math.isfinite(m["train_margin"]) and "gold_winrate_vs_sft" in m


def test_kto_reads_unpaired_data(tiny_sft, tmp_path):
    data = tmp_path / "kto.jsonl"
    rows = [{"prompt": p["prompt"], "completion": c, "label": lab}
            for p in fixed_pairs(6) for c, lab in ((p["chosen"], True), (p["rejected"], False))]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dpo.main(["--preset", "tiny", "--init", str(tiny_sft / "sft.pt"), "--out", str(tmp_path / "k.pt"),
              "--loss", "kto", "--data", str(data), "--eval-tasks", "0"])
    logged = [json.loads(line) for line in open(tmp_path / "k.jsonl")]
    assert "kl" in logged[0] and load_checkpoint(tmp_path / "k.pt")["metrics"]["n_examples"] == 12
    with pytest.raises(SystemExit):  # unpaired data cannot feed a paired loss
        dpo.main(["--preset", "tiny", "--init", str(tiny_sft / "sft.pt"), "--out", str(tmp_path / "x.pt"),
                  "--data", str(data)])


def test_malformed_data_is_rejected_with_file_and_line(tiny_sft, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 1, "rejected": "c"}\n')
    proc = run_script("dpo.py", "--preset", "tiny", "--init", tiny_sft / "sft.pt", "--out", tmp_path / "x.pt",
                      "--data", data, check=False)
    assert proc.returncode == 2 and f"{data}:2" in proc.stderr and "Traceback" not in proc.stderr


def test_dpo_raises_the_implicit_reward_accuracy(tiny_sft, pref_file, tmp_path):
    out = tmp_path / "learn.pt"
    dpo.main(["--preset", "tiny", "--init", str(tiny_sft / "sft.pt"), "--out", str(out), "--data", str(pref_file),
              "--epochs", "8", "--batch-size", "8", "--lr", "3e-3", "--beta", "0.5", "--eval-tasks", "0", "--rpo-alpha", "0"])
    logged = [json.loads(line) for line in open(tmp_path / "learn.jsonl")]
    first = logged[0]  # step 0: the policy is still the reference, every implicit reward is ~0
    assert abs(first["margin"]) < 1e-3 and abs(first["loss"] - math.log(2)) < 1e-3
    m = load_checkpoint(out)["metrics"]
    assert m["train_reward_acc"] >= 0.9 and m["train_margin"] > 1.0
    # relative, not absolute: DPO may lower both log-probs, the rejected one much further
    last = [r for r in logged if "logps_chosen" in r][-1]
    gap = lambda r: r["logps_chosen"] - r["logps_rejected"]
    assert gap(last) > gap(first) + 5


@pytest.mark.parametrize("loss", ("dpo", "kto"))
def test_micro_batches_give_the_same_loss_and_gradient(loss, tiny_sft, pref_file, tmp_path):
    # length-sorted micro-batches change only the padding: step 0's loss and gradient norm (same
    # weights) must be those of one forward over the whole batch
    first = {}
    for m in (1, 3):
        out = tmp_path / f"{loss}{m}.pt"
        dpo.main(["--preset", "tiny", "--init", str(tiny_sft / "sft.pt"), "--out", str(out), "--data", str(pref_file),
                  "--loss", loss, "--batch-size", "6", "--micro-batches", str(m), "--eval-tasks", "0"])
        first[m] = json.loads(open(tmp_path / f"{loss}{m}.jsonl").readline())
    assert first[1]["loss"] == pytest.approx(first[3]["loss"], rel=1e-5)
    assert first[1]["grad_norm"] == pytest.approx(first[3]["grad_norm"], rel=1e-4) and first[1]["grad_norm"] > 0
