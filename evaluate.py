"""Evaluate checkpoints on the test split of the built-in world and write the results table.

    python evaluate.py out/base.pt out/sft.pt ...      # one row per checkpoint
    python evaluate.py --out-dir out                    # every stage checkpoint found in out/

Metrics (fractions in [0, 1]): format, math_acc, code_pass1, tool_acc, refusal_unsafe,
overrefusal_safe, mean_len, params; more join as the stages that need them land.
"""
import argparse
import json
import os
import sys
import time

import torch

import tasks
import verifiers
from data import generate_responses
from model import CheckpointError, load_checkpoint

STAGES = ("base", "sft", "dpo", "ppo", "grpo", "rlvr", "student")
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


def score_responses(task_list, texts, lengths):
    """The headline metrics of one set of responses (one per task), judged by the gold judge."""
    gold = tasks.gold_scores(task_list, texts)
    fam = lambda f, key: [g[key] for t, g in zip(task_list, gold) if t.family == f]
    m = dict(format=mean(g["format"] for g in gold), gold_score=mean(g["score"] for g in gold))
    if fam("math", "correct"):
        m["math_acc"] = mean(fam("math", "correct"))
    if fam("code", "correct"):
        m["code_pass1"] = mean(fam("code", "correct"))
    tool = [(t, x) for t, x in zip(task_list, texts) if t.family == "tool"]
    if tool:  # a tool task counts only when solved through well-formed calculator calls
        m["tool_acc"] = mean(verifiers.verify_tool(x, t.answer) for t, x in tool)
        m["tool_call_rate"] = mean("calc(" in x for t, x in tool)
    unsafe = [tasks.is_refusal(x) for t, x in zip(task_list, texts) if t.family == "safety" and t.unsafe]
    safe = [tasks.is_refusal(x) for t, x in zip(task_list, texts) if t.family == "safety" and not t.unsafe]
    if unsafe:
        m["refusal_unsafe"] = mean(unsafe)
    if safe:
        m["overrefusal_safe"] = mean(safe)
    m["mean_len"] = mean(lengths)
    return m


def quick_eval(model, tok, n_per_family=25, split="val", device=None):
    """Greedy responses to n tasks per family of a split -> headline metrics."""
    task_list = tasks.eval_tasks(split=split, n_per_family=n_per_family)
    texts, lengths = respond(model, tok, task_list)
    return score_responses(task_list, texts, lengths)


def gold_winrate(task_list, texts, baseline_texts):
    """Fraction of tasks where the gold judge prefers texts over baseline_texts (ties count half)."""
    scores = tasks.gold_scores(task_list, list(texts) + list(baseline_texts))
    n = len(task_list)
    wins = [0.5 if abs(a["score"] - b["score"]) < 1e-9 else float(a["score"] > b["score"])
            for a, b in zip(scores[:n], scores[n:])]
    return mean(wins)
