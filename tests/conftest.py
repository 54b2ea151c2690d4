"""Shared fixtures: the tiny Shakespeare corpus from ../shared/data, offline, and tiny runs."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SHAKESPEARE = SHARED_DATA / "tinyshakespeare.txt"

# Tiny model settings used across tests: trains in well under a second per few steps on a CPU.
TINY_MODEL = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.0)


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _offline_env(tmp_path_factory, monkeypatch):
    """Every test finds tiny Shakespeare locally and caches into a temporary GPTLAB_HOME."""
    if "GPTLAB_DATA_MIRROR" not in os.environ and SHARED_DATA.is_dir():
        monkeypatch.setenv("GPTLAB_DATA_MIRROR", str(SHARED_DATA))
    monkeypatch.setenv("GPTLAB_HOME", str(tmp_path_factory.getbasetemp() / "gptlab_home"))
    # The same precision on every CPU, so figures and exact comparisons do not depend on the machine;
    # tests/test_cpu_precision.py forces it both ways and measures it.
    monkeypatch.setenv("GPTLAB_CPU_BF16", "0")
    # Fixed thread counts: float32 sums depend on them, and exact-resume tests compare bit for bit on
    # a machine other tests keep busy. tests/test_cores.py turns the adaptation on where it tests it.
    monkeypatch.setenv("GPTLAB_ADAPT_THREADS", "0")


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    if not SHAKESPEARE.is_file():
        pytest.skip("tiny Shakespeare not found beside the repo (../shared/data)")
    return SHAKESPEARE.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory, shakespeare_text) -> Path:
    """The first 100 KB of tiny Shakespeare as a file."""
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text(shakespeare_text[:100_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def char_data(tmp_path_factory, small_corpus) -> Path:
    """A prepared char-level data folder of the small corpus."""
    from gptlab.data import prepare

    out = tmp_path_factory.mktemp("data") / "small-char"
    prepare([str(small_corpus)], tokenizer="char", out=out, log=lambda *a: None)
    return out


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, char_data) -> Path:
    """A finished tiny training run (a few dozen steps)."""
    from gptlab.config import resolve_config
    from gptlab.train import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    model_cfg, cfg = resolve_config(overrides=dict(
        **TINY_MODEL, data=str(char_data), out=str(out), batch_size=8, max_iters=30, eval_interval=10,
        eval_iters=2, num_samples=2, sample_tokens=40, warmup_iters=5, learning_rate=3e-3,
    ))
    train(model_cfg, cfg, quiet=True)
    return out


@pytest.fixture
def copy_run(tmp_path, tiny_run):
    """A private copy of the tiny run that a test may modify."""
    def _copy() -> Path:
        dst = tmp_path / "run"
        shutil.copytree(tiny_run, dst)
        return dst
    return _copy


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and a second one stalls when the other core is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def chat_run(tmp_path_factory, small_corpus) -> Path:
    """A tiny byte-level run fine-tuned for chat on synthetic conversations (a few dozen steps each)."""
    from gptlab.cli import main
    from gptlab.synthetic_chats import make_conversations, write_jsonl

    root = tmp_path_factory.mktemp("chat")
    chats = root / "chats.jsonl"
    write_jsonl(chats, make_conversations(300, seed=0))
    small = ["--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "192", "--batch-size", "8",
             "--eval-iters", "2", "--eval-interval", "20", "--num-samples", "1", "--sample-tokens", "20", "--quiet"]
    cwd = os.getcwd()
    os.chdir(root)  # text and chats given to `train` are prepared into ./data
    try:
        assert main(["train", str(small_corpus), "--tokenizer", "byte", "--max-iters", "40", *small,
                     "--out", str(root / "base")]) == 0
        assert main(["train", "--init-from", str(root / "base"), "--chat", str(chats), "--max-iters", "40",
                     "--eval-interval", "20", "--eval-iters", "2", "--batch-size", "8", "--num-samples", "1",
                     "--sample-tokens", "20", "--quiet", "--out", str(root / "chat")]) == 0
    finally:
        os.chdir(cwd)
    return root / "chat"


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium the browser tests drive (a failure that says how to get one when there is none)."""
    from tests.servers import find_chromium

    path = find_chromium()
    if path is None:
        pytest.fail("no Chromium found for the browser test: install it with `apt-get install chromium` "
                    "(`make test` does this when run as root), or set GPTLAB_CHROMIUM=/path/to/chromium")
    return path
