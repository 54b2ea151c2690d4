"""Continuous batching: requests decoded together give what each gives alone, join and leave mid-batch, and free their rows.

A real model (GPT-2 and Llama blocks, random weights) decodes every request both ways: alone through
`Engine` (the batch-1 path `gptlab sample` uses) and together through `BatchEngine` (what the server
uses). Seeded requests must give the same ids token for token, whatever they share a batch with.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from gptlab.batching import BatchEngine
from gptlab.config import ModelConfig, SampleConfig
from gptlab.engine import Engine
from gptlab.model import build_model

# Different settings in one batch: temperature, top-k, top-p with min-p, greedy with a repetition
# penalty, several samples of one prompt, prompts of different lengths, and runs past the context
# (block 32) so windows slide while others decode.
REQUESTS = [
    ([1, 2, 3], SampleConfig(max_new_tokens=60, seed=1, temperature=0.9)),
    ([5] * 10, SampleConfig(max_new_tokens=40, seed=2, top_k=5, num_samples=3)),
    ([7, 8], SampleConfig(max_new_tokens=50, seed=3, temperature=0, repetition_penalty=1.3)),
    ([9, 1, 1, 1], SampleConfig(max_new_tokens=70, seed=4, top_p=0.8, min_p=0.05, num_samples=2)),
    (list(range(20)), SampleConfig(max_new_tokens=12, seed=5, temperature=1.5, top_k=20)),
]


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    torch.manual_seed(0)
    extra = {"n_kv_head": 2, "qk_norm": True} if request.param == "llama" else {"bias": True}
    return build_model(ModelConfig(arch=request.param, n_layer=2, n_head=4, n_embd=64, block_size=32,
                                   vocab_size=70, **extra)).eval()


@pytest.fixture
def make_engine():
    """BatchEngine(...), closed after the test whatever happens (its decoder thread must not outlive it)."""
    made = []

    def make(*args, **kw):
        made.append(BatchEngine(*args, **kw))
        return made[-1]

    yield make
    for engine in made:
        engine.close()


def wait_for_rows(engine, rows):
    deadline = time.monotonic() + 10
    while engine.stats()["rows"] != rows:
        assert time.monotonic() < deadline, engine.stats()
        time.sleep(0.001)


def alone(model, prompt, config):
    return Engine(model).generate(prompt, config)


def collect(stream, into, index, delay=0.0):
    time.sleep(delay)
    rows = None
    for column in stream:
        rows = rows or [[] for _ in column]
        for row, token in zip(rows, column):
            if token is not None:
                row.append(token)
    into[index] = rows


def test_batched_requests_give_what_each_gives_alone(model, one_thread, make_engine):
    expected = [alone(model, p, c) for p, c in REQUESTS]
    engine = make_engine(model, max_rows=16)
    got = [None] * len(REQUESTS)
    # All of them queued before any is read: they start in one batch (and the later ones join it mid-way).
    streams = [engine.stream(p, c) for p, c in REQUESTS]
    threads = [threading.Thread(target=collect, args=(s, got, i)) for i, s in enumerate(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == expected
    stats = engine.stats()
    assert stats["widest"] == sum(c.num_samples for _, c in REQUESTS)  # 9 rows decoded in one step
    assert stats["rows"] == 0 and stats["requests"] == 0


def test_requests_that_join_a_running_batch_give_what_they_give_alone(model, one_thread, make_engine):
    expected = [alone(model, p, c) for p, c in REQUESTS]
    engine = make_engine(model, max_rows=16)
    got = [None] * len(REQUESTS)
    threads = [threading.Thread(target=lambda i=i: collect(engine.stream(*REQUESTS[i]), got, i, delay=0.02 * i))
               for i in range(len(REQUESTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == expected


def test_a_cancelled_request_frees_its_rows_and_the_others_go_on(model, one_thread, make_engine):
    # The others are long enough to be decoding still while the first is read and cancelled.
    long = SampleConfig(max_new_tokens=3000, seed=11, top_k=10)
    others = [([3, 4], SampleConfig(max_new_tokens=1500, seed=12, num_samples=2)),
              ([6], SampleConfig(max_new_tokens=1500, seed=13, temperature=0.7))]
    expected = [alone(model, p, c) for p, c in others]
    engine = make_engine(model, max_rows=16)
    # The cancelled one is first, so the rows after it move up when it leaves.
    cancelled = engine.stream([2, 2], long)
    streams = [engine.stream(p, c) for p, c in others]
    for _ in range(5):
        next(cancelled)
    wait_for_rows(engine, 4)  # the others have joined
    cancelled.close()  # what a client that goes away does
    wait_for_rows(engine, 3)
    # A newcomer takes the freed row and, like the others, decodes as it would alone.
    newcomer = ([8, 9, 10], SampleConfig(max_new_tokens=30, seed=14, top_p=0.9))
    got = [None, None, None]
    threads = [threading.Thread(target=collect, args=(s, got, i)) for i, s in enumerate(streams)]
    threads.append(threading.Thread(target=collect, args=(engine.stream(*newcomer), got, 2)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == [*expected, alone(model, *newcomer)]
    assert engine.stats()["rows"] == 0


def test_no_more_rows_than_the_ceiling(model, one_thread, make_engine):
    engine = make_engine(model, max_rows=2)
    configs = [SampleConfig(max_new_tokens=30, seed=s) for s in range(4)]
    streams = [engine.stream([1, 2], c) for c in configs]
    got = [None] * 4
    threads = [threading.Thread(target=collect, args=(s, got, i)) for i, s in enumerate(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == [alone(model, [1, 2], c) for c in configs]
    assert engine.stats()["widest"] == 2


def test_a_closed_engine_ends_its_requests_with_an_error(model, one_thread, make_engine):
    from gptlab.errors import GptlabError

    engine = make_engine(model, max_rows=4)
    stream = engine.stream([1], SampleConfig(max_new_tokens=10_000, seed=1))
    next(stream)
    engine.close()
    with pytest.raises(GptlabError, match="shutting down"):
        for _ in stream:
            pass
    with pytest.raises(GptlabError, match="shutting down"):
        engine.stream([1], SampleConfig(max_new_tokens=5))


def test_an_idle_engine_lets_its_thread_and_cache_go(model, one_thread, make_engine, monkeypatch):
    import gptlab.batching as batching

    monkeypatch.setattr(batching, "IDLE_SECONDS", 0.2)
    engine = make_engine(model, max_rows=8)
    config = SampleConfig(max_new_tokens=10, seed=1)
    first = engine.generate([1, 2], config)
    assert engine.cache.rows >= 1
    deadline = time.monotonic() + 10
    while engine.thread is not None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert engine.cache.rows == 0 and engine.cache.k == []
    assert engine.generate([1, 2], config) == first  # the next request starts it all again
