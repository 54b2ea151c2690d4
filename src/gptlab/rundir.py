"""The run folder without torch: its file names, config.json, metrics.csv, and what `gptlab info` says of it.

A run folder holds:
    config.json         model + training + tokenizer settings, the resolved values
    tokenizer.json      the tokenizer (plus gpt2.tiktoken or hf_tokenizer.json for BPE kinds)
    best.safetensors    weights with the lowest val loss so far
    last.safetensors    weights at the latest evaluation (what --resume continues from)
    train_state.pt      optimizer, step, RNG states, data position (tensors and plain types only)
    metrics.csv         one row per evaluation
    loss.png            train and val loss against steps and tokens seen
    samples.txt         a few samples from the best weights

The weights and the training state are read and written by `checkpoint.py` (which needs torch);
everything else about a run folder is here, so the server, `info` and the exporters can describe a
run without loading a model.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gptlab.config import ModelConfig, TrainConfig, read_config_file
from gptlab.errors import GptlabError
from gptlab.fsutil import atomic_write_text, read_json_object

CONFIG = "config.json"
BEST = "best.safetensors"
LAST = "last.safetensors"
TRAIN_STATE = "train_state.pt"
METRICS = "metrics.csv"
LOSS_PLOT = "loss.png"
SAMPLES = "samples.txt"
TEMPERATURE_PLOT = "temperature.png"
TOKENIZER_FILES = ("tokenizer.json", "gpt2.tiktoken", "hf_tokenizer.json")
CHECKPOINT_FILES = (BEST, LAST, TRAIN_STATE)
RUN_FILES = (CONFIG, BEST, LAST, TRAIN_STATE, METRICS, LOSS_PLOT, SAMPLES) + TOKENIZER_FILES
METRIC_COLUMNS = ("step", "tokens_seen", "epoch", "lr", "train_loss", "val_loss", "tokens_per_sec", "elapsed_sec")


def default_run_dir(data_dir: str | Path) -> Path:
    """runs/<data folder name>: where a run goes when --out is not given."""
    return Path("runs") / Path(data_dir).resolve().name


def write_run_config(run_dir: Path, model: ModelConfig, train: TrainConfig, tokenizer: dict[str, Any]) -> None:
    """Write config.json: the resolved model, training and tokenizer settings."""
    import json

    payload = {"model": asdict(model), "train": asdict(train), "tokenizer": tokenizer}
    atomic_write_text(run_dir / CONFIG, json.dumps(payload, indent=1) + "\n")


def read_run_config(run_dir: str | Path) -> tuple[ModelConfig, TrainConfig, dict[str, Any]]:
    """Model and train configs plus the tokenizer summary from a run's config.json."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GptlabError(f"run folder {run_dir} not found; train one with `gptlab train --out {run_dir}`")
    if not (run_dir / CONFIG).is_file():
        raise GptlabError(f"{run_dir} has no config.json, so it is not a gptlab run folder")
    model, train = read_config_file(run_dir / CONFIG)
    raw = read_json_object(run_dir / CONFIG, f"{run_dir / CONFIG} not found")
    tokenizer = raw.get("tokenizer", {})
    return ModelConfig(**model), TrainConfig(**train), tokenizer if isinstance(tokenizer, dict) else {}


def is_run_dir(path: Path) -> bool:
    """Whether `path` already holds a gptlab run."""
    return (path / CONFIG).is_file() or (path / LAST).is_file() or (path / BEST).is_file()


def clear_run_dir(run_dir: Path) -> None:
    """Remove the files of a previous run (only ours, nothing else in the folder)."""
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)


def weights_path(run_dir: Path, checkpoint: str) -> Path:
    """The weights file a --checkpoint value names: best, last, or a path to a .safetensors file."""
    if checkpoint == "best":
        path = run_dir / BEST
        return path if path.is_file() else run_dir / LAST
    if checkpoint == "last":
        return run_dir / LAST
    path = Path(checkpoint)
    if path.suffix != ".safetensors":
        raise GptlabError(f"--checkpoint must be best, last or a .safetensors file, got {checkpoint!r}")
    return path


class MetricsLog:
    """metrics.csv: one row per evaluation, rewritten atomically on each append."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []

    def load(self, up_to_step: int | None = None) -> None:
        """Read existing rows (when resuming), dropping any after `up_to_step`."""
        if not self.path.is_file():
            return
        with open(self.path, newline="", encoding="utf-8") as f:
            self.rows = list(csv.DictReader(f))
        if up_to_step is not None:
            self.truncate(up_to_step)

    def truncate(self, step: int) -> None:
        """Forget rows after `step` (a rollback returns there; the file is rewritten on the next append)."""
        self.rows = [r for r in self.rows if int(r["step"]) <= step]

    def append(self, row: dict[str, Any], hint: str = "") -> None:
        """Add a row and rewrite the file."""
        self.rows.append(row)
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=METRIC_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, out.getvalue(), hint)


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """The rows of a run's metrics.csv as numbers (empty values become NaN)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            rows.append({k: float(v) if v not in ("", None) else float("nan") for k, v in row.items()})
    return rows


def run_summary(run_dir: str | Path) -> dict[str, Any]:
    """What `gptlab info` shows about a run folder."""
    run_dir = Path(run_dir)
    model_cfg, train_cfg, tok = read_run_config(run_dir)
    rows = read_metrics(run_dir)
    vals = [r["val_loss"] for r in rows if not math.isnan(r["val_loss"])]
    files = {name: str((run_dir / name).resolve()) for name in RUN_FILES if (run_dir / name).is_file()}
    return {
        "run": str(run_dir.resolve()),
        "params": model_cfg.num_params(),
        "model": asdict(model_cfg),
        "tokenizer": tok,
        "data": train_cfg.data,
        "steps": int(rows[-1]["step"]) if rows else 0,
        "tokens_seen": int(rows[-1]["tokens_seen"]) if rows else 0,
        "elapsed_sec": rows[-1]["elapsed_sec"] if rows else 0.0,
        "best_val_loss": min(vals) if vals else None,
        "last_val_loss": vals[-1] if vals else None,
        "files": files,
    }
