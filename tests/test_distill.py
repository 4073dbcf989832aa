"""distill.py: the divergences against their formulas written out by hand, masking, the top-k
tail bucket, the chunked loss, pruning the teacher into a student, a learning run and a tiny
smoke run of every mode."""
import copy
import math

import pytest
import torch

from conftest import run_script
from distill import (batch_loss, forward_kl, generalized_jsd, head_ablation_losses, kd_loss, kl_to_teacher,
                     prune_from_teacher, reverse_kl, top_k_buckets, token_divergence, verified)
from model import GPT, GPTConfig, load_checkpoint

P_T, P_S = [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]
DIVS = [("forward", None), ("reverse", None), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 0.5), ("jsd", 1.0)]


def logp(p):
    return torch.tensor(p, dtype=torch.float64).log()


def div(name, beta, t, s):
    fn = {"forward": forward_kl, "reverse": reverse_kl, "jsd": generalized_jsd}[name]
    return fn(t, s, beta)


def kl_by_hand(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def random_logp(*shape, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(*shape, generator=g, dtype=torch.float64) * scale, -1)


# ----------------------------------------------------------------------------- divergences

@pytest.mark.parametrize("name,beta", DIVS)
def test_zero_for_identical_distributions(name, beta):
    t = random_logp(5, 11)
    assert torch.allclose(div(name, beta, t, t), torch.zeros(5, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("name,beta", DIVS)
def test_nonnegative_otherwise(name, beta):
    d = div(name, beta, random_logp(200, 7, seed=1), random_logp(200, 7, seed=2))
    assert (d > 0).all()


def test_forward_and_reverse_kl_hand_computed():
    # KL(p_t||p_s) = .5 ln(.5/.2) + .3 ln(.3/.2) + .2 ln(.2/.6) = 0.45815 + 0.12164 - 0.21972 = 0.36006
    assert forward_kl(logp(P_T), logp(P_S)).item() == pytest.approx(kl_by_hand(P_T, P_S), abs=1e-12)
    assert forward_kl(logp(P_T), logp(P_S)).item() == pytest.approx(0.360062, abs=1e-6)
    assert reverse_kl(logp(P_T), logp(P_S)).item() == pytest.approx(kl_by_hand(P_S, P_T), abs=1e-12)


@pytest.mark.parametrize("beta", [0.1, 0.3, 0.5, 0.9])
def test_jsd_hand_computed(beta):
    m = [beta * a + (1 - beta) * b for a, b in zip(P_T, P_S)]
    want = beta * kl_by_hand(P_T, m) + (1 - beta) * kl_by_hand(P_S, m)
    assert generalized_jsd(logp(P_T), logp(P_S), beta).item() == pytest.approx(want, abs=1e-12)


def test_jsd_at_half_is_symmetric_and_at_most_log2():
    t, s = random_logp(300, 9, scale=6, seed=3), random_logp(300, 9, scale=6, seed=4)
    a, b = generalized_jsd(t, s, 0.5), generalized_jsd(s, t, 0.5)
    assert torch.allclose(a, b, atol=1e-12)
    assert (a <= math.log(2) + 1e-12).all()
    # disjoint supports reach the bound
    far = torch.log_softmax(torch.tensor([[0.0, -200.0]], dtype=torch.float64), -1)
    assert generalized_jsd(far, far.flip(-1), 0.5).item() == pytest.approx(math.log(2), abs=1e-9)


def test_jsd_ends_are_forward_and_reverse_kl():
    t, s = random_logp(50, 8, seed=5), random_logp(50, 8, seed=6)
    fwd, rev = forward_kl(t, s), reverse_kl(t, s)
    assert torch.allclose(generalized_jsd(t, s, 0.0), fwd) and torch.allclose(generalized_jsd(t, s, 1.0), rev)
    # the defined ends are the limits of JSD_b / b (b -> 0) and JSD_b / (1 - b) (b -> 1)
    eps = 1e-8
    assert torch.allclose(generalized_jsd(t, s, eps) / eps, fwd, rtol=1e-3)
    assert torch.allclose(generalized_jsd(t, s, 1 - eps) / eps, rev, rtol=1e-3)


# ----------------------------------------------------------------------------- top-k, temperature, chunking

@pytest.mark.parametrize("name,beta", DIVS)
def test_top_k_with_k_equal_vocab_is_the_full_computation(name, beta):
    s_logits, t_logits = torch.randn(40, 13) * 3, torch.randn(40, 13) * 3
    full = token_divergence(s_logits, t_logits, name, beta, 1.5, top_k=0)
    assert torch.allclose(token_divergence(s_logits, t_logits, name, beta, 1.5, top_k=13), full, atol=1e-5)
    t_b, s_b = top_k_buckets(torch.log_softmax(t_logits / 1.5, -1), torch.log_softmax(s_logits / 1.5, -1), 13)
    bucketed = div(name, beta, t_b, s_b) * 1.5 ** 2
    assert torch.allclose(bucketed, full, atol=1e-5)


def test_top_k_buckets_are_distributions_and_keep_teacher_top():
    t, s = random_logp(20, 30, seed=7).float(), random_logp(20, 30, seed=8).float()
    t_b, s_b = top_k_buckets(t, s, 4)
    assert t_b.shape == (20, 5)
    assert torch.allclose(t_b.exp().sum(-1), torch.ones(20), atol=1e-5)
    assert torch.allclose(s_b.exp().sum(-1), torch.ones(20), atol=1e-5)
    assert torch.allclose(t_b[:, :4], t.topk(4, -1).values)
    assert (forward_kl(t_b, s_b) >= -1e-6).all()
    # merging tokens into a bucket can only lose information (data processing inequality)
    assert (forward_kl(t_b, s_b) <= forward_kl(t, s) + 1e-5).all()


def test_temperature_applies_to_both_sides_and_scales_by_t_squared():
    s_logits, t_logits = torch.randn(6, 10), torch.randn(6, 10)
    want = forward_kl(torch.log_softmax(t_logits / 2, -1), torch.log_softmax(s_logits / 2, -1)) * 4
    assert torch.allclose(token_divergence(s_logits, t_logits, "forward", temperature=2.0), want, atol=1e-6)


def test_teacher_temperature_sharpens_the_teacher_alone():
    # tau = 0.5: p_t = [0.5, 0.3, 0.2] becomes p_t^2 renormalised = [25, 9, 4] / 38
    sharp = [25 / 38, 9 / 38, 4 / 38]
    got = token_divergence(logp(P_S), logp(P_T), "forward", teacher_temperature=0.5)
    assert got.item() == pytest.approx(kl_by_hand(sharp, P_S), abs=1e-6)
    # with a common temperature T too: the teacher at T * tau, the student at T, scaled by T^2
    s_logits, t_logits = torch.randn(6, 10), torch.randn(6, 10)
    want = forward_kl(torch.log_softmax(t_logits / 1.0, -1), torch.log_softmax(s_logits / 2, -1)) * 4
    assert torch.allclose(token_divergence(s_logits, t_logits, "forward", temperature=2.0, teacher_temperature=0.5),
                          want, atol=1e-6)


@pytest.mark.parametrize("top_k", [0, 5])
def test_chunked_kd_loss_equals_one_chunk_with_gradients(top_k):
    torch.manual_seed(0)
    hs, ws = torch.randn(37, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    ht, wt = torch.randn(37, 12), torch.randn(20, 12)
    grads = []
    for chunk in (5, 1000):
        loss = kd_loss(hs, ws, ht, wt, "jsd", 0.3, 1.0, top_k, chunk, teacher_temperature=0.7)
        g = torch.autograd.grad(loss, (hs, ws))
        grads.append((loss.detach(), *g))
    want = token_divergence(hs @ ws.t(), ht @ wt.t(), "jsd", 0.3, 1.0, top_k, teacher_temperature=0.7).sum()
    assert torch.allclose(grads[0][0], want, atol=1e-5)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)


# ----------------------------------------------------------------------------- masking

def tiny_gpt(seed, layers=2, width=32, vocab=50, pos_embedding="learned"):
    torch.manual_seed(seed)
    m = GPT(GPTConfig(vocab_size=vocab, block_size=32, n_layer=layers, n_head=2, n_embd=width,
                      pos_embedding=pos_embedding))
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0 / p.shape[1] ** 0.5 * 2)
    return m


CFG = dict(div="jsd", beta=0.3, temperature=1.0, teacher_temperature=0.5, top_k=0, chunk=7, ce_weight=0.0)


def test_prompt_and_padding_contribute_nothing():
    student, teacher = tiny_gpt(0, 1, 16), tiny_gpt(1)
    pad_id = 0
    rows = [([5, 6, 7, 8, 9, 10, 11], [0, 0, 0, 1, 1, 1, 1]), ([12, 13, 14, 15], [0, 0, 1, 1]),
            ([20, 21, 22, 23, 24, 25], [0, 1, 1, 0, 1, 1])]  # the last: a tool output inside the response
    T = max(len(r[0]) for r in rows)
    ids = torch.tensor([r[0] + [pad_id] * (T - len(r[0])) for r in rows])
    mask = torch.tensor([r[1] + [0] * (T - len(r[1])) for r in rows])
    loss = batch_loss(student, student, teacher, ids, mask, "logit", CFG)
    # padding: the batch is the sum of its rows run alone, unpadded
    alone = sum(batch_loss(student, student, teacher, torch.tensor([i]), torch.tensor([m]), "logit", CFG)
                for i, m in rows)
    assert torch.allclose(loss, alone, atol=1e-5)
    # prompt: the slow sum over every position of mask x divergence equals it, while the divergence
    # at the masked-out positions is not zero (so counting them would show)
    with torch.no_grad():
        per_pos = token_divergence(student.logits(ids[:, :-1]).flatten(0, 1), teacher.logits(ids[:, :-1]).flatten(0, 1),
                                   "jsd", 0.3, teacher_temperature=0.5).view(len(rows), T - 1)
    assert torch.allclose(loss, (per_pos * mask[:, 1:]).sum(), atol=1e-5)
    assert (per_pos * (1 - mask[:, 1:])).sum() > 0.1
    # the hard-label loss too: -sum of log-probs of the response tokens only
    ce = batch_loss(student, student, teacher, ids, mask, "sft", CFG)
    logp = torch.log_softmax(student.logits(ids[:, :-1]), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(ce, -(logp * mask[:, 1:]).sum(), atol=1e-4)


# ----------------------------------------------------------------------------- student from teacher

def calibration():
    """4 rows of 12 random tokens of the 50-token vocabulary; the second half is the response."""
    ids = torch.randint(1, 50, (4, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros_like(ids)
    mask[:, 6:] = 1
    return ids, mask


def loss_of(model, ids, mask):
    logp = torch.log_softmax(model.logits(ids[:, :-1]), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (-(logp * mask[:, 1:]).sum() / mask[:, 1:].sum()).item()


@pytest.mark.parametrize("pos_embedding", ["learned", "rope"])
def test_pruning_to_the_full_size_reproduces_the_teacher(pos_embedding):
    teacher = tiny_gpt(2, layers=3, pos_embedding=pos_embedding)
    ids, mask = calibration()
    student = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=3, n_head=2, n_embd=32, pos_embedding=pos_embedding))
    assert prune_from_teacher(student, teacher, ids, mask, pad_id=0) == [0, 1, 2]
    with torch.no_grad():
        assert torch.allclose(student.logits(ids), teacher.logits(ids), atol=1e-5)


def test_head_ablation_losses_match_models_without_that_head():
    teacher = tiny_gpt(4, layers=3)
    ids, mask = calibration()
    losses = head_ablation_losses(teacher, ids, mask)
    for i in range(3):
        for h in range(2):  # the same model with head h's 16 columns of the output projection zeroed
            headless = copy.deepcopy(teacher)
            with torch.no_grad():
                headless.transformer.h[i].attn.c_proj.weight[:, h * 16:(h + 1) * 16] = 0
            assert losses[i][h].item() == pytest.approx(loss_of(headless, ids, mask), abs=1e-5)


def test_pruned_student_keeps_first_and_last_layer_and_the_costliest_heads_whole():
    teacher = tiny_gpt(3, layers=4)
    ids, mask = calibration()
    student = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=1, n_embd=16))
    assert prune_from_teacher(student, teacher, ids, mask, pad_id=0) == [0, 3]
    # the student's channels are teacher channels; its q rows are exactly one whole teacher head,
    # the one whose removal raises the teacher's loss most
    tw, sw = teacher.transformer.wte.weight, student.transformer.wte.weight
    ch = [next(c for c in range(32) if torch.equal(tw[:, c], sw[:, j])) for j in range(16)]
    tq, sq = teacher.transformer.h[3].attn.c_attn.weight[:32], student.transformer.h[1].attn.c_attn.weight[:16]
    rows = [next(i for i in range(32) if torch.equal(tq[i, ch], sq[r])) for r in range(16)]
    head = head_ablation_losses(teacher, ids, mask)[3].argmax().item()
    assert rows == list(range(head * 16, (head + 1) * 16))
    assert student.num_params(embeddings=False) * 4 < teacher.num_params(embeddings=False)


def test_seq_filter_uses_verifiers():
    import tasks
    math_task = tasks.make_tasks("math", "train", 1)[0]
    safety = tasks.make_tasks("safety", "train", 1)[0]
    keep = verified([math_task, math_task, safety, None],
                    [f"Answer: {math_task.answer}", "Answer: -1", "anything", "anything"])
    assert keep == [True, False, True, True]


# ----------------------------------------------------------------------------- learning

def test_logit_kd_student_kl_to_teacher_falls():
    teacher = tiny_gpt(4)
    student = tiny_gpt(5, layers=1, width=16)
    g = torch.Generator().manual_seed(0)
    examples = [(torch.randint(1, 50, (10,), generator=g).tolist(), [0] * 4 + [1] * 6) for _ in range(32)]
    before = kl_to_teacher(student, teacher, examples, 0, "cpu")
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    ids, mask = torch.tensor([e[0] for e in examples]), torch.tensor([e[1] for e in examples])
    cfg = dict(CFG, div="forward")
    for _ in range(40):
        loss = batch_loss(student, student, teacher, ids, mask, "logit", cfg) / mask[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = kl_to_teacher(student, teacher, examples, 0, "cpu")
    assert after < 0.5 * before, (before, after)


# ----------------------------------------------------------------------------- smoke

@pytest.mark.parametrize("mode", ["logit", "seq", "onpolicy", "sft"])
def test_tiny_distill_runs_every_mode(tiny_sft, tmp_path, mode):
    out = tmp_path / "student.pt"
    # the baseline and the evaluation do not depend on the mode: run them once, with logit
    extra = {"logit": ["--student-init", "random"], "onpolicy": ["--div", "jsd", "--top-k", "8", "--lmbda", "1"],
             "seq": [], "sft": []}[mode] + ([] if mode == "logit" else ["--baseline", "false", "--eval-tasks", "0"])
    proc = run_script("distill.py", "--preset", "tiny", "--init", tiny_sft / "sft.pt", "--out", out,
                      "--mode", mode, *extra)
    ck = load_checkpoint(out)
    m = ck["metrics"]
    assert ck["stage"] == "student" and ck["parent"] == str(tiny_sft / "sft.pt")
    assert 0 < m["params_nonemb"] < m["teacher_params_nonemb"] / 4 and m["kl_to_teacher"] >= 0
    assert (out.parent / "student.jsonl").exists() and "non-embedding params" in proc.stdout
    if mode == "logit":
        assert {"math_acc", "tool_acc"} <= set(m) & set(m["teacher"]) & set(m["baseline"])
        assert "baseline" in proc.stdout and "teacher" in proc.stdout
    if mode == "seq":
        assert 0 <= m["seq_keep_rate"] <= 1
