"""grpo.py: the advantage, KL and loss kernels against hand-computed values and slow obvious
implementations, the rollout contract, micro-batch invariance, a smoke run of the script for
every advantage estimator, and a bandit that GRPO must learn."""
import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import grpo
from data import render_prompt
from grpo import (aggregate, clipped_surrogate, group_advantages, kl_estimate, prefix_tree_advantages,
                  reinforce_pp_advantages)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- fixtures

def run(args, timeout=300):
    r = subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, f"{args}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def tiny_stack(factory):
    """tiny base -> sft (-> rm when reward.py exists), built once per session (in-process: a fresh
    interpreter per stage costs more than the stage) and shared with test_ppo.py through the
    session's base temp dir."""
    d = factory.getbasetemp() / "rl_tiny"
    sft, rm = d / "sft.pt", d / "rm.pt"
    if not sft.exists():
        import pretrain
        import sft as sft_stage
        d.mkdir(exist_ok=True)
        pretrain.main(["--preset", "tiny", "--out", str(d / "base.pt")])
        sft_stage.main(["--preset", "tiny", "--init", str(d / "base.pt"), "--out", str(sft), "--eval-tasks", "0"])
        if os.path.exists(os.path.join(ROOT, "reward.py")):
            import reward
            reward.main(["--preset", "tiny", "--init", str(sft), "--out", str(rm)])
    return dict(sft=str(sft), rm=str(rm) if rm.exists() else None, dir=d)


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    return tiny_stack(tmp_path_factory)


# ----------------------------------------------------------------------------- group advantages

def test_grpo_advantage_hand_computed_with_bessel_std():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 4.0, 6.0, 8.0])
    adv = group_advantages(r, 4, "grpo", eps=0.0)
    # group 1: mean 0.25, unbiased std sqrt(0.75/3 ... ) = 0.5
    std1 = math.sqrt(((0.75 ** 2) + 3 * 0.25 ** 2) / 3)
    assert std1 == pytest.approx(0.5)
    assert torch.allclose(adv[:4], torch.tensor([1.5, -0.5, -0.5, -0.5]))
    std2 = torch.tensor([2.0, 4.0, 6.0, 8.0]).std(correction=1)
    assert torch.allclose(adv[4:], (torch.tensor([2.0, 4.0, 6.0, 8.0]) - 5.0) / std2)
    assert torch.allclose(group_advantages(r, 4, "dr_grpo")[4:], torch.tensor([-3.0, -1.0, 1.0, 3.0]))


def test_identical_rewards_and_singleton_groups_give_zero():
    r = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7, 0.3, 0.9, 0.5])
    for kind in ("grpo", "dr_grpo", "rloo"):
        adv = group_advantages(r, 3, kind)
        assert torch.equal(adv[:6], torch.zeros(6)), kind  # exactly 0, not 1e-11 from rounding
        assert adv[6:].abs().sum() > 0
        single = group_advantages(torch.tensor([0.3, -1.0, 2.0]), 1, kind)
        assert torch.equal(single, torch.zeros(3)) and torch.isfinite(single).all(), kind


def test_rloo_is_leave_one_out():
    torch.manual_seed(0)
    G = 5
    r = torch.randn(4 * G)
    adv = group_advantages(r, G, "rloo")
    for i in range(len(r)):
        g = i // G
        others = [r[j] for j in range(g * G, (g + 1) * G) if j != i]
        assert adv[i].item() == pytest.approx((r[i] - sum(others) / (G - 1)).item(), abs=1e-6)


def naive_tree_advantages(tokens, rewards, G):
    """V(prefix) from a dict of every prefix's rewards, then V(y[:t+1]) - V(y[:t]), in float64."""
    out = torch.zeros(tokens.shape, dtype=torch.float64)
    for g in range(0, len(tokens), G):
        seen = {}
        for j in range(g, g + G):
            row = tokens[j].tolist()
            for t in range(len(row) + 1):
                seen.setdefault(tuple(row[:t]), []).append(rewards[j].item())
        value = lambda p: sum(seen[p]) / len(seen[p])
        for i in range(g, g + G):
            row = tokens[i].tolist()
            for t in range(len(row)):
                out[i, t] = value(tuple(row[:t + 1])) - value(tuple(row[:t]))
    return out


def test_prefix_tree_advantages_by_hand():
    adv = prefix_tree_advantages(torch.tensor([[1, 2], [1, 3], [1, 3]]), torch.tensor([1.0, 0.0, 0.0]), 3)
    assert torch.allclose(adv, torch.tensor([[0.0, 2 / 3], [0.0, -1 / 3], [0.0, -1 / 3]]))


def test_prefix_tree_advantages_match_naive_and_telescope():
    g = torch.Generator().manual_seed(0)
    G, L = 4, 6
    tokens = torch.randint(0, 2, (5 * G, L), generator=g)  # 2 symbols: prefixes are often shared
    tokens[:G] = tokens[0]  # one group of identical responses
    rewards = tokens.double() @ torch.rand(L, generator=g, dtype=torch.float64)  # same text, same reward
    adv = prefix_tree_advantages(tokens, rewards, G).double()
    assert torch.allclose(adv, naive_tree_advantages(tokens, rewards, G), atol=1e-6)
    assert torch.equal(adv[:G], torch.zeros(G, L))
    # the credit placed on a response's tokens adds up to Dr. GRPO's sequence advantage
    assert torch.allclose(adv.sum(1), group_advantages(rewards, G, "dr_grpo").double(), atol=1e-6)


def test_tree_advantages_land_on_the_response_targets():
    """Response token s of row i is target P + s - 1: the tree's credit sits there, 0 on the
    prompt's targets and wherever resp_mask is 0 (padding, tool output)."""
    P, G = 3, 3
    resp = torch.tensor([[5, 6, 0], [5, 7, 0], [5, 7, 8]])
    ids = torch.cat([torch.tensor([[1, 2, 3]] * G), resp], 1)
    mask = torch.zeros(G, ids.shape[1] - 1)
    mask[:, P - 1:] = (resp != 0).float()
    rewards = torch.tensor([1.0, 0.0, 0.5])
    got = grpo.tree_advantages(dict(ids=ids, resp_mask=mask, prompt_len=P), rewards, G)
    want = prefix_tree_advantages(resp, rewards, G) * (resp != 0)
    assert torch.equal(got[:, :P - 1], torch.zeros(G, P - 1)) and torch.allclose(got[:, P - 1:], want)
    assert got[0, P].item() == pytest.approx(1 - 0.5)  # token 6 parts from 7: V 1 against the 0.5 of "5"


# ----------------------------------------------------------------------------- REINFORCE++

def naive_returns(tok_r, mask):
    out = torch.zeros_like(tok_r)
    for i in range(tok_r.shape[0]):
        acc = 0.0
        for t in reversed(range(tok_r.shape[1])):
            if mask[i, t]:
                acc += tok_r[i, t].item()
                out[i, t] = acc
    return out


def test_reinforce_pp_whitened_and_reset_at_eos():
    torch.manual_seed(0)
    B, T = 6, 9
    mask = (torch.rand(B, T) > 0.3).float()
    mask[:, 0] = 1
    tok_r = torch.randn(B, T)
    adv = reinforce_pp_advantages(tok_r, mask)
    valid = mask.bool()
    assert adv[valid].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert adv[valid].var(correction=0).item() == pytest.approx(1.0, abs=1e-4)
    assert torch.equal(adv[~valid], torch.zeros(int((~valid).sum())))
    G = naive_returns(tok_r, mask)  # per row: nothing crosses from one sequence into the next
    expect = (G - G[valid].mean()) / G[valid].std(correction=0)
    assert torch.allclose(adv[valid], expect[valid], atol=1e-5)
    # a reward in row 1 moves row 0's returns only through the shared whitening statistics
    tok_r2 = tok_r.clone()
    tok_r2[1] += 100.0
    assert torch.allclose(naive_returns(tok_r2, mask)[0], G[0])


def test_reinforce_pp_sequence_reward_on_last_token_and_baseline():
    mask = torch.tensor([[0, 1, 1, 0, 1, 0], [0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1], [0, 1, 0, 0, 0, 0]]).float()
    r = torch.tensor([1.0, 0.0, 3.0, 1.0])
    adv = reinforce_pp_advantages(r, mask, "reinforce_pp")
    # γ = 1 with a terminal reward: every valid token of a row carries the row's reward
    raw = r[:, None] * mask
    valid = mask.bool()
    expect = (raw - raw[valid].mean()) / raw[valid].std(correction=0)
    assert torch.allclose(adv[valid], expect[valid], atol=1e-5)
    base = reinforce_pp_advantages(r, mask, "reinforce_pp_baseline", group_size=2)
    raw_b = (r - torch.tensor([0.5, 0.5, 2.0, 2.0]))[:, None] * mask  # minus the group mean
    expect_b = (raw_b - raw_b[valid].mean()) / raw_b[valid].std(correction=0)
    assert torch.allclose(base[valid], expect_b[valid], atol=1e-5)


# ----------------------------------------------------------------------------- KL estimators

def test_kl_estimators_on_a_categorical():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.2, 0.2, 0.1], dtype=torch.float64)  # the policy (samples come from it)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)  # the reference
    exact = (p * (p / q).log()).sum().item()
    x = torch.multinomial(p, 400_000, replacement=True, generator=g)
    logp, ref_logp = p.log()[x], q.log()[x]
    k1, k2, k3 = (kl_estimate(logp, ref_logp, k) for k in ("k1", "k2", "k3"))
    assert k1.mean().item() == pytest.approx(exact, abs=4e-3)
    assert k3.mean().item() == pytest.approx(exact, abs=4e-3)
    assert (k2 >= 0).all() and (k3 >= 0).all() and (k1 < 0).any()
    assert k3.var() < k1.var()  # the point of k3: same mean, lower variance


def test_k3_stable_for_tiny_log_ratios():
    logp = torch.zeros(5)
    x = torch.tensor([1e-3, 1e-4, 3e-5, 1e-5, -1e-4])  # log π_ref - log π, float32
    k3 = kl_estimate(logp, x, "k3")
    assert (k3 >= 0).all()
    assert torch.allclose(k3.double(), (x.double() ** 2) / 2, rtol=1e-2)  # e^x - 1 - x ≈ x²/2
    naive = torch.exp(x) - 1 - x
    assert not torch.allclose(naive.double(), (x.double() ** 2) / 2, rtol=1e-2)  # why expm1


# ----------------------------------------------------------------------------- clipped loss

def grad_of(ratio, adv, **kw):
    logp = torch.tensor([math.log(ratio)], requires_grad=True)
    loss, clipped = clipped_surrogate(logp, torch.zeros(1), torch.tensor([adv]), **kw)
    loss.sum().backward()
    return logp.grad.item(), loss.item(), bool(clipped.item())


def test_clip_zero_gradient_outside_range_on_clipped_side():
    kw = dict(eps_low=0.2, eps_high=0.2)
    assert grad_of(1.5, 1.0, **kw)[0] == 0.0 and grad_of(1.5, 1.0, **kw)[2]    # A>0, ρ>1+ε: clipped
    assert grad_of(0.5, -1.0, **kw)[0] == 0.0 and grad_of(0.5, -1.0, **kw)[2]  # A<0, ρ<1-ε: clipped
    g, loss, c = grad_of(0.5, 1.0, **kw)  # A>0, ρ<1-ε: the unclipped side keeps its gradient
    assert g == pytest.approx(-0.5) and not c
    g, loss, c = grad_of(1.5, -1.0, **kw)
    assert g == pytest.approx(1.5) and loss == pytest.approx(1.5) and not c
    g, loss, _ = grad_of(1.1, 2.0, **kw)  # inside: -A ρ, dL/dlogρ = -A ρ
    assert g == pytest.approx(-2.2) and loss == pytest.approx(-2.2)


def test_asymmetric_clip_higher():
    kw = dict(eps_low=0.2, eps_high=0.28)
    assert grad_of(1.25, 1.0, **kw)[0] != 0.0         # inside 1 + ε_high
    assert grad_of(1.3, 1.0, **kw)[0] == 0.0          # past it
    assert grad_of(1.3, 1.0, **kw)[1] == pytest.approx(-1.28)
    assert grad_of(0.79, -1.0, **kw)[0] == 0.0        # below 1 - ε_low
    assert grad_of(0.79, -1.0, **kw)[1] == pytest.approx(0.8)


def test_dual_clip_bounds_negative_advantages():
    g, loss, c = grad_of(10.0, -1.0, eps_low=0.2, eps_high=0.2, dual_clip=3.0)
    assert loss == pytest.approx(3.0) and g == 0.0 and c  # bounded at -c·A
    g, loss, c = grad_of(2.0, -1.0, eps_low=0.2, eps_high=0.2, dual_clip=3.0)
    assert loss == pytest.approx(2.0) and g == pytest.approx(2.0) and not c  # below the bound: plain PPO
    assert grad_of(10.0, 1.0, eps_low=0.2, eps_high=0.2, dual_clip=3.0)[1] == pytest.approx(-1.2)  # A>0 untouched


# ----------------------------------------------------------------------------- aggregation

def test_aggregation_modes_hand_built():
    loss = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert aggregate(loss, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(loss, mask, "seq-mean-token-mean").item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate(loss, mask, "seq-mean-token-sum-norm", max_len=8).item() == pytest.approx(10 / (2 * 8))
    assert aggregate(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx(10 / (2 * 4))
    big = loss.clone()
    big[0, 3] = 1e6  # masked positions never count
    assert aggregate(big, mask, "token-mean").item() == pytest.approx(10 / 4)


def test_token_mean_invariant_to_micro_batches(model, tok):
    """The same gradient whether the batch goes through in one piece or in micro-batches with
    the global token count as the denominator (what update does)."""
    batch = grpo.rollout(model, tok, ["What is 1+2?", "hi", "def f(x):"], 2, 6, 1.0, tools=False)
    torch.manual_seed(1)
    adv = torch.randn(6)[:, None] * batch["resp_mask"]
    old = grpo.batched_logprobs(model, batch, 1.0).detach() + 0.05 * torch.randn_like(batch["resp_mask"])
    grads = []
    for pieces in ([torch.arange(6)], [torch.tensor([0, 1]), torch.tensor([2, 3, 4]), torch.tensor([5])]):
        model.zero_grad()
        norm = batch["resp_mask"].sum()
        for rows in pieces:
            sub = grpo.select_rows(batch, rows)
            loss_tok, _ = clipped_surrogate(grpo.policy_logprobs(model, sub, 1.0), old[rows], adv[rows], 0.2, 0.2)
            aggregate(loss_tok, sub["resp_mask"], "token-mean", norm=norm).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("mode", grpo.LOSS_AGG)
def test_update_is_the_same_in_length_sorted_trimmed_chunks(model, tok, mode):
    """update's micro-batches are rows sorted by length, each cut to the columns it uses: the
    log-probs, and the step they give, must be those of the whole batch at once."""
    batch = grpo.rollout(model, tok, ["What is 11+2?", "hi", "def f(x):"], 2, 6, 1.0, tools=False)
    batch["resp_mask"][0, -2:] = 0  # a shorter response: chunks of different widths
    batch["attn_mask"][0, -2:] = 0
    full = grpo.policy_logprobs(model, batch, 1.0).detach()
    chunked = grpo.batched_logprobs(model, batch, 1.0, micro_batch=2)
    real = batch["attn_mask"][:, :-1] * batch["attn_mask"][:, 1:]  # a real token predicted from a real one
    assert torch.allclose(chunked * real, full * real, atol=1e-5)
    torch.manual_seed(1)
    adv = torch.randn(6)[:, None] * batch["resp_mask"]
    old = full + 0.05 * torch.randn_like(full)
    after = []
    for micro in (6, 2):
        m = copy.deepcopy(model)
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        grpo.update(m, None, opt, batch, adv, dict(micro_batch=micro, loss_agg=mode, max_new_tokens=6, grad_clip=1e9),
                    old_logp=old)
        after.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (after[0] - before).abs().max() > 1e-4  # the step did something ...
    assert torch.allclose(after[0], after[1], atol=1e-6)  # ... and the same in chunks


# ----------------------------------------------------------------------------- rollout contract

def test_rollout_layout(model, tok):
    prompts = ["What is 1+2?", "hi"]
    b = grpo.rollout(model, tok, prompts, 3, 8, 1.0, tools=False)
    B, T = b["ids"].shape
    assert B == 6 and b["resp_mask"].shape == (6, T - 1) and b["prompts"] == [p for p in prompts for _ in range(3)]
    assert b["group"].tolist() == [0, 0, 0, 1, 1, 1]
    P = b["prompt_len"]
    assert b["resp_mask"][:, :P - 1].sum() == 0  # nothing on the prompt
    for i in range(B):
        n = int(b["resp_mask"][i].sum())
        assert b["attn_mask"][i, P:].sum() >= n and b["resp_mask"][i, P - 1:P - 1 + n].all()
        if b["finished"][i]:  # the last sampled target is <|end|>
            assert b["ids"][i, P + n - 1] == tok.end_id
    # left padding: the shorter prompt's pads carry no attention
    assert (b["attn_mask"][:, :P].sum(1) == torch.tensor([len(render_prompt(tok, p)) for p in b["prompts"]])).all()


def test_concat_rollouts_keeps_rows(model, tok):
    a = grpo.rollout(model, tok, ["hi"], 2, 4, 1.0, tools=False)
    b = grpo.rollout(model, tok, ["What is 12+34? Please answer."], 2, 7, 1.0, tools=False)
    c = grpo.concat_rollouts([a, b], tok.pad_id)
    assert c["ids"].shape[0] == 4 and c["group"].tolist() == [0, 0, 1, 1]
    lp_c = grpo.batched_logprobs(model, c, 1.0)
    for part, rows in ((a, [0, 1]), (b, [2, 3])):  # same log-probs on the sampled tokens after re-padding
        lp = grpo.batched_logprobs(model, part, 1.0)
        assert torch.allclose((lp * part["resp_mask"]).sum(1), (lp_c[rows] * c["resp_mask"][rows]).sum(1), atol=1e-4)


def test_rank_shares_of_a_step_are_one_process_batch(model, tok):
    """DDP equivalence by construction: what ranks 0 and 1 of 2 sample and score is, row for row
    and bitwise, what one process samples, found by row id (uid). In-process, without
    torch.distributed (tests/test_ddp.py runs real ranks, dynamic sampling included)."""
    cfg = dict(grpo.DEFAULTS, prompts_per_step=4, group_size=3, max_new_tokens=6, rollout_chunk=1)
    prompts = ["What is 1+2?", "hi", "def f(x):", "Say yes.", "What is 12*3?"]
    reward_fn = lambda ps, texts: torch.tensor([float(len(t)) for t in texts])
    one = grpo.sample_groups(model, tok, prompts, reward_fn, cfg, step=3)
    shares = [grpo.sample_groups(model, tok, prompts, reward_fn, cfg, step=3, rank=r, world=2) for r in (0, 1)]
    assert sorted(torch.cat([b["uid"] for b, _, _ in shares]).tolist()) == sorted(one[0]["uid"].tolist())
    P = one[0]["prompt_len"]
    for b, r, _ in shares:
        for i, u in enumerate(b["uid"].tolist()):
            j = one[0]["uid"].tolist().index(u)
            assert b["texts"][i] == one[0]["texts"][j] and r[i] == one[1][j]
            resp = b["ids"][i, b["prompt_len"]:][b["resp_mask"][i, b["prompt_len"] - 1:].bool()]
            assert torch.equal(resp, one[0]["ids"][j, P:][one[0]["resp_mask"][j, P - 1:].bool()])
    assert len(set(one[0]["texts"])) > 1  # the check above compared real samples


def test_minibatch_rows_is_randperm_for_one_process():
    """update's minibatch split is unchanged for one process: randperm(B).chunk(n), same draws."""
    batch = dict(ids=torch.zeros(10, 3, dtype=torch.long))
    torch.manual_seed(5)
    rows = grpo.minibatch_rows(batch, 3)
    torch.manual_seed(5)
    assert [r.tolist() for r in rows] == [c.tolist() for c in torch.randperm(10).chunk(3)]
    uid = torch.tensor([7, 2, 9, 4])  # with row ids, every row lands in exactly one minibatch
    rows = grpo.minibatch_rows(dict(ids=torch.zeros(4, 3), uid=uid), 2)
    assert sorted(torch.cat(rows).tolist()) == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- learning

def test_grpo_learns_a_bandit(model, tok):
    """Reward 1 when the first sampled token is `target`: GRPO must raise the mean reward."""
    torch.manual_seed(0)
    prompt = ["What is 1+2?"]
    with torch.no_grad():
        b = grpo.rollout(model, tok, prompt, 64, 1, 1.0, tools=False)
    target = torch.mode(b["ids"][:, b["prompt_len"]]).values.item()  # a token it samples sometimes
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    cfg = dict(iterations=2, minibatches=2, micro_batch=32, eps_low=0.2, eps_high=0.28, kl="off")
    curve = []
    for step in range(15):
        b = grpo.rollout(model, tok, prompt * 4, 16, 1, 1.0, tools=False)
        r = (b["ids"][:, b["prompt_len"]] == target).float()
        curve.append(r.mean().item())
        adv = group_advantages(r, 16)[:, None] * b["resp_mask"]
        grpo.update(model, None, opt, b, adv, cfg)
    assert curve[0] < 0.6 and sum(curve[-3:]) / 3 > max(0.85, curve[0] + 0.3), curve


# ----------------------------------------------------------------------------- smoke runs of the script

@pytest.mark.parametrize("advantage", grpo.ADVANTAGES)
def test_grpo_script_smoke(stack, advantage):
    """Every estimator end to end with --preset tiny. The first runs as a real subprocess (the CLI
    and the final evaluation); the others call main(argv) in-process,
    the same code path without paying a fresh interpreter and torch import each."""
    out = stack["dir"] / f"grpo_{advantage}.pt"
    reward = ["--rm", stack["rm"]] if stack["rm"] else ["--reward", "gold"]
    extra = dict(grpo=["--dynamic-sampling", "true", "--iterations", "2", "--minibatches", "2", "--dual-clip", "3",
                       "--eval-tasks", "1"],
                 dr_grpo=["--loss-agg", "seq-mean-token-sum-norm", "--kl", "off"],
                 rloo=["--loss-agg", "seq-mean-token-mean", "--kl", "k1"],
                 reinforce_pp=["--kl", "k2"], reinforce_pp_baseline=[], tree=[])[advantage]
    argv = ["--preset", "tiny", "--init", stack["sft"], "--out", str(out), "--advantage", advantage] + reward + extra
    if advantage == "grpo":
        run(["grpo.py"] + argv)
    else:
        grpo.main(argv + ["--eval-tasks", "0"])
    from model import load_checkpoint
    ckpt = load_checkpoint(str(out))
    assert ckpt["stage"] == "grpo" and ckpt["config"]["advantage"] == advantage
    rows = [json.loads(l) for l in open(str(out).replace(".pt", ".jsonl"))]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) and "kl_seq" in r for r in rows)
    if advantage == "grpo":
        assert "gold_winrate_vs_init" in ckpt["metrics"] and "kl_to_ref" in ckpt["metrics"]


def test_random_reward_is_seeded_uniform_noise():
    """--reward random, the no-signal control: the same seed gives the same stream, values in [0, 1)."""
    cfg = dict(reward="random", seed=3)
    a, b = grpo.make_reward(cfg, {}, "cpu"), grpo.make_reward(cfg, {}, "cpu")
    first = a(["p"] * 64, ["r"] * 64)
    assert torch.equal(first, b(["p"] * 64, ["r"] * 64))
    assert first.shape == (64,) and 0 <= first.min() and first.max() < 1 and first.std() > 0.2
    assert not torch.equal(first, a(["p"] * 64, ["r"] * 64))  # a stream, not one draw repeated


def test_bad_flag_and_bad_data_fail_cleanly(stack, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "What is 1+1?", "answer": "2"}\n{"prompt": 3}\n')
    for args, msg in ((["--advantage", "nope"], "--advantage"), (["--data", str(bad)], "bad.jsonl:2")):
        with pytest.raises(SystemExit) as e:
            grpo.main(["--preset", "tiny", "--init", stack["sft"], "--reward", "gold", "--out", str(tmp_path / "x.pt")] + args)
        assert e.value.code == 2 and msg in capsys.readouterr().err


def test_final_norm_lr_moves_the_logits_scale_at_its_own_rate():
    """make_optimizer(final_norm_lr=...): transformer.ln_f, which sets the logits' scale, gets a
    group of its own whose rate keeps its ratio to the base rate through set_lr's schedule. Adam's
    first step moves every weight by its group's rate (m / sqrt(v) = ±1), so one step shows it."""
    from common import make_optimizer, set_lr
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16))
    plain = make_optimizer(m, 1e-5)
    assert len(plain.param_groups) == 2 and {g["lr"] for g in plain.param_groups} == {1e-5}
    opt = make_optimizer(m, 1e-5, final_norm_lr=1e-2)
    owned = [p for g in opt.param_groups for p in g["params"]]
    assert len(owned) == len({id(p) for p in owned}) == len(list(m.parameters()))  # each weight once
    set_lr(opt, 5e-6)  # mid-warmup: half the base rate, for the final norm too
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    m.logits(torch.randint(0, 64, (2, 8))).logsumexp(-1).sum().backward()
    opt.step()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in m.named_parameters()}
    assert moved["transformer.ln_f.weight"] == pytest.approx(5e-3, rel=1e-3)
    assert moved["transformer.ln_f.bias"] == pytest.approx(5e-3, rel=1e-3)
    assert moved["transformer.h.0.ln_1.weight"] == pytest.approx(5e-6, rel=2e-2)  # float32 rounding at 1.0
    assert moved["transformer.h.1.mlp.c_fc.weight"] == pytest.approx(5e-6, rel=2e-2)  # + weight decay
