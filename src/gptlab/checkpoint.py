"""Weights and training state on disk: safetensors for weights, a weights-only torch file for the rest.

The files of a run folder are named in `rundir.py`. Every write is atomic (`fsutil.atomic_write`),
and the resume point (last.safetensors + train_state.pt) is committed as one unit, so a kill never
pairs new weights with an old state. train_state.pt holds tensors and plain types only and is read
with weights_only=True, so nothing is unpickled.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from gptlab.errors import GptlabError
from gptlab.fsutil import atomic_write_bytes
from gptlab.rundir import LAST, TRAIN_STATE

HEAD = "lm_head.weight"  # the output head, which a tied model shares with its token embedding


def resume_hint(run_dir: str | Path | None) -> str:
    """What to tell a user whose run stopped on a failed write: resume only when there is a point to resume from."""
    if run_dir is None:
        return ""
    run_dir = Path(run_dir)
    if (run_dir / LAST).is_file() and (run_dir / TRAIN_STATE).is_file():
        return f"; then continue with `gptlab train --resume {run_dir}`"
    return f"; then start the run again (`gptlab train ... --out {run_dir} --overwrite`)"


def state_dict_for_saving(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors with tied copies dropped (safetensors refuses shared storage): a tensor that
    shares its storage with an earlier one (a tied output head) is left out, and the earlier one kept."""
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[name] = tensor.detach().contiguous().cpu()
    return out


def with_tied_head(tensors: dict[str, torch.Tensor], model_cfg: Any) -> dict[str, torch.Tensor]:
    """`tensors` as `load_state_dict` takes them strictly: a tied head (left out when saved) named too, as the
    token embedding itself (the first tensor `ModelConfig.param_shapes` names)."""
    if HEAD in tensors or not model_cfg.tie_embeddings:
        return tensors
    return {**tensors, HEAD: tensors[next(iter(model_cfg.param_shapes()))]}


def _weights_bytes(model: torch.nn.Module, metadata: dict[str, Any] | None) -> bytes:
    from safetensors.torch import save

    meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    return save(state_dict_for_saving(model), metadata=meta)


def save_weights(path: str | Path, model: torch.nn.Module, metadata: dict[str, Any] | None = None, run_dir: Any = None) -> None:
    """Write the model's weights as safetensors, atomically."""
    data = _weights_bytes(model, metadata)
    atomic_write_bytes(path, data, resume_hint(run_dir))


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
    expected = {k: v.shape for k, v in state_dict_for_saving(model).items()}
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
    atomic_write_bytes(_staged(run_dir / LAST), weights, resume_hint(run_dir))
    atomic_write_bytes(_staged(run_dir / TRAIN_STATE), buffer.getvalue(), resume_hint(run_dir))
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
