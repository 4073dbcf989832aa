"""GRPO and the critic-free family: sample G responses per prompt, score them, push up the ones
that beat their group.

    python grpo.py [--init out/dpo.pt] [--rm out/rm.pt] [--out out/grpo.pt] [--preset tiny|cpu|gpu]
                   [--advantage grpo|dr_grpo|rloo|reinforce_pp|reinforce_pp_baseline|tree]
                   [--loss-agg token-mean|seq-mean-token-mean|seq-mean-token-sum-norm]
                   [--kl k1|k2|k3|off] [--reward rm|gold|random] [--data prompts.jsonl] [--rollout-chunk N]
                   [--final-norm-lr 2e-2]

The algorithm (GRPO: Shao et al. 2024, "DeepSeekMath", Algorithm 1), as main() runs it:
    for each step:
        draw prompts; sample G responses to each from the current policy        rollout
        score every response with the reward model                               reward_fn
        A_i = (R_i - mean(R_group)) / std(R_group), on every token of response i  group_advantages
        μ iterations x minibatches: minimise the clipped surrogate + β·KL(π||π_ref)  update
Each variant changes one piece: Dr. GRPO (Liu et al. 2025) drops the std and divides the loss by
a constant length; DAPO (Yu et al. 2025) clips higher (ε_high > ε_low), resamples groups whose
rewards are all equal (dynamic sampling) and averages over tokens; RLOO (Ahmadian et al. 2024)
uses the leave-one-out mean; REINFORCE++ (Hu 2025) whitens returns over the whole batch; tree
(TreeRL, Hou et al. 2025) puts each group's credit on the tokens where its responses part.

Under torchrun each rank samples its share of one prompt list (sample_groups): with --rollout-chunk c
(c dividing prompts_per_step / world; the tiny preset uses 1) the ranks train exactly as one
process would, up to float rounding (tests/test_ddp.py).

rollout / policy_logprobs / token_advantages / update are reused by rlvr.py; ppo.py reuses the
kernels, update (for its policy) and the prompt / reward / evaluation helpers below them.
"""
import contextlib
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import tasks
from common import MetricLog, all_reduce_sum, autocast, fail, lr_at, make_optimizer, parse_config, set_lr, setup
from data import DataError, generate_responses, pad_prompts, read_jsonl
from model import CheckpointError, load_checkpoint, save_checkpoint, token_logprobs

# Dr. GRPO's advantages by default: GRPO's division by the group's std gives every group unit-scale
# advantages however little the reward model's scores differ in it, which with a learned, noisy
# reward is noise made loud. Measured from the DPO policy (32 prompts a step, lr 3e-5): --advantage
# grpo collapsed code (sampled pass 0.28, gold win rate vs init 0.43); dr_grpo won 0.53.
# The final LayerNorm on a rate of its own (--final-norm-lr, common.make_optimizer): what the RM
# rewards first near the DPO init is fewer spoiled tokens from the softmax's tail, i.e. a sharper
# policy, and the logits' scale barely moves at a fine-tuning lr. Sampled gold win rate vs the init
# (4 samples a prompt), KL: without it 0.504, 0.32 (lr 3e-5); with it at 1e-2 0.543, 0.26; at
# lr 1e-5 and 2e-2 0.551, 0.18 (other settings near it 0.531-0.546, README).
DEFAULTS = dict(
    init="out/dpo.pt", out="out/grpo.pt", rm="out/rm.pt", reward="rm", data=None, n_prompts=2000,
    steps=40, prompts_per_step=16, group_size=8, max_new_tokens=96, temperature=1.0, top_k=0, top_p=1.0,
    advantage="dr_grpo", loss_agg="token-mean", iterations=1, minibatches=1, micro_batch=32,
    eps_low=0.2, eps_high=0.28, dual_clip=0.0, kl="k3", beta=0.2,
    dynamic_sampling=False, ds_max_tries=3, missing_eos_penalty=1.0, rollout_chunk=0,
    lr=1e-5, final_norm_lr=2e-2, warmup=3, weight_decay=0.0, grad_clip=1.0,
    gold_every=5, eval_tasks=50,
    seed=0, device="auto", dtype="bf16",
)
PRESETS = dict(
    tiny=dict(n_prompts=16, steps=2, prompts_per_step=2, group_size=4, max_new_tokens=16, micro_batch=4,
              gold_every=1, eval_tasks=1, rollout_chunk=1),
    cpu=dict(),
    gpu=dict(n_prompts=2400, steps=500, prompts_per_step=64, group_size=16, micro_batch=128, lr=1e-5,
             iterations=2, minibatches=4, eval_tasks=100),
)
ADVANTAGES = ("grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "tree")
LOSS_AGG = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


# ----------------------------------------------------------------------------- rollouts

@torch.no_grad()
def rollout(model, tok, prompts, group_size, max_new_tokens, temperature, top_k=0, top_p=1.0, tools=True,
            generator=None):
    """Sample group_size responses per prompt with the KV-cache sampler (data.generate_responses),
    drawing from `generator` (a torch.Generator on the model's device; None: the global stream).

    Rows are prompt-major (row i*G+g is sample g of prompt i). Returns dict:
      ids (B,T)        left-padded prompt then response (right-padded), T = P + N
      attn_mask (B,T)  1 on real tokens (tool-inserted tokens included: the model reads them)
      resp_mask (B,T-1) float, aligned with the targets ids[:,1:]: 1 where the target is a token
                       the model sampled; 0 on prompt, padding and tool-inserted tokens
      texts, finished (B,) bool, prompts (repeated), group (B,) prompt index, prompt_len P.
    """
    model = getattr(model, "module", model)
    device = next(model.parameters()).device
    rep = [p for p in prompts for _ in range(group_size)]
    out = generate_responses(model, tok, rep, max_new_tokens, temperature, top_k, top_p, tools, generator=generator)
    pids, pmask = pad_prompts(tok, out["prompt_ids"])
    tokens, sampled = out["tokens"].to(device), out["sampled"].to(device)
    P, N = pids.shape[1], tokens.shape[1]
    # a response's real tokens run up to its last written one (a sampled pad id still counts)
    written = (tokens != tok.pad_id) | sampled.bool()
    length = (written * torch.arange(1, N + 1, device=device)).amax(1)
    resp_attn = torch.arange(N, device=device)[None] < length[:, None]
    resp_mask = torch.zeros(len(rep), P + N - 1, device=device)
    resp_mask[:, P - 1:] = sampled.float()  # target ids[:, P + j] is response token j
    return dict(ids=torch.cat([pids.to(device), tokens], 1),
                attn_mask=torch.cat([pmask.to(device), resp_attn.long()], 1), resp_mask=resp_mask,
                texts=out["texts"], finished=out["finished"].to(device), prompts=rep,
                group=torch.arange(len(prompts), device=device).repeat_interleave(group_size), prompt_len=P)


def select_rows(batch, rows):
    """The sub-batch of the given rows (a 1-D index list or tensor)."""
    rows = torch.as_tensor(rows, dtype=torch.long, device=batch["ids"].device)
    out = {k: v[rows] for k, v in batch.items() if torch.is_tensor(v)}
    out.update(texts=[batch["texts"][i] for i in rows.tolist()], prompts=[batch["prompts"][i] for i in rows.tolist()],
               prompt_len=batch["prompt_len"])
    return out


def length_chunks(batch, rows, size):
    """rows (1-D index tensor) sorted by length, cut into chunks of <= size rows, each with the
    column range [lo, hi) its rows use: [(chunk rows, lo, hi)]. In a mixed batch most of the
    (B, T) grid is padding (a 20-token answer beside a 96-token working: 35% real cells at the
    default preset), and a forward pays for every cell; sorted and trimmed chunks hold ~60%.
    One host sync per call, for the column ranges."""
    attn = batch["attn_mask"][rows].bool()
    cols = torch.arange(attn.shape[1], device=attn.device)
    first = torch.where(attn, cols, attn.shape[1]).amin(1)
    last = torch.where(attn, cols, -1).amax(1)
    order = (last - first).argsort(stable=True)
    out = []
    for piece in order.split(size):
        lo, hi = torch.stack([first[piece].min(), last[piece].max() + 1]).tolist()
        out.append((rows[piece], lo, max(hi, lo + 2)))  # >= 2 columns: one target at least
    return out


def trimmed(batch, rows, lo, hi):
    """select_rows, keeping only columns [lo, hi) (pads for every one of these rows outside):
    positions come from the attention mask, so each token keeps its own. resp_mask and every
    (B, T-1) tensor aligned with the targets take columns [lo, hi - 1)."""
    sub = select_rows(batch, rows)
    sub.update(ids=sub["ids"][:, lo:hi], attn_mask=sub["attn_mask"][:, lo:hi],
               resp_mask=sub["resp_mask"][:, lo:hi - 1], prompt_len=max(0, sub["prompt_len"] - lo))
    return sub


def concat_rollouts(parts, pad_id):
    """Stack rollouts whose prompt (P) and response (N) widths differ: prompts are re-padded on
    the left, responses on the right. Group ids are renumbered to stay unique."""
    P = max(b["prompt_len"] for b in parts)
    N = max(b["ids"].shape[1] - b["prompt_len"] for b in parts)
    ids, attn, resp, group, offset = [], [], [], [], 0
    for b in parts:
        left, right = P - b["prompt_len"], N - (b["ids"].shape[1] - b["prompt_len"])
        ids.append(F.pad(b["ids"], (left, right), value=pad_id))
        attn.append(F.pad(b["attn_mask"], (left, right), value=0))
        resp.append(F.pad(b["resp_mask"], (left, right), value=0.0))
        group.append(b["group"] - b["group"].min() + offset)
        offset = int(group[-1].max()) + 1 if len(b["group"]) else offset
    rows = {k: torch.cat([b[k] for b in parts]) for k in ("finished", "uid", "live") if k in parts[0]}
    return dict(ids=torch.cat(ids), attn_mask=torch.cat(attn), resp_mask=torch.cat(resp), group=torch.cat(group),
                texts=[t for b in parts for t in b["texts"]], prompts=[p for b in parts for p in b["prompts"]],
                prompt_len=P, **rows)


def policy_logprobs(model, batch, temperature, entropy=False):
    """log π(ids[:,1:] | prefix) under the sampling temperature: (B,T-1) (and the entropy).

    The same temperature divides the logits here and in the sampler, so the ratio π/π_old is
    exactly 1 on the first minibatch (a known PPO-RLHF bug when they differ: Huang et al. 2024,
    "The N+ Implementation Details of RLHF with PPO", PPO details).
    Works with a DDP-wrapped model: the forward goes through the wrapper, the head is read off it.
    """
    h = model(batch["ids"][:, :-1], batch["attn_mask"][:, :-1])
    w = getattr(model, "module", model).lm_head.weight
    return token_logprobs(h, w, batch["ids"][:, 1:], temperature, entropy=entropy)


@torch.no_grad()
def batched_logprobs(model, batch, temperature, micro_batch=64, dtype="fp32"):
    """policy_logprobs without grad (old / reference log-probs): (B, T-1), 0 outside each row's
    columns. Length-sorted, trimmed chunks of micro_batch rows (length_chunks), the chunks
    update forms, under the same autocast as the training forward, so ρ = 1 holds on a GPU too."""
    out = torch.zeros(batch["resp_mask"].shape, device=batch["ids"].device)
    rows = torch.arange(out.shape[0], device=out.device)
    with autocast(out.device, dtype):
        for part, lo, hi in length_chunks(batch, rows, micro_batch):
            out[part, lo:hi - 1] = policy_logprobs(model, trimmed(batch, part, lo, hi), temperature).float()
    return out


# ----------------------------------------------------------------------------- advantage and loss kernels

def group_advantages(rewards, group_size, kind="grpo", eps=1e-6):
    """Sequence advantages from G samples per prompt (prompt-major rows): (B,) -> (B,).

      grpo     A_i = (R_i - mean_g R) / (std_g R + eps)   DeepSeekMath (Shao et al. 2024) §4.1.2;
               std with Bessel's correction (N-1), as TRL's GRPOTrainer and torch.std compute it
      dr_grpo  A_i = R_i - mean_g R                        Dr. GRPO (Liu et al. 2025): no std, which
               would up-weight prompts whose samples nearly agree (too easy or too hard)
      rloo     A_i = R_i - mean_{j!=i} R_j = G/(G-1) (R_i - mean_g R)   RLOO (Ahmadian et al. 2024)
    A group whose rewards are all equal (a singleton group too) carries no comparison: its
    advantages are exactly 0. Example: R = [1, 0, 0, 0], G = 4, grpo -> [1.5, -0.5, -0.5, -0.5].
    """
    r = rewards.float().view(-1, group_size)
    centred = r - r.mean(1, keepdim=True)
    if kind == "grpo":
        adv = centred / (r.std(1, keepdim=True, correction=1) + eps) if group_size > 1 else centred
    elif kind == "dr_grpo":
        adv = centred
    elif kind == "rloo":
        adv = centred * group_size / max(group_size - 1, 1)
    else:
        raise ValueError(f"unknown advantage {kind!r}; expected grpo | dr_grpo | rloo")
    return adv.masked_fill((r == r[:, :1]).all(1, keepdim=True), 0.0).view(-1)


def prefix_tree_advantages(tokens, rewards, group_size):
    """Token advantages from the prefix tree a group's responses form (prompt-major rows):
    tokens (B, L) response tokens, identical padding after each response's end; rewards (B,)
    -> (B, L).

      V(prefix)  = mean of R_j over the group's responses j that begin with prefix: a Monte-Carlo
                   value of that state from the samples that passed through it
      A_{i,t}    = V(y_i[:t+1]) - V(y_i[:t])   what token t added: Q(s, a) - V(s)

    The tree TreeRL (Hou et al. 2025) and TreeAdv (Cao et al. 2026) build by branching, read off
    i.i.d. samples: a worked answer is the same text in every sample up to its first false step,
    so the samples share long prefixes and part where one goes wrong. Tokens all of a node's
    samples share get 0; the credit lands on the token where the responses part. Summed over a
    response A telescopes to R_i - mean_g R (Dr. GRPO's advantage): the same total, placed.
    Example: G = 3, responses ab, ac, ac with R = 1, 0, 0: a gets 0 (V 1/3 -> 1/3), b +2/3, c -1/3.
    """
    B, L = tokens.shape
    t = tokens.view(-1, group_size, L)
    # shared[n, i, j, s]: responses i and j of group n agree on tokens 0..s
    shared = (t[:, :, None, :] == t[:, None, :, :]).long().cumprod(-1).float()
    r = rewards.float().view(-1, 1, group_size, 1)
    after = (shared * r).sum(2) / shared.sum(2)  # V(y_i[:s+1]); i always shares with itself
    root = r.mean(2).expand(-1, group_size, 1)  # V(empty prefix): the group's mean
    before = torch.cat([root, after[..., :-1]], -1)
    return (after - before).view(B, L)


def tree_advantages(batch, rewards, group_size):
    """prefix_tree_advantages on a rollout batch, aligned with its targets: (B, T-1), 0 wherever
    resp_mask is 0. Response token s of row i is target P + s - 1."""
    P, mask = batch["prompt_len"], batch["resp_mask"]
    adv = prefix_tree_advantages(batch["ids"][:, P:], rewards, group_size)
    return torch.cat([torch.zeros_like(mask[:, :P - 1]), adv], 1) * mask


def token_advantages(rewards, batch, kind, group_size):
    """(B, T-1) advantage of each target token of a rollout batch, 0 wherever resp_mask is 0, for
    any of ADVANTAGES: the group kinds give every token of response i its A_i, tree gives each
    token what it added to its prefix's value, REINFORCE++ whitens returns over the batch (its
    rewards may also be (B, T-1) token rewards, rlvr.py's KL-in-the-reward)."""
    if kind.startswith("reinforce_pp"):
        return reinforce_pp_advantages(rewards, batch["resp_mask"], kind, group_size)
    if kind == "tree":
        return tree_advantages(batch, rewards, group_size)
    return group_advantages(rewards, group_size, kind)[:, None] * batch["resp_mask"]


def masked_whiten(x, mask, eps=1e-8):
    """(x - mean) / std over the valid tokens of the whole (global, all-reduced) batch; 0 elsewhere.
    Population variance (divide by N). Advantage normalisation: the 37 PPO details #7 (Huang et al. 2022)."""
    m = mask.float()
    n = all_reduce_sum(m.sum().reshape(1)).clamp(min=1)
    mean = all_reduce_sum((x * m).sum().reshape(1)) / n
    var = all_reduce_sum((((x - mean) * m) ** 2).sum().reshape(1)) / n
    return (x - mean) * torch.rsqrt(var + eps) * m


def last_valid(mask):
    """Index of each row's last valid (mask 1) position, and whether the row has any."""
    pos = torch.arange(mask.shape[1], device=mask.device)
    return (mask.bool() * (pos + 1)).amax(1).sub(1).clamp(min=0), mask.bool().any(1)


def reinforce_pp_advantages(rewards, resp_mask, kind="reinforce_pp", group_size=1):
    """REINFORCE++ (Hu 2025, "REINFORCE++", §3): token-level returns, whitened over the batch.

      G_t = sum_{s >= t, s valid} r_s     (γ = 1; masked positions, e.g. tool outputs, add nothing)
      A_t = (G_t - mean(G)) / std(G)      mean/std over every valid token of the global batch
    rewards: (B,) sequence rewards, placed on each row's last sampled token, or (B,T-1) token
    rewards (e.g. with a -β·k1 KL term per token, as the paper puts the KL in the reward).
    The sum runs inside each row only, so a return never leaks past its sequence's end.
    reinforce_pp_baseline (OpenRLHF's REINFORCE++-baseline): first subtract the group mean of the
    sequence rewards (group_size samples per prompt, prompt-major), then the same whitening.
    """
    m = resp_mask.float()
    last, any_valid = last_valid(m)
    if rewards.dim() == 1:
        tok_r = torch.zeros_like(m).scatter(1, last[:, None], (rewards.float() * any_valid)[:, None])
    else:
        tok_r = rewards.float() * m
    if kind == "reinforce_pp_baseline":
        base = tok_r.sum(1).view(-1, group_size).mean(1).repeat_interleave(group_size)
        tok_r = tok_r.scatter_add(1, last[:, None], (-base * any_valid)[:, None])
    elif kind != "reinforce_pp":
        raise ValueError(f"unknown advantage {kind!r}; expected reinforce_pp | reinforce_pp_baseline")
    returns = tok_r.flip(1).cumsum(1).flip(1)
    return masked_whiten(returns, m)


def kl_estimate(logp, ref_logp, kind="k3"):
    """Per-token estimators of KL(π || π_ref) from tokens sampled from π (Schulman 2020,
    "Approximating KL divergence"), with x = log π_ref(t) - log π(t):
      k1 = -x                 unbiased, high variance, can be negative
      k2 = x² / 2             biased, >= 0, low variance; its gradient is the KL's gradient on-policy
      k3 = (e^x - 1) - x      unbiased, >= 0, low variance (GRPO's choice, DeepSeekMath eq. 4);
                              expm1 keeps it accurate (and >= 0) when x is tiny, where e^x - 1 cancels
    Example: x = 1e-4 in float32: expm1(x) - x = 5.0e-9 (exact: x²/2 = 5.0e-9), exp(x) - 1 - x = 1.7e-8.
    """
    x = ref_logp - logp
    if kind == "k1":
        return -x
    if kind == "k2":
        return 0.5 * x ** 2
    if kind == "k3":
        return torch.expm1(x) - x
    raise ValueError(f"unknown KL estimator {kind!r}; expected k1 | k2 | k3")


def clipped_surrogate(logp, old_logp, adv, eps_low, eps_high, dual_clip=None):
    """PPO's clipped objective as a per-token loss (Schulman et al. 2017, eq. 7), with ρ = π/π_old:

      L = max(-A ρ, -A clip(ρ, 1 - ε_low, 1 + ε_high))
    ε_high > ε_low is DAPO's clip-higher (Yu et al. 2025, §3.1): low-probability tokens may grow
    more before the clip stops them. dual_clip = c > 1 (Ye et al. 2020, "Mastering Complex Control
    in MOBA Games", dual-clip PPO) also bounds the loss of negative-advantage tokens at -c·A, so a
    huge ρ cannot blow up the update:
      L = min(L, -c A)  where A < 0
    Returns (loss per token, clipped): clipped marks tokens whose gradient the clip cut to zero.
    """
    ratio = torch.exp(logp - old_logp)
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1 - eps_low, 1 + eps_high)
    loss = torch.maximum(loss1, loss2)
    clipped = loss2 > loss1
    if dual_clip:
        bound = -adv * dual_clip
        dual = (adv < 0) & (loss > bound)
        loss, clipped = torch.where(dual, bound, loss), clipped | dual
    return loss, clipped


def aggregate(loss_tok, mask, mode="token-mean", norm=None, max_len=None):
    """Reduce a (B,T) per-token loss to a scalar over the valid tokens (mask 1):

      token-mean                sum_it l m / sum_it m                 (DAPO §3.3: every token counts once)
      seq-mean-token-mean       1/B sum_i (sum_t l m / sum_t m)       (the GRPO objective, DeepSeekMath
                                                                       eq. 3: long responses' tokens count less)
      seq-mean-token-sum-norm   1/B sum_i sum_t l m / L_max           (Dr. GRPO, Liu et al. 2025:
                                                                       a constant L_max, no length bias)
    norm replaces the denominator's count (tokens for token-mean, sequences otherwise) with a
    global one, so micro-batches and DDP ranks each add their share of the same mean.
    Example: l = 1 everywhere, mask rows of 1 and 3 tokens -> 1, 1, and (1+3)/(2·L_max).
    """
    m = mask.to(loss_tok.dtype)
    total = loss_tok * m
    if mode == "token-mean":
        return total.sum() / (m.sum().clamp(min=1) if norm is None else norm)
    n_seq = m.shape[0] if norm is None else norm
    if mode == "seq-mean-token-mean":
        return (total.sum(1) / m.sum(1).clamp(min=1)).sum() / n_seq
    if mode == "seq-mean-token-sum-norm":
        return total.sum() / ((m.shape[1] if max_len is None else max_len) * n_seq)
    raise ValueError(f"unknown loss aggregation {mode!r}; expected one of {LOSS_AGG}")


def global_norm(mask, mode, live=None):
    """The count `aggregate` divides by, summed over ranks, divided by world (DDP averages grads).
    live (B,) marks the rows that count as sequences (default all; 0 on a DDP placeholder row)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if mode == "token-mean":
        local = mask.sum()
    else:
        local = torch.tensor(float(mask.shape[0]), device=mask.device) if live is None else live.sum()
    return all_reduce_sum(local.float().reshape(1)).clamp(min=1)[0] / world


def all_gather_cat(x):
    """A 1-D tensor concatenated over ranks in rank order (lengths may differ); x when not distributed."""
    if not dist.is_initialized():
        return x
    n = torch.tensor([len(x)], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    padded = F.pad(x, (0, int(max(sizes)) - len(x)))  # all_gather wants equal shapes
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[:int(k)] for o, k in zip(out, sizes)])


def minibatch_rows(batch, n_mb):
    """This rank's rows of each of n_mb minibatches. The split is drawn over the global batch: a
    random order of every rank's row ids (batch["uid"]: unique over ranks and the same whatever the
    world size), cut in n_mb, so N DDP ranks together train on exactly the minibatches one process
    would. All ranks draw the same permutation (same seed, same calls). With one process and no
    uid this is randperm(B).chunk(n_mb). Placeholder rows (batch["live"] False) are in none, and
    a rank can hold no row of a minibatch: an empty index."""
    B, device = batch["ids"].shape[0], batch["ids"].device
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    uid = batch.get("uid", torch.arange(B, device=device) * world + rank)
    everyone = all_gather_cat(uid if "live" not in batch else uid[batch["live"]]).sort().values
    order = everyone[torch.randperm(len(everyone), device=device)]
    return [(piece[:, None] == uid[None]).nonzero()[:, 1] for piece in order.chunk(n_mb)]


# ----------------------------------------------------------------------------- the update

def update(model, ref_model, opt, batch, adv_tok, cfg, old_logp=None, ref_logp=None):
    """μ iterations x minibatches of the clipped loss (+ β·KL to the reference) on one rollout batch.

    adv_tok (B,T-1): the advantage of each target token (0 where resp_mask is 0). cfg keys (with
    defaults): iterations 1, minibatches 1, micro_batch 64, eps_low/eps_high 0.2, dual_clip 0,
    kl "off" | k1 | k2 | k3, beta 0, loss_agg token-mean, temperature 1, grad_clip 1, max_new_tokens
    (Dr. GRPO's constant length), dtype. old_logp defaults to the log-probs of the policy before this
    update (with μ = 1 and one minibatch that is the current forward, detached: ρ = 1, as TRL).
    batch may carry uid (row ids: minibatches cut from the global batch, see minibatch_rows) and
    live (False: a DDP placeholder row, in no loss or count).
    Returns logged metrics; first_mb_* are the very first micro-batch's (ρ must be 1 there);
    with ref_logp, kl_seq = mean over responses of Σ_t (log π_old - log π_ref), in nats.
    """
    g = lambda k, d: cfg.get(k, d)
    mu, n_mb, micro, T = g("iterations", 1), g("minibatches", 1), g("micro_batch", 64), g("temperature", 1.0)
    mode, kl_kind, beta, dtype = g("loss_agg", "token-mean"), g("kl", "off"), g("beta", 0.0), g("dtype", "fp32")
    device, mask, B = batch["ids"].device, batch["resp_mask"], batch["ids"].shape[0]
    if old_logp is None and (mu > 1 or n_mb > 1):
        old_logp = batched_logprobs(model, batch, T, micro, dtype)  # the sampling policy, before any step
    if kl_kind != "off" and ref_logp is None:
        ref_logp = batched_logprobs(ref_model, batch, T, micro, dtype)
    sums = {k: torch.zeros((), device=device)
            for k in ("loss", "clip", "approx_kl", "kl_ref", "kl_seq", "entropy", "n", "n_ent", "gn")}
    first, n_steps = None, 0
    live = torch.ones(B, device=device) if batch.get("live") is None else batch["live"].float()
    max_len = g("max_new_tokens", None) or mask.shape[1]  # Dr. GRPO's constant, whatever a chunk's width
    for it in range(mu):
        for rows in minibatch_rows(batch, n_mb):
            weight = live
            if len(rows) == 0:  # DDP: no row of this minibatch is here; a masked-out row still joins the all-reduce
                rows, weight = torch.zeros(1, dtype=torch.long, device=device), torch.zeros(B, device=device)
            norm = global_norm(mask[rows] * weight[rows, None], mode, weight[rows])
            chunks = length_chunks(batch, rows, micro)
            for j, (mrows, lo, hi) in enumerate(chunks):
                cut = lambda x: x[mrows, lo:hi - 1]  # this chunk's rows and columns of a (B, T-1) tensor
                m = cut(mask) * weight[mrows, None]
                # DDP: all-reduce the gradients once per minibatch, after its last micro-batch
                last = j == len(chunks) - 1 or not hasattr(model, "no_sync")
                with contextlib.nullcontext() if last else model.no_sync():
                    with autocast(device, dtype):
                        logp, ent = policy_logprobs(model, trimmed(batch, mrows, lo, hi), T, entropy=True)
                    old = logp.detach() if old_logp is None else cut(old_logp)
                    loss_tok, clipped = clipped_surrogate(logp, old, cut(adv_tok), g("eps_low", 0.2),
                                                          g("eps_high", 0.2), g("dual_clip", 0.0))
                    if kl_kind != "off":
                        kl = kl_estimate(logp, cut(ref_logp), kl_kind)
                        loss_tok = loss_tok + beta * kl  # KL in the loss, not in the reward (GRPO eq. 3)
                        sums["kl_ref"] += (kl.detach() * m).sum()
                    loss = aggregate(loss_tok, m, mode, norm, max_len)
                    loss.backward()
                with torch.no_grad():
                    log_ratio = logp.detach() - old
                    sums["loss"] += loss.detach()
                    sums["clip"] += (clipped.float() * m).sum()
                    sums["approx_kl"] += ((torch.expm1(log_ratio) - log_ratio) * m).sum()  # k3 of π_old -> π
                    sums["n"] += m.sum()
                    if it == 0:
                        sums["entropy"] += (ent * m).sum()
                        sums["n_ent"] += m.sum()
                        if ref_logp is not None:  # old = the sampling policy on this first pass
                            sums["kl_seq"] += ((old - cut(ref_logp)) * m).sum() / B
                    if first is None:
                        first = dict(first_mb_ratio_err=((log_ratio.exp() - 1).abs() * m).amax(),
                                     first_mb_clip_frac=(clipped.float() * m).sum() / m.sum().clamp(min=1))
            sums["gn"] += torch.nn.utils.clip_grad_norm_(model.parameters(), g("grad_clip", 1.0))
            opt.step()
            opt.zero_grad(set_to_none=True)
            n_steps += 1
    n = sums["n"].clamp(min=1)
    out = dict(loss=sums["loss"] / n_steps, clip_frac=sums["clip"] / n, approx_kl=sums["approx_kl"] / n,
               entropy=sums["entropy"] / sums["n_ent"].clamp(min=1), grad_norm=sums["gn"] / n_steps, **first)
    if kl_kind != "off":
        out["kl_ref_loss"] = sums["kl_ref"] / n
    if ref_logp is not None:
        out["kl_seq"] = sums["kl_seq"]
    return {k: float(v) for k, v in out.items()}  # one host sync per update: logging only


# ----------------------------------------------------------------------------- prompts, rewards, evaluation

def load_prompts(cfg):
    """RL prompts -> (prompts, task_of): the train split of the built-in world (all four families,
    n_prompts in all), or --data (RL JSONL: {"prompt", "answer"} / {"prompt", "test", "entry_point"}).
    task_of maps a prompt to its tasks.Task (built-in world only) for the gold judge."""
    if cfg["data"]:
        if not os.path.exists(cfg["data"]):
            fail(f"{cfg['data']}: no such file")
        try:
            return [r["prompt"] for r in read_jsonl(cfg["data"], "rl")], {}
        except DataError as e:
            fail(str(e))
    per = max(1, cfg["n_prompts"] // len(tasks.FAMILIES))
    try:
        task_list = [t for f in tasks.FAMILIES for t in tasks.make_tasks(f, "train", per, seed=cfg["seed"])]
    except tasks.TaskSpaceError as e:
        fail(f"--n-prompts {cfg['n_prompts']} ({per} a family): {e}")
    return [t.prompt for t in task_list], {t.prompt: t for t in task_list}


def draw_prompts(prompts, n, seed, step, rank, attempt=0):
    """n prompts for a step from rank's own stream (ppo.py: each rank draws its own). GRPO draws one
    list that every rank shares (rank 0's stream) and deals it out in chunks (rank_chunks)."""
    g = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 101 + attempt) * 1009 + rank)
    return [prompts[i] for i in torch.randint(len(prompts), (n,), generator=g).tolist()]


def gold_reward(task_of):
    """The hidden gold judge as a reward function (an oracle: for development and ablations)."""
    def fn(prompts, responses):
        return torch.tensor([s["score"] for s in tasks.gold_scores([task_of[p] for p in prompts], responses)])
    return fn


def random_reward(seed):
    """Uniform noise in [0, 1) as the reward (a control): what the update does with no signal at
    all, the floor that any reward, the gold judge included, has to beat at a given batch and lr."""
    g = torch.Generator().manual_seed(seed)
    return lambda prompts, responses: torch.rand(len(prompts), generator=g)


def make_reward(cfg, task_of, device):
    """--reward rm (default): the learned reward model from --rm; gold: the hidden judge;
    random: the no-signal control."""
    if cfg["reward"] == "gold":
        if not task_of:
            fail("--reward gold needs the built-in world's prompts (the judge knows only those tasks)")
        return gold_reward(task_of)
    if cfg["reward"] == "random":
        return random_reward(cfg["seed"])
    if cfg["reward"] != "rm":
        fail(f"--reward {cfg['reward']!r}: expected rm, gold or random")
    from reward import load_reward_model  # lazy: the reward stage is only needed when used
    try:
        return load_reward_model(cfg["rm"], device)
    except CheckpointError as e:
        fail(str(e))


def score(reward_fn, batch, missing_eos_penalty):
    """Reward of each response; a response that never stopped loses missing_eos_penalty
    (TRL's missing_eos_penalty; Huang et al. 2024 replace such a score by -1, the "EOS trick")."""
    r = reward_fn(batch["prompts"], batch["texts"]).float().to(batch["ids"].device)
    return r - missing_eos_penalty * (~batch["finished"]).float()


def gold_of(task_of, batch):
    """The gold judge's verdicts on the sampled texts (logged next to the proxy), None without tasks."""
    if not task_of or any(p not in task_of for p in batch["prompts"]):
        return None
    return tasks.gold_scores([task_of[p] for p in batch["prompts"]], batch["texts"])


def rollout_stats(batch, rewards):
    """What practitioners watch on every rollout batch: reward, its spread, length, truncation."""
    out = dict(reward=rewards.mean(), reward_std=rewards.std() if len(rewards) > 1 else 0.0,
               length=batch["resp_mask"].sum(1).mean(), truncated=(~batch["finished"]).float().mean())
    return {k: float(v) for k, v in out.items()}


def logit_scale(model):
    """The mean gain of the final LayerNorm: how sharp the policy has become (the logits' scale;
    --final-norm-lr trains it at a rate of its own, common.make_optimizer)."""
    return model.transformer.ln_f.weight.mean().item()


def load_policy(path, device):
    """The policy to train and a frozen copy of it, the reference. Both stay in eval mode: dropout
    off, so log-probs are deterministic and ρ = 1 on the first minibatch (Huang et al. 2024:
    "disable dropout")."""
    try:
        ckpt = load_checkpoint(path, device)
        ref = load_checkpoint(path, device)["model"]
    except CheckpointError as e:
        fail(str(e))
    for p in ref.parameters():
        p.requires_grad_(False)
    return ckpt["model"].eval(), ref.eval(), ckpt["tokenizer"]


@torch.no_grad()
def final_eval(model, ref_model, tok, rm_fn, cfg):
    """Before (the reference = the init) vs after, on the test split: greedy responses scored by
    the RM and the gold judge, gold win rate of after vs before, KL(π || π_ref) in nats per
    response (Σ_t k1 over sampled tokens, at the training temperature)."""
    import evaluate
    task_list = tasks.eval_tasks("test", cfg["eval_tasks"])
    prompts = [t.prompt for t in task_list]
    before, len0 = evaluate.respond(ref_model, tok, task_list)
    after, len1 = evaluate.respond(model, tok, task_list)
    m = {f"{k}_init": v for k, v in evaluate.score_responses(task_list, before, len0).items()}
    m.update(evaluate.score_responses(task_list, after, len1))
    m["gold_winrate_vs_init"] = evaluate.gold_winrate(task_list, after, before)
    m["gold_winrate_vs_init_t1"] = evaluate.gold_winrate(task_list, evaluate.sample_texts(model, tok, task_list),
                                                         evaluate.sample_texts(ref_model, tok, task_list))
    if rm_fn is not None:
        m["rm_score_init"], m["rm_score"] = rm_fn(prompts, before).mean().item(), rm_fn(prompts, after).mean().item()
    batch = rollout(model, tok, prompts, 1, cfg["max_new_tokens"], cfg["temperature"])
    lp, ref_lp = batched_logprobs(model, batch, cfg["temperature"]), batched_logprobs(ref_model, batch, cfg["temperature"])
    m["kl_to_ref"] = ((lp - ref_lp) * batch["resp_mask"]).sum(1).mean().item()
    return m


def print_before_after(stage, m, wall):
    rm = f"RM score {m['rm_score_init']:.3f} -> {m['rm_score']:.3f}, " if "rm_score" in m else ""
    print(f"{stage}: {rm}gold score {m['gold_score_init']:.3f} -> {m['gold_score']:.3f}, gold win rate vs init "
          f"{m['gold_winrate_vs_init']:.3f} (samples at T=1: {m['gold_winrate_vs_init_t1']:.3f}), "
          f"KL to ref {m['kl_to_ref']:.3f} nats/response, "
          f"length {m['mean_len_init']:.1f} -> {m['mean_len']:.1f}, train {m['train_s']:.0f}s, total {wall:.0f}s")


# ----------------------------------------------------------------------------- main: the GRPO loop

def untimed(name):
    """The phase timer main runs with: it times nothing (no extra host syncs)."""
    return contextlib.nullcontext()


def phase_timer(device):
    """(timer, seconds): `with timer("rollout"):` adds the block's wall time to seconds["rollout"].
    CUDA is synchronised at both ends, so each phase is charged its own kernels (for bench.py)."""
    seconds, sync = {}, torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    @contextlib.contextmanager
    def timer(name):
        sync()
        t0 = time.perf_counter()
        yield
        sync()
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
    return timer, seconds


def rank_chunks(n, chunk, rank, world):
    """This rank's (start, stop) slices of a step's n prompts: chunks of `chunk` prompts dealt out
    round-robin (chunk 0: one chunk of n / world prompts per rank)."""
    c = chunk or -(-n // world)
    return [(lo, min(lo + c, n)) for lo in range(0, n, c)][rank::world]


def sample_chunk(model, tok, prompts, reward_fn, cfg, seed, timer=untimed):
    """Sample and score one chunk of prompts on its own, from its own generator: its responses and
    rewards are a function of (weights, prompts, seed) only, bitwise, whichever rank samples it.
    (Sampled together with other prompts, rows would share one random stream and their padding.)"""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with timer("rollout"):
        batch = rollout(model, tok, prompts, cfg["group_size"], cfg["max_new_tokens"], cfg["temperature"],
                        cfg["top_k"], cfg["top_p"], generator=gen)
    with timer("reward"):
        rewards = score(reward_fn, batch, cfg["missing_eos_penalty"])
    return batch, rewards


def sample_groups(model, tok, prompts, reward_fn, cfg, step, rank=0, world=1, timer=untimed):
    """Rollout + reward of this rank's share of the step's groups.

    DDP equivalence: every rank draws the same prompt list and takes its chunks of it (rank_chunks);
    each chunk is sampled from a generator seeded by its position (sample_chunk), and its rows are
    named by that position (uid, for update's minibatches). So the ranks' groups together are
    exactly one process's groups whenever the chunk boundaries do not move with the world size:
    --rollout-chunk c with c dividing prompts_per_step / world (0, one chunk per rank, is fastest
    but ties the samples to the world size).
    With dynamic sampling (DAPO §3.2) groups whose rewards are all equal carry no gradient: drop
    them and draw fresh prompts until the batch is full over all ranks (the kept count is
    all-reduced) or ds_max_tries rollouts were made. Returns (batch, rewards, fraction of groups dropped).
    """
    G, n_want, device = cfg["group_size"], cfg["prompts_per_step"], next(model.parameters()).device
    parts, first, kept, seen = [], None, 0, 0
    for attempt in range(cfg["ds_max_tries"] if cfg["dynamic_sampling"] else 1):
        step_prompts = draw_prompts(prompts, n_want - kept, cfg["seed"], step, 0, attempt)  # the same on every rank
        last, new = [], 0
        for lo, hi in rank_chunks(len(step_prompts), cfg["rollout_chunk"], rank, world):
            seed = (((cfg["seed"] * 1_000_003 + step) * 101 + attempt) * 100_003 + lo) * 7 + 3
            batch, r = sample_chunk(model, tok, step_prompts[lo:hi], reward_fn, cfg, seed, timer)
            batch["uid"] = torch.arange(lo * G, hi * G, device=device) + attempt * n_want * G  # unique in the step
            last.append((batch, r))
            if cfg["dynamic_sampling"]:
                varied = (r.view(-1, G) != r.view(-1, G)[:, :1]).any(1).repeat_interleave(G)
                batch, r = select_rows(batch, varied.nonzero().flatten()), r[varied]
            if len(r):
                parts.append((batch, r))
            new += len(r) // G
        first = first or last
        seen += len(step_prompts)
        kept += int(all_reduce_sum(torch.tensor([new], device=device))[0])
        if kept >= n_want:
            break
    if kept == 0:  # every group tied on every rank: train on the last rollout anyway (zero advantages)
        parts = last
    elif not parts:  # the kept groups are all on other ranks: one masked-out group keeps DDP in step
        batch, r = first[0]
        batch = select_rows(batch, torch.arange(G, device=device))
        batch.update(resp_mask=torch.zeros_like(batch["resp_mask"]),
                     live=torch.zeros(G, dtype=torch.bool, device=device))
        parts = [(batch, r[:G])]
    batch = concat_rollouts([b for b, _ in parts], tok.pad_id) if len(parts) > 1 else parts[0][0]
    return batch, torch.cat([r for _, r in parts]), 1 - kept / seen


def grpo_step(model, train_model, ref_model, opt, tok, prompts, reward_fn, task_of, cfg, step, rank=0, world=1,
              timer=untimed):
    """One GRPO step on this rank; returns the metrics row main logs. model is the policy,
    train_model the same, DDP-wrapped when world > 1. timer times the phases (bench.py)."""
    G, T = cfg["group_size"], cfg["temperature"]
    set_lr(opt, lr_at(step, cfg["steps"], cfg["lr"], cfg["warmup"], min_ratio=1.0))  # constant after warmup
    # 1. G samples for each of this rank's prompts, scored by the reward model
    batch, rewards, dropped = sample_groups(model, tok, prompts, reward_fn, cfg, step, rank, world, timer)
    # 2. advantages: relative to the group (whitened over the batch for REINFORCE++; placed where
    #    the group's responses part for tree)
    adv_tok = token_advantages(rewards, batch, cfg["advantage"], G)
    # 3. the clipped objective, μ times over the batch; KL(π || π_ref) measured always (the
    #    over-optimisation x-axis), in the loss only when --kl is not off
    with timer("logprobs"):
        ref_logp = batched_logprobs(ref_model, batch, T, cfg["micro_batch"], cfg["dtype"])
        # π_old = the sampling policy; with μ = 1 and one minibatch, update uses its live forward, detached
        several = cfg["iterations"] > 1 or cfg["minibatches"] > 1
        old_logp = batched_logprobs(model, batch, T, cfg["micro_batch"], cfg["dtype"]) if several else None
    with timer("update"):
        stats = update(train_model, ref_model, opt, batch, adv_tok, cfg, old_logp=old_logp, ref_logp=ref_logp)
    row = dict(stats, **rollout_stats(batch, rewards), lr=opt.param_groups[0]["lr"], logit_scale=logit_scale(model),
               zero_adv_groups=float((rewards.view(-1, G) == rewards.view(-1, G)[:, :1]).all(1).float().mean()),
               ds_dropped=dropped)
    if cfg["reward"] == "rm":
        row["rm_score"] = row["reward"] + cfg["missing_eos_penalty"] * row["truncated"]  # before the EOS penalty
    if (step % cfg["gold_every"] == 0 or step == cfg["steps"] - 1) and task_of:
        with timer("gold_log"):  # the hidden judge, for the log only
            row["gold"] = sum(s["score"] for s in gold_of(task_of, batch)) / len(batch["texts"])
    return row


def main(argv=None, reward_fn=None):
    cfg = parse_config(DEFAULTS, PRESETS, argv, description=__doc__)
    if cfg["advantage"] not in ADVANTAGES or cfg["loss_agg"] not in LOSS_AGG or cfg["kl"] not in ("k1", "k2", "k3", "off"):
        fail(f"--advantage {ADVANTAGES}, --loss-agg {LOSS_AGG}, --kl k1|k2|k3|off; got "
             f"{cfg['advantage']!r}, {cfg['loss_agg']!r}, {cfg['kl']!r}")
    device, rank, world = setup(cfg)
    if not rank_chunks(cfg["prompts_per_step"], cfg["rollout_chunk"], world - 1, world):
        fail(f"--prompts-per-step {cfg['prompts_per_step']} in chunks of --rollout-chunk {cfg['rollout_chunk']} "
             f"leaves rank {world - 1} of {world} without prompts")
    t0 = time.time()
    model, ref_model, tok = load_policy(cfg["init"], device)
    prompts, task_of = load_prompts(cfg)
    reward_fn = reward_fn or make_reward(cfg, task_of, device)  # any callable(prompts, texts) -> (B,) works
    opt = make_optimizer(model, cfg["lr"], cfg["weight_decay"], device=device, final_norm_lr=cfg["final_norm_lr"])
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    log = MetricLog(cfg["out"], "grpo", enabled=rank == 0)

    for step in (bar := tqdm(range(cfg["steps"]), disable=rank != 0, desc="grpo")):
        row = grpo_step(model, train_model, ref_model, opt, tok, prompts, reward_fn, task_of, cfg, step, rank, world)
        log.log(step, **row)
        bar.set_postfix(r=f"{row['reward']:.2f}", kl=f"{row['kl_seq']:.2f}", len=f"{row['length']:.0f}")

    train_s = time.time() - t0
    if rank != 0:
        return
    save = lambda metrics: save_checkpoint(cfg["out"], model, tok, "grpo", parent=cfg["init"], config=cfg,
                                           metrics=metrics, optimizer=opt, step=cfg["steps"])
    save(dict(train_s=train_s))  # the trained policy is safe before the (slow) evaluation starts
    rm_fn = reward_fn if cfg["reward"] == "rm" else None
    metrics = dict(final_eval(model, ref_model, tok, rm_fn, cfg) if cfg["eval_tasks"] else {}, train_s=train_s)
    metrics["wall_s"] = time.time() - t0
    save(metrics)
    if cfg["eval_tasks"]:
        print_before_after("grpo", metrics, metrics["wall_s"])


if __name__ == "__main__":
    main()
