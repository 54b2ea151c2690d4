"""Reliability: exact resume after SIGKILL, crash-safe checkpoints, Ctrl-C, the NaN guard."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from gptlab.checkpoint import load_train_state, read_weights, recover_resume_point

TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8",
        "--eval-iters", "2", "--num-samples", "1", "--sample-tokens", "10", "--warmup-iters", "5",
        "--learning-rate", "3e-3"]


# `python tests/inject_nan.py SPEC ...` is `gptlab ...` with NaN losses at the steps SPEC names
INJECT_NAN = Path(__file__).with_name("inject_nan.py")


def launch(*args, env=None, entry=("-m", "gptlab"), **kw):
    full_env = {**os.environ, **(env or {})}
    return subprocess.Popen([sys.executable, *map(str, entry), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full_env, **kw)


def run(*args, env=None, entry=("-m", "gptlab")):
    p = launch(*args, env=env, entry=entry)
    out, err = p.communicate(timeout=300)
    return p.returncode, out, err


def saved_step(path: Path) -> int | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return int(f.metadata()["step"])
    except Exception:
        return None


def metric_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def data(tmp_path_factory, small_corpus):
    out = tmp_path_factory.mktemp("rel") / "data"
    code, _, err = run("prepare", small_corpus, "--out", out)
    assert code == 0, err
    return out


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, data):
    # dropout on, so the restored torch RNG matters as much as the data position and the optimizer
    common = ["--data", data, "--max-iters", "200", "--eval-interval", "50", "--dropout", "0.1",
              "--deterministic", *TINY]
    code, _, err = run("train", *common, "--out", tmp_path / "straight")
    assert code == 0, err

    p = launch("train", *common, "--out", tmp_path / "killed")
    deadline = time.time() + 120
    while (saved_step(tmp_path / "killed" / "last.safetensors") or 0) < 100:
        assert p.poll() is None and time.time() < deadline, "the run ended before its step-100 checkpoint"
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    code, out, err = run("train", "--resume", tmp_path / "killed")
    assert code == 0, err
    assert "resuming" in out

    straight, resumed = metric_rows(tmp_path / "straight"), metric_rows(tmp_path / "killed")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == ["0", "50", "100", "150", "200"]
    for a, b in zip(straight, resumed):
        assert (a["train_loss"], a["val_loss"], a["lr"]) == (b["train_loss"], b["val_loss"], b["lr"])
    # bitwise: the final weights of both runs are identical
    wa, _ = read_weights(tmp_path / "straight" / "last.safetensors")
    wb, _ = read_weights(tmp_path / "killed" / "last.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigkill_at_random_moments_always_leaves_a_loadable_checkpoint(tmp_path, data):
    rng = random.Random(1234)
    run_dir = tmp_path / "run"
    args = ["--data", data, "--out", run_dir, "--max-iters", "100000", "--eval-interval", "1", "--eval-iters", "1",
            "--n-embd", "96", "--n-layer", "3", "--n-head", "3", "--block-size", "32", "--batch-size", "4"]
    survived = []
    for kill in range(12):
        p = launch("train", *args) if kill == 0 else launch("train", "--resume", run_dir)
        before = survived[-1] if survived else -1
        deadline = time.time() + 120
        while (saved_step(run_dir / "last.safetensors") or -1) <= before:  # wait for progress, then strike
            assert p.poll() is None and time.time() < deadline, "training made no progress"
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.4))  # a checkpoint is written every step: kills land mid-write too
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()
        p.stderr.close()
        # what a later load sees: a complete resume point and complete weights, never a mix
        recover_resume_point(run_dir)
        state = load_train_state(run_dir / "train_state.pt")
        weights, meta = read_weights(run_dir / "last.safetensors")
        best, _ = read_weights(run_dir / "best.safetensors")
        assert int(meta["step"]) == state["step"]
        assert set(weights) == set(best)
        survived.append(state["step"])
    assert not list(run_dir.glob("*.tmp")) and not list(run_dir.glob(".*.tmp"))
    assert survived[-1] > survived[0]  # resumed runs made progress between kills


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_saves_last_and_says_how_to_resume(tmp_path, data, sig):
    run_dir = tmp_path / "run"
    p = launch("train", "--data", data, "--out", run_dir, "--max-iters", "100000", "--eval-interval", "1000", *TINY)
    while saved_step(run_dir / "last.safetensors") is None:
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.01)
    time.sleep(0.5)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"--resume {run_dir}" in lines[0] and "Traceback" not in err
    state = load_train_state(run_dir / "train_state.pt")
    assert state["step"] > 0 and saved_step(run_dir / "last.safetensors") == state["step"]
    code, out, err = run("train", "--resume", run_dir, "--max-iters", str(state["step"] + 5))
    assert code == 0, err
    assert f"at step {state['step']:,}" in out


def test_nan_steps_are_skipped_and_a_streak_rolls_back_with_half_the_lr(tmp_path, data):
    run_dir = tmp_path / "run"
    code, out, err = run("train", "--data", data, "--out", run_dir, "--max-iters", "30", "--eval-interval", "10",
                         "--nan-patience", "3", *TINY, entry=(INJECT_NAN, "5,12*3"))
    assert code == 0, err
    assert "step 5: non-finite" in out and "(1 in a row)" in out
    assert "rolled back to step 10 with the learning rate halved" in out
    state = load_train_state(run_dir / "train_state.pt")
    assert state["lr_scale"] == 0.5 and state["rollbacks"] == 1 and state["step"] == 30
    weights, _ = read_weights(run_dir / "last.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert [r["step"] for r in metric_rows(run_dir)] == ["0", "10", "20", "30"]


def test_endless_nans_stop_with_a_message_after_the_last_rollback(tmp_path, data):
    code, out, err = run("train", "--data", data, "--out", tmp_path / "run", "--max-iters", "30",
                         "--eval-interval", "10", "--nan-patience", "2", "--max-rollbacks", "2", *TINY,
                         entry=(INJECT_NAN, "12*1000"))
    assert code == 2
    assert out.count("rolled back") == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "diverged" in lines[0] and "Traceback" not in err


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_broken_checkpoint_is_a_one_line_error_naming_the_file(copy_run, damage):
    run_dir = copy_run()
    for name in ["last.safetensors", "train_state.pt"]:
        path = run_dir / name
        original = path.read_bytes()
        path.write_bytes(original[: len(original) // 2] if damage == "truncate" else b"\x00garbage" * 100)
        code, out, err = run("train", "--resume", run_dir, "--max-iters", "40")
        assert code == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1 and name in lines[0] and "Traceback" not in err
        path.write_bytes(original)


def test_config_json_records_the_determinism_switch(tmp_path, data):
    code, _, err = run("train", "--data", data, "--out", tmp_path / "r", "--max-iters", "2", "--eval-interval", "1",
                       "--deterministic", *TINY)
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "config.json").read_text())["train"]["deterministic"] is True
