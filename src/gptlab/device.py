"""Where and how tensors compute: the device, the training precision, random states and process settings.

Design choices:
- On a CPU, `--dtype auto` trains in bf16 autocast only where that is measurably faster, as
  `cpu_bf16.cpu_bf16_choice` decides (the CPU's flags, a short timing probe, a cache of its answer).
  `auto` says on stdout what it picked and why. `--dtype bfloat16` is obeyed wherever the
  instructions exist, with a warning when the probe found it slower; without them it falls back
  to float32 with a warning, as float16 does on any CPU.
  Autocast keeps the loss, softmax and optimizer state in float32: the weights stay float32, and
  the trainer casts the logits to float32 before its cross-entropy.
- Settings that change the whole process (determinism, TF32, the allocator) are applied by
  `process_settings`, a context manager the entry point holds for as long as it trains: whatever
  was set before is restored when it ends, so a library call leaves the process as it found it.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from gptlab import distributed
from gptlab.cpu_bf16 import cpu_bf16_choice
from gptlab.cpu_memory import keep_freed_memory
from gptlab.errors import GptlabError


def warn(message: str) -> None:
    """A one-line warning on stderr (from rank 0 only)."""
    if distributed.is_main():
        print(f"warning: {message}", file=sys.stderr, flush=True)


def autodetect_device(requested: str = "auto") -> torch.device:
    """cuda, then mps, then cpu; or the device asked for, if it exists."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise GptlabError(f"unknown device {requested!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GptlabError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise GptlabError(f"--device {requested}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise GptlabError("--device mps asked for, but MPS is not available here; use --device cpu or auto")
    return device


def info(message: str) -> None:
    """A one-line note on stdout (from rank 0 only), beside the run's other facts: stderr is for warnings and errors."""
    if distributed.is_main():
        print(message, flush=True)


def _cpu_dtype(requested: str, width: int | None, quiet: bool) -> torch.dtype:
    """--dtype auto or bfloat16 on a CPU: bf16 autocast where it pays (auto) or where it runs at all (asked for)."""
    choice = cpu_bf16_choice(width)
    if requested == "auto":
        if not quiet:
            info(f"precision: {'bfloat16 autocast' if choice.use else 'float32'} ({choice.why})")
        return torch.bfloat16 if choice.use else torch.float32
    if not choice.native:
        warn(f"--dtype bfloat16 on a CPU without native bf16 ({choice.why}); training in float32")
        return torch.float32
    if choice.speedup is not None and choice.speedup < 1:  # the user asked: train as asked, but say what it costs
        warn(f"bf16 autocast measured {choice.speedup:.2f}x float32 on this CPU; training in bfloat16 as asked "
             "(--dtype auto would pick float32)")
    return torch.bfloat16


def resolve_dtype(requested: str, device: torch.device, width: int | None = None, quiet: bool = False) -> torch.dtype:
    """The autocast dtype to train in, falling back to float32 where the hardware cannot do it.

    On a CPU, `auto` and `bfloat16` ask `cpu_bf16_choice`, measuring at `width` (the model's
    embedding width; PROBE_WIDTH when not given). `auto` says what it picked on stdout unless `quiet`.
    """
    if device.type == "cpu" and requested in ("auto", "bfloat16"):
        return _cpu_dtype(requested, width, quiet)
    if requested == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[requested]
    if device.type == "cpu" and dtype == torch.float16:
        warn("float16 training is for GPUs; training in float32 on the CPU")
        return torch.float32
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        warn("this GPU has no bfloat16; training in float16 with a grad scaler")
        return torch.float16
    return dtype


def autocast_for(device: torch.device, dtype: torch.dtype) -> Any:
    """A function returning the autocast context for `dtype` (a no-op context for float32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and plain types (so it saves without pickling objects)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), np_state[2], np_state[3], np_state[4]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def process_settings(device: torch.device, deterministic: bool) -> Iterator[None]:
    """Determinism, TF32 on CUDA and the CPU allocator for training; restored on the way out.

    Deterministic kernels cost GPU speed; TF32 runs float32 matmuls (outside autocast) on tensor cores.
    On a CPU, freed memory stays in the process (gptlab/cpu_memory.py): a large-vocabulary step then
    reuses last step's pages instead of faulting fresh ones in. That one cannot be undone, and
    costs nothing to keep.
    """
    saved = (
        torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=False)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device.type == "cpu":
        keep_freed_memory()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[4], saved[5]
        if saved[6] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[6]
