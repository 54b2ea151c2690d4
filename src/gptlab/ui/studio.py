"""What the page and /ui/api both do, in one place: turn a learner's choices into a training job, and control it.

Design choices:
- A job is `gptlab train --data D --out R` plus flags, exactly what a user could type: the page
  adds nothing the command line lacks, and train.log starts with the command.
- The shape is decided here, before the job starts, so the page can show it (and why) first: the
  preset or the custom shape given, or else what `gptlab.sizing` picks for this text, this machine
  and this budget (the same choice `gptlab train TEXT` makes). Every setting is checked by the same
  config rules as the command line, so a bad value is an error on the page, not a failed job.
- Every name from the browser goes through `Workspace.resolve` (or `check_new_name` for a run that
  does not exist yet): nothing typed there reaches the file system outside the app's folders.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.ui.jobs import GENERATION_THREADS, Jobs, train_threads
from gptlab.ui.workspace import Workspace

LIVE_SAMPLE_TOKENS = 200
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")
SHAPE = ("arch", "n_layer", "n_head", "n_embd", "block_size")
# The settings the page and /ui/api take, and their types; anything else is refused by name.
SETTINGS: dict[str, type] = {"arch": str, "n_layer": int, "n_head": int, "n_embd": int, "block_size": int,
                             "batch_size": int, "optimizer": str, "learning_rate": float, "eval_interval": int,
                             "dropout": float, "seed": int}


class UnknownName(GptlabError):
    """A run, data folder or upload named from the browser is not there."""


@dataclass
class Plan:
    """A training job, decided: its run name, the `gptlab train` arguments, and what to tell the learner."""

    run: str
    args: list[str]
    shape: str  # "gpt2 block, 4 layers, ..."
    params: int
    reason: str  # why this shape
    warning: str | None  # the memorisation warning, when the model could learn the text by heart


def check_new_name(name: str, what: str = "run name") -> str:
    """A name for a new folder, typed in the browser: one plain path component, or a one-line error."""
    name = (name or "").strip()
    if not NAME.fullmatch(name) or name in (".", ".."):
        raise GptlabError(f"{what} {name!r} is not allowed; use letters, digits, '.', '_' and '-' (up to 80, "
                          "starting with a letter or digit)")
    return name


class Studio:
    """The app's folders, its training queue, its loaded runs and its exports, behind one set of verbs."""

    def __init__(self, runs_dir: str | Path, data_dir: str | Path, max_upload_bytes: int, limits: Any = None,
                 device: str = "auto") -> None:
        from gptlab.serve.limits import Limits
        from gptlab.ui.loaded import LoadedRuns
        from gptlab.ui.share import Shelf

        self.workspace = Workspace(Path(runs_dir), Path(data_dir), max_upload_bytes)
        self.runs_dir = Path(runs_dir).resolve()
        self.jobs = Jobs(self.runs_dir, train_threads())
        # one generation at a time on the core training leaves (see jobs.py)
        self.limits = limits or Limits(concurrency=1)
        self.models = LoadedRuns(self.runs_dir, self.limits, GENERATION_THREADS, device, self.jobs.generating)
        self.exports = tempfile.TemporaryDirectory(prefix="gptlab-ui-")
        self.shelf = Shelf(Path(self.exports.name))
        self.device = device

    # ---- training

    def plan(self, data: str, run: str | None = None, preset: str | None = None, minutes: float | None = None,
             steps: int | None = None, settings: dict[str, Any] | None = None) -> Plan:
        """The job that these choices make, checked (nothing is written)."""
        from gptlab.config import get_preset, preset_names
        from gptlab.data import read_meta
        from gptlab.device import autodetect_device
        from gptlab.pipeline import training_settings
        from gptlab.sizing import choose, memorisation_warning

        data_dir = self.find("data", data)
        settings = _typed(settings or {})
        if minutes is not None and steps is not None:
            raise GptlabError("give a budget in minutes or in steps, not both")
        overrides: dict[str, Any] = {"data": str(data_dir), **settings}
        if steps is not None:
            overrides["max_iters"] = _positive(steps, "steps", int)
        else:
            overrides["time"] = f"{round(_positive(minutes if minutes is not None else 1.0, 'minutes', float) * 60, 1)}s"
        train_tokens = int(read_meta(data_dir)["train_tokens"])
        if preset and preset != "auto":
            if preset not in preset_names():
                raise GptlabError(f"unknown preset {preset!r}; pick one of {', '.join(preset_names())}")
            reason = f"the {preset} preset"
            model_part = {k: v for k, v in get_preset(preset)["model"].items() if k != "vocab_size"}
            train_part = {k: v for k, v in get_preset(preset)["train"].items() if k not in ("tokenizer", "max_iters")}
            overrides = {**model_part, **train_part, **overrides}
        else:
            budget = float(overrides["time"][:-1]) if "time" in overrides else None
            choice = choose(train_tokens, autodetect_device(self.device).type, set(overrides), budget)
            reason = "your own shape" if choice is None else choice.reason.split("; pass")[0]
            if choice is not None:
                overrides = {**choice.model, **{k: v for k, v in choice.train.items() if k != "time"}, **overrides}
        overrides["live_sample_tokens"] = LIVE_SAMPLE_TOKENS
        name = check_new_name(run) if run else self._free_name(data_dir.name)
        if (self.runs_dir / name).exists():
            raise GptlabError(f"a run named {name} exists already; pick another name (or delete it on the Runs tab)")
        overrides["out"] = str(self.runs_dir / name)
        model_cfg, _, _, _ = training_settings(None, None, None, overrides)  # every setting checked here
        from gptlab.tokenizer import load_tokenizer

        model_cfg = _with_vocab(model_cfg, load_tokenizer(data_dir).vocab_size)
        params = model_cfg.num_params()
        return Plan(run=name, args=["train", *_flags(overrides)], shape=model_cfg.describe(), params=params,
                    reason=reason, warning=memorisation_warning(params, train_tokens))

    def start(self, plan: Plan) -> dict[str, Any]:
        """Queue the planned job; it starts at once when nothing else trains."""
        if (self.runs_dir / plan.run).exists():
            raise GptlabError(f"a run named {plan.run} exists already; pick another name")
        return self.jobs.submit(plan.run, plan.args)

    def stop(self, run: str) -> dict[str, Any]:
        return self.jobs.stop(self.find("run", run).name)

    def resume(self, run: str) -> dict[str, Any]:
        return self.jobs.resume(self.find("run", run).name)

    def status(self, run: str) -> dict[str, Any]:
        return self.jobs.status(self.find("run", run).name)

    def delete(self, run: str) -> None:
        name = self.find("run", run).name
        self.models.forget(name)
        self.workspace.delete_run(name)

    def find(self, kind: str, name: str) -> Path:
        """The folder of a run or data folder named from the browser; UnknownName when there is none."""
        try:
            return self.workspace.resolve(kind, name)
        except GptlabError as e:
            raise UnknownName(str(e)) from None

    def close(self) -> None:
        self.jobs.close()
        self.exports.cleanup()

    def _free_name(self, stem: str) -> str:
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip("._-")[:60] or "run"
        n = 1
        while (self.runs_dir / f"{stem}-{n}").exists():
            n += 1
        return f"{stem}-{n}"


def _typed(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings with their types checked; unknown names and blanks refused or dropped."""
    out = {}
    for key, value in settings.items():
        if key not in SETTINGS:
            raise GptlabError(f"unknown setting {key!r}; the page takes {', '.join(SETTINGS)}")
        if value is None or value == "":
            continue
        kind = SETTINGS[key]
        try:
            if kind is int and (isinstance(value, bool) or float(value) != int(float(value))):
                raise ValueError
            out[key] = kind(float(value)) if kind is int else kind(value)
        except (TypeError, ValueError):
            raise GptlabError(f"{key} must be {'an integer' if kind is int else 'a number' if kind is float else 'text'}, "
                              f"got {value!r}") from None
    return out


def _positive(value: Any, what: str, kind: type) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise GptlabError(f"{what} must be a positive number, got {value!r}") from None
    if not number > 0 or number != number:
        raise GptlabError(f"{what} must be a positive number, got {value!r}")
    return number


def _flags(overrides: dict[str, Any]) -> list[str]:
    """`--name value` for each setting, as `gptlab train` reads them."""
    args = []
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{key.replace('_', '-')}")
        else:
            args += [flag, str(value)]
    return args


def _with_vocab(model_cfg: ModelConfig, vocab_size: int) -> ModelConfig:
    from dataclasses import replace

    return replace(model_cfg, vocab_size=vocab_size)
