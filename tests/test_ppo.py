"""ppo.py: GAE against a slow reverse loop, the value loss, the KL controller, the critic's
initialisation from the reward model, the first-minibatch invariants, a smoke run of the script
and a bandit that PPO must learn."""
import copy
import json
import math

import pytest
import torch

import grpo
import ppo
from ppo import gae
from test_grpo import run, tiny_stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    return tiny_stack(tmp_path_factory)


# ----------------------------------------------------------------------------- GAE

def naive_gae(rewards, values, mask, gamma, lam):
    """The textbook reverse loop, one row at a time, over the valid positions only."""
    adv = torch.zeros_like(values)
    for i in range(values.shape[0]):
        idx = [t for t in range(values.shape[1]) if mask[i, t]]
        a_next, v_next = 0.0, 0.0
        for t in reversed(idx):
            delta = rewards[i, t] + gamma * v_next - values[i, t]
            a_next = delta + gamma * lam * a_next
            adv[i, t], v_next = a_next, values[i, t]
    return adv, (adv + values) * mask


def random_case(seed, B=5, T=12):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, T, generator=g) > 0.35).double()  # holes inside rows = tool outputs
    mask[:, :2] = 0  # prompt
    mask[0] = 0  # a row with no valid token at all
    rewards = torch.randn(B, T, generator=g, dtype=torch.float64) * mask
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    return rewards, values, mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 1.0)])
def test_gae_matches_naive_loop(gamma, lam):
    for seed in range(3):
        r, v, m = random_case(seed)
        adv, ret = gae(r, v, m, gamma, lam)
        adv_ref, ret_ref = naive_gae(r, v, m, gamma, lam)
        assert adv.dtype == torch.float64
        assert torch.allclose(adv, adv_ref, atol=1e-12) and torch.allclose(ret, ret_ref, atol=1e-12)
        assert torch.equal(adv[m == 0], torch.zeros(int((m == 0).sum()), dtype=torch.float64))


def test_gae_lambda_zero_is_td_residual():
    r, v, m = random_case(7)
    adv, _ = gae(r, v, m, gamma=0.9, lam=0.0)
    for i in range(m.shape[0]):
        idx = [t for t in range(m.shape[1]) if m[i, t]]
        for k, t in enumerate(idx):
            v_next = v[i, idx[k + 1]] if k + 1 < len(idx) else 0.0  # bootstraps across the holes
            assert adv[i, t].item() == pytest.approx((r[i, t] + 0.9 * v_next - v[i, t]).item(), abs=1e-12)


def test_gae_gamma_lambda_one_zero_values_is_reward_to_go():
    r, v, m = random_case(3)
    adv, ret = gae(r, torch.zeros_like(v), m, 1.0, 1.0)
    to_go = (r * m).flip(1).cumsum(1).flip(1) * m
    assert torch.allclose(adv, to_go, atol=1e-12) and torch.allclose(ret, to_go, atol=1e-12)


def test_gae_ignores_values_and_rewards_at_masked_positions():
    r, v, m = random_case(5)
    v2, r2 = v.clone(), r.clone()
    v2[m == 0] = 1e6
    r2[m == 0] = -1e6
    for a, b in zip(gae(r, v, m, 0.95, 0.9), gae(r2, v2, m, 0.95, 0.9)):
        assert torch.allclose(a, b, atol=1e-9)


# ----------------------------------------------------------------------------- value loss, KL controller

def test_value_loss_clipping():
    old, ret = torch.tensor([0.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, -1.0])
    v = torch.tensor([0.5, 0.1, 0.5], requires_grad=True)
    loss, clipped = ppo.value_loss(v, old, ret, clip=0.2)
    # row 0: V moved 0.5 toward R; the clipped V (0.2) is farther: 0.5·(0.8)², gradient cut
    # row 1: inside the clip range: plain 0.5·(0.9)²; row 2: moved away from R: the larger unclipped loss
    assert torch.allclose(loss, torch.tensor([0.5 * 0.8 ** 2, 0.5 * 0.9 ** 2, 0.5 * 1.5 ** 2]))
    assert clipped.tolist() == [True, False, False]
    loss.sum().backward()
    assert v.grad[0] == 0 and v.grad[1] == pytest.approx(-0.9) and v.grad[2] == pytest.approx(1.5)


def test_adaptive_kl_controller():
    assert ppo.adaptive_kl_coef(0.1, 12.0, 6.0, 64, 1000) == pytest.approx(0.1 * (1 + 0.2 * 0.064))
    assert ppo.adaptive_kl_coef(0.1, 3.0, 6.0, 64, 1000) < 0.1
    assert ppo.adaptive_kl_coef(0.1, 6.0, 6.0, 64, 1000) == pytest.approx(0.1)


# ----------------------------------------------------------------------------- one PPO step

def ppo_setup(model, tok, **over):
    cfg = dict(ppo.DEFAULTS, reward="gold", micro_batch=4, epochs=2, minibatches=2, dtype="fp32")
    cfg.update(over)
    ref = copy.deepcopy(model)
    critic, src = ppo.make_critic(cfg, model, tok, torch.device("cpu"))
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    copt = torch.optim.Adam(critic.parameters(), lr=cfg["critic_lr"])
    return cfg, ref, critic, opt, copt, src


def test_first_minibatch_ratio_one_no_clip_no_kl(model, tok):
    cfg, ref, critic, opt, copt, src = ppo_setup(model, tok, lam=1.0)
    assert src == "policy"
    batch = grpo.rollout(model, tok, ["What is 1+2?", "hi", "def f(x):", "What is 12*3?"], 2, 8, 1.0, tools=False)
    scores = torch.randn(8)
    exp, stats = ppo.ppo_step(model, ref, critic, opt, copt, batch, scores, 0.1, cfg)
    assert stats["first_mb_ratio_err"] < 1e-5 and stats["first_mb_clip_frac"] == 0.0
    assert torch.equal(exp["kl"], torch.zeros_like(exp["kl"]))  # policy == reference at step 0
    assert torch.equal(exp["values"], torch.zeros_like(exp["values"]))  # zero head from the policy
    m = batch["resp_mask"].bool()
    assert exp["adv"][m].mean().abs() < 1e-5 and exp["adv"][~m].abs().sum() == 0
    # with V = 0, γ = λ = 1 and no KL yet: each token's return is its response's score
    assert torch.allclose(exp["returns"], scores[:, None] * batch["resp_mask"], atol=1e-6)
    assert all(math.isfinite(v) for v in stats.values())
    exp2, _ = ppo.ppo_step(model, ref, critic, opt, copt, batch, scores, 0.1, cfg)
    assert exp2["kl"].abs().sum() > 0 and exp2["values"].abs().sum() > 0  # both networks moved


def test_critic_from_reward_model_starts_at_the_normalised_score(stack):
    if stack["rm"] is None:
        pytest.skip("reward.py not there yet")
    from model import load_checkpoint
    from reward import load_reward_model
    ck = load_checkpoint(stack["sft"])
    policy, tok = ck["model"], ck["tokenizer"]
    cfg = dict(ppo.DEFAULTS, rm=stack["rm"], reward="rm")
    critic, src = ppo.make_critic(cfg, policy, tok, torch.device("cpu"))
    assert src == "rm"
    # the RM re-tokenises decoded text (a sampled token sequence need not be BPE's canonical one),
    # so compare on canonical renders: the critic's head at the last token == the normalised score
    from data import render_chat
    pairs = [("What is 3+4?", "3+4=7\nAnswer: 7"), ("How do I bake bread?", "Mix flour, water and yeast, then bake.")]
    want = load_reward_model(stack["rm"])([p for p, _ in pairs], [r for _, r in pairs])
    for (prompt, response), w in zip(pairs, want):
        ids = render_chat(tok, [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])[0]
        with torch.no_grad():
            v = critic.score(critic(torch.tensor([ids])))[0, -1]
        assert v.item() == pytest.approx(w.item(), rel=1e-4, abs=1e-4)


# ----------------------------------------------------------------------------- learning

def test_ppo_learns_a_bandit(model, tok):
    """Reward 1 when the first sampled token is `target`: PPO must raise the mean reward."""
    torch.manual_seed(0)
    prompt = ["What is 1+2?"]
    with torch.no_grad():
        b = grpo.rollout(model, tok, prompt, 64, 1, 1.0, tools=False)
    target = torch.mode(b["ids"][:, b["prompt_len"]]).values.item()
    cfg, ref, critic, opt, copt, _ = ppo_setup(model, tok, micro_batch=32, lr=1e-3, critic_lr=1e-3)
    curve = []
    for step in range(12):
        b = grpo.rollout(model, tok, prompt * 64, 1, 1, 1.0, tools=False)
        r = (b["ids"][:, b["prompt_len"]] == target).float()
        curve.append(r.mean().item())
        ppo.ppo_step(model, ref, critic, opt, copt, b, r, 0.0, cfg)
    assert curve[0] < 0.6 and sum(curve[-3:]) / 3 > max(0.85, curve[0] + 0.3), curve


# ----------------------------------------------------------------------------- smoke runs of the script

def test_best_of_n_estimates_match_enumerating_the_subsets():
    """Every n-subset of N samples, its proxy-argmax, that pick's gold score and its gold win rate
    against each other sample (ties half): the closed-form weights give the same means."""
    import itertools
    g = torch.Generator().manual_seed(0)
    proxy = torch.randn(3, 6, generator=g)
    gold = torch.randint(0, 3, (3, 6), generator=g).double()  # integer scores: plenty of ties
    rows = ppo.best_of_n_estimates(proxy, gold, [1, 2, 4, 6])
    for row in rows:
        picks = []
        for p in range(3):
            for subset in itertools.combinations(range(6), row["n"]):
                k = max(subset, key=lambda i: proxy[p, i])
                others = [j for j in range(6) if j != k]
                win = sum(1.0 if gold[p, k] > gold[p, j] else 0.5 if gold[p, k] == gold[p, j] else 0.0
                          for j in others) / len(others)
                picks.append((proxy[p, k].item(), gold[p, k].item(), win, p))
        per = lambda i: sum(sum(x[i] for x in picks if x[3] == p) / sum(1 for x in picks if x[3] == p)
                            for p in range(3)) / 3
        assert row["proxy"] == pytest.approx(per(0)) and row["gold"] == pytest.approx(per(1))
        assert row["win"] == pytest.approx(per(2))
        assert row["kl"] == pytest.approx(math.log(row["n"]) - (row["n"] - 1) / row["n"])
    assert rows[0]["win"] == pytest.approx(0.5)  # n = 1: a sample against another sample


def test_ppo_script_smoke(stack):
    out = stack["dir"] / "ppo.pt"
    reward = ["--rm", stack["rm"]] if stack["rm"] else ["--reward", "gold"]
    run(["ppo.py", "--preset", "tiny", "--init", stack["sft"], "--out", str(out), "--curve", "true"] + reward)
    from model import load_checkpoint
    ck = load_checkpoint(str(out))
    assert ck["stage"] == "ppo" and ck["parent"] == stack["sft"]
    for key in ("gold_winrate_vs_init", "kl_to_ref", "gold_score", "gold_score_init", "train_s"):
        assert key in ck["metrics"], key
    assert ck["metrics"]["critic_init"] == ("rm" if stack["rm"] else "policy")
    rows = [json.loads(l) for l in open(str(out).replace(".pt", ".jsonl"))]
    for key in ("approx_kl", "clip_frac", "value_error", "entropy", "kl_seq", "reward", "length", "truncated", "gold"):
        assert key in rows[0], key
    assert rows[0]["kl_seq"] == 0.0 and rows[0]["first_mb_ratio_err"] < 1e-5
    table = open(stack["dir"] / "overoptimisation.md").read()  # --curve: RL run and best-of-n 1, 2, 4
    assert "## RL run" in table and "## Best-of-n" in table and "| 4 | 0.636 | 0.798 |" in table


def test_ppo_adaptive_kl_and_policy_critic_in_process(stack):
    out = stack["dir"] / "ppo_adaptive.pt"
    ppo.main(["--preset", "tiny", "--init", stack["sft"], "--out", str(out), "--reward", "gold",
              "--critic-init", "policy", "--kl-target", "0.5", "--kl-horizon", "10", "--eval-tasks", "0"])
    rows = [json.loads(l) for l in open(str(out).replace(".pt", ".jsonl"))]
    assert rows[0]["kl_coef"] == ppo.DEFAULTS["kl_coef"] != rows[1]["kl_coef"]  # the controller moved β
