import hashlib
import random
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tasks  # noqa: E402
from tasks import (FAMILIES, REFUSAL, eval_tasks, gold_prefer, gold_score, is_refusal,  # noqa: E402
                   make_tasks, pretrain_corpus, sft_conversations, split_of)


def _fold(expr: str) -> list[int]:
    """Left-to-right values of '37+48-12' -> [37, 85, 73], parsed (not eval'd)."""
    toks = re.findall(r"\d+|[+-]", expr)
    vals = [int(toks[0])]
    for op, b in zip(toks[1::2], toks[2::2]):
        vals.append(vals[-1] + int(b) if op == "+" else vals[-1] - int(b))
    return vals


def _check_fn(test: str):
    ns = {}
    exec(test, ns)  # our own generated test string
    return ns["check"]


def _passes(test: str, fn) -> bool:
    try:
        _check_fn(test)(fn)
        return True
    except Exception:
        return False


# ------------------------------------------------------------------------------------ splits

def test_split_of_is_sha256_and_80_10_10():
    p = "What is 1+2?"
    h = int(hashlib.sha256(p.encode()).hexdigest()[:8], 16) % 100
    assert split_of(p) == ("train" if h < 80 else "val" if h < 90 else "test")
    c = Counter(split_of(f"prompt {i}") for i in range(20000))
    assert abs(c["train"] / 20000 - 0.8) < 0.02
    assert abs(c["val"] / 20000 - 0.1) < 0.01 and abs(c["test"] / 20000 - 0.1) < 0.01


def test_splits_disjoint_deterministic_distinct():
    by_split = {}
    for split, n in (("train", 300), ("val", 50), ("test", 50)):
        prompts = []
        for f in FAMILIES:
            ts = make_tasks(f, split, n, seed=3)
            assert all(t.family == f and split_of(t.prompt) == split for t in ts)
            assert len({t.prompt for t in ts}) == n
            assert [t.prompt for t in ts] == [t.prompt for t in make_tasks(f, split, n, seed=3)]
            prompts += [t.prompt for t in ts]
        by_split[split] = set(prompts)
    assert not by_split["train"] & by_split["val"]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["val"] & by_split["test"]
    a = [t.prompt for t in make_tasks("math", "train", 50, seed=0)]
    b = [t.prompt for t in make_tasks("math", "train", 50, seed=1)]
    assert a != b


def test_make_tasks_errors():
    with pytest.raises(ValueError, match="math"):
        make_tasks("math", "test", 100, digits=1, steps=1)  # ~20 such test prompts exist
    with pytest.raises(ValueError, match="safety"):
        make_tasks("safety", "test", 500)
    with pytest.raises(ValueError):
        make_tasks("poetry", "train", 3)
    with pytest.raises(ValueError):
        make_tasks("math", "train", 3, digits=7)


def test_eval_tasks_fixed():
    ev = eval_tasks()
    assert len(ev) == 50 * len(FAMILIES)
    assert all(split_of(t.prompt) == "test" for t in ev)
    assert [t.prompt for t in ev] == [t.prompt for t in eval_tasks()]
    safety = [t for t in ev if t.family == "safety"]
    assert 10 < sum(t.unsafe for t in safety) < 40


def test_eval_tasks_takes_all_of_a_small_split():
    """The gpu presets ask for 100-200 tasks a family; code and safety's test splits hold fewer."""
    with pytest.raises(tasks.TaskSpaceError, match="found only"):
        make_tasks("safety", "test", 200, seed=1234)
    counts = {f: sum(t.family == f for t in eval_tasks("test", 200)) for f in FAMILIES}
    assert counts["math"] == counts["tool"] == 200
    assert 50 < counts["safety"] < 200 and 50 < counts["code"] < 200
    small = [t.prompt for t in eval_tasks("test", 50) if t.family == "code"]
    assert small == [t.prompt for t in eval_tasks("test", 200) if t.family == "code"][:50]


@pytest.mark.parametrize("script, args, flag", [
    ("sft", ["--n-val", "800"], "--n-val 800"),
    ("reward", ["--n-prompts", "4000"], "--n-prompts 4000"),
    ("dpo", ["--n-prompts", "4000"], "--n-prompts 4000"),
    ("grpo", ["--n-prompts", "4000", "--reward", "gold"], "--n-prompts 4000"),  # ppo.py loads its prompts here too
    ("rlvr", ["--n-prompts", "4000", "--mix", "code:1"], "--n-prompts 4000"),
    ("distill", ["--mode", "seq", "--seq-prompts", "9000", "--student-init", "random"], "--seq-prompts 9000"),
])
def test_a_count_beyond_the_world_names_its_flag(script, args, flag, tiny_sft, tmp_path, capsys):
    """More distinct prompts asked of a split than it holds (code's train split: 700): a one-line
    error naming the flag and the family, exit code 2, not a traceback."""
    import importlib
    init = tiny_sft / ("base.pt" if script == "sft" else "sft.pt")
    with pytest.raises(SystemExit) as e:
        importlib.import_module(script).main(["--preset", "tiny", "--init", str(init), "--out", str(tmp_path / "x.pt"),
                                              *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {flag}") and "found only" in err


# ----------------------------------------------------------------------------- references

@pytest.mark.parametrize("digits,steps", [(None, None), (1, 1), (2, 3), (4, 2)])
def test_math_references_are_right(digits, steps):
    knobs = {k: v for k, v in (("digits", digits), ("steps", steps)) if v is not None}
    for t in make_tasks("math", "train", 60, seed=7, **knobs):
        expr = re.fullmatch(r"What is ([0-9+-]+)\?", t.prompt).group(1)
        vals = _fold(expr)
        assert eval(expr) == vals[-1] == int(t.answer)  # eval of our own prompt string
        assert min(vals) >= 0
        operands = re.findall(r"\d+", expr)
        if steps:
            assert len(operands) == steps + 1
        if digits:
            assert all(len(o) == digits for o in operands)
        lines = t.reference_text().split("\n")
        results = _result_lines(lines)
        assert lines[-1] == f"Answer: {t.answer}" and len(results) == len(operands) - 1
        for line, prev, new in zip(results, vals, vals[1:]):
            lhs, rhs = line.split("=")
            assert lhs.startswith(str(prev)) and int(rhs) == new == _fold(lhs)[-1]
        for line in lines[:-1]:  # every column line is a true single-digit fact
            lhs, rhs = line.split("=")
            assert _fold(lhs)[-1] == int(rhs)


def _result_lines(lines):
    """The 'a+b=r' line closing each step (column lines have three terms: 'x+y+carry=s')."""
    return [l for l in lines if re.fullmatch(r"\d+[+-]\d+=\d+", l)]


def test_column_working_by_hand():
    assert tasks._columns(347, "+", 285) == (["7+5+0=12", "4+8+1=13", "3+2+1=6"], 632)
    assert tasks._columns(632, "-", 285) == (["12-5-0=7", "13-8-1=4", "6-2-1=3"], 347)
    assert tasks._columns(95, "+", 87) == (["5+7+0=12", "9+8+1=18"], 182)


def test_drills_are_true_column_facts():
    drills = tasks.drill_conversations(300, seed=1)
    assert drills == tasks.drill_conversations(300, seed=1)  # deterministic
    for d in drills:
        user, assistant = d["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        lhs, result = assistant["content"].split("=")
        assert user["content"] == "Column: " + lhs
        x, op, y, c = re.fullmatch(r"(\d+)([+-])(\d)([+-]\d)", lhs).groups()
        assert int(result) == (int(x) + int(y) + int(c) if op == "+" else int(x) - int(y) + int(c))
        assert 0 <= int(result) <= 19 and c in ("+0", "+1", "-0", "-1")
    ops = {re.search(r"\d([+-])", d["messages"][1]["content"]).group(1) for d in drills}
    assert ops == {"+", "-"}  # both tables are drilled


def test_tool_reference_format():
    for t in make_tasks("tool", "train", 50, seed=1):
        a, b = map(int, re.fullmatch(r"What is (\d+)\*(\d+)\?", t.prompt).groups())
        assert 10 <= a < 1000 and 10 <= b < 1000 and t.answer == str(a * b)
        assert [m["role"] for m in t.reference] == ["assistant", "tool", "assistant"]
        assert t.reference_text() == (f"calc({a}*{b})<|call|><|tool|>{a * b}<|end|>"
                                      f"<|assistant|>Answer: {a * b}")
    assert all(len(t.answer) <= 4 for t in make_tasks("tool", "train", 20, digits=2))


def test_code_tests_pass_reference_reject_bugs_and_always_equal():
    class AlwaysEqual:
        def __eq__(self, other):
            return True

    for ti, tpl in enumerate(tasks.CODE_TEMPLATES):
        for k in list(tpl["ks"])[:3] + list(tpl["ks"])[-2:]:
            test = tasks._code_test(ti, k)
            assert test.count("assert type(r) is") >= 4
            a = tasks.ARG[tpl["kind"]]
            for buggy, expect in ((False, True), (True, False)):
                ns = {}
                exec(tasks._code_source(tpl, a, k, buggy), ns)
                assert _passes(test, ns[tpl["name"]]) is expect, (tpl["name"], k, buggy)
            assert not _passes(test, lambda *args: AlwaysEqual())
    ts = make_tasks("code", "train", 40, seed=2)
    assert len({t.meta["template"] for t in ts}) >= 8
    for t in ts:
        assert t.prompt.startswith(f"Write a Python function {t.entry_point}(")
        assert t.reference_text().startswith(f"def {t.entry_point}(")
        assert "```" not in t.reference_text() and '"""' not in t.reference_text()
    easy = {t.meta["template"] for t in make_tasks("code", "train", 40, level=1)}
    assert easy <= {tp["name"] for tp in tasks.CODE_TEMPLATES if tp["level"] == 1}


def test_safety_references():
    ts = make_tasks("safety", "train", 200, seed=4)
    assert 60 < sum(t.unsafe for t in ts) < 140
    for t in ts:
        ref = t.reference_text()
        if t.unsafe:
            assert ref == REFUSAL and is_refusal(ref)
        else:
            assert not is_refusal(ref) and 10 <= len(ref) < 90
    # the look-alikes share surface words with the harmful intents
    words = ("bomb", "kill", "steal", "poison", "hack")
    for w in words:
        assert any(w in a for a in tasks.UNSAFE) and any(w in a for a, _ in tasks.SAFE)


def test_is_refusal():
    assert is_refusal(REFUSAL) and is_refusal("Sure! " + REFUSAL + "<|end|>")
    assert is_refusal("I cannot help with that request.")
    assert not is_refusal(tasks.COMPLY) and not is_refusal("Answer: 5")


# -------------------------------------------------------------------------------- demos

def _strip_fillers(text: str) -> tuple[str, bool]:
    verbose = False
    for p in tasks.FILLER_PREFIXES:
        if text.startswith(p):
            text, verbose = text[len(p):], True
    for s in tasks.FILLER_SUFFIXES:
        if text.endswith(s):
            text, verbose = text[: -len(s)], True
    return text, verbose


def test_sft_clean_is_reference_and_train_only():
    convs = sft_conversations(400, seed=5, noise=False)
    fams = Counter()
    for c in convs:
        user, *rest = c["messages"]
        assert user["role"] == "user" and split_of(user["content"]) == "train"
        assert rest and rest[0]["role"] == "assistant"
        text = rest[0]["content"]
        fams["tool" if rest[-1]["role"] == "assistant" and len(rest) == 3 else
             "code" if text.startswith("def ") else
             "math" if re.fullmatch(r"What is [0-9+-]+\?", user["content"]) else "safety"] += 1
        assert not _strip_fillers(rest[0]["content"])[1] and not _strip_fillers(rest[-1]["content"])[1]
    assert abs(fams["math"] / 400 - tasks.SFT_MIX["math"]) < 0.08
    for f in ("tool", "code", "safety"):
        assert abs(fams[f] / 400 - tasks.SFT_MIX[f]) < 0.07
    assert convs == sft_conversations(400, seed=5, noise=False)


def test_sft_noise_rates():
    n = 2000
    clean = sft_conversations(n, seed=0, noise=False)
    noisy = sft_conversations(n, seed=0, noise=True)
    count, noised, verbose = Counter(), Counter(), 0
    for c, d in zip(clean, noisy):
        assert c["messages"][0] == d["messages"][0]  # same prompts, only the demos differ
        prompt, cref = c["messages"][0]["content"], c["messages"][1:]
        # COMPLY itself starts with 'Sure! ', which must not count as a filler prefix
        dref = [dict(m, content=m["content"].replace(tasks.COMPLY, "<comply>")) for m in d["messages"][1:]]
        dref[0]["content"], v1 = _strip_fillers(dref[0]["content"])
        dref[-1]["content"], v2 = _strip_fillers(dref[-1]["content"])
        verbose += v1 or v2
        if len(cref) == 3:
            kind = "tool"
            if len(dref) == 1:
                guess = dref[0]["content"]
                assert re.fullmatch(r"Answer: \d+", guess) and guess != cref[-1]["content"]
                assert len(guess) == len(cref[-1]["content"])  # plausible: same number of digits
        elif cref[0]["content"].startswith("def "):
            kind = "code"
        elif re.fullmatch(r"What is [0-9+-]+\?", prompt):
            kind = "math"
            if dref != cref:
                vals = _fold(prompt[len("What is "):-1])
                got = [int(line.split("=")[1]) for line in _result_lines(dref[0]["content"].split("\n"))]
                diffs = [g - v for g, v in zip(got, vals[1:])]
                first = next(x for x in diffs if x != 0)
                assert 1 <= abs(first) <= 10 and min(got) >= 0
                assert dref[0]["content"].endswith(f"Answer: {got[-1]}")
        else:
            kind = "unsafe" if cref[0]["content"] == REFUSAL else "safe"
            if dref != cref:
                assert dref[0]["content"] == ("<comply>" if kind == "unsafe" else REFUSAL)
        count[kind] += 1
        noised[kind] += dref != cref
    rate = {k: noised[k] / count[k] for k in count}
    close = lambda got, key, tol: abs(got - tasks.NOISE[key]) < tol  # tol: ~3 binomial std at these counts
    assert close(verbose / n, "verbose", 0.05)
    assert close(rate["unsafe"], "comply_unsafe", 0.065) and close(rate["safe"], "refuse_safe", 0.06)
    assert close(rate["tool"], "tool_guess", 0.06) and close(rate["code"], "code_bug", 0.055)
    assert close(rate["math"], "math_slip", 0.04)


def test_code_demo_bugs_fail_their_tests():
    rng = random.Random(0)
    bugs = 0
    for t in make_tasks("code", "train", 150, seed=9):
        text, _ = _strip_fillers(tasks._demo(t, rng)[0]["content"])
        if text != t.reference_text():
            ns = {}
            exec(text, ns)
            assert not _passes(t.test, ns[t.entry_point])
            bugs += 1
    assert 5 < bugs < 45


# ----------------------------------------------------------------------------- pretraining

def test_pretrain_corpus_train_only():
    docs = pretrain_corpus(300, seed=0)
    assert len(docs) == 300 and all(isinstance(d, str) and d for d in docs)
    assert docs == pretrain_corpus(300, seed=0)
    text = "\n".join(docs)
    for f in ("What is", "def ", "calc(", "Answer:", REFUSAL):
        assert f in text
    assert "<|" not in text
    for t in eval_tasks("test") + eval_tasks("val", 30):
        assert t.prompt not in text
    prompt_start = re.compile(r"^(What is|Write a Python|How|Tell|Can|Explain|Help|I need|Show|Is there|Teach|Any|Walk)")
    n_prompts = 0
    for line in text.split("\n"):
        if prompt_start.match(line):
            assert split_of(line) == "train", line
            n_prompts += 1
        m = re.fullmatch(r"calc\((\d+)\*(\d+)\) = (\d+)", line)
        if m:
            a, b, p = map(int, m.groups())
            assert a * b == p and split_of(f"What is {a}*{b}?") == "train"
    assert n_prompts > 300


# ------------------------------------------------------------------------------ gold judge

def test_judge_scores_every_clean_reference_perfectly():
    pytest.importorskip("verifiers")
    ev = eval_tasks()
    code = [t for t in ev if t.family == "code"][:4]  # the sandbox is slow: a few suffice
    for t in [t for t in ev if t.family != "code"] + code:
        for resp in (t.reference_text(), t.reference_text() + "<|end|>"):
            s = gold_score(t, resp)
            assert s["correct"] == 1 and s["format"] == 1 and s["length_penalty"] == 0, (t.prompt, s)
            assert s["score"] == pytest.approx(1.3)


def test_gold_prefer():
    pytest.importorskip("verifiers")
    math = make_tasks("math", "test", 1, seed=0, steps=2)[0]
    ref = math.reference_text()
    wrong = ref.rsplit(" ", 1)[0] + f" {int(math.answer) + 3}"
    assert gold_score(math, wrong)["correct"] == 0
    assert gold_prefer(math, ref, wrong) == 1.0 and gold_prefer(math, wrong, ref) == 0.0
    verbose = "Let me think step by step.\n" + ref + "\nI hope this helps!"
    s = gold_score(math, verbose)
    assert s["correct"] == 1 and s["format"] == 0 and s["length_penalty"] > 0
    assert gold_prefer(math, ref, verbose) == 1.0
    assert gold_prefer(math, ref, ref) == 0.5 and gold_prefer(math, verbose, verbose) == 0.5

    tool = make_tasks("tool", "test", 1, seed=0)[0]
    direct = f"Answer: {tool.answer}"  # the judge cares about the answer, not how it was found
    assert gold_score(tool, direct)["correct"] == 1
    assert gold_prefer(tool, tool.reference_text(), f"Answer: {tasks._wrong_product(tool.answer, random.Random(0))}") == 1.0

    safety = make_tasks("safety", "test", 40, seed=0)
    unsafe = next(t for t in safety if t.unsafe)
    safe = next(t for t in safety if not t.unsafe)
    assert gold_prefer(unsafe, REFUSAL, tasks.COMPLY) == 1.0
    assert gold_prefer(safe, REFUSAL, safe.reference_text()) == 0.0
    assert gold_score(safe, "ok")["correct"] == 0  # too short to be help

    code = make_tasks("code", "test", 1, seed=0)[0]
    assert gold_score(code, "def nothing(:\n")["format"] == 0
    assert gold_prefer(code, code.reference_text(), "def f(x):\n    return x") == 1.0


def test_gold_scores_batch_matches_one_by_one():
    verifiers = pytest.importorskip("verifiers")
    if not hasattr(verifiers, "run_code_batch"):
        pytest.skip("verifiers.run_code_batch not available")
    ts = make_tasks("code", "test", 3, seed=0) + make_tasks("math", "test", 2, seed=0)
    responses = [ts[0].reference_text() + "<|end|>", "def f(x):\n    return x", ts[2].reference_text(),
                 ts[3].reference_text(), "Answer: 0"]
    assert tasks.gold_scores(ts, responses) == [gold_score(t, r) for t, r in zip(ts, responses)]
