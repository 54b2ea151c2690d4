"""Training: the run folder, learning, resume, stopping rules, accumulation, precision fallback."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from gptlab.checkpoint import read_weights
from gptlab.config import resolve_config
from gptlab.cpu_bf16 import cpu_has_native_bf16
from gptlab.device import resolve_dtype
from gptlab.rundir import run_summary
from gptlab.train import CPU_COMPILE_MIN_BUDGET_SEC, compile_wanted, learning_rate, train

from .conftest import TINY_MODEL


def tiny_cfg(data, out, **kw):
    settings = dict(**TINY_MODEL, data=str(data), out=str(out), batch_size=8, max_iters=20, eval_interval=10,
                    eval_iters=2, num_samples=1, sample_tokens=20, warmup_iters=2, learning_rate=3e-3)
    settings.update(kw)
    return resolve_config(overrides=settings)


def test_run_folder_has_every_file(tiny_run):
    for name in ["config.json", "tokenizer.json", "best.safetensors", "last.safetensors", "train_state.pt",
                 "metrics.csv", "loss.png", "samples.txt"]:
        assert (tiny_run / name).is_file(), name
    assert not list(tiny_run.glob("*.tmp")) and not list(tiny_run.glob(".*.tmp"))
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["model"]["vocab_size"] == 65 or config["model"]["vocab_size"] > 0
    assert config["train"]["max_iters"] == 30 and config["tokenizer"]["type"] == "char"
    assert (tiny_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((tiny_run / "samples.txt").read_text()) > 40


def test_metrics_rows_per_eval_and_best_is_lowest_val(tiny_run):
    with open(tiny_run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["step", "tokens_seen", "epoch", "lr", "train_loss", "val_loss", "tokens_per_sec", "elapsed_sec"]
    assert [int(r["step"]) for r in rows] == [0, 10, 20, 30]
    assert int(rows[-1]["tokens_seen"]) == 30 * 8 * TINY_MODEL["block_size"]
    best_row = min(rows, key=lambda r: float(r["val_loss"]))
    _, meta = read_weights(tiny_run / "best.safetensors")
    assert int(meta["step"]) == int(best_row["step"])
    summary = run_summary(tiny_run)
    assert summary["best_val_loss"] == pytest.approx(float(best_row["val_loss"]))
    assert summary["steps"] == 30


def test_loss_goes_down(tiny_run):
    with open(tiny_run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"]) - 0.5


def test_schedule_warms_up_then_decays_to_the_floor():
    _, cfg = resolve_config(overrides=dict(learning_rate=1e-3, warmup_iters=10, min_lr_ratio=0.1))
    lrs = [learning_rate(s, cfg, 100) for s in range(101)]
    assert lrs[0] < lrs[5] < lrs[9] <= 1e-3
    assert max(lrs) == pytest.approx(1e-3, rel=1e-6)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == pytest.approx(1e-4)


def test_resume_continues_the_same_run(tmp_path, char_data):
    model_cfg, cfg = tiny_cfg(char_data, tmp_path / "r", max_iters=20)
    train(model_cfg, cfg, quiet=True)
    model_cfg, cfg = tiny_cfg(char_data, tmp_path / "r", max_iters=40)
    result = train(model_cfg, cfg, resume=True, quiet=True)
    assert result.steps == 40
    with open(tmp_path / "r" / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == [0, 10, 20, 30, 40]  # continued, not restarted, no duplicate row


def test_resumed_run_matches_an_uninterrupted_one(tmp_path, char_data):
    straight = train(*tiny_cfg(char_data, tmp_path / "a", max_iters=30), quiet=True)
    # interrupted at step 20 (a run planned for 30 steps, stopped by its own step count, then extended)
    first = tiny_cfg(char_data, tmp_path / "b", max_iters=20, lr_decay_iters=30)
    train(*first, quiet=True)
    second = tiny_cfg(char_data, tmp_path / "b", max_iters=30, lr_decay_iters=30)
    resumed = train(*second, resume=True, quiet=True)
    again = train(*tiny_cfg(char_data, tmp_path / "c", max_iters=30, lr_decay_iters=30), quiet=True)
    assert resumed.final_val_loss == again.final_val_loss
    assert straight.steps == resumed.steps == 30


def test_target_loss_stops_early(tmp_path, char_data):
    result = train(*tiny_cfg(char_data, tmp_path / "r", max_iters=500, target_loss=3.3, eval_interval=5), quiet=True)
    assert result.steps < 500
    assert result.best_val_loss <= 3.3


def test_epochs_set_the_number_of_steps(tmp_path, char_data):
    meta = json.loads((char_data / "meta.json").read_text())
    result = train(*tiny_cfg(char_data, tmp_path / "r", epochs=0.5, sampler="sliding", stride=32), quiet=True)
    windows = len(range(0, meta["train_tokens"] - 32, 32))
    assert result.steps == math.ceil(0.5 * windows / 8)


def test_gradient_accumulation_equals_a_bigger_batch(tmp_path, char_data):
    big = train(*tiny_cfg(char_data, tmp_path / "a", batch_size=8, grad_accum=1, max_iters=10), quiet=True)
    acc = train(*tiny_cfg(char_data, tmp_path / "b", batch_size=4, grad_accum=2, max_iters=10, eval_iters=4), quiet=True)
    # same 80 windows in the same order, same maths; evals differ in batch size, so compare weights
    wa, _ = read_weights(tmp_path / "a" / "last.safetensors")
    wb, _ = read_weights(tmp_path / "b" / "last.safetensors")
    assert big.steps == acc.steps == 10
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k


def test_bfloat16_on_a_cpu_without_native_support_falls_back_to_float32(capsys):
    if cpu_has_native_bf16():
        pytest.skip("this CPU has native bf16")
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.float32
    assert "float32" in capsys.readouterr().err


def test_learns_shakespeare_in_a_few_hundred_steps(tmp_path):
    from gptlab.data import prepare

    data = prepare(["shakespeare"], "char", tmp_path / "data", log=lambda *a: None)
    model_cfg, cfg = resolve_config("cpu-tiny", None, dict(data=str(data), out=str(tmp_path / "run"), max_iters=400,
                                                            eval_interval=200, num_samples=1, sample_tokens=50))
    result = train(model_cfg, cfg, quiet=True)
    assert result.best_val_loss < 2.5


@pytest.mark.slow
def test_cpu_tiny_reaches_nanogpt_quality_in_2000_steps(tmp_path):
    from gptlab.data import prepare

    data = prepare(["shakespeare"], "char", tmp_path / "data", log=lambda *a: None)
    model_cfg, cfg = resolve_config("cpu-tiny", None, dict(data=str(data), out=str(tmp_path / "run")))
    result = train(model_cfg, cfg, quiet=True)
    assert result.steps == 2000
    assert result.best_val_loss <= 1.95


def test_time_budget_stops_on_the_clock_and_decays_over_it(tmp_path, char_data):
    result = train(*tiny_cfg(char_data, tmp_path / "r", time="4s", max_iters=10**6, eval_interval=10**6,
                             warmup_iters=1, min_lr_ratio=0.1), quiet=True)
    assert 4.0 <= result.elapsed_sec < 12.0
    with open(tmp_path / "r" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["0", str(result.steps)]  # a final evaluation when time is up
    assert float(rows[-1]["lr"]) == pytest.approx(3e-4, rel=0.05)  # decayed to the floor with the clock


def test_a_time_budget_is_not_spent_scoring(tmp_path, char_data, capsys):
    """Evaluations that would eat the budget (here 2 x 100,000 batches) are cut to fit 5% of it, and recorded."""
    result = train(*tiny_cfg(char_data, tmp_path / "r", time="4s", max_iters=10**6, eval_interval=10**6,
                             eval_iters=100_000), quiet=True)
    assert 4.0 <= result.elapsed_sec < 12.0 and result.steps > 20  # it trained, and on time
    err = capsys.readouterr().err
    assert "warning: one evaluation of 100000 batches per split would take" in err and "of the 4s budget" in err
    kept = json.loads((tmp_path / "r" / "config.json").read_text())["train"]["eval_iters"]
    assert 1 <= kept < 1000 and f"(--eval-iters {kept})" in err


def test_compile_auto_is_on_for_cuda_and_for_long_cpu_budgets_only():
    assert compile_wanted("auto", "cuda", 0.0)
    assert not compile_wanted("auto", "cpu", 0.0)  # a step count: the run may be over before compile pays
    assert not compile_wanted("auto", "cpu", 5 * 60)
    assert compile_wanted("auto", "cpu", CPU_COMPILE_MIN_BUDGET_SEC)
    assert not compile_wanted("auto", "mps", 10 * CPU_COMPILE_MIN_BUDGET_SEC)
    assert compile_wanted("on", "cpu", 0.0) and not compile_wanted("off", "cuda", 0.0)


@pytest.mark.slow
def test_compiled_cpu_training_follows_the_eager_run(tmp_path, char_data, capsys):
    eager = train(*tiny_cfg(char_data, tmp_path / "eager", max_iters=8, num_samples=0, compile="off"), quiet=True)
    compiled = train(*tiny_cfg(char_data, tmp_path / "compiled", max_iters=8, num_samples=0, compile="on"))
    printed = capsys.readouterr()
    assert "compiled" in printed.out and "torch.compile" not in printed.err  # no fallback to eager
    we, _ = read_weights(tmp_path / "eager" / "last.safetensors")
    wc, _ = read_weights(tmp_path / "compiled" / "last.safetensors")
    for k in we:  # the same maths, summed in another order
        assert torch.allclose(we[k], wc[k], atol=1e-4), k
    assert compiled.final_val_loss == pytest.approx(eager.final_val_loss, abs=1e-3)
