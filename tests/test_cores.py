"""Threads that follow the cores a process gets: the policy fed made-up step times, and a real trainer beside a busy process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptlab.cores import ADAPT_ENV, AdaptiveThreads, CoreShare, ThreadTuner


@pytest.fixture(autouse=True)
def _adaptation_on(monkeypatch):
    """The suite keeps thread counts fixed (conftest); these tests are about adapting them."""
    monkeypatch.setenv(ADAPT_ENV, "1")


# ---- the policy, fed step times ---------------------------------------------------------------------

def simulate(tuner: ThreadTuner, step_time, seconds: float, start: float = 0.0) -> float:
    """Run steps for `seconds` of simulated time; step_time(threads, now) is each step's duration."""
    now = start
    while now < start + seconds:
        took = step_time(tuner.threads, now)
        now += took
        tuner.record(took, now)
    return now


def solo(threads: int, now: float) -> float:
    return {1: 0.060, 2: 0.040}[threads]


def contended(threads: int, now: float) -> float:
    """Beside a busy process: two threads are 4x slower than alone, one thread runs as fast as alone."""
    return {1: 0.060, 2: 0.160}[threads]


def test_alone_it_keeps_every_thread():
    tuner = ThreadTuner(2)
    simulate(tuner, solo, 60.0)
    assert tuner.threads == 2
    # one early look at one thread fewer, nothing else
    assert [change[1:] for change in tuner.history] == [(2, 1), (1, 2)]


def test_a_jump_in_step_time_drops_a_thread_and_it_comes_back_when_the_other_ends():
    tuner = ThreadTuner(2, probe_every=10.0)
    now = simulate(tuner, solo, 20.0)
    assert tuner.threads == 2
    now = simulate(tuner, contended, 30.0, now)
    assert tuner.threads == 1
    dropped_at = next(when for when, old, new in tuner.history if when > 20.0 and new == 1)
    assert dropped_at < 21.5  # within a couple of windows
    probes = [when for when, old, new in tuner.history if when > 22.0 and new == 2]
    assert probes, "it probes going back up while contended"
    simulate(tuner, solo, 15.0, now)
    assert tuner.threads == 2


def test_contention_right_after_a_lost_trial_is_not_ignored():
    tuner = ThreadTuner(2, probe_every=15.0)
    now = simulate(tuner, solo, 3.0)  # the early look at one thread has lost
    assert tuner.history[-1][1:] == (1, 2) and tuner.quiet_until > now + 5
    simulate(tuner, lambda n, t: {1: 0.06, 2: 0.8}[n], 5.0, now)
    dropped = [when for when, old, new in tuner.history if when > now and new == 1]
    assert dropped and dropped[0] < now + 6.0  # a few slow steps, not the 15 s quiet period


def test_steps_much_faster_than_when_it_settled_probe_at_once():
    """Outside load made one thread as good as two, then went away: no need to wait for the periodic probe."""
    tuner = ThreadTuner(2, probe_every=60.0)
    now = simulate(tuner, lambda n, t: 0.15, 3.0)  # every count alike slow: the tie goes to one thread
    assert tuner.threads == 1
    now = simulate(tuner, solo, 3.0, now)
    assert tuner.threads == 2


def test_a_losing_probe_costs_few_slow_steps():
    """Two threads 10x slower than one beside a busy process: each probe ends after a majority of a window."""
    tuner = ThreadTuner(2, probe_every=10.0)
    slow = {1: 0.05, 2: 0.5}
    steps_at = {1: 0, 2: 0}

    def step(threads: int, now: float) -> float:
        steps_at[threads] += 1
        return slow[threads]

    simulate(tuner, step, 120.0)
    assert tuner.threads == 1
    probes = [when for when, old, new in tuner.history if new == 2]
    assert 8 <= len(probes) <= 13  # every 10 s or so
    assert steps_at[2] <= 10 + 3 * len(probes)  # two windows before the first look, then three per probe


def test_started_beside_a_busy_process_it_finds_the_better_count_without_a_calm_baseline():
    tuner = ThreadTuner(2)
    simulate(tuner, contended, 30.0)
    assert tuner.threads == 1


def test_when_fewer_threads_do_not_help_it_keeps_all_of_them():
    """Contention that slows every count alike (fewer threads lose): keep full, retry now and then only."""
    tuner = ThreadTuner(2, probe_every=10.0)
    now = simulate(tuner, solo, 10.0)
    now = simulate(tuner, lambda n, t: 3 * solo(n, t), 60.0, now)
    assert tuner.threads == 2
    trials = [when for when, old, new in tuner.history if when > 10.0 and new == 1]
    assert 1 <= len(trials) <= 7  # about one per probe_every, never every window


def test_single_slow_steps_and_slow_growth_are_not_contention():
    tuner = ThreadTuner(2)
    now = simulate(tuner, solo, 5.0)  # past the early look
    changes = len(tuner.history)
    # every 7th step takes 10x (a noisy neighbour); the step time also grows 50% over the minute
    count = [0]

    def noisy(threads: int, t: float) -> float:
        count[0] += 1
        grow = 1 + 0.5 * (t - now) / 60
        return solo(threads, t) * grow * (10 if count[0] % 7 == 0 else 1)

    simulate(tuner, noisy, 60.0, now)
    assert len(tuner.history) == changes and tuner.threads == 2


def test_a_lowered_ceiling_holds_whatever_the_step_times_say():
    tuner = ThreadTuner(4, probe_every=5.0)
    now = simulate(tuner, lambda n, t: 0.1 / n, 5.0)
    assert tuner.set_ceiling(3, now) == 3
    lent = len(tuner.history)
    now = simulate(tuner, lambda n, t: 0.1 / n, 30.0, now)
    assert tuner.threads == 3 and all(new <= 3 for when, old, new in tuner.history[lent:])
    assert tuner.set_ceiling(4, now) == 4  # given back: straight to every thread


def test_windows_need_min_window_sec():
    tuner = ThreadTuner(2, window=5, min_window_sec=1.0, settle=0)
    for _ in range(50):
        tuner.record(0.001, 0.0)
    assert tuner.windows == {}
    for _ in range(5):
        tuner.record(0.2, 0.0)
    assert tuner.windows == {2: 1}


# ---- the objects that set torch's threads ----------------------------------------------------------


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_adaptive_threads_sets_and_restores_torch_threads():
    before = torch.get_num_threads()
    clock = [0.0]
    threads = AdaptiveThreads(2, enabled=True, clock=lambda: clock[0])
    try:
        for _ in range(400):
            took = contended(torch.get_num_threads(), clock[0])
            clock[0] += took
            threads.step_done(took)
        assert torch.get_num_threads() == threads.threads == 1
    finally:
        threads.restore()
    assert torch.get_num_threads() == before


def test_adaptation_off_by_environment(monkeypatch):
    monkeypatch.setenv(ADAPT_ENV, "0")
    threads = AdaptiveThreads(2)
    before = torch.get_num_threads()
    for _ in range(100):
        threads.step_done(1.0)
    assert not threads.enabled and torch.get_num_threads() == before
    assert not CoreShare().adapt


def test_core_share_requests_take_precedence(restore_threads):
    torch.set_num_threads(2)
    clock = [0.0]
    with CoreShare(adapt=True, clock=lambda: clock[0]) as cores:
        times: list[float] = []
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(300):  # fast steps at one thread would tempt a probe up: the request wins
            clock[0] += 0.01
            times.append(0.01)
            cores.apply(times)
            assert torch.get_num_threads() == 1
        os.kill(os.getpid(), signal.SIGUSR2)
        cores.apply(times)
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 2


# ---- a real trainer beside a real busy process -----------------------------------------------------

BUSY = """
import torch
torch.set_num_threads(1)
a = torch.randn(256, 256)
while True:
    a @ a
"""


def read_progress(run: Path) -> list[dict]:
    path = run / "events.jsonl"
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return [e for e in events if e["event"] == "progress"]


def wait_for(condition, timeout: float, proc: subprocess.Popen) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return condition()
        time.sleep(0.2)
    return False


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores")
def test_a_trainer_beside_a_busy_process_drops_a_thread_and_takes_it_back(char_data, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop(ADAPT_ENV, None)
    run = tmp_path / "run"
    trainer = subprocess.Popen(
        [sys.executable, "-m", "gptlab", "train", "--preset", "cpu-tiny", "--data", str(char_data),
         "--out", str(run), "--time", "240s", "--eval-interval", "1000000", "--quiet"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    busy = None
    try:
        assert wait_for(lambda: len(read_progress(run)) >= 3, 30, trainer), trainer.stderr.read().decode()[-2000:]
        busy = subprocess.Popen([sys.executable, "-c", BUSY], env={**os.environ, "OMP_NUM_THREADS": "1"})
        marked = len(read_progress(run))
        # Generous deadlines: the tuner judges whole step windows and probes a thread back only every
        # 15 s, and on a loaded machine (CI) each window takes longer.
        assert wait_for(lambda: any(e["threads"] == 1 for e in read_progress(run)[marked:]), 60, trainer)
        busy.kill()
        busy.wait()
        busy = None
        marked = len(read_progress(run))
        assert wait_for(lambda: any(e["threads"] == 2 for e in read_progress(run)[marked + 1:]), 60, trainer)
    finally:
        for proc in (busy, trainer):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT) if proc is trainer else proc.kill()
        trainer.wait(30)
