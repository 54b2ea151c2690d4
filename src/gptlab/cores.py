"""Threads that follow the cores a process really gets: lent on request, and given up under contention.

Two torch processes that each use every core of a small machine slow each other far more than a
fair share would (4-30x on two cores, not 2x): an OpenMP parallel region ends when its slowest
thread does, so one thread descheduled by the other process stalls the whole step, and the threads
waiting for it spin on the core the other process wants. One thread fewer then makes more steps per
second, not fewer. So:

- `CoreShare`, the trainer's: SIGUSR1 asks it to lend one core to another process (`gptlab ui`
  does while its server generates), SIGUSR2 gives it back. A core lent on request stays lent,
  whatever the step times say. On top of that, the trainer tells it each optimizer step's duration
  (`apply(step_seconds)` between steps) and the thread count adapts to contention (the policy
  below). GPTLAB_ADAPT_THREADS=0 turns the adaptation off (the requests still work); it is also off
  under torchrun, off the CPU and with --deterministic (float32 sums can depend on the thread count).
- `AdaptiveThreads` does the same for any loop of similar steps, a decode loop above all: one call
  per step with its duration; the thread count changes between steps, never inside one.

      threads = AdaptiveThreads(n)  # n: the most it may use (default: torch's count now)
      for step in range(max_new_tokens):
          began = time.perf_counter()
          ...  # one token
          threads.step_done(time.perf_counter() - began)  # may call torch.set_num_threads
      threads.restore()  # back to torch's count at construction

  Made inside `intra_op_threads(n)`, `restore` is optional (the context restores on exit).
  A window is at least 5 tokens and 50 ms. `enabled=False`, or GPTLAB_ADAPT_THREADS=0, makes
  `step_done` a no-op; with n == 1 there is nothing to adapt and it costs nothing.

The policy (`ThreadTuner`: pure logic fed step times and the time, no torch):
- Step times are taken a window at a time: the median of at least `window` (5) steps and
  `min_window_sec` seconds (the very first window: 3 steps; the first `settle` steps after each
  change, none by default, left out). A median ignores a single slow step; pauses that are not steps (evaluation,
  checkpoints) are never fed to it. A trial's window ends as soon as most of its steps are on one
  side of the line it must beat, or at a step 3x slower than that line: a losing trial costs one to
  three slow steps.
- Each thread count keeps a baseline: the fastest window seen at that count, drifting slowly up
  towards later windows within the jump (steps that slowly grow longer, as decoding's do while its
  context fills, are not contention).
- When a window is `jump` (1.6) times the baseline of its thread count or more, it tries one thread
  fewer for a window and keeps whichever made more steps per second (the fewer threads on a tie:
  they leave more to the other process). It does so once early on too (after the first window),
  for a process started beside a busy one has no calm baseline to jump from. A trial that
  lost is not retried for `probe_every` seconds, unless steps grow `jump` times slower than they
  were when it lost (contention that starts later).
- Below the most it may use, every `probe_every` seconds (15) it tries one thread more for a window
  and keeps it only if that is `margin` (3%) faster or more, and at once when its steps get `jump`
  times faster than when it settled there: when the other process ends, the count climbs back to
  every thread.
- Independently of all this, OMP_WAIT_POLICY=PASSIVE in a process's environment before torch loads
  (GNU libgomp, which torch's CPU wheels use, reads it once) makes waiting threads sleep instead of
  spinning: see benchmarks/README.md for what each does beside a busy process.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

ADAPT_ENV = "GPTLAB_ADAPT_THREADS"


def adaptation_enabled() -> bool:
    """False when GPTLAB_ADAPT_THREADS is 0, off, false or no."""
    return os.environ.get(ADAPT_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


class ThreadTuner:
    """Decides the thread count from step durations: `record(seconds, now)` returns the count for the next step.

    `ceiling` is the most it may use (lowered while a core is lent on request); it never goes below one.
    """

    HOPELESS = 3.0  # a trial step this many times slower than the line it must beat ends the trial

    def __init__(self, full: int, *, jump: float = 1.6, window: int = 5, min_window_sec: float = 0.0,
                 settle: int = 0, probe_every: float = 15.0, margin: float = 0.03, drift: float = 0.1) -> None:
        self.full = self.ceiling = self.threads = max(1, full)
        self.jump, self.window, self.min_window_sec, self.settle = jump, window, min_window_sec, settle
        self.probe_every, self.margin, self.drift = probe_every, margin, drift
        self.baseline: dict[int, float] = {}  # threads -> fastest (slowly drifting) window median
        self.recent: dict[int, float] = {}  # threads -> the last window median measured there
        self.windows: dict[int, int] = {}  # threads -> windows measured there
        self.trial_from: int | None = None  # the count before a trial, while one runs
        self.quiet_until = 0.0  # no trial down before this time, unless steps get slower still
        self.tolerated = float("inf")  # ... than this: the step time at which fewer threads last lost
        self.settled_at = 0.0  # the step time at which fewer threads last won: much faster, and it probes at once
        self.next_probe: float | None = None  # the next trial up, while below the ceiling
        self.history: list[tuple[float, int, int]] = []  # (when, from, to): every change
        self._restart_window()

    def _restart_window(self) -> None:
        self.samples: list[float] = []
        self.skip = self.settle

    def set_ceiling(self, ceiling: int, now: float) -> int:
        """The most threads allowed from now on; returns the count to use (the ceiling when it rose)."""
        ceiling = max(1, min(ceiling, self.full))
        if ceiling != self.ceiling:
            raised = ceiling > self.ceiling
            self.ceiling = ceiling
            self.trial_from, self.next_probe = None, None
            target = ceiling if raised else min(self.threads, ceiling)
            self._move(target, now)
        return self.threads

    def record(self, seconds: float, now: float) -> int:
        """One step took `seconds`; returns the thread count for the next one."""
        if self.skip > 0:
            self.skip -= 1
            return self.threads
        self.samples.append(seconds)
        # the very first window is short (its median still ignores a slow first step): a process
        # started beside a busy one pays slow steps until its first look at one thread fewer
        size = self.window if self.windows else self.window // 2 + 1
        if len(self.samples) < size or sum(self.samples) < self.min_window_sec:
            if not self._decided():
                return self.threads
        median = statistics.median(self.samples)
        self._restart_window()
        self._window_done(median, now)
        return self.threads

    def _decided(self) -> bool:
        """Whether a window's verdict is already in: most of its steps on one side of the line that matters.

        Slow steps are what contention costs, so a losing trial, or a jump, ends its window as soon
        as its median cannot change sides.
        """
        if len(self.samples) > self.window or sum(self.samples) < self.min_window_sec:
            return False
        need = self.window // 2 + 1
        if self.trial_from is None:  # steady: has the step time jumped?
            base = self.baseline.get(self.threads)
            if self.threads == 1 or base is None:
                return False
            return sum(1 for t in self.samples if t >= self.jump * base) >= need
        if self.threads > self.trial_from:  # one more: it must beat the count below by `margin`
            line = (1 - self.margin) * self.recent[self.trial_from]
        else:  # one fewer: it must not lose to the count above by more than `margin`
            line = self.recent[self.trial_from] / (1 - self.margin)
        below = sum(1 for t in self.samples if t < line)
        hopeless = self.samples[-1] >= self.HOPELESS * line
        return below >= need or len(self.samples) - below >= need or hopeless

    def _window_done(self, median: float, now: float) -> None:
        n = self.threads
        base = self.baseline.get(n)
        if base is None or median < base:
            self.baseline[n] = median
        elif median < self.jump * base:
            self.baseline[n] = base + self.drift * (median - base)
        self.recent[n] = median
        self.windows[n] = self.windows.get(n, 0) + 1
        if self.trial_from is not None:
            self._trial_done(now)
            return
        jumped = base is not None and median >= self.jump * base
        # a process that starts beside another has no calm baseline: one early trial tells
        first_look = n == self.ceiling and self.windows[n] == 1 and n - 1 not in self.recent
        worse = median >= self.jump * self.tolerated  # slower than when fewer threads last lost
        if n > 1 and (jumped or first_look) and (now >= self.quiet_until or worse):
            self.trial_from = n
            self._move(n - 1, now)
        elif n < self.ceiling and ((self.next_probe is not None and now >= self.next_probe)
                                   or median * self.jump <= self.settled_at):
            self.trial_from = n
            self._move(n + 1, now)

    def _trial_done(self, now: float) -> None:
        before, n = self.trial_from, self.threads
        self.trial_from = None
        low, high = min(before, n), max(before, n)
        winner = high if self.recent[high] < (1 - self.margin) * self.recent[low] else low
        self.settled_at = self.recent[winner] if winner < self.ceiling else 0.0
        if winner != n:
            self._move(winner, now)
            if winner > n:  # fewer threads lost: leave the count alone for a while, unless it gets worse
                self.quiet_until, self.tolerated = now + self.probe_every, self.recent[winner]
        if self.threads < self.ceiling:
            self.next_probe = now + self.probe_every
        else:
            self.next_probe = None

    def _move(self, threads: int, now: float) -> None:
        if threads != self.threads:
            self.history.append((now, self.threads, threads))
            if len(self.history) > 1000:  # a run of days probes every 15 s: keep the recent changes
                del self.history[:500]
            self.threads = threads
        if self.threads < self.ceiling and self.next_probe is None:
            self.next_probe = now + self.probe_every
        self._restart_window()


class AdaptiveThreads:
    """torch's intra-op thread count for a loop of similar steps, adapted to contention (see the module docstring)."""

    def __init__(self, threads: int | None = None, enabled: bool | None = None, clock: Any = time.monotonic,
                 **policy: Any) -> None:
        self.started_with = torch.get_num_threads()
        self.full = max(1, threads if threads is not None else self.started_with)
        self.enabled = adaptation_enabled() if enabled is None else enabled
        self.clock = clock
        # a token takes a millisecond or so: a window spans at least 50 ms of them, not just five
        self.tuner = ThreadTuner(self.full, **{"min_window_sec": 0.05, **policy})

    @property
    def threads(self) -> int:
        return self.tuner.threads

    def step_done(self, seconds: float) -> None:
        """One step took `seconds`: feed it to the policy and, between steps, use the count it asks for."""
        if self.enabled and self.full > 1:
            self._use(self.tuner.record(seconds, self.clock()))

    def _use(self, threads: int) -> None:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    def restore(self) -> None:
        """Back to the thread count there was before."""
        if torch.get_num_threads() != self.started_with:
            torch.set_num_threads(self.started_with)


class CoreShare:
    """The trainer's threads: one core lent on request (SIGUSR1 lends, SIGUSR2 takes back), and adapted to contention.

    `gptlab ui` generates text in its server while a job trains and asks for a core meanwhile. The
    trainer tells `apply` its optimizer steps' durations between steps; the count changes only there.
    `adapt=False` (the trainer's choice off the CPU), GPTLAB_ADAPT_THREADS=0 or torchrun leave
    the requests alone in charge.
    """

    def __init__(self, adapt: bool = True, clock: Any = time.monotonic, **policy: Any) -> None:
        self.full = torch.get_num_threads()
        self.wanted = self.full  # what the requests allow: full, or one fewer while a core is lent
        self.previous: dict[int, Any] = {}
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.adapt = adapt and adaptation_enabled() and not distributed and self.full > 1
        self.clock = clock
        self.tuner = ThreadTuner(self.full, **policy)
        self.seen = 0  # step times already fed to the tuner

    def __enter__(self) -> CoreShare:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGUSR1"):
            for sig in (signal.SIGUSR1, signal.SIGUSR2):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        import signal

        self.wanted = max(1, self.full - 1) if signum == signal.SIGUSR1 else self.full

    def step_done(self, seconds: float) -> None:
        """One optimizer step took `seconds` (evaluation and checkpoints left out)."""
        if self.adapt:
            self.tuner.record(seconds, self.clock())

    def apply(self, step_seconds: Sequence[float] = ()) -> None:
        """Between steps: take in the step times not seen yet (the loop's growing list), run on the threads wanted."""
        if len(step_seconds) < self.seen:  # a new list
            self.seen = 0
        for seconds in step_seconds[self.seen:]:
            self.step_done(seconds)
        self.seen = len(step_seconds)
        threads = self.wanted
        if self.adapt:
            threads = self.tuner.set_ceiling(self.wanted, self.clock())
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)

    def __exit__(self, *exc: Any) -> None:
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if torch.get_num_threads() != self.full:
            torch.set_num_threads(self.full)


@contextlib.contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` while inside, restored after."""
    previous = torch.get_num_threads()
    if threads != previous:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads != previous:
            torch.set_num_threads(previous)
