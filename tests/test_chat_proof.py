"""Chat fine-tuning makes a base model answer: `benchmarks/chat_proof.py` in miniature.

A byte-level base trained briefly on tiny Shakespeare is fine-tuned on generated conversations; on
held-out conversations (arithmetic pairs and reversal words no training conversation uses; facts of
the made-up world) the fine-tuned model answers exactly where the base model, given the same
template, answers nothing. Trained again with the mask off (learning every token), the model learns
to write the users' questions too, which the masked model never does: its loss on the users' words
stays high.
"""

from __future__ import annotations

import pytest
from benchmarks.chat_proof import BASE_SHAPE, accuracy, base_with_markers, train, user_loss

pytestmark = pytest.mark.slow


def test_fine_tuning_makes_the_base_model_answer(tmp_path, shakespeare_text, monkeypatch):
    from gptlab import load
    from gptlab.synthetic_chats import make_conversations, split, write_jsonl

    monkeypatch.chdir(tmp_path)
    train_set, held = split(make_conversations(1550, seed=0), 50)
    write_jsonl(tmp_path / "train.jsonl", train_set)
    shape = [a if a != "256" else "192" for a in BASE_SHAPE]  # a context of 192 bytes holds every conversation
    (tmp_path / "shakespeare.txt").write_text(shakespeare_text, encoding="utf-8")
    train(["shakespeare.txt", *shape, "--time", "20s", "--out", str(tmp_path / "base")])
    chat = ["--init-from", str(tmp_path / "base"), "--chat", str(tmp_path / "train.jsonl"), "--optimizer", "muon",
            "--lr", "3e-3", "--batch-size", "16", "--eval-interval", "40", "--eval-iters", "10", "--num-samples", "0"]
    train([*chat, "--time", "40s", "--out", str(tmp_path / "chat")])
    train([*chat, "--time", "15s", "--chat-loss", "all", "--out", str(tmp_path / "chat-all")])

    base, tuned, every = base_with_markers(tmp_path / "base"), load(tmp_path / "chat"), load(tmp_path / "chat-all")
    base_right, total = accuracy(base, held)["all"]
    tuned_right, _ = accuracy(tuned, held)["all"]
    print(f"exact answers on {total} held-out turns: base {base_right}, fine-tuned {tuned_right}")
    assert tuned_right >= base_right + 0.1 * total
    masked, unmasked = user_loss(tuned, held), user_loss(every, held)
    print(f"loss on the users' words: assistant-only {masked:.2f}, every token {unmasked:.2f}")
    assert masked > unmasked + 1.0
