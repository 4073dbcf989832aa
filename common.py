"""Run plumbing shared by the stage scripts: config, device, seed, DDP, LR schedule, metrics log."""
import argparse
import contextlib
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist


def parse_config(defaults, presets, argv=None, description=None):
    """Defaults < --preset < --key value. Every key of `defaults` becomes a flag (--key-name);
    the type comes from the default value. Returns a plain dict."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--preset", default="cpu", choices=sorted(presets))
    for key, value in defaults.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            ap.add_argument(flag, type=lambda s: s.lower() in ("1", "true", "yes", "on"), default=None)
        elif value is None:
            ap.add_argument(flag, default=None)
        else:
            ap.add_argument(flag, type=type(value), default=None)
    args = ap.parse_args(argv)
    cfg = dict(defaults)
    cfg.update(presets[args.preset])
    cfg.update({k: v for k, v in vars(args).items() if v is not None and k in defaults})
    cfg["preset"] = args.preset
    return cfg


def pick_device(name="auto"):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def setup(cfg):
    """Seed, threads, device, TF32, distributed init. Returns (device, rank, world_size)."""
    rank, world = 0, 1
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and cfg.get("device", "auto") != "cpu" else "gloo"
        dist.init_process_group(backend)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    device = pick_device(cfg.get("device", "auto"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed = cfg.get("seed", 0)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return device, rank, world


def autocast(device, dtype_name):
    """bf16 autocast on CUDA when asked (fp32 master weights); a no-op elsewhere."""
    if device.type == "cuda" and dtype_name == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_at(step, total, lr, warmup, min_ratio=0.1):
    """Linear warmup, then cosine decay to min_ratio * lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model, lr, weight_decay=0.1, betas=(0.9, 0.95), device=None, final_norm_lr=0.0):
    """AdamW with weight decay on matrices only (not biases, LayerNorms); fused on CUDA.

    final_norm_lr > 0 gives the final LayerNorm (transformer.ln_f) a learning rate of its own,
    kept in proportion by set_lr. Its gain sets the scale of the logits, feature by feature: the
    policy's temperature. Adam moves each weight about lr a step, so at a fine-tuning lr of 1e-5
    that scale moves 0.1% in 100 steps, while what RL against a reward model wins first near its
    init is mostly sharpening (README, PPO and GRPO).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    own_lr = lambda name: final_norm_lr > 0 and name.startswith("transformer.ln_f.")
    own = [p for n, p in named if own_lr(n)]
    rest = [p for n, p in named if not own_lr(n)]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]
    if own:
        groups.append({"params": own, "weight_decay": 0.0, "lr_scale": final_norm_lr / lr})
    fused = device is not None and device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def set_lr(optimizer, lr):
    """Set the base lr; a group with an lr_scale (make_optimizer's final_norm_lr) gets lr x lr_scale."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def all_reduce_sum(x):
    """Sum a tensor over ranks (identity when not distributed)."""
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def train_flops_per_token(model, seq_len):
    """Model FLOPs of training on one token, forward + backward (PaLM, appendix B): 6 per weight
    the token is multiplied by (every matrix but the lookup tables, plus the lm_head's vocab x C)
    and 12·L·T·C for attention's scores and weighted values at context T."""
    c = model.config
    return 6 * (model.num_params(embeddings=False) + c.vocab_size * c.n_embd) + 12 * c.n_layer * seq_len * c.n_embd


class Throughput:
    """Tokens/s and model TFLOP/s since the last read. Read it right after a .item() (which waits
    for the device), so the interval covers finished work; MFU = tflops / the matmul peak that
    bench.py measures on the same machine."""

    def __init__(self, model):
        # train_flops_per_token is linear in the context: its two coefficients, counted once
        self.fixed = train_flops_per_token(model, 0)
        self.per_position = train_flops_per_token(model, 1) - self.fixed
        self.tokens, self.flops, self.t0 = 0, 0.0, time.perf_counter()

    def add(self, tokens, seq_len):
        self.tokens += tokens
        self.flops += tokens * (self.fixed + self.per_position * seq_len)

    def read(self):
        seconds = time.perf_counter() - self.t0
        rates = dict(tok_s=self.tokens / seconds, tflops=self.flops / seconds / 1e12)
        self.tokens, self.flops, self.t0 = 0, 0.0, time.perf_counter()
        return rates


class MetricLog:
    """Appends one JSON object per logged step to OUT.jsonl (rank 0 only)."""

    def __init__(self, out_path, stage, enabled=True, resume=False):
        self.path = os.path.splitext(out_path)[0] + ".jsonl"
        self.stage, self.enabled, self.t0 = stage, enabled, time.time()
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            if not resume and os.path.exists(self.path):
                os.remove(self.path)

    def log(self, step, **metrics):
        if not self.enabled:
            return
        row = {"stage": self.stage, "step": step, "time": round(time.time() - self.t0, 3)}
        row.update({k: (round(float(v), 6) if isinstance(v, (float, int, torch.Tensor, np.floating)) else v)
                    for k, v in metrics.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def fail(message):
    """Exit with a clear one-line error instead of a traceback (bad input, missing parent)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
