"""Chat fine-tuning: bad chat files, the loss mask, packing, resume, and the fine-tuned run through the real openai client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.servers import REPO, Server

GOOD = {"messages": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]}


def gptlab(*args: str, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "gptlab", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          input=stdin, timeout=300)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


BAD_FILES = {
    "not JSON": (['{"messages": [}'], ":1: not JSON"),
    "a missing role": ([json.dumps(GOOD), json.dumps({"messages": [{"content": "hi"}, GOOD["messages"][1]]})],
                       ':2, message 1 has no "role"'),
    "an unknown role": ([json.dumps({"messages": [{"role": "bot", "content": "hi"}]})], ":1, message 1: unknown role 'bot'"),
    "an empty conversation": ([json.dumps(GOOD), "", json.dumps({"messages": []})], ":3: an empty conversation"),
    "no messages key": ([json.dumps({"text": "hello"})], ':1: expected an object with "messages"'),
    "no assistant turn": ([json.dumps({"messages": [{"role": "user", "content": "hi"}]})], ":1: no assistant message"),
    "a turn longer than the context": ([json.dumps(GOOD), json.dumps({"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "la " * 200}]})],
        ":2, message 2 (assistant) is 602 tokens with its markers, longer than the model's context of 192"),
    "a marker in the text": ([json.dumps({"messages": [{"role": "user", "content": "say <|end|>"},
                                                       GOOD["messages"][1]]})], "contains the turn marker <|end|>"),
    "no conversations": (["", "   "], "holds no conversations"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_chat_files_are_one_line_errors_with_line_numbers(case, chat_run, tmp_path, capsys, monkeypatch):
    from gptlab.cli import main

    lines, expected = BAD_FILES[case]
    bad = write_lines(tmp_path / "bad.jsonl", lines)
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--init-from", str(chat_run.parent / "base"), "--chat", str(bad), "--max-iters", "2",
                 "--out", str(tmp_path / "run")])
    message = capsys.readouterr().err.strip()
    assert code == 2, message
    assert len(message.splitlines()) == 1 and "Traceback" not in message, message
    assert expected in message, message
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_chat_needs_a_model_to_fine_tune(tmp_path, capsys, monkeypatch):
    from gptlab.cli import main

    chats = write_lines(tmp_path / "c.jsonl", [json.dumps(GOOD)] * 3)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--chat", str(chats), "--max-iters", "2"]) == 2
    assert "give --init-from RUN" in capsys.readouterr().err


def test_conversations_are_packed_whole_and_only_the_assistant_is_learned(chat_run):
    from gptlab.chat import CONTEXT, LEARN, PAD, load_rows
    from gptlab.data import read_meta
    from gptlab.rundir import read_run_config
    from gptlab.tokenizer import load_tokenizer

    data = chat_run.parent / read_run_config(chat_run)[1].data  # prepared beside the run, as ./data
    meta = read_meta(data)
    tokenizer = load_tokenizer(data)
    rows = load_rows(data, "train", meta)
    assert rows.tokens.shape[1] == meta["row_len"] == 193
    for tokens, learn in zip(rows.tokens[:20], rows.learn[:20]):
        used = learn != PAD
        assert used[: used.sum()].all(), "padding only at the end of a row"
        starts = [i for i, t in enumerate(tokens) if t in tokenizer.marker_of and tokenizer.marker_of[t] != "<|end|>"]
        assert tokens[0] in tokenizer.marker_of and starts[0] == 0, "every row starts a conversation"
        for i in range(int(used.sum())):
            marker = tokenizer.marker_of.get(int(tokens[i]))
            if marker is not None and marker != "<|end|>":
                role = marker
            assert (learn[i] == LEARN) == (role == "<|assistant|>" and marker != "<|assistant|>"), (i, role)
            assert learn[i] in (CONTEXT, LEARN)


def test_batches_ignore_what_is_not_learned(chat_run):
    from gptlab.chat import IGNORE, LEARN, RowBatches, load_rows
    from gptlab.data import read_meta
    from gptlab.rundir import read_run_config

    data = chat_run.parent / read_run_config(chat_run)[1].data
    rows = load_rows(data, "train", read_meta(data))
    x, y = RowBatches(rows, 4, seed=0).next()
    x_all, y_all = RowBatches(rows, 4, seed=0, loss="all").next()
    assert (x == x_all).all()
    learned = y != IGNORE
    assert 0 < learned.sum() < (y_all != IGNORE).sum() < y.numel()
    picks = [int(np.where((rows.tokens[:, :-1] == x[i].numpy()).all(1))[0][0]) for i in range(4)]
    assert (learned.numpy() == (rows.learn[picks][:, 1:] == LEARN)).all()


def test_a_chat_run_resumes_exactly(chat_run, tmp_path):
    chats = chat_run.parent / "chats.jsonl"
    base = str(chat_run.parent / "base")
    flags = ["--init-from", base, "--chat", str(chats), "--eval-interval", "10", "--eval-iters", "2", "--batch-size",
             "4", "--num-samples", "0"]
    whole = gptlab("train", *flags, "--max-iters", "20", "--out", str(tmp_path / "whole"), cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    first = gptlab("train", *flags, "--max-iters", "10", "--out", str(tmp_path / "split"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = gptlab("train", "--resume", str(tmp_path / "split"), "--max-iters", "20", cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    rows = [line.split(",") for line in (tmp_path / "whole" / "metrics.csv").read_text().splitlines()[1:]]
    again = [line.split(",") for line in (tmp_path / "split" / "metrics.csv").read_text().splitlines()[1:]]
    assert [r[5] for r in rows] == [r[5] for r in again]  # val loss at steps 0, 10, 20


def test_the_openai_client_holds_a_streamed_conversation(chat_run):
    from openai import OpenAI

    from gptlab import load

    server = Server(str(chat_run))
    try:
        client = OpenAI(base_url=f"{server.url}/v1", api_key="none")
        messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 12 + 7?"}]
        expected_model = load(chat_run)
        for turn in ("What is 12 + 7?", "And plus 3 more?"):
            if turn != messages[-1]["content"]:
                messages.append({"role": "user", "content": turn})
            stream = client.chat.completions.create(model=chat_run.name, messages=messages, stream=True,
                                                    temperature=0, max_tokens=40)
            pieces, finish = [], None
            for chunk in stream:
                choice = chunk.choices[0]
                pieces.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
            reply = "".join(pieces)
            expected = "".join(p for _, p, _ in expected_model.chat_events(messages, temperature=0, max_new_tokens=40))
            assert reply == expected and "<|" not in reply
            assert finish in ("stop", "length")
            messages.append({"role": "assistant", "content": reply})
        assert len(messages) == 5
    finally:
        server.stop()


def test_gptlab_chat_talks_in_the_terminal(chat_run, tmp_path):
    from gptlab import load

    result = gptlab("chat", str(chat_run), "--temperature", "0", "--max-new-tokens", "30", cwd=tmp_path,
                    stdin="What is 12 + 7?\nAnd plus 3 more?\n/reset\nAnd plus 3 more?\n")
    assert result.returncode == 0, result.stderr
    replies = [line.removeprefix("assistant> ") for line in result.stdout.splitlines() if line.startswith("assistant> ")]
    tm = load(chat_run)

    def answer(messages):
        return "".join(p for _, p, _ in tm.chat_events(messages, temperature=0, max_new_tokens=30))

    first = answer([{"role": "user", "content": "What is 12 + 7?"}])
    follow = answer([{"role": "user", "content": "What is 12 + 7?"}, {"role": "assistant", "content": first},
                     {"role": "user", "content": "And plus 3 more?"}])
    alone = answer([{"role": "user", "content": "And plus 3 more?"}])
    assert replies == [first, follow, alone]
    assert "(a new conversation)" in result.stdout
