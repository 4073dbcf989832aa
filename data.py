"""Tokenizer, chat template, JSONL loading and batching.

The tokenizer is byte-level BPE trained here (nothing can be downloaded) and served through
`tiktoken.Encoding`, so encoding runs in tiktoken's fast Rust core. Digits are split one per
token, so a number's tokens are its digits and arithmetic is learnable by a tiny model.
"""
import collections
import json
import os

import regex
import tiktoken
import torch

# GPT-4's split pattern with one change: \p{N} alone (one digit per chunk) instead of \p{N}{1,3}.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
SPECIALS = ("<|pad|>", "<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>",
            "<|end|>", "<|call|>")
ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """Bad input data; the message names the file, the line and what is wrong."""


# ----------------------------------------------------------------------------- tokenizer

def train_bpe(texts, vocab_size):
    """Byte-level BPE: returns the merged tokens (as bytes) in merge order.

    Pairs are counted over *unique* pre-tokenised chunks weighted by their frequency, and after
    each merge only the chunks containing the merged pair are updated, so training on a few MB
    of text takes seconds, not minutes.
    """
    split = regex.compile(SPLIT_PATTERN)
    chunk_freq = collections.Counter()
    for text in texts:
        chunk_freq.update(split.findall(text))
    words = [[bytes([b]) for b in chunk.encode("utf-8")] for chunk in chunk_freq]
    freqs = list(chunk_freq.values())

    pair_count = collections.Counter()
    where = collections.defaultdict(set)  # pair -> indices of words containing it
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_count[pair] += freqs[i]
            where[pair].add(i)

    merges = []
    while 256 + len(merges) < vocab_size and pair_count:
        best = max(pair_count, key=lambda p: (pair_count[p], p))
        if pair_count[best] < 2:
            break
        merged = best[0] + best[1]
        merges.append(merged)
        for i in list(where[best]):
            w = words[i]
            for pair in zip(w, w[1:]):  # remove this word's old pairs ...
                pair_count[pair] -= freqs[i]
                if pair_count[pair] <= 0:
                    del pair_count[pair]
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and w[j] == best[0] and w[j + 1] == best[1]:
                    out.append(merged)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
            for pair in zip(out, out[1:]):  # ... and add its new ones
                pair_count[pair] += freqs[i]
                where[pair].add(i)
        del where[best]
    return merges


class Tokenizer:
    """A tiktoken.Encoding plus the chat special tokens.

    `encode` never produces special tokens from text (a user typing "<|end|>" gets the ordinary
    tokens of that string); special tokens enter only through `render_chat` and the sampler.
    """

    def __init__(self, ranks, pattern=SPLIT_PATTERN, name="poststack-bpe"):
        self.ranks = ranks  # list of token bytes, index = token id
        self.pattern = pattern
        self.name = name
        n = len(ranks)
        self.special = {s: n + i for i, s in enumerate(SPECIALS)}
        self.enc = tiktoken.Encoding(
            name, pat_str=pattern, mergeable_ranks={b: i for i, b in enumerate(ranks)},
            special_tokens=self.special)
        self.vocab_size = n + len(SPECIALS)
        self.pad_id, self.bos_id = self.special["<|pad|>"], self.special["<|bos|>"]
        self.end_id, self.call_id = self.special["<|end|>"], self.special["<|call|>"]
        self.role_id = {r: self.special[f"<|{r}|>"] for r in ROLES}

    @classmethod
    def train(cls, texts, vocab_size=1024):
        """Train byte-level BPE so that vocab_size counts the special tokens too."""
        merges = train_bpe(texts, vocab_size - len(SPECIALS))
        return cls([bytes([b]) for b in range(256)] + merges)

    @classmethod
    def gpt2(cls):
        """GPT-2's encoding (needs tiktoken's gpt2 files, i.e. the internet or a local cache)."""
        g = tiktoken.get_encoding("gpt2")
        ranks = sorted(g._mergeable_ranks, key=g._mergeable_ranks.get)
        return cls(ranks, pattern=g._pat_str, name="gpt2")

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids if int(i) != self.pad_id])

    def state(self):
        """Everything needed to rebuild this tokenizer (stored inside every checkpoint)."""
        return {"name": self.name, "pattern": self.pattern, "ranks": [b.hex() for b in self.ranks],
                "specials": list(SPECIALS)}

    @classmethod
    def from_state(cls, state):
        if list(state["specials"]) != list(SPECIALS):
            raise ValueError(f"tokenizer special tokens {state['specials']} differ from {SPECIALS}")
        return cls([bytes.fromhex(h) for h in state["ranks"]], state["pattern"], state["name"])


# ----------------------------------------------------------------------------- chat template

def render_chat(tok, messages, for_generation=False):
    """Messages -> (token ids, loss mask).

    Layout: <|bos|> then, per message, <|role|> content <|end|>. An assistant message that is
    followed by a tool message ends with <|call|> instead of <|end|>: that token is how the model
    asks for the tool, and the sampler answers it by inserting the tool message.
    The mask is 1 on assistant content and its closing token (what the model must learn to
    say), 0 on everything else: headers, system/user text and tool outputs.
    With for_generation=True the render ends with an open <|assistant|> header.
    """
    ids, mask = [tok.bos_id], [0]
    for i, m in enumerate(messages):
        role = m["role"]
        ids.append(tok.role_id[role])
        mask.append(0)
        body = tok.encode(m["content"])
        if role == "assistant":
            calls_tool = i + 1 < len(messages) and messages[i + 1]["role"] == "tool"
            body.append(tok.call_id if calls_tool else tok.end_id)
        else:
            body.append(tok.end_id)
        ids += body
        mask += [int(role == "assistant")] * len(body)
    if for_generation:
        ids.append(tok.role_id["assistant"])
        mask.append(0)
    return ids, mask


def render_prompt(tok, prompt):
    """A prompt (a string or a list of messages) rendered for generation."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return render_chat(tok, messages, for_generation=True)[0]


def response_messages(text):
    """Split a decoded response ('calc(..)<|call|><|tool|>R<|end|><|assistant|>Answer: R') into
    assistant/tool messages, so a sampled response can be stored as a conversation."""
    out, role = [], "assistant"
    for part in regex.split(r"(<\|call\|>|<\|tool\|>|<\|assistant\|>|<\|end\|>)", text):
        if part == "<|tool|>":
            role = "tool"
        elif part == "<|assistant|>":
            role = "assistant"
        elif part and part not in ("<|call|>", "<|end|>"):
            out.append({"role": role, "content": part})
    return out or [{"role": "assistant", "content": ""}]


def completion_text(tok, tokens):
    """Decode sampled response tokens, dropping padding and a final <|end|>."""
    ids = [int(t) for t in tokens if int(t) != tok.pad_id]
    if ids and ids[-1] == tok.end_id:
        ids = ids[:-1]
    return tok.decode(ids)


# ----------------------------------------------------------------------------- JSONL

def _need_str(obj, key, where):
    if not isinstance(obj.get(key), str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(obj.get(key)).__name__}")


def _check_messages(msgs, where):
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {j} must be {{'role': one of {ROLES}, 'content': str}}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: no assistant message to learn from")


def _check_record(obj, kind, where):
    if kind == "text":
        _need_str(obj, "text", where)
    elif kind == "sft":
        if "messages" in obj:
            _check_messages(obj["messages"], where)
        else:
            _need_str(obj, "prompt", where)
            _need_str(obj, "completion", where)
    elif kind == "pref":
        for key in ("prompt", "chosen", "rejected"):
            _need_str(obj, key, where)
    elif kind == "kto":
        _need_str(obj, "prompt", where)
        _need_str(obj, "completion", where)
        if not isinstance(obj.get("label"), bool):
            raise DataError(f"{where}: field 'label' must be true or false")
    elif kind == "rl":
        _need_str(obj, "prompt", where)
        if "answer" not in obj and not ("test" in obj and "entry_point" in obj):
            raise DataError(f"{where}: an RL prompt needs 'answer' (math) or 'test' + 'entry_point' (code)")
    else:
        raise ValueError(f"unknown record kind {kind!r}")


def read_jsonl(path, kind):
    """Read and validate a JSONL file of records of one kind: text | sft | pref | kto | rl.

    A malformed line raises DataError naming path:line and the reason.
    """
    records = []
    with open(path, "rb") as f:  # bytes, so a bad encoding is reported with its line too
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            _check_record(obj, kind, where)
            records.append(obj)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def as_messages(record):
    """An SFT record in either format -> a list of messages."""
    if "messages" in record:
        return record["messages"]
    return [{"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]}]


# ----------------------------------------------------------------------------- batching

def pad(seqs, value, left=False, multiple=1):
    """List of int lists -> (B, T) LongTensor padded with value (on the left for prompts), T
    rounded up to a multiple (fixed shapes let torch.compile reuse its kernels)."""
    T = -(-max(len(s) for s in seqs) // multiple) * multiple
    fill = lambda s: [value] * (T - len(s)) + list(s) if left else list(s) + [value] * (T - len(s))
    return torch.tensor([fill(s) for s in seqs], dtype=torch.long)


def pack_rows(rows, length):
    """Rows (token list first) -> bins of whole rows holding at most `length` tokens each, by
    first-fit decreasing (within 11/9 of the fewest bins, Johnson 1973). Each bin becomes one
    packed training row (model.document_layout keeps its rows apart)."""
    bins, room = [], []
    for row in sorted(rows, key=lambda r: -len(r[0])):
        if len(row[0]) > length:
            raise ValueError(f"a row of {len(row[0])} tokens cannot be packed into {length}")
        fit = next((b for b, free in enumerate(room) if len(row[0]) <= free), None)
        if fit is None:
            bins.append([])
            room.append(length)
            fit = len(bins) - 1
        bins[fit].append(row)
        room[fit] -= len(row[0])
    return bins


def pad_prompts(tok, prompts):
    """Token lists -> left-padded ids and attention mask, the sampler's input."""
    ids = pad(prompts, tok.pad_id, left=True)
    mask = pad([[1] * len(p) for p in prompts], 0, left=True)
    return ids, mask


# ----------------------------------------------------------------------------- sampling chats

def calculator_tool(tok):
    """The sampler's tool hook: when the model ends a message with <|call|>, run the last
    `calc(EXPR)` of that message through the safe evaluator and insert
    <|tool|> RESULT <|end|> <|assistant|>, the same tokens render_chat gives a tool message."""
    from verifiers import parse_calc_call, run_calculator
    assistant = tok.role_id["assistant"]

    def fn(response_ids):
        start = max((i + 1 for i, t in enumerate(response_ids) if t == assistant), default=0)
        expr = parse_calc_call(tok.decode(response_ids[start:-1]))
        result = run_calculator(expr) if expr is not None else "error: no calc(...) call"
        return [tok.role_id["tool"]] + tok.encode(result) + [tok.end_id, assistant]
    return (tok.call_id, fn)


@torch.no_grad()
def generate_responses(model, tok, prompts, max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0,
                       tools=True, batch_size=1024, generator=None):
    """Sample one response per prompt (a string or a message list), in batches.

    Returns dict: prompt_ids (list of id lists), tokens / logprobs / sampled (B, N) tensors
    padded to the longest batch, finished (B,) and texts (decoded responses, tool turns included).
    """
    device = next(model.parameters()).device
    encoded = [render_prompt(tok, p) for p in prompts]
    parts = []
    for s in range(0, len(encoded), batch_size):
        ids, mask = pad_prompts(tok, encoded[s:s + batch_size])
        parts.append(model.generate(ids.to(device), mask.to(device), max_new_tokens, temperature, top_k,
                                    top_p, stop_ids=[tok.end_id], pad_id=tok.pad_id,
                                    tool=calculator_tool(tok) if tools else None, generator=generator))
    N = max(p["tokens"].shape[1] for p in parts)
    cat = lambda key, fill: torch.cat([torch.nn.functional.pad(p[key], (0, N - p[key].shape[1]), value=fill)
                                       for p in parts])
    out = dict(prompt_ids=encoded, tokens=cat("tokens", tok.pad_id), logprobs=cat("logprobs", 0.0),
               sampled=cat("sampled", 0), finished=torch.cat([p["finished"] for p in parts]))
    out["texts"] = [completion_text(tok, row.tolist()) for row in out["tokens"]]
    return out


def join_prompt_response(tok, prompt_ids, tokens, sampled):
    """Prompts (list of id lists) + sampled responses (B, N) -> one batch for scoring.

    Returns ids (B, P+N) with prompts left padded, attn_mask (B, P+N) 1 on real tokens, and
    resp_mask (B, P+N-1) 1 on the *targets* ids[:, 1:] that the model sampled (not the prompt,
    not padding, not tool-inserted tokens): the positions that policy gradients and KLs sum over.
    """
    p_ids, p_mask = pad_prompts(tok, prompt_ids)
    tokens = tokens.to(p_ids.device)
    ids = torch.cat([p_ids, tokens], 1)
    attn = torch.cat([p_mask, (tokens != tok.pad_id).long()], 1)
    resp = torch.cat([torch.zeros_like(p_mask), sampled.to(p_ids.device).long()], 1)[:, 1:]
    return ids, attn, resp.float()


# ----------------------------------------------------------------------------- GPT-2 files

def _byte_to_unicode():
    """GPT-2's reversible map from bytes to printable characters used in vocab.json/merges.txt."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = keep[:], 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def _merge_parts(ranks, token, rank):
    """The two tokens whose merge made `token`: BPE on its bytes using only merges below `rank`."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        pairs = [(ranks.get(a + b, 1 << 62), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        best, i = min(pairs)
        if best >= rank:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def save_gpt2_tokenizer(tok, folder):
    """Write vocab.json + merges.txt (+ special tokens) in GPT-2's format."""
    enc = _byte_to_unicode()
    to_str = lambda b: "".join(enc[x] for x in b)
    vocab = {to_str(b): i for i, b in enumerate(tok.ranks)}
    vocab.update(tok.special)
    rank_of = {b: i for i, b in enumerate(tok.ranks)}
    merges = []
    for i, b in enumerate(tok.ranks):
        if len(b) > 1:
            parts = _merge_parts(rank_of, b, i)
            if len(parts) != 2:
                raise ValueError(f"token {i} {b!r} is not the merge of two earlier tokens")
            merges.append(f"{to_str(parts[0])} {to_str(parts[1])}")
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({"additional_special_tokens": list(SPECIALS), "pad_token": "<|pad|>"}, f)
    with open(os.path.join(folder, "poststack_tokenizer.json"), "w") as f:
        json.dump({"pattern": tok.pattern, "name": tok.name}, f)


def load_gpt2_tokenizer(folder):
    """Read vocab.json in GPT-2's format. Tokens that are not byte sequences of the BPE
    (<|endoftext|>, our chat specials) are left out of the ranks; our specials follow them."""
    dec = {c: b for b, c in _byte_to_unicode().items()}
    with open(os.path.join(folder, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    specials = set(SPECIALS) | {"<|endoftext|>"}
    ranks = [None] * len(vocab)
    for s, i in vocab.items():
        if s not in specials:
            ranks[i] = bytes(dec[c] for c in s)
    ranks = ranks[:next((i for i, r in enumerate(ranks) if r is None), len(ranks))]
    meta_path = os.path.join(folder, "poststack_tokenizer.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    gpt2_pattern = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return Tokenizer(ranks, meta.get("pattern", gpt2_pattern), meta.get("name", "gpt2"))
