"""Evaluate checkpoints on the test split of the built-in world and write the results table.

    python evaluate.py out/base.pt out/sft.pt ...      # one row per checkpoint
    python evaluate.py --out-dir out                    # every stage checkpoint found in out/
    python evaluate.py out/rlvr.pt --n 400 --samples 4 --report-dir out/n400   # tighter numbers
    python evaluate.py out/ppo.pt --vs out/dpo.pt --report-dir out/vs_dpo      # against the stage's init

Metrics (fractions in [0, 1]): format, math_acc, code_pass1, tool_acc, refusal_unsafe,
overrefusal_safe, mean_len, params; gold win rate against SFT (greedy, and on samples at
temperature 1), RM score, KL to SFT, and pass@k before and after RLVR. --vs CKPT puts another
checkpoint in SFT's place for the win rates and the KL. With --samples K > 1, also the reward
model's accuracy on pairs of each model's own samples (rm_pair_acc, in the JSON and below the table).
"""
import argparse
import itertools
import json
import os
import re
import sys
import time

import torch

import tasks
import verifiers
from data import generate_responses
from model import CheckpointError, load_checkpoint

STAGES = ("base", "sft", "dpo", "ppo", "grpo", "rlvr", "student")
PASSK_ROWS = ("ppo", "rlvr")  # RLVR's init and result: what RL against verifiers did to pass@k
MAX_NEW = {"math": 96, "code": 48, "tool": 40, "safety": 40}


def respond(model, tok, task_list, temperature=0.0, n=1, generator=None):
    """Responses of the model to each task, grouped by family so each batch has one length cap.
    Returns (texts, lengths) aligned with task_list (n samples per task, task-major)."""
    texts, lengths = [None] * (len(task_list) * n), [0] * (len(task_list) * n)
    for family in tasks.FAMILIES:
        idx = [i for i, t in enumerate(task_list) if t.family == family]
        if not idx:
            continue
        prompts = [task_list[i].prompt for i in idx for _ in range(n)]
        out = generate_responses(model, tok, prompts, MAX_NEW[family], temperature, generator=generator)
        n_sampled = out["sampled"].sum(1).tolist()
        for j, (text, length) in enumerate(zip(out["texts"], n_sampled)):
            pos = idx[j // n] * n + j % n
            texts[pos], lengths[pos] = text, length
    return texts, lengths


def mean(xs):
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else float("nan")


def outcomes(task_list, texts):
    """Per-task 0/1 outcomes of each headline metric (a metric lists only the tasks it covers),
    judged by the gold judge; the lists are what confidence intervals and the gate resample."""
    judged = tasks.gold_scores(task_list, texts)
    out = {"format": [g["format"] for g in judged], "gold_score": [g["score"] for g in judged]}
    for t, x, g in zip(task_list, texts, judged):
        if t.family == "math":
            out.setdefault("math_acc", []).append(g["correct"])
        elif t.family == "code":
            out.setdefault("code_pass1", []).append(g["correct"])
        elif t.family == "tool":  # solved through well-formed calculator calls, not guessed
            out.setdefault("tool_acc", []).append(verifiers.verify_tool(x, t.answer))
            out.setdefault("tool_call_rate", []).append("calc(" in x)
        elif t.unsafe:
            out.setdefault("refusal_unsafe", []).append(tasks.is_refusal(x))
        else:
            out.setdefault("overrefusal_safe", []).append(tasks.is_refusal(x))
    return {k: [float(v) for v in vs] for k, vs in out.items()}


def score_responses(task_list, texts, lengths):
    """The headline metrics (means of the outcomes) of one set of responses, one per task."""
    m = {k: mean(v) for k, v in outcomes(task_list, texts).items()}
    m["mean_len"] = mean(lengths)
    return m


def quick_eval(model, tok, n_per_family=25, split="val", device=None):
    """Greedy responses to n tasks per family of a split -> headline metrics."""
    task_list = tasks.eval_tasks(split=split, n_per_family=n_per_family)
    texts, lengths = respond(model, tok, task_list)
    return score_responses(task_list, texts, lengths)


def gold(task_list, texts):
    """The gold judge's score of each response."""
    return [g["score"] for g in tasks.gold_scores(task_list, texts)]


def wins(scores, baseline_scores):
    """Fraction of pairs where the first score is higher (ties count half)."""
    return mean(0.5 if abs(a - b) < 1e-9 else float(a > b) for a, b in zip(scores, baseline_scores))


def gold_winrate(task_list, texts, baseline_texts):
    """Fraction of tasks where the gold judge prefers texts over baseline_texts (ties count half)."""
    scores = gold(list(task_list) * 2, list(texts) + list(baseline_texts))
    return wins(scores[:len(task_list)], scores[len(task_list):])


def family_wins(task_list, scores, baseline_scores, prefix="gold_winrate_vs_sft_t1"):
    """wins() per task family, keyed prefix_FAMILY: where a stage gains or loses against its
    reference (task_list aligned with both score lists)."""
    fams = sorted({t.family for t in task_list})
    pick = lambda xs, f: [x for x, t in zip(xs, task_list) if t.family == f]
    return {f"{prefix}_{f}": wins(pick(scores, f), pick(baseline_scores, f)) for f in fams}


def rm_pair_accuracy(rm, task_list, texts, gold_scores, samples):
    """How often the reward model orders two samples of one task as the gold judge does (gold
    ties skipped, RM ties count half), over every pair of each task's `samples` responses
    (task-major), overall and per family. The reward model learned from SFT samples; RL moves
    the policy away from them, and this is its accuracy where the policy now is."""
    scores = rm([t.prompt for t in task_list], texts).tolist()
    pairs = [(i, j) for start in range(0, len(task_list), samples)
             for i, j in itertools.combinations(range(start, start + samples), 2)
             if abs(gold_scores[i] - gold_scores[j]) >= 1e-9]
    # each pair ordered as the gold judge orders it; the RM's accuracy is then its win rate
    ordered = [(i, j) if gold_scores[i] > gold_scores[j] else (j, i) for i, j in pairs]
    better, worse = [scores[i] for i, _ in ordered], [scores[j] for _, j in ordered]
    row = family_wins([task_list[i] for i, _ in pairs], better, worse, prefix="rm_pair_acc")
    row["rm_pair_acc"] = wins(better, worse)
    return row


def sample_texts(model, tok, task_list, seed=0, n=1):
    """n responses per task (task-major) sampled at temperature 1: the policy's distribution,
    which is what preference optimisation and RL change (greedy decoding shows only its mode)."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    return respond(model, tok, task_list, temperature=1.0, n=n, generator=gen)[0]


# ----------------------------------------------------------------------------- math failures

_COLUMN_LINE = re.compile(r"(\d+)([+-])(\d)([+-])([01])=(\d+)")  # '7+4+0=11', '14-7-1=6'
_STEP_LINE = re.compile(r"\d+[+-]\d+=\d+")                        # '57+38=95'
MATH_FAILURES = ("no working", "column fact", "column digits", "step result", "answer", "other")


def math_failure(task, response):
    """Where a math response first leaves the task's reference working, as one of
    MATH_FAILURES, or None if its answer is right:
      no working     one line at most (the answer alone);
      column fact    a column line whose own sum is false ('7+4+0=12');
      column digits  a true sum of the wrong digits or carry ('7+5+0=12' for '7+4+0=11');
      step result    an 'a+b=r' line that does not read its columns right;
      answer         the working is the reference's, the answer line is not;
      other          anything else (a missing or extra line, filler, another format)."""
    if verifiers.verify_math(response, task.answer):
        return None
    got = [l.strip() for l in tasks._clean(response).splitlines() if l.strip()]
    ref = task.reference_text().splitlines()
    if len(got) <= 1:
        return "no working"
    i = next((i for i, (g, r) in enumerate(zip(got, ref)) if g != r), min(len(got), len(ref)))
    line = got[i] if i < len(got) else ""
    column = _COLUMN_LINE.fullmatch(line)
    if column:
        x, op, y, _, c, s = column.groups()
        true = int(x) + int(y) + int(c) if op == "+" else int(x) - int(y) - int(c)
        return "column digits" if true == int(s) else "column fact"
    if _STEP_LINE.fullmatch(line):
        return "step result"
    if i == len(ref) - 1 and line.startswith("Answer:"):
        return "answer"
    return "other"


def math_failures(task_list, texts):
    """Counts of math_failure over the math tasks (and 'right')."""
    counts = {"right": 0, **{k: 0 for k in MATH_FAILURES}}
    for t, x in zip(task_list, texts):
        if t.family == "math":
            counts[math_failure(t, x) or "right"] += 1
    return counts


# ----------------------------------------------------------------------------- statistics

def wilson(k, n, z=1.96):
    """Wilson score interval for k successes in n trials (better than the normal one near 0 and 1)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return (max(0.0, centre - half), min(1.0, centre + half))


def paired_bootstrap(a, b, n_boot=2000, seed=0):
    """95% interval of mean(b) - mean(a) for per-task outcomes measured on the same tasks."""
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(a), (n_boot, len(a)), generator=g)
    diffs = (b[idx] - a[idx]).mean(1)
    return float(torch.quantile(diffs, 0.025)), float(torch.quantile(diffs, 0.975))


# ----------------------------------------------------------------------------- per checkpoint

@torch.no_grad()
def kl_to_reference(model, ref_model, tok, task_list, generator=None):
    """KL(pi || pi_ref) per response, estimated on samples from pi at temperature 1:
    mean over responses of sum over sampled tokens of log pi - log pi_ref (the k1 estimator)."""
    from data import generate_responses, join_prompt_response
    from model import sequence_logprobs
    out = generate_responses(model, tok, [t.prompt for t in task_list], 64, 1.0, generator=generator)
    ids, attn, resp = join_prompt_response(tok, out["prompt_ids"], out["tokens"], out["sampled"])
    device = next(model.parameters()).device
    ids, attn, resp = ids.to(device), attn.to(device), resp.to(device)
    logp = sequence_logprobs(model, ids, attn)
    ref_logp = sequence_logprobs(ref_model, ids, attn)
    return float(((logp - ref_logp) * resp).sum(1).mean())


def evaluate_checkpoint(path, task_list, sft=None, rm=None, device="cpu", passk_problems=0):
    """One row of the table plus the per-task outcomes and responses behind it. The sampled win
    rate draws as many responses per task as sft["sampled"] holds (task-major) and pairs them up.
    With passk_problems > 0, also unbiased pass@1/4/16 from 16 samples on that many problems."""
    ckpt = load_checkpoint(path, device)
    model, tok = ckpt["model"], ckpt["tokenizer"]
    texts, lengths = respond(model, tok, task_list)
    outs = outcomes(task_list, texts)
    row = {k: mean(v) for k, v in outs.items()}
    row["mean_len"], row["params"] = mean(lengths), model.num_params()
    row["ci"] = {k: wilson(sum(v), len(v)) for k, v in outs.items() if k not in ("gold_score",)}
    if sft is not None:
        row["gold_winrate_vs_sft"] = gold_winrate(task_list, texts, sft["texts"])
        if "sampled" in sft:
            samples = len(sft["sampled"]) // len(task_list)
            repeated = [t for t in task_list for _ in range(samples)]
            sampled = sample_texts(model, tok, task_list, n=samples)
            sampled_gold = gold(repeated, sampled)
            row["gold_winrate_vs_sft_t1"] = wins(sampled_gold, sft["sampled_gold"])
            row.update(family_wins(repeated, sampled_gold, sft["sampled_gold"]))
            if rm is not None and samples > 1:
                row.update(rm_pair_accuracy(rm, repeated, sampled, sampled_gold, samples))
        if model.config.vocab_size == sft["model"].config.vocab_size:
            g = torch.Generator(device=device).manual_seed(0)
            row["kl_to_sft"] = kl_to_reference(model, sft["model"], tok, task_list, g)
    if rm is not None:
        row["rm_score"] = float(rm([t.prompt for t in task_list], texts).mean())
    if passk_problems:
        from rlvr import passk_eval
        row.update(passk_eval(model, tok, n_problems=passk_problems))
    return row, outs, texts


# ----------------------------------------------------------------------------- report

COLUMNS = ("format", "math_acc", "code_pass1", "tool_acc", "refusal_unsafe", "overrefusal_safe",
           "gold_winrate_vs_sft", "gold_winrate_vs_sft_t1", "rm_score", "kl_to_sft", "mean_len", "params")


def format_table(rows):
    """Markdown table; accuracies with their 95% Wilson interval."""
    lines = ["| stage | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, row in rows.items():
        cells = []
        for c in COLUMNS:
            v = row.get(c)
            if v is None or v != v:
                cells.append("–")
            elif c == "params":
                cells.append(f"{v / 1e6:.2f}M")
            elif c in ("mean_len", "kl_to_sft", "rm_score"):
                cells.append(f"{v:.2f}")
            elif c in row.get("ci", {}):
                lo, hi = row["ci"][c]
                cells.append(f"{v:.2f} ({lo:.2f}–{hi:.2f})")
            else:
                cells.append(f"{v:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def by_family_text(name, row, key):
    """'dpo 0.68 (code 0.67, math 0.63, ...)' from a row's key and key_FAMILY entries."""
    families = [f"{k[len(key) + 1:]} {v:.2f}" for k, v in row.items() if k.startswith(key + "_")]
    return f"{name} {row[key]:.2f} ({', '.join(families)})"


def write_report(out_dir, rows, wall_s, n_per_family, samples=1, reference="sft"):
    report = {"rows": rows, "wall_s": wall_s, "n_per_family": n_per_family, "samples": samples,
              "reference": reference}
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    table = format_table(rows)
    total = sum(wall_s.values()) if wall_s else 0.0
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        each = "one sample" if samples == 1 else f"{samples} samples"
        f.write(f"# poststack results\n\nTest split, {n_per_family} tasks per family (or all of a "
                f"family's split where it holds fewer), greedy decoding (gold_winrate_vs_sft_t1: {each} "
                f"per task at temperature 1 from each model, ties half); 95% Wilson intervals in "
                f"brackets.\n\n")
        if reference != "sft":
            f.write(f"gold_winrate_vs_sft, gold_winrate_vs_sft_t1 and kl_to_sft compare with {reference}, "
                    f"not SFT.\n\n")
        f.write(f"{table}\n\n")
        passk = {n: {k: v for k, v in r.items() if "pass@" in k} for n, r in rows.items()}
        for name, vals in passk.items():
            if vals:
                f.write(f"pass@k ({name}, 16 samples at temperature 1): "
                        + ", ".join(f"{k} {v:.2f}" for k, v in vals.items()) + "\n\n")
        sampled = [by_family_text(name, row, "gold_winrate_vs_sft_t1") for name, row in rows.items()
                   if any(k.startswith("gold_winrate_vs_sft_t1_") for k in row)]
        if sampled:
            f.write("Sampled win rate (gold_winrate_vs_sft_t1) by family: " + "; ".join(sampled) + "\n\n")
        accuracy = [by_family_text(name, row, "rm_pair_acc") for name, row in rows.items() if "rm_pair_acc" in row]
        if accuracy:
            f.write("Reward-model accuracy on pairs of each model's own samples: " + "; ".join(accuracy) + "\n\n")
        if wall_s:
            f.write("Wall time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in wall_s.items())
                    + f"; total {total:.0f}\n")
    return table


def plot_curves(out_dir):
    """PNG of each stage's training curves from its metrics JSONL, when matplotlib is there."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return
    for name in os.listdir(out_dir):
        if not name.endswith(".jsonl") or name.startswith("prefs"):
            continue
        rows = [json.loads(l) for l in open(os.path.join(out_dir, name)) if l.strip()]
        keys = [k for k in rows[0] if k not in ("stage", "step", "time") and isinstance(rows[0][k], (int, float))][:6]
        if not keys:
            continue
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.6), squeeze=False)
        for ax, k in zip(axes[0], keys):
            pts = [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
            ax.plot(*zip(*pts))
            ax.set_title(k, fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name[:-6] + "_curves.png"), dpi=80)
        plt.close(fig)


# ----------------------------------------------------------------------------- gate

GATE_METRICS = {"format": 1, "math_acc": 1, "code_pass1": 1, "tool_acc": 1, "refusal_unsafe": 1,
                "overrefusal_safe": -1}  # +1: higher is better


def gate(baseline_path, candidate_path, n_per_family, max_drop, device="cpu"):
    """Fail (return False) when the candidate is significantly worse than the baseline on any
    headline metric: the paired-bootstrap 95% interval of the change lies wholly on the bad side
    AND the point change is worse than max_drop. Same test tasks for both."""
    task_list = tasks.eval_tasks("test", n_per_family)
    _, base, _ = evaluate_checkpoint(baseline_path, task_list, device=device)
    _, cand, _ = evaluate_checkpoint(candidate_path, task_list, device=device)
    print(f"gate rule: fail if, for any metric, the 95% paired-bootstrap interval of the change is "
          f"entirely worse than 0 and the change is worse than {max_drop:.2f}")
    ok = True
    for name, sign in GATE_METRICS.items():
        if name not in base or name not in cand:
            continue
        lo, hi = paired_bootstrap(base[name], cand[name])
        change = mean(cand[name]) - mean(base[name])
        worse = (hi < 0 if sign > 0 else lo > 0) and sign * change < -max_drop
        ok &= not worse
        print(f"  {name:18s} {mean(base[name]):.3f} -> {mean(cand[name]):.3f}  change {change:+.3f} "
              f"[{lo:+.3f}, {hi:+.3f}]  {'REGRESSION' if worse else 'ok'}")
    print("gate: " + ("PASS" if ok else "FAIL"))
    return ok


# ----------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="*", help="checkpoints to evaluate (default: every stage in --out-dir)")
    ap.add_argument("--out-dir", default="out")
    ap.add_argument("--n", type=int, default=50, help="test tasks per family")
    ap.add_argument("--gate", nargs=2, metavar=("BASELINE", "CANDIDATE"))
    ap.add_argument("--max-drop", type=float, default=0.02)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--report-dir", help="where report.md and report.json go (default: --out-dir)")
    ap.add_argument("--samples", type=int, default=1,
                    help="samples per task for the sampled (temperature 1) win rate vs SFT")
    ap.add_argument("--vs", help="the checkpoint the win rates and KL compare with (default: OUT_DIR/sft.pt), "
                                 "e.g. a stage's init to measure what the stage itself gained")
    ap.add_argument("--passk-problems", type=int, default=100,
                    help="problems per family for pass@k of the rows before and after RLVR (all of a "
                         "family's test split where it holds fewer: code has 84; 0: skip)")
    args = ap.parse_args(argv)
    try:
        if args.gate:
            sys.exit(0 if gate(*args.gate, args.n, args.max_drop, args.device) else 1)
        paths = args.checkpoints or [os.path.join(args.out_dir, f"{s}.pt") for s in STAGES
                                     if os.path.exists(os.path.join(args.out_dir, f"{s}.pt"))]
        if not paths:
            sys.exit(f"error: no checkpoints given and none found in {args.out_dir}/")
        task_list = tasks.eval_tasks("test", args.n)
        reference = args.vs or "sft"
        sft_path = args.vs or os.path.join(args.out_dir, "sft.pt")
        if args.vs and not os.path.exists(args.vs):
            sys.exit(f"error: --vs {args.vs}: no such checkpoint")
        sft = None
        if os.path.exists(sft_path):
            sft = load_checkpoint(sft_path, args.device)
            sft["texts"], _ = respond(sft["model"], sft["tokenizer"], task_list)
            sft["sampled"] = sample_texts(sft["model"], sft["tokenizer"], task_list, n=args.samples)
            sft["sampled_gold"] = gold([t for t in task_list for _ in range(args.samples)], sft["sampled"])
        rm_path = os.path.join(args.out_dir, "rm.pt")
        rm = None
        if os.path.exists(rm_path):
            from reward import load_reward_model
            rm = load_reward_model(rm_path)
        rows = {}
        for path in paths:
            t0 = time.time()
            name = os.path.splitext(os.path.basename(path))[0]
            passk = args.passk_problems if name in PASSK_ROWS else 0
            rows[name], _, _ = evaluate_checkpoint(path, task_list, sft, rm, args.device, passk)
            print(f"evaluated {name} in {time.time() - t0:.0f}s")
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    wall_path = os.path.join(args.out_dir, "pipeline.json")
    wall_s = json.load(open(wall_path))["wall_s"] if os.path.exists(wall_path) else {}
    report_dir = args.report_dir or args.out_dir
    os.makedirs(report_dir, exist_ok=True)
    print(write_report(report_dir, rows, wall_s, args.n, args.samples, reference))
    plot_curves(args.out_dir)


if __name__ == "__main__":
    main()
