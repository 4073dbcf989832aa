"""model.py: padding-aware attention, the KV-cache sampler, the chunked log-prob kernel,
checkpoints. The references are slow obvious implementations: full forwards recomputed from
scratch at every step, log_softmax on the whole logits matrix, plain-Python top-k/top-p."""
import math
import os
import random

import pytest
import torch

from conftest import tiny_gpt
from data import pad_prompts, render_prompt
from model import (GPT, CheckpointError, GPTConfig, KVCache, apply_rope, attention_mask, document_layout, load_checkpoint,
                   rope_angles, sample_token, save_checkpoint, sequence_logprobs, token_logprobs)

PROMPTS = ["hi", "What is 12+34?", "def add_7(x):\n    return x + 7",
           "for i in range(10):\n    print(i * 3)"]


def prompts(tok, texts=PROMPTS):
    return [render_prompt(tok, t) for t in texts]


def last_logits(model, seq):
    """Logits for the token after seq, from a full forward of seq alone (no cache, no padding)."""
    with torch.no_grad():
        return model.logits(torch.tensor([seq]))[0, -1]


def naive_greedy(model, prompt, n, stop=(), tool=None):
    """The reference sampler: greedy, recomputing the whole prefix every step.

    tool = (trigger, fn): after the model picks trigger, fn(response so far) is inserted.
    Returns tokens, logprobs (under temperature 1), sampled flags, finished, fn's arguments.
    """
    seq, toks, lps, flags, queue, calls = list(prompt), [], [], [], [], []
    finished = False
    for _ in range(n):
        if queue:
            t, lp, s = queue.pop(0), 0.0, 0
        else:
            logp = torch.log_softmax(last_logits(model, seq).double(), -1)
            t = int(logp.argmax())
            lp, s = float(logp[t]), 1
        seq.append(t)
        toks.append(t)
        lps.append(lp)
        flags.append(s)
        if s and tool is not None and t == tool[0]:
            calls.append(list(toks))
            queue = list(tool[1](list(toks)))
        if s and t in stop:
            finished = True
            break
    return toks, lps, flags, finished, calls


def naive_truncated_logp(logits, temperature, top_k, top_p):
    """{token: log-prob} of the kept tokens: temperature, then the top_k largest, then the
    smallest prefix (by decreasing probability) whose mass reaches top_p, renormalised."""
    z = [x / temperature for x in logits.double().tolist()]
    order = sorted(range(len(z)), key=lambda i: -z[i])[:top_k]
    m = max(z)
    w = {i: math.exp(z[i] - m) for i in order}
    total = sum(w.values())
    keep, mass = [], 0.0
    for i in order:
        if mass >= top_p:
            break
        keep.append(i)
        mass += w[i] / total
    kept = sum(w[i] for i in keep)
    return {i: math.log(w[i] / kept) for i in keep}


def gen(model, tok, prompt_list, n, **kw):
    ids, mask = pad_prompts(tok, prompt_list)
    kw.setdefault("pad_id", tok.pad_id)
    return model.generate(ids, mask, n, **kw)


@pytest.fixture(params=["learned", "rope"])
def model(request, tok):
    """Every test here runs on both position schemes: padding, cache and sampler must not care."""
    return tiny_gpt(tok, request.param)


# ----------------------------------------------------------------------------- positions


def test_rope_rotates_pairs_by_hand_computed_angles():
    # head size 4: frequencies theta^0 = 1 and theta^(-1/2) = 1/10 for theta = 100
    cos, sin = rope_angles(torch.tensor([[3]]), 4, 100.0)
    assert torch.allclose(cos.flatten(), torch.tensor([math.cos(3), math.cos(0.3)]))
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)  # pairs (x0, x2) = (1, 3), (x1, x3) = (2, 4)
    y = apply_rope(x, cos, sin).flatten()
    a, b = 3.0, 0.3
    want = [1 * math.cos(a) - 3 * math.sin(a), 2 * math.cos(b) - 4 * math.sin(b),
            1 * math.sin(a) + 3 * math.cos(a), 2 * math.sin(b) + 4 * math.cos(b)]
    assert torch.allclose(y, torch.tensor(want), atol=1e-6)
    assert torch.allclose(y.norm(), x.norm())  # a rotation


def test_rope_scores_depend_only_on_distance():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    def score(m, n):
        return (apply_rope(q, *rope_angles(torch.tensor([[m]]), 8, 10000.0))
                * apply_rope(k, *rope_angles(torch.tensor([[n]]), 8, 10000.0))).sum()
    assert torch.allclose(score(5, 2), score(40, 37), atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 3), atol=1e-3)


def test_rope_model_has_no_position_table_and_caches_rotated_keys(tok):
    m = tiny_gpt(tok, "rope")
    assert "transformer.wpe.weight" not in dict(m.named_parameters())
    assert m.num_params(embeddings=False) == m.num_params() - m.transformer.wte.weight.numel()
    ids, prefix = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[9, 9, 9]])
    with torch.no_grad():
        full = m.logits(torch.cat([prefix, ids], 1))[:, 3:]
        cache = KVCache(m.config, 1, 8, "cpu", torch.float32)
        m(prefix, None, cache)  # the cached keys were rotated at positions 0-2
        continued = m.lm_head(m(ids, None, cache))  # these at 3-6
    assert torch.allclose(full, continued, atol=1e-5)


def test_bad_position_scheme_raises():
    with pytest.raises(ValueError, match="pos_embedding"):
        GPT(GPTConfig(pos_embedding="alibi"))
    with pytest.raises(ValueError, match="even head size"):
        GPT(GPTConfig(n_embd=12, n_head=4, pos_embedding="rope"))


# ----------------------------------------------------------------------------- attention

def test_left_padded_logits_equal_row_alone(model, tok):
    ps = prompts(tok)
    ids, mask = pad_prompts(tok, ps)
    with torch.no_grad():
        batch = model.logits(ids, mask)
        assert torch.isfinite(batch).all()  # pads see themselves: no NaN anywhere
        for i, p in enumerate(ps):
            alone = model.logits(torch.tensor([p]))[0]
            assert torch.allclose(batch[i, ids.shape[1] - len(p):], alone, atol=1e-5, rtol=0)


def test_attention_mask_hand_computed():
    key_valid = torch.tensor([[0, 1, 1], [1, 1, 1]])
    m = attention_mask(key_valid, 3)
    assert m.shape == (2, 1, 3, 3) and m.dtype == torch.bool
    # row 0: the pad query sees only itself (else SDPA gives NaN that leaks through its keys)
    assert m[0, 0].int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert m[1, 0].int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    # one new query over 3 keys (a cached decoding step)
    assert attention_mask(key_valid, 1)[:, 0].int().tolist() == [[[0, 1, 1]], [[1, 1, 1]]]


def test_right_padding_needs_no_mask(model, tok):
    ps = prompts(tok)
    T = max(map(len, ps))
    ids = torch.tensor([p + [tok.pad_id] * (T - len(p)) for p in ps])
    with torch.no_grad():
        batch = model.logits(ids)
        for i, p in enumerate(ps):
            assert torch.allclose(batch[i, :len(p)], model.logits(torch.tensor([p]))[0], atol=1e-5, rtol=0)


def test_positions_come_from_the_mask(tok):
    model = tiny_gpt(tok, "learned")  # the positions are read where the learned table is looked up
    seen = []
    hook = model.transformer.wpe.register_forward_hook(lambda m, inp, out: seen.append(inp[0].clone()))
    try:
        ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5], [0, 0, 0, 0, 9]])
        mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
        with torch.no_grad():
            model(ids, mask)
            model(ids)
            cache = KVCache(model.config, 3, 8, "cpu", torch.float32)
            model(ids, mask, cache)
            model(torch.tensor([[1], [1], [1]]), torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1), cache)
    finally:
        hook.remove()
    assert seen[0].tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]
    assert seen[1].tolist() == [[0, 1, 2, 3, 4]] * 3
    assert seen[2].tolist() == seen[0].tolist()
    assert seen[3].tolist() == [[3], [5], [1]]  # the next position of each row, not 5
    assert cache.length == 6


def test_sequence_longer_than_block_size_raises(model):
    with pytest.raises(ValueError, match="block_size 64"):
        model(torch.zeros(1, 65, dtype=torch.long))


# ----------------------------------------------------------------------------- sampler

def test_greedy_with_cache_equals_full_recompute(model, tok):
    for p in prompts(tok):
        out = gen(model, tok, [p], 20, temperature=0)
        toks, lps, flags, finished, _ = naive_greedy(model, p, 20)
        assert out["tokens"][0].tolist() == toks
        assert torch.allclose(out["logprobs"][0].double(), torch.tensor(lps, dtype=torch.float64), atol=1e-5)
        assert out["sampled"][0].tolist() == [1] * 20 and not out["finished"][0]
    assert len(set(toks)) > 5  # the model does not just repeat itself: the test has teeth


def test_left_padded_batch_equals_rows_alone(model, tok):
    ps = prompts(tok)
    batch = gen(model, tok, ps, 20, temperature=0)
    for i, p in enumerate(ps):
        alone = gen(model, tok, [p], 20, temperature=0)
        assert batch["tokens"][i].tolist() == alone["tokens"][0].tolist()
        assert torch.allclose(batch["logprobs"][i], alone["logprobs"][0], atol=1e-5, rtol=0)


def test_rows_stop_at_stop_token_and_are_padded(model, tok):
    ps = prompts(tok)
    free = gen(model, tok, ps, 20, temperature=0)["tokens"]
    stop = int(free[0, 3])  # row 0 stops early at step <= 3; others wherever stop first appears
    out = gen(model, tok, ps, 20, temperature=0, stop_ids=(stop,))
    n_finished = 0
    for i, p in enumerate(ps):
        toks, lps, flags, finished, _ = naive_greedy(model, p, 20, stop=(stop,))
        n = len(toks)
        assert out["tokens"][i, :n].tolist() == toks
        assert out["tokens"][i, n:].tolist() == [tok.pad_id] * (20 - n)
        assert out["logprobs"][i, n:].tolist() == [0.0] * (20 - n)
        assert out["sampled"][i].tolist() == [1] * n + [0] * (20 - n)
        assert torch.allclose(out["logprobs"][i, :n].double(), torch.tensor(lps, dtype=torch.float64), atol=1e-5)
        assert bool(out["finished"][i]) == finished
        n_finished += finished
    assert out["finished"][0] and 1 <= n_finished < len(ps)  # some rows ran on after others ended


def test_sampled_logprobs_equal_full_forward_recompute(model, tok):
    ps = prompts(tok)
    T, K, P_ = 0.7, 20, 0.9
    g = torch.Generator().manual_seed(0)
    out = gen(model, tok, ps, 24, temperature=T, top_k=K, top_p=P_, generator=g)
    n_checked = 0
    for i, p in enumerate(ps):
        toks = out["tokens"][i].tolist()
        with torch.no_grad():
            logits = model.logits(torch.tensor([p + toks]))[0, len(p) - 1:-1]
        for t, (tk, lp) in enumerate(zip(toks, out["logprobs"][i].tolist())):
            ref = naive_truncated_logp(logits[t], T, K, P_)
            assert tk in ref, "sampled a token outside the top-k/top-p set"
            # fp32 logits up to ~10 from two different computation orders (cache vs full)
            assert math.isclose(lp, ref[tk], rel_tol=1e-5, abs_tol=1e-5), (lp, ref[tk])
            n_checked += 1
    assert n_checked == 24 * len(ps)
    assert (out["logprobs"] < -1e-3).any()  # a real distribution, not collapsed to one token


def test_tool_hook_inserts_unsampled_tokens(model, tok):
    ps = prompts(tok)[:3]
    trigger = gen(model, tok, ps[:1], 1, temperature=0)["tokens"][0, 0].item()
    assert trigger not in (tok.end_id, tok.call_id)
    inserted = [tok.role_id["tool"]] + tok.encode("4") + [tok.end_id, tok.role_id["assistant"]]
    calls = []

    def fn(response):
        calls.append(list(response))
        return inserted

    out = gen(model, tok, ps, 16, temperature=0, stop_ids=(tok.end_id,), tool=(trigger, fn))
    expected_calls = []
    for i, p in enumerate(ps):
        toks, lps, flags, finished, row_calls = naive_greedy(
            model, p, 16, stop=(tok.end_id,), tool=(trigger, lambda r: inserted))
        n = len(toks)
        expected_calls += row_calls
        assert out["tokens"][i, :n].tolist() == toks
        assert out["sampled"][i, :n].tolist() == flags
        assert torch.allclose(out["logprobs"][i, :n].double(), torch.tensor(lps, dtype=torch.float64), atol=1e-5)
        assert bool(out["finished"][i]) == finished
    # row 0: the trigger, then the tool's tokens, not sampled, log-prob 0, then the model again;
    # the inserted <|end|> does not end the row
    assert out["tokens"][0, :1 + len(inserted)].tolist() == [trigger] + inserted
    assert out["sampled"][0, :1 + len(inserted)].tolist() == [1] + [0] * len(inserted)
    assert out["logprobs"][0, 1:1 + len(inserted)].tolist() == [0.0] * len(inserted)
    assert out["sampled"][0, 1 + len(inserted)] == 1
    assert sorted(calls) == sorted(expected_calls) and [trigger] in calls


def test_top_k_1_equals_greedy(model, tok):
    ps = prompts(tok)
    greedy = gen(model, tok, ps, 16, temperature=0)
    out = gen(model, tok, ps, 16, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out["tokens"], greedy["tokens"])
    assert out["logprobs"].abs().max() < 1e-6  # the only allowed token has probability 1


def test_seeded_generator_reproduces_samples(model, tok):
    ps = prompts(tok)
    kw = dict(temperature=1.0, top_p=0.95)
    torch.manual_seed(1)
    a = gen(model, tok, ps, 20, generator=torch.Generator().manual_seed(123), **kw)
    torch.manual_seed(2)  # the global RNG must not matter
    b = gen(model, tok, ps, 20, generator=torch.Generator().manual_seed(123), **kw)
    c = gen(model, tok, ps, 20, generator=torch.Generator().manual_seed(124), **kw)
    assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["logprobs"], b["logprobs"])
    assert not torch.equal(a["tokens"], c["tokens"])


def test_generate_clamps_to_block_size(model, tok):
    p = list(range(60))
    out = gen(model, tok, [p], 20, temperature=0)
    assert out["tokens"].shape == (1, 4)
    toks, *_ = naive_greedy(model, p, 4)
    assert out["tokens"][0].tolist() == toks


def test_sample_token_hand_computed():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    # greedy: argmax, log-prob under temperature 1
    nxt, lp = sample_token(logits[:2], 0, 0, 1.0)
    assert nxt.tolist() == [0, 0] and torch.allclose(lp, torch.tensor([math.log(0.5)] * 2))
    # top_p 0.7: {0.5, 0.3} reaches it, renormalised to 5/8 and 3/8
    nxt, lp = sample_token(logits, 1.0, 0, 0.7, g)
    assert set(nxt.tolist()) == {0, 1}
    ref = torch.tensor([math.log(5 / 8), math.log(3 / 8)])
    assert torch.allclose(lp, ref[nxt], atol=1e-6)
    assert abs((nxt == 0).float().mean().item() - 5 / 8) < 0.03
    # temperature 0.5 and top_k 2: p^2 over {0, 1} -> 0.25/0.34 and 0.09/0.34
    nxt, lp = sample_token(logits, 0.5, 2, 1.0, g)
    assert set(nxt.tolist()) == {0, 1}
    ref = torch.tensor([math.log(0.25 / 0.34), math.log(0.09 / 0.34)])
    assert torch.allclose(lp, ref[nxt], atol=1e-6)
    assert abs((nxt == 0).float().mean().item() - 0.25 / 0.34) < 0.03
    # temperature 2, no truncation: sqrt(p) renormalised
    nxt, lp = sample_token(logits, 2.0, 0, 1.0, g)
    s = probs.sqrt()
    assert torch.allclose(lp, (s / s.sum()).log()[nxt], atol=1e-6)
    assert set(nxt.tolist()) == {0, 1, 2, 3}


# ----------------------------------------------------------------------------- log-prob kernel

@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("needs", ["both", "hidden", "weight"])
def test_token_logprobs_matches_naive(temperature, needs):
    torch.manual_seed(0)
    B, T, C, V = 3, 13, 16, 53  # 39 tokens in chunks of 8 (the last partial); the backward's
    # blocks of 8 * 53 // 39 = 10 vocab rows (the last partial), each target in one of them
    h0, w0 = torch.randn(B, T, C), torch.randn(V, C) * 0.5
    targets = torch.randint(V, (B, T))
    up = torch.randn(B, T)  # random upstream gradient weights

    def run(fn):
        h = h0.clone().requires_grad_(needs in ("both", "hidden"))
        w = w0.clone().requires_grad_(needs in ("both", "weight"))
        lp = fn(h, w)
        (lp * up).sum().backward()
        return lp.detach(), h.grad, w.grad

    def naive(h, w):
        return torch.log_softmax(h @ w.T / temperature, -1).gather(-1, targets[..., None]).squeeze(-1)

    lp, gh, gw = run(lambda h, w: token_logprobs(h, w, targets, temperature, chunk=8))
    lp_ref, gh_ref, gw_ref = run(naive)
    assert lp.shape == (B, T) and lp.dtype == torch.float32
    assert torch.allclose(lp, lp_ref, atol=1e-5, rtol=0)
    # gradients against the float64 truth, to 1e-5 of their scale: the backward recomputes the
    # logits in other blocks than the forward, and exp() turns their last-bit differences into
    # ~1e-6 relative ones (2e-5 absolute on a weight gradient of 13, which one BLAS build gave)
    h0, w0, up = h0.double(), w0.double(), up.double()
    _, gh64, gw64 = run(naive)
    for g, g64 in ((gh, gh64), (gw, gw64)):
        assert (g is None) == (g64 is None)
        if g is not None:
            assert (g.double() - g64).abs().max() <= 1e-5 * g64.abs().max()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_entropy(temperature):
    torch.manual_seed(1)
    h, w = torch.randn(37, 16), torch.randn(50, 16)
    targets = torch.randint(50, (37,))
    lp, ent = token_logprobs(h, w, targets, temperature, chunk=5, entropy=True)
    logp = torch.log_softmax(h @ w.T / temperature, -1)
    assert torch.allclose(lp, logp.gather(1, targets[:, None]).squeeze(1), atol=1e-5, rtol=0)
    assert torch.allclose(ent, -(logp.exp() * logp).sum(-1), atol=1e-5, rtol=0)
    # hand-computed: a uniform distribution over V has entropy log V
    _, ent0 = token_logprobs(torch.zeros(2, 16), w, targets[:2], temperature, entropy=True)
    assert torch.allclose(ent0, torch.full((2,), math.log(50)), atol=1e-6)


def test_document_layout_by_hand():
    pos, mask = document_layout(torch.tensor([[0, 0, 1, 1, 1, -1]]))
    assert pos.tolist() == [[0, 1, 0, 1, 2, 0]]
    expect = [[1, 0, 0, 0, 0, 0],
              [1, 1, 0, 0, 0, 0],
              [0, 0, 1, 0, 0, 0],
              [0, 0, 1, 1, 0, 0],
              [0, 0, 1, 1, 1, 0],
              [0, 0, 0, 0, 0, 1]]
    assert mask.shape == (1, 1, 6, 6) and mask[0, 0].int().tolist() == expect


@pytest.mark.parametrize("pos_embedding", ["learned", "rope"])
def test_packed_row_matches_each_conversation_alone(tok, pos_embedding):
    model = tiny_gpt(tok, pos_embedding)
    seqs = prompts(tok)[:3]
    row = torch.tensor([[t for s in seqs for t in s] + [tok.pad_id] * 4])
    doc = torch.tensor([[k for k, s in enumerate(seqs) for _ in s] + [-1] * 4])
    with torch.no_grad():
        packed = model(row, doc_ids=doc)[0]
        start = 0
        for s in seqs:
            alone = model(torch.tensor([s]))[0]
            assert torch.allclose(packed[start:start + len(s)], alone, atol=1e-5)
            start += len(s)
    with pytest.raises(ValueError, match="doc_ids"):
        model(row, attn_mask=torch.ones_like(row), doc_ids=doc)


def test_sequence_logprobs_matches_naive(model, tok):
    ids, mask = pad_prompts(tok, prompts(tok))
    up = torch.randn(ids.shape[0], ids.shape[1] - 1, generator=torch.Generator().manual_seed(0))
    model.zero_grad()
    lp = sequence_logprobs(model, ids, mask, temperature=0.7)
    (lp * up).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = torch.log_softmax(model.logits(ids[:, :-1], mask[:, :-1]) / 0.7, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    (ref * up).sum().backward()
    assert torch.allclose(lp, ref, atol=1e-5, rtol=0)
    for n, p in model.named_parameters():
        # float32 rounding, against the tensor's scale: the kernel applies 1/T at another point
        assert (grads[n] - p.grad).abs().max() <= 1e-5 * p.grad.abs().max().clamp(min=1.0), n


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip(model, tok, tmp_path):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    sequence_logprobs(model, torch.tensor([prompts(tok)[1]])).sum().backward()
    opt.step()
    model.eval()
    path = tmp_path / "ckpt" / "sft.pt"
    save_checkpoint(path, model, tok, "sft", parent="pretrain.pt", config={"lr": 1e-3},
                    metrics={"loss": 1.5}, optimizer=opt, step=7)
    assert os.listdir(tmp_path / "ckpt") == ["sft.pt"]  # atomic: no temp file left behind
    ck = load_checkpoint(path)
    m2, tok2 = ck["model"], ck["tokenizer"]
    assert not m2.training and m2.config == model.config
    ids, mask = pad_prompts(tok, prompts(tok))
    with torch.no_grad():
        assert torch.equal(m2.logits(ids, mask), model.logits(ids, mask))
    assert m2.lm_head.weight is m2.transformer.wte.weight  # still tied after loading
    assert tok2.state() == tok.state()
    for s in PROMPTS + ["<|end|> 90210 日本🤖"]:
        assert tok2.encode(s) == tok.encode(s)
    assert (ck["stage"], ck["parent"], ck["config"], ck["metrics"], ck["step"], ck["path"]) == (
        "sft", "pretrain.pt", {"lr": 1e-3}, {"loss": 1.5}, 7, path)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    opt2.load_state_dict(ck["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_checkpoint_save_is_atomic(model, tok, tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, tok, "pretrain")
    save_checkpoint(path, model, tok, "sft")  # overwriting is fine
    with pytest.raises(Exception):  # a failing save (unpicklable config) ...
        save_checkpoint(path, model, tok, "dpo", config={"f": lambda: 0})
    assert os.listdir(tmp_path) == ["m.pt"]  # ... leaves no temp file
    assert load_checkpoint(path)["stage"] == "sft"  # ... and the old checkpoint intact


def test_corrupt_checkpoints_raise_checkpoint_error(model, tok, tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, model, tok, "pretrain")
    data = good.read_bytes()
    cases = {}
    cases["truncated.pt"] = data[:len(data) // 2]
    cases["random.pt"] = random.Random(0).randbytes(4096)
    cases["empty.pt"] = b""
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    torch.save({"weights": torch.zeros(3), "step": 1}, tmp_path / "foreign.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    obj = torch.load(good, weights_only=True)
    torch.save({k: v for k, v in obj.items() if k != "tokenizer"}, tmp_path / "lacks.pt")
    bad_cfg = dict(obj, model_config=dict(obj["model_config"], n_embd=64))
    torch.save(bad_cfg, tmp_path / "badcfg.pt")
    expect = {"truncated.pt": "unreadable", "random.pt": "unreadable", "empty.pt": "unreadable",
              "foreign.pt": "not a poststack checkpoint", "list.pt": "not a poststack checkpoint",
              "lacks.pt": "lacks ['tokenizer']", "badcfg.pt": "do not match",
              "missing.pt": "no such checkpoint"}
    for name, reason in expect.items():
        path = str(tmp_path / name)
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
        assert path in str(e.value), name
        assert reason in str(e.value), (name, str(e.value))


def test_model_config_round_trips_through_checkpoint(tok, tmp_path):
    from model import GPT
    torch.manual_seed(3)
    m = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=8,
                      scalar_head=True)).eval()
    save_checkpoint(tmp_path / "rm.pt", m, tok, "rm")
    m2 = load_checkpoint(tmp_path / "rm.pt")["model"]
    assert m2.config == m.config and m2.score_head is not None
    h = torch.randn(2, 3, 8)
    assert torch.equal(m2.score(h), m.score(h))
