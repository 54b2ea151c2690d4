"""The run folder: what is in it, writing it atomically, and loading it back.

A run folder holds:
    config.json         model + training + tokenizer settings, the resolved values
    tokenizer.json      the tokenizer (plus gpt2.tiktoken or hf_tokenizer.json for BPE kinds)
    best.safetensors    weights with the lowest val loss so far
    last.safetensors    weights at the latest evaluation (what --resume continues from)
    train_state.pt      optimizer, step, RNG states, data position (tensors and plain types only,
                        loaded with weights_only=True, so nothing is unpickled)
    metrics.csv         one row per evaluation
    loss.png            train and val loss against steps and tokens seen
    samples.txt         a few samples from the best weights

Every file is written to a temporary name in the same folder, fsynced and renamed, so a crash or a
full disk leaves the previous version, never half of a new one.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from gptlab.config import ModelConfig, TrainConfig, read_config_file
from gptlab.errors import GptlabError

CONFIG = "config.json"
BEST = "best.safetensors"
LAST = "last.safetensors"
TRAIN_STATE = "train_state.pt"
METRICS = "metrics.csv"
LOSS_PLOT = "loss.png"
SAMPLES = "samples.txt"
TOKENIZER_FILES = ("tokenizer.json", "gpt2.tiktoken", "hf_tokenizer.json")
RUN_FILES = (CONFIG, BEST, LAST, TRAIN_STATE, METRICS, LOSS_PLOT, SAMPLES) + TOKENIZER_FILES
METRIC_COLUMNS = ("step", "tokens_seen", "epoch", "lr", "train_loss", "val_loss", "tokens_per_sec", "elapsed_sec")
TIED_KEYS = ("lm_head.weight",)  # shares storage with transformer.wte.weight; stored once


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], run_dir: str | Path | None = None) -> None:
    """Write `path` through `write(file)` into a temporary file, fsync it, and rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        hint = f"; resume with `gptlab train --resume {run_dir}`" if run_dir else ""
        kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
        raise GptlabError(f"could not write {path} ({e.strerror or e}); {kept}; free disk space{hint}") from None


def atomic_write_text(path: str | Path, text: str, run_dir: str | Path | None = None) -> None:
    """Atomically write UTF-8 text."""
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data), run_dir)


def state_dict_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors with tied copies dropped (safetensors refuses shared storage)."""
    return {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in TIED_KEYS}


def _weights_bytes(model: torch.nn.Module, metadata: dict[str, Any] | None) -> bytes:
    from safetensors.torch import save

    meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    return save(state_dict_for_saving(model), metadata=meta)


def save_weights(path: str | Path, model: torch.nn.Module, metadata: dict[str, Any] | None = None, run_dir: Any = None) -> None:
    """Write the model's weights as safetensors, atomically."""
    data = _weights_bytes(model, metadata)
    atomic_write(path, lambda f: f.write(data), run_dir)


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, with a one-line error when it is broken."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise GptlabError(f"weights file {path} not found; train the run first or pick another folder")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for truncation and garbage
        raise GptlabError(f"weights file {path} is corrupt or truncated ({type(e).__name__}); use another checkpoint (best/last) or retrain") from None
    return tensors, metadata


def load_weights_into(model: torch.nn.Module, path: str | Path) -> dict[str, str]:
    """Load a safetensors file into `model`, checking every name and shape; returns its metadata."""
    tensors, metadata = read_weights(path)
    expected = {k: v.shape for k, v in model.state_dict().items() if k not in TIED_KEYS}
    got = {k: v.shape for k, v in tensors.items()}
    if expected != got:
        missing = sorted(set(expected) - set(got))
        wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
        detail = f"missing {missing[0]}" if missing else (
            f"{wrong[0]} is {tuple(got[wrong[0]])}, the config says {tuple(expected[wrong[0]])}" if wrong
            else f"unexpected {sorted(set(got) - set(expected))[0]}")
        raise GptlabError(f"weights in {path} do not fit the model in config.json ({detail}); the files come from different runs")
    model.load_state_dict(tensors, strict=False)
    return metadata


def load_train_state(path: str | Path) -> dict[str, Any]:
    """Read the training state with weights_only=True; a broken file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise GptlabError(f"{path} not found, so this run cannot be resumed; start it again with --overwrite")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise GptlabError(f"training state {path} is corrupt or truncated ({type(e).__name__}); start again with --overwrite") from None


def _staged(path: Path) -> Path:
    return path.with_name(f".{path.name}.new")


def save_resume_point(run_dir: Path, model: torch.nn.Module, state: dict[str, Any], metadata: dict[str, Any]) -> None:
    """Write last.safetensors and train_state.pt as one unit, so a kill never pairs new weights with old state.

    Both files are first written completely (temp file, fsync, rename) under staged names; the staged
    train state is the commit mark. Then both are renamed into place. `recover_resume_point` finishes
    an interrupted commit, or discards an incomplete one.
    """
    weights = _weights_bytes(model, metadata)
    buffer = io.BytesIO()
    torch.save(state, buffer)  # tensors and plain types only: loads back with weights_only=True
    atomic_write(_staged(run_dir / LAST), lambda f: f.write(weights), run_dir)
    atomic_write(_staged(run_dir / TRAIN_STATE), lambda f: f.write(buffer.getvalue()), run_dir)
    _commit_staged(run_dir)


def _commit_staged(run_dir: Path) -> None:
    last, train_state = run_dir / LAST, run_dir / TRAIN_STATE
    if _staged(train_state).exists():
        if _staged(last).exists():
            os.replace(_staged(last), last)
        os.replace(_staged(train_state), train_state)
    else:
        _staged(last).unlink(missing_ok=True)


def recover_resume_point(run_dir: Path) -> None:
    """Complete a committed but unfinished save of the resume point, drop an uncommitted one, clear temp files."""
    _commit_staged(run_dir)
    for leftover in run_dir.glob(".*.tmp"):
        leftover.unlink(missing_ok=True)


def write_run_config(run_dir: Path, model: ModelConfig, train: TrainConfig, tokenizer: dict[str, Any]) -> None:
    """Write config.json: the resolved model, training and tokenizer settings."""
    from dataclasses import asdict

    payload = {"model": asdict(model), "train": asdict(train), "tokenizer": tokenizer}
    atomic_write_text(run_dir / CONFIG, json.dumps(payload, indent=1) + "\n", run_dir)


def read_run_config(run_dir: str | Path) -> tuple[ModelConfig, TrainConfig, dict[str, Any]]:
    """Model and train configs plus the tokenizer summary from a run's config.json."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GptlabError(f"run folder {run_dir} not found; train one with `gptlab train --out {run_dir}`")
    if not (run_dir / CONFIG).is_file():
        raise GptlabError(f"{run_dir} has no config.json, so it is not a gptlab run folder")
    model, train = read_config_file(run_dir / CONFIG)
    raw = json.loads((run_dir / CONFIG).read_text(encoding="utf-8"))
    return ModelConfig(**model), TrainConfig(**train), raw.get("tokenizer", {})


def is_run_dir(path: Path) -> bool:
    """Whether `path` already holds a gptlab run."""
    return (path / CONFIG).is_file() or (path / LAST).is_file() or (path / BEST).is_file()


def clear_run_dir(run_dir: Path) -> None:
    """Remove the files of a previous run (only ours, nothing else in the folder)."""
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)


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

    def append(self, row: dict[str, Any], run_dir: Path | None = None) -> None:
        """Add a row and rewrite the file."""
        self.rows.append(row)
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=METRIC_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, out.getvalue(), run_dir)


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
