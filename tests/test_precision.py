"""The reduced-precision and compiled paths: bf16 autocast everywhere it runs (CPU autocast too),
CUDA and torch.compile where the hardware allows, skipped with the reason otherwise."""
import pytest
import torch

from conftest import run_script
from model import load_checkpoint, sequence_logprobs

CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA device here: the bf16 / torch.compile training paths run only on a GPU"


def test_logprobs_under_bf16_autocast_are_fp32_and_close(model, tok):
    """Under bf16 autocast the matmuls run in bf16, but the log-prob kernel returns float32 and
    stays within bf16's rounding of the fp32 values (what PPO's ratios and DPO's margins need)."""
    ids = torch.tensor([tok.encode("What is 12+34? 1+3+0=4")])
    exact = sequence_logprobs(model, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = sequence_logprobs(model, ids)
    assert low.dtype == torch.float32 and exact.dtype == torch.float32
    assert torch.isfinite(low).all()
    assert (low - exact).abs().max().item() < 0.1  # bf16 has 8 bits of mantissa


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_cuda_bf16_sft_keeps_fp32_master_weights(tiny_sft, tmp_path):
    out = tmp_path / "sft_cuda.pt"
    run_script("sft.py", "--preset", "tiny", "--init", tiny_sft / "base.pt", "--out", out, "--device", "cuda",
               "--dtype", "bf16", "--eval-tasks", "0")
    weights = load_checkpoint(out)["model"].state_dict().values()
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights)


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
def test_compiled_model_matches_eager(model, tok):
    m = model.to("cuda")
    ids = torch.tensor([tok.encode("def add(a, b): return a + b")], device="cuda")
    eager = m.logits(ids)
    compiled = torch.compile(m)
    assert torch.allclose(compiled.lm_head(compiled(ids)), eager, atol=1e-4)


def test_gpu_presets_ask_the_world_for_no_more_tasks_than_it_has():
    """The gpu presets run where no test does: their prompt pools must at least be buildable."""
    import distill
    import grpo
    import ppo
    import rlvr
    import tasks
    from common import parse_config
    for mod in (grpo, ppo):
        cfg = parse_config(mod.DEFAULTS, mod.PRESETS, ["--preset", "gpu"])
        assert len(grpo.load_prompts(cfg)[0]) >= cfg["n_prompts"] * 0.99
    cfg = rlvr.resolve_algo(parse_config(rlvr.DEFAULTS, rlvr.PRESETS, ["--preset", "gpu"]))
    assert len(rlvr.load_pool(cfg)) >= cfg["n_prompts"] * 0.99
    n = parse_config(distill.DEFAULTS, distill.PRESETS, ["--preset", "gpu"])["seq_prompts"]
    for family, weight in tasks.SFT_MIX.items():
        assert len(tasks.make_tasks(family, "train", round(n * weight))) == round(n * weight)
    import dpo
    import sft
    for mod, key, split in ((sft, "eval_tasks", "val"), (dpo, "eval_tasks", "test"), (ppo, "eval_tasks", "test"),
                            (grpo, "eval_tasks", "test"), (rlvr, "eval_n", "test")):  # their evaluation sets
        n = parse_config(mod.DEFAULTS, mod.PRESETS, ["--preset", "gpu"])[key]
        assert sum(t.family == "math" for t in tasks.eval_tasks(split, n)) == n
