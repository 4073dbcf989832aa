"""Distributed data parallel: 2 CPU processes (gloo) == 1 process with the same global batch."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_script
from model import load_checkpoint


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


def test_grad_accum_equals_one_big_batch(tiny_sft, tmp_path):
    args = ["--preset", "tiny", "--steps", "4", "--init", tiny_sft / "base.pt", "--eval-tasks", "0"]
    run_script("sft.py", *args, "--out", tmp_path / "one.pt")
    run_script("sft.py", *args, "--out", tmp_path / "acc.pt", "--grad-accum", "2")
    assert max_diff(tmp_path / "one.pt", tmp_path / "acc.pt") < 1e-5
