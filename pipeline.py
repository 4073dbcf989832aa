"""Run the whole stack with one command: every stage as its own process, then the results table.

    python pipeline.py [--preset tiny|cpu|gpu] [--out DIR] [--force] [--from STAGE] [--only STAGE]

A stage whose checkpoint is newer than every file it reads (its parent's checkpoint, and the
reward model for PPO and GRPO, the preference pairs for DPO) and was made with the same preset
is skipped (--force redoes it; --from STAGE redoes that stage and every later one). The run
stops at the first failing stage, prints the end of its log, and keeps every finished checkpoint.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

# (stage, script, output file, parent output, other files it reads, extra arguments)
STAGES = [
    ("pretrain", "pretrain.py", "base.pt", None, [], []),
    ("sft", "sft.py", "sft.pt", "base.pt", [], []),
    ("reward", "reward.py", "rm.pt", "sft.pt", [], []),
    # the reward stage's pairs are the ones dpo.py would sample (same model, prompts and seed)
    ("dpo", "dpo.py", "dpo.pt", "sft.pt", ["prefs_reward.jsonl"], ["--data", "{out}/prefs_reward.jsonl"]),
    ("ppo", "ppo.py", "ppo.pt", "dpo.pt", ["rm.pt"], ["--rm", "{out}/rm.pt"]),
    ("grpo", "grpo.py", "grpo.pt", "dpo.pt", ["rm.pt"], ["--rm", "{out}/rm.pt"]),
    ("rlvr", "rlvr.py", "rlvr.pt", "ppo.pt", [], []),
    ("distill", "distill.py", "student.pt", "rlvr.pt", [], []),
]
HERE = os.path.dirname(os.path.abspath(__file__))


def up_to_date(out_dir, output, inputs, preset):
    """The checkpoint exists, is newer than every input it was made from (its parent and the
    other files STAGES lists), and was made with this preset."""
    path = os.path.join(out_dir, output)
    if not os.path.exists(path):
        return False
    if any(os.path.getmtime(path) < os.path.getmtime(os.path.join(out_dir, i)) for i in inputs):
        return False
    try:
        config = torch.load(path, map_location="cpu", weights_only=True).get("config", {})
    except Exception:
        return False
    return config.get("preset") == preset


def run_stage(script, args, log_path):
    """Run one stage script as a child process, its output to a log file. Returns the exit code."""
    with open(log_path, "w") as log:
        return subprocess.call([sys.executable, os.path.join(HERE, script)] + args, stdout=log,
                               stderr=subprocess.STDOUT, cwd=HERE)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu", choices=("tiny", "cpu", "gpu"))
    ap.add_argument("--out", default="out")
    ap.add_argument("--force", action="store_true", help="redo stages even when up to date")
    names = [s[0] for s in STAGES] + ["evaluate"]
    ap.add_argument("--from", dest="start", choices=names, help="start at this stage (redo it and later ones)")
    ap.add_argument("--only", choices=names, help="run just this stage")
    ap.add_argument("--eval-n", type=int, default=None, help="test tasks per family (default by preset)")
    args = ap.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    wall_path = os.path.join(out, "pipeline.json")
    wall = json.load(open(wall_path))["wall_s"] if os.path.exists(wall_path) else {}
    started = args.start is None
    t_total = time.time()
    for name, script, output, parent, reads, extra in STAGES:
        started = started or name == args.start
        if (args.only and name != args.only) or not started:
            continue
        forced = args.force or args.start is not None or name == args.only  # --from redoes every later stage
        inputs = ([parent] if parent else []) + reads
        if not forced and up_to_date(out, output, inputs, args.preset):
            print(f"[{name:8s}] up to date ({output})")
            continue
        stage_args = ["--preset", args.preset, "--out", os.path.join(out, output)]
        if parent:
            stage_args += ["--init", os.path.join(out, parent)]
        stage_args += [a.format(out=out) for a in extra]
        log_path = os.path.join(out, "logs", f"{name}.log")
        t0 = time.time()
        print(f"[{name:8s}] running {script} ...", end="", flush=True)
        code = run_stage(script, stage_args, log_path)
        wall[name] = round(time.time() - t0, 1)
        with open(wall_path, "w") as f:
            json.dump({"wall_s": wall, "preset": args.preset}, f, indent=1)
        if code != 0:
            print(f" FAILED (exit {code}) after {wall[name]:.0f}s; its log {log_path} ends:")
            print("".join(open(log_path).readlines()[-15:]))
            print(f"finished checkpoints are kept in {out}/; fix it and rerun (up-to-date stages are skipped)")
            sys.exit(code)
        print(f" done in {wall[name]:.0f}s -> {output}")
    if args.only in (None, "evaluate"):
        n = args.eval_n or {"tiny": 4, "cpu": 50, "gpu": 100}[args.preset]
        print("[evaluate] scoring every checkpoint on the test split ...", flush=True)
        t0 = time.time()
        # cpu: none, to keep the run inside 20 minutes; rlvr.py prints pass@k before and after itself
        passk = {"tiny": 2, "cpu": 0, "gpu": 50}[args.preset]
        code = subprocess.call([sys.executable, os.path.join(HERE, "evaluate.py"), "--out-dir", out,
                                "--n", str(n), "--passk-problems", str(passk)], cwd=HERE)
        if code != 0:
            sys.exit(code)
        print(f"[evaluate] done in {time.time() - t0:.0f}s; report in {out}/report.md")
    print(f"pipeline: {time.time() - t_total:.0f}s this run; stage times {wall}")


if __name__ == "__main__":
    main()
