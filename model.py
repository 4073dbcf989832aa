"""GPT (the GPT-2 architecture), the KV-cache sampler, the chunked log-prob kernel, checkpoints.

GPT-2's layout and parameter names (transformer.wte/wpe/h.N.attn.c_attn/...), so real GPT-2
weights map onto it one to one. Positions are taken from the attention mask, so a left-padded
batch gives every row the positions it would have alone. They are GPT-2's learned position
embeddings (`pos_embedding="learned"`) or rotary embeddings (`"rope"`, Su et al. 2021, as in
Llama), which the built-in world trains with: see pretrain.py for why.
"""
import dataclasses
import math
import os
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass
class GPTConfig:
    vocab_size: int = 1032
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    scalar_head: bool = False  # a linear head giving one number per position (reward / value)
    pos_embedding: str = "learned"  # "learned" (GPT-2's wpe) or "rope" (rotary, no wpe)
    rope_theta: float = 10000.0


def rope_angles(pos, head_dim, theta):
    """Positions (B, T) -> (cos, sin), each (B, 1, T, head_dim/2): angle pos * theta^(-2i/head_dim)
    for frequency i (RoFormer, Su et al. 2021, eq. 15)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    angle = pos[:, None, :, None].float() * inv_freq
    return angle.cos(), angle.sin()


def apply_rope(x, cos, sin):
    """Rotate each pair (x_i, x_{i+D/2}) of x (B, H, T, D) by its angle: the half-split layout of
    GPT-NeoX and Llama. Rotating q and k alike makes q_m . k_n depend only on m - n."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # fp32 angles; bf16 under autocast, as q and v
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x, mask, cache, layer, rope):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if rope is not None:  # before caching: cached keys keep their own positions' rotation
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        p = self.dropout if self.training else 0.0
        if mask is None:  # no padding before any real token: plain causal (the flash path)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.ModuleDict(dict(c_fc=nn.Linear(cfg.n_embd, 4 * cfg.n_embd),
                                      c_proj=nn.Linear(4 * cfg.n_embd, cfg.n_embd)))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask, cache, layer, rope):
        x = x + self.drop(self.attn(self.ln_1(x), mask, cache, layer, rope))
        h = F.gelu(self.mlp.c_fc(self.ln_2(x)), approximate="tanh")  # GPT-2's GELU
        return x + self.drop(self.mlp.c_proj(h))


class KVCache:
    """Preallocated keys/values for every layer; `length` positions are filled."""

    def __init__(self, cfg, batch, max_len, device, dtype):
        shape = (cfg.n_layer, batch, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def update(self, layer, k, v):
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def keep(self, rows):
        """Drop finished rows so they stop costing compute."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]


def attention_mask(key_valid, T):
    """(B, S) key validity -> (B, 1, T, S) bool mask for the last T queries: causal and no pads.

    A query sitting on a pad would see no key at all and SDPA would return NaN, so every query
    may always see its own position; outputs at pads are never used.
    """
    S = key_valid.shape[1]
    q_pos = torch.arange(S - T, S, device=key_valid.device)[:, None]
    causal = torch.arange(S, device=key_valid.device)[None, :] <= q_pos
    mask = causal[None] & key_valid[:, None, :].bool()
    mask |= torch.arange(S, device=key_valid.device)[None, None, :] == q_pos[None]
    return mask[:, None]


def document_layout(doc_ids):
    """Packed rows -> (positions, mask). doc_ids (B, T) numbers the document each token belongs
    to (consecutive tokens of one document share a number). Positions restart at 0 with each
    document and the (B, 1, T, T) bool mask lets a token see only earlier tokens of its own
    document: several conversations in one row train exactly as they would alone."""
    B, T = doc_ids.shape
    idx = torch.arange(T, device=doc_ids.device).expand(B, T)
    first = torch.ones_like(doc_ids, dtype=torch.bool)
    first[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    start = torch.where(first, idx, torch.zeros_like(idx)).cummax(1).values  # each token's document start
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    mask = causal & (doc_ids[:, :, None] == doc_ids[:, None, :])
    return idx - start, mask[:, None]


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.pos_embedding not in ("learned", "rope"):
            raise ValueError(f"pos_embedding must be 'learned' or 'rope', not {cfg.pos_embedding!r}")
        if cfg.pos_embedding == "rope" and (cfg.n_embd // cfg.n_head) % 2:
            raise ValueError(f"rope needs an even head size, not {cfg.n_embd // cfg.n_head}")
        self.config = cfg
        learned = cfg.pos_embedding == "learned"  # wpe keeps its place: GPT-2 models initialise as before
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            **(dict(wpe=nn.Embedding(cfg.block_size, cfg.n_embd)) if learned else {}),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd)))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied embeddings, as GPT-2
        self.score_head = nn.Linear(cfg.n_embd, 1) if cfg.scalar_head else None
        self.apply(self._init)
        for name, p in self.named_parameters():  # GPT-2: residual projections scaled by depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def num_params(self, embeddings=True):
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= sum(self.transformer[name].weight.numel() for name in ("wte", "wpe") if name in self.transformer)
        return n

    def forward(self, idx, attn_mask=None, cache=None, doc_ids=None):
        """Token ids (B, T) -> final hidden states (B, T, C), after ln_f.

        attn_mask (B, S) marks real tokens (S = cached + T when a cache is given); None means
        no padding before any real token (right padding is fine: causality hides it).
        doc_ids (B, T), for packed training rows instead: see document_layout.
        """
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if doc_ids is not None:
            if attn_mask is not None or cache is not None:
                raise ValueError("doc_ids (packed rows) go without attn_mask and cache")
            pos, mask = document_layout(doc_ids)
        elif attn_mask is None:
            pos = torch.arange(past, past + T, device=idx.device).expand(B, T)
            mask = None if past == 0 else attention_mask(torch.ones(B, past + T, device=idx.device), T)
        else:
            pos = (attn_mask.long().cumsum(1) - 1).clamp(min=0)[:, past:]
            mask = attention_mask(attn_mask, T)
        if past + T > self.config.block_size:  # shapes only: no host sync
            raise ValueError(f"sequence of {past + T} tokens exceeds block_size {self.config.block_size}")
        x, rope = self.transformer.wte(idx), None
        if self.config.pos_embedding == "rope":
            rope = rope_angles(pos, self.config.n_embd // self.config.n_head, self.config.rope_theta)
        else:
            x = x + self.transformer.wpe(pos)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, mask, cache, i, rope)
        if cache is not None:
            cache.length += T
        return self.transformer.ln_f(x)

    def logits(self, idx, attn_mask=None):
        return self.lm_head(self(idx, attn_mask))

    def score(self, hidden):
        """The scalar head: one value per position (reward models and critics)."""
        return self.score_head(hidden).squeeze(-1)

    @torch.no_grad()
    def generate(self, prompt_ids, prompt_mask, max_new_tokens, temperature=1.0, top_k=0,
                 top_p=1.0, stop_ids=(), pad_id=0, tool=None, generator=None):
        """Batched sampling with a KV cache.

        prompt_ids / prompt_mask: (B, P), left padded. Each row stops at its first stop token
        (kept in the output). `tool` = (trigger_id, fn): when a row samples trigger_id,
        fn(row's response ids so far) returns token ids that are inserted as if sampled (a tool's
        output); they get sampled=0. temperature 0 is greedy.

        Returns dict: tokens (B, N) (pad_id after a row's end), logprobs (B, N) of each sampled
        token under the distribution it was drawn from (temperature, top-k, top-p applied; under
        temperature 1 when greedy), sampled (B, N) 1 where the model chose the token, finished
        (B,) whether the row hit a stop token.
        """
        B, P = prompt_ids.shape
        dev = prompt_ids.device
        if P + max_new_tokens > self.config.block_size:
            max_new_tokens = self.config.block_size - P  # the model has no positions beyond
        cache = KVCache(self.config, B, P + max_new_tokens, dev, self.transformer.wte.weight.dtype)
        key_valid = torch.zeros(B, P + max_new_tokens, dtype=torch.bool, device=dev)
        key_valid[:, :P] = prompt_mask.bool()
        tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=dev)
        logps = torch.zeros(B, max_new_tokens, device=dev)
        sampled = torch.zeros(B, max_new_tokens, dtype=torch.long, device=dev)
        finished = torch.zeros(B, dtype=torch.bool, device=dev)
        stop = torch.tensor(list(stop_ids), dtype=torch.long, device=dev)
        rows = torch.arange(B, device=dev)  # original index of each active row
        forced = {}  # original row -> list of tokens still to insert
        h = self(prompt_ids, key_valid[:, :P], cache)[:, -1]
        for t in range(max_new_tokens):
            logits = self.lm_head(h).float()
            nxt, lp = sample_token(logits, temperature, top_k, top_p, generator)
            is_sampled = torch.ones_like(nxt)
            for i, r in enumerate(rows.tolist() if forced else []):
                if forced.get(r):
                    nxt[i], lp[i], is_sampled[i] = forced[r].pop(0), 0.0, 0
            live = ~finished[rows]  # rows that ended but are not compacted away yet write nothing
            tokens[rows[live], t] = nxt[live]
            logps[rows[live], t], sampled[rows[live], t] = lp[live], is_sampled[live]
            if tool is not None:
                for i in ((nxt == tool[0]) & live & is_sampled.bool()).nonzero().flatten().tolist():
                    r = int(rows[i])
                    forced[r] = list(tool[1](tokens[r, :t + 1].tolist()))
            finished[rows[torch.isin(nxt, stop) & is_sampled.bool() & live]] = True
            if finished.all() or t == max_new_tokens - 1:
                break
            live = ~finished[rows]
            if live.sum() <= 0.75 * len(rows):  # compact: finished rows stop costing compute
                keep = live.nonzero().flatten()
                rows, nxt, key_valid = rows[keep], nxt[keep], key_valid[keep]
                cache.keep(keep)
            key_valid[:, P + t] = True
            h = self(nxt[:, None], key_valid[:, :P + t + 1], cache)[:, -1]
        return dict(tokens=tokens, logprobs=logps, sampled=sampled, finished=finished)


def sample_token(logits, temperature, top_k, top_p, generator=None):
    """Sample one token per row; return it and its log-prob under the distribution used."""
    if temperature == 0:
        nxt = logits.argmax(-1)
        return nxt, torch.log_softmax(logits, -1).gather(1, nxt[:, None]).squeeze(1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    logp = torch.log_softmax(logits, -1)
    nxt = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
    return nxt, logp.gather(1, nxt[:, None]).squeeze(1)


# ----------------------------------------------------------------------------- log-prob kernel

def _logits(h, w, temperature, buffer=None):
    """One block's float32 logits / T; the division in place, and skipped at T = 1. With a
    float32 `buffer` (flat, large enough) the product is written into it: one allocation for
    all blocks, where a fresh 32 MB block each time costs page faults on CPU."""
    if buffer is not None and h.dtype == w.dtype == buffer.dtype:
        logits = torch.mm(h, w.t(), out=buffer[:h.shape[0] * w.shape[0]].view(h.shape[0], w.shape[0]))
    else:
        logits = (h @ w.t()).float()
    return logits.div_(temperature) if temperature != 1.0 else logits


class _ChunkedLogprob(torch.autograd.Function):
    """log softmax(h W^T / T)[target], computed block by block.

    Forward, `chunk` tokens at a time, keeps only the per-token logsumexp. Backward recomputes
    the logits a block of vocabulary rows at a time, for all tokens at once (the same number of
    logits per block): with g the incoming gradient and p the softmax,
    dL/dlogits = g (onehot(target) - p) / T, then grad_W[block] = dlogits^T h is one product
    over every token, written once. (Token chunks would instead add a thin product into the
    whole vocab x dim grad_W once per chunk: 15 GB of memory traffic at GPT-2 small's shape.)
    Every pass over a block is done in place, and the backward's 1/T rides on the per-token g.
    """

    @staticmethod
    def forward(ctx, h, w, targets, temperature, chunk):
        lse = torch.empty(h.shape[0], device=h.device, dtype=torch.float32)
        logp = torch.empty_like(lse)
        buffer = torch.empty(min(chunk, h.shape[0]) * w.shape[0], device=h.device, dtype=torch.float32)
        for s in range(0, h.shape[0], chunk):
            logits = _logits(h[s:s + chunk], w, temperature, buffer)
            lse[s:s + chunk] = torch.logsumexp(logits, -1)
            logp[s:s + chunk] = logits.gather(1, targets[s:s + chunk, None]).squeeze(1) - lse[s:s + chunk]
        ctx.save_for_backward(h, w, targets, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return logp

    @staticmethod
    def backward(ctx, g):
        h, w, targets, lse = ctx.saved_tensors
        T, rows = ctx.temperature, max(1, ctx.chunk * w.shape[0] // h.shape[0])  # vocab rows per block
        g = g.float() / T
        grad_h = torch.zeros(h.shape, device=h.device, dtype=torch.float32) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty(w.shape, device=w.device, dtype=w.dtype) if ctx.needs_input_grad[1] else None
        buffer = torch.empty(h.shape[0] * min(rows, w.shape[0]), device=h.device, dtype=torch.float32)
        for v in range(0, w.shape[0], rows):
            wb = w[v:v + rows]
            p = _logits(h, wb, T, buffer).sub_(lse[:, None]).exp_()  # this block's columns of the softmax
            in_block = (targets >= v) & (targets < v + rows)  # the onehot lands here for these tokens
            col = (targets - v).clamp_(0, wb.shape[0] - 1)[:, None]
            d = p.mul_(-g[:, None]).scatter_add_(1, col, (g * in_block)[:, None]).to(h.dtype)
            if grad_h is not None:
                if d.dtype == wb.dtype == grad_h.dtype:
                    grad_h.addmm_(d, wb)
                else:
                    grad_h += (d @ wb).float()
            if grad_w is not None:
                grad_w[v:v + rows] = d.t() @ h
        return (grad_h.to(h.dtype) if grad_h is not None else None), grad_w, None, None, None


@torch.no_grad()
def _chunked_entropy(h, w, temperature, chunk):
    out = torch.empty(h.shape[0], device=h.device)
    for s in range(0, h.shape[0], chunk):
        logp = torch.log_softmax(_logits(h[s:s + chunk], w, temperature), -1)
        out[s:s + chunk] = -(logp.exp() * logp).sum(-1)
    return out


CHUNK_ELEMENTS = 2 ** 23  # logits per block (32 MB in float32); at vocab 50257 faster than 1024-row chunks


def token_logprobs(hidden, weight, targets, temperature=1.0, chunk=None, entropy=False):
    """Per-token log p(target) under softmax(hidden @ weight.T / temperature).

    hidden (..., C), weight (V, C), targets (...) -> (...) float32. The (tokens x vocab) matrix
    is never materialised whole: blocks of chunk x vocab logits at a time (by default
    chunk = CHUNK_ELEMENTS / vocab rows: 166 at GPT-2's 50257, 8192 at the built-in 1024).
    Gradients flow to hidden and weight. With entropy=True also returns the per-token entropy
    of the same distribution (no gradient: a logged diagnostic).
    Example: the log-prob of the next tokens of ids under a model is
    token_logprobs(model(ids)[:, :-1], model.lm_head.weight, ids[:, 1:]).
    """
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1)
    chunk = chunk or max(1, CHUNK_ELEMENTS // weight.shape[0])
    logp = _ChunkedLogprob.apply(h, weight, t, float(temperature), chunk).view(shape)
    if entropy:
        return logp, _chunked_entropy(h.detach(), weight.detach(), temperature, chunk).view(shape)
    return logp


def sequence_logprobs(model, ids, attn_mask=None, temperature=1.0, entropy=False, doc_ids=None):
    """Log-probs of ids[:, 1:] given their prefixes: (B, T-1). The usual call of the kernel.
    doc_ids: packed rows (document_layout); a document's first target is then predicted from
    the previous document's last token, so the loss mask must drop it."""
    cut = lambda t: None if t is None else t[:, :-1]
    h = model(ids[:, :-1], cut(attn_mask), doc_ids=cut(doc_ids))
    weight = getattr(model, "module", model).lm_head.weight  # DDP wraps the model in .module
    return token_logprobs(h, weight, ids[:, 1:], temperature, entropy=entropy)


# ----------------------------------------------------------------------------- checkpoints

FORMAT = "poststack-checkpoint-v1"
REQUIRED = ("format", "model", "model_config", "tokenizer", "stage")


class CheckpointError(ValueError):
    pass


def save_checkpoint(path, model, tokenizer, stage, parent=None, config=None, metrics=None,
                    optimizer=None, step=None, extra=None):
    """One self-contained file: weights, model config, tokenizer, lineage, run config, metrics,
    and (for --resume) optimizer state and step. Written to a temp file then renamed, so a crash
    never leaves a half-written checkpoint under the real name."""
    model = getattr(model, "module", model)  # unwrap DDP
    obj = dict(format=FORMAT, model={k: v.detach().cpu() for k, v in model.state_dict().items()},
               model_config=dataclasses.asdict(model.config), tokenizer=tokenizer.state(),
               stage=stage, parent=parent, config=config or {}, metrics=metrics or {},
               optimizer=optimizer.state_dict() if optimizer is not None else None,
               step=step, extra=extra or {})
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path, device="cpu"):
    """Load and validate a checkpoint. Returns its dict with 'model' a ready GPT (eval mode) and
    'tokenizer' a data.Tokenizer. Raises CheckpointError naming the file and what is wrong."""
    from data import Tokenizer
    if str(path).startswith("gpt2:"):  # --init gpt2:DIR, a Hugging Face GPT-2 folder
        ckpt = load_hf_gpt2(str(path)[5:])
        ckpt["model"] = ckpt["model"].to(device)
        return ckpt
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint (run the stage that writes it first)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable, truncated or not a torch file ({type(e).__name__}: "
                              f"{str(e)[:200]})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a poststack checkpoint (format tag missing or different)")
    missing = [k for k in REQUIRED if k not in obj]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}")
    try:
        model = GPT(GPTConfig(**obj["model_config"]))
        model.load_state_dict(obj["model"])
        obj["tokenizer"] = Tokenizer.from_state(obj["tokenizer"])
    except Exception as e:
        raise CheckpointError(f"{path}: weights or tokenizer do not match the stored config ({e})") from None
    obj["model"] = model.to(device).eval()
    obj["path"] = path
    return obj


# ----------------------------------------------------------------------------- GPT-2 / Hugging Face

# Hugging Face's GPT-2 stores these as Conv1D weights, (in, out): the transpose of nn.Linear's.
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def load_hf_gpt2(folder):
    """A GPT-2 in Hugging Face format (config.json + pytorch_model.bin or model.safetensors,
    vocab.json) -> a checkpoint dict like load_checkpoint's. Embedding rows are added for chat
    special tokens the file doesn't have (initialised to the mean embedding)."""
    import json
    from data import load_gpt2_tokenizer
    with open(os.path.join(folder, "config.json")) as f:
        hf = json.load(f)
    tok = load_gpt2_tokenizer(folder)
    st_path, bin_path = os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin")
    if os.path.exists(st_path):
        from safetensors.torch import load_file  # optional dependency, only for this format
        state = load_file(st_path)
    else:
        state = torch.load(bin_path, map_location="cpu", weights_only=True)
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=hf["n_positions"], n_layer=hf["n_layer"],
                    n_head=hf["n_head"], n_embd=hf["n_embd"])
    model = GPT(cfg)
    ours = model.state_dict()
    for key in ours:
        src = key.removeprefix("transformer.")
        if key == "lm_head.weight":
            continue  # tied to wte
        w = state[src]
        if src.endswith(CONV1D):
            w = w.t()
        if src == "wte.weight" and w.shape[0] < cfg.vocab_size:  # new rows for the chat specials
            w = torch.cat([w, w.mean(0, keepdim=True).expand(cfg.vocab_size - w.shape[0], -1)])
        ours[key] = w[:cfg.vocab_size] if src == "wte.weight" else w
    model.load_state_dict(ours)
    return dict(model=model.eval(), tokenizer=tok, stage="gpt2", parent=folder, config={}, metrics={},
                optimizer=None, step=None, extra={}, path=folder)


def export_hf(model, tok, folder):
    """Write a checkpoint's model and tokenizer in Hugging Face GPT-2 format."""
    import json
    from data import save_gpt2_tokenizer
    c = model.config
    if c.pos_embedding != "learned":
        raise ValueError(f"GPT-2 format has learned positions only; this model uses {c.pos_embedding}")
    os.makedirs(folder, exist_ok=True)
    config = dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=c.vocab_size,
                  n_positions=c.block_size, n_ctx=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                  n_head=c.n_head, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                  bos_token_id=tok.bos_id, eos_token_id=tok.end_id, pad_token_id=tok.pad_id)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("score_head"):
            continue
        state[k] = (v.t() if k.endswith(CONV1D) else v).contiguous().clone()
    torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    save_gpt2_tokenizer(tok, folder)


if __name__ == "__main__":  # python model.py export CKPT DIR
    import sys
    if len(sys.argv) != 4 or sys.argv[1] != "export":
        sys.exit("usage: python model.py export CHECKPOINT.pt OUTPUT_DIR   (Hugging Face GPT-2 format)")
    ck = load_checkpoint(sys.argv[2])
    try:
        export_hf(ck["model"], ck["tokenizer"], sys.argv[3])
    except ValueError as e:
        sys.exit(f"{sys.argv[2]}: {e}")
    print(f"exported {sys.argv[2]} to {sys.argv[3]} (config.json, pytorch_model.bin, vocab.json, merges.txt)")
