"""Reward model: a Bradley-Terry scorer of responses, trained on gold-labelled preference pairs.

The pairs come from the SFT model itself: --samples K per train prompt at temperature 1, ranked
by the hidden gold judge, every pair of them a comparison (--pairing all; ties dropped). A batch is
--batch-size whole prompts with all their pairs, each response scored once (InstructGPT's
batching). The reward model is the SFT network plus a scalar head; it reads one number at the
last real token of prompt+response and learns P(chosen beats rejected) = sigmoid(r_c - r_r). Its
output is then normalised to mean 0 / std 1 over SFT samples, so PPO / GRPO see rewards on a
known scale. --loglik-coef alpha adds alpha x the response's log-likelihood under the network's
own language-model head to the score (off by default; reward_scores says what it measured).

    python reward.py [--init out/sft.pt] [--out out/rm.pt] [--data prefs.jsonl] [--preset tiny|cpu|gpu]

Other stages use it through `load_reward_model(path)(prompts, responses) -> rewards`.
"""
import contextlib
import dataclasses
import json
import os
import random
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import tasks
from common import MetricLog, all_reduce_sum, autocast, fail, lr_at, make_optimizer, parse_config, set_lr, setup
from data import DataError, pad, read_jsonl, render_chat, response_messages
from model import GPT, CheckpointError, load_checkpoint, save_checkpoint, token_logprobs

DEFAULTS = dict(
    init="out/sft.pt", out="out/rm.pt", data=None, n_prompts=1600, n_val_prompts=280, val_frac=0.1,
    samples=4, pairing="all", temperature=1.0, label_noise=0.0, batch_size=8, micro_batches=2, epochs=3, lr=3e-4, warmup=10,
    weight_decay=0.0, grad_clip=1.0, margin=0.0, center_coef=0.01, loglik_coef=0.0, seed=0, device="auto", dtype="bf16",
)
PRESETS = dict(
    tiny=dict(n_prompts=24, n_val_prompts=8, batch_size=4, epochs=1, warmup=1),
    cpu=dict(),
    gpu=dict(n_prompts=2400, n_val_prompts=280, batch_size=16, epochs=3, lr=3e-4, warmup=20),
)


# ----------------------------------------------------------------------------- preference pairs

def sample_preference_pairs(model, tok, n_prompts, seed, temperature=1.0, label_noise=0.0, split="train",
                            k=2, pairing="all"):
    """Gold-labelled pairs from the model's own samples -> list of dict(prompt, chosen, rejected, family).

    n_prompts prompts of `split`, an equal share from each task family; k samples per prompt
    (the calculator runs while sampling, so tool responses hold the tool turns as special-token
    text, exactly as data.generate_responses decodes them), ranked by the gold judge. pairing:
      all         every one of the k(k-1)/2 comparisons (InstructGPT, Ouyang et al. 2022, sec. 3.5:
                  ranking k responses yields k choose 2 pairs for the cost of k samples)
      best_worst  the best against the worst sample only: one pair per prompt with the widest gold
                  margin (the on-policy preference data of Tulu 3 / Llama 3 style DPO)
    chosen = the higher gold score; ties carry no preference and are dropped; with probability
    label_noise a pair is flipped (noisy annotators, for studying cDPO / robust DPO).
    """
    import evaluate  # lazy: evaluate imports the stage scripts' world, not the other way round
    if pairing not in ("all", "best_worst"):
        raise ValueError(f"pairing must be all or best_worst, got {pairing!r}")
    shares = [n_prompts // len(tasks.FAMILIES) + (i < n_prompts % len(tasks.FAMILIES))
              for i in range(len(tasks.FAMILIES))]
    task_list = [t for f, n in zip(tasks.FAMILIES, shares) if n for t in tasks.make_tasks(f, split, n, seed)]
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    texts, _ = evaluate.respond(model.eval(), tok, task_list, temperature, n=k, generator=g)
    gold = [x["score"] for x in tasks.gold_scores([t for t in task_list for _ in range(k)], texts)]
    rng = random.Random(f"label-noise-{seed}")
    pairs = []
    for i, task in enumerate(task_list):
        group = sorted(zip(gold[k * i:k * (i + 1)], texts[k * i:k * (i + 1)]), key=lambda x: -x[0])
        if pairing == "best_worst":
            candidates = [(group[0], group[-1])]
        else:
            candidates = [(group[a], group[b]) for a in range(k) for b in range(a + 1, k)]
        for (sa, a), (sb, b) in candidates:
            if abs(sa - sb) < 1e-9:
                continue
            if rng.random() < label_noise:
                a, b = b, a
            pairs.append(dict(prompt=task.prompt, chosen=a, rejected=b, family=task.family))
    return pairs


def write_pairs(path, pairs):
    """The pairs in the preference JSONL format (family kept as an extra field), for inspection
    and for reuse with --data."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for p in pairs:
            f.write(json.dumps(p) + "\n")


def load_pairs(path):
    """--data: preference JSONL, validated line by line (a bad line exits naming file:line)."""
    if not os.path.exists(path):
        fail(f"{path}: no such file")
    try:
        records = read_jsonl(path, "pref")
    except DataError as e:
        fail(str(e))
    return [dict(prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"], family=str(r.get("family", "data")))
            for r in records]


# ----------------------------------------------------------------------------- sequences

def render_response(tok, prompt, response):
    """(prompt, decoded response) -> render_chat's (ids, mask) of the whole conversation.

    response_messages turns '..<|call|><|tool|>R<|end|><|assistant|>..' text back into turns, so
    the tool tokens become the real special tokens the sampler produced (not the ordinary tokens
    of the string '<|call|>'), and the tool output gets mask 0.
    """
    return render_chat(tok, [{"role": "user", "content": prompt}] + response_messages(response))


def encode_pairs(tok, pairs, block_size):
    """Render both sides of every pair; drop (and count) pairs that don't fit the context."""
    out = []
    for p in pairs:
        c, r = render_response(tok, p["prompt"], p["chosen"]), render_response(tok, p["prompt"], p["rejected"])
        if max(len(c[0]), len(r[0])) <= block_size:
            out.append(dict(chosen=c[0], rejected=r[0], chosen_mask=c[1], rejected_mask=r[1],
                            family=p.get("family", "data"), prompt=str(p["prompt"])))
    return out, len(pairs) - len(out)


def last_token_scores(model, ids, lengths, hidden=None):
    """The scalar head read at the last real token of each right-padded row: (B,).

    Right padding needs no attention mask (causality hides the pads from every real token) and
    the last real token is the only one that has seen the whole response. hidden: model(ids),
    when the caller has it already. model may be DDP-wrapped (the forward goes through the
    wrapper, the heads are read from the module inside).
    """
    net = getattr(model, "module", model)
    scores = net.score(model(ids) if hidden is None else hidden).float()
    return scores.gather(1, (lengths - 1)[:, None]).squeeze(1)


def reward_scores(model, ids, lengths, mask, loglik_coef=0.0):
    """The reward model's score of each right-padded row (B,):

        r(x, y) = w . h_last + b  +  alpha * sum_t log p(y_t | x, y_<t)

    the scalar head at the last real token plus alpha times the log-likelihood of the response
    tokens (mask: render_chat's loss mask, 1 on assistant tokens) under the network's own
    language-model head. alpha = 0 (the default) is the classic last-token reward model.

    Why the option exists, and why it is off. Trained alone, the head never learns to check
    arithmetic: held-out pairs that differ only in a math answer's correctness score 50%, chance,
    though the SFT network's own likelihood ranks them right 83% of the time. With alpha = 0.2
    (Bradley-Terry's gradient reaching the LM head too) those pairs reach 75% and 563 held-out
    pairs 0.85 overall (0.81-0.83 without, three seeds). But GRPO against that reward model lowers
    greedy test math 0.78 -> 0.54 and tool accuracy 1.00 -> 0.84: the policy finds what the
    reward model's retrained language model finds likely. A more accurate proxy is not a safer
    one to optimise.
    """
    hidden = model(ids)  # one forward for both terms
    r = last_token_scores(model, ids, lengths, hidden)
    if loglik_coef:
        lm_head = getattr(model, "module", model).lm_head  # DDP wraps the model in .module
        logp = token_logprobs(hidden[:, :-1], lm_head.weight, ids[:, 1:])
        r = r + loglik_coef * (logp * mask[:, 1:]).sum(1)
    return r


def bt_loss(r_chosen, r_rejected, margin=0.0, center_coef=0.0):
    """Bradley-Terry reward-model loss per pair:

        L = -log sigmoid(r_c - r_r - m) + eta * (r_c + r_r)^2

    The first term is the BT likelihood (Bradley & Terry 1952; InstructGPT, Ouyang et al. 2022,
    eq. 1) with an optional margin m (Llama 2, Touvron et al. 2023, eq. 2). The second is reward
    centring (Eisenstein et al. 2023, "Helping or Herding?"): BT only sees differences, so
    without it the scores drift by an arbitrary offset per prompt. Equal scores of 0 give log 2.
    """
    return -F.logsigmoid(r_chosen - r_rejected - margin) + center_coef * (r_chosen + r_rejected) ** 2


def prompt_groups(encoded):
    """Indices of the pairs of each prompt, prompts in first-seen order."""
    groups = {}
    for i, e in enumerate(encoded):
        groups.setdefault(e["prompt"], []).append(i)
    return list(groups.values())


def side_batch(encoded, idx, pad_id, device):
    """The distinct responses of pairs idx, right padded, their lengths, and the row of each
    pair's chosen and rejected side. Batches hold whole prompts, so a prompt's K samples take K
    rows, not K(K-1): InstructGPT's batching of all a prompt's comparisons as one element
    (Ouyang et al. 2022, sec. 3.5), which also keeps a response from being fitted K-1 times apart."""
    mask_of = {tuple(encoded[i][side]): encoded[i][side + "_mask"] for i in idx for side in ("chosen", "rejected")}
    seqs = list(mask_of)
    row = {q: j for j, q in enumerate(seqs)}
    rows_of = lambda side: torch.tensor([row[tuple(encoded[i][side])] for i in idx], device=device)
    lengths = torch.tensor([len(q) for q in seqs], device=device)
    masks = pad([mask_of[q] for q in seqs], 0).to(device)
    return pad(seqs, pad_id).to(device), lengths, masks, rows_of("chosen"), rows_of("rejected")


@torch.no_grad()
def sequence_scores(model, seqs, masks, pad_id, device, dtype=None, batch_size=64, loglik_coef=0.0):
    """Raw score (reward_scores) of each token sequence, (N,) in the order given; masks: their
    render_chat loss masks. Each distinct sequence is scored once (with K samples per prompt a
    response sits in K-1 pairs), in batches of similar lengths."""
    was_training = model.training
    model.eval()
    mask_of = dict(zip(map(tuple, seqs), masks))
    distinct = sorted(mask_of, key=len)
    score = {}
    for s in range(0, len(distinct), batch_size):
        chunk = distinct[s:s + batch_size]
        lengths = torch.tensor([len(c) for c in chunk], device=device)
        ids, mask = pad(chunk, pad_id).to(device), pad([mask_of[c] for c in chunk], 0).to(device)
        with autocast(device, dtype):
            score.update(zip(chunk, reward_scores(model, ids, lengths, mask, loglik_coef).tolist()))
    model.train(was_training)
    return torch.tensor([score[tuple(q)] for q in seqs], device=device)


def pair_scores(model, encoded, pad_id, device, dtype, loglik_coef=0.0):
    """(r_chosen, r_rejected) of every pair, each (N,)."""
    sides = [e["chosen"] for e in encoded] + [e["rejected"] for e in encoded]
    masks = [e["chosen_mask"] for e in encoded] + [e["rejected_mask"] for e in encoded]
    r = sequence_scores(model, sides, masks, pad_id, device, dtype, loglik_coef=loglik_coef)
    return r[:len(encoded)], r[len(encoded):]


# ----------------------------------------------------------------------------- for PPO / GRPO

def load_reward_model(path, device=None, batch_size=64):
    """A trained reward model as a function score(prompts, responses) -> (N,) float tensor.

    Prompts are strings (or message lists), responses decoded texts as data.generate_responses
    gives them. Batched, no grad. Rewards are normalised with the (mean, std) the reward stage
    measured on SFT samples, so an average SFT response scores ~0 and the spread is ~1.
    """
    ckpt = load_checkpoint(path, device or "cpu")
    model, tok = ckpt["model"], ckpt["tokenizer"]
    if model.score_head is None or "reward_mean" not in ckpt["extra"]:
        raise CheckpointError(f"{path}: not a reward model (stage {ckpt['stage']!r} has no scalar head "
                              f"or no normalisation); train one with reward.py")
    mean, std = ckpt["extra"]["reward_mean"], ckpt["extra"]["reward_std"]
    loglik_coef = ckpt["extra"].get("loglik_coef", 0.0)  # reward models from before the term: 0
    dev = next(model.parameters()).device
    block = model.config.block_size

    @torch.no_grad()
    def score(prompts, responses):
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        seqs, masks = [], []
        for p, r in zip(prompts, responses):
            msgs = [{"role": "user", "content": p}] if isinstance(p, str) else list(p)
            ids, mask = render_chat(tok, msgs + response_messages(r))
            # past the context the model has no positions: score what fits (the sampler never
            # produces longer, since it stops at block_size too)
            seqs.append(ids[:block])
            masks.append(mask[:block])
        raw = sequence_scores(model, seqs, masks, tok.pad_id, dev, batch_size=batch_size, loglik_coef=loglik_coef)
        return (raw - mean) / std

    score.model, score.tokenizer, score.mean, score.std = model, tok, mean, std
    return score


# ----------------------------------------------------------------------------- training

def train_and_val_pairs(cfg, sft, tok, rank):
    """--data: the file, val_frac of it held out. Otherwise pairs sampled from the SFT model on
    train prompts, held out: pairs on val-split prompts with clean gold labels. Every rank builds
    the same pairs (same seed), then trains on its slice of each batch."""
    if cfg["data"]:
        pairs = load_pairs(cfg["data"])
        random.Random(cfg["seed"]).shuffle(pairs)
        n_val = max(1, int(len(pairs) * cfg["val_frac"])) if len(pairs) > 1 else 0
        return pairs[n_val:], pairs[:n_val]
    try:
        train = sample_preference_pairs(sft, tok, cfg["n_prompts"], cfg["seed"], cfg["temperature"],
                                        cfg["label_noise"], k=cfg["samples"], pairing=cfg["pairing"])
        # held out: val prompts sampled and paired as the train ones (each of a prompt's K(K-1)/2
        # pairs is a comparison of two independent samples, as one pair of two would be: the same
        # expected accuracy, from ~6x the pairs; one pair a prompt left a 95% interval of +-5 points)
        val = sample_preference_pairs(sft, tok, cfg["n_val_prompts"], cfg["seed"], cfg["temperature"], split="val",
                                      k=cfg["samples"], pairing=cfg["pairing"])
    except tasks.TaskSpaceError as e:
        fail(f"--n-prompts {cfg['n_prompts']} / --n-val-prompts {cfg['n_val_prompts']}: {e}")
    if rank == 0:
        write_pairs(os.path.join(os.path.dirname(cfg["out"]) or ".", "prefs_reward.jsonl"), train)
    return train, val


def reward_model_from(sft):
    """The SFT network plus a scalar head, zero-initialised so every pair starts at loss log 2."""
    model = GPT(dataclasses.replace(sft.config, scalar_head=True)).to(next(sft.parameters()).device)
    missing, unexpected = model.load_state_dict(sft.state_dict(), strict=False)
    assert sorted(missing) == ["score_head.bias", "score_head.weight"] and not unexpected, (missing, unexpected)
    torch.nn.init.zeros_(model.score_head.weight)
    return model.train()


def final_metrics(model, train, val, pad_id, device, dtype, loglik_coef):
    """Held-out pair accuracy (overall and per family), train accuracy, and the normalisation:
    (mean, std) of raw scores over every training response, i.e. over SFT samples (with --data,
    over the file's responses)."""
    m = {}
    if val:
        vc, vr = pair_scores(model, val, pad_id, device, dtype, loglik_coef)
        m["val_acc"], m["val_loss"] = (vc > vr).float().mean().item(), bt_loss(vc, vr).mean().item()
        for fam in sorted({v["family"] for v in val}):
            sel = torch.tensor([v["family"] == fam for v in val], device=vc.device)
            m[f"val_acc_{fam}"] = (vc[sel] > vr[sel]).float().mean().item()
    tc, tr = pair_scores(model, train, pad_id, device, dtype, loglik_coef)
    m["train_acc"] = (tc > tr).float().mean().item()
    sides = [e["chosen"] for e in train] + [e["rejected"] for e in train]
    score_of = dict(zip(map(tuple, sides), torch.cat([tc, tr]).tolist()))
    raw = torch.tensor(list(score_of.values()))  # each distinct response once, however many pairs it is in
    m["reward_mean"], m["reward_std"] = raw.mean().item(), max(raw.std().item() if len(raw) > 1 else 1.0, 1e-6)
    return m


def main(argv=None):
    cfg = parse_config(DEFAULTS, PRESETS, argv, description=__doc__)
    device, rank, world = setup(cfg)
    t0 = time.time()
    try:
        ckpt = load_checkpoint(cfg["init"], device)
    except CheckpointError as e:
        fail(str(e))
    sft, tok = ckpt["model"], ckpt["tokenizer"]
    train_pairs, val_pairs = train_and_val_pairs(cfg, sft, tok, rank)
    train, dropped = encode_pairs(tok, train_pairs, sft.config.block_size)
    val, _ = encode_pairs(tok, val_pairs, sft.config.block_size)
    if not train:
        fail("no preference pairs to train on (every sampled pair tied, or none fits the context)")
    if rank == 0:
        print(f"reward: {len(train)} train pairs, {len(val)} val pairs ({dropped} too long), "
              f"data {time.time() - t0:.0f}s")

    model = reward_model_from(sft)
    del sft
    opt = make_optimizer(model, cfg["lr"], cfg["weight_decay"], device=device)
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    log = MetricLog(cfg["out"], "reward", enabled=rank == 0)
    groups, B = prompt_groups(train), cfg["batch_size"]  # B prompts per step, with all their pairs
    width = [max(len(train[i][side]) for i in g for side in ("chosen", "rejected")) for g in groups]
    if B < world:
        fail(f"--batch-size {B} prompts cannot be shared by {world} processes: give each at least one")
    # whole batches only, so no rank is ever handed an empty slice (DDP needs every rank's backward)
    per_epoch = max(1, len(groups) // B)
    steps = cfg["epochs"] * per_epoch
    bar = tqdm(range(steps), disable=rank != 0, desc="reward")
    for step in bar:
        set_lr(opt, lr_at(step, steps, cfg["lr"], cfg["warmup"]))
        # the batch depends only on (seed, epoch, step): every rank takes its slice of the same one
        epoch, k = divmod(step, per_epoch)
        perm = torch.randperm(len(groups), generator=torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + epoch))
        mine = perm[k * B:(k + 1) * B][rank::world].tolist()
        n_pairs = all_reduce_sum(torch.tensor(float(sum(len(groups[g]) for g in mine)), device=device))
        # micro-batches of prompts whose responses have similar lengths: less padding, the same
        # gradient (each micro-batch's summed loss is divided by the step's pair count)
        mine.sort(key=lambda g: width[g])
        M = cfg["micro_batches"]
        parts = [p for p in (mine[j * len(mine) // M:(j + 1) * len(mine) // M] for j in range(M)) if p]
        loss, rc, rr = 0.0, [], []
        for j, part in enumerate(parts):
            idx = [i for g in part for i in groups[g]]
            ids, lengths, masks, chosen_row, rejected_row = side_batch(train, idx, tok.pad_id, device)
            last = j == len(parts) - 1 or world == 1
            with contextlib.nullcontext() if last else train_model.no_sync():  # DDP: one all-reduce per step
                with autocast(device, cfg["dtype"]):
                    r = reward_scores(train_model, ids, lengths, masks, cfg["loglik_coef"])
                part_loss = bt_loss(r[chosen_row], r[rejected_row], cfg["margin"], cfg["center_coef"]).sum()
                part_loss = part_loss / (n_pairs / world)  # x world: DDP averages
                part_loss.backward()
            loss, rc, rr = loss + part_loss.detach(), rc + [r[chosen_row]], rr + [r[rejected_row]]
        rc, rr = torch.cat(rc), torch.cat(rr)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            row = dict(loss=loss.item(), acc=(rc > rr).float().mean().item(), margin=(rc - rr).mean().item(),
                       r_chosen=rc.mean().item(), r_rejected=rr.mean().item(), grad_norm=norm.item(),
                       lr=opt.param_groups[0]["lr"])
            log.log(step, **row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['acc']:.2f}")

    metrics = dict(n_train_pairs=len(train), n_val_pairs=len(val), params=model.num_params())
    if not cfg["data"]:
        comparisons = cfg["n_val_prompts"] * (cfg["samples"] * (cfg["samples"] - 1) // 2 if cfg["pairing"] == "all" else 1)
        metrics["tie_rate_val"] = 1 - len(val_pairs) / max(1, comparisons)
    metrics.update(final_metrics(model, train, val, tok.pad_id, device, cfg["dtype"], cfg["loglik_coef"]))
    metrics["wall_s"] = time.time() - t0
    if rank == 0:
        log.log(steps, **metrics)
        save_checkpoint(cfg["out"], model, tok, "reward", parent=cfg["init"], config=cfg, metrics=metrics,
                        optimizer=opt, step=steps,
                        extra=dict(reward_mean=metrics["reward_mean"], reward_std=metrics["reward_std"],
                                   loglik_coef=cfg["loglik_coef"]))
        print("reward: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)))


if __name__ == "__main__":
    main()
