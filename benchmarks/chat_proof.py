"""Proof that chat fine-tuning works: a base model trained on tiny Shakespeare, fine-tuned on generated conversations.

    python benchmarks/chat_proof.py                      # ~10 minutes on 2 cores: base 3 min, two fine-tunes 3 min each
    python benchmarks/chat_proof.py --base-time 30s --chat-time 30s --train 600 --held-out 60   # a quick look

1. Train a byte-level base model on tiny Shakespeare (`--base-time`).
2. Generate conversations (`gptlab.synthetic_chats`: arithmetic, word reversal, facts about a made-up
   world, multi-turn follow-ups), hold out `--held-out` whose arithmetic pairs and reversal words no
   training conversation uses.
3. Fine-tune the base on the rest twice: learning only the assistant's tokens (gptlab's default), and
   learning every token (`--chat-loss all`), each for `--chat-time`.
4. Score exact answers on the held-out conversations, greedy, each assistant turn given the true
   history before it: the base model (its weights, with the same chat template and marker rows as
   the fine-tuning starts from), and both fine-tuned models. Also the loss of each model on the
   held-out users' words: the assistant-only model never learned to write them.

Prints one table of accuracy per kind and the verdict. Everything is written in a temporary folder.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
BASE_SHAPE = ["--tokenizer", "byte", "--n-layer", "4", "--n-head", "4", "--n-embd", "128", "--block-size", "256",
              "--batch-size", "16", "--optimizer", "muon", "--lr", "3e-3", "--eval-interval", "500"]


def base_with_markers(run_dir: Path) -> Any:
    """The base run as a chat model before any fine-tuning: its weights, the markers' rows at their start values."""
    from dataclasses import replace

    from gptlab.chat import grow_vocab
    from gptlab.checkpoint import with_tied_head
    from gptlab.generation import TextModel
    from gptlab.model import build_model
    from gptlab.rundir import check_run
    from gptlab.tokenizer import chat_tokenizer

    files = check_run(run_dir)
    tokenizer = chat_tokenizer(files.tokenizer)
    from gptlab.checkpoint import read_weights

    tensors, _ = read_weights(files.weights)
    weights = grow_vocab(with_tied_head({k: v.float() for k, v in tensors.items()}, files.model_cfg),
                         tokenizer.vocab_size)
    model = build_model(replace(files.model_cfg, vocab_size=tokenizer.vocab_size))
    model.load_state_dict(weights)
    return TextModel(model, tokenizer)


def reply(tm: Any, messages: list[dict[str, str]], max_new_tokens: int = 40) -> str:
    """The greedy reply to `messages`."""
    return "".join(piece for _, piece, _ in tm.chat_events(messages, temperature=0.0, max_new_tokens=max_new_tokens))


def accuracy(tm: Any, conversations: list[dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """(correct, total) exact answers per kind of conversation, and over all ("all")."""
    from gptlab.synthetic_chats import kind_of, prompts_of, score

    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for conversation in conversations:
        replies = [reply(tm, prompt) for prompt in prompts_of(conversation)]
        right, total = score(conversation, replies)
        for key in (kind_of(conversation), "all"):
            counts[key][0] += right
            counts[key][1] += total
    return {k: (v[0], v[1]) for k, v in counts.items()}


def user_loss(tm: Any, conversations: list[dict[str, Any]]) -> float:
    """Mean loss on the users' words of `conversations` (what only a model that learned every token can predict)."""
    import torch
    from torch.nn import functional as F

    tokenizer, model = tm.tokenizer, tm.model
    total, count = 0.0, 0
    with torch.no_grad():
        for conversation in conversations:
            messages = conversation["messages"]
            ids, _ = tokenizer.conversation(messages)
            roles = [m["role"] for m in messages for _ in range(len(tokenizer.encode(m["content"])) + 2)]
            x = torch.tensor([ids[:-1]])
            logits = model(x)[0]
            losses = F.cross_entropy(logits.float(), torch.tensor(ids[1:]), reduction="none")
            # a target is a user's word when it lies inside a user message, between its marker and its <|end|>
            inside = [roles[i + 1] == "user" and ids[i + 1] not in tokenizer.marker_of for i in range(len(ids) - 1)]
            chosen = losses[torch.tensor(inside)]
            total, count = total + float(chosen.sum()), count + len(chosen)
    return total / max(count, 1)


def train(args: list[str]) -> None:
    from gptlab.cli import main

    code = main(["train", *args, "--quiet"])
    if code:
        raise SystemExit(f"gptlab train {' '.join(args)} failed ({code})")


def run(base_time: str, chat_time: str, n_train: int, n_held: int, seed: int, text: Path, folder: Path,
        say: Any = print, chat_settings: tuple[str, ...] = ("--optimizer", "muon", "--lr", "3e-3")) -> dict[str, Any]:
    """Build everything in `folder` and return the figures."""
    from gptlab import load
    from gptlab.synthetic_chats import make_conversations, split, write_jsonl

    os.chdir(folder)  # text and conversations given to `train` are prepared into ./data
    train_set, held = split(make_conversations(n_train + n_held, seed), n_held)
    write_jsonl(folder / "train.jsonl", train_set)
    say(f"{len(train_set):,} training conversations, {len(held):,} held out")
    started = time.monotonic()
    train([str(text), *BASE_SHAPE, "--time", base_time, "--out", str(folder / "base")])
    say(f"base trained ({time.monotonic() - started:.0f} s)")
    chat_flags = ["--init-from", str(folder / "base"), "--chat", str(folder / "train.jsonl"), "--time", chat_time,
                  *chat_settings, "--batch-size", "16", "--eval-interval", "100", "--seed", str(seed)]
    train([*chat_flags, "--out", str(folder / "chat")])
    train([*chat_flags, "--chat-loss", "all", "--out", str(folder / "chat-all")])
    say("fine-tuned twice")
    models = {"base, same template": base_with_markers(folder / "base"),
              "fine-tuned (assistant tokens)": load(folder / "chat"),
              "fine-tuned (every token)": load(folder / "chat-all")}
    return {name: {"accuracy": accuracy(tm, held), "user_loss": user_loss(tm, held)} for name, tm in models.items()}


def table(figures: dict[str, Any]) -> str:
    from gptlab.synthetic_chats import KINDS

    kinds = [k for k in ("all", *KINDS) if any(k in f["accuracy"] for f in figures.values())]
    lines = ["| model | " + " | ".join(kinds) + " | loss on users' words |",
             "|---|" + "---|" * (len(kinds) + 1)]
    for name, f in figures.items():
        cells = []
        for k in kinds:
            right, total = f["accuracy"].get(k, (0, 0))
            cells.append(f"{right / total:.0%} ({right}/{total})" if total else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {f['user_loss']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-time", default="3m", help="the base model's training budget (default: 3m)")
    parser.add_argument("--chat-time", default="3m", help="each fine-tuning's budget (default: 3m)")
    parser.add_argument("--train", type=int, default=2000, help="training conversations (default: 2000)")
    parser.add_argument("--held-out", type=int, default=200, help="held-out conversations scored (default: 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text", type=Path, default=None, help="base training text (default: tiny Shakespeare)")
    args = parser.parse_args(argv)
    text = args.text or (SHAKESPEARE if SHAKESPEARE.is_file() else None)
    if text is None:
        from gptlab.data import fetch_named_dataset

        text = fetch_named_dataset("shakespeare")
    with tempfile.TemporaryDirectory(prefix="gptlab-chat-proof-") as tmp:
        figures = run(args.base_time, args.chat_time, args.train, args.held_out, args.seed, Path(text).resolve(),
                      Path(tmp))
    print()
    print(table(figures))
    base = figures["base, same template"]["accuracy"]["all"]
    tuned = figures["fine-tuned (assistant tokens)"]["accuracy"]["all"]
    every = figures["fine-tuned (every token)"]["accuracy"]["all"]
    print(f"\nexact answers on {base[1]} held-out turns: base {base[0] / base[1]:.0%}, fine-tuned "
          f"{tuned[0] / tuned[1]:.0%} (learning only the assistant's tokens), {every[0] / every[1]:.0%} (every token)")
    return 0 if tuned[0] > base[0] and not math.isnan(tuned[0]) else 1


if __name__ == "__main__":
    sys.exit(main())
