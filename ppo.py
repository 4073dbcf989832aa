"""PPO-RLHF: optimise the policy against the reward model, with a critic and a KL leash.

    python ppo.py [--init out/dpo.pt] [--rm out/rm.pt] [--out out/ppo.pt] [--preset tiny|cpu|gpu]
                  [--critic-init rm|policy] [--kl-coef 0.05] [--kl-target 0 (fixed) | >0 (adaptive)]
                  [--reward rm|gold|random] [--data prompts.jsonl] [--curve true] [--final-norm-lr 1e-2]

The loop (Ziegler et al. 2019; Stiennon et al. 2020; InstructGPT, Ouyang et al. 2022), each step:
    1. rollout   one response per prompt from the policy (KV-cache sampler, temperature T)
    2. score     the RM reads (prompt, response) at its last real token; no EOS -> penalty
    3. rewards   r_t = -β (log π(a_t) - log π_ref(a_t)) on every sampled token, + score on the last
    4. GAE       advantages from the critic's values (γ, λ), whitened over valid tokens
    5. update    epochs x minibatches of the clipped policy loss (grpo.update) and the clipped
                 value loss, on the same rollout batch
The details of "The N+ Implementation Details of RLHF with PPO" (Huang et al. 2024) and of
"The 37 Implementation Details of PPO" (Huang et al. 2022) are commented where they act.

--curve true: Gao et al. (2022)'s over-optimisation experiment on a laptop. The run logs the gold
judge's score of every rollout batch next to the proxy (RM) reward and KL(π || π_ref); at the end
best-of-n from the initial policy adds the BoN curve, and OUT_DIR/overoptimisation.md tabulates
proxy and gold against sqrt(KL) for both (e.g. --curve true --steps 300 --kl-coef 0).
"""
import dataclasses
import math
import os
import time

import torch
from tqdm import tqdm

import grpo
from common import MetricLog, all_reduce_sum, autocast, fail, lr_at, make_optimizer, parse_config, set_lr, setup
from model import GPT, CheckpointError, load_checkpoint, save_checkpoint

# final_norm_lr: the final LayerNorm (the logits' scale) on a rate of its own, as in grpo.py. Sampled
# gold win rate vs the DPO init (4 samples a prompt), KL: without it 0.506, 0.15; with it 0.561, 0.24.
DEFAULTS = dict(
    init="out/dpo.pt", out="out/ppo.pt", rm="out/rm.pt", reward="rm", data=None, n_prompts=2000,
    critic_init="rm", steps=24, batch_size=64, max_new_tokens=96, temperature=1.0,
    epochs=2, minibatches=2, micro_batch=16, eps_clip=0.2, vf_clip=0.2, gamma=1.0, lam=0.95,
    kl_coef=0.1, kl_target=0.0, kl_horizon=10000, missing_eos_penalty=1.0,
    lr=1e-5, final_norm_lr=1e-2, critic_lr=1e-4, warmup=3, weight_decay=0.0, grad_clip=1.0,
    gold_every=5, eval_tasks=50, curve=False, bon_prompts=32, bon_n=64, seed=0, device="auto", dtype="bf16",
)
PRESETS = dict(
    tiny=dict(n_prompts=16, steps=2, batch_size=8, max_new_tokens=16, micro_batch=4, gold_every=1, eval_tasks=1,
              bon_prompts=2, bon_n=4),
    cpu=dict(),
    gpu=dict(n_prompts=2400, steps=500, batch_size=256, epochs=4, minibatches=4, micro_batch=128, lr=1e-5,
             critic_lr=3e-5, eval_tasks=100, bon_prompts=256),
)


# ----------------------------------------------------------------------------- kernels

def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16) over the valid tokens only:

      δ_t = r_t + γ V_{t'} - V_t,   A_t = δ_t + γλ A_{t'},   returns R_t = A_t + V_t
    where t' is the next position with mask 1 (0 past the last one: the episode ends there).
    Positions with mask 0 (prompt, padding, tool outputs inside a response) are skipped without
    breaking the recursion: the next valid token's value bootstraps across them, and their
    rewards and values are ignored. (B,T) tensors -> (adv, returns), 0 where mask is 0.
    Loops over time (inherent), never over the batch. γ = λ = 1 with V = 0 gives reward-to-go;
    λ = 0 gives the TD residual δ_t.
    """
    valid = mask.bool()
    adv = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        v = valid[:, t]
        adv[:, t] = torch.where(v, a, 0.0)
        next_value = torch.where(v, values[:, t], next_value)
        next_adv = torch.where(v, a, next_adv)
    return adv, torch.where(valid, adv + values, 0.0)


def value_loss(values, old_values, returns, clip):
    """Clipped value loss per token (the 37 PPO details #9, Huang et al. 2022; as in OpenAI's
    lm-human-preferences):

      L = ½ max((V - R)², (V_old + clip(V - V_old, -ε_v, ε_v) - R)²)
    Returns (loss, clipped): clipped marks tokens where the clipped term is the larger one.
    """
    v_clipped = old_values + (values - old_values).clamp(-clip, clip)
    l1, l2 = (values - returns) ** 2, (v_clipped - returns) ** 2
    return 0.5 * torch.maximum(l1, l2), l2 > l1


def adaptive_kl_coef(coef, kl, target, n_samples, horizon):
    """The adaptive KL controller of Ziegler et al. (2019), §2: β <- β (1 + K e), e = clip(KL/KL_target - 1, -0.2, 0.2),
    K = n_samples / horizon. KL above target raises β, below lowers it."""
    return coef * (1 + max(-0.2, min(0.2, kl / target - 1)) * n_samples / horizon)


# ----------------------------------------------------------------------------- critic

def make_critic(cfg, policy, tok, device):
    """The value model: a separate network with a scalar head (N+ details: separate from the policy).

    Initialised from the reward model, as Stiennon et al. (2020), InstructGPT and Huang et al. (2024)
    do: the RM already reads (prompt, response) and outputs the score the return ends with, so V
    starts near E[R] at the last tokens instead of at 0, and the first policy updates are not
    driven by a random baseline. The RM's normalisation (mean, std) is folded into the head so V
    is on the reward's scale. Caveat (VC-PPO, Yuan et al. 2025): the head was trained only at the
    last token, so early-token values start biased; the critic must catch up in the first steps.
    From the policy with a zero head (V = 0) when there is no RM (--reward gold or random), when
    the RM's tokenizer differs, or with --critic-init policy.
    """
    if cfg["critic_init"] == "rm" and cfg["reward"] == "rm":
        try:
            ckpt = load_checkpoint(cfg["rm"], device)
        except CheckpointError as e:
            fail(str(e))
        if ckpt["model"].score_head is not None and ckpt["tokenizer"].state() == tok.state():
            critic, extra = ckpt["model"], ckpt["extra"]
            with torch.no_grad():
                critic.score_head.weight.div_(extra.get("reward_std", 1.0))
                critic.score_head.bias.sub_(extra.get("reward_mean", 0.0)).div_(extra.get("reward_std", 1.0))
            return critic.eval(), "rm"
    critic = GPT(dataclasses.replace(policy.config, scalar_head=True)).to(device)
    critic.load_state_dict(policy.state_dict(), strict=False)
    torch.nn.init.zeros_(critic.score_head.weight)
    torch.nn.init.zeros_(critic.score_head.bias)
    return critic.eval(), "policy"  # eval: dropout off in the critic too


def critic_values(critic, batch):
    """V(state before target t) for every target position: (B,T-1), aligned with resp_mask."""
    module = getattr(critic, "module", critic)
    return module.score(critic(batch["ids"][:, :-1], batch["attn_mask"][:, :-1])).float()


# ----------------------------------------------------------------------------- one PPO step

@torch.no_grad()
def make_experience(model, ref_model, critic, batch, scores, kl_coef, cfg):
    """Everything the update needs from one rollout batch, computed once with no grad: old and
    reference log-probs, values, per-token rewards, GAE advantages (whitened) and returns."""
    T, micro, dtype, mask = cfg["temperature"], cfg["micro_batch"], cfg["dtype"], batch["resp_mask"]
    old_logp = grpo.batched_logprobs(model, batch, T, micro, dtype)
    ref_logp = grpo.batched_logprobs(ref_model, batch, T, micro, dtype)  # same temperature for both
    values = torch.zeros_like(mask)
    with autocast(batch["ids"].device, dtype):
        for rows, lo, hi in grpo.length_chunks(batch, torch.arange(len(mask), device=mask.device), micro):
            values[rows, lo:hi - 1] = critic_values(critic, grpo.trimmed(batch, rows, lo, hi))
    values = values * mask
    kl = (old_logp - ref_logp) * mask  # k1 per token: the KL penalty sits in the reward (Ziegler et al. 2019 eq. 2)
    last, _ = grpo.last_valid(mask)
    rewards = (-kl_coef * kl).scatter_add(1, last[:, None], scores[:, None].float())  # score on the last sampled token
    adv, returns = gae(rewards, values, mask, cfg["gamma"], cfg["lam"])
    adv = grpo.masked_whiten(adv, mask)  # advantage whitening over valid tokens (37 details #7)
    return dict(old_logp=old_logp, ref_logp=ref_logp, values=values, returns=returns, adv=adv, kl=kl)


def critic_update(critic, opt, batch, exp, cfg):
    """epochs x minibatches of the clipped value loss, token-mean over valid tokens (global count)."""
    mask, B, device = batch["resp_mask"], batch["ids"].shape[0], batch["ids"].device
    sums = {k: torch.zeros((), device=device) for k in ("loss", "clip", "n")}
    for _ in range(cfg["epochs"]):
        for rows in torch.randperm(B, device=device).chunk(cfg["minibatches"]):
            norm = grpo.global_norm(mask[rows], "token-mean")
            for mrows, lo, hi in grpo.length_chunks(batch, rows, cfg["micro_batch"]):
                cut = lambda x: x[mrows, lo:hi - 1]  # this chunk's rows and columns
                m = cut(mask)
                with autocast(device, cfg["dtype"]):
                    v = critic_values(critic, grpo.trimmed(batch, mrows, lo, hi))
                loss_tok, clipped = value_loss(v, cut(exp["values"]), cut(exp["returns"]), cfg["vf_clip"])
                loss = grpo.aggregate(loss_tok, m, "token-mean", norm)
                loss.backward()
                sums["loss"] += loss.detach() * norm
                sums["clip"] += (clipped.float() * m).sum()
                sums["n"] += m.sum()
            torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg["grad_clip"])
            opt.step()
            opt.zero_grad(set_to_none=True)
    return dict(value_loss=float(sums["loss"] / sums["n"].clamp(min=1)), vf_clip_frac=float(sums["clip"] / sums["n"].clamp(min=1)))


def policy_cfg(cfg):
    """PPO's policy update is grpo.update with one ε, no KL term in the loss (it is in the reward)."""
    return dict(cfg, iterations=cfg["epochs"], eps_low=cfg["eps_clip"], eps_high=cfg["eps_clip"], dual_clip=0.0,
                kl="off", loss_agg="token-mean")


def ppo_step(model, ref_model, critic, opt, copt, batch, scores, kl_coef, cfg, timer=grpo.untimed):
    """make_experience, then the policy and the critic updates. Returns (experience, metrics).
    timer times the phases (bench.py); "logprobs" covers the critic's values and GAE too."""
    with timer("logprobs"):
        exp = make_experience(model, ref_model, critic, batch, scores, kl_coef, cfg)
    m = batch["resp_mask"]
    err = ((exp["values"] - exp["returns"]) ** 2 * m).sum() / m.sum().clamp(min=1)  # before the update
    var_r = ((exp["returns"] - (exp["returns"] * m).sum() / m.sum()) ** 2 * m).sum() / m.sum().clamp(min=1)
    with timer("update"):
        stats = grpo.update(model, ref_model, opt, batch, exp["adv"], policy_cfg(cfg), old_logp=exp["old_logp"])
    with timer("critic_update"):
        stats.update(critic_update(critic, copt, batch, exp, cfg))
    stats.update(value_error=float(err), explained_var=float(1 - err / var_r.clamp(min=1e-8)))
    return exp, stats


# ----------------------------------------------------------------------------- over-optimisation (Gao et al. 2022)

def best_of_n_estimates(proxy, gold, ns):
    """Best-of-n by the proxy, from N samples per prompt: (P, N) proxy and gold scores -> one row
    per n in ns with, averaged over prompts, the proxy and gold score of the proxy's pick among n
    samples, and the gold judge's win rate of that pick against one other sample of the prompt
    (ties half; n = 1 gives 0.5), all unbiased over the n-subsets of the N samples: with the
    samples sorted by proxy, the one at rank k (1-based, ascending) is picked with probability
    C(k-1, n-1) / C(N, n) (the best-of-n estimator behind Gao et al. 2022's BoN curves).
    KL(best-of-n || π) = log n - (n-1)/n (Stiennon et al. 2020; Gao et al. 2022 eq. 1).
    """
    proxy, gold = proxy.double(), gold.double()
    order = proxy.argsort(1)
    proxy, gold = proxy.gather(1, order), gold.gather(1, order)
    N = proxy.shape[1]
    # win(k): sample k against each other sample of its prompt, ties half (its own tie removed)
    beats = (gold[:, :, None] > gold[:, None, :]).double() + 0.5 * (gold[:, :, None] == gold[:, None, :]).double()
    win = (beats.sum(2) - 0.5) / max(N - 1, 1)
    k = torch.arange(1, N + 1, dtype=torch.float64)
    lchoose = lambda a, b: torch.lgamma(a + 1) - torch.lgamma(b + 1) - torch.lgamma(a - b + 1)
    rows = []
    for n in ns:
        w = torch.where(k >= n, (lchoose(k - 1, torch.tensor(n - 1.)) - lchoose(torch.tensor(float(N)), torch.tensor(float(n)))).exp(), 0)
        rows.append(dict(n=n, kl=math.log(n) - (n - 1) / n, proxy=float((proxy * w).sum(1).mean()),
                         gold=float((gold * w).sum(1).mean()), win=float((win * w).sum(1).mean())))
    return rows


@torch.no_grad()
def best_of_n(model, tok, prompts, reward_fn, task_of, cfg):
    """Best-of-n by the proxy for n = 1, 2, 4, ... bon_n, from bon_n samples per prompt
    (best_of_n_estimates)."""
    N = cfg["bon_n"]
    batch = grpo.rollout(model, tok, prompts, N, cfg["max_new_tokens"], cfg["temperature"])
    proxy = grpo.score(reward_fn, batch, cfg["missing_eos_penalty"]).view(-1, N).cpu()
    gold = torch.tensor([s["score"] for s in grpo.gold_of(task_of, batch)], dtype=torch.float64).view(-1, N)
    return best_of_n_estimates(proxy, gold, [2 ** i for i in range(int(math.log2(N)) + 1)])


def overoptimisation_curve(run_rows, bon_rows, out_dir, bins=12):
    """Proxy (RM) and gold reward against √KL, for an RL run (its logged rollout batches, averaged
    in `bins` consecutive windows) and for best-of-n: Gao et al. (2022), "Scaling Laws for Reward
    Model Overoptimization", Fig. 1. Writes overoptimisation.md (+ .png with matplotlib)."""
    rows = [r for r in run_rows if "gold" in r and "kl_seq" in r]
    size = max(1, len(rows) // bins)
    run = []
    for s in range(0, len(rows) - size + 1, size):
        w = rows[s:s + size]
        avg = lambda k: sum(r[k] for r in w) / len(w)
        run.append(dict(step=w[-1]["step"], kl=avg("kl_seq"), proxy=avg("reward"), gold=avg("gold")))
    lines = ["# Reward over-optimisation: proxy (RM) vs gold against sqrt(KL)", "",
             "KL(π || π_init) in nats per response. RL: rollout batches averaged over windows of "
             f"{size} steps. Best-of-n: analytic KL = log n - (n-1)/n, unbiased estimator over subsets.", ""]
    for name, table in (("RL run", run), ("Best-of-n", bon_rows)):
        key = "step" if name == "RL run" else "n"
        win = name == "Best-of-n"  # its pick's gold win rate against a plain sample of the same policy
        cols = [key, "KL", "sqrt(KL)", "proxy (RM)", "gold"] + (["gold win vs a sample"] if win else [])
        lines += [f"## {name}", "", "| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
        for r in table:
            cells = [r[key]] + [f"{v:.3f}" for v in (r["kl"], math.sqrt(max(r["kl"], 0)), r["proxy"], r["gold"])]
            cells += [f"{r['win']:.3f}"] if win else []
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        if table:
            gpk, ppk = max(table, key=lambda r: r["gold"]), max(table, key=lambda r: r["proxy"])
            lines += ["", f"gold peaks at {key} {gpk[key]} (sqrt KL {math.sqrt(max(gpk['kl'], 0)):.2f}, gold "
                          f"{gpk['gold']:.3f}); proxy peaks at {key} {ppk[key]} (sqrt KL "
                          f"{math.sqrt(max(ppk['kl'], 0)):.2f}, proxy {ppk['proxy']:.3f}).", ""]
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "overoptimisation.md")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, table, style in (("RL", run, "-"), ("BoN", bon_rows, "--")):
            x = [math.sqrt(max(r["kl"], 0)) for r in table]
            ax.plot(x, [r["proxy"] for r in table], style, label=f"{name} proxy")
            ax.plot(x, [r["gold"] for r in table], style, label=f"{name} gold")
        ax.set_xlabel("sqrt(KL) (nats)"), ax.set_ylabel("reward"), ax.legend()
        fig.savefig(os.path.join(out_dir, "overoptimisation.png"), dpi=120)
    except ImportError:
        lines.append("(matplotlib is not installed: no PNG, the table above is the curve)")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path, run


# ----------------------------------------------------------------------------- main

def train_step(model, train_model, ref_model, critic, opt, copt, tok, prompts, reward_fn, task_of, kl_coef, cfg,
               step, rank=0, world=1, timer=grpo.untimed):
    """One PPO step on this rank (model: the policy; train_model, critic: DDP-wrapped when world > 1).
    Returns (the metrics row main logs, the KL coefficient for the next step)."""
    for o, lr in ((opt, cfg["lr"]), (copt, cfg["critic_lr"])):
        set_lr(o, lr_at(step, cfg["steps"], lr, cfg["warmup"], min_ratio=1.0))  # constant after warmup
    with timer("rollout"):
        batch = grpo.rollout(model, tok, grpo.draw_prompts(prompts, cfg["batch_size"], cfg["seed"], step, rank), 1,
                             cfg["max_new_tokens"], cfg["temperature"])
    with timer("reward"):
        scores = grpo.score(reward_fn, batch, cfg["missing_eos_penalty"])
    exp, stats = ppo_step(train_model, ref_model, critic, opt, copt, batch, scores, kl_coef, cfg, timer)
    kl_seq = float(all_reduce_sum(exp["kl"].sum().reshape(1)) / (len(scores) * world))  # nats per response
    row = dict(stats, **grpo.rollout_stats(batch, scores), kl_seq=kl_seq, kl_coef=kl_coef,
               logit_scale=grpo.logit_scale(model))
    if cfg["reward"] == "rm":
        row["rm_score"] = row["reward"] + cfg["missing_eos_penalty"] * row["truncated"]  # before the EOS penalty
    if cfg["kl_target"] > 0:
        kl_coef = adaptive_kl_coef(kl_coef, kl_seq, cfg["kl_target"], len(scores) * world, cfg["kl_horizon"])
    if (cfg["curve"] or step % cfg["gold_every"] == 0 or step == cfg["steps"] - 1) and task_of:
        with timer("gold_log"):  # the hidden judge, for the log only
            row["gold"] = sum(s["score"] for s in grpo.gold_of(task_of, batch)) / len(batch["texts"])
    return row, kl_coef


def main(argv=None, reward_fn=None):
    cfg = parse_config(DEFAULTS, PRESETS, argv, description=__doc__)
    if cfg["critic_init"] not in ("rm", "policy"):
        fail(f"--critic-init {cfg['critic_init']!r}: expected rm or policy")
    device, rank, world = setup(cfg)
    t0 = time.time()
    model, ref_model, tok = grpo.load_policy(cfg["init"], device)  # eval mode throughout: dropout off
    prompts, task_of = grpo.load_prompts(cfg)
    reward_fn = reward_fn or grpo.make_reward(cfg, task_of, device)
    critic, critic_src = make_critic(cfg, model, tok, device)
    opt = make_optimizer(model, cfg["lr"], cfg["weight_decay"], device=device, final_norm_lr=cfg["final_norm_lr"])
    copt = make_optimizer(critic, cfg["critic_lr"], cfg["weight_decay"], device=device)
    ddp = torch.nn.parallel.DistributedDataParallel
    train_model, train_critic = (ddp(model), ddp(critic)) if world > 1 else (model, critic)
    log, kl_coef, run_rows = MetricLog(cfg["out"], "ppo", enabled=rank == 0), cfg["kl_coef"], []
    if rank == 0:
        print(f"ppo: critic initialised from the {critic_src}; reward {cfg['reward']}")

    for step in (bar := tqdm(range(cfg["steps"]), disable=rank != 0, desc="ppo")):
        row, kl_coef = train_step(model, train_model, ref_model, train_critic, opt, copt, tok, prompts, reward_fn,
                                  task_of, kl_coef, cfg, step, rank, world)
        log.log(step, **row)
        run_rows.append(dict(row, step=step))
        bar.set_postfix(r=f"{row['reward']:.2f}", kl=f"{row['kl_seq']:.2f}", vf=f"{row['value_loss']:.3f}")

    train_s = time.time() - t0
    if rank != 0:
        return
    save = lambda metrics: save_checkpoint(cfg["out"], model, tok, "ppo", parent=cfg["init"], config=cfg,
                                           metrics=metrics, optimizer=opt, step=cfg["steps"])
    save(dict(train_s=train_s))  # the trained policy is safe before the (slow) evaluation starts
    rm_fn = reward_fn if cfg["reward"] == "rm" else None
    metrics = dict(grpo.final_eval(model, ref_model, tok, rm_fn, cfg) if cfg["eval_tasks"] else {},
                   train_s=train_s, critic_init=critic_src, kl_coef_final=kl_coef)
    if cfg["curve"] and task_of:
        bon_prompts = grpo.draw_prompts(prompts, cfg["bon_prompts"], cfg["seed"], -1, 0)
        bon = best_of_n(ref_model, tok, bon_prompts, reward_fn, task_of, cfg)
        path, _ = overoptimisation_curve(run_rows, bon, os.path.dirname(os.path.abspath(cfg["out"])))
        print(f"ppo: over-optimisation curve -> {path}")
    metrics["wall_s"] = time.time() - t0
    save(metrics)
    if cfg["eval_tasks"]:
        grpo.print_before_after("ppo", metrics, metrics["wall_s"])


if __name__ == "__main__":
    main()
