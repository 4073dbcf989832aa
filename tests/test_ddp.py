"""Distributed data parallel: 2 CPU processes (gloo) == 1 process with the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_script
from model import load_checkpoint
from test_grpo import tiny_stack


def torchrun(script, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           os.path.join(ROOT, script), *map(str, args), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]


def max_diff(a, b):
    sa, sb = load_checkpoint(a)["model"].state_dict(), load_checkpoint(b)["model"].state_dict()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


@pytest.mark.parametrize("script", ["pretrain.py", "sft.py"])
def test_two_processes_equal_one(script, tiny_sft, tmp_path):
    args = ["--preset", "tiny", "--steps", "6"]
    if script == "sft.py":
        args += ["--init", tiny_sft / "base.pt", "--eval-tasks", "0"]
    run_script(script, *args, "--out", tmp_path / "one.pt", "--device", "cpu")
    torchrun(script, *args, "--out", tmp_path / "two.pt")
    assert max_diff(tmp_path / "one.pt", tmp_path / "two.pt") < 1e-5


def test_reward_two_processes_match_one(tiny_sft, tmp_path):
    """reward.py: each rank scores its share of every batch's prompts (the heads read from inside
    the DDP wrapper) and the loss is normalised by the all-reduced pair count, so the first
    step's gradient norm (logged after DDP's averaging) and the trained scorer match 1 process.
    The parameters match only to ~10% of the update: the head starts at zero, so the backbone's
    first gradients are tiny, and Adam's g / sqrt(v) turns their float rounding (which differs
    with the batch split) into full-size steps in directions the scores barely depend on."""
    args = ["--preset", "tiny", "--epochs", "2", "--init", tiny_sft / "sft.pt", "--lr", "1e-4"]
    run_script("reward.py", *args, "--out", tmp_path / "one.pt", "--device", "cpu")
    (tmp_path / "one.jsonl").rename(tmp_path / "one_log.jsonl")
    torchrun("reward.py", *args, "--out", tmp_path / "two.pt")
    one, two = ([json.loads(line) for line in open(tmp_path / name)] for name in ("one_log.jsonl", "two.jsonl"))
    assert abs(one[0]["grad_norm"] - two[0]["grad_norm"]) < 1e-5 * one[0]["grad_norm"]
    for key in ("val_loss", "train_acc", "reward_std"):
        assert abs(one[-1][key] - two[-1][key]) <= 1e-3 * abs(one[-1][key]), key
    diff, moved = max_diff(tmp_path / "one.pt", tmp_path / "two.pt"), max_diff(tiny_sft / "sft.pt", tmp_path / "one.pt")
    assert moved > 1e-5 and diff < 0.25 * moved, (diff, moved)


def test_grpo_two_processes_equal_one(tmp_path_factory, tmp_path):
    """GRPO: the ranks sample their chunks of one shared prompt list, each chunk from a generator
    seeded by its position (the same responses whichever rank samples it); minibatches are cut
    from the global batch; loss normalisers and the dynamic-sampling count are all-reduced. So 2
    ranks end where 1 process does, with μ = 2 and 2 minibatches. The tiny RM's rewards vary (the
    gold judge gives the tiny policy equal ones: zero advantages, nothing moves), and lr 1e-3
    makes the update far larger than the tolerance, so the test is not vacuous."""
    stack = tiny_stack(tmp_path_factory)
    args = ["--preset", "tiny", "--init", stack["sft"], "--rm", stack["rm"], "--eval-tasks", "0", "--steps", "3",
            "--lr", "1e-3", "--warmup", "1", "--iterations", "2", "--minibatches", "2", "--dynamic-sampling", "true"]
    run_script("grpo.py", *args, "--out", tmp_path / "one.pt", "--device", "cpu")
    torchrun("grpo.py", *args, "--out", tmp_path / "two.pt")
    # measured on a CPU: diff 3.4e-6 (Adam magnifies rounding where a gradient is ~0), update 1.2e-2
    diff, moved = max_diff(tmp_path / "one.pt", tmp_path / "two.pt"), max_diff(tmp_path / "one.pt", stack["sft"])
    assert moved > 100 * 1e-5 and diff < 1e-5, (diff, moved)


def test_grad_accum_equals_one_big_batch(tiny_sft, tmp_path):
    args = ["--preset", "tiny", "--steps", "4", "--init", tiny_sft / "base.pt", "--eval-tasks", "0"]
    run_script("sft.py", *args, "--out", tmp_path / "one.pt")
    run_script("sft.py", *args, "--out", tmp_path / "acc.pt", "--grad-accum", "2")
    assert max_diff(tmp_path / "one.pt", tmp_path / "acc.pt") < 1e-5
