"""Distillation: a frozen teacher -> a smaller student with the same tokenizer.

--mode
  logit     token-level KD (Hinton et al. 2015): at every assistant token of the training
            conversations the student matches the teacher's whole next-token distribution,
            under --div forward | reverse | jsd (--beta), --temperature on both sides and
            --teacher-temperature sharpening the teacher's alone, plus
            --ce-weight x the cross-entropy on the data's own tokens (Hinton's hard-label term;
            0 by default: the SFT data's labels carry its flaws).
  seq       sequence-level KD (Kim & Rush 2016): fine-tune on the teacher's own answers to the
            training prompts, keeping only those a verifier accepts where the task has one
            (rejection-sampling distillation).
  onpolicy  GKD (Agarwal et al. 2024): a fraction --lmbda of the batches is sampled by the student
            itself and the teacher scores every token of it; the rest are the data's responses.
  sft       hard-label SFT of the same student on the same data and steps: the baseline.
--baseline (on by default) also trains that SFT student and reports teacher / student / baseline,
so the value of distillation is measured, not assumed.

The student (--student-layers x --student-width) starts from the teacher by default: the layers
evenly spaced from first to last are kept (layer dropping, as DistilBERT) and the residual
channels and MLP neurons that are most active on a calibration batch, and the attention heads
whose removal costs the teacher most loss on it, are kept (width pruning, as Minitron).
--student-init random trains from scratch; a path loads a checkpoint.
On the built-in world the first --drill-steps steps, for the student and the baseline alike, open
as sft.py does, with one-line drills of the column facts (--drill-batch of them and --drill-demos
demonstrations a step): pruning leaves the student to relearn that lookup table, which it barely
does from facts scattered through long workings. Measured on one teacher, when the pruning still
ranked heads by output norm (math, 100 test problems, student / baseline): 0.65 / 0.74 without
the drill (700 steps); 0.84 / 0.68 with 150 drill steps of 256 (700 steps in all), and 0.78 / 0.71
with 100 of 128 (600 in all) at another seed.

Convention for the divergences (GKD's, which TRL's GKDTrainer follows), p_t teacher, p_s student:
    forward KL(p_t||p_s), reverse KL(p_s||p_t),
    JSD_b = b KL(p_t||m) + (1-b) KL(p_s||m),  m = b p_t + (1-b) p_s;
the ends are defined as the KLs, JSD_0 := KL(p_t||p_s) and JSD_1 := KL(p_s||p_t), which are the
limits of JSD_b / b and JSD_b / (1-b).

    python distill.py [--init out/rlvr.pt] [--out out/student.pt] [--mode logit|seq|onpolicy|sft]
                      [--student-layers 3 --student-width 64 | --student-init CKPT] [--preset tiny|cpu|gpu]
"""
import dataclasses
import math
import os
import random
import time

import torch
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import evaluate
import tasks
import verifiers
from common import MetricLog, all_reduce_sum, autocast, fail, lr_at, make_optimizer, parse_config, set_lr, setup
from data import DataError, as_messages, generate_responses, pad, read_jsonl, response_messages
from model import GPT, CheckpointError, load_checkpoint, save_checkpoint, token_logprobs
from sft import drill_rows, encode_all, load_drills, make_batch, masked_loss, val_conversations

# The data is sft.py's (--noise true): the demonstrations a real project has, flaws included. On
# the world's clean references instead (--noise false, an oracle no project has) the hard labels
# are better than any teacher and the baseline ties the student (head to head, sampled: 0.51).
# On the SFT data (evaluate.py --n 200, teacher math 0.85): student math 0.78, refusal of unsafe
# requests 1.00 and over-refusal 0.00, against the baseline's 0.77, 0.61 and 0.13; head to head
# the student wins 0.755 of sampled comparisons. --ce-weight 0 by default, since Hinton's
# hard-label term here would teach the flaws back (0.2: 0.729 head to head; 0.5: 0.654). The
# sharpened teacher (--teacher-temperature 0.5) is what makes the student's samples good: with
# the teacher as it is, the student copies its hesitations too.
# lr 3e-3 was chosen when pruning still dropped the teacher's costliest head (0.72 and 0.52, against
# 0.66 and 0.49 at 2e-3). A problem is right only if every column fact in it is, so a small
# difference in how well the student learned the fact table is a large one in answers.
# 800 steps: at 600 the KD loss is still falling (0.034 at the end, 0.013 after 800) and the
# student's math sits on a cliff: on one run's teacher (math 0.93 on the report's 100 problems)
# 600 steps gave 0.66, below the hard-label baseline's 0.75; 800 gave 0.86 and 0.85 at seeds 0
# and 1 (baseline 0.80 and 0.70), for ~60 s more of training.
DEFAULTS = dict(
    init="out/rlvr.pt", out="out/student.pt", data=None, noise=True, n_train=20000, n_val=200,
    mode="logit", div="forward", beta=0.5, temperature=1.0, teacher_temperature=0.5, top_k=0, lmbda=0.5, ce_weight=0.0,
    student_layers=3, student_width=64, student_heads=0, student_init="teacher",
    seq_prompts=2000, seq_temperature=1.0, max_new_tokens=96, baseline=True,
    drill_steps=100, drill_batch=128, drill_demos=16,
    batch_size=64, micro_batches=4, steps=800, lr=3e-3, warmup=20, weight_decay=0.0, grad_clip=1.0, chunk=4096,
    eval_tasks=100, threads=0, seed=0, device="auto", dtype="bf16",
)
PRESETS = dict(
    tiny=dict(n_train=200, n_val=16, student_layers=1, student_width=16, seq_prompts=16, max_new_tokens=24,
              drill_steps=2, drill_batch=8, drill_demos=2, batch_size=8, micro_batches=2, steps=6, eval_tasks=1),
    cpu=dict(),
    gpu=dict(n_train=200000, batch_size=128, steps=3000, lr=1e-3, seq_prompts=2400, eval_tasks=200),
)


# ----------------------------------------------------------------------------- divergences
# Each takes log-probs (..., V) of the teacher and the student and returns (...) nats per token.

def kl(logp, logq):
    """KL(p||q) = sum_v p_v (log p_v - log q_v), from log-probs."""
    return (logp.exp() * (logp - logq)).sum(-1)


def forward_kl(t_logp, s_logp, beta=None):
    """KL(p_t||p_s): mean-seeking, the student must cover every mode of the teacher (Hinton et al. 2015)."""
    return kl(t_logp, s_logp)


def reverse_kl(t_logp, s_logp, beta=None):
    """KL(p_s||p_t): mode-seeking, the student may drop modes it cannot represent (MiniLLM, Gu et al. 2024)."""
    return kl(s_logp, t_logp)


def generalized_jsd(t_logp, s_logp, beta=0.5):
    """JSD_b(p_t||p_s) = b KL(p_t||m) + (1-b) KL(p_s||m), m = b p_t + (1-b) p_s (GKD, Agarwal et al. 2024, Sec. 3).

    log m = logsumexp(log b + log p_t, log(1-b) + log p_s): the mixture is taken in probability
    space without leaving log space. Bounded by the binary entropy of b (log 2 at b = 0.5, where it
    is symmetric). The ends are the KLs, as TRL's GKDTrainer defines them: b=0 -> KL(p_t||p_s),
    b=1 -> KL(p_s||p_t), the limits of JSD_b/b and JSD_b/(1-b).
    Example: p_t = (1, 0), p_s = (0, 1), b = 0.5 -> log 2.
    """
    if beta <= 0:
        return kl(t_logp, s_logp)
    if beta >= 1:
        return kl(s_logp, t_logp)
    log_m = torch.logsumexp(torch.stack([t_logp + math.log(beta), s_logp + math.log(1 - beta)]), 0)
    return beta * kl(t_logp, log_m) + (1 - beta) * kl(s_logp, log_m)


DIVERGENCES = {"forward": forward_kl, "reverse": reverse_kl, "jsd": generalized_jsd}


def top_k_buckets(t_logp, s_logp, k):
    """Both distributions restricted to the teacher's k most likely tokens plus one tail bucket
    holding the rest of the mass: (..., V) -> (..., k+1).

    The teacher side is then k numbers per token (what one caches or ships from a 50k-vocab
    teacher); the tail keeps both sides proper distributions, so every divergence stays >= 0.
    With k = V both tails are empty and this is the full computation.
    """
    t_top, idx = t_logp.topk(k, -1)
    s_top = s_logp.gather(-1, idx)
    # clamp: float sums of probabilities can pass 1; both empty tails then get the same tiny mass
    tail = lambda top: torch.log1p(-top.exp().sum(-1, keepdim=True).clamp(max=1 - 1e-6))
    return torch.cat([t_top, tail(t_top)], -1), torch.cat([s_top, tail(s_top)], -1)


def token_divergence(s_logits, t_logits, div="forward", beta=0.5, temperature=1.0, top_k=0, teacher_temperature=1.0):
    """Per-token divergence (N,) between the teacher's and the student's logits (N, V).

    Temperature softens both sides; the result is scaled by T^2 so the gradient keeps its size
    as T changes (Hinton et al. 2015, Sec. 2). teacher_temperature < 1 sharpens the teacher
    alone, p_t^(1/tau) renormalised (as DINO's teacher, Caron et al. 2021): the student learns
    the teacher's confident choices rather than its hesitations.
    """
    s_logp = torch.log_softmax(s_logits.float() / temperature, -1)
    t_logp = torch.log_softmax(t_logits.float() / (temperature * teacher_temperature), -1)
    if top_k and top_k < s_logp.shape[-1]:
        t_logp, s_logp = top_k_buckets(t_logp, s_logp, top_k)
    return DIVERGENCES[div](t_logp, s_logp, beta) * temperature ** 2


def _chunk_divergence(hs, ws, ht, wt, div, beta, temperature, top_k, teacher_temperature):
    return token_divergence(hs @ ws.t(), (ht @ wt.t()).detach(), div, beta, temperature, top_k,
                            teacher_temperature).sum()


def kd_loss(hs, ws, ht, wt, div="forward", beta=0.5, temperature=1.0, top_k=0, chunk=4096, teacher_temperature=1.0):
    """Sum over N tokens of the divergence between teacher and student, from hidden states.

    hs (N, Cs) student hiddens with head ws (V, Cs); ht (N, Ct), wt (V, Ct) the teacher's. Only the
    tokens passed in count: the caller selects the response tokens, so prompt and padding never
    enter. `chunk` tokens at a time, each under activation checkpointing, so at most
    (chunk x V) logits are alive in the forward and the backward (the vocab may be GPT-2's 50k).
    """
    total = hs.new_zeros((), dtype=torch.float32)
    for s in range(0, hs.shape[0], chunk):
        total = total + checkpoint(_chunk_divergence, hs[s:s + chunk], ws, ht[s:s + chunk], wt, div, beta,
                                   temperature, top_k, teacher_temperature, use_reentrant=False)
    return total


# ----------------------------------------------------------------------------- the student

@torch.no_grad()
def importance(teacher, ids, valid):
    """Mean |activation| on a calibration batch of every residual channel (LayerNorm outputs) and
    MLP neuron: Minitron's activation-based importance (Muralidharan et al. 2024, Sec. 2.2)."""
    acts, hooks = {}, []
    grab = lambda key: (lambda mod, inp, out=None: acts.__setitem__(key, (inp[0] if out is None else out)[valid]))
    for i, b in enumerate(teacher.transformer.h):
        hooks += [b.ln_1.register_forward_hook(grab(("ln1", i))), b.ln_2.register_forward_hook(grab(("ln2", i))),
                  b.mlp.c_proj.register_forward_pre_hook(grab(("mlp", i)))]
    teacher(ids)
    for h in hooks:
        h.remove()
    L = teacher.config.n_layer
    channel = sum(acts[(k, i)].abs().mean(0) for k in ("ln1", "ln2") for i in range(L))
    mlp = [acts[("mlp", i)].abs().mean(0) for i in range(L)]
    return channel, mlp


def take(w, *idx):
    """w restricted to the indices idx[0] along dim 0, idx[1] along dim 1."""
    for d, ix in enumerate(idx):
        w = w.index_select(d, ix)
    return w


@torch.no_grad()
def head_ablation_losses(teacher, ids, mask):
    """Per layer, a tensor (n_head,): the teacher's loss on the calibration batch's response tokens
    with that head's output zeroed (Michel et al. 2019's head importance, by exact ablation:
    n_layer x n_head forwards, affordable because heads are few)."""
    hd, denom = teacher.config.n_embd // teacher.config.n_head, mask[:, 1:].sum()
    losses = []
    for block in teacher.transformer.h:
        row = []
        for h in range(teacher.config.n_head):
            def zero_head(mod, inp, h=h):
                x = inp[0].clone()
                x[..., h * hd:(h + 1) * hd] = 0
                return (x,)
            hook = block.attn.c_proj.register_forward_pre_hook(zero_head)
            row.append(masked_loss(teacher, ids, mask, denom).item())
            hook.remove()
        losses.append(torch.tensor(row))
    return losses


def prune_from_teacher(student, teacher, ids, mask, pad_id):
    """Load into `student` the teacher's layers evenly spaced from first to last, and its most
    important channels and MLP neurons (by mean activation) and heads (by the loss their removal
    costs). Heads by activation norm, as channels, were a lottery: in the 4x128 teacher the head
    whose removal costs most (loss 0.13 -> 0.50) has a small output and was dropped at some
    calibration batches, and the student without it miscopied the digits of a problem's third
    number (63 of 400 problems; 400-problem math 0.52 -> 0.73 at that seed with heads by
    ablation). Dropping the layer whose removal costs least, instead of evenly, did no better."""
    tc, sc = teacher.config, student.config
    hd = tc.n_embd // tc.n_head
    if sc.n_embd // sc.n_head != hd:
        fail(f"--student-init teacher keeps whole heads: width/heads must be the teacher's head size {hd}")
    channel, mlp = importance(teacher, ids, ids != pad_id)
    head = head_ablation_losses(teacher, ids, mask)
    top = lambda score, k: score.topk(k).indices.sort().values  # sorted: keep the teacher's order
    ch = top(channel, sc.n_embd)
    layers = torch.linspace(0, tc.n_layer - 1, sc.n_layer).round().long().tolist()  # first..last, evenly
    T, sd = teacher.state_dict(), {}
    for name in ("wte", "wpe")[:1 + ("wpe" in teacher.transformer)]:  # rotary models have no wpe
        sd[f"transformer.{name}.weight"] = T[f"transformer.{name}.weight"][:, ch]
    sd["lm_head.weight"] = sd["transformer.wte.weight"]  # tied, as in the teacher
    for name in ("weight", "bias"):
        sd[f"transformer.ln_f.{name}"] = T[f"transformer.ln_f.{name}"][ch]
    for si, ti in enumerate(layers):
        heads = top(head[ti], sc.n_head)
        cols = (heads[:, None] * hd + torch.arange(hd)).flatten()  # the kept heads' slice of C
        qkv = torch.cat([cols + j * tc.n_embd for j in range(3)])  # the same slice of q, k and v
        neurons = top(mlp[ti], 4 * sc.n_embd)
        index = {"ln_1.weight": (ch,), "ln_1.bias": (ch,), "ln_2.weight": (ch,), "ln_2.bias": (ch,),
                "attn.c_attn.weight": (qkv, ch), "attn.c_attn.bias": (qkv,),
                "attn.c_proj.weight": (ch, cols), "attn.c_proj.bias": (ch,),
                "mlp.c_fc.weight": (neurons, ch), "mlp.c_fc.bias": (neurons,),
                "mlp.c_proj.weight": (ch, neurons), "mlp.c_proj.bias": (ch,)}
        for name, idx in index.items():
            sd[f"transformer.h.{si}.{name}"] = take(T[f"transformer.h.{ti}.{name}"], *idx)
    student.load_state_dict(sd)
    return layers


def make_student(teacher, tok, cfg, calib, device):
    """The student model, and a line saying where it came from."""
    if cfg["student_init"] not in ("teacher", "random"):
        try:
            ck = load_checkpoint(cfg["student_init"])
        except CheckpointError as e:
            fail(str(e))
        if ck["tokenizer"].state() != tok.state():
            fail(f"{cfg['student_init']}: the student's tokenizer differs from the teacher's")
        return ck["model"].to(device).train(), f"loaded {cfg['student_init']}"
    tc = teacher.config
    width = cfg["student_width"] or tc.n_embd
    heads = cfg["student_heads"] or max(1, width // (tc.n_embd // tc.n_head))
    torch.manual_seed(cfg["seed"])  # the student and the baseline start from the same weights
    # the teacher's config but the shape: vocabulary, context and positions stay the teacher's
    student = GPT(dataclasses.replace(tc, n_layer=cfg["student_layers"], n_head=heads, n_embd=width))
    how = "random init"
    if cfg["student_init"] == "teacher":
        ids, mask = (t.to(device) for t in calib)
        layers = prune_from_teacher(student.to(device), teacher, ids, mask, tok.pad_id)
        how = f"pruned from the teacher (layers {layers})"
    return student.to(device).train(), how


# ----------------------------------------------------------------------------- data

def load_conversations(cfg):
    """Training conversations: --data (messages or prompt/completion JSONL) or the built-in
    world's SFT demonstrations as sft.py sees them, imperfections included: the hard-label
    baseline learns the imperfections back, while the student learns what the teacher made of
    them. --noise false gives the world's clean references instead (an oracle)."""
    if cfg["data"] is None:
        return [c["messages"] for c in tasks.sft_conversations(cfg["n_train"], seed=cfg["seed"], noise=cfg["noise"])]
    if not os.path.exists(cfg["data"]):
        fail(f"{cfg['data']}: no such file")
    try:
        return [as_messages(r) for r in read_jsonl(cfg["data"], "sft")]
    except DataError as e:
        fail(str(e))


def prompt_of(messages):
    """The messages before the first assistant turn."""
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:first]


def verified(task_list, texts):
    """Rejection sampling: keep a response when the task's verifier accepts it; tasks without a
    verifier (safety, --data prompts) keep every response."""
    keep = [t is None or t.family == "safety" or
            (t.family == "math" and verifiers.verify_math(x, t.answer) > 0) or
            (t.family == "tool" and verifiers.verify_tool(x, t.answer) > 0) for t, x in zip(task_list, texts)]
    code = [i for i, t in enumerate(task_list) if t is not None and t.family == "code"]
    runs = verifiers.run_code_batch([dict(code=verifiers.extract_code(texts[i]), test=task_list[i].test,
                                          entry_point=task_list[i].entry_point) for i in code])
    for i, r in zip(code, runs):
        keep[i] = r["passed"]
    return keep


def teacher_conversations(teacher, tok, cfg, conversations, rank, world):
    """Seq-KD data: the teacher's answers to train prompts, filtered by the verifiers."""
    n = cfg["seq_prompts"]
    if cfg["data"] is None:  # built-in world: fresh train tasks in the SFT mix, with their verifiers
        try:
            task_list = [t for f, w in tasks.SFT_MIX.items()
                         for t in tasks.make_tasks(f, "train", max(1, round(n * w)), seed=cfg["seed"])]
        except tasks.TaskSpaceError as e:
            fail(f"--seq-prompts {n}: {e}")
        prompts = [t.messages() for t in task_list]
    else:
        prompts = [prompt_of(c) for c in conversations[:n]]
        task_list = [None] * len(prompts)
    task_list, prompts = task_list[rank::world], prompts[rank::world]
    g = torch.Generator(next(teacher.parameters()).device).manual_seed(cfg["seed"] + rank)
    texts = generate_responses(teacher, tok, prompts, cfg["max_new_tokens"], cfg["seq_temperature"],
                               generator=g)["texts"]
    keep = verified(task_list, texts)
    return [p + response_messages(x) for p, x, k in zip(prompts, texts, keep) if k], sum(keep) / max(1, len(keep))


def student_samples(student, tok, prompts, cfg, generator):
    """On-policy examples: the student's samples (temperature 1, tools run) to these prompts as
    (ids, mask) rows; the mask marks the tokens it chose (not the tool's output, not padding)."""
    out = generate_responses(student, tok, prompts, cfg["max_new_tokens"], 1.0, generator=generator)
    rows = []
    for p, toks, chosen in zip(out["prompt_ids"], out["tokens"].tolist(), out["sampled"].tolist()):
        n = max((j + 1 for j, t in enumerate(toks) if t != tok.pad_id), default=0)  # drop trailing padding
        rows.append((p + toks[:n], [0] * len(p) + chosen[:n]))
    return rows


# ----------------------------------------------------------------------------- loss and training

def batch_loss(model, student, teacher, ids, mask, mode, cfg, hard=0.0):
    """Sum over the response tokens of the mode's loss. mask[:, 1:] marks the targets ids[:, 1:].
    KD modes add `hard` x the cross-entropy on the batch's tokens (Hinton et al. 2015's weighted
    hard-label term; only for data batches, never for the student's own samples)."""
    m = mask[:, 1:].bool()
    hs = model(ids[:, :-1])[m]  # response positions only: prompt and padding never enter
    ce = lambda: -token_logprobs(hs, student.lm_head.weight, ids[:, 1:][m]).sum()  # only when used
    if mode in ("sft", "seq"):  # hard labels: the data's tokens, or the teacher's own samples
        return ce()
    with torch.no_grad():
        ht = teacher(ids[:, :-1])[m]
    kd = kd_loss(hs, student.lm_head.weight, ht, teacher.lm_head.weight, cfg["div"], cfg["beta"],
                 cfg["temperature"], cfg["top_k"], cfg["chunk"], cfg["teacher_temperature"])
    return kd + hard * ce() if hard else kd


@torch.no_grad()
def kl_to_teacher(student, teacher, examples, pad_id, device, batch_size=64):
    """Mean KL(p_t||p_s) per response token at temperature 1: how close the student is to the teacher."""
    was_training = student.training
    student.eval()
    total, count = 0.0, 0.0
    for s in range(0, len(examples), batch_size):
        ids, mask = make_batch(examples, range(s, min(s + batch_size, len(examples))), pad_id, device)
        m = mask[:, 1:].bool()
        total += kd_loss(student(ids[:, :-1])[m], student.lm_head.weight, teacher(ids[:, :-1])[m],
                         teacher.lm_head.weight).item()
        count += m.sum().item()
    student.train(was_training)
    return total / max(count, 1)


def train(student, teacher, tok, examples, prompts, mode, cfg, device, rank, world, log, val, drills=()):
    """Train the student for cfg['steps'] steps of `mode`; returns it. The first drill_steps
    steps (data batches only) take drill_batch rows of `drills` and drill_demos of `examples`."""
    opt = make_optimizer(student, cfg["lr"], cfg["weight_decay"], device=device)
    model = torch.nn.parallel.DistributedDataParallel(student) if world > 1 else student
    bar = tqdm(range(cfg["steps"]), disable=rank != 0, desc=f"distill {mode}")
    for step in bar:
        set_lr(opt, lr_at(step, cfg["steps"], cfg["lr"], cfg["warmup"]))
        # the batch depends only on (seed, step): every rank sees the same global batch, same coin
        g = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + step)
        batch = torch.randint(0, len(examples), (cfg["batch_size"],), generator=g).tolist()  # the global batch
        idx = batch[rank::world]
        on_policy = mode == "onpolicy" and random.Random(cfg["seed"] * 1_000_003 + step).random() < cfg["lmbda"]
        if on_policy:  # GKD: with probability lambda the student's own samples, scored by the teacher
            sg = torch.Generator(device).manual_seed(cfg["seed"] * 1_000_003 + step * world + rank)
            rows = student_samples(student, tok, [prompts[i] for i in idx], cfg, sg)
        elif step < cfg["drill_steps"] and drills:  # as sft.py opens: the column facts, densely
            rows = drill_rows(drills, [examples[i] for i in batch[:cfg["drill_demos"]]], cfg, g)[rank::world]
        else:
            rows = [examples[i] for i in idx]
        rows.sort(key=lambda r: len(r[0]))  # length-sorted micro-batches: little padding, same gradient
        n_tokens = all_reduce_sum(torch.tensor(float(sum(sum(m[1:]) for _, m in rows)), device=device))
        size, total = math.ceil(len(rows) / cfg["micro_batches"]), 0.0
        for s in range(0, len(rows), size):
            ids, mask = make_batch(rows, range(s, min(s + size, len(rows))), tok.pad_id, device)
            with autocast(device, cfg["dtype"]):  # sum / global token count (x world: DDP averages grads)
                loss = batch_loss(model, student, teacher, ids, mask, mode, cfg, 0.0 if on_policy else cfg["ce_weight"])
                loss = loss * world / n_tokens
            loss.backward()
            total += loss.detach()
        norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == cfg["steps"] - 1:
            row = dict(run=mode, loss=(all_reduce_sum(total) / world).item(), grad_norm=norm.item(),
                       lr=opt.param_groups[0]["lr"], tokens=n_tokens.item(), on_policy=float(on_policy))
            if step % 100 == 0 or step == cfg["steps"] - 1:
                row["val_kl_to_teacher"] = kl_to_teacher(student, teacher, val, tok.pad_id, device)
            log.log(step, **row)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
    return student.eval()


def eval_set(n):
    """n math and n tool tasks of the test split (the distillation targets: more tasks, tighter
    numbers) and at most 60 code and safety tasks (their test splits hold only ~80 and ~67
    distinct prompts); the first 60 of each are evaluate.quick_eval's."""
    return [t for f in tasks.FAMILIES for t in tasks.make_tasks(f, "test", n if f in ("math", "tool") else min(n, 60), seed=1234)]


def score_on_test(model, tok, task_list):
    """evaluate.quick_eval's metrics (greedy) on task_list."""
    texts, lengths = evaluate.respond(model, tok, task_list)
    return evaluate.score_responses(task_list, texts, lengths)


def main(argv=None):
    cfg = parse_config(DEFAULTS, PRESETS, argv, description=__doc__)
    if cfg["mode"] not in ("logit", "seq", "onpolicy", "sft"):
        fail(f"--mode must be logit, seq, onpolicy or sft, got {cfg['mode']!r}")
    if cfg["div"] not in DIVERGENCES:
        fail(f"--div must be one of {sorted(DIVERGENCES)}, got {cfg['div']!r}")
    device, rank, world = setup(cfg)
    if device.type == "cpu" and cfg["threads"]:
        # 0 keeps torch's default (every core: this stage 221 -> 121 s on 2 idle cores); on a CPU
        # shared with other jobs, --threads 1 avoids every op waiting for a busy core
        torch.set_num_threads(cfg["threads"])
    t0 = time.time()
    try:
        ckpt = load_checkpoint(cfg["init"])
    except CheckpointError as e:
        fail(str(e))
    teacher, tok = ckpt["model"].to(device).eval(), ckpt["tokenizer"]
    teacher.requires_grad_(False)  # frozen
    block = teacher.config.block_size
    conversations = load_conversations(cfg)
    data, dropped = encode_all(tok, conversations, block)
    val, _ = encode_all(tok, val_conversations(cfg["n_val"]), block)
    if not data:
        fail(f"no training conversation fits the {block}-token context")
    prompts = [prompt_of(c) for c in conversations]  # on-policy batches need only prompts
    drills = load_drills(tok, cfg["seed"], block) if cfg["drill_steps"] and cfg["data"] is None else []
    calib = make_batch(data, range(min(64, len(data))), tok.pad_id, "cpu")
    log = MetricLog(cfg["out"], "distill", enabled=rank == 0)

    student, how = make_student(teacher, tok, cfg, calib, device)
    n_t, n_s = teacher.num_params(embeddings=False), student.num_params(embeddings=False)
    if rank == 0:
        print(f"distill: teacher {cfg['init']} {teacher.config.n_layer}x{teacher.config.n_embd}, {n_t:,} non-embedding "
              f"params; student {student.config.n_layer}x{student.config.n_embd}, {n_s:,} ({n_s / n_t:.1%}), {how}")
    examples = data
    metrics = dict(params=student.num_params(), params_nonemb=n_s, teacher_params_nonemb=n_t)
    if cfg["mode"] == "seq":
        convs, metrics["seq_keep_rate"] = teacher_conversations(teacher, tok, cfg, conversations, rank, world)
        examples, _ = encode_all(tok, convs, block)
        if not examples:
            fail("seq: the verifiers accepted none of the teacher's samples")
        if rank == 0:
            print(f"distill: seq-KD on {len(examples)} teacher samples (verifier keep rate {metrics['seq_keep_rate']:.2f})")
    t1, c1 = time.time(), time.process_time()
    student = train(student, teacher, tok, examples, prompts, cfg["mode"], cfg, device, rank, world, log, val, drills)
    # wall time depends on who else shares the CPU; this process's CPU time does not
    metrics["train_s"], metrics["train_cpu_s"] = time.time() - t1, time.process_time() - c1
    metrics["kl_to_teacher"] = kl_to_teacher(student, teacher, val, tok.pad_id, device)
    runs = {"student": student}
    if cfg["baseline"] and cfg["mode"] != "sft":  # same init, data, steps and schedule; hard labels
        baseline, _ = make_student(teacher, tok, cfg, calib, device)
        t1 = time.time()
        runs["baseline"] = train(baseline, teacher, tok, data, prompts, "sft", cfg, device, rank, world, log, val,
                                 drills)
        metrics["baseline"] = dict(kl_to_teacher=kl_to_teacher(runs["baseline"], teacher, val, tok.pad_id, device),
                                   train_s=time.time() - t1)
    if rank == 0 and cfg["eval_tasks"]:
        test = eval_set(cfg["eval_tasks"])
        results = {name: score_on_test(m, tok, test) for name, m in [("teacher", teacher)] + list(runs.items())}
        metrics.update(results["student"])
        metrics["teacher"] = results["teacher"]
        print(f"distill: test split, {cfg['eval_tasks']} math and tool tasks, <= 60 code and safety")
        if "baseline" in results:
            metrics["baseline"].update(results["baseline"])
            # head to head on samples (temperature 1, 2 a task): the whole distribution, which is
            # where the data's flaws live (greedy answers keep only the mode)
            twice = [t for t in test for _ in range(2)]
            metrics["gold_winrate_vs_baseline_t1"] = evaluate.gold_winrate(
                twice, evaluate.sample_texts(student, tok, test, n=2), evaluate.sample_texts(runs["baseline"], tok, test, n=2))
            print(f"  student vs baseline, gold win rate of samples: {metrics['gold_winrate_vs_baseline_t1']:.3f}")
        for name, r in results.items():
            print(f"  {name:9s} " + "  ".join(f"{k} {r.get(k, float('nan')):.3f}" for k in
                                            ("math_acc", "tool_acc", "code_pass1", "refusal_unsafe", "overrefusal_safe",
                                             "format")))
        for k in ("math_acc", "tool_acc"):
            if results["teacher"].get(k):
                metrics[f"{k}_vs_teacher"] = results["student"][k] / results["teacher"][k]
    metrics["wall_s"] = time.time() - t0
    if rank == 0:
        save_checkpoint(cfg["out"], student, tok, "student", parent=cfg["init"], config=cfg, metrics=metrics,
                        step=cfg["steps"], extra=dict(student_init=how))
        print(f"distill: {cfg['mode']} student, KL to teacher {metrics['kl_to_teacher']:.3f}"
              + (f" (baseline {metrics['baseline']['kl_to_teacher']:.3f})" if "baseline" in metrics else "")
              + f", train {metrics['train_s']:.0f}s (CPU {metrics['train_cpu_s']:.0f}s), total {metrics['wall_s']:.0f}s -> {cfg['out']}")


if __name__ == "__main__":
    main()
