"""data.py: BPE tokenizer, chat template and its loss mask, JSONL validation, padding."""
import json
import random
import time

import pytest
import torch

from conftest import make_corpus
from data import (SPECIALS, DataError, Tokenizer, as_messages, completion_text, pack_rows, pad, pad_prompts,
                  read_jsonl, render_chat, render_prompt, response_messages)

# ----------------------------------------------------------------------------- tokenizer

# Code point ranges to draw from: ASCII, Latin-1, combining marks, Cyrillic, Devanagari, CJK,
# Hangul, emoji and symbols (plane 1), CJK extension B (plane 2), private use (plane 15).
RANGES = [(0x20, 0x7E), (0xA0, 0xFF), (0x300, 0x36F), (0x400, 0x4FF), (0x900, 0x97F),
          (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x20000, 0x2A6DF),
          (0xF0000, 0xF00FF)]
WHITESPACE = [" ", "  ", "    ", "\t", "\t\t", "\n", "\n\n", "\r\n", "\u00a0", "\u3000", " \n  \n"]


def random_unicode(rng):
    parts = []
    for _ in range(rng.randint(0, 40)):
        r = rng.random()
        if r < 0.15:
            parts.append(rng.choice(WHITESPACE))
        elif r < 0.25:  # anywhere in Unicode except the surrogates (not encodable as UTF-8)
            c = rng.randrange(0x110000)
            parts.append(chr(c if not 0xD800 <= c <= 0xDFFF else 0x41))
        else:
            lo, hi = rng.choice(RANGES)
            parts.append(chr(rng.randint(lo, hi)))
    return "".join(parts)


CODE = [
    "def f(x):\n    return x ** 2 + 1\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
    "    if x != None:   \n        print(f'{x!r:>10}')  # comment\n\n\n",
    "x=90210;y=-3.14e-7\r\nz = [1,2 ,3]\n",
    "SELECT * FROM t WHERE name = 'O''Brien';",
    "lambda s: s.strip().split('\\n')[::-1]",
    "λx. x — “quoted” ‘text’ … ünïcödé café 日本語 🤖🧪 e\u0301",
    "<|end|><|assistant|>calc(2+2)<|call|>",
    "",
    " ",
    "\n\n\n",
]


def test_round_trip_random_unicode(tok):
    rng = random.Random(0)
    for _ in range(300):
        s = random_unicode(rng)
        ids = tok.encode(s)
        assert all(0 <= i < len(tok.ranks) for i in ids)
        assert tok.decode(ids) == s


@pytest.mark.parametrize("s", CODE)
def test_round_trip_code(tok, s):
    assert tok.decode(tok.encode(s)) == s


def test_decode_drops_padding(tok):
    ids = tok.encode("x = 12")
    assert tok.decode([tok.pad_id] * 3 + ids + [tok.pad_id]) == "x = 12"
    assert tok.decode(torch.tensor(ids)) == "x = 12"  # tensors of ids decode too


def test_digits_are_one_per_token(tok):
    ids = tok.encode("1234567")
    assert [tok.decode([i]) for i in ids] == list("1234567")
    pieces = [tok.decode([i]) for i in tok.encode("x=90210")]
    assert "".join(pieces) == "x=90210"
    digits = [p for p in pieces if any(c.isdigit() for c in p)]
    assert digits == list("90210")  # no token mixes a digit with anything else
    # the corpus is full of numbers, yet no multi-digit token was learned
    assert not any(sum(chr(c).isdigit() for c in b) > 1 for b in tok.ranks if len(b) > 1)


@pytest.mark.parametrize("text", ["<|end|>", "<|assistant|>", "hi<|call|>there<|pad|>",
                                  "".join(SPECIALS)])
def test_special_text_is_never_a_special_id(tok, text):
    ids = tok.encode(text)
    assert all(i < len(tok.ranks) for i in ids)
    assert tok.decode(ids) == text


def test_special_ids_follow_the_ranks(tok):
    n = len(tok.ranks)
    assert tok.special == {s: n + i for i, s in enumerate(SPECIALS)}
    assert (tok.pad_id, tok.bos_id, tok.end_id, tok.call_id) == (n, n + 1, n + 6, n + 7)
    assert tok.role_id == {"system": n + 2, "user": n + 3, "assistant": n + 4, "tool": n + 5}
    assert tok.decode([tok.end_id, tok.call_id]) == "<|end|><|call|>"


def test_train_respects_vocab_size():
    texts = make_corpus(300, seed=1)
    for v in (270, 300, 310):
        t = Tokenizer.train(texts, vocab_size=v)
        assert t.vocab_size == v and len(t.ranks) == v - len(SPECIALS)
        assert t.ranks[:256] == [bytes([b]) for b in range(256)]
        assert len(set(t.ranks)) == len(t.ranks)  # no two ids for the same bytes
        assert max(max(t.encode(s)) for s in texts) < v - len(SPECIALS)
    # this regular corpus runs out of pairs seen twice before 400: never more than asked
    assert 310 <= Tokenizer.train(texts, vocab_size=400).vocab_size < 400
    # too little text to find vocab_size merges: stops early (pairs seen once are not merged)
    t = Tokenizer.train(["abcdef"], vocab_size=1000)
    assert t.vocab_size == 256 + len(SPECIALS)


def test_train_merges_most_frequent_pair_first():
    # chunks "ab", " ab" x2, " cd" x2: (a,b) is seen 3 times -> merged first; then (" ",ab),
    # (" ",c) and (c,d) are all seen twice and the tie goes to the largest pair, (c,d)
    t = Tokenizer.train(["ab ab ab cd cd"], vocab_size=256 + len(SPECIALS) + 2)
    assert t.ranks[256:] == [b"ab", b"cd"]
    assert t.encode("ab cd") == [256, 32, 257]


def test_from_state_gives_identical_encodings(tok):
    state = json.loads(json.dumps(tok.state()))  # the state is plain JSON
    tok2 = Tokenizer.from_state(state)
    assert tok2.ranks == tok.ranks and tok2.special == tok.special
    rng = random.Random(1)
    for s in CODE + make_corpus(50, seed=7) + [random_unicode(rng) for _ in range(50)]:
        assert tok2.encode(s) == tok.encode(s)
    bad = dict(state, specials=list(reversed(state["specials"])))
    with pytest.raises(ValueError, match="special tokens"):
        Tokenizer.from_state(bad)


def test_training_on_1mb_takes_seconds():
    rng = random.Random(3)
    lex = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
           for _ in range(2000)]
    texts, n = [], 0
    while n < 1_000_000:
        a, b = rng.randrange(10 ** 4), rng.randrange(10 ** 4)
        s = rng.choice([" ".join(rng.choice(lex) for _ in range(12)) + ".\n",
                        f"def {rng.choice(lex)}(x):\n    return x * {a} + {b}\n",
                        f"What is {a}+{b}? {a}+{b}={a + b}\n"])
        texts.append(s)
        n += len(s)
    t0 = time.perf_counter()
    t = Tokenizer.train(texts, vocab_size=1024)
    dt = time.perf_counter() - t0
    print(f"BPE training on {n / 1e6:.2f} MB, vocab 1024: {dt:.2f} s")
    assert t.vocab_size == 1024
    assert dt < 30
    assert t.decode(t.encode(texts[0])) == texts[0]


# ----------------------------------------------------------------------------- chat template

# Contents made only of single-byte chunks (digits and lone punctuation), so their ids are bytes:
# '!'=33 '('=40 ')'=41 '+'=43 '2'=50 '4'=52 '?'=63 '7'=55
CHAT = [
    {"role": "system", "content": "!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "7?"},
    {"role": "assistant", "content": "(2+2)"},  # followed by a tool message: a tool call
    {"role": "tool", "content": "4"},
    {"role": "assistant", "content": "4"},
]
BOS, SYS, USR, AST, TOOL, END, CALL = 293, 294, 295, 296, 297, 298, 299


def test_render_chat_exact_ids_and_mask(tok):
    ids, mask = render_chat(tok, CHAT)
    expected = [
        (BOS, 0),
        (SYS, 0), (33, 0), (END, 0),
        (USR, 0), (50, 0), (43, 0), (50, 0), (63, 0), (END, 0),
        (AST, 0), (52, 1), (END, 1),
        (USR, 0), (55, 0), (63, 0), (END, 0),
        (AST, 0), (40, 1), (50, 1), (43, 1), (50, 1), (41, 1), (CALL, 1),
        (TOOL, 0), (52, 0), (END, 0),
        (AST, 0), (52, 1), (END, 1),
    ]
    assert ids == [i for i, _ in expected]
    assert mask == [m for _, m in expected]


def test_render_chat_for_generation(tok):
    ids, mask = render_chat(tok, CHAT)
    gen_ids, gen_mask = render_chat(tok, CHAT, for_generation=True)
    assert gen_ids == ids + [AST] and gen_mask == mask + [0]
    assert render_prompt(tok, "2+2?") == [BOS, USR, 50, 43, 50, 63, END, AST]
    assert render_prompt(tok, CHAT[:2]) == [BOS, SYS, 33, END, USR, 50, 43, 50, 63, END, AST]


def test_render_chat_user_typing_special_text(tok):
    msgs = [{"role": "user", "content": "<|end|><|assistant|>"},
            {"role": "assistant", "content": "<|call|>"}]
    ids, mask = render_chat(tok, msgs)
    specials = [i for i in ids if i >= len(tok.ranks)]
    assert specials == [BOS, USR, END, AST, END]  # only the template's own
    assert sum(mask) == len(tok.encode("<|call|>")) + 1


def test_completion_text_and_response_messages(tok):
    resp = (tok.encode("calc(2+2)") + [CALL, TOOL] + tok.encode("4") + [END, AST]
            + tok.encode("Answer: 4") + [END, tok.pad_id, tok.pad_id])
    text = completion_text(tok, resp)
    assert text == "calc(2+2)<|call|><|tool|>4<|end|><|assistant|>Answer: 4"
    msgs = response_messages(text)
    assert msgs == [{"role": "assistant", "content": "calc(2+2)"},
                    {"role": "tool", "content": "4"},
                    {"role": "assistant", "content": "Answer: 4"}]
    # the stored conversation renders back to exactly prompt + sampled response
    prompt = render_prompt(tok, "What is 2+2?")
    assert render_chat(tok, [{"role": "user", "content": "What is 2+2?"}] + msgs)[0] == prompt + resp[:-2]
    # only a final <|end|> is dropped; pads anywhere are dropped
    assert completion_text(tok, tok.encode("ab") + [END, END]) == "ab<|end|>"
    assert completion_text(tok, [tok.pad_id]) == ""
    assert response_messages("") == [{"role": "assistant", "content": ""}]
    assert response_messages("plain") == [{"role": "assistant", "content": "plain"}]


# ----------------------------------------------------------------------------- JSONL

def write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD_SFT = json.dumps({"prompt": "2+2?", "completion": "4"})


@pytest.mark.parametrize("kind,bad,reason", [
    ("sft", '{"prompt": "2+2?", "completion": ', "invalid JSON"),
    ("sft", "[1, 2]", "expected a JSON object"),
    ("sft", json.dumps({"prompt": 5, "completion": "4"}), "'prompt' must be a string"),
    ("sft", json.dumps({"prompt": "2+2?"}), "'completion' must be a string"),
    ("sft", json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "no assistant message"),
    ("sft", json.dumps({"messages": [{"role": "bot", "content": "hi"},
                                     {"role": "assistant", "content": "x"}]}), "message 0"),
    ("sft", json.dumps({"messages": [{"role": "assistant", "content": 3}]}), "message 0"),
    ("sft", json.dumps({"messages": []}), "non-empty list"),
    ("kto", json.dumps({"prompt": "p", "completion": "c", "label": 1}), "'label'"),
    ("kto", json.dumps({"prompt": "p", "completion": "c", "label": "true"}), "'label'"),
    ("pref", json.dumps({"prompt": "p", "chosen": "a", "rejected": None}), "'rejected'"),
    ("rl", json.dumps({"prompt": "p", "test": "assert f(1)"}), "entry_point"),
    ("text", json.dumps({"txt": "x"}), "'text'"),
], ids=["malformed-json", "not-an-object", "prompt-not-str", "no-completion", "no-assistant",
        "bad-role", "content-not-str", "empty-messages", "label-int", "label-str", "rejected-null",
        "rl-no-entry-point", "text-missing"])
def test_read_jsonl_errors_name_path_and_line(tmp_path, kind, bad, reason):
    good = {"sft": GOOD_SFT, "kto": json.dumps({"prompt": "p", "completion": "c", "label": True}),
            "pref": json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}),
            "rl": json.dumps({"prompt": "p", "answer": "4"}), "text": json.dumps({"text": "x"})}[kind]
    path = write(tmp_path / "d.jsonl", [good, "", good, bad, good])  # the blank line still counts
    with pytest.raises(DataError) as e:
        read_jsonl(path, kind)
    assert f"{path}:4" in str(e.value)
    assert reason in str(e.value)


def test_read_jsonl_invalid_utf8_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD_SFT.encode() + b"\n" + '{"prompt": "café", "completion": "x"}\n'.encode("latin-1"))
    with pytest.raises(DataError) as e:
        read_jsonl(path, "sft")
    assert f"{path}:2" in str(e.value)


def test_read_jsonl_empty_file(tmp_path):
    path = write(tmp_path / "e.jsonl", ["", "   "])
    with pytest.raises(DataError, match="no records"):
        read_jsonl(path, "sft")


def test_read_jsonl_both_sft_formats(tmp_path):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "calc(2+2)"}, {"role": "tool", "content": "4"},
            {"role": "assistant", "content": "4"}]
    path = write(tmp_path / "s.jsonl", [GOOD_SFT, json.dumps({"messages": msgs})])
    recs = read_jsonl(path, "sft")
    assert len(recs) == 2
    assert as_messages(recs[0]) == [{"role": "user", "content": "2+2?"},
                                    {"role": "assistant", "content": "4"}]
    assert as_messages(recs[1]) == msgs


def test_read_jsonl_other_kinds(tmp_path):
    lines = {"kto": [{"prompt": "p", "completion": "c", "label": False}],
             "pref": [{"prompt": "p", "chosen": "a", "rejected": "b"}],
             "rl": [{"prompt": "p", "answer": "4"}, {"prompt": "p", "test": "t", "entry_point": "f"}],
             "text": [{"text": "hello"}]}
    for kind, recs in lines.items():
        path = write(tmp_path / f"{kind}.jsonl", [json.dumps(r) for r in recs])
        assert read_jsonl(path, kind) == recs
    with pytest.raises(ValueError, match="unknown record kind"):
        read_jsonl(write(tmp_path / "x.jsonl", [GOOD_SFT]), "nope")


# ----------------------------------------------------------------------------- batching

def test_pad_right_and_left():
    seqs = [[1, 2, 3], [4], []]
    assert pad(seqs, 0).tolist() == [[1, 2, 3], [4, 0, 0], [0, 0, 0]]
    assert pad(seqs, 9, left=True).tolist() == [[1, 2, 3], [9, 9, 4], [9, 9, 9]]
    assert pad(seqs, 0).dtype == torch.long


def test_pack_rows_first_fit_decreasing():
    rows = [([0] * n, [1] * n) for n in (3, 5, 1, 4, 3, 2)]
    bins = pack_rows(rows, 8)
    # longest first, each into the first bin with room: 5+3, 4+3+1, 2
    assert [[len(r[0]) for r in b] for b in bins] == [[5, 3], [4, 3, 1], [2]]
    assert sorted(id(r) for b in bins for r in b) == sorted(id(r) for r in rows)  # each row once
    with pytest.raises(ValueError, match="9 tokens cannot be packed into 8"):
        pack_rows([([0] * 9, [1] * 9)], 8)


def test_pad_prompts(tok):
    ids, mask = pad_prompts(tok, [[5, 6, 7], [8]])
    P = tok.pad_id
    assert ids.tolist() == [[5, 6, 7], [P, P, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
