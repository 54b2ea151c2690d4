"""Preparing big corpora: safe cuts, worker processes, and the same tokens as one piece would give."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest

from gptlab.data import load_tokens, plan_split, plan_tasks, prepare, read_meta, safe_cut
from gptlab.tokenizer import BPETokenizer, GPT2Tokenizer, load_tokenizer

quiet = dict(log=lambda *a: None)

# Whitespace runs, CRLF, tabs, Unicode spaces (NBSP, ideographic), text without spaces, emoji,
# contractions: the places where a careless cut changes GPT-2-style pre-tokens.
TRICKY = (
    "ROMEO:\n\n\nBut, soft!  what light\t\tthrough yonder window breaks?\r\n\r\n"
    "It is the east,\u00a0and Juliet is the sun.\u3000\n \n  \n"
    "明月几时有把酒问青天不知天上宫阙今夕是何年。\n"
    "🙂🙂 don't we'll they're 12345 67.89 ...!!! \n\n\n\n"
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare_text):
    """A folder of three files, mixing Shakespeare with tricky text."""
    folder = tmp_path_factory.mktemp("big") / "books"
    folder.mkdir()
    rng = random.Random(0)
    for n, start in enumerate((0, 20_000, 40_000)):
        parts = [shakespeare_text[start + i * 2000 : start + (i + 1) * 2000] + rng.choice(TRICKY.split("\n"))
                 for i in range(8)]
        (folder / f"{n}.txt").write_text("\n".join(parts) + TRICKY, encoding="utf-8")
    return folder


@pytest.mark.parametrize("spec", ["char", "gpt2", "bpe:300"])
def test_small_chunks_in_worker_processes_give_the_tokens_of_one_chunk(tmp_path, corpus, spec, monkeypatch):
    whole = prepare([str(corpus)], spec, tmp_path / "whole", workers=1, **quiet)
    monkeypatch.setattr("gptlab.data.CHUNK_BYTES", 1500)  # ~100 tasks, several per file, cut mid-line
    chunked = prepare([str(corpus)], spec, tmp_path / "chunked", workers=2, **quiet)
    for split in ("train", "val"):
        assert np.array_equal(load_tokens(whole, split), load_tokens(chunked, split)), split
    assert (whole / "tokenizer.json").read_text() == (chunked / "tokenizer.json").read_text()
    assert read_meta(whole)["train_tokens"] == read_meta(chunked)["train_tokens"]


def test_gpt2_tokens_are_those_of_the_whole_text(tmp_path, corpus, monkeypatch):
    monkeypatch.setattr("gptlab.data.CHUNK_BYTES", 1000)
    files = sorted(corpus.glob("*.txt"))
    out = prepare([str(files[0])], "gpt2", tmp_path / "d", val_fraction=0.5, workers=2, **quiet)
    text = files[0].read_bytes()
    (train_seg,), _ = plan_split([files[0]], 0.5)
    expected = GPT2Tokenizer.build().encode(text[: train_seg.end].decode("utf-8"))
    assert load_tokens(out, "train").tolist() == expected


def test_safe_cuts_never_change_tokens(tmp_path, shakespeare_text):
    """Random texts of whitespace-heavy pieces, cut at every safe place: the pieces encode as the whole."""
    rng = random.Random(7)
    alphabet = ["a", "bc", "Z", " ", "  ", "\n", "\n\n", "\t", "\r\n", "\u00a0", "\u3000", "'s", "'ll", "12",
                "!?", "é", "明月", "🙂", "-", "\x1c"]
    gpt2 = GPT2Tokenizer.build()
    bpe = BPETokenizer.train(iter([shakespeare_text[:50_000], TRICKY * 20]), 300)
    for trial in range(60):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(20, 400)))
        path = tmp_path / f"t{trial}.txt"
        path.write_bytes(text.encode("utf-8"))
        data = path.read_bytes()
        cuts, pos = [], 0
        with open(path, "rb") as f:
            while (pos := safe_cut(f, pos + 1, len(data), patience=len(data))) < len(data):
                cuts.append(pos)
        pieces = [data[a:b].decode("utf-8") for a, b in zip([0, *cuts], [*cuts, len(data)])]
        for tok in (gpt2, bpe):
            assert sum((tok.encode(p) for p in pieces), []) == tok.encode(text), (text, cuts)


def test_tasks_cover_the_split_exactly_once(corpus):
    files = sorted(corpus.glob("*.txt"))
    train, val = plan_split(files, 0.1)
    for segments in (train, val):
        tasks = plan_tasks(segments, 700)
        pieces = [piece for task in tasks for piece in task]
        for seg in segments:
            mine = [(s, e) for path, s, e, _ in pieces if path == str(seg.path)]
            assert mine[0][0] == seg.start and mine[-1][1] == seg.end
            assert all(a[1] == b[0] for a, b in zip(mine, mine[1:]))
        assert sum(flag for *_, flag in pieces) == len(segments) - 1  # end-of-text between files only
        assert all(sum(e - s for _, s, e, _ in task) < 2 * 700 for task in tasks[:-1])


def test_text_without_any_whitespace_is_still_cut(tmp_path):
    path = tmp_path / "dense.txt"
    path.write_text("é" * 50_000, encoding="utf-8")  # no space or newline anywhere
    (seg,), _ = plan_split([path], 0.1)
    tasks = plan_tasks([seg], 4096)
    assert len(tasks) > 10
    out = prepare([str(path)], "char", tmp_path / "d", workers=2, **quiet)
    assert load_tokenizer(out).decode(load_tokens(out, "train").tolist()) == "é" * (seg.end // 2)


def test_workers_flag_of_the_cli(tmp_path, small_corpus):
    code = subprocess.run([sys.executable, "-m", "gptlab", "prepare", str(small_corpus), "--out", str(tmp_path / "d"),
                           "--workers", "2"], capture_output=True, text=True, timeout=120)
    assert code.returncode == 0, code.stderr
    assert "(2 processes)" in code.stdout
    bad = subprocess.run([sys.executable, "-m", "gptlab", "prepare", str(small_corpus), "--workers", "-1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--workers" in bad.stderr
