"""A trained run loaded for export: its settings, tokenizer and model (weights on the CPU)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gptlab.config import ModelConfig, TrainConfig
from gptlab.rundir import read_run_config, weights_path
from gptlab.tokenizer import Tokenizer

if TYPE_CHECKING:
    from gptlab.model import LanguageModel


@dataclass
class ExportSource:
    """A trained run loaded for export: its settings, tokenizer and model (weights on the CPU)."""

    run_dir: Path
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    tokenizer: Tokenizer
    tokenizer_spec: str
    model: LanguageModel
    weights: Path
    name: str = ""  # what the export will be called (its folder name)


def load_source(run_dir: str | Path, checkpoint: str = "best") -> ExportSource:
    """Read a run folder (config, tokenizer, the chosen weights) for export."""
    from gptlab.generation import load  # torch, only when a run is really exported

    run_dir = Path(run_dir)
    tm = load(run_dir, checkpoint, device="cpu")
    _, train_cfg, tok_info = read_run_config(run_dir)
    return ExportSource(run_dir, tm.config, train_cfg, tm.tokenizer, str(tok_info.get("type", tm.tokenizer.name)),
                        tm.model, weights_path(run_dir, checkpoint), run_dir.resolve().name)
