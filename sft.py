"""Supervised fine-tuning: teach the base model the chat format on demonstrations.

The loss is next-token cross-entropy on assistant tokens only (the mask from data.render_chat):
the model learns to answer, not to predict the user's question or the tool's output. On the
built-in world the first --drill-steps steps train on one-line drills of the column facts that
math workings are made of (tasks.drill_conversations), the rest on the demonstrations.
--pack true (the gpu preset) packs each micro-batch's conversations end to end into rows of
the context length, each attending only to itself (model.document_layout): the same loss and
gradient with almost no padding, in a few large rows of near-fixed size, which a GPU runs at
full speed.

    python sft.py [--init out/base.pt] [--out out/sft.pt] [--data conversations.jsonl] [--preset tiny|cpu|gpu]
"""
import os
import time

import torch
from tqdm import tqdm

import tasks
from common import (MetricLog, Throughput, all_reduce_sum, autocast, fail, lr_at, make_optimizer, parse_config,
                    set_lr, setup)
from data import DataError, as_messages, pack_rows, pad, read_jsonl, render_chat
from model import CheckpointError, load_checkpoint, save_checkpoint, sequence_logprobs

DEFAULTS = dict(
    init="out/base.pt", out="out/sft.pt", data=None, n_train=20000, n_val=200,
    drill_steps=200, drill_batch=256, drill_demos=16,
    batch_size=128, grad_accum=8, steps=600, lr=1e-3, warmup=20,
    weight_decay=0.0, grad_clip=1.0,
    eval_every=100, save_every=250, eval_tasks=25, stop_after=0, resume=False,
    pack=False, seed=0, device="auto", dtype="bf16", compile=False,
)
PRESETS = dict(
    tiny=dict(n_train=200, n_val=16, drill_steps=2, drill_batch=8, drill_demos=2,
              batch_size=8, grad_accum=2, steps=10, eval_every=5,
              save_every=5, eval_tasks=2),
    cpu=dict(),
    gpu=dict(n_train=200000, batch_size=512, grad_accum=1, steps=4000, lr=3e-4, eval_every=500, save_every=1000,
             eval_tasks=100, pack=True),
)


def load_conversations(cfg):
    """Training conversations: --data (messages or prompt/completion JSONL) or the built-in world."""
    if cfg["data"] is None:
        return [c["messages"] for c in tasks.sft_conversations(cfg["n_train"], seed=cfg["seed"])]
    if not os.path.exists(cfg["data"]):
        fail(f"{cfg['data']}: no such file")
    try:
        return [as_messages(r) for r in read_jsonl(cfg["data"], "sft")]
    except DataError as e:
        fail(str(e))


def val_conversations(n):
    """Clean reference answers to val-split tasks, for the val loss."""
    per = max(1, n // len(tasks.FAMILIES))
    try:
        return [t.messages() + t.reference for f in tasks.FAMILIES for t in tasks.make_tasks(f, "val", per, seed=7)]
    except tasks.TaskSpaceError as e:
        fail(f"--n-val {n} ({per} a family): {e}")


def encode_all(tok, conversations, block_size):
    """Render every conversation; drop (and count) those that don't fit the context."""
    rendered = [render_chat(tok, c) for c in conversations]
    kept = [r for r in rendered if len(r[0]) <= block_size and sum(r[1]) > 0]
    return kept, len(rendered) - len(kept)


def load_drills(tok, seed, block_size):
    """The column-fact drills (tasks.drill_conversations), encoded, for a run's opening steps."""
    return encode_all(tok, [c["messages"] for c in tasks.drill_conversations(20000, seed)], block_size)[0]


def drill_rows(drills, demos, cfg, generator):
    """An opening step's global batch: cfg drill_batch drills drawn from `generator`, and the
    first drill_demos of the step's demonstrations so the other skills stay in use."""
    picks = torch.randint(0, len(drills), (cfg["drill_batch"],), generator=generator).tolist()
    return [drills[i] for i in picks] + demos[:cfg["drill_demos"]]


def make_batch(examples, idx, pad_id, device):
    # on a GPU, few shapes let torch.compile reuse its kernels; on a CPU padding costs time
    multiple = 64 if torch.device(device).type == "cuda" else 1
    ids = pad([examples[i][0] for i in idx], pad_id, multiple=multiple).to(device)
    mask = pad([examples[i][1] for i in idx], 0, multiple=multiple).to(device)
    return ids, mask


def make_packed_batch(bins, pad_id, device):
    """Bins of rows (data.pack_rows) -> ids, mask, doc_ids: each bin one row holding its
    conversations end to end. A conversation's first token is never a target: it would be
    predicted from the previous conversation's last."""
    multiple = 64 if torch.device(device).type == "cuda" else 1
    ids = [[t for r in b for t in r[0]] for b in bins]
    mask = [[m if j else 0 for r in b for j, m in enumerate(r[1])] for b in bins]
    doc = [[k for k, r in enumerate(b) for _ in r[0]] for b in bins]
    return (pad(ids, pad_id, multiple=multiple).to(device), pad(mask, 0, multiple=multiple).to(device),
            pad(doc, -1, multiple=multiple).to(device))


def micro_batches(rows, n, pack, block, pad_id, device):
    """A step's length-sorted rows -> up to n micro-batches (ids, mask, doc_ids, rows in it): rows
    of similar lengths padded together (doc_ids None), or with pack the conversations packed
    into rows of `block` tokens."""
    units = pack_rows(rows, block) if pack else rows
    for k in range(n):
        part = units[k * len(units) // n:(k + 1) * len(units) // n]
        if not part:
            continue
        if pack:
            yield *make_packed_batch(part, pad_id, device), [r for b in part for r in b]
        else:
            yield *make_batch(part, range(len(part)), pad_id, device), None, part


def masked_loss(model, ids, mask, denom, doc_ids=None):
    """-sum of log-probs of the assistant tokens / denom. mask[:, 1:] marks targets ids[:, 1:]."""
    return -(sequence_logprobs(model, ids, doc_ids=doc_ids) * mask[:, 1:]).sum() / denom


@torch.no_grad()
def evaluate_loss(model, examples, pad_id, device, batch_size=64):
    model.eval()
    total, count = 0.0, 0.0
    for s in range(0, len(examples), batch_size):
        ids, mask = make_batch(examples, range(s, min(s + batch_size, len(examples))), pad_id, device)
        total += masked_loss(model, ids, mask, 1.0).item()
        count += mask[:, 1:].sum().item()
    model.train()
    return total / max(count, 1)


def main(argv=None):
    cfg = parse_config(DEFAULTS, PRESETS, argv, description=__doc__)
    device, rank, world = setup(cfg)
    t0 = time.time()
    resuming = cfg["resume"] and os.path.exists(cfg["out"])
    try:
        ckpt = load_checkpoint(cfg["out"] if resuming else cfg["init"])
    except CheckpointError as e:
        fail(str(e))
    model, tok = ckpt["model"].to(device).train(), ckpt["tokenizer"]
    parent = ckpt["parent"] if resuming else cfg["init"]
    block = model.config.block_size
    train, dropped = encode_all(tok, load_conversations(cfg), block)
    # the built-in world's first steps drill the column facts (tasks.drill_conversations)
    drill_steps = cfg["drill_steps"] if cfg["data"] is None else 0
    drills = load_drills(tok, cfg["seed"], block) if drill_steps else []
    val, _ = encode_all(tok, val_conversations(cfg["n_val"]), block)
    if not train:
        fail(f"no training conversation fits the {block}-token context")
    if dropped and rank == 0:
        print(f"sft: dropped {dropped} conversations longer than {block} tokens")

    opt = make_optimizer(model, cfg["lr"], cfg["weight_decay"], device=device)
    start_step = 0
    if resuming:
        opt.load_state_dict(ckpt["optimizer"])
        start_step = ckpt["step"]
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    if cfg["compile"]:
        train_model = torch.compile(train_model)
    log = MetricLog(cfg["out"], "sft", enabled=rank == 0, resume=resuming)

    def save(step, metrics=None):
        if rank == 0:
            save_checkpoint(cfg["out"], model, tok, "sft", parent=parent, config=cfg, metrics=metrics,
                            optimizer=opt, step=step)

    speed = Throughput(model)
    bar = tqdm(range(start_step, cfg["steps"]), disable=rank != 0, desc="sft")
    for step in bar:
        set_lr(opt, lr_at(step, cfg["steps"], cfg["lr"], cfg["warmup"]))
        # the batch depends only on (seed, step): resume and DDP see the same global batch
        g = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + step)
        rows = [train[i] for i in torch.randint(0, len(train), (cfg["batch_size"],), generator=g).tolist()]
        if step < drill_steps:
            rows = drill_rows(drills, rows, cfg, g)
        rows = rows[rank::world]
        # micro-batches of similar lengths (or of packed rows): far less padding, and the same
        # gradient, since every micro-batch's loss is divided by the batch's total token count
        rows.sort(key=lambda r: len(r[0]))
        n_tokens = all_reduce_sum(torch.tensor(float(sum(sum(mask[1:]) for _, mask in rows)), device=device))
        loss = 0.0
        for ids, mask, doc_ids, part in micro_batches(rows, cfg["grad_accum"], cfg["pack"], block, tok.pad_id, device):
            with autocast(device, cfg["dtype"]):  # / (n_tokens / world): DDP averages the ranks' gradients
                part_loss = masked_loss(train_model, ids, mask, n_tokens / world, doc_ids)
            part_loss.backward()
            loss += part_loss.detach()
            for r in part:  # FLOPs: a packed conversation attends over its own length, a padded one the row's
                speed.add(len(r[0]) - 1, len(r[0]) - 1 if doc_ids is not None else ids.shape[1] - 1)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == cfg["steps"] - 1:
            row = dict(loss=(all_reduce_sum(loss) / world).item(), grad_norm=norm.item(),
                       lr=opt.param_groups[0]["lr"], tokens=n_tokens.item(), **speed.read())
            if (step + 1) % cfg["eval_every"] == 0 or step == cfg["steps"] - 1:
                row["val_loss"] = evaluate_loss(model, val, tok.pad_id, device)
            log.log(step, **row)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
        if (step + 1) % cfg["save_every"] == 0:
            save(step + 1)
        if cfg["stop_after"] and step + 1 >= cfg["stop_after"]:
            print(f"stopping after step {step + 1} as asked (--stop-after); --resume continues")
            save(step + 1)
            return

    metrics = dict(val_loss=evaluate_loss(model, val, tok.pad_id, device), params=model.num_params())
    if rank == 0 and cfg["eval_tasks"]:
        import evaluate
        model.eval()
        metrics.update(evaluate.quick_eval(model, tok, cfg["eval_tasks"], split="val", device=device))
    metrics["wall_s"] = time.time() - t0
    save(cfg["steps"], metrics)
    if rank == 0:
        print("sft: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)))


if __name__ == "__main__":
    main()
