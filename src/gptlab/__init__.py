"""gptlab: from a plain text file to a GPT you trained yourself."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gptlab.errors import GptlabError

if TYPE_CHECKING:
    from gptlab.generation import TextModel

__version__ = "0.1.0"

__all__ = ["GptlabError", "__version__", "load"]


def load(run_dir: str | Path, checkpoint: str = "best", device: str = "auto") -> TextModel:
    """A trained run ready to generate text: `load("runs/x").generate("ROMEO:")` (torch loads on first use)."""
    from gptlab.generation import load as load_run

    return load_run(run_dir, checkpoint, device)
