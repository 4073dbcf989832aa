import math
import os
import secrets
import socket
import sys
import time
from fractions import Fraction

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import verifiers as V  # noqa: E402

# ----------------------------------------------------------------------------- math

MATH_CASES = [
    # (response, reference, expected reward)
    ("Answer: 42", 42, 1.0),
    ("Answer: 42", "42", 1.0),
    ("Answer: 41", 42, 0.0),
    ("Let me think.\n6*7=42\nAnswer: 42<|end|>", 42, 1.0),
    ("Answer: 42<|end|><|endoftext|>", 42, 1.0),
    ("<|assistant|>Answer: <|end|>42", 42, 1.0),
    # the last answer wins
    ("Answer: 3\nWait, let me redo it.\nAnswer: 4", 4, 1.0),
    ("Answer: 3\nWait, let me redo it.\nAnswer: 4", 3, 0.0),
    ("\\boxed{3}\n\\boxed{4}", 4, 1.0),
    ("#### 5\nThe answer is 6", 6, 1.0),
    # tag spam on the final line: ambiguous, no reward whichever is right
    ("Answer: 3 Answer: 4", 3, 0.0),
    ("Answer: 3 Answer: 4", 4, 0.0),
    ("\\boxed{3}\\boxed{4}", 3, 0.0),
    ("\\boxed{3}\\boxed{4}", 4, 0.0),
    ("Answer: 3 \\boxed{4}", 4, 0.0),
    ("Answer: 3 Answer: 3", 3, 1.0),
    ("Answer: 7 \\boxed{7}", 7, 1.0),
    # number formats
    ("Answer: 10.0", 10, 1.0),
    ("Answer: 10", "10.0", 1.0),
    ("Answer: 10.5", 10, 0.0),
    ("Answer: 1,000", 1000, 1.0),
    ("Answer: 1,000,000", "1000000", 1.0),
    ("Answer: 1/2", "0.5", 1.0),
    ("Answer: 0.5", Fraction(1, 2), 1.0),
    ("Answer: 3/4", 0.75, 1.0),
    ("Answer: 0.333", Fraction(1, 3), 0.0),  # exact comparison, no tolerance
    ("Answer: -7", -7, 1.0),
    ("Answer: \u22127", -7, 1.0),  # unicode minus
    ("Answer: -7", 7, 0.0),
    ("Answer: 12 cm", 12, 1.0),
    ("Answer: 12 cm^2", 12, 1.0),
    ("Answer: 50%", 50, 1.0),
    ("Answer: $1,234.50", "1234.5", 1.0),
    ("Answer: $18.", 18, 1.0),
    ("Answer: 2.5e3", 2500, 1.0),
    ("**Answer:** 9", 9, 1.0),
    # other markers
    ("so the total is $\\boxed{72}$.", 72, 1.0),
    ("$\\boxed{\\frac{3}{4}}$", "0.75", 1.0),
    ("\\boxed{1{,}000}", 1000, 1.0),
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", 72, 1.0),
    ("The answer is 42.", 42, 1.0),
    ("So the answer is: 17 apples", 17, 1.0),
    ("The answer is \\boxed{5}", 5, 1.0),
    ("Answer: 5\nI hope the answer is correct.", 5, 1.0),  # a marker with no number is ignored
    # no answer at all
    ("42", 42, 0.0),
    ("The result is 42.", 42, 0.0),
    ("", 42, 0.0),
    ("Answer: none", 42, 0.0),
    ("\\boxed{42", 42, 0.0),  # unclosed box
    # malformed / hostile numbers: 0 and fast
    ("Answer: 1e999999", 1, 0.0),
    ("Answer: 1e999999", "1e999999", 0.0),
    ("Answer: " + "9" * 10_000, int("9" * 100), 0.0),
    ("Answer: 1/0", 0, 0.0),
    # reference given in GSM8K form
    ("Answer: 72", "Natalia sold 48+24 = 72 clips.\n#### 72", 1.0),
]


@pytest.mark.parametrize("response,answer,expected", MATH_CASES)
def test_verify_math_table(response, answer, expected):
    t0 = time.perf_counter()
    assert V.verify_math(response, answer) == expected
    assert time.perf_counter() - t0 < 0.5


def test_extract_answer_returns_the_final_token():
    assert V.extract_answer("Answer: 3\nAnswer: 1,000 dollars") == "1,000"
    assert V.extract_answer("\\boxed{-2.5}") == "-2.5"
    assert V.extract_answer("Answer: 3 Answer: 4") is None
    assert V.extract_answer("nothing here") is None


def test_math_hostile_inputs_are_fast():
    huge = "Answer: " + "1" * 1_000_000
    spam = "Answer: 1 " * 100_000  # one long line of markers
    t0 = time.perf_counter()
    assert V.verify_math(huge, 1) == 0.0
    assert V.verify_math(spam, 1) == 1.0  # all agree
    assert V.verify_math(spam + "Answer: 2", 1) == 0.0
    assert V.verify_math(None, 1) == 0.0
    assert V.verify_math("Answer: 1", object()) == 0.0
    assert time.perf_counter() - t0 < 5.0


# ----------------------------------------------------------------------------- calculator

@pytest.mark.parametrize("expr,value", [
    ("347*829", 287663),
    ("2+3*4", 14),
    ("(2+3)*4", 20),
    ("-3 + +5", 2),
    ("7/2", Fraction(7, 2)),
    ("6/3", 2),
    ("7//2", 3),
    ("-7 % 3", 2),
    ("2**10", 1024),
    ("2**-2", Fraction(1, 4)),
    ("0.1 + 0.2", Fraction(3, 10)),  # exact, not 0.30000000000000004
    ("1_000 * 3", 3000),
    ("10**100 // 10**99", 10),
])
def test_safe_eval_values(expr, value):
    got = V.safe_eval(expr)
    assert got == value
    assert type(got) is type(value)


@pytest.mark.parametrize("expr", [
    "(1).__class__",
    "().__class__.__bases__[0].__subclasses__()",
    "x",
    "__import__('os')",
    "abs(-1)",
    "[1, 2][0]",
    "'a' * 3",
    "True + 1",
    "1j",
    "lambda: 1",
    "[i for i in range(3)]",
    "1 if 1 else 2",
    "1 < 2",
    "9**9**9",
    "2**101",
    "(10**100)**11",
    "(10**300) * (10**300) * (10**300) * (10**300)",
    "1e999",
    "(" * 99 + "1" + ")" * 99,
    "-" * 150 + "1",
    "1+" * 150 + "1",
    "1" * 201,
    "1/0",
    "1//0",
    "1%0",
    "0**-1",
    "(-8)**(1/3)",
    "",
    "1 +",
])
def test_safe_eval_rejects(expr):
    t0 = time.perf_counter()
    with pytest.raises(V.CalcError):
        V.safe_eval(expr)
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize("expr,text", [
    ("347*829", "287663"),
    ("7/2", "3.5"),
    ("1/3", "0.333333"),
    ("2/3", "0.666667"),
    ("-1/8", "-0.125"),
    ("10/4*2", "5"),
    ("2**0.5", "1.41421"),
    ("4**0.5", "2"),
    ("10**20/3", "3.33333e+19"),
    ("1/30000000", "3.33333e-8"),
    ("1/0", "error: division by zero"),
    ("(1).__class__", "error: unsupported syntax: Attribute"),
    ("9**9**9", "error: exponent too large"),
])
def test_run_calculator_renders(expr, text):
    assert V.run_calculator(expr) == text


def test_run_calculator_never_raises():
    for expr in [None, 123, b"1+1", "\x00", "(" * 1000, "1e999999", "import os", "1 +* 2"]:
        out = V.run_calculator(expr)
        assert isinstance(out, str) and out.startswith("error: ")


def test_parse_calc_call():
    assert V.parse_calc_call("calc(347*829)<|call|>") == "347*829"
    assert V.parse_calc_call("a calc(1+2) b calc((4+5)*(6-1)) c") == "(4+5)*(6-1)"
    assert V.parse_calc_call("calc(1+(2*(3+4)))") == "1+(2*(3+4))"
    assert V.parse_calc_call("no call here") is None
    assert V.parse_calc_call("calc(1+2") is None  # cut off mid-call
    assert V.parse_calc_call("recalc(1) mycalc(2)") is None  # not a call to calc


TOOL_OK = "calc(347*829)<|call|><|tool|>287663<|end|><|assistant|>Answer: 287663<|end|>"


@pytest.mark.parametrize("response,answer,expected", [
    (TOOL_OK, 287663, 1.0),
    (TOOL_OK, 287664, 0.0),  # wrong answer
    ("Answer: 287663", 287663, 0.0),  # right, but no call
    ("calc(347*829)<|call|><|tool|>287663<|end|>", 287663, 0.0),  # no answer
    ("calc(__import__('os'))<|call|><|tool|>error<|end|>Answer: 287663", 287663, 0.0),
    ("calc(347*829)<|call|>287663 calc(1/0)<|call|>Answer: 287663", 287663, 0.0),
    ("calc(347*829 Answer: 287663", 287663, 0.0),  # unterminated
    ("calc(300*800)<|call|>240000 calc(347*829)<|call|>287663 Answer: 287663", 287663, 1.0),
])
def test_verify_tool(response, answer, expected):
    assert V.verify_tool(response, answer) == expected


# ----------------------------------------------------------------------------- pass@k

def test_pass_at_k_hand_computed():
    assert V.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert V.pass_at_k(5, 2, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(5, 2))  # 0.7
    assert V.pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert V.pass_at_k(5, 0, 3) == 0.0
    assert V.pass_at_k(5, 5, 1) == 1.0
    assert V.pass_at_k(5, 3, 3) == 1.0  # n - c < k: every k-subset holds a correct sample
    assert V.pass_at_k(1, 1, 1) == 1.0


@pytest.mark.parametrize("n,c,k", [(10, 1, 1), (10, 3, 5), (200, 7, 10), (200, 0, 100), (1000, 999, 1)])
def test_pass_at_k_matches_closed_form(n, c, k):
    closed = 1.0 if n - c < k else 1 - math.comb(n - c, k) / math.comb(n, k)
    assert V.pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)


# ----------------------------------------------------------------------------- extract_code

def test_extract_code():
    r = "Here:\n```python\ndef f():\n    return 1\n```\nand\n```python\nx = 2\n```<|end|>"
    assert V.extract_code(r) == "def f():\n    return 1\n"
    assert V.extract_code("def f():\n    return 1<|end|>") == "def f():\n    return 1"
    assert V.extract_code("```python\ndef f(): pass") == "def f(): pass"  # cut off mid-block


# ----------------------------------------------------------------------------- sandbox

ADD = "def add(a, b):\n    return a + b\n"
ADD_TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"
TRUE_TEST = "def check(candidate):\n    assert candidate() is True\n"


def run(code, test=TRUE_TEST, entry="f", **kw):
    t0 = time.perf_counter()
    r = V.run_code(code, test, entry, **kw)
    assert set(r) == {"passed", "reason", "detail"} and len(r["detail"]) <= 500
    return r, time.perf_counter() - t0


def test_correct_solution_passes():
    r, _ = run(ADD, ADD_TEST, "add")
    assert r == {"passed": True, "reason": "passed", "detail": ""}


def test_humaneval_shape_with_imports_and_helpers():
    prompt = ('from typing import List\nimport collections\n\ndef helper(x):\n    return x * 2\n\n'
              'def double_all(xs: List[int]) -> List[int]:\n    """Double each."""\n')
    completion = "    P = collections.namedtuple('P', 'v')\n    return [P(helper(x)).v for x in xs]\n"
    test = "METADATA = {}\n\ndef check(candidate):\n    assert candidate([1, 2]) == [2, 4]\n    assert helper(3) == 6\n"
    r, _ = run(prompt + completion, test, "double_all")
    assert r["passed"], r


def test_wrong_solution_fails():
    r, _ = run("def add(a, b):\n    return a - b\n", ADD_TEST, "add")
    assert not r["passed"] and r["reason"] == "failed" and "AssertionError" in r["detail"]


def test_syntax_error_and_missing_entry_point():
    assert run("def add(a, b) return a\n", ADD_TEST, "add")[0]["reason"] == "syntax"
    r, _ = run("def other():\n    pass\n", ADD_TEST, "add")
    assert not r["passed"] and r["reason"] == "error"


def test_code_that_cannot_parse_is_judged_without_a_sandbox(monkeypatch):
    started = []
    monkeypatch.setattr(V, "_sandbox", lambda *a: started.append(a) or V._result(True, "passed"))
    r = V.run_code("def add(a, b) return a\n", ADD_TEST, "add")
    assert not r["passed"] and r["reason"] == "syntax" and "SyntaxError" in r["detail"] and not started
    assert V.run_code("def add(a, b):\n    return a + b\n", ADD_TEST, "add")["passed"] and len(started) == 1
    V.run_code("x = 1" + "+1" * 90000, ADD_TEST, "add")  # the parser itself gives up (RecursionError)
    assert len(started) == 2  # ... so the sandbox decides


def test_infinite_loop_times_out():
    for code in ["while True:\n    pass\n", "import time\ntime.sleep(60)\n"]:
        r, dt = run(code, timeout=1.0)
        assert not r["passed"] and r["reason"] == "timeout"
        assert dt < 1.0 + 2.0


def test_fork_bomb_is_contained():
    # guarded so that even a failed sandbox can't take the machine down: at most 20 forks, each
    # child exits at once; the check passes only if no fork succeeded
    code = ("import os\nforks = 0\nfor _ in range(20):\n    try:\n        pid = os.fork()\n"
            "    except Exception:\n        break\n    if pid == 0:\n        os._exit(0)\n"
            "    forks += 1\n    os.waitpid(pid, 0)\ndef f():\n    return forks == 0\n")
    r, _ = run(code)
    assert r["passed"], r


def test_subprocess_and_threads_are_refused():
    code = "import subprocess\ndef f():\n    subprocess.run(['true'])\n    return True\n"
    assert not run(code)[0]["passed"]
    code = ("import threading\ndef f():\n    t = threading.Thread(target=print)\n    t.start()\n"
            "    t.join()\n    return True\n")
    assert not run(code)[0]["passed"]


@pytest.mark.parametrize("code", [
    "x = bytearray(10**10)\ndef f():\n    return True\n",
    "x = []\nwhile True:\n    x.append(bytearray(10**6))\n",
])
def test_memory_bomb(code):
    r, dt = run(code, memory_mb=256)
    assert not r["passed"] and r["reason"] in ("memory", "error")
    assert dt < 5


def test_huge_output_is_truncated():
    r, _ = run("while True:\n    print('x' * 1000)\n")
    assert not r["passed"] and r["reason"] == "output_limit" and len(r["detail"]) <= 500
    r, _ = run("print('y' * 10**6)\ndef f():\n    return True\n")  # passing code that prints 1 MB
    assert not r["passed"] and r["reason"] == "output_limit"


def test_cannot_write_outside_temp_dir():
    path = f"/tmp/pwned_{secrets.token_hex(6)}"
    name = os.path.basename(path)
    attempts = [
        f"open({path!r}, 'w').write('x')",
        f"open('../../{name}', 'w').write('x')",  # relative escape from the work dir
        f"import os; fd = os.open('/tmp', os.O_RDONLY); os.open({name!r}, os.O_CREAT | os.O_WRONLY, dir_fd=fd)",
        f"import os; os.symlink('/tmp', 'lnk'); open('lnk/{name}', 'w').write('x')",
    ]
    for stmt in attempts:
        r, _ = run(f"def f():\n    {stmt}\n    return True\n")
        assert not r["passed"], stmt
        assert not os.path.exists(path), stmt
    # writing inside the work dir is fine
    r, _ = run("def f():\n    open('a.txt', 'w').write('ok')\n    return open('a.txt').read() == 'ok'\n")
    assert r["passed"], r


def test_cannot_delete_or_modify_callers_files(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("x")
    os.chmod(tmp_path, 0o755)
    for stmt in [f"import os; os.remove({str(victim)!r})", f"open({str(victim)!r}, 'a').write('y')",
                 f"import shutil; shutil.rmtree({str(tmp_path)!r})"]:
        r, _ = run(f"def f():\n    {stmt}\n    return True\n")
        assert not r["passed"], stmt
    assert victim.read_text() == "x"


def test_parent_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("POSTSTACK_TEST_SECRET", "hunter2")
    r, _ = run("import os\ndef f():\n    return 'POSTSTACK_TEST_SECRET' not in os.environ\n")
    assert r["passed"], r


@pytest.mark.parametrize("code", [
    "import sys\nsys.exit(0)\n",
    "import os\nos._exit(0)\n",
    "import os\ndef f():\n    os._exit(0)\n",
    "import sys\ndef f():\n    sys.exit(0)\n",
    "print('passed')\nimport os\nos._exit(0)\n",
])
def test_early_exit_is_not_a_pass(code):
    r, _ = run(code)
    assert not r["passed"] and r["reason"] == "early_exit", r


def test_always_equal_object_does_not_pass_a_type_check():
    code = ("import builtins\nclass Eq:\n    def __eq__(self, other):\n        return True\n"
            "builtins.type = lambda x: int\nisinstance = lambda *a: True\n"
            "def f():\n    return Eq()\n")
    test = "def check(candidate):\n    r = candidate()\n    assert type(r) is int and isinstance(r, int) and r == 3\n"
    r, _ = run(code, test)
    assert not r["passed"] and r["reason"] == "failed"


def test_harness_internals_are_out_of_reach():
    for stmt in ["import sys; sys._getframe(1)", "import inspect; inspect.stack()",
                 "import gc; gc.get_objects()", "import ctypes",
                 "import sys; sys.settrace(lambda *a: None)",
                 "import signal; signal.signal(signal.SIGALRM, lambda *a: None)",
                 "open('/proc/self/mem', 'rb')"]:
        r, _ = run(f"def f():\n    {stmt}\n    return True\n")
        assert not r["passed"], stmt


def test_network_is_refused():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(1.0)
    port = srv.getsockname()[1]
    try:
        code = (f"import socket\ndef f():\n    s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                f"    s.sendall(b'leak')\n    return True\n")
        r, _ = run(code)
        assert not r["passed"]
        with pytest.raises(socket.timeout):
            srv.accept()  # nobody got through
    finally:
        srv.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="the kernel layer needs root")
def test_kernel_layer_holds_without_the_audit_hook(monkeypatch):
    # arm nothing: what remains is the uid, rlimits and namespaces
    monkeypatch.setattr(V, "_HARNESS", V._HARNESS.replace('state["strict"] = True', 'pass'))
    path = f"/tmp/pwned_{secrets.token_hex(6)}"
    for stmt, err in [(f"open({path!r}, 'w')", "Read-only file system"),
                      ("import socket; socket.create_connection(('127.0.0.1', 9), timeout=1)", "unreachable"),
                      ("import os; os.fork()", "Resource temporarily unavailable"),
                      ("open('/root/.bashrc')", "Permission denied")]:
        r, _ = run(f"def f():\n    {stmt}\n    return True\n")
        assert not r["passed"] and err in r["detail"], (stmt, r)
    assert not os.path.exists(path)
    assert run("import os\ndef f():\n    return os.getuid() != 0\n")[0]["passed"]


def test_non_root_path(monkeypatch):
    # the path a non-root caller takes (no uid change, no mount namespace): the audit hook must hold
    monkeypatch.setattr(V, "_AS_ROOT", False)
    assert run(ADD, ADD_TEST, "add")[0]["passed"]
    assert not run("import os\nos._exit(0)\n")[0]["passed"]
    path = f"/tmp/pwned_{secrets.token_hex(6)}"
    assert not run(f"def f():\n    open({path!r}, 'w').write('x')\n    return True\n")[0]["passed"]
    assert not os.path.exists(path)
    assert not run("import socket\ndef f():\n    socket.socket()\n    return True\n")[0]["passed"]


def test_run_code_never_raises():
    r = V.run_code(ADD, ADD_TEST, "add", timeout="soon")
    assert r["passed"] is False and r["reason"] == "error"


def test_batch_keeps_order_and_throughput():
    items = []
    for i in range(20):
        body = "return a + b" if i % 3 else "return a - b"  # every third one is wrong
        items.append({"code": f"def add(a, b):  # {i}\n    {body}\n", "test": ADD_TEST, "entry_point": "add"})
    items.append({"code": ADD})  # malformed item: an error result, not an exception
    t0 = time.perf_counter()
    results = V.run_code_batch(items, workers=4)
    dt = time.perf_counter() - t0
    print(f"\nrun_code_batch: {len(items) / dt:.1f} verifications/s ({len(items)} in {dt:.2f}s, 4 workers)")
    assert [r["passed"] for r in results[:20]] == [bool(i % 3) for i in range(20)]
    assert results[20]["passed"] is False and results[20]["reason"] == "error"
    assert dt < 20


def test_batch_runs_identical_programs_once(monkeypatch):
    calls = []
    monkeypatch.setattr(V, "_VERDICTS", {})
    monkeypatch.setattr(V, "run_code", lambda code, *a: calls.append(code) or {"passed": code == ADD})
    same = {"code": ADD, "test": ADD_TEST, "entry_point": "add"}
    other = dict(same, code="def add(a, b):\n    return 0\n")
    results = V.run_code_batch([same, other, dict(same), other])
    assert [r["passed"] for r in results] == [True, False, True, False]
    assert sorted(calls) == sorted([ADD, other["code"]])
    results[0]["passed"] = "mutated"  # each caller gets its own copy
    assert results[2]["passed"] is True


def test_batch_remembers_verdicts_but_not_timeouts(monkeypatch):
    calls = []

    def fake(code, *a):
        calls.append(code)
        return {"passed": False, "reason": "timeout" if "while" in code else "failed"}
    monkeypatch.setattr(V, "_VERDICTS", {})
    monkeypatch.setattr(V, "run_code", fake)
    wrong = {"code": "def add(a, b):\n    return 0\n", "test": ADD_TEST, "entry_point": "add"}
    slow = dict(wrong, code="def add(a, b):\n    while True: pass\n")
    first = V.run_code_batch([wrong, slow])
    again = V.run_code_batch([slow, wrong, dict(wrong, timeout=9.0)])
    assert [r["reason"] for r in first] == ["failed", "timeout"]
    assert [r["reason"] for r in again] == ["timeout", "failed", "failed"]
    # the failure ran once; the timeout (load-dependent) ran again; another timeout is another run
    assert sorted(calls) == sorted([wrong["code"], slow["code"], slow["code"], wrong["code"]])


def test_batch_survives_a_full_memo(monkeypatch):
    monkeypatch.setattr(V, "_VERDICTS", {})
    monkeypatch.setattr(V, "_VERDICTS_MAX", 2)
    monkeypatch.setattr(V, "run_code", lambda code, *a: {"passed": code == ADD, "reason": "failed"})
    items = [{"code": c, "test": ADD_TEST, "entry_point": "add"} for c in (ADD, "x = 1", "x = 2")]
    V.run_code_batch(items[:1])  # remembered; the next batch overflows the memo and clears it
    assert [r["passed"] for r in V.run_code_batch(items)] == [True, False, False]
    assert len(V._VERDICTS) == 2
