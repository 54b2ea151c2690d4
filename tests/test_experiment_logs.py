"""--log tensorboard and --log wandb: real training runs, their logs read back with each tool's own reader."""

from __future__ import annotations

import csv
import json
import struct
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorboard")
pytest.importorskip("wandb")

import wandb  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from wandb.proto import wandb_internal_pb2  # noqa: E402

from gptlab import cli  # noqa: E402
from gptlab.errors import GptlabError  # noqa: E402
from gptlab.experiment_logs import WANDB_RUN_ID, check_experiment_logs  # noqa: E402

TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8",
        "--eval-iters", "2", "--eval-interval", "20", "--num-samples", "1", "--sample-tokens", "10",
        "--warmup-iters", "5", "--learning-rate", "3e-3", "--quiet"]


@pytest.fixture(autouse=True)
def _wandb_here(tmp_path, monkeypatch):
    """wandb silent, offline, and keeping its own files (settings, caches) in the test's folder."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    for name in ("WANDB_PROJECT", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)


def train(data: Path, out: Path, *flags) -> int:
    code = cli.main(["train", "--data", str(data), "--out", str(out), *TINY, *map(str, flags)])
    wandb.teardown()  # finish() may return before wandb's service has closed the run's files; this waits
    return code


def metrics(run: Path) -> dict[int, dict[str, float]]:
    """metrics.csv's rows by step."""
    with open(run / "metrics.csv", newline="") as f:
        return {int(row["step"]): {k: float(v) for k, v in row.items()} for row in csv.DictReader(f)}


def scalars(run: Path) -> dict[str, dict[int, float]]:
    """The TensorBoard scalars of a run, as TensorBoard itself reads the folder."""
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def wandb_records(path: Path):
    """The records of a W&B transaction log (run-ID.wandb): LevelDB's log format, each record a protobuf.

    A 7-byte file header, then 32 KiB blocks of chunks, each with a 7-byte header (checksum, length,
    type); a record cut across blocks comes as FIRST, MIDDLE..., LAST chunks.
    """
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, parts = 7, []
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding to the end of the block
            pos += room
            continue
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL, or the LAST chunk of a long record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def wandb_run(folder: Path) -> dict:
    """What an offline W&B run folder recorded: its run record, history rows by step, config, exit code."""
    (log,) = folder.glob("run-*.wandb")
    run: dict = {"history": {}}
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["id"], run["name"], run["group"] = record.run.run_id, record.run.display_name, record.run.run_group
            run["project"] = record.run.project
            run["config"] = {item.key: json.loads(item.value_json) for item in record.run.config.update}
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            run["history"][record.history.step.num] = row
        elif kind == "exit":
            run["exit_code"] = record.exit.exit_code
    return run


def offline_runs(run: Path) -> list[dict]:
    """The offline W&B runs in a run folder, oldest first."""
    return [wandb_run(folder) for folder in sorted((run / "wandb").glob("offline-run-*"))]


def test_tensorboard_scalars_are_the_metrics_csv_values(tmp_path, char_data):
    run = tmp_path / "tb"
    assert train(char_data, run, "--max-iters", 60, "--log", "tensorboard", "--live-sample-tokens", 8) == 0
    rows, logged = metrics(run), scalars(run)
    assert sorted(logged["val_loss"]) == sorted(rows) == [0, 20, 40, 60]
    for step, row in rows.items():
        for name in ("train_loss", "val_loss", "tokens_seen"):
            assert logged[name][step] == pytest.approx(row[name], abs=1e-5)
    assert logged["lr"] and logged["tokens_per_sec"]  # from the progress events, about once a second
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    (config,) = events.Tensors("config/text_summary")
    assert b'"n_embd": 32' in config.tensor_proto.string_val[0]
    assert [e.step for e in events.Tensors("sample/text_summary")] == [0, 20, 40, 60]
    assert not (run / "wandb").exists()


def test_wandb_offline_history_is_the_metrics_csv_values(tmp_path, char_data):
    run = tmp_path / "wb"
    assert train(char_data, run, "--max-iters", 60, "--log", "wandb") == 0
    (logged,) = offline_runs(run)
    assert (logged["project"], logged["name"], logged["exit_code"]) == ("gptlab", "wb", 0)
    assert logged["config"]["model"]["n_embd"] == 32 and logged["config"]["train"]["max_iters"] == 60
    rows = metrics(run)
    evaluated = {step: row for step, row in logged["history"].items() if "val_loss" in row}
    assert sorted(evaluated) == sorted(rows) == [0, 20, 40, 60]
    for step, row in rows.items():
        for name in ("train_loss", "val_loss", "tokens_seen"):
            assert evaluated[step][name] == pytest.approx(row[name], abs=1e-5)
    assert (run / "wandb" / WANDB_RUN_ID).read_text().strip() == logged["id"]
    assert not (run / "tensorboard").exists()


def test_resume_appends_to_the_same_logs(tmp_path, char_data, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")  # unset: gptlab's default is offline, no network wanted
    run = tmp_path / "r"
    assert train(char_data, run, "--max-iters", 40, "--log", "tensorboard,wandb") == 0
    assert train(char_data, run, "--max-iters", 80, "--log", "tensorboard,wandb", "--resume", run) == 0
    rows, logged = metrics(run), scalars(run)
    assert sorted(rows) == sorted(logged["val_loss"]) == [0, 20, 40, 60, 80]
    for step, row in rows.items():
        assert logged["val_loss"][step] == pytest.approx(row["val_loss"], abs=1e-5)
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one per session

    first, second = offline_runs(run)
    assert first["group"] == second["group"] == "r"  # offline, each session is its own W&B run
    assert max(first["history"]) <= 40 < min(second["history"])
    evaluated = {step: r["val_loss"] for part in (first, second) for step, r in part["history"].items()
                 if "val_loss" in r}
    assert sorted(evaluated) == [0, 20, 40, 60, 80]
    assert all(evaluated[step] == pytest.approx(row["val_loss"], abs=1e-5) for step, row in rows.items())


def test_overwrite_removes_the_old_logs_and_nothing_else(tmp_path, char_data):
    run = tmp_path / "o"
    assert train(char_data, run, "--max-iters", 20, "--log", "tensorboard,wandb") == 0
    (old_events,) = (run / "tensorboard").glob("events.out.tfevents.*")
    (run / "tensorboard" / "notes.txt").write_text("mine")
    assert train(char_data, run, "--max-iters", 40, "--log", "tensorboard", "--overwrite") == 0
    assert not old_events.exists() and (run / "tensorboard" / "notes.txt").read_text() == "mine"
    assert not (run / "wandb").exists()  # held only what W&B and gptlab wrote
    assert sorted(scalars(run)["val_loss"]) == sorted(metrics(run)) == [0, 20, 40]


def test_an_unknown_log_kind_is_one_line_and_nothing_is_trained(tmp_path, char_data, capsys):
    run = tmp_path / "n"
    assert train(char_data, run, "--max-iters", 20, "--log", "tensorboard,nonsense") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--log 'nonsense' is not a kind of log" in err
    assert not (run / "metrics.csv").exists() and not (run / "tensorboard").exists()


def test_a_missing_package_names_its_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what Python does for a package that is not installed
    with pytest.raises(GptlabError, match=r"--log wandb needs the wandb package.*`pip install wandb`") as e:
        check_experiment_logs("tensorboard,wandb")
    assert "\n" not in str(e.value)
