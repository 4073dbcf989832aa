"""Talk to any checkpoint in the terminal.

    python chat.py out/rlvr.pt [--temperature 0.7] [--max-new 128]

Tokens are printed as they are sampled; calculator calls are executed by the safe evaluator
and shown. Commands: /reset (forget the conversation), /temp X (sampling temperature),
/quit. Ctrl-D or Ctrl-C leaves.
"""
import argparse
import sys

import torch

from data import calculator_tool, render_chat, response_messages
from model import CheckpointError, load_checkpoint, sample_token


@torch.no_grad()
def stream_reply(model, tok, messages, temperature, max_new, write):
    """Sample the assistant's reply token by token, executing tool calls as they come.
    Returns the reply as messages (assistant, and tool/assistant pairs after each call).

    A chat turn is one prompt, so this re-runs the model over the whole prefix each token:
    simple and plenty fast for one conversation (the batched KV-cache sampler is model.generate).
    """
    ids = render_chat(tok, messages, for_generation=True)[0]
    trigger, tool_fn = calculator_tool(tok)
    start, reply = len(ids), []
    for _ in range(max_new):
        logits = model.logits(torch.tensor([ids[-model.config.block_size:]]))[:, -1].float()
        nxt = int(sample_token(logits, temperature, 0, 1.0)[0])
        ids.append(nxt)
        if nxt == tok.end_id:
            break
        if nxt == trigger:
            forced = tool_fn(ids[start:])
            result = tok.decode(forced[1:-2])
            write(f"\n  [calculator -> {result}]\n")
            ids += forced
            continue
        write(tok.decode([nxt]))
    text = tok.decode(ids[start:])
    return response_messages(text.replace("<|end|>", "") if text.endswith("<|end|>") else text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--system", default=None, help="an optional system message")
    args = ap.parse_args(argv)
    try:
        ckpt = load_checkpoint(args.checkpoint)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    model, tok = ckpt["model"], ckpt["tokenizer"]
    base = [{"role": "system", "content": args.system}] if args.system else []
    messages, temperature = list(base), args.temperature
    write = lambda s: (sys.stdout.write(s), sys.stdout.flush())
    print(f"chatting with {args.checkpoint} (stage {ckpt['stage']}); /reset, /temp X, /quit; Ctrl-D to leave")
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            break
        line = line.strip()
        if not line:
            continue
        if line == "/quit":
            break
        if line == "/reset":
            messages = list(base)
            print("(conversation cleared)")
            continue
        if line.startswith("/temp"):
            try:
                temperature = float(line.split()[1])
                print(f"(temperature {temperature})")
            except (IndexError, ValueError):
                print("usage: /temp 0.7")
            continue
        messages.append({"role": "user", "content": line})
        write("bot> ")
        try:
            messages += stream_reply(model, tok, messages, temperature, args.max_new, write)
        except KeyboardInterrupt:
            messages.pop()
            write(" [interrupted]")
        print()


if __name__ == "__main__":
    main()
