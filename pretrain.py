"""Pretrain the base model: train the tokenizer, then next-token prediction on the corpus.

Nothing can be downloaded, so the seed of the pipeline is a base model made here from the
built-in world's plain-text corpus (worked arithmetic, code, Q&A). It knows the material but
not the chat format: that is SFT's job.

Positions are rotary (`--pos-embedding rope`) rather than GPT-2's learned table: a column of a
worked sum needs "the digits 3 and 5 tokens back" wherever the column sits, and a 4x128 model
with learned positions learns that lookup slowly (the ~400 column facts at varying offsets:
4-16% right after 400 steps, loss 0.57), while with rotary positions, whose attention scores
depend only on the distance, the same run reaches the loss of facts at a fixed offset (0.07).
`--pos-embedding learned` keeps the GPT-2 architecture exactly (and its Hugging Face export).

    python pretrain.py [--preset tiny|cpu|gpu] [--data corpus.txt|corpus.jsonl] [--out out/base.pt]
"""
import os
import time

import torch
from tqdm import tqdm

import tasks
from common import (MetricLog, Throughput, all_reduce_sum, autocast, fail, lr_at, make_optimizer, parse_config,
                    set_lr, setup)
from data import DataError, Tokenizer, read_jsonl
from model import GPT, GPTConfig, load_checkpoint, save_checkpoint, sequence_logprobs

DEFAULTS = dict(
    out="out/base.pt", data=None, tokenizer="bpe", vocab_size=1024, n_docs=6000,
    n_layer=4, n_head=4, n_embd=128, block_size=256, dropout=0.0, pos_embedding="rope",
    seq_len=128, batch_size=64, grad_accum=1, steps=200, lr=1e-3, warmup=30, weight_decay=0.1,
    grad_clip=1.0, eval_every=100, save_every=100, stop_after=0, resume=False,
    seed=0, device="auto", dtype="bf16", compile=False,
)
PRESETS = dict(
    tiny=dict(n_docs=150, vocab_size=384, n_layer=2, n_head=2, n_embd=32, block_size=128, seq_len=64,
              batch_size=8, steps=12, eval_every=6, save_every=6),
    cpu=dict(),
    gpu=dict(n_docs=100000, vocab_size=4096, n_layer=12, n_head=12, n_embd=768, block_size=512,
             seq_len=512, batch_size=64, steps=5000, lr=6e-4, warmup=200, eval_every=500, save_every=1000),
)


def load_texts(cfg):
    """The corpus documents: --data (.txt, or .jsonl of {"text": ...}) or the built-in world."""
    path = cfg["data"]
    if path is None:
        return tasks.pretrain_corpus(cfg["n_docs"], seed=cfg["seed"])
    if not os.path.exists(path):
        fail(f"{path}: no such file")
    if path.endswith(".jsonl"):
        return [r["text"] for r in read_jsonl(path, "text")]
    with open(path, encoding="utf-8") as f:
        return [doc for doc in f.read().split("\n\n") if doc.strip()]


def token_stream(tok, docs):
    """All documents as one stream of ids, each document opened by <|bos|>."""
    ids = []
    for doc in docs:
        ids.append(tok.bos_id)
        ids += tok.encode(doc)
    return torch.tensor(ids, dtype=torch.long)


def get_batch(stream, step, cfg, rank, world):
    """Random windows of seq_len+1 tokens. Seeded by the step, so a resumed run sees exactly
    the batches the uninterrupted one would have; each rank takes its slice of the global batch."""
    g = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - cfg["seq_len"] - 1, (cfg["batch_size"],), generator=g)
    starts = starts[rank::world]
    return torch.stack([stream[s:s + cfg["seq_len"] + 1] for s in starts])


def batch_loss(model, batch):
    return -sequence_logprobs(model, batch).mean()


@torch.no_grad()
def evaluate_loss(model, stream, cfg, n_batches=4):
    model.eval()
    losses = [batch_loss(model, get_batch(stream, -1 - i, cfg, 0, 1)).item() for i in range(n_batches)]
    model.train()
    return sum(losses) / len(losses)


def main(argv=None):
    cfg = parse_config(DEFAULTS, PRESETS, argv, description=__doc__)
    device, rank, world = setup(cfg)
    t0 = time.time()
    try:
        docs = load_texts(cfg)
    except DataError as e:
        fail(str(e))
    split = max(1, len(docs) // 20)  # hold out 5% of documents for the val loss
    val_docs, train_docs = docs[:split], docs[split:]

    start_step, resume_ckpt = 0, None
    if cfg["resume"] and os.path.exists(cfg["out"]):
        resume_ckpt = load_checkpoint(cfg["out"])
        tok, start_step = resume_ckpt["tokenizer"], resume_ckpt["step"] or 0
    elif cfg["tokenizer"] == "gpt2":
        tok = Tokenizer.gpt2()
    else:
        tok = Tokenizer.train(train_docs, cfg["vocab_size"])
    train_stream, val_stream = token_stream(tok, train_docs), token_stream(tok, val_docs)

    mcfg = GPTConfig(vocab_size=tok.vocab_size, block_size=cfg["block_size"], n_layer=cfg["n_layer"],
                     n_head=cfg["n_head"], n_embd=cfg["n_embd"], dropout=cfg["dropout"],
                     pos_embedding=cfg["pos_embedding"])
    try:
        model = (resume_ckpt["model"] if resume_ckpt else GPT(mcfg)).to(device).train()
    except ValueError as e:
        fail(f"--pos-embedding / model shape: {e}")
    opt = make_optimizer(model, cfg["lr"], cfg["weight_decay"], device=device)
    if resume_ckpt and resume_ckpt["optimizer"]:
        opt.load_state_dict(resume_ckpt["optimizer"])
    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(model)
    if cfg["compile"]:
        train_model = torch.compile(train_model)

    log = MetricLog(cfg["out"], "pretrain", enabled=rank == 0, resume=resume_ckpt is not None)
    if rank == 0:
        print(f"pretrain: {model.num_params() / 1e6:.2f}M params, vocab {tok.vocab_size}, "
              f"{len(train_stream) / 1e6:.2f}M train tokens, device {device}")

    def save(step, metrics=None):
        if rank == 0:
            save_checkpoint(cfg["out"], model, tok, "pretrain", parent=None, config=cfg,
                            metrics=metrics, optimizer=opt, step=step)

    speed = Throughput(model)
    bar = tqdm(range(start_step, cfg["steps"]), disable=rank != 0, desc="pretrain")
    for step in bar:
        set_lr(opt, lr_at(step, cfg["steps"], cfg["lr"], cfg["warmup"]))
        batch = get_batch(train_stream, step, cfg, rank, world).to(device)
        n_tokens = all_reduce_sum(torch.tensor(float(batch[:, 1:].numel()), device=device))
        for micro in batch.chunk(cfg["grad_accum"]):
            with autocast(device, cfg["dtype"]):
                # sum / global token count (x world: DDP averages grads) = the global mean
                loss = -sequence_logprobs(train_model, micro).sum() * world / n_tokens
            loss.backward()
            speed.add(micro[:, 1:].numel(), micro.shape[1] - 1)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == cfg["steps"] - 1:
            train_loss = all_reduce_sum(loss.detach() * cfg["grad_accum"]) / world  # last micro's mean
            row = dict(loss=train_loss.item(), grad_norm=norm.item(), lr=opt.param_groups[0]["lr"],
                       **speed.read())
            if (step + 1) % cfg["eval_every"] == 0 or step == cfg["steps"] - 1:
                row["val_loss"] = evaluate_loss(model, val_stream.to(device), cfg)
            log.log(step, **row)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
        if (step + 1) % cfg["save_every"] == 0:
            save(step + 1)
        if cfg["stop_after"] and step + 1 >= cfg["stop_after"]:
            print(f"stopping after step {step + 1} as asked (--stop-after); --resume continues")
            save(step + 1)
            return
    metrics = dict(val_loss=evaluate_loss(model, val_stream.to(device), cfg), wall_s=time.time() - t0,
                   params=model.num_params())
    save(cfg["steps"], metrics)
    if rank == 0:
        print(f"pretrain: val loss {metrics['val_loss']:.3f}, {metrics['wall_s']:.0f}s -> {cfg['out']}")


if __name__ == "__main__":
    main()
