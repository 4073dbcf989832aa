"""pipeline.py end to end on the tiny preset: every checkpoint and the table; skips; failures."""
import json
import os

from conftest import run_script

CHECKPOINTS = ("base.pt", "sft.pt", "rm.pt", "dpo.pt", "ppo.pt", "grpo.pt", "rlvr.pt", "student.pt")


def test_tiny_pipeline_end_to_end_then_skip_then_fail(tmp_path):
    out = tmp_path / "run"
    first = run_script("pipeline.py", "--preset", "tiny", "--out", out)
    for name in CHECKPOINTS:
        assert (out / name).exists(), first.stdout
    report = json.load(open(out / "report.json"))
    assert {"base", "sft", "dpo", "ppo", "grpo", "rlvr", "student"} <= set(report["rows"])
    assert set(report["wall_s"]) >= {"pretrain", "sft", "reward", "dpo", "ppo", "grpo", "rlvr", "distill"}
    for key in ("format", "math_acc", "code_pass1", "tool_acc", "params"):
        assert key in report["rows"]["sft"]
    assert "| stage |" in open(out / "report.md").read()

    mtimes = {n: os.path.getmtime(out / n) for n in CHECKPOINTS}
    again = run_script("pipeline.py", "--preset", "tiny", "--out", out)
    assert again.stdout.count("up to date") == len(CHECKPOINTS)
    assert all(os.path.getmtime(out / n) == t for n, t in mtimes.items())

    # a new reward model makes PPO and GRPO stale (they read it), and RLVR and distill after PPO
    os.utime(out / "rm.pt", (mtimes["student.pt"] + 5,) * 2)
    redo = run_script("pipeline.py", "--preset", "tiny", "--out", out)
    for stage in ("ppo", "grpo", "rlvr", "distill"):
        assert f"running {stage}.py" in redo.stdout, redo.stdout
    assert "up to date (dpo.pt)" in redo.stdout and "up to date (rm.pt)" in redo.stdout

    os.remove(out / "rm.pt")
    os.makedirs(out / "rm.pt" / "blocker")  # reward.py cannot write its checkpoint: it must fail
    failed = run_script("pipeline.py", "--preset", "tiny", "--out", out, check=False)
    assert failed.returncode != 0 and "FAILED" in failed.stdout and "reward" in failed.stdout
    assert (out / "base.pt").exists() and (out / "dpo.pt").exists()
