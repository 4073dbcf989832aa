"""Direct preference optimisation and its cousins: learn from preference pairs with no reward
model and no sampling in the loop.

    python dpo.py [--init out/sft.pt] [--out out/dpo.pt] [--loss dpo|ipo|cdpo|robust|hinge|kto|simpo|orpo]
                  [--data prefs.jsonl] [--preset tiny|cpu|gpu]

Data: gold-labelled pairs sampled from the init model (reward.sample_preference_pairs: 4 samples
per prompt, all 6 comparisons, the same pairs reward.py trains the reward model on, so DPO and
RLHF learn from one preference dataset; measured against 2 samples' one pair per prompt: sampled
win rate vs SFT 0.59 -> 0.63, over-refusal 0.14 -> 0.05), or --data in the preference format
{"prompt", "chosen", "rejected"}, or for KTO the unpaired format {"prompt", "completion",
"label"}. The implicit reward of a response is
beta * (log pi(y|x) - log pi_ref(y|x)) (DPO, Rafailov et al. 2023, sec. 5). The reference is the
frozen init model: the policy starts as that model, so its log-probs are computed once with the
policy before the first step and no second network is kept in memory.

Sequence log-probs are summed over the completion's own tokens (tool outputs excluded). SimPO
and ORPO use the per-token average, as their papers define. IPO uses the sums, as the paper
(Azar et al. define h on whole sequences); TRL averages per token instead, which makes the target
margin 1/(2 beta) a per-token one (5 nats per token at beta 0.1: far from the reference), so the
same beta would not serve both.
"""
import contextlib
import math
import os
import random
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import evaluate
import tasks
from common import MetricLog, all_reduce_sum, autocast, fail, lr_at, make_optimizer, parse_config, set_lr, setup
from data import DataError, pad, read_jsonl, render_prompt
from model import CheckpointError, load_checkpoint, save_checkpoint, sequence_logprobs
from reward import load_pairs, render_response, sample_preference_pairs, write_pairs

LOSSES = ("dpo", "ipo", "cdpo", "robust", "hinge", "kto", "simpo", "orpo")
DEFAULTS = dict(
    init="out/sft.pt", out="out/dpo.pt", data=None, loss="dpo", n_prompts=1600, samples=4, pairing="all",
    temperature=1.0,
    label_noise=0.0, beta=0.3, label_smoothing=0.1, simpo_gamma=0.5, kto_lambda_d=1.0, kto_lambda_u=1.0,
    rpo_alpha=1.0, batch_size=32, micro_batches=4, epochs=2, lr=1e-5, warmup=10, weight_decay=0.0, grad_clip=1.0,
    eval_tasks=50, seed=0, device="auto", dtype="bf16",
)
PRESETS = dict(
    tiny=dict(n_prompts=24, batch_size=4, epochs=1, warmup=1, eval_tasks=2),
    cpu=dict(),
    gpu=dict(n_prompts=2400, batch_size=64, epochs=3, lr=1e-4, warmup=20, eval_tasks=100),
)


# ----------------------------------------------------------------------------- losses

def dpo_loss(h, beta):
    """DPO (Rafailov et al. 2023, eq. 7): L = -log sigmoid(beta * h), where
    h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)).
    dL/dlog pi(y_w) = -beta * sigmoid(-beta h). h = 0 gives log 2."""
    return -F.logsigmoid(beta * h)


def cdpo_loss(h, beta, eps):
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"; TRL's label
    smoothing): each label is right with probability 1 - eps, so the target is soft:
    L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h). h = 0 gives log 2."""
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


def robust_loss(h, beta, eps):
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO", eq. 8): an unbiased estimate of
    the clean-label loss under flip rate eps < 1/2:
    L = [(1 - eps) l(h) - eps l(-h)] / (1 - 2 eps), with l(h) = -log sigmoid(beta h).
    h = 0 gives log 2."""
    return ((1 - eps) * -F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


def ipo_loss(h, beta):
    """IPO (Azar et al. 2023, eq. 17, tau = beta): L = (h - 1/(2 beta))^2, a squared loss that
    pulls the log-ratio margin to a finite target instead of pushing it to infinity.
    h = 0 gives (1/(2 beta))^2."""
    return (h - 1 / (2 * beta)) ** 2


def hinge_loss(h, beta):
    """Hinge / SLiC (Zhao et al. 2023, SLiC-HF eq. 1, on DPO's log-ratios as in TRL):
    L = max(0, 1 - beta h): zero once the margin exceeds 1/beta. h = 0 gives 1."""
    return torch.relu(1 - beta * h)


def simpo_loss(avg_chosen, avg_rejected, beta, gamma):
    """SimPO (Meng et al. 2024, eq. 6), reference-free, on per-token average log-probs:
    L = -log sigmoid(beta * avg log pi(y_w) - beta * avg log pi(y_l) - gamma).
    Equal averages give log(1 + e^gamma)."""
    return -F.logsigmoid(beta * (avg_chosen - avg_rejected) - gamma)


def orpo_loss(avg_chosen, avg_rejected, lam):
    """ORPO (Hong et al. 2024, eqs. 6-7), reference-free: SFT on the chosen response plus an
    odds-ratio penalty, with P(y|x) = exp(average token log-prob) and odds(y) = P / (1 - P):
    L = -avg log pi(y_w) - lam * log sigmoid(log odds(y_w) - log odds(y_l)).
    Equal averages a give -a + lam log 2."""
    def log_odds(a):  # log P - log(1 - P); P < 1 strictly, or log(1 - P) is -inf
        a = a.clamp(max=-1e-6)
        return a - torch.log(-torch.expm1(a))
    return -avg_chosen - lam * F.logsigmoid(log_odds(avg_chosen) - log_odds(avg_rejected))


def kto_loss(logratio, desirable, z0, beta, lambda_d=1.0, lambda_u=1.0):
    """KTO (Ethayarajh et al. 2024, eq. 8) on unpaired examples, per example:
    r = log pi(y|x) - log pi_ref(y|x), z0 = the reference point (kto_reference_point),
    v = lambda_D sigmoid(beta (r - z0)) if y is desirable, lambda_U sigmoid(beta (z0 - r)) if not,
    L = lambda_y - v. r = z0 gives lambda_y / 2."""
    lam = torch.where(desirable, torch.full_like(logratio, lambda_d), torch.full_like(logratio, lambda_u))
    v = lam * torch.sigmoid(beta * torch.where(desirable, logratio - z0, z0 - logratio))
    return lam - v


def kto_reference_point(kl_logratio):
    """KTO's z0 (Ethayarajh et al. 2024, sec. 4.1): an estimate of KL(pi || pi_ref) from
    MISMATCHED pairs (prompt x_i with a completion y_j, j != i, so it measures drift in general
    and not the rise of the very completions being trained on), averaged over the global batch,
    clamped at 0 (a KL is never negative) and detached (no gradient flows through z0)."""
    stats = all_reduce_sum(torch.stack([kl_logratio.detach().float().sum(),
                                        torch.tensor(float(kl_logratio.numel()), device=kl_logratio.device)]))
    return (stats[0] / stats[1]).clamp(min=0)


def preference_loss(policy_chosen_logp, policy_rejected_logp, ref_chosen_logp=None, ref_rejected_logp=None,
                    beta=0.1, loss="dpo", label_smoothing=0.0, gamma=0.5, chosen_len=None, rejected_len=None):
    """Per-pair loss (B,) of a paired preference method from sequence log-probs (summed over the
    completion tokens). chosen_len / rejected_len (token counts) are needed by the reference-free,
    length-normalised methods (SimPO, ORPO); they ignore the ref_* arguments. label_smoothing is
    eps of cdpo / robust; gamma is SimPO's margin. KTO is unpaired: see kto_loss.

    Example: preference_loss(t([-1.]), t([-1.]), t([-1.]), t([-1.]), beta=0.1) = [log 2].
    """
    if loss == "simpo":
        return simpo_loss(policy_chosen_logp / chosen_len, policy_rejected_logp / rejected_len, beta, gamma)
    if loss == "orpo":
        return orpo_loss(policy_chosen_logp / chosen_len, policy_rejected_logp / rejected_len, beta)
    h = (policy_chosen_logp - ref_chosen_logp) - (policy_rejected_logp - ref_rejected_logp)
    if loss == "dpo":
        return dpo_loss(h, beta)
    if loss == "cdpo":
        return cdpo_loss(h, beta, label_smoothing)
    if loss == "robust":
        return robust_loss(h, beta, label_smoothing)
    if loss == "ipo":
        return ipo_loss(h, beta)
    if loss == "hinge":
        return hinge_loss(h, beta)
    raise ValueError(f"unknown paired loss {loss!r}; expected one of {LOSSES} (kto: use kto_loss)")


def implicit_rewards(logp, ref_logp, n, loss, beta):
    """The reward each method implicitly assigns: beta * log-ratio, or for the reference-free
    methods beta * average log-prob (SimPO's reward; ORPO as TRL logs it)."""
    if loss in ("simpo", "orpo"):
        return beta * logp / n
    return beta * (logp - ref_logp)


# ----------------------------------------------------------------------------- sequences

def encode(tok, prompt, completion):
    """-> (prompt ids, completion ids, completion mask). The mask is render_chat's: 1 on the
    policy's own tokens (and each closing <|end|> / <|call|>), 0 on tool outputs and role headers."""
    ids, mask = render_response(tok, prompt, completion)
    n = len(render_prompt(tok, prompt))
    return ids[:n], ids[n:], mask[n:]


def collate(rows, pad_id, device):
    """(prompt ids, completion ids, completion mask) rows -> right-padded ids and a mask that is
    1 on completion tokens only."""
    ids = pad([p + c for p, c, _ in rows], pad_id).to(device)
    mask = pad([[0] * len(p) + m for p, _, m in rows], 0).to(device)
    return ids, mask


def completion_logps(model, ids, mask):
    """Summed log-prob of each row's completion tokens, and how many there are: (B,), (B,).

    logp[:, t] is log p(ids[:, t+1] | ids[:, :t+1]), so the targets' mask is mask[:, 1:]: the
    first completion token (predicted from the prompt's last token) is in, the prompt is out.
    Rows are right padded: causality hides the pads, so no attention mask is needed and the
    result does not depend on the padding or the batch partners.
    """
    m = mask[:, 1:].float()
    return (sequence_logprobs(model, ids) * m).sum(1), m.sum(1)


@torch.no_grad()
def all_logps(model, rows, pad_id, device, dtype, batch_size=64):
    """completion_logps of many rows, in batches of similar lengths (little padding), without grad
    (the reference, computed once); returned in the order given."""
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    logp, n = torch.empty(len(rows), device=device), torch.empty(len(rows), device=device)
    for s in range(0, len(rows), batch_size):
        at = order[s:s + batch_size]
        with autocast(device, dtype):
            logp[at], n[at] = completion_logps(model, *collate([rows[i] for i in at], pad_id, device))
    model.train()
    return logp, n


def mismatched_rows(examples, partner, block_size):
    """KTO's KL batch: prompt i with the completion of partner[i] (cut to fit the context)."""
    rows = []
    for (p, _, _), j in zip(examples, partner):
        room = block_size - len(p)
        rows.append((p, examples[j][1][:room], examples[j][2][:room]))
    return rows


def mismatched_partners(prompts, seed):
    """For KTO's reference point: for each example i an index j with a different prompt.

    Examples are grouped by prompt (groups in random order) and each is paired with the one g
    places further on, g the largest group size: j's prompt then always differs from i's.
    """
    groups = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    order = [i for k in keys for i in groups[k]]
    g = max((len(v) for v in groups.values()), default=1)
    if len(order) < 2 * g:
        raise ValueError(f"KTO needs more distinct prompts: {len(order)} examples, {g} share one prompt")
    partner = [0] * len(order)
    for k, i in enumerate(order):
        partner[i] = order[(k + g) % len(order)]
    return partner


# ----------------------------------------------------------------------------- data

def load_data(cfg, model, tok, rank):
    """-> (pairs or None, unpaired examples or None). Pairs: sampled from the init model, or
    --data in the pref format. KTO: --data in the kto format, or the pairs split into
    chosen -> desirable, rejected -> undesirable."""
    pairs = unpaired = None
    if cfg["data"]:
        if not os.path.exists(cfg["data"]):
            fail(f"{cfg['data']}: no such file")
        with open(cfg["data"], "rb") as f:  # the format is told by the first record's keys
            first = next((line for line in f if line.strip()), b"")
        if b'"label"' in first and b'"completion"' in first:
            if cfg["loss"] != "kto":
                fail(f"{cfg['data']}: unpaired (kto format) data needs --loss kto")
            try:
                unpaired = [(r["prompt"], r["completion"], r["label"]) for r in read_jsonl(cfg["data"], "kto")]
            except DataError as e:
                fail(str(e))
        else:
            pairs = load_pairs(cfg["data"])
    else:
        try:
            pairs = sample_preference_pairs(model, tok, cfg["n_prompts"], cfg["seed"], cfg["temperature"],
                                            cfg["label_noise"], k=cfg["samples"], pairing=cfg["pairing"])
        except tasks.TaskSpaceError as e:
            fail(f"--n-prompts {cfg['n_prompts']}: {e}")
        if rank == 0:
            write_pairs(os.path.join(os.path.dirname(cfg["out"]) or ".", "prefs_dpo.jsonl"), pairs)
    if cfg["loss"] == "kto" and unpaired is None:
        unpaired = [(p["prompt"], c, lab) for p in pairs for c, lab in ((p["chosen"], True), (p["rejected"], False))]
    return pairs, unpaired


# ----------------------------------------------------------------------------- training

def encode_pairs(tok, pairs, block_size):
    """Pairs -> (chosen rows, rejected rows, prompts), dropping pairs that don't fit the context and
    pairs with a side the policy wrote no token of (a sample that opens with a stray <|tool|> is all
    tool output to the chat template): its log-prob would be an empty sum."""
    rows = [(encode(tok, p["prompt"], p["chosen"]), encode(tok, p["prompt"], p["rejected"]), p["prompt"])
            for p in pairs]
    rows = [r for r in rows if max(len(x[0]) + len(x[1]) for x in r[:2]) <= block_size
            and min(sum(x[2]) for x in r[:2]) > 0]
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def paired_step(model, cfg, chosen, rejected, ref_c, ref_r, idx, pad_id, device):
    """Per-pair losses of one batch, and the log-probs / lengths behind them."""
    # ONE forward for chosen and rejected: rows [chosen..., rejected...]
    ids, mask = collate([chosen[i] for i in idx] + [rejected[i] for i in idx], pad_id, device)
    with autocast(device, cfg["dtype"]):
        logp, n = completion_logps(model, ids, mask)
    lc, lr, nc, nr = *logp.chunk(2), *n.chunk(2)
    rc, rr = (None, None) if ref_c is None else (ref_c[idx], ref_r[idx])
    losses = preference_loss(lc, lr, rc, rr, cfg["beta"], cfg["loss"], cfg["label_smoothing"],
                             cfg["simpo_gamma"], nc, nr)
    if cfg["rpo_alpha"]:  # RPO (Pang et al. 2024, eq. 1): + alpha * per-token NLL of the chosen
        losses = losses - cfg["rpo_alpha"] * lc / nc
    return losses, (lc, lr, rc, rr, nc, nr)


@torch.no_grad()  # z0 carries no gradient, so its forward keeps no graph
def kto_batch_z0(model, cfg, kl_rows, ref_kl, idx, pad_id, device):
    """KTO's reference point z0 of one (global) batch, from its mismatched pairs."""
    with autocast(device, cfg["dtype"]):
        kl_logp, _ = completion_logps(model, *collate([kl_rows[i] for i in idx], pad_id, device))
    return kto_reference_point(kl_logp - ref_kl[idx])


def kto_step(model, cfg, examples, labels, ref, z0, idx, pad_id, device):
    """Per-example KTO losses of (part of) a batch whose reference point is z0, and its log-probs."""
    with autocast(device, cfg["dtype"]):
        logp, _ = completion_logps(model, *collate([examples[i] for i in idx], pad_id, device))
    losses = kto_loss(logp - ref[idx], labels[idx], z0, cfg["beta"], cfg["kto_lambda_d"], cfg["kto_lambda_u"])
    return losses, (logp, ref[idx], labels[idx])


@torch.no_grad()
def paired_stats(kind, beta, lc, lr, rc, rr, nc, nr):
    """What DPO papers report: implicit rewards of both sides, their accuracy and margin, log-probs."""
    cr, rj = implicit_rewards(lc, rc, nc, kind, beta), implicit_rewards(lr, rr, nr, kind, beta)
    return dict(rewards_chosen=cr.mean().item(), rewards_rejected=rj.mean().item(),
                reward_acc=(cr > rj).float().mean().item(), margin=(cr - rj).mean().item(),
                logps_chosen=lc.mean().item(), logps_rejected=lr.mean().item())


@torch.no_grad()
def kto_stats(beta, z0, logp, ref, lab):
    """KTO's: the reference point (KL estimate) and the rewards of desirable / undesirable examples."""
    r = beta * (logp - ref)
    mean = lambda x: x.mean().item() if len(x) else 0.0
    out = dict(kl=z0.item(), rewards_chosen=mean(r[lab]), rewards_rejected=mean(r[~lab]),
               logps_chosen=mean(logp[lab]), logps_rejected=mean(logp[~lab]))
    out["margin"] = out["rewards_chosen"] - out["rewards_rejected"]
    return out


def main(argv=None):
    cfg = parse_config(DEFAULTS, PRESETS, argv, description=__doc__)
    if cfg["loss"] not in LOSSES:
        fail(f"--loss {cfg['loss']!r}: expected one of {', '.join(LOSSES)}")
    device, rank, world = setup(cfg)
    t0 = time.time()
    try:
        ckpt = load_checkpoint(cfg["init"], device)
    except CheckpointError as e:
        fail(str(e))
    model, tok = ckpt["model"], ckpt["tokenizer"]
    kind, beta, block, dtype, pad_id = cfg["loss"], cfg["beta"], model.config.block_size, cfg["dtype"], tok.pad_id
    paired, ref_free = kind != "kto", kind in ("simpo", "orpo")

    pairs, unpaired = load_data(cfg, model, tok, rank)
    # the init model's greedy answers to the test tasks, for the final win rate (before any step)
    test = tasks.eval_tasks("test", cfg["eval_tasks"]) if cfg["eval_tasks"] else []
    init_texts, init_lens = evaluate.respond(model.eval(), tok, test) if test else ([], [])
    init_sampled = evaluate.sample_texts(model, tok, test) if test else []

    # reference log-probs, once: the policy IS the reference before its first step
    ref_c = ref_r = None
    if pairs is not None:
        chosen, rejected, prompts = encode_pairs(tok, pairs, block)
        n_c, n_r = (torch.tensor([float(sum(x[2])) for x in side], device=device) for side in (chosen, rejected))
        if not ref_free:
            ref_c, _ = all_logps(model, chosen, pad_id, device, dtype)
            ref_r, _ = all_logps(model, rejected, pad_id, device, dtype)
    if paired:
        examples = chosen  # one index per pair
    else:  # KTO: chosen -> desirable, rejected -> undesirable, or the unpaired file as it is
        if pairs is not None:
            examples, prompts, ref = chosen + rejected, prompts + prompts, torch.cat([ref_c, ref_r])
            labels = [True] * len(chosen) + [False] * len(rejected)
        else:
            rows = [(encode(tok, p, c), lab, p) for p, c, lab in unpaired]
            rows = [r for r in rows if len(r[0][0]) + len(r[0][1]) <= block]
            examples, labels, prompts = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
            ref, _ = all_logps(model, examples, pad_id, device, dtype)
        labels = torch.tensor(labels, dtype=torch.bool, device=device)
        try:
            kl_rows = mismatched_rows(examples, mismatched_partners(prompts, cfg["seed"]), block)
        except ValueError as e:
            fail(str(e))
        ref_kl, _ = all_logps(model, kl_rows, pad_id, device, dtype)
    if len(examples) < 2:
        fail(f"only {len(examples)} usable examples (ties dropped, too-long ones skipped): need at least 2")
    # the padded width each index needs (a pair: its longer side), for the micro-batches
    sides = (chosen, rejected) if paired else (examples,)
    length = [max(len(side[i][0]) + len(side[i][1]) for side in sides) for i in range(len(examples))]
    if rank == 0:
        print(f"dpo[{kind}]: {len(examples)} {'pairs' if paired else 'examples'}, "
              f"data+reference {time.time() - t0:.0f}s")

    model.train()
    opt = make_optimizer(model, cfg["lr"], cfg["weight_decay"], device=device)
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    log = MetricLog(cfg["out"], "dpo", enabled=rank == 0)
    B = cfg["batch_size"]
    per_epoch = math.ceil(len(examples) / B)
    steps = cfg["epochs"] * per_epoch
    bar = tqdm(range(steps), disable=rank != 0, desc=f"dpo[{kind}]")
    for step in bar:
        set_lr(opt, lr_at(step, steps, cfg["lr"], cfg["warmup"]))
        # the batch depends only on (seed, epoch, step): every rank takes its slice of the same one
        epoch, k = divmod(step, per_epoch)
        perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + epoch))
        idx = perm[k * B:(k + 1) * B][rank::world].tolist()
        n_global = all_reduce_sum(torch.tensor(float(len(idx)), device=device))
        if not paired:  # KTO's z0 is a statistic of the whole batch, not of a micro-batch
            z0 = kto_batch_z0(model, cfg, kl_rows, ref_kl, idx, pad_id, device)
        # micro-batches of similar lengths: half the padding of one mixed batch, and the same
        # gradient, since every micro-batch's summed loss is divided by the global batch size
        idx.sort(key=lambda i: length[i])
        M = cfg["micro_batches"]
        parts = [p for p in (idx[j * len(idx) // M:(j + 1) * len(idx) // M] for j in range(M)) if p]
        loss, outs = 0.0, []
        for j, part in enumerate(parts):
            last = j == len(parts) - 1 or world == 1
            with contextlib.nullcontext() if last else train_model.no_sync():  # DDP: one all-reduce per step
                if paired:
                    losses, out = paired_step(train_model, cfg, chosen, rejected, ref_c, ref_r, part, pad_id, device)
                else:
                    losses, out = kto_step(train_model, cfg, examples, labels, ref, z0, part, pad_id, device)
                part_loss = losses.sum() / (n_global / world)  # x world: DDP averages gradients
                part_loss.backward()
            loss, outs = loss + part_loss.detach(), outs + [out]
        out = [None if t[0] is None else torch.cat(t) for t in zip(*outs)]  # ref-free: no ref log-probs
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            row = dict(loss=loss.item(), grad_norm=norm.item(), lr=opt.param_groups[0]["lr"])
            row.update(paired_stats(kind, beta, *out) if paired else kto_stats(beta, z0, *out))
            log.log(step, **row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", margin=f"{row['margin']:.2f}")

    # final numbers: implicit-reward accuracy on the training pairs; gold win rate vs the init model
    metrics = dict(loss_type=kind, n_examples=len(examples), train_steps=steps)
    if pairs is not None:
        pc, _ = all_logps(model, chosen, pad_id, device, dtype)
        pr, _ = all_logps(model, rejected, pad_id, device, dtype)
        s = paired_stats(kind, beta, pc, pr, ref_c, ref_r, n_c, n_r)
        metrics.update(train_reward_acc=s["reward_acc"], train_margin=s["margin"])
    if rank == 0 and test:
        texts, lens = evaluate.respond(model.eval(), tok, test)
        metrics["gold_winrate_vs_sft"] = evaluate.gold_winrate(test, texts, init_texts)
        metrics["gold_winrate_vs_sft_t1"] = evaluate.gold_winrate(test, evaluate.sample_texts(model, tok, test),
                                                                  init_sampled)
        metrics.update(evaluate.score_responses(test, texts, lens))
        metrics.update({f"init_{k}": v for k, v in evaluate.score_responses(test, init_texts, init_lens).items()})
    metrics["params"] = model.num_params()
    metrics["wall_s"] = time.time() - t0
    if rank == 0:
        log.log(steps, **{k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        save_checkpoint(cfg["out"], model, tok, "dpo", parent=cfg["init"], config=cfg, metrics=metrics,
                        optimizer=opt, step=steps)
        print(f"dpo[{kind}]: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)))


if __name__ == "__main__":
    main()
