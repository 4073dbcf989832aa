"""The speed record: one table (and JSON) of this machine's numbers.

    python bench.py [--quick] [--device auto] [--json out/bench.json]

Rows: sampler tokens/s with the KV cache vs recomputing the whole prefix; the chunked log-prob
kernel vs naive log_softmax + gather (time and peak memory, forward + backward); training
tokens/s and model FLOPs utilisation against this machine's matmul peak measured in the same
run; an SFT step of short conversations, padded vs packed (sft.py --pack); the RL step
breakdown of grpo.py and ppo.py; wall time per stage of the last pipeline run.
Timings are medians of repeats. The machines are noisy: nothing here is asserted by the tests.
"""
import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import pretrain
import tasks
from common import autocast, make_optimizer, parse_config, pick_device, train_flops_per_token
from data import Tokenizer
from model import GPT, GPTConfig, load_checkpoint, save_checkpoint, sequence_logprobs, token_logprobs


def preset_model(preset):
    """The model shape pretrain.py builds for a preset (its vocab_size is the tokenizer's target)."""
    cfg = {**pretrain.DEFAULTS, **pretrain.PRESETS[preset]}
    return {k: cfg[k] for k in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "pos_embedding")}


DEFAULT_MODEL, GPU_MODEL = preset_model("cpu"), preset_model("gpu")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats=3):
    """Median seconds of fn() over repeats, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak(device, quick):
    """FLOP/s of square matmuls in the training dtype (fp32 on CPU, bf16 on CUDA): the best of
    several sizes and repeats, since a peak is an upper bound and a shared CPU's median is not
    (one 1024^3 median measured 75 GFLOP/s here while 2048^3 reached 232 a minute later)."""
    sizes = (256,) if quick else (1024, 2048, 4096) if device.type == "cuda" else (512, 1024, 2048)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reps = 20 if device.type == "cuda" else 3
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        t = min(timed(lambda: [a @ b for _ in range(reps)], device, 1) for _ in range(3))
        best = max(best, 2 * n ** 3 * reps / t)
    return best


@torch.no_grad()
def bench_sampler(device, quick):
    """Tokens/s of model.generate (KV cache) vs re-running the full prefix for every new token, for
    the preset's model (the gpu preset's on CUDA, where a tiny model would time only kernel launches)."""
    batch, new = (8, 16) if quick else (64, 128)
    model = GPT(GPTConfig(**(GPU_MODEL if device.type == "cuda" else DEFAULT_MODEL))).to(device).eval()
    prompt = torch.randint(0, 1000, (batch, 16), device=device)
    mask = torch.ones_like(prompt)

    def cached():
        model.generate(prompt, mask, new, temperature=1.0, stop_ids=())

    def recompute():
        ids = prompt
        for _ in range(new):
            logits = model.logits(ids)[:, -1].float()
            ids = torch.cat([ids, torch.multinomial(logits.softmax(-1), 1)], 1)

    t_cache, t_full = timed(cached, device, 1), timed(recompute, device, 1)
    return dict(batch=batch, new_tokens=new, kv_tok_s=batch * new / t_cache,
                recompute_tok_s=batch * new / t_full, speedup=t_full / t_cache)


def kernel_child(mode, tokens, vocab, dim, device_name):
    """Run in a fresh process: extra peak memory (bytes) and seconds of one fwd+bwd."""
    device = torch.device(device_name)
    torch.manual_seed(0)
    h = torch.randn(tokens, dim, device=device, requires_grad=True)
    w = (torch.randn(vocab, dim, device=device) * 0.02).requires_grad_()
    t = torch.randint(0, vocab, (tokens,), device=device)
    g = torch.randn(tokens, device=device)

    def step():
        if mode == "naive":
            logp = torch.log_softmax((h @ w.t()).float(), -1).gather(1, t[:, None]).squeeze(1)
        else:
            logp = token_logprobs(h, w, t)
        (logp * g).sum().backward()
        h.grad = w.grad = None

    if device.type == "cuda":
        step()  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    else:  # ru_maxrss is the process's high-water mark: read it before and after the first step
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        step()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    seconds = timed(step, device, 2)
    print(json.dumps(dict(seconds=seconds, peak_bytes=max(peak, 0))))


def bench_kernel(device, quick):
    """Chunked kernel vs naive at GPT-2's vocab, each in its own process so peaks don't mix."""
    tokens, vocab = (1024, 8192) if quick else (8192, 50257)
    out = {}
    for dim in ((64,) if quick else (128, 768)):
        for mode in ("naive", "chunked"):
            proc = subprocess.run([sys.executable, __file__, "--_kernel", mode, str(tokens), str(vocab), str(dim),
                                   str(device)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-2000:])
            out[f"{mode}_d{dim}"] = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = []
    for dim in ((64,) if quick else (128, 768)):
        n, c = out[f"naive_d{dim}"], out[f"chunked_d{dim}"]
        rows.append(dict(tokens=tokens, vocab=vocab, dim=dim, naive_s=n["seconds"], chunked_s=c["seconds"],
                         naive_peak_mb=n["peak_bytes"] / 2 ** 20, chunked_peak_mb=c["peak_bytes"] / 2 ** 20,
                         memory_ratio=c["peak_bytes"] / max(n["peak_bytes"], 1),
                         time_ratio=c["seconds"] / n["seconds"]))
    return rows


def bench_training(device, quick, peak, compile_model=False):
    """Training tokens/s and MFU of the preset's model: the default (cpu) model in fp32 on a CPU,
    the gpu preset's GPT-2-small shape in bf16 autocast on CUDA (torch.compile with --compile)."""
    cuda = device.type == "cuda" and not quick
    cfg = GPTConfig(**(GPU_MODEL if cuda else DEFAULT_MODEL))
    model = GPT(cfg).to(device).train()
    opt = make_optimizer(model, 1e-4, device=device)
    B, T = (8, 64) if quick else (32, 512) if cuda else (64, 128)
    ids = torch.randint(0, cfg.vocab_size, (B, T + 1), device=device)
    forward = torch.compile(model) if compile_model else model

    def step():
        with autocast(device, "bf16"):
            loss = -sequence_logprobs(forward, ids).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if compile_model:
        step()  # compiling is not training time
    seconds = timed(step, device, 3 if quick else 10)
    flops_per_token = train_flops_per_token(model, T)
    tok_s = B * T / seconds
    return dict(batch=B, seq=T, params_m=model.num_params() / 1e6, compiled=compile_model, tok_s=tok_s,
                mfu=tok_s * flops_per_token / peak, model_gflops=tok_s * flops_per_token / 1e9)


def bench_sft_packing(device, quick, peak, compile_model=False):
    """One SFT step of short conversations (lengths 16-72 tokens, ~44 on average as the built-in
    world's), padded into length-sorted micro-batches or packed into context-length rows
    (sft.py --pack): real tokens/s and MFU of the useful FLOPs (each conversation at its own
    length). The preset's batch: 128 conversations in 8 micro-batches on a CPU, 512 in one on CUDA."""
    import sft
    from data import pack_rows
    cuda = device.type == "cuda" and not quick
    cfg = GPTConfig(**(GPU_MODEL if cuda else DEFAULT_MODEL))
    if quick:
        cfg = dataclasses.replace(cfg, n_layer=2, n_head=2, n_embd=32, vocab_size=300)
    model = GPT(cfg).to(device).train()
    opt = make_optimizer(model, 1e-4, device=device)
    forward = torch.compile(model) if compile_model else model
    n, accum = (16, 2) if quick else (512, 1) if cuda else (128, 8)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 73, (n,), generator=g).tolist()
    rows = [([int(t) for t in torch.randint(0, cfg.vocab_size, (k,), generator=g)], [0] * 8 + [1] * (k - 8))
            for k in sorted(lengths)]  # length-sorted, as sft.py's micro-batches
    n_tokens = float(sum(k - 9 for k in lengths))
    useful = sum((k - 1) * train_flops_per_token(model, k - 1) for k in lengths)

    def step(pack):
        for ids, mask, doc_ids, _ in sft.micro_batches(rows, accum, pack, cfg.block_size, 0, device):
            with autocast(device, "bf16"):
                sft.masked_loss(forward, ids, mask, n_tokens, doc_ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    out = dict(conversations=n, micro_batches=accum, tokens=sum(lengths), params_m=model.num_params() / 1e6,
               compiled=compile_model, packed_rows=len(pack_rows(rows, cfg.block_size)), block=cfg.block_size)
    for name, pack in (("padded", False), ("packed", True)):
        if compile_model:
            step(pack)  # compiling is not training time
        seconds = timed(lambda: step(pack), device, 3 if quick else 10)
        out[f"{name}_tok_s"], out[f"{name}_mfu"] = sum(lengths) / seconds, useful / seconds / peak
    return out


def save_random_rm(path, tok, config):
    """A reward-model checkpoint of a random GPT of this config's shape (normalisation 0 / 1)."""
    save_checkpoint(path, GPT(dataclasses.replace(config, scalar_head=True)), tok, "reward",
                    extra=dict(reward_mean=0.0, reward_std=1.0))


def bench_models(folder, quick, init=None):
    """(policy path, RM path, what they are) for the RL step breakdown. A given policy (--rl-init)
    gets a random RM of its shape. Full size: the pipeline's out/dpo.pt and out/rm.pt when both
    exist. Otherwise (always when quick: the test suite runs on a clean checkout) random models
    written to folder: a BPE tokenizer trained on the pretraining corpus, a GPT of the default
    config (tiny when quick) and a random RM of its shape. A random policy rarely stops, so its
    responses run to max_new_tokens: a worst case."""
    import grpo
    rm_path = os.path.join(folder, "rm.pt")
    if init:
        ckpt = load_checkpoint(init)
        save_random_rm(rm_path, ckpt["tokenizer"], ckpt["model"].config)
        return init, rm_path, f"{init} + a random RM"
    if not quick and os.path.exists(grpo.DEFAULTS["init"]) and os.path.exists(grpo.DEFAULTS["rm"]):
        return grpo.DEFAULTS["init"], grpo.DEFAULTS["rm"], f"{grpo.DEFAULTS['init']} + {grpo.DEFAULTS['rm']}"
    tok = Tokenizer.train(tasks.pretrain_corpus(100 if quick else 1000), 300 if quick else 1024)
    size = dict(n_layer=2, n_head=2, n_embd=32, block_size=128) if quick else {}
    torch.manual_seed(0)
    paths = [os.path.join(folder, "policy.pt"), rm_path]
    config = GPTConfig(**{**DEFAULT_MODEL, **size, "vocab_size": tok.vocab_size})
    save_checkpoint(paths[0], GPT(config), tok, "random")
    save_random_rm(paths[1], tok, config)
    return paths[0], paths[1], f"random {'tiny' if quick else 'default-size'} models"


def rl_step_breakdown(algo, device, quick, preset="cpu", init=None):
    """Seconds per phase of one step of grpo.py or ppo.py at the preset (tiny when quick): rollout,
    reward (RM scoring), logprobs (reference and old log-probs; for PPO also the critic's values
    and GAE), update (the policy), critic_update (PPO), gold_log (the judge, on logging steps),
    total, and rollout_frac (of the total less gold_log). The script's own step function runs
    twice and the second is timed (the first warms up)."""
    import grpo
    import ppo
    mod = grpo if algo == "grpo" else ppo
    with tempfile.TemporaryDirectory() as folder:
        init, rm, source = bench_models(folder, quick, init)
        cfg = parse_config(mod.DEFAULTS, mod.PRESETS, ["--preset", "tiny" if quick else preset, "--init", init,
                                                       "--rm", rm])
        torch.manual_seed(cfg["seed"])
        model, ref_model, tok = grpo.load_policy(init, device)
        prompts, task_of = grpo.load_prompts(cfg)
        reward_fn = grpo.make_reward(cfg, task_of, device)
        critic = ppo.make_critic(cfg, model, tok, device)[0] if algo == "ppo" else None
    opt = make_optimizer(model, cfg["lr"], cfg["weight_decay"], device=device, final_norm_lr=cfg["final_norm_lr"])
    if algo == "ppo":
        copt = make_optimizer(critic, cfg["critic_lr"], cfg["weight_decay"], device=device)
        kl_coef = [cfg["kl_coef"]]

        def step_fn(step, timer):
            _, kl_coef[0] = ppo.train_step(model, model, ref_model, critic, opt, copt, tok, prompts, reward_fn,
                                           task_of, kl_coef[0], cfg, step, timer=timer)
    else:
        def step_fn(step, timer):
            grpo.grpo_step(model, model, ref_model, opt, tok, prompts, reward_fn, task_of, cfg, step, timer=timer)
    timer, seconds = grpo.phase_timer(device)
    for step, t in ((0, grpo.untimed), (1, timer)):
        with t("total"):
            step_fn(step, t)
    work = seconds["total"] - seconds.get("gold_log", 0.0)  # the judge only logs: not RL work
    return dict(seconds, rollout_frac=seconds["rollout"] / work, model=f"{source}, preset {cfg['preset']}")


def bench_rl(device, quick, preset, init):
    """Seconds per phase of one GRPO step and one PPO step (rl_step_breakdown)."""
    try:
        import grpo  # noqa: F401
        import ppo  # noqa: F401
    except ImportError as e:
        return {"skipped": f"RL stages not importable ({e})"}
    return {algo: rl_step_breakdown(algo, device, quick, preset, init) for algo in ("grpo", "ppo")}


def pipeline_times(out_dir):
    path = os.path.join(out_dir, "pipeline.json")
    return json.load(open(path))["wall_s"] if os.path.exists(path) else {}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, for the test suite (seconds)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model of the training row")
    ap.add_argument("--rl-preset", default=None, help="preset of the RL step rows (default: gpu on CUDA, else cpu)")
    ap.add_argument("--rl-init", default=None, help="policy checkpoint for the RL step rows (a random RM is added)")
    ap.add_argument("--out-dir", default="out")
    ap.add_argument("--json", default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(0)
    peak = matmul_peak(device, args.quick)
    res = dict(device=str(device), threads=torch.get_num_threads(), matmul_peak_gflops=peak / 1e9)
    res["sampler"] = bench_sampler(device, args.quick)
    res["kernel"] = bench_kernel(device, args.quick)
    res["training"] = bench_training(device, args.quick, peak, args.compile)
    res["sft_packing"] = bench_sft_packing(device, args.quick, peak, args.compile)
    rl_preset = args.rl_preset or ("gpu" if device.type == "cuda" else "cpu")
    res["rl_step"] = bench_rl(device, args.quick, rl_preset, args.rl_init)
    res["pipeline_wall_s"] = pipeline_times(args.out_dir)
    print_table(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


def print_table(r):
    s = r["sampler"]
    print(f"| what | number |\n|---|---|")
    print(f"| device | {r['device']} ({r['threads']} threads) |")
    print(f"| matmul peak | {r['matmul_peak_gflops']:.0f} GFLOP/s |")
    print(f"| sampler, batch {s['batch']} x {s['new_tokens']} new | KV cache {s['kv_tok_s']:.0f} tok/s, "
          f"recompute {s['recompute_tok_s']:.0f} tok/s, speed-up {s['speedup']:.1f}x |")
    for k in r["kernel"]:
        print(f"| log-prob kernel, {k['tokens']} tok x vocab {k['vocab']} x dim {k['dim']}, fwd+bwd | "
              f"chunked {k['chunked_s']:.3f}s / {k['chunked_peak_mb']:.0f} MB vs naive {k['naive_s']:.3f}s / "
              f"{k['naive_peak_mb']:.0f} MB: memory {k['memory_ratio']:.0%}, time {k['time_ratio']:.2f}x |")
    t = r["training"]
    print(f"| training, {t['params_m']:.1f}M params, batch {t['batch']} x {t['seq']}"
          f"{', compiled' if t['compiled'] else ''} | {t['tok_s']:.0f} tok/s, {t['model_gflops']:.1f} GFLOP/s, "
          f"MFU {t['mfu']:.0%} of the measured matmul peak |")
    p = r["sft_packing"]
    print(f"| SFT step, {p['conversations']} conversations ({p['tokens']} tokens) in {p['micro_batches']} "
          f"micro-batch(es){', compiled' if p['compiled'] else ''} | padded {p['padded_tok_s']:.0f} tok/s, "
          f"MFU {p['padded_mfu']:.0%}; packed into {p['packed_rows']} rows of {p['block']} "
          f"{p['packed_tok_s']:.0f} tok/s, MFU {p['packed_mfu']:.0%} |")
    for name, p in r["rl_step"].items():
        if isinstance(p, dict):
            parts = ", ".join(f"{k} {v:.2f}s ({v / p['total']:.0%})" for k, v in p.items()
                              if k not in ("total", "rollout_frac", "model"))
            print(f"| {name} step, {p['model']} ({p['total']:.2f}s, rollout {p['rollout_frac']:.0%}) | {parts} |")
        else:
            print(f"| {name} | {p} |")
    if r["pipeline_wall_s"]:
        print("| pipeline (last run) | " + ", ".join(f"{k} {v:.0f}s" for k, v in r["pipeline_wall_s"].items()) + " |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_kernel":
        mode, tokens, vocab, dim, dev = sys.argv[2:7]
        kernel_child(mode, int(tokens), int(vocab), int(dim), dev)
    else:
        main()
