"""RLVR: reinforcement learning against verifiers. The reward is a program's verdict, not a
learned model's opinion: math answers are checked exactly, code runs against hidden tests in the
sandbox, tool tasks must call the calculator and land on the right answer.

    python rlvr.py [--init out/ppo.pt] [--out out/rlvr.pt] [--preset tiny|cpu|gpu]
                   [--algo grpo|dr_grpo|dapo|rloo|reinforce_pp|ppo] [--data prompts.jsonl]
                   [--mix math:2,code:1,tool:1] [--curriculum true] [--overlong filter|shape|none]

Each step (the GRPO loop of grpo.py, with verifiers as the reward):
    draw prompts, weighted towards the difficulty buckets the policy solves sometimes   draw_prompts
    sample G responses each; calc(EXPR) calls run during sampling (forced tokens)      grpo.rollout
    reward = verifier verdict x format gate (+ overlong shaping, math step credit)     score
    [dynamic sampling: drop groups whose rewards are all equal, draw more]              sample_groups
    advantages (group-relative, prefix tree, RLOO, REINFORCE++, or PPO's GAE), update  grpo / ppo
and before/after the run: greedy accuracy per family, where wrong math answers first go wrong
(evaluate.math_failure), the no-tool accuracy on tool tasks, and unbiased pass@k (passk_eval,
also used by evaluate.py).

--algo picks the settings of a published recipe (ALGOS below); any of them can be overridden by
its flag (--advantage, --loss-agg, --eps-high, --kl, --beta, --kl-reward, --dynamic-sampling,
--overlong). --advantage tree places each group's credit on the tokens where its responses
part (grpo.prefix_tree_advantages) instead of on every token. Math is verified step by step as
well as by its answer (judge: a right answer after a false step is a lucky guess, and partial
credit goes to the reference's column steps).
Tool outputs are inserted by the sampler with sampled=0, so resp_mask is 0 on them:
they get no policy gradient, no KL, no advantage and add nothing to REINFORCE++'s returns or to
PPO's GAE (which bootstraps across them), since every sum and recursion runs over resp_mask.
"""
import ast
import os
import re
import time
import warnings

import torch
from tqdm import tqdm

import grpo
import tasks
import verifiers
from common import MetricLog, all_reduce_sum, fail, lr_at, make_optimizer, parse_config, set_lr, setup
from data import DataError, generate_responses, read_jsonl
from model import save_checkpoint

# final_norm_lr: the final LayerNorm (the logits' scale) on a rate of its own, as in ppo.py and
# grpo.py (common.make_optimizer): the verifiers' reward then sets how sharply the policy samples.
# Greedy answers do not move with it (same argmax); pass@1 at temperature 1 does: math 0.713 ->
# 0.831 (0.789 without), code 0.813 -> 0.886 (0.861), tool 0.899 -> 0.971 (0.929), pass@16 kept.
# DAPO has no KL term, so nothing but the reward bounds that sharpening: the gpu preset's 10x the
# steps get a tenth of the rate (unmeasured; the same total movement as the cpu run's).
#
# DAPO by default. On an earlier world's PPO checkpoint, 40 steps, greedy math on two sets of 400
# test problems (make_tasks' seed 0 / `evaluate.py --n 400`): DAPO +9.3 / +9.7 points, and
# +9.8 / +8.7 at seed 1; GRPO's recipe +5.5 / +8.2. Dynamic sampling is most of it: half of a
# step's groups are all right or all wrong and teach nothing. GRPO with dynamic sampling alone
# gained +9.0 / +11.8, but trained 289 s against DAPO's 183 s.
DEFAULTS = dict(
    init="out/ppo.pt", out="out/rlvr.pt", data=None, algo="dapo", mix="math:2,code:1,tool:1",
    n_prompts=1500, math_digits=0, math_steps=0, tool_digits=3, code_level=2, math_tools=False, check_steps=True,
    step_credit=0.5,
    steps=40, prompts_per_step=32, group_size=8, temperature=0.7, top_k=0, top_p=1.0,
    iterations=1, minibatches=1, micro_batch=64, lr=1.5e-5, final_norm_lr=1e-2, warmup=2, weight_decay=0.0, grad_clip=1.0,
    curriculum=True, curriculum_alpha=0.3, curriculum_floor=0.02, ds_max_tries=3, overlong_buffer=0.125,
    # from ALGOS unless given: None means "the algorithm's setting"
    advantage=None, loss_agg=None, eps_low=None, eps_high=None, kl=None, beta=None, kl_reward=None,
    dynamic_sampling=None, overlong=None,
    # ppo only (ppo.py's critic and GAE)
    critic_lr=1e-4, gamma=1.0, lam=0.95, vf_clip=0.2,
    # greedy eval, 200 tasks a family (all 84 code and 67 safety tasks): math's 95% interval is
    # ±6 points, where 50 gave ±12. pass@k on 100 problems a family (all 84 of code), 16 samples
    # each: on 20 the code test split's templates are too few to see a change (PPO -> RLVR code
    # pass@1 0.750 -> 0.747 on 20, 0.716 -> 0.764 on all 84)
    eval_n=200, passk_problems=100, passk_samples=16, max_train_s=0.0,
    seed=0, device="auto", dtype="bf16",
)
PRESETS = dict(
    tiny=dict(n_prompts=24, steps=2, prompts_per_step=3, group_size=4, micro_batch=8, eval_n=1,
              passk_problems=1, passk_samples=2),
    cpu=dict(),
    gpu=dict(n_prompts=1800, steps=400, prompts_per_step=128, group_size=16, micro_batch=256, lr=2e-5,
             final_norm_lr=1e-3, minibatches=4, passk_problems=100, passk_samples=64),
)
# The recipes. kl/beta: KL(π||π_ref) estimator and weight in the loss (GRPO eq. 3); kl_reward: β of
# a per-token k1 penalty inside the reward instead (REINFORCE++ §3, PPO-RLHF).
ALGOS = dict(
    grpo=dict(advantage="grpo", loss_agg="seq-mean-token-mean", eps_low=0.2, eps_high=0.2, kl="k3", beta=0.04,
              kl_reward=0.0, dynamic_sampling=False, overlong="filter"),                 # Shao et al. 2024
    dr_grpo=dict(advantage="dr_grpo", loss_agg="seq-mean-token-sum-norm", eps_low=0.2, eps_high=0.2, kl="off",
                 beta=0.0, kl_reward=0.0, dynamic_sampling=False, overlong="filter"),     # Liu et al. 2025
    dapo=dict(advantage="grpo", loss_agg="token-mean", eps_low=0.2, eps_high=0.28, kl="off", beta=0.0,
              kl_reward=0.0, dynamic_sampling=True, overlong="shape"),                   # Yu et al. 2025
    rloo=dict(advantage="rloo", loss_agg="seq-mean-token-sum-norm", eps_low=0.2, eps_high=0.2, kl="off",
              beta=0.0, kl_reward=0.0, dynamic_sampling=False, overlong="filter"),        # Ahmadian et al. 2024
    reinforce_pp=dict(advantage="reinforce_pp", loss_agg="token-mean", eps_low=0.2, eps_high=0.2, kl="off",
                      beta=0.0, kl_reward=0.01, dynamic_sampling=False, overlong="filter"),  # Hu 2025
    ppo=dict(advantage="gae", loss_agg="token-mean", eps_low=0.2, eps_high=0.2, kl="off", beta=0.0,
             kl_reward=0.01, dynamic_sampling=False, overlong="filter"),                 # ppo.ppo_step
)
CAPS = dict(math=96, code=48, tool=40)  # response budgets, as evaluate.py's MAX_NEW: train what is evaluated


def resolve_algo(cfg):
    """Fill the None keys from ALGOS[algo]; cast the given ones (they arrive as strings)."""
    if cfg["algo"] not in ALGOS:
        fail(f"--algo {cfg['algo']!r}: expected one of {', '.join(ALGOS)}")
    for k, v in ALGOS[cfg["algo"]].items():
        if cfg[k] is None:
            cfg[k] = v
        else:
            cfg[k] = str(cfg[k]).lower() in ("1", "true", "yes", "on") if isinstance(v, bool) else type(v)(cfg[k])
    if cfg["overlong"] not in ("filter", "shape", "none") or cfg["loss_agg"] not in grpo.LOSS_AGG:
        fail(f"--overlong filter|shape|none, --loss-agg {grpo.LOSS_AGG}; got {cfg['overlong']!r}, {cfg['loss_agg']!r}")
    if cfg["algo"] != "ppo" and cfg["advantage"] not in grpo.ADVANTAGES:
        fail(f"--advantage {cfg['advantage']!r}: expected one of {grpo.ADVANTAGES}")
    return cfg


# ----------------------------------------------------------------------------- tasks and the curriculum

def parse_mix(mix):
    """'math:2,code:1,tool:1' -> {'math': 2.0, 'code': 1.0, 'tool': 1.0}."""
    try:
        out = {f: float(w) for f, w in (part.split(":") for part in mix.split(","))}
        assert out and not set(out) - set(CAPS) and min(out.values()) >= 0
        return out
    except (ValueError, AssertionError):
        fail(f"--mix {mix!r}: expected family:weight pairs (families {', '.join(CAPS)}, weights >= 0)")


def bucket_of(task):
    """The difficulty bucket the curriculum tracks: math (digits, steps), tool operand lengths,
    code template; prompts from --data share one bucket per family."""
    m = task.meta
    if "steps" in m:
        return f"math d{m['digits']} s{m['steps']}"
    if "a" in m:
        return f"tool {len(str(m['a']))}x{len(str(m['b']))}"
    return f"code {m['template']}" if "template" in m else task.family


def load_pool(cfg):
    """Training tasks: train-split tasks of the --mix families, or the --data RL JSONL
    ({"prompt","answer"} -> math, {"prompt","test","entry_point"} -> code)."""
    if cfg["data"]:
        if not os.path.exists(cfg["data"]):
            fail(f"{cfg['data']}: no such file")
        try:
            rows = read_jsonl(cfg["data"], "rl")
        except DataError as e:
            fail(str(e))
        return [tasks.Task("math", r["prompt"], str(r["answer"]), []) if "answer" in r else
                tasks.Task("code", r["prompt"], None, [], test=r["test"], entry_point=r["entry_point"]) for r in rows]
    mix = {f: w for f, w in parse_mix(cfg["mix"]).items() if w > 0}
    knobs = dict(math=dict(digits=cfg["math_digits"] or None, steps=cfg["math_steps"] or None),
                 tool=dict(digits=cfg["tool_digits"]), code=dict(level=cfg["code_level"]))
    per = max(1, cfg["n_prompts"] // len(mix))
    try:
        return [t for f in mix for t in tasks.make_tasks(f, "train", per, seed=cfg["seed"], **knobs[f])]
    except tasks.TaskSpaceError as e:
        fail(f"--n-prompts {cfg['n_prompts']} with --mix {cfg['mix']} ({per} a family share): {e}")


def draw_prompts(pool, bucket, p, n, cfg, gen):
    """Indices into pool: n tasks split over the families as --mix says (remainder to the first),
    without replacement within a family. With the curriculum a bucket is drawn with weight
    p(1-p) + floor, p its running success rate, then a task in it: buckets the policy solves
    sometimes give groups with a reward spread, the only ones with a gradient (whatever their
    share of the pool: 3-digit sums outnumber 1-digit ones)."""
    size = torch.bincount(bucket, minlength=len(p)).float()[bucket]  # weights are per bucket, not per task
    w = (p[bucket] * (1 - p[bucket]) + cfg["curriculum_floor"]) / size if cfg["curriculum"] else torch.ones(len(pool))
    mix = parse_mix(cfg["mix"])
    fams = [f for f in mix if mix[f] > 0 and any(t.family == f for t in pool)]
    quota = {f: int(n * mix[f] / sum(mix[f] for f in fams)) for f in fams}
    quota[fams[0]] += n - sum(quota.values())
    out = []
    for fam, k in quota.items():
        idx = torch.tensor([i for i, t in enumerate(pool) if t.family == fam])
        if k:
            out += idx[torch.multinomial(w[idx], min(k, len(idx)), replacement=False, generator=gen)].tolist()
    return out


def update_curriculum(p, buckets, success, alpha):
    """p_b <- (1-α) p_b + α mean(success in b), for buckets seen this step (counts all-reduced)."""
    s = all_reduce_sum(torch.zeros_like(p).index_add_(0, buckets, success.float().cpu()))
    n = all_reduce_sum(torch.zeros_like(p).index_add_(0, buckets, torch.ones(len(buckets))))
    hit = n > 0
    p[hit] = (1 - alpha) * p[hit] + alpha * s[hit] / n[hit]


# ----------------------------------------------------------------------------- rewards: verifiers behind a format gate

_SPECIAL = re.compile(r"<\|[a-z]+\|>")
_ANSWER_LINE = re.compile(r"Answer: -?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def clean(text):
    """Special tokens become line breaks (as the gold judge reads a response)."""
    return _SPECIAL.sub("\n", text).strip()


def answer_format(text):
    """Math/tool format: the last line is 'Answer: N' and it is the only answer given."""
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    return bool(lines) and _ANSWER_LINE.fullmatch(lines[-1]) is not None and text.lower().count("answer") == 1


_EQUATION = re.compile(r"([\d+\-*/() ]+)=\s*(-?\d+)")


def equations(text):
    """The working's pure-arithmetic lines ('8+7+1=16', '58-27=31'), stripped, and how many hold
    (checked with the safe calculator)."""
    lines = [l.strip() for l in text.splitlines() if _EQUATION.fullmatch(l.strip())]
    holds = sum(verifiers.run_calculator(l.split("=")[0]) == str(int(l.split("=")[1])) for l in lines)
    return lines, holds


def step_match(lines, reference):
    """Reference steps the response wrote, over max(#reference, #written): precision and recall at
    once, so neither skipping steps nor padding with guesses or true-but-irrelevant equations
    ('7-0=7') pays. Example: ref [a, b, c], written [a, x, c, y] -> 2/4."""
    ref = [l.strip() for l in reference.splitlines() if _EQUATION.fullmatch(l.strip())]
    left, hit = list(ref), 0
    for l in lines:
        if l in left:
            left.remove(l)
            hit += 1
    return hit / max(len(ref), len(lines), 1)


def code_shape(code, entry_point):
    """(parses, defines entry_point as a top-level def)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # '1x' in a sampled program: a SyntaxWarning per call
            tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return False, False
    return True, any(isinstance(n, ast.FunctionDef) and n.name == entry_point for n in tree.body)


def judge(task_list, texts, cache, math_tools=False, check_steps=True, step_credit=0.0):
    """Verifier verdicts: correct, credit (the reward before the format gate), format; (B,) each.

    correct: math verify_math; tool verify_tool (>= 1 well-formed calc call and the right answer);
    code passes its tests in the sandbox (run_code_batch, parallel; identical programs run once:
    `cache` maps (code, test, entry_point) -> passed; a program that does not parse is not run).
    format: math/tool answer_format (math: no calc call unless math_tools: working, not the
    calculator); code defines the asked function.
    check_steps: math is correct only if every step of the working is true as well: a right answer
    reached through a false step is a lucky guess, and rewarding it teaches the false step.
    step_credit: a math response that is not correct earns step_credit x step_match against the
    task's reference working (built-in tasks; none for --data): a dense signal on the column
    facts answers are built from, < 1 so only a right answer pays in full. Counting merely true
    equations instead was gamed within 20 steps ('9+0=9', '7-0=7' padding). Else credit = correct.
    """
    correct, credit, fmt, todo = [0.0] * len(texts), [0.0] * len(texts), [0.0] * len(texts), {}
    for i, (t, x) in enumerate(zip(task_list, texts)):
        c = clean(x)
        if t.family == "code":
            code = verifiers.extract_code(c)
            parses, defines = code_shape(code, t.entry_point)
            fmt[i] = float(defines)
            key = (code, t.test, t.entry_point)
            if key in cache:
                correct[i] = cache[key]
            elif parses:
                todo.setdefault(key, []).append(i)
        elif t.family == "tool":
            fmt[i], correct[i] = float(answer_format(c)), verifiers.verify_tool(x, t.answer)
        else:
            fmt[i] = float(answer_format(c) and (math_tools or "calc(" not in c))
            lines, holds = equations(c)
            correct[i] = verifiers.verify_math(c, t.answer) * (not check_steps or holds == len(lines))
            if step_credit and t.reference:
                credit[i] = step_credit * step_match(lines, t.reference[0]["content"])
    keys = list(todo)
    for k, r in zip(keys, verifiers.run_code_batch([dict(code=k[0], test=k[1], entry_point=k[2]) for k in keys])):
        cache[k] = float(r["passed"])
        for i in todo[k]:
            correct[i] = cache[k]
    if len(cache) > 200_000:
        cache.clear()  # bounded memory on long runs
    correct = torch.tensor(correct)
    return correct, torch.maximum(correct, torch.tensor(credit)), torch.tensor(fmt)


def overlong_penalty(length, cap, buffer):
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), L_max = cap, L_cache = buffer:
      0 if L <= L_max - L_cache;  ((L_max - L_cache) - L) / L_cache if L <= L_max;  -1 beyond.
    Example: cap 96, buffer 12: L = 84 -> 0, 90 -> -0.5, 96 -> -1, 97 -> -1."""
    soft = ((cap - buffer) - length) / buffer
    return torch.where(length > cap, torch.full_like(soft, -1.0), soft.clamp(max=0.0))


def score(task_list, batch, cfg, cache):
    """Rewards (B,) and per-row facts. reward = credit x format (the format GATE: a response in a
    broken format earns 0 whatever its answer). Truncation (no stop token within the family's
    budget CAPS) is handled by --overlong:
      filter  the row's reward is 0 and its loss is masked out (DAPO §3.4, overlong filtering)
      shape   reward = 0 + DAPO's soft length penalty (-1 once truncated), trained on (DAPO §3.4)
      none    reward 0, trained on like any wrong answer
    With shape, finished responses inside the last overlong_buffer fraction of the budget pay
    the soft penalty as well. Filtering edits batch["resp_mask"] in place."""
    dev = batch["ids"].device
    correct, credit, fmt = (x.to(dev) for x in judge(task_list, batch["texts"], cache, cfg["math_tools"],
                                                     cfg["check_steps"], cfg["step_credit"]))
    cap = torch.tensor([float(CAPS[t.family]) for t in task_list], device=dev)
    length = batch["attn_mask"][:, batch["prompt_len"]:].sum(1).float()  # tool tokens count: they use the budget
    truncated = ~batch["finished"] | (length > cap)
    success = correct * fmt * (~truncated)
    reward = credit * fmt * (~truncated)
    if cfg["overlong"] == "shape":
        reward = reward + overlong_penalty(length, cap, (cap * cfg["overlong_buffer"]).clamp(min=1))
    elif cfg["overlong"] == "filter":
        batch["resp_mask"] *= (~truncated).float()[:, None]
    family = torch.tensor([list(CAPS).index(t.family) for t in task_list], device=dev)
    return reward, dict(correct=correct, format=fmt, success=success, truncated=truncated.float(), length=length,
                        family=family)


# ----------------------------------------------------------------------------- one step's batch

def sample_groups(model, tok, pool, bucket, p, cfg, step, rank, cache):
    """Draw prompts, roll out G responses each, score them. With dynamic sampling (DAPO §3.2)
    groups whose rewards are all equal are dropped and fresh prompts drawn, up to ds_max_tries
    rollouts; if nothing is left the last rollout is kept (its advantages are 0) so every DDP rank
    joins the update. Returns (batch, rewards, facts, fraction of groups dropped)."""
    G, want = cfg["group_size"], cfg["prompts_per_step"]
    gen = torch.Generator().manual_seed((cfg["seed"] * 1_000_003 + step) * 1009 + rank)  # each rank its own prompts
    parts, kept, seen, seen_b, seen_s = [], 0, 0, [], []
    for attempt in range(cfg["ds_max_tries"] if cfg["dynamic_sampling"] else 1):
        idx = draw_prompts(pool, bucket, p, want - kept, cfg, gen)
        task_list = [pool[i] for i in idx for _ in range(G)]
        cap = max(CAPS[pool[i].family] for i in idx)
        batch = grpo.rollout(model, tok, [pool[i].prompt for i in idx], G, cap, cfg["temperature"],
                             cfg["top_k"], cfg["top_p"], tools=True)
        reward, facts = score(task_list, batch, cfg, cache)
        seen_b.append(bucket[torch.tensor(idx)].repeat_interleave(G))
        seen_s.append(facts["success"].cpu())
        seen += len(idx)
        rows = torch.arange(len(reward), device=reward.device)
        if cfg["dynamic_sampling"]:
            r = reward.view(-1, G)
            rows = (r != r[:, :1]).any(1).repeat_interleave(G).nonzero().flatten()
        kept += len(rows) // G
        if len(rows) == 0 and not parts and attempt == cfg["ds_max_tries"] - 1:
            rows = torch.arange(len(reward), device=reward.device)  # nothing varied: keep (all-zero advantages)
        if len(rows):
            parts.append((grpo.select_rows(batch, rows), reward[rows], {k: v[rows] for k, v in facts.items()}))
        if kept >= want:
            break
    if cfg["curriculum"]:  # once per step, after all attempts: ranks may make different numbers of them
        update_curriculum(p, torch.cat(seen_b), torch.cat(seen_s), cfg["curriculum_alpha"])
    batch = grpo.concat_rollouts([b for b, _, _ in parts], tok.pad_id) if len(parts) > 1 else parts[0][0]
    facts = {k: torch.cat([f[k] for _, _, f in parts]) for k in parts[0][2]}
    return batch, torch.cat([r for _, r, _ in parts]), facts, 1 - kept / seen


def advantages(rewards, batch, cfg, old_logp=None, ref_logp=None):
    """(B,T-1) advantage of each target token, 0 wherever resp_mask is 0 (prompt, padding, tool
    output, filtered rows): grpo.token_advantages, with REINFORCE++'s KL in the reward when
    kl_reward > 0 (a -β·k1 term on every sampled token, the verdict on the last)."""
    if cfg["advantage"].startswith("reinforce_pp") and cfg["kl_reward"] > 0:
        mask = batch["resp_mask"]
        last, any_valid = grpo.last_valid(mask)
        kl = grpo.kl_estimate(old_logp, ref_logp, "k1") * mask
        rewards = (-cfg["kl_reward"] * kl).scatter_add(1, last[:, None], (rewards.float() * any_valid)[:, None])
    return grpo.token_advantages(rewards, batch, cfg["advantage"], cfg["group_size"])


def length_minibatches(batch, n):
    """Rows sorted by length and cut into n minibatches (as HF's group_by_length), each trimmed to
    the columns its rows use (grpo.length_chunks). Returns [(rows, lo, hi, sub_batch)]; sub_batch
    covers ids[:, lo:hi], targets lo..hi-2."""
    B = batch["ids"].shape[0]
    rows = torch.arange(B, device=batch["ids"].device)
    return [(part, lo, hi, grpo.trimmed(batch, part, lo, hi))
            for part, lo, hi in grpo.length_chunks(batch, rows, -(-B // n))]


def policy_step(model, ref_model, opt, batch, rewards, cfg):
    """Advantages, then μ (iterations) passes over length-grouped minibatches, one grpo.update
    (one optimizer step) each. Old log-probs (the sampling policy) are taken before the first
    step whenever a later step is off-policy; reference log-probs only when a KL term needs them."""
    T, micro, dtype = cfg["temperature"], cfg["micro_batch"], cfg["dtype"]
    parts = length_minibatches(batch, cfg["minibatches"])

    def logprobs(m):  # (B,T-1), filled part by part
        out = torch.zeros_like(batch["resp_mask"])
        for rows, lo, hi, sub in parts:
            out[rows, lo:hi - 1] = grpo.batched_logprobs(m, sub, T, micro, dtype)
        return out
    old_logp = logprobs(model) if cfg["iterations"] > 1 or cfg["minibatches"] > 1 or cfg["kl_reward"] > 0 else None
    ref_logp = logprobs(ref_model) if cfg["kl"] != "off" or cfg["kl_reward"] > 0 else None
    adv_tok = advantages(rewards, batch, cfg, old_logp, ref_logp)
    one = dict(cfg, iterations=1, minibatches=1)
    stats = []
    for _ in range(cfg["iterations"]):
        for rows, lo, hi, sub in parts:
            cut = lambda x: None if x is None else x[rows, lo:hi - 1]
            stats.append(grpo.update(model, ref_model, opt, sub, cut(adv_tok), one, old_logp=cut(old_logp),
                                     ref_logp=cut(ref_logp)))
    out = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
    if "kl_seq" in out:  # each part's kl_seq is a sum over its rows / its row count: back to per response
        out["kl_seq"] = sum(s["kl_seq"] * len(p[0]) for s, p in zip(stats, parts * cfg["iterations"])) / (
            len(rewards) * cfg["iterations"])
    out.update({k: v for k, v in stats[0].items() if k.startswith("first_mb")})  # ρ = 1 before any step
    return out


def step_stats(rewards, facts, G):
    """What to watch each step: reward and its spread, success (per family), format, truncation,
    length, and the fraction of groups whose rewards are all equal (no gradient)."""
    r = rewards.view(-1, G) if len(rewards) % G == 0 else rewards.view(-1, 1)
    row = dict(reward=rewards.mean(), reward_std=rewards.std() if len(rewards) > 1 else 0.0,
               zero_adv_groups=(r == r[:, :1]).all(1).float().mean(),
               **{k: facts[k].float().mean() for k in ("success", "format", "truncated", "length")})
    for i, f in enumerate(CAPS):
        if (facts["family"] == i).any():
            row[f"success_{f}"] = facts["success"][facts["family"] == i].mean()
    return {k: float(v) for k, v in row.items()}


# ----------------------------------------------------------------------------- evaluation

def passk_from_counts(n, counts, ks):
    """Mean over problems of the unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    return {k: sum(verifiers.pass_at_k(n, c, k) for c in counts) / len(counts) for k in ks if k <= n}


@torch.no_grad()
def passk_eval(model, tok, families=("math", "code", "tool"), n_problems=20, n_samples=16, ks=(1, 4, 16),
               temperature=1.0, seed=0, cache=None):
    """Unbiased pass@k on the first n_problems test tasks of each family (the greedy eval's own
    tasks; all of a family's test split where it holds fewer), from n_samples samples each at
    `temperature`, tools on. Correct = the eval metrics' verdict (math verify_math, code sandbox,
    tool verify_tool), no format gate.
    Returns {"math_pass@1": ..., "math_pass@4": ..., ...} (fractions)."""
    import evaluate
    device = next(model.parameters()).device
    per_family = [tasks.make_tasks(f, "test", n_problems, seed=1234, allow_fewer=True) for f in families]
    task_list = [t for group in per_family for t in group]
    gen = torch.Generator(device=device).manual_seed(seed)
    texts, _ = evaluate.respond(model, tok, task_list, temperature, n_samples, generator=gen)
    correct, _, _ = judge([t for t in task_list for _ in range(n_samples)], texts, {} if cache is None else cache,
                          math_tools=True, check_steps=False)
    counts = correct.view(len(task_list), n_samples).sum(1).long().tolist()
    out, start = {}, 0
    for f, group in zip(families, per_family):  # a family may hold fewer than n_problems (code: 84)
        for k, v in passk_from_counts(n_samples, counts[start:start + len(group)], ks).items():
            out[f"{f}_pass@{k}"] = v
        start += len(group)
    return out


@torch.no_grad()
def evaluate_model(model, tok, cfg, cache):
    """Greedy test-split metrics (as evaluate.quick_eval: math_acc, code_pass1, tool_acc, ...),
    the math answers counted by where they first go wrong (math_failures, from the same greedy
    answers), the tool tasks answered with tools off (tool_acc_no_tools: can it do them in its
    head?), pass@k."""
    import evaluate
    task_list = tasks.eval_tasks("test", cfg["eval_n"])
    texts, lengths = evaluate.respond(model, tok, task_list)
    m = evaluate.score_responses(task_list, texts, lengths)
    m["math_failures"] = evaluate.math_failures(task_list, texts)
    tool = [t for t in task_list if t.family == "tool"]
    out = generate_responses(model, tok, [t.prompt for t in tool], CAPS["tool"], 0.0, tools=False)
    m["tool_acc_no_tools"] = sum(verifiers.verify_math(clean(x), t.answer) for t, x in zip(tool, out["texts"])) / len(tool)
    if cfg["passk_problems"]:
        m.update(passk_eval(model, tok, n_problems=cfg["passk_problems"], n_samples=cfg["passk_samples"],
                            seed=cfg["seed"], cache=cache))
    return m


def print_before_after(before, after):
    keys = ["math_acc", "code_pass1", "tool_acc", "tool_acc_no_tools", "format", "refusal_unsafe", "overrefusal_safe"]
    # by family; within one, passk_eval's own order of k (a stable sort)
    passk = sorted((k for k in after if "_pass@" in k), key=lambda k: k.split("_pass@")[0])
    for k in [k for k in keys if k in after] + passk:
        print(f"rlvr: {k:18s} {before.get(k, float('nan')):.3f} -> {after[k]:.3f}")
    if "math_failures" in after:  # where wrong math answers first go wrong (evaluate.math_failure)
        counts = lambda m: ", ".join(f"{k} {v}" for k, v in m.items() if v)
        print(f"rlvr: math answers by first error, before: {counts(before.get('math_failures', {}))}")
        print(f"rlvr: math answers by first error, after:  {counts(after['math_failures'])}")


# ----------------------------------------------------------------------------- main

def main(argv=None):
    cfg = resolve_algo(parse_config(DEFAULTS, PRESETS, argv, description=__doc__))
    device, rank, world = setup(cfg)
    t0 = time.time()
    model, ref_model, tok = grpo.load_policy(cfg["init"], device)  # eval mode: no dropout, ρ = 1 on-policy
    pool = load_pool(cfg)
    names = sorted({bucket_of(t) for t in pool})
    bucket = torch.tensor([names.index(bucket_of(t)) for t in pool])
    p = torch.full((len(names),), 0.5)  # running success rate per bucket, before any evidence
    cache, log, G, T = {}, MetricLog(cfg["out"], "rlvr", enabled=rank == 0), cfg["group_size"], cfg["temperature"]
    before = evaluate_model(ref_model, tok, cfg, cache) if rank == 0 and cfg["eval_n"] else {}
    if rank == 0:
        print(f"rlvr: {cfg['algo']} on {len(pool)} prompts ({len(names)} buckets), init {cfg['init']}; "
              f"before: math {before.get('math_acc', float('nan')):.3f}, code {before.get('code_pass1', float('nan')):.3f}, "
              f"tool {before.get('tool_acc', float('nan')):.3f} ({time.time() - t0:.0f}s)")
    opt = make_optimizer(model, cfg["lr"], cfg["weight_decay"], device=device, final_norm_lr=cfg["final_norm_lr"])
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if cfg["algo"] == "ppo":  # ppo.py's critic (from the policy, zero value head), clipped value loss, GAE
        import ppo
        critic = ppo.make_critic(dict(cfg, critic_init="policy"), model, tok, device)[0]
        copt = make_optimizer(critic, cfg["critic_lr"], cfg["weight_decay"], device=device)
        train_critic = torch.nn.parallel.DistributedDataParallel(critic) if world > 1 else critic
        pcfg = dict(cfg, epochs=cfg["iterations"], eps_clip=cfg["eps_low"], max_new_tokens=max(CAPS.values()))
    ucfg = dict(cfg, max_new_tokens=max(CAPS.values()))  # Dr. GRPO's constant normaliser L_max
    t_train, steps_done = time.time(), 0

    for step in (bar := tqdm(range(cfg["steps"]), disable=rank != 0, desc=f"rlvr-{cfg['algo']}")):
        over = float(cfg["max_train_s"] > 0 and time.time() - t_train > cfg["max_train_s"])
        if all_reduce_sum(torch.tensor([over])).item() > 0:  # every rank stops at the same step
            break
        set_lr(opt, lr_at(step, cfg["steps"], cfg["lr"], cfg["warmup"], min_ratio=1.0))  # constant after warmup
        batch, rewards, facts, dropped = sample_groups(model, tok, pool, bucket, p, cfg, step, rank, cache)
        if cfg["algo"] == "ppo":
            set_lr(copt, lr_at(step, cfg["steps"], cfg["critic_lr"], cfg["warmup"], min_ratio=1.0))
            exp, stats = ppo.ppo_step(train_model, ref_model, train_critic, opt, copt, batch, rewards, cfg["kl_reward"], pcfg)
            stats["kl_seq"] = float((exp["kl"].sum(1)).mean())
        else:
            stats = policy_step(train_model, ref_model, opt, batch, rewards, ucfg)
        steps_done += 1
        row = dict(stats, **step_stats(rewards, facts, G), ds_dropped=dropped, lr=opt.param_groups[0]["lr"],
                   logit_scale=grpo.logit_scale(model))
        log.log(step, **row)
        bar.set_postfix(r=f"{row['reward']:.2f}", kl=f"{row.get('kl_seq', 0):.2f}", zero=f"{row['zero_adv_groups']:.2f}")

    train_s = time.time() - t_train
    if rank != 0:
        return
    after = evaluate_model(model, tok, cfg, cache) if cfg["eval_n"] else {}
    metrics = dict(after, **{f"{k}_init": v for k, v in before.items()}, train_s=train_s, steps_done=steps_done,
                   curriculum={n: round(float(v), 3) for n, v in zip(names, p)}, wall_s=time.time() - t0)
    save_checkpoint(cfg["out"], model, tok, "rlvr", parent=cfg["init"], config=cfg, metrics=metrics,
                    optimizer=opt, step=steps_done)
    if after:
        print_before_after(before, after)
    print(f"rlvr: {steps_done} steps, train {train_s:.0f}s, total {metrics['wall_s']:.0f}s -> {cfg['out']}")


if __name__ == "__main__":
    main()
