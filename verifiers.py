"""Verifiers: programs that score a model's response, so rewards can be checked, not judged.

- Math: `verify_math` reads the final answer (`Answer: N`, `\\boxed{N}`, `#### N`, "the answer is N")
  and compares it with the reference exactly, as a Fraction.
- Tool use: a safe `calc(EXPR)` calculator (`safe_eval`, `run_calculator`) and `verify_tool`.
- Code: `run_code` runs untrusted code plus a HumanEval-style test in a sandboxed subprocess;
  `pass_at_k` is the unbiased Codex estimator.

What the code sandbox enforces (never in-process; a fresh `python -I -S` per run, so the standard
library only, scrubbed env, no stdin, its own session so the whole group is killed at the wall
timeout, a temp dir removed afterwards):

  every run     rlimits CPU (timeout), AS (memory_mb), FSIZE (1 MiB), CORE 0, NPROC 1; no_new_privs.
                An audit hook (PEP 578), armed after setup, refuses sockets, fork/exec/spawn/system/kill,
                threads, ctypes, writes/renames/deletes outside the temp dir, /proc/*/mem, and the ways to
                reach the harness's frames (sys._getframe except for namedtuple/typing/enum, tb_frame,
                gi_frame, settrace, gc.get_objects), so the per-run success nonce stays hidden.
                passed = exit code 0 AND the nonce printed after check(candidate) returned, so
                sys.exit(0) / os._exit(0) / printing "PASSED" before the checks do not pass.
                The test sees the builtins as they were before the solution ran (no `builtins.type = ...`);
                in-place patches to other modules (`math.isclose = ...`) are not undone. Code that needs
                frames (logging, inspect.stack) or threads fails inside the sandbox.
  as root       the above, enforced by the kernel as well: the child drops to a fresh unprivileged uid
                (so NPROC=1 means no fork at all and other runs can't be signalled), lives in new mount and
                network namespaces (loopback down: connect is refused), sees /tmp, /var/tmp, /dev/shm
                read-only, and reads the interpreter through a read-only bind (the uid may not traverse
                /root). The job file (code, test, nonce) is root-only and deleted before the code runs.
  not root      no uid change: NPROC counts all of the user's processes (so forks still fail), files
                are protected by the audit hook only; network is cut by unshare(NEWUSER|NEWNET) where the
                kernel allows unprivileged user namespaces, else by the audit hook only.

In-process defences are best effort against a policy that games the reward, not a security
boundary against a determined attacker: crafted bytecode, a signal handler or module_from_spec
tricks could reach past the audit hook. The kernel-level layer (root) is the hard boundary.
"""
import ast
import hashlib
import json
import math
import operator
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal, localcontext
from fractions import Fraction

# ----------------------------------------------------------------------------- math answers

_SPECIAL = re.compile(r"<\|[^<>|\s]{1,40}\|>")  # chat special tokens like <|end|>
_MARKER = re.compile(r"\\boxed\s*\{|####|\banswer\s*(?:is\b|:)", re.IGNORECASE)
_NUMBER = re.compile(
    r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?:\s*/\s*\d+)?|-?\.\d+")
_MAX_NUM_CHARS = 100  # a longer "number" is noise or an attack; Fraction never sees it


def _payload(text, m, stop):
    """Text a marker points at: the braces of \\boxed{...}, else the rest of the line up to `stop`."""
    if m.group().startswith("\\"):
        depth, i = 1, m.end()
        while i < len(text) and depth and i - m.end() <= 200:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        return text[m.end():i - 1] if depth == 0 else None
    end = text.find("\n", m.end(), stop)  # bounded by the next marker: linear in the response
    return text[m.end():stop if end < 0 else end]


def _first_number(s):
    s = s.replace("\u2212", "-").replace("{,}", ",").replace("\\$", "").replace("$", "")
    s = re.sub(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"\1/\2", s)
    m = _NUMBER.search(s)
    return m.group().replace(" ", "") if m else None


def _to_fraction(token):
    """'1,000' -> 1000, '10.0' -> 10, '1/2' -> 1/2, '2.5e3' -> 2500; None if malformed or too big."""
    s = token.replace(",", "").replace(" ", "")
    if len(s) > _MAX_NUM_CHARS:
        return None
    exp = s.lower().partition("e")[2]
    if exp and abs(int(exp)) > 100:  # Fraction('1e999999') would build 10**999999
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(response):
    """The final answer's number token, or None.

    Markers: `Answer: N`, `\\boxed{N}`, `#### N`, `the answer is N`; each yields the first number after
    it, tolerating `$`, thousands commas, units and `%` (so `50%` reads as 50), `\\frac{a}{b}`.
    Markers with no number are ignored. The last marker that yields a number wins,
    but if the line holding it has markers with *different* numbers (`Answer: 3 Answer: 4`,
    `\\boxed{3}\\boxed{4}`) the answer is ambiguous and None: hedging must not earn reward.

    >>> extract_answer("2+2 is 4.\\nAnswer: 4<|end|>")
    '4'
    """
    text = _SPECIAL.sub(" ", str(response))
    marks = list(_MARKER.finditer(text))
    found = []
    for i, m in enumerate(marks):
        stop = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        p = _payload(text, m, stop)
        tok = _first_number(p) if p else None
        if tok is not None:
            found.append((m.start(), tok))
    if not found:
        return None
    pos, last = found[-1]
    line_start = text.rfind("\n", 0, pos) + 1
    if len({_to_fraction(t) for p, t in found if p >= line_start}) > 1:
        return None
    return last


def _reference(answer):
    if isinstance(answer, bool):
        return None
    if isinstance(answer, float):
        return Fraction(repr(answer)) if math.isfinite(answer) else None
    if isinstance(answer, str):
        tok = extract_answer(answer) if _MARKER.search(answer) else _first_number(answer)
        return _to_fraction(tok) if tok else None
    return Fraction(answer)  # int, Fraction, Decimal


def verify_math(response, answer):
    """1.0 iff the final answer equals `answer` exactly (10.0 == 10, 1/2 == 0.5, 1,000 == 1000)."""
    try:
        got, want = extract_answer(response), _reference(answer)
        return float(got is not None and want is not None and _to_fraction(got) == want)
    except Exception:  # a reward function must not take the training loop down
        return 0.0


# ----------------------------------------------------------------------------- calculator tool

class CalcError(ValueError):
    pass


_CALC_MAX_LEN, _CALC_MAX_DEPTH, _CALC_MAX_EXP = 200, 30, 100
_CALC_MAX_BITS = 3400  # ~10^1023: every value, intermediate or final, stays below this
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}


def _bounded(v):
    if isinstance(v, float):
        if not math.isfinite(v):
            raise CalcError("number too large")
        return v
    if max(abs(v.numerator).bit_length(), v.denominator.bit_length()) > _CALC_MAX_BITS:
        raise CalcError("number too large")
    return v


def _power(a, b):
    if isinstance(b, Fraction) and b.denominator == 1:
        b = int(b)
    if isinstance(b, int) and not isinstance(a, float):
        if abs(b) > _CALC_MAX_EXP:
            raise CalcError("exponent too large")
        a = Fraction(a)
        # check the size before computing: 9**9**9 must fail instantly, not after minutes
        if max(a.numerator.bit_length(), a.denominator.bit_length()) * abs(b) > _CALC_MAX_BITS:
            raise CalcError("number too large")
        return a ** b  # exact, also for negative exponents
    r = float(a) ** float(b)  # fractional exponent: no exact answer exists
    if isinstance(r, complex):
        raise CalcError("complex result")
    return r


def _calc(node, depth):
    if depth > _CALC_MAX_DEPTH:
        raise CalcError("expression too deep")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        v = node.value
        if isinstance(v, float):
            v = Fraction(repr(_bounded(v)))  # exact decimal: 0.1 stays one tenth
        return _bounded(v)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _calc(node.operand, depth + 1)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and (type(node.op) in _BINOPS or isinstance(node.op, ast.Pow)):
        a, b = _calc(node.left, depth + 1), _calc(node.right, depth + 1)
        if isinstance(node.op, ast.Pow):
            return _bounded(_power(a, b))
        if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and b == 0:
            raise CalcError("division by zero")
        if isinstance(node.op, ast.Div) and not isinstance(a, float) and not isinstance(b, float):
            return _bounded(Fraction(a) / b)  # 7/2 stays exact
        return _bounded(_BINOPS[type(node.op)](a, b))
    raise CalcError(f"unsupported syntax: {type(node).__name__}")


def safe_eval(expr):
    """Evaluate arithmetic (numbers, + - * / // % **, unary +/-, parentheses) without eval.

    >>> safe_eval("347*829"), safe_eval("7/2"), safe_eval("2**-1")
    (287663, Fraction(7, 2), Fraction(1, 2))
    """
    if not isinstance(expr, str):
        raise CalcError("expression must be a string")
    if len(expr) > _CALC_MAX_LEN:
        raise CalcError(f"expression longer than {_CALC_MAX_LEN} characters")
    depth = deepest = 0
    for ch in expr:  # parentheses leave no AST node, so count them here
        depth += (ch == "(") - (ch == ")")
        deepest = max(deepest, depth)
    if deepest > _CALC_MAX_DEPTH:
        raise CalcError("expression too deep")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError):
        raise CalcError("syntax error") from None
    try:
        v = _calc(tree.body, 0)
    except CalcError:
        raise
    except ZeroDivisionError:
        raise CalcError("division by zero") from None
    except (OverflowError, ValueError, TypeError) as e:
        raise CalcError(type(e).__name__) from None
    return int(v) if isinstance(v, Fraction) and v.denominator == 1 else v


def _render(v):
    """Integers exactly; else 6 significant digits, trailing zeros trimmed, 1e-6 <= |v| < 1e15 fixed."""
    if isinstance(v, float):
        v = int(v) if v.is_integer() else Fraction(v)
    if isinstance(v, int) or v.denominator == 1:
        return str(int(v))
    with localcontext() as ctx:
        ctx.prec = 6
        d = Decimal(v.numerator) / Decimal(v.denominator)
    if -7 < d.adjusted() < 15:
        s = format(d, "f")
        return s.rstrip("0").rstrip(".") if "." in s else s
    mant, _, exp = format(d, "e").partition("e")
    return (mant.rstrip("0").rstrip(".") if "." in mant else mant) + "e" + exp


def run_calculator(expr):
    """Tool output for calc(expr): '287663', '3.5', '0.333333', or 'error: <reason>'. Never raises."""
    try:
        return _render(safe_eval(expr))
    except CalcError as e:
        return f"error: {e}"
    except Exception as e:
        return f"error: {type(e).__name__}"


_CALL = re.compile(r"(?<![\w.])calc\(")


def _calc_calls(text):
    """Every top-level calc(...) in order; None for one whose parentheses never close."""
    calls, pos = [], 0
    while (m := _CALL.search(text, pos)) is not None:
        depth, i = 1, m.end()
        while i < len(text) and depth and i - m.end() <= _CALC_MAX_LEN:
            depth += (text[i] == "(") - (text[i] == ")")
            i += 1
        if depth:
            calls.append(None)
            pos = m.end()
        else:
            calls.append(text[m.end():i - 1])
            pos = i
    return calls


def parse_calc_call(text):
    """EXPR of the last calc(EXPR) in text (balanced parentheses), or None."""
    calls = _calc_calls(str(text))
    return calls[-1] if calls else None


def verify_tool(response, answer):
    """1.0 iff the response made >= 1 calc call, every call is well-formed, and the answer is right."""
    calls = _calc_calls(str(response))
    if not calls:
        return 0.0
    for expr in calls:
        try:
            safe_eval(expr)
        except (CalcError, TypeError):  # TypeError: unterminated call (None)
            return 0.0
    return verify_math(response, answer)


# ----------------------------------------------------------------------------- code sandbox

_OUTPUT_LIMIT = 64 * 1024
_UID_BASE, _UID_SPAN = 1 << 20, 1 << 24  # unprivileged uids no real account uses
_AS_ROOT = os.geteuid() == 0  # module-level so tests can exercise the non-root path
_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8",  # nothing else of the parent's leaks
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}  # BLAS threads would hit NPROC
_EXIT_REASONS = {0: "early_exit", 1: "failed", 2: "error", 3: "syntax", 4: "memory",
                 5: "early_exit", 6: "error"}

# Runs in the child. Exit codes: 0 pass (+ nonce on stdout), 1 check failed, 2 solution raised,
# 3 syntax error, 4 MemoryError, 5 SystemExit, 6 sandbox setup failed.
_HARNESS = r'''
import json, os, re, resource, sys

def limit(res, soft, hard):
    cur = resource.getrlimit(res)[1]
    hard = hard if cur == resource.RLIM_INFINITY else min(hard, cur)
    resource.setrlimit(res, (min(soft, hard), hard))

def isolate(job):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    def call(name, *args):
        if getattr(libc, name)(*args) != 0:
            raise OSError(ctypes.get_errno(), name)
    call("prctl", 38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: a setuid binary can't give root back
    work, uid = job["work"], job["uid"]
    if uid is None:
        try:
            call("unshare", 0x10000000 | 0x40000000)  # NEWUSER|NEWNET: unprivileged, if allowed
        except OSError:
            pass
    else:
        try:
            call("unshare", 0x00020000 | 0x40000000)  # NEWNS|NEWNET: loopback down, private mounts
            call("mount", b"none", b"/", None, 0x4000 | 0x40000, None)  # MS_REC|MS_PRIVATE
            moves = {}
            for i, p in enumerate(sorted({sys.prefix, sys.base_prefix, sys.exec_prefix})):
                target = os.path.join(os.path.dirname(work), f"py{i}")
                os.mkdir(target, 0o755)
                call("mount", p.encode(), target.encode(), None, 0x1000 | 0x4000, None)
                moves[p] = target
            def move(path):
                for old, new in moves.items():
                    if path == old or path.startswith(old + "/"):
                        return new + path[len(old):]
                return path
            sys.path[:] = [move(p) for p in sys.path]
            for m in list(sys.modules.values()):
                if isinstance(getattr(m, "__path__", None), list):
                    m.__path__[:] = [move(p) for p in m.__path__]
            call("mount", work.encode(), work.encode(), None, 0x1000, None)  # stays rw below
            for d in (b"/tmp", b"/var/tmp", b"/dev/shm"):
                if os.path.isdir(d) and not os.path.islink(d):
                    call("mount", d, d, None, 0x1000 | 0x4000, None)
                    call("mount", None, d, None, 0x1000 | 0x20 | 0x1, None)  # BIND|REMOUNT|RDONLY
        except OSError:
            pass  # no namespaces here (unprivileged container): rely on the uid and the audit hook
    cpu, mem = job["cpu"], job["memory_mb"] << 20
    limit(resource.RLIMIT_CPU, cpu, cpu + 1)
    limit(resource.RLIMIT_AS, mem, mem)
    limit(resource.RLIMIT_FSIZE, 1 << 20, 1 << 20)
    limit(resource.RLIMIT_CORE, 0, 0)
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    limit(resource.RLIMIT_NPROC, 1, 1)  # after the uid change: root ignores it
    os.chdir(work)  # after the mounts, so ".." walks the read-only view
    for m in [m for m in sys.modules if "ctypes" in m]:
        del sys.modules[m]

def install_hook(work, frame_ok):
    state = {"strict": False, "report": False, "busy": False}
    getframe, realpath, isdir = sys._getframe, os.path.realpath, os.path.isdir
    blocked = {"os.system", "os.fork", "os.forkpty", "os.exec", "os.spawn", "os.posix_spawn",
               "os.kill", "os.killpg", "signal.pthread_kill", "subprocess.Popen", "pty.spawn",
               "_thread.start_new_thread", "gc.get_objects", "gc.get_referrers",
               "gc.get_referents", "sys.addaudithook", "code.__new__",
               "cpython.PyInterpreterState_New", "sys._current_frames",
               "sys._current_exceptions", "sys.settrace", "sys.setprofile"}
    bad_modules = {"ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters", "_testcapi",
                   "_testinternalcapi", "cffi"}
    dir_fd_at = {"os.remove": 1, "os.rmdir": 1, "shutil.rmtree": 1, "os.mkdir": 2, "os.symlink": 2,
                 "os.chmod": 2, "os.rename": 2, "os.link": 2, "os.chown": 3, "os.utime": 3,
                 "os.truncate": 9, "os.setxattr": 9, "os.removexattr": 9}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def inside(real):
        return real == work or real.startswith(work + "/")

    def resolve(p):
        return realpath(os.fsdecode(os.fspath(p)))

    def check(event, args):
        if event in blocked or event.startswith(("socket.", "ctypes.")):
            return False
        if event == "sys._getframe":
            return getframe(2).f_code in frame_ok
        if event == "object.__getattr__":  # tb_frame & co lead to frames; __code__ is fine
            return state["report"] or args[1] not in ("tb_frame", "gi_frame", "cr_frame", "ag_frame")
        if event == "object.__setattr__":
            return args[1] != "__code__"
        if event == "import":
            return args[0].partition(".")[0] not in bad_modules
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return True
            real = resolve(path)
            if inside(real):
                return True
            if flags & write_flags or (mode is None and isdir(real)):  # a dir fd escapes via dir_fd=
                return False
            return not re.fullmatch(r"/proc/[^/]+/(task/[^/]+/)?(mem|pagemap)", real)
        if event in dir_fd_at:
            paths = [a for a in args if isinstance(a, (str, bytes, os.PathLike))]
            fds = args[dir_fd_at[event]:]
            return all(inside(resolve(p)) for p in paths) and all(f in (None, -1) for f in fds)
        return True

    def hook(event, args):
        if not state["strict"] or state["busy"]:
            return
        state["busy"] = True  # the checks themselves raise audit events
        try:
            ok = check(event, args)
        finally:
            state["busy"] = False
        if not ok:  # ImportError: libraries that probe for ctypes treat it as absent
            raise (ImportError if event == "import" else PermissionError)(f"sandbox: {event} is not allowed")

    sys.addaudithook(hook)
    return state

def refuse(*args, **kwargs):
    raise PermissionError("sandbox: signal handlers and threads are not allowed")

def main():
    path = sys.argv.pop(1)
    with open(path) as f:
        job = json.load(f)
    os.unlink(path)
    nonce = job.pop("nonce").encode()
    try:
        isolate(job)
    except Exception as e:
        os.write(2, f"sandbox setup failed: {e!r}\n".encode())
        os._exit(6)
    # imported before the guard: they use sys._getframe, which is then allowed only for them
    import builtins, collections, enum, signal, threading, traceback, typing, _signal, _thread
    signal.signal = _signal.signal = refuse  # a handler would receive the harness's frame
    threading._start_new_thread = _thread.start_new_thread = refuse  # 3.11 has no audit event
    write, exit_ = os.write, os._exit
    frame_ok = {getattr(f, "__code__", None) for f in (  # they only read the caller's __name__
        collections.namedtuple, getattr(typing, "_caller", None),
        getattr(getattr(enum, "EnumType", None), "_create_", None))}
    state = install_hook(os.path.realpath(job["work"]), frame_ok)
    code, test, entry = job["code"], job["test"], job["entry_point"]
    del job
    try:
        compiled = compile(code, "<solution>", "exec")
    except (SyntaxError, ValueError) as e:
        write(2, "".join(traceback.format_exception_only(e)).encode(errors="replace"))
        exit_(3)
    clean = dict(builtins.__dict__)
    ns = {"__name__": "solution", "__builtins__": builtins}  # not __main__: skip demo blocks
    phase = 2
    state["strict"] = True
    try:
        exec(compiled, ns)
        candidate = ns[entry]
        phase = 1
        # undo what the solution did to builtins; the test also gets a private copy of them, and
        # the solution's names minus any that shadow a builtin (a global `type` or `isinstance`)
        for k in [k for k in builtins.__dict__ if k not in clean]:
            del builtins.__dict__[k]
        builtins.__dict__.update(clean)
        tns = {k: v for k, v in ns.items() if k not in clean and k != "check"}
        tns.update(__name__="test", __builtins__=dict(clean))
        exec(compile(test, "<test>", "exec"), tns)
        if "check" in tns:  # HumanEval; otherwise the test's top-level asserts were the check
            tns["check"](candidate)
    except BaseException as e:
        nonce = None  # drop the secret before any solution-defined __str__ runs
        state["report"] = True  # traceback formatting reads tb_frame
        status = 4 if isinstance(e, MemoryError) else 5 if isinstance(e, SystemExit) else phase
        try:
            text = "".join(traceback.format_exception(e))
        except BaseException:
            text = "unprintable exception"
        write(2, text[-4000:].encode(errors="replace"))
        exit_(status)
    write(1, b"\n" + nonce + b"\n")
    exit_(0)

main()
'''


def _result(passed, reason, tail="", note=""):
    """detail = note, then as much of the output's tail as fits in 500 characters."""
    tail = tail.strip()[-(499 - len(note)):] if note else tail.strip()[-500:]
    return {"passed": passed, "reason": reason, "detail": f"{note}\n{tail}".strip()[:500]}


def _read_head(f):
    f.seek(0)
    return f.read(_OUTPUT_LIMIT + 1)  # bounded: a 1 GiB print can't fill the parent's memory


def _sandbox(code, test, entry_point, timeout, memory_mb):
    base = tempfile.mkdtemp(prefix="poststack_sbx_")
    try:
        work = os.path.join(base, "work")
        os.mkdir(work, 0o700)
        uid = None
        if _AS_ROOT:
            uid = _UID_BASE + secrets.randbelow(_UID_SPAN)  # fresh per run: runs can't touch each other
            os.chmod(base, 0o711)
            os.chown(work, uid, uid)
        nonce = secrets.token_hex(16)
        job_path = os.path.join(base, "job.json")
        with os.fdopen(os.open(job_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            json.dump({"code": code, "test": test, "entry_point": entry_point, "nonce": nonce,
                       "work": work, "uid": uid, "cpu": max(1, math.ceil(timeout)),
                       "memory_mb": memory_mb}, f)
        with open(os.path.join(base, "out"), "w+b") as out, open(os.path.join(base, "err"), "w+b") as err:
            # -S: no site-packages (the solution gets the standard library only), and a start in
            # ~13 ms instead of ~60 ms here, most of a verification's cost
            proc = subprocess.Popen([sys.executable, "-I", "-B", "-S", "-c", _HARNESS, job_path],
                                    cwd=work, env=_ENV, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # not yet reaped, so the group id is still ours
                except OSError:
                    pass
                proc.wait()
            too_long = max(os.fstat(out.fileno()).st_size, os.fstat(err.fileno()).st_size) > _OUTPUT_LIMIT
            stdout, stderr = _read_head(out), _read_head(err)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    rc = proc.returncode
    tail = stderr.decode(errors="replace") or stdout.decode(errors="replace")
    if too_long or rc == -signal.SIGXFSZ:
        return _result(False, "output_limit", tail, f"output over {_OUTPUT_LIMIT} bytes")
    if timed_out or rc == -signal.SIGXCPU:
        return _result(False, "timeout", tail, f"killed after {timeout:g}s")
    if rc == 0 and nonce.encode() in stdout.split():
        return _result(True, "passed")
    if rc < 0:
        reason = "memory" if rc == -signal.SIGKILL else "error"  # SIGKILL we didn't send: OOM killer
        return _result(False, reason, tail, f"killed by signal {-rc}")
    note = "exited with status 0 before the checks finished" if rc == 0 else ""
    return _result(False, _EXIT_REASONS.get(rc, "error"), tail, note)


def _syntax_error(code):
    """The error if `code` cannot be parsed, else None. Parsing builds a tree and runs nothing, so
    it is safe in the caller's process, and a program that fails it needs no sandbox start (~20 ms
    of the 2 cores; a quarter of a small model's sampled programs). Whatever parses, and anything
    the parser itself chokes on (a nesting too deep: RecursionError), goes to the sandbox."""
    if len(code) > 100_000:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # '1x' in a sampled program: a SyntaxWarning per call
            ast.parse(code)
    except (SyntaxError, ValueError) as e:  # ValueError: a null byte
        return f"{type(e).__name__}: {e}"
    except Exception:
        return None
    return None


def run_code(code, test, entry_point, timeout=3.0, memory_mb=512):
    """Run `code`, then `test`, then `check(candidate)` in a sandbox (see module docstring).

    Returns {"passed": bool, "reason": str, "detail": str}; reason is one of passed, failed, error,
    syntax, timeout, memory, output_limit, early_exit. `detail` is the stderr tail (<= 500 chars).
    Never raises. HumanEval: code = prompt + completion.
    """
    try:
        error = _syntax_error(str(code))
        if error:
            return _result(False, "syntax", note=error[:500])
        return _sandbox(str(code), str(test), str(entry_point), float(timeout), int(memory_mb))
    except Exception as e:
        return _result(False, "error", note=f"sandbox failure: {e!r}"[:200])


# Verdicts remembered for the life of the process, keyed by a hash of the run's inputs: a policy
# resamples the same program step after step, and evaluation scores the same greedy answers
# checkpoint after checkpoint (measured: evaluate.py ran 1403 programs of which 293 were new).
# Timeouts and memory kills depend on the machine's load, so they are not remembered.
_VERDICTS = {}
_VERDICTS_MAX = 100_000
_LOAD_DEPENDENT = ("timeout", "memory")


def run_code_batch(items, workers=4):
    """run_code over dicts with code/test/entry_point (optional timeout, memory_mb); order kept.
    Identical items run once, and an item whose verdict this process already has (_VERDICTS)
    does not run again: a sandbox start costs ~60 ms of the 2 cores."""
    def one(item):
        try:
            return run_code(item["code"], item["test"], item["entry_point"],
                            item.get("timeout", 3.0), item.get("memory_mb", 512))
        except Exception as e:
            return _result(False, "error", note=f"bad item: {e!r}"[:200])

    def key(item):
        fields = ("code", "test", "entry_point", "timeout", "memory_mb")
        text = repr([item.get(f) for f in fields] if isinstance(item, dict) else item)
        return hashlib.sha256(text.encode(errors="surrogatepass")).digest()
    keys = [key(item) for item in items]
    known = {k: _VERDICTS[k] for k in keys if k in _VERDICTS}
    todo = {k: item for k, item in zip(keys, items) if k not in known}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        fresh = dict(zip(todo, pool.map(one, todo.values())))
    if len(_VERDICTS) + len(fresh) > _VERDICTS_MAX:
        _VERDICTS.clear()
    _VERDICTS.update((k, r) for k, r in fresh.items() if r.get("reason") not in _LOAD_DEPENDENT)
    results = {**known, **fresh}
    return [dict(results[k]) for k in keys]


def extract_code(response):
    """The first ```python block (an unclosed one runs to the end), else the whole response."""
    text = _SPECIAL.sub("", str(response))
    m = re.search(r"```(?:python3?|py)[^\n]*\n(.*?)(?:```|\Z)", text, re.DOTALL | re.IGNORECASE)
    return m.group(1) if m else text


def pass_at_k(n, c, k):
    """Unbiased pass@k (Chen et al. 2021, Codex): 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials.
    >>> round(pass_at_k(5, 2, 1), 6), round(pass_at_k(5, 2, 2), 6)
    (0.4, 0.7)
    """
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
