"""Training in several processes: torchrun with gloo on the CPU, against one process doing the same work.

The 2-process runs are module fixtures started once (each launch costs ~10 s, mostly importing
torch, on two cores); the one-process runs happen in this process.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gptlab.checkpoint import load_train_state, read_weights
from gptlab.config import resolve_config
from gptlab.model import GPT
from gptlab.train import train

from .conftest import TINY_MODEL, free_port

# The learning-rate schedule is pinned to 20 steps, so a 10-step run resumed to 20 follows it too.
SETTINGS = dict(eval_iters=2, eval_interval=10, warmup_iters=5, lr_decay_iters=20, learning_rate=3e-3,
                num_samples=1, sample_tokens=10, compile="off", dtype="float32")
STEPS = 20
BATCH = 4  # per process


def flags(settings: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]


TINY_FLAGS = flags({**TINY_MODEL, **SETTINGS, "batch_size": BATCH})


def start(argv: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two ranks on two cores
    return subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> str:
    """Wait for a command; its stdout."""
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, f"{' '.join(proc.args)}\n{out}\n{err}"
    return out


def torchrun(*args: str, cwd: Path) -> subprocess.Popen:
    return start([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master-port={free_port()}",
                  "-m", "gptlab", *args], cwd)


def metric_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def loss_on_a_fixed_batch(run_dir: Path, data: Path) -> float:
    """Loss of a run's last weights on one fixed batch, to compare runs whose evaluations differ."""
    from gptlab.data import RandomBatches, load_tokens

    tensors, _ = read_weights(run_dir / "last.safetensors")
    model = GPT(resolve_config(config_file=run_dir / "config.json")[0])
    model.load_state_dict(tensors, strict=False)
    x, y = RandomBatches(load_tokens(data, "train"), TINY_MODEL["block_size"], 16, seed=99).next()
    with torch.no_grad():
        logits = model(x)
    return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).item()


@pytest.fixture(scope="module")
def launches(tmp_path_factory, char_data) -> dict[str, tuple[Path, str]]:
    """The 2-process runs, started together (most of each is importing torch, which overlaps well).

    - "plain": 20 steps of batch 4 per process, through torchrun;
    - "dropout": the same with dropout, so that each rank's own random stream matters on resume;
    - "first-half": "dropout" stopped after 10 steps, through `gptlab train --nproc 2`.
    """
    data = str(char_data)
    roots = {name: tmp_path_factory.mktemp(name) for name in ("plain", "dropout", "first-half")}
    procs = {
        "plain": torchrun("train", "--data", data, "--out", "run", f"--max-iters={STEPS}", *TINY_FLAGS,
                          cwd=roots["plain"]),
        "dropout": torchrun("train", "--data", data, "--out", "run", f"--max-iters={STEPS}", *TINY_FLAGS,
                            "--dropout=0.1", cwd=roots["dropout"]),
        "first-half": start([sys.executable, "-m", "gptlab", "train", "--nproc", "2", "--data", data, "--out", "run",
                             "--max-iters=10", *TINY_FLAGS, "--dropout=0.1"], roots["first-half"]),
    }
    return {name: (roots[name] / "run", finish(proc)) for name, proc in procs.items()}


@pytest.fixture
def two_procs(launches) -> tuple[Path, str]:
    return launches["plain"]


def one_process(out: Path, data: Path, **changes) -> Path:
    model_cfg, cfg = resolve_config(overrides=dict(**TINY_MODEL, **SETTINGS, data=str(data), out=str(out),
                                                   batch_size=BATCH, max_iters=STEPS))
    train(model_cfg, replace(cfg, **changes), quiet=True)
    return out


def test_two_processes_match_one_process_with_twice_the_batch(two_procs, char_data, tmp_path, one_thread):
    ddp_run, stdout = two_procs
    single = one_process(tmp_path / "single", char_data, batch_size=2 * BATCH)
    ddp_rows, single_rows = metric_rows(ddp_run), metric_rows(single)
    assert [r["step"] for r in ddp_rows] == [r["step"] for r in single_rows] == ["0", "10", "20"]
    for a, b in zip(ddp_rows, single_rows):
        assert a["tokens_seen"] == b["tokens_seen"] and a["lr"] == b["lr"]  # global batch, same schedule
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), abs=1e-5)
        assert float(a["val_loss"]) == pytest.approx(float(b["val_loss"]), abs=1e-5)
    wa, _ = read_weights(ddp_run / "last.safetensors")
    wb, _ = read_weights(single / "last.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
    assert f"{2 * BATCH * TINY_MODEL['block_size']:,} tokens per step" in stdout  # the global figure


def test_two_processes_match_gradient_accumulation(two_procs, char_data, tmp_path, one_thread):
    ddp_run, _ = two_procs
    accumulated = one_process(tmp_path / "accum", char_data, grad_accum=2)
    a, b = loss_on_a_fixed_batch(ddp_run, char_data), loss_on_a_fixed_batch(accumulated, char_data)
    assert a == pytest.approx(b, abs=1e-5)
    assert metric_rows(ddp_run)[-1]["tokens_seen"] == metric_rows(accumulated)[-1]["tokens_seen"]


def test_only_rank_zero_writes_and_prints(two_procs):
    ddp_run, stdout = two_procs
    names = sorted(p.name for p in ddp_run.iterdir())
    assert names == sorted(["config.json", "tokenizer.json", "best.safetensors", "last.safetensors",
                            "train_state.pt", "metrics.csv", "loss.png", "samples.txt", "events.jsonl"])
    assert [r["step"] for r in metric_rows(ddp_run)] == ["0", "10", "20"]  # not doubled
    starts = [line for line in (ddp_run / "events.jsonl").read_text().splitlines() if '"event": "start"' in line]
    assert len(starts) == 1  # one story of the run, told by rank 0 alone
    assert stdout.count("step     20: train loss") == 1 and stdout.count("run folder:") == 1
    state = load_train_state(ddp_run / "train_state.pt")
    assert len(state["ranks"]) == 2 and state["step"] == STEPS
    # each rank has its own dropout stream
    assert not torch.equal(state["ranks"][0]["rng"]["torch"], state["ranks"][1]["rng"]["torch"])


def test_stopped_run_resumes_exactly_in_two_processes(launches):
    """10 steps through `gptlab train --nproc 2`, resumed to 20 under torchrun: the uninterrupted run, bit for bit."""
    straight, _ = launches["dropout"]
    stopped, _ = launches["first-half"]
    assert load_train_state(stopped / "train_state.pt")["step"] == 10
    out = finish(torchrun("train", "--resume", "run", f"--max-iters={STEPS}", cwd=stopped.parent))
    assert "resuming run at step 10" in out
    assert metric_rows(stopped) == [
        {**row, "tokens_per_sec": r["tokens_per_sec"], "elapsed_sec": r["elapsed_sec"]}
        for row, r in zip(metric_rows(straight), metric_rows(stopped))
    ]
    wa, _ = read_weights(straight / "last.safetensors")
    wb, _ = read_weights(stopped / "last.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
