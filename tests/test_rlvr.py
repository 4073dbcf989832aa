"""rlvr.py: forced tool tokens are out of every loss and advantage (through a real rollout with a
scripted tool call), GAE and REINFORCE++ ignore them, the format gate, truncation rules, dynamic
sampling, the curriculum, pass@k against the closed form, and a smoke run of every --algo."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import grpo
import rlvr
import tasks
from common import parse_config
from model import load_checkpoint, token_logprobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_sft(tmp_path_factory):
    """tiny base -> sft, in-process (conftest's one-thread setting: subprocesses with two threads
    crawl on a shared 2-core machine); reuses test_grpo.py's stack when it is already built."""
    shared = tmp_path_factory.getbasetemp() / "rl_tiny"
    if (shared / "sft.pt").exists():
        return shared
    import pretrain
    import sft
    d = tmp_path_factory.mktemp("rlvr_tiny")
    pretrain.main(["--preset", "tiny", "--out", str(d / "base.pt")])
    sft.main(["--preset", "tiny", "--init", str(d / "base.pt"), "--out", str(d / "sft.pt"), "--eval-tasks", "0"])
    return d


def config(*argv):
    return rlvr.resolve_algo(parse_config(rlvr.DEFAULTS, rlvr.PRESETS, list(argv)))


def fake_batch(texts, lengths, finished, P=3):
    """A rollout-shaped batch: P prompt tokens, then `length` response tokens per row."""
    B, N = len(texts), max(lengths)
    attn = torch.zeros(B, P + N, dtype=torch.long)
    attn[:, :P] = 1
    for i, n in enumerate(lengths):
        attn[i, P:P + n] = 1
    resp = attn[:, 1:].float()
    resp[:, :P - 1] = 0
    return dict(ids=torch.ones(B, P + N, dtype=torch.long), attn_mask=attn, resp_mask=resp,
                finished=torch.tensor(finished), texts=list(texts), prompts=["p"] * B,
                group=torch.arange(B), prompt_len=P)


# ----------------------------------------------------------------------------- tool tokens: masked everywhere

class ScriptedHead(torch.nn.Module):
    """An lm_head that makes the sampler say `script` token by token (the real weight stays the
    head's weight, so log-probs are the model's own)."""

    def __init__(self, weight, script):
        super().__init__()
        self.weight, self.script, self.t = weight, script, 0

    def forward(self, h):
        logits = torch.full((*h.shape[:-1], self.weight.shape[0]), -1e4)
        logits[..., self.script[min(self.t, len(self.script) - 1)]] = 0.0
        self.t += 1
        return logits


@pytest.fixture
def tool_rollout(model, tok):
    """Two samples of 'calc(12*34)' -> the calculator inserts '408' -> 'Answer: 408', sampled by
    the real sampler (grpo.rollout, tools on) from a scripted head."""
    pre = tok.encode("calc(12*34)") + [tok.call_id]
    forced = [tok.role_id["tool"]] + tok.encode("408") + [tok.end_id, tok.role_id["assistant"]]
    post = tok.encode("Answer: 408") + [tok.end_id]
    real = model.lm_head
    model.lm_head = ScriptedHead(real.weight, pre + forced + post)
    batch = grpo.rollout(model, tok, ["What is 12*34?"], 2, 40, 0.0, tools=True)
    model.lm_head = real
    sampled = torch.tensor([1] * len(pre) + [0] * len(forced) + [1] * len(post), dtype=torch.float)
    return batch, sampled


def test_rollout_marks_inserted_tool_tokens_unsampled(tool_rollout, tok):
    batch, sampled = tool_rollout
    P = batch["prompt_len"]
    assert batch["texts"][0] == "calc(12*34)<|call|><|tool|>408<|end|><|assistant|>Answer: 408"
    n = len(sampled)
    assert torch.equal(batch["resp_mask"][:, P - 1:P - 1 + n], sampled.expand(2, n))
    assert batch["resp_mask"][:, :P - 1].sum() == 0 and batch["resp_mask"][:, P - 1 + n:].sum() == 0
    task = tasks.Task("tool", "What is 12*34?", "408", [])
    correct, credit, fmt = rlvr.judge([task, task], batch["texts"], {})
    assert correct.tolist() == credit.tolist() == fmt.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("algo", [a for a in rlvr.ALGOS if a != "ppo"] + ["tree"])
def test_forced_tool_tokens_get_no_policy_gradient(tool_rollout, model, algo):
    """The loss every algo optimises (clipped surrogate + β·KL, aggregated over resp_mask), with
    advantages from rlvr.advantages: its gradient w.r.t. the hidden state that predicts a forced
    token is exactly 0, and changing those tokens' log-probs leaves the loss unchanged."""
    batch, sampled = tool_rollout
    algo_args = ("--algo", "dapo", "--advantage", "tree") if algo == "tree" else ("--algo", algo)
    cfg = config(*algo_args, "--group-size", "2", "--kl", "k3", "--beta", "0.1")
    mask, P = batch["resp_mask"], batch["prompt_len"]
    forced = torch.zeros_like(mask, dtype=torch.bool)
    forced[:, P - 1:P - 1 + len(sampled)] = sampled == 0  # targets the calculator wrote
    h = model(batch["ids"][:, :-1], batch["attn_mask"][:, :-1]).detach().requires_grad_()
    logp = token_logprobs(h, model.lm_head.weight, batch["ids"][:, 1:], 1.0)
    g = torch.Generator().manual_seed(0)
    old = logp.detach() + 0.3 * torch.randn(logp.shape, generator=g)  # ρ != 1: the clip is active
    ref = logp.detach() + 0.5 * torch.randn(logp.shape, generator=g)
    adv = rlvr.advantages(torch.tensor([1.0, 0.0]), batch, cfg, old, ref)
    assert torch.equal(adv[forced], torch.zeros(int(forced.sum())))

    def loss_of(lp):
        loss_tok, _ = grpo.clipped_surrogate(lp, old, adv, cfg["eps_low"], cfg["eps_high"])
        loss_tok = loss_tok + cfg["beta"] * grpo.kl_estimate(lp, ref, cfg["kl"])
        return grpo.aggregate(loss_tok, mask, cfg["loss_agg"], None, 96)

    loss = loss_of(logp)
    loss.backward()
    assert torch.equal(h.grad[forced], torch.zeros_like(h.grad[forced]))
    assert h.grad[mask.bool()].abs().sum() > 0
    assert loss_of(logp.detach() + 5.0 * forced).item() == loss.item()


def insert_masked(x, at, k, fill):
    """x (B,T) with k columns of `fill` inserted before column `at`."""
    return torch.cat([x[:, :at], fill.expand(x.shape[0], k), x[:, at:]], 1)


def test_gae_unchanged_by_masked_tool_tokens_in_the_middle():
    ppo = pytest.importorskip("ppo")
    if not hasattr(ppo, "gae"):
        pytest.skip("ppo.gae not written yet")
    g = torch.Generator().manual_seed(0)
    B, T = 3, 8
    r, v = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    mask = torch.ones(B, T)
    mask[:, :2] = 0  # prompt
    mask[2, 6:] = 0  # a shorter response
    adv, ret = ppo.gae(r, v, mask, gamma=0.9, lam=0.8)
    at, k = 4, 3  # a tool output inserted mid-response, with junk rewards and values
    r2 = insert_masked(r, at, k, torch.full((1, k), 7.0))
    v2 = insert_masked(v, at, k, torch.full((1, k), -3.0))
    m2 = insert_masked(mask, at, k, torch.zeros(1, k))
    adv2, ret2 = ppo.gae(r2, v2, m2, gamma=0.9, lam=0.8)
    keep = m2.bool()
    assert torch.allclose(adv2[keep], adv[mask.bool()], atol=1e-6)
    assert torch.allclose(ret2[keep], ret[mask.bool()], atol=1e-6)
    assert torch.equal(adv2[:, at:at + k], torch.zeros(B, k))


@pytest.mark.parametrize("algo", ["reinforce_pp", "grpo", "rloo"])
def test_advantages_unchanged_by_masked_tool_tokens(algo):
    """REINFORCE++ (returns, per-token KL reward, batch whitening) and the group kinds give the
    valid tokens the same advantages whether or not masked tool tokens sit between them."""
    cfg = config("--algo", algo, "--group-size", "2", "--kl-reward", "0.1")
    g = torch.Generator().manual_seed(1)
    B, T = 4, 7
    mask = torch.ones(B, T)
    mask[:, 0] = 0
    mask[3, 5:] = 0
    old, ref = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0])
    adv = rlvr.advantages(rewards, dict(resp_mask=mask), cfg, old, ref)
    at, k = 3, 4
    m2 = insert_masked(mask, at, k, torch.zeros(1, k))
    old2 = insert_masked(old, at, k, torch.full((1, k), -9.0))  # a huge KL there, if it leaked
    adv2 = rlvr.advantages(rewards, dict(resp_mask=m2), cfg, old2, insert_masked(ref, at, k, torch.zeros(1, k)))
    assert torch.allclose(adv2[m2.bool()], adv[mask.bool()], atol=1e-5)
    assert torch.equal(adv2[:, at:at + k], torch.zeros(B, k))


# ----------------------------------------------------------------------------- rewards: the format gate, truncation

MATH = tasks.Task("math", "What is 37+48?", "85",
                  [{"role": "assistant", "content": "7+8+0=15\n3+4+1=8\n37+48=85\nAnswer: 85"}])
TOOL = tasks.Task("tool", "What is 347*829?", "287663", [])
CALL = "calc(347*829)<|call|><|tool|>287663<|end|><|assistant|>"


@pytest.mark.parametrize("task,text,correct,reward", [
    (MATH, "7+8+0=15\n3+4+1=8\n37+48=85\nAnswer: 85", 1, 1),
    (MATH, "Let me think step by step.\n37+48=85\nAnswer: 85", 1, 1),
    (MATH, "37+48=85\nAnswer: 85\nI hope this helps!", 1, 0),  # right answer, broken format
    (MATH, "Answer: 85\nAnswer: 85", 1, 0),  # two answers
    (MATH, "The answer is 85", 1, 0),
    (MATH, "calc(37+48)<|call|><|tool|>85<|end|><|assistant|>Answer: 85", 1, 0),  # math is done in the head
    (MATH, "Answer: 84", 0, 0),
    # step credit 0.5 x (reference steps written / max(#reference, #written)): a wrong answer after
    # 2 of the 3 reference steps earns 1/3; a right answer after a false step is a lucky guess,
    # not correct: 0.5 x 2/3 too
    (MATH, "7+8+0=15\n3+4+1=8\n37+48=84\nAnswer: 84", 0, 1 / 3),
    (MATH, "7+8+0=15\n3+4+1=7\n37+48=85\nAnswer: 85", 0, 1 / 3),
    (MATH, "7+8+0=15\n3+4+1=7\n37+48=85\nAnswer: 85\nI hope this helps!", 0, 0),  # the gate holds
    (MATH, "7-0=7\n8+0=8\n9+0=9\nAnswer: 3", 0, 0),  # true but irrelevant equations earn nothing
    (TOOL, CALL + "Answer: 287663", 1, 1),
    (TOOL, CALL + "The answer is 287663", 1, 0),
    (TOOL, CALL + "Answer: 287663\nI hope this helps!", 1, 0),
    (TOOL, "Answer: 287663", 0, 0),  # no calculator call: verify_tool says no
    (TOOL, CALL + "Answer: 287664", 0, 0),
])
def test_format_gate(task, text, correct, reward):
    r, facts = rlvr.score([task], fake_batch([text], [10], [True]), config("--step-credit", "0.5"), {})
    assert facts["correct"].item() == correct
    assert r.item() == pytest.approx(reward)


def test_step_match_is_precision_and_recall():
    ref = "1+2+0=3\n4+5+0=9\n41+52=93\nAnswer: 93"
    assert rlvr.step_match(["1+2+0=3", "41+52=93"], ref) == pytest.approx(2 / 3)  # a skipped step
    assert rlvr.step_match(["1+2+0=3", "4+5+0=9", "4+5+0=8", "41+52=93"], ref) == pytest.approx(3 / 4)  # a guess
    assert rlvr.step_match(["1+2+0=3"] * 3, ref) == pytest.approx(1 / 3)  # repeats count once
    assert rlvr.equations("x\n1+2+0=3\n 4+5+0=8 \nAnswer: 9") == (["1+2+0=3", "4+5+0=8"], 1)


def test_format_gate_code_and_the_sandbox_cache():
    task = tasks.make_tasks("code", "test", 1, seed=3)[0]
    good = task.reference[0]["content"]
    texts = [good, "Here is the function:\n" + good, good.replace(f"def {task.entry_point}", "def f"),
             good.replace("return", "retur n"), good]
    cache = {}
    r, facts = rlvr.score([task] * 5, fake_batch(texts, [10] * 5, [True] * 5), config(), cache)
    assert r.tolist() == [1, 0, 0, 0, 1]
    assert facts["format"].tolist() == [1, 0, 0, 0, 1]
    assert len(cache) == 2  # the good program ran once; 'def f' ran (and failed); prose and syntax errors never ran


def test_overlong_penalty_hand_values():
    L = torch.tensor([50.0, 84.0, 90.0, 96.0, 97.0])
    assert rlvr.overlong_penalty(L, 96.0, 12.0).tolist() == [0.0, 0.0, -0.5, -1.0, -1.0]


@pytest.mark.parametrize("rule,expect", [("filter", [1.0, 0.0, 0.0]), ("none", [1.0, 0.0, 0.0]),
                                         ("shape", [1.0 - 0.5, -1.0, -1.0])])  # shape: DAPO eq. 13
def test_truncation_rules(rule, expect):
    """Row 0 finished inside the soft buffer (math cap 96, buffer 12: 90 tokens), row 1 never
    stopped, row 2 stopped but past the code budget (48)."""
    code = tasks.make_tasks("code", "test", 1, seed=3)[0]
    batch = fake_batch(["37+48=85\nAnswer: 85"] * 2 + [code.reference[0]["content"]], [90, 96, 60], [True, False, True])
    r, facts = rlvr.score([MATH, MATH, code], batch, config("--overlong", rule, "--step-credit", "0"), {})
    assert r.tolist() == pytest.approx(expect)
    assert facts["truncated"].tolist() == [0.0, 1.0, 1.0]
    rows_trained = (batch["resp_mask"].sum(1) > 0).tolist()
    assert rows_trained == ([True, False, False] if rule == "filter" else [True, True, True])


# ----------------------------------------------------------------------------- dynamic sampling and the curriculum

def test_dynamic_sampling_drops_all_equal_groups(monkeypatch, tok):
    """Groups of even-answer prompts are all right (no signal), odd ones mixed: dynamic sampling
    keeps only mixed groups, draws more prompts, and reports the dropped fraction."""
    pool = tasks.make_tasks("math", "train", 40, seed=0)
    by_prompt, calls = {t.prompt: t for t in pool}, []

    def fake_rollout(model, tok_, prompts, G, *args, **kw):
        calls.append(len(prompts))
        texts = [f"Answer: {by_prompt[p].answer}" if int(by_prompt[p].answer) % 2 == 0 or g == 0 else "Answer: -1"
                 for p in prompts for g in range(G)]
        return fake_batch(texts, [5] * len(texts), [True] * len(texts))

    monkeypatch.setattr(grpo, "rollout", fake_rollout)
    bucket, p = torch.zeros(len(pool), dtype=torch.long), torch.full((1,), 0.5)
    for ds in (True, False):
        cfg = config("--mix", "math:1", "--group-size", "4", "--prompts-per-step", "6", "--curriculum", "false",
                     "--dynamic-sampling", str(ds), "--ds-max-tries", "4")
        calls.clear()
        batch, r, facts, dropped = rlvr.sample_groups(None, tok, pool, bucket, p, cfg, 0, 0, {})
        groups = r.view(-1, 4)
        spread = (groups != groups[:, :1]).any(1)
        if ds:
            assert spread.all() and len(batch["texts"]) == len(r) == batch["ids"].shape[0]
            assert dropped == pytest.approx(1 - len(groups) / sum(calls)) and dropped > 0
            assert len(groups) == 6 or len(calls) == 4
        else:
            assert calls == [6] and dropped == 0.0 and len(groups) == 6 and not spread.all()


def test_curriculum_prefers_sometimes_solved_buckets():
    p = torch.tensor([0.5, 0.5, 0.5])
    rlvr.update_curriculum(p, torch.tensor([0, 0, 1, 1]), torch.tensor([1.0, 1.0, 0.0, 1.0]), alpha=0.5)
    assert p.tolist() == [0.75, 0.5, 0.5]  # bucket 2 unseen: unchanged
    pool = [tasks.Task("math", f"q{i}", "1", []) for i in range(300)]
    bucket = torch.arange(300) // 100
    p = torch.tensor([0.0, 0.5, 1.0])
    cfg = config("--curriculum-floor", "0.01")
    idx = rlvr.draw_prompts(pool, bucket, p, 60, cfg, torch.Generator().manual_seed(0))
    hits = torch.bincount(bucket[idx], minlength=3).tolist()
    assert len(set(idx)) == 60 and hits[1] >= 45


# ----------------------------------------------------------------------------- pass@k

def test_passk_from_counts_closed_form():
    out = rlvr.passk_from_counts(4, [1, 0, 4, 2], (1, 2, 4, 8))
    assert set(out) == {1, 2, 4}  # k > n is not estimable
    # c=1: 1/4, 1-C(3,2)/C(4,2)=1/2, 1;  c=0: 0;  c=4: 1;  c=2: 1/2, 1-1/6, 1
    assert out[1] == pytest.approx((0.25 + 0 + 1 + 0.5) / 4)
    assert out[2] == pytest.approx((0.5 + 0 + 1 + 5 / 6) / 4)
    assert out[4] == pytest.approx(0.75)
    closed = lambda n, c, k: 1 - math.comb(n - c, k) / math.comb(n, k)
    assert rlvr.passk_from_counts(16, [3], (4,))[4] == pytest.approx(closed(16, 3, 4))


def canned_respond(counts):
    """A stand-in for evaluate.respond: problem i of each family's test split (as tasks.make_tasks
    gives it when called) gets exactly counts[i] right samples, the rest a wrong answer."""
    def respond(model_, tok_, task_list, temperature, n_samples, generator=None):
        out = []
        for t in task_list:
            i = [u.prompt for u in tasks.make_tasks(t.family, "test", len(counts), seed=1234)].index(t.prompt)
            out += [t.reference_text() if j < counts[i] else "Answer: -1" for j in range(n_samples)]
        return out, [1] * len(out)
    return respond


def test_passk_eval_counts_per_problem(monkeypatch, model, tok):
    """passk_eval with canned samples: problem i of each family has exactly c_i right samples."""
    import evaluate
    n = 4
    monkeypatch.setattr(evaluate, "respond", canned_respond([1, 3]))
    got = rlvr.passk_eval(model, tok, n_problems=2, n_samples=n, ks=(1, 2, 4))
    for f in ("math", "code", "tool"):
        assert got[f"{f}_pass@1"] == pytest.approx((1 / 4 + 3 / 4) / 2)
        assert got[f"{f}_pass@2"] == pytest.approx(((1 - 3 / 6) + 1) / 2)
        assert got[f"{f}_pass@4"] == pytest.approx(1.0)


def test_passk_eval_family_with_fewer_problems(monkeypatch, model, tok):
    """A family whose test split holds fewer than n_problems (code holds 84) is scored on the
    problems it has, and the families after it on their own problems, not shifted onto its."""
    import evaluate
    n = 4
    real = tasks.make_tasks
    few = lambda f, split, k, seed=0, allow_fewer=False, **kw: real(f, split, 1 if f == "code" else k, seed,
                                                                   allow_fewer, **kw)
    monkeypatch.setattr(tasks, "make_tasks", few)
    monkeypatch.setattr(evaluate, "respond", canned_respond([1, 3]))
    got = rlvr.passk_eval(model, tok, n_problems=2, n_samples=n, ks=(1,))
    assert got["math_pass@1"] == pytest.approx((1 / 4 + 3 / 4) / 2)
    assert got["code_pass@1"] == pytest.approx(1 / 4)  # its one problem, with 1 right sample of 4
    assert got["tool_pass@1"] == pytest.approx((1 / 4 + 3 / 4) / 2)


# ----------------------------------------------------------------------------- the script

def run(*args):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "rlvr.py"), *map(str, args)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return r


def test_every_algo_smoke(tiny_sft, tmp_path):
    """--preset tiny for each --algo: runs, saves a checkpoint with before/after metrics and pass@k,
    logs the debug quantities. The default algo also evaluates; --data goes through rloo."""
    data = tmp_path / "rl.jsonl"
    code = tasks.make_tasks("code", "train", 1)[0]
    data.write_text(json.dumps({"prompt": "What is 2+3?", "answer": 5}) + "\n"
                    + json.dumps({"prompt": code.prompt, "test": code.test, "entry_point": code.entry_point}) + "\n")
    for algo in [*rlvr.ALGOS, "tree"]:  # tree: dapo with --advantage tree
        out = tmp_path / f"{algo}.pt"
        extra = [] if algo == rlvr.DEFAULTS["algo"] else ["--eval-n", "0"]
        extra += ["--data", data] if algo == "rloo" else []
        extra += ["--advantage", "tree"] if algo == "tree" else ["--algo", algo]
        r = run("--preset", "tiny", "--init", tiny_sft / "sft.pt", "--out", out, *extra)
        assert r.returncode == 0, f"{algo}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        ckpt = load_checkpoint(out)
        assert ckpt["stage"] == "rlvr" and ckpt["metrics"]["steps_done"] == 2
        assert ckpt["config"]["algo"] == ("dapo" if algo == "tree" else algo)
        assert ckpt["config"]["advantage"] == ("tree" if algo == "tree" else rlvr.ALGOS[algo]["advantage"])
        rows = [json.loads(l) for l in open(tmp_path / f"{algo}.jsonl")]
        assert len(rows) == 2 and {"reward", "zero_adv_groups", "ds_dropped", "truncated", "entropy", "logit_scale"} <= set(rows[0])
        if algo == rlvr.DEFAULTS["algo"]:
            m = ckpt["metrics"]
            for k in ("math_acc", "code_pass1", "tool_acc", "tool_acc_no_tools", "math_pass@1", "code_pass@1",
                      "tool_pass@1", "math_acc_init", "tool_acc_no_tools_init"):
                assert 0.0 <= m[k] <= 1.0, k
            assert "math_acc" in r.stdout and "->" in r.stdout


def test_bad_input_fails_cleanly(tiny_sft, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "What is 2+3?", "answer": 5}\n{"prompt": "no answer"}\n')
    for args, needle in ((["--data", str(bad)], f"{bad}:2"), (["--algo", "nope"], "--algo"),
                         (["--mix", "math:1,poetry:2"], "--mix")):
        with pytest.raises(SystemExit) as e:
            rlvr.main(["--preset", "tiny", "--init", str(tiny_sft / "sft.pt"), "--out", str(tmp_path / "x.pt"), *args])
        assert e.value.code == 2 and needle in capsys.readouterr().err


def test_final_norm_lr_reaches_the_optimizer(tiny_sft, tmp_path, monkeypatch):
    """--final-norm-lr is handed to make_optimizer (whose per-group rate test_grpo checks), so the
    final LayerNorm trains at its own rate in rlvr.py as in ppo.py and grpo.py; the critic of
    --algo ppo keeps one rate."""
    seen, real = [], rlvr.make_optimizer
    monkeypatch.setattr(rlvr, "make_optimizer", lambda *a, **k: seen.append(k.get("final_norm_lr", 0.0)) or real(*a, **k))
    for algo, want in (("dapo", [0.02]), ("ppo", [0.02, 0.0])):
        seen.clear()
        rlvr.main(["--preset", "tiny", "--init", str(tiny_sft / "sft.pt"), "--out", str(tmp_path / f"{algo}.pt"),
                   "--algo", algo, "--eval-n", "0", "--final-norm-lr", "0.02"])
        assert seen == want, algo
