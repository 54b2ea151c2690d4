"""Data: text files -> token files on disk -> batches, and the named dataset cache."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from gptlab.data import (
    RandomBatches,
    SlidingBatches,
    fetch_named_dataset,
    load_tokens,
    prepare,
    read_meta,
)
from gptlab.tokenizer import load_tokenizer

quiet = dict(log=lambda *a: None)


def decode_split(folder, split):
    tok = load_tokenizer(folder)
    return tok.decode(load_tokens(folder, split).tolist())


def test_split_is_by_position_and_loses_nothing(tmp_path, small_corpus):
    out = prepare([str(small_corpus)], "char", tmp_path / "d", val_fraction=0.1, **quiet)
    text = small_corpus.read_text(encoding="utf-8")
    train, val = decode_split(out, "train"), decode_split(out, "val")
    assert train + val == text  # nothing lost, nothing duplicated
    assert val == text[len(train):]  # validation is the end of the text
    assert len(val) == len(text) - int(len(text.encode()) * 0.9)
    meta = read_meta(out)
    assert meta["dtype"] == "uint16"
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val)
    assert meta["sources"][0]["sha256"] == hashlib.sha256(small_corpus.read_bytes()).hexdigest()
    assert isinstance(load_tokens(out, "train"), np.memmap)


def test_val_fraction_is_configurable(tmp_path, small_corpus):
    out = prepare([str(small_corpus)], "char", tmp_path / "d", val_fraction=0.25, **quiet)
    meta = read_meta(out)
    assert meta["val_tokens"] / (meta["train_tokens"] + meta["val_tokens"]) == pytest.approx(0.25, abs=1e-3)


def test_streaming_in_small_chunks_gives_the_same_tokens(tmp_path, small_corpus, monkeypatch):
    a = prepare([str(small_corpus)], "char", tmp_path / "a", **quiet)
    monkeypatch.setattr("gptlab.data.CHUNK_BYTES", 997)  # forces hundreds of chunks, cut mid-line
    b = prepare([str(small_corpus)], "char", tmp_path / "b", **quiet)
    assert np.array_equal(load_tokens(a, "train"), load_tokens(b, "train"))
    assert np.array_equal(load_tokens(a, "val"), load_tokens(b, "val"))


def test_multibyte_text_splits_at_a_character_boundary(tmp_path):
    path = tmp_path / "u.txt"
    path.write_text("é" * 1001 + "ü🙂" * 333, encoding="utf-8")
    out = prepare([str(path)], "char", tmp_path / "d", val_fraction=0.1, **quiet)
    assert decode_split(out, "train") + decode_split(out, "val") == path.read_text(encoding="utf-8")


def test_folder_of_files_is_read_in_sorted_order_with_eot_between_files(tmp_path, shakespeare_text):
    folder = tmp_path / "books"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text(shakespeare_text[:30_000], encoding="utf-8")
    (folder / "sub" / "c.txt").write_text(shakespeare_text[30_000:60_000], encoding="utf-8")
    (folder / "a.txt").write_text(shakespeare_text[60_000:90_000], encoding="utf-8")
    (folder / "ignored.md").write_text("not text for training")
    out = prepare([str(folder)], "gpt2", tmp_path / "d", **quiet)
    meta = read_meta(out)
    assert [s["path"].rsplit("/", 1)[-1] for s in meta["sources"]] == ["a.txt", "b.txt", "c.txt"]
    train = load_tokens(out, "train")
    assert int((np.asarray(train) == 50256).sum()) == 2  # a|b and b|c boundaries; c is split with val
    assert meta["vocab_size"] == 50257 and meta["dtype"] == "uint16"


def test_several_files_as_arguments(tmp_path, shakespeare_text):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(shakespeare_text[:20_000], encoding="utf-8")
    b.write_text(shakespeare_text[20_000:40_000], encoding="utf-8")
    out = prepare([str(a), str(b)], "char", tmp_path / "d", **quiet)
    assert decode_split(out, "train") + decode_split(out, "val") == shakespeare_text[:40_000]


def test_huge_vocabulary_switches_to_uint32(tmp_path):
    chars = [chr(c) for c in range(0x100, 0x100 + 72_000) if not 0xD800 <= c <= 0xDFFF]
    path = tmp_path / "wide.txt"
    path.write_text("".join(chars) * 2, encoding="utf-8")
    out = prepare([str(path)], "char", tmp_path / "d", **quiet)
    meta = read_meta(out)
    assert meta["vocab_size"] > 65536 and meta["dtype"] == "uint32"
    assert decode_split(out, "train") + decode_split(out, "val") == path.read_text(encoding="utf-8")


def test_trained_bpe_data_folder(tmp_path, small_corpus):
    out = prepare([str(small_corpus)], "bpe:400", tmp_path / "d", **quiet)
    meta = read_meta(out)
    assert meta["vocab_size"] == 400 and meta["tokenizer"] == "bpe:400"
    assert decode_split(out, "train") + decode_split(out, "val") == small_corpus.read_text(encoding="utf-8")


def test_named_dataset_from_mirror_then_cache(tmp_path, monkeypatch):
    path = fetch_named_dataset("shakespeare")
    assert path.stat().st_size == 1_115_394
    # Without a mirror, a verified copy in the cache is used and the network is never touched.
    home = tmp_path / "home"
    (home / "datasets").mkdir(parents=True)
    shutil.copy(path, home / "datasets" / "tinyshakespeare.txt")
    monkeypatch.delenv("GPTLAB_DATA_MIRROR", raising=False)
    monkeypatch.setenv("GPTLAB_HOME", str(home))
    assert fetch_named_dataset("shakespeare") == home / "datasets" / "tinyshakespeare.txt"


def test_prepare_named_dataset_default_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = prepare(["shakespeare"], "char", **quiet)
    assert out.as_posix() == "data/shakespeare-char"
    meta = read_meta(out)
    assert meta["vocab_size"] == 65
    assert meta["train_tokens"] == 1_003_854 and meta["val_tokens"] == 111_540  # nanoGPT's split
    assert json.loads((out / "tokenizer.json").read_text())["type"] == "char"


def test_random_batches_are_next_token_windows_and_resume_exactly(char_data):
    tokens = load_tokens(char_data, "train")
    a = RandomBatches(tokens, block_size=16, batch_size=4, seed=3)
    x, y = a.next()
    assert x.shape == y.shape == (4, 16)
    assert (x[:, 1:] == y[:, :-1]).all()
    state = a.state_dict()
    expected = [a.next() for _ in range(3)]
    b = RandomBatches(tokens, block_size=16, batch_size=4, seed=999)
    b.load_state_dict(state)
    for (ex, ey), (gx, gy) in zip(expected, [b.next() for _ in range(3)]):
        assert (ex == gx).all() and (ey == gy).all()


def test_sliding_batches_visit_every_window_once_per_epoch(char_data):
    tokens = load_tokens(char_data, "train")
    s = SlidingBatches(tokens, block_size=32, batch_size=7, seed=1, stride=32)
    n = s.windows_per_epoch()
    assert n == len(range(0, len(tokens) - 32, 32))
    seen = []
    while s.epoch_index == 0:
        x, _ = s.next()
        seen.extend(x[:, 0].tolist())
    starts = set(range(0, len(tokens) - 32, 32))
    first_tokens = [int(tokens[i]) for i in sorted(starts)]
    assert sorted(seen[:n]) == sorted(first_tokens)
    state = s.state_dict()
    expected = s.next()
    again = SlidingBatches(tokens, block_size=32, batch_size=7, seed=1, stride=32)
    again.load_state_dict(state)
    assert (again.next()[0] == expected[0]).all()
