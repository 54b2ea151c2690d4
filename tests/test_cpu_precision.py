"""bf16 autocast or float32 on a CPU: forced both ways through the real CLI, the measurement and its cache.

The three `gptlab train` runs (forced off, forced on, a bad value) start together in one
module fixture, each in its own process with one thread, and each test checks its own. The cache
tests run the real probe at a small width (tens of ms) into a temporary cache folder.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptlab import cpu_bf16, device
from gptlab.checkpoint import read_weights
from gptlab.config import ModelConfig
from gptlab.cpu_bf16 import CPU_BF16_ENV, bf16_speedup, cache_path, cpu_bf16_choice
from gptlab.device import resolve_dtype
from gptlab.errors import GptlabError
from gptlab.model import GPT
from gptlab.rundir import EVENTS, TRAIN_STATE, read_metrics
from gptlab.train import model_loss

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
TINY = ("--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4",
        "--max-iters", "4", "--eval-interval", "2", "--eval-iters", "1", "--num-samples", "0")
PROBE_WIDTH = 64  # small enough to measure in tens of ms, even where bf16 is slow


def gptlab_train(data: Path, out: Path, cache: Path, bf16: str) -> subprocess.CompletedProcess:
    """`gptlab train` on `data` into `out` with GPTLAB_CPU_BF16=`bf16`, one thread, a private home and cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPTLAB_")}
    env.update(GPTLAB_HOME=str(cache), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")])))
    env[CPU_BF16_ENV] = bf16
    argv = [sys.executable, "-m", "gptlab", "train", "--data", str(data), "--out", str(out), *TINY]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def runs(char_data, tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """The run folder and the finished process of each forced setting, run at once."""
    root = tmp_path_factory.mktemp("precision")
    settings = {"float32": "0", "bfloat16": "1", "bad": "yes"}
    with concurrent.futures.ThreadPoolExecutor(len(settings)) as pool:
        jobs = {name: pool.submit(gptlab_train, char_data, root / name / "run", root / name / "cache", value)
                for name, value in settings.items()}
        return {name: (root / name / "run", job.result()) for name, job in jobs.items()}


def start_event(run: Path) -> dict:
    events = [json.loads(line) for line in (run / EVENTS).read_text().splitlines()]
    return next(e for e in events if e["event"] == "start")


def test_forced_off_trains_in_float32_and_says_so(runs):
    run, proc = runs["float32"]
    assert proc.returncode == 0, proc.stderr
    assert f"precision: float32 (forced by {CPU_BF16_ENV}=0)" in proc.stdout
    assert "device cpu, float32" in proc.stdout
    assert start_event(run)["dtype"] == "float32"
    assert not (run.parent / "cache").exists(), "nothing is measured when the choice is forced"


def test_forced_on_trains_under_bf16_autocast_with_float32_weights_and_state(runs):
    run, proc = runs["bfloat16"]
    assert proc.returncode == 0, proc.stderr
    assert f"precision: bfloat16 autocast (forced by {CPU_BF16_ENV}=1)" in proc.stdout
    assert "device cpu, bfloat16" in proc.stdout
    assert start_event(run)["dtype"] == "bfloat16"
    rows = read_metrics(run)
    assert rows and all(math.isfinite(r["train_loss"]) and math.isfinite(r["val_loss"]) for r in rows)
    # autocast computes in bf16 but keeps what is stored in float32: the weights and AdamW's moments
    weights, _ = read_weights(run / "last.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}
    state = torch.load(run / TRAIN_STATE, weights_only=True)
    moments = [t for s in state["optimizer"]["state"].values() for t in s.values() if torch.is_tensor(t) and t.dim()]
    assert moments and {t.dtype for t in moments} == {torch.float32}


def test_a_bad_value_is_one_line_naming_the_variable(runs):
    _, proc = runs["bad"]
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert CPU_BF16_ENV in lines[0] and "'yes'" in lines[0] and "1" in lines[0] and "0" in lines[0]


def test_forcing_decides_without_measuring(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("GPTLAB_HOME", str(tmp_path))
    monkeypatch.setenv(CPU_BF16_ENV, "1")
    assert resolve_dtype("auto", CPU) == torch.bfloat16
    assert resolve_dtype("bfloat16", CPU) == torch.bfloat16
    monkeypatch.setenv(CPU_BF16_ENV, "0")
    assert resolve_dtype("auto", CPU, width=768) == torch.float32
    assert resolve_dtype("bfloat16", CPU) == torch.float32  # as on a CPU without bf16 instructions
    assert resolve_dtype("float32", CPU) == torch.float32
    captured = capsys.readouterr()
    out, err = captured.out.splitlines(), captured.err.splitlines()
    assert out == [f"precision: bfloat16 autocast (forced by {CPU_BF16_ENV}=1)",
                   f"precision: float32 (forced by {CPU_BF16_ENV}=0)"]
    assert err[0].startswith("warning: --dtype bfloat16 on a CPU without native bf16") and len(err) == 1
    assert list(tmp_path.iterdir()) == []
    assert resolve_dtype("auto", CPU, quiet=True) == torch.float32
    assert capsys.readouterr().out == ""
    monkeypatch.setenv(CPU_BF16_ENV, "true")
    with pytest.raises(GptlabError, match=f"{CPU_BF16_ENV} must be 1 .* or 0"):
        resolve_dtype("auto", CPU)


def test_the_loss_stays_float32_under_bf16_autocast():
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50, dropout=0.0))
    x = torch.randint(0, 50, (2, 16))
    with device.autocast_for(CPU, torch.bfloat16)():
        assert model(x).dtype == torch.bfloat16
        loss = model_loss(model)(x, x)
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())


def test_the_measurement_is_cached_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTLAB_HOME", str(tmp_path / "cache"))
    path = cache_path()
    assert path == tmp_path / "cache" / "cpu.json"
    probe, kept = bf16_speedup(PROBE_WIDTH)
    assert kept == f"cached in {path}"
    assert probe.speedup > 0 and probe.width == PROBE_WIDTH and probe.float32_ms > 0 and probe.bfloat16_ms > 0
    data = json.loads(path.read_text())
    assert data["format"] == 1
    (machine,) = data["machines"]
    assert torch.__version__ in machine and f"{os.cpu_count()} cores" in machine
    assert data["machines"][machine][f"{PROBE_WIDTH} wide"]["speedup"] == probe.speedup
    assert [p.name for p in path.parent.iterdir()] == ["cpu.json"], "no temporary file left behind"

    written = path.stat().st_mtime_ns
    start = time.perf_counter()
    again, kept = bf16_speedup(PROBE_WIDTH)
    assert time.perf_counter() - start < 0.05
    assert again == probe, "the second call reads the first one's measurement (same time stamp and figures)"
    assert kept == f"measured {probe.measured_at[:10]}, kept in {path}"
    assert path.stat().st_mtime_ns == written

    bf16_speedup(PROBE_WIDTH + 32)  # another width is measured and kept beside the first
    assert set(json.loads(path.read_text())["machines"][machine]) == {f"{PROBE_WIDTH} wide", f"{PROBE_WIDTH + 32} wide"}


@pytest.mark.parametrize("damage", [b"{not json", b'{"format": 1, "machines": []}', b"[1, 2]", b"\xff\xfe",
                                    b'{"format": 1, "machines": {"%s": {"64 wide": {"speedup": "fast"}}}}'])
def test_a_damaged_cache_is_measured_again_and_replaced(monkeypatch, tmp_path, damage):
    monkeypatch.setenv("GPTLAB_HOME", str(tmp_path))
    machine = cpu_bf16.detect_cpu_bf16().machine_key()
    (tmp_path / "cpu.json").write_bytes(damage.replace(b"%s", machine.encode()))
    probe, kept = bf16_speedup(PROBE_WIDTH)
    assert kept.startswith("cached in") and probe.speedup > 0
    assert json.loads((tmp_path / "cpu.json").read_text())["machines"][machine][f"{PROBE_WIDTH} wide"]["speedup"] > 0


def test_an_unwritable_cache_is_skipped(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("GPTLAB_HOME", str(blocker / "cache"))  # a folder inside a file cannot be made
    probe, kept = bf16_speedup(PROBE_WIDTH)
    assert kept.startswith("not cached: ") and probe.speedup > 0


def test_the_cache_folder_is_gptlab_home(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTLAB_HOME", str(tmp_path / "mine"))
    assert cache_path() == tmp_path / "mine" / "cpu.json"
    monkeypatch.delenv("GPTLAB_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_path() == tmp_path / "home" / ".cache" / "gptlab" / "cpu.json"


def test_auto_follows_the_measurement_where_the_cpu_has_bf16(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv(CPU_BF16_ENV, raising=False)
    monkeypatch.setenv("GPTLAB_HOME", str(tmp_path))
    cpu = cpu_bf16.detect_cpu_bf16()
    choice = cpu_bf16_choice(PROBE_WIDTH)
    if not cpu.native:
        assert not choice.use and choice.speedup is None and not (tmp_path / "cpu.json").exists()
        return
    assert choice.use == (choice.speedup >= cpu_bf16.BF16_MIN_SPEEDUP)
    dtype = resolve_dtype("auto", CPU, width=PROBE_WIDTH)
    assert dtype == (torch.bfloat16 if choice.use else torch.float32)
    line = capsys.readouterr().out.strip()
    assert line.startswith("precision: ") and f"{choice.speedup:.2f}x float32" in line and cpu.label in line
