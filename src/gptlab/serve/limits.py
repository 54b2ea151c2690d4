"""What one server takes on: the ceilings on a request, and a bounded queue of generations per model.

Design choices:
- Each model has its own pool of `concurrency` worker threads, so generation never runs on the
  event loop: the server keeps answering `/health` (and the page keeps drawing) while models work.
- Admission is counted, not waited for: at most `concurrency` generations run and `queue_size` more
  wait; one more is turned away at once (`Busy`, which the API answers with 429 and Retry-After)
  instead of piling up unbounded waits.
- The workers turn tokens into text and hand it on; the model's batch engine decodes for all of
  them on its own thread, with the cores the server gives each model.
- A job's consumer going away (a client that disconnects, a Stop button) sets the job's cancel flag;
  the worker checks it between tokens and closes the generator, which frees the slot at once.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from gptlab.errors import GptlabError

_DONE = object()


@dataclass
class Limits:
    """Ceilings on one request and on the work in flight per model (the flags of `gptlab serve`)."""

    max_new_tokens_limit: int = field(default=1024, metadata={"help": "ceiling on max_tokens per request"})
    max_prompt_chars: int = field(default=50_000, metadata={"help": "longest prompt, in characters"})
    max_n: int = field(default=8, metadata={"help": "most samples per request (n)"})
    # Generations that run at once are decoded together, one batch per model (gptlab/batching.py): a
    # step reads the weights once for all of them. GPT-2 124M on 2 cores: 16 streaming clients got
    # 6.9x the tokens/s of one (benchmarks/bench_serve.py).
    concurrency: int = field(default=16, metadata={"help": "generations decoded together, per model"})
    queue_size: int = field(default=64, metadata={"help": "requests waiting per model before 429"})

    def __post_init__(self) -> None:
        for name in ("max_new_tokens_limit", "max_prompt_chars", "max_n", "concurrency"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise GptlabError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if not isinstance(self.queue_size, int) or isinstance(self.queue_size, bool) or self.queue_size < 0:
            raise GptlabError(f"--queue-size must be an integer >= 0 (0 = no waiting), got {self.queue_size!r}")

    def decoder_threads(self, models: int = 1) -> int:
        """Torch intra-op threads for each model's decoder: the cores shared among the models."""
        return max(1, (os.cpu_count() or 1) // max(1, models))

    def batch_rows(self) -> int:
        """Most samples one model decodes at once: every running generation, or one with the most samples."""
        return max(self.concurrency, self.max_n)


class Busy(Exception):
    """Every slot and every place in the queue is taken; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Job:
    """One admitted generation: its items arrive on the event loop; cancel() stops it between tokens."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: asyncio.Queue[Any] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.started = threading.Event()

    def put(self, item: Any) -> None:
        """Hand an item from the worker thread to the event loop."""
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)
        except RuntimeError:  # the loop has closed: the server is shutting down
            self.cancelled.set()

    def cancel(self) -> None:
        """Stop the generation at its next token (or before it starts)."""
        self.cancelled.set()

    async def __aiter__(self) -> AsyncIterator[Any]:
        try:
            while True:
                item = await self.items.get()
                if item is _DONE:
                    return
                if isinstance(item, _Failure):
                    raise item.error
                yield item
        finally:
            self.cancel()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class GenerationQueue:
    """At most `concurrency` generations of one model at a time, `queue_size` more waiting, the rest refused."""

    def __init__(self, concurrency: int, queue_size: int, name: str = "model",
                 on_busy: Callable[[bool], None] | None = None) -> None:
        """`on_busy(True)` is called as each generation starts and `on_busy(False)` as it ends (worker threads)."""
        self.concurrency = concurrency
        self.on_busy = on_busy
        self.queue_size = queue_size
        self.name = name
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix=f"gptlab-{name}",
                                       initializer=_one_thread)
        self.lock = threading.Lock()
        self.running = 0
        self.waiting = 0
        self.jobs: set[Job] = set()
        self.mean_seconds = 1.0  # moving average of a generation's duration, for Retry-After

    def submit(self, work: Callable[[], Iterator[Any]]) -> Job:
        """Queue `work` (a function returning an iterator, run on a worker thread); raise Busy when full."""
        loop = asyncio.get_running_loop()
        with self.lock:
            if self.running + self.waiting >= self.concurrency + self.queue_size:
                raise Busy(
                    f"model {self.name} is busy ({self.running} generating, {self.waiting} waiting, "
                    f"queue of {self.queue_size}); retry later",
                    self.retry_after(),
                )
            self.waiting += 1
            job = Job(loop)
            self.jobs.add(job)
        try:
            self.pool.submit(self._run, job, work)
        except RuntimeError:  # the pool was shut down
            with self.lock:
                self.waiting -= 1
                self.jobs.discard(job)
            raise Busy(f"model {self.name} is shutting down", 5) from None
        return job

    def retry_after(self) -> int:
        """Seconds until a place is likely to free up: the queue ahead, at the mean generation time."""
        ahead = (self.running + self.waiting) / self.concurrency
        return max(1, min(60, math.ceil(self.mean_seconds * ahead)))

    def stats(self) -> dict[str, int]:
        """Generations running and waiting now, and the ceilings."""
        with self.lock:
            return {"running": self.running, "waiting": self.waiting,
                    "concurrency": self.concurrency, "queue_size": self.queue_size}

    def shutdown(self) -> None:
        """Stop every job at its next token and let the threads go."""
        with self.lock:
            jobs = list(self.jobs)
        for job in jobs:
            job.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, job: Job, work: Callable[[], Iterator[Any]]) -> None:
        with self.lock:
            self.waiting -= 1
            self.running += 1
        start = time.perf_counter()
        ran = not job.cancelled.is_set()
        job.started.set()
        if ran and self.on_busy is not None:
            self.on_busy(True)
        try:
            if ran:
                items = work()
                try:
                    for item in items:
                        job.put(item)
                        if job.cancelled.is_set():
                            break
                finally:
                    close = getattr(items, "close", None)
                    if close is not None:
                        close()  # a generator's finally blocks run now (the engine restores its threads)
        except BaseException as e:  # handed to the consumer, which turns it into an error response
            job.put(_Failure(e))
        finally:
            if ran and self.on_busy is not None:
                self.on_busy(False)
            job.put(_DONE)
            with self.lock:
                self.running -= 1
                self.jobs.discard(job)
                if ran:
                    self.mean_seconds = 0.8 * self.mean_seconds + 0.2 * (time.perf_counter() - start)


def _one_thread() -> None:
    """A worker only turns a generation's ids into text (the batch engine's own thread decodes): one thread is plenty."""
    import torch

    torch.set_num_threads(1)
