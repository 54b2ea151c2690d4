"""Experiment logs beside the run folder: the same metrics in TensorBoard or Weights & Biases (--log).

`--log tensorboard` writes event files to <run>/tensorboard/, so `tensorboard --logdir runs/` shows
every run. Scalars carry metrics.csv's names and values: train_loss, val_loss and tokens_seen at each
evaluation; lr, tokens_per_sec and train/loss_running (the latest step's loss) about once a second.
The settings (config.json) are a text entry at each session's start, and the live sample (when
--live-sample-tokens is on) a text entry at each evaluation.

`--log wandb` starts a W&B run in <run>/wandb/: project "gptlab" (or WANDB_PROJECT), named and
grouped by the run folder's name, with config.json as its config and the same metrics keyed by step.
It runs offline unless WANDB_MODE says otherwise; `wandb sync <run>/wandb/offline-run-*` uploads it
later. Resuming: the W&B run id is kept in <run>/wandb/gptlab-run-id, and a resumed session online
continues that W&B run. Offline, wandb cannot resume a run, and uploading two offline folders under
one id lets the later replace the earlier; so each offline session is a W&B run of its own, in the
same group. W&B accepts only rising steps: after a rollback, steps up to the highest already logged
are left out.

Only the main process logs; the packages are imported when the logs open, so a missing one is
reported before training starts.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gptlab.config import TrainConfig
from gptlab.errors import GptlabError
from gptlab.rundir import CONFIG

KINDS = ("tensorboard", "wandb")
# torch ships a TensorBoard writer; it needs only the `tensorboard` package, which is what shows (and
# reads back) the logs anyway. tensorboardX would be a second package doing the same job.
MODULES = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}
WANDB_RUN_ID = "gptlab-run-id"  # in <run>/wandb/: the W&B run a resumed session continues


def log_kinds(setting: str) -> list[str]:
    """The experiment logs a --log value names, checked."""
    kinds = [k.strip() for k in setting.split(",") if k.strip()]
    for kind in kinds:
        if kind not in KINDS:
            raise GptlabError(f"--log {kind!r} is not a kind of log; use tensorboard, wandb or both (tensorboard,wandb)")
    return kinds


def check_experiment_logs(setting: str) -> list[str]:
    """The kinds a --log value names, each checked and its package importable."""
    kinds = log_kinds(setting)
    for kind in kinds:
        try:
            importlib.import_module(MODULES[kind])
        except ImportError as e:
            reason = " ".join(str(e).split())  # one line, whatever the package said
            raise GptlabError(f"--log {kind} needs the {kind} package, which cannot be imported ({reason}); "
                              f"install it with `pip install {kind}` (or `pip install 'gptlab[log]'`)") from None
    return kinds


def open_experiment_logs(cfg: TrainConfig, run_dir: Path) -> list[Callable[..., Any]]:
    """One observer per kind --log names (see `train.Run.observers`)."""
    kinds = check_experiment_logs(cfg.log)
    if not kinds:
        return []
    settings = run_settings(cfg, run_dir)
    makers = {"tensorboard": TensorBoardLog, "wandb": WandbLog}
    return [makers[kind](run_dir, settings) for kind in kinds]


def run_settings(cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """config.json (model, training and tokenizer settings), or the training settings alone without it."""
    try:
        settings = json.loads((run_dir / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        settings = None
    return settings if isinstance(settings, dict) else {"train": asdict(cfg)}


def verbatim(text: str) -> str:
    """Text as a Markdown code block: TensorBoard renders text entries as Markdown."""
    return "\n".join("    " + line for line in text.splitlines())


class TensorBoardLog:
    """<run>/tensorboard/: event files written by torch's SummaryWriter."""

    def __init__(self, run_dir: Path, settings: dict[str, Any]) -> None:
        self.folder = run_dir / "tensorboard"
        self.settings = settings
        self.writer: Any = None
        self.top = 0  # the highest step written in this session
        self.evaluated = 0  # the latest evaluated (and saved) step: where a rollback returns to

    def reopen(self, purge_step: int | None) -> None:
        """A new event file; TensorBoard hides what earlier files hold from `purge_step` on."""
        from torch.utils.tensorboard import SummaryWriter

        if self.writer is not None:
            self.writer.close()
        self.writer = SummaryWriter(str(self.folder), purge_step=purge_step, flush_secs=10)

    def __call__(self, event: str, **fields: Any) -> None:
        step = fields.get("step")
        if event == "start":
            # A resumed session goes on after its resume point: what a crashed session logged past
            # it is hidden, as metrics.csv drops those rows.
            self.reopen(step + 1 if fields["resume"] else None)
            self.top = self.evaluated = step
            self.writer.add_text("config", verbatim(json.dumps(self.settings, indent=1)), step)
            return
        if self.writer is None:
            return
        if isinstance(step, int):
            if step < self.top:  # rolled back to the last checkpoint: hide the steps it undid
                self.reopen(self.evaluated + 1)
            self.top = step
        if event == "progress":
            self.writer.add_scalar("lr", fields["lr"], step)
            self.writer.add_scalar("tokens_per_sec", fields["tokens_per_sec"], step)
            if fields["train_loss"] is not None:
                self.writer.add_scalar("train/loss_running", fields["train_loss"], step)
        elif event == "eval":
            self.evaluated = step
            for name in ("train_loss", "val_loss", "tokens_seen"):
                self.writer.add_scalar(name, fields[name], step)
            if fields.get("sample") is not None:
                self.writer.add_text("sample", verbatim(fields["sample"]), step)
            self.writer.flush()  # a live TensorBoard shows each evaluation as it happens
        elif event in ("stopped", "finished", "failed"):
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbLog:
    """<run>/wandb/: a W&B run, offline unless WANDB_MODE says otherwise."""

    def __init__(self, run_dir: Path, settings: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.settings = settings
        self.run: Any = None
        self.top = -1  # the highest step logged: W&B drops lower ones
        self.failed = False

    def start(self, resume: bool) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE")  # wandb reads it itself; unset means offline here
        offline = (mode or "offline") in ("offline", "dryrun")
        id_file = self.run_dir / "wandb" / WANDB_RUN_ID
        previous = id_file.read_text(encoding="utf-8").strip() if resume and id_file.is_file() else ""
        same = bool(previous) and not offline
        name = self.run_dir.resolve().name
        try:
            self.run = wandb.init(
                dir=str(self.run_dir), project=os.environ.get("WANDB_PROJECT") or "gptlab", name=name, group=name,
                config=self.settings, id=previous if same else None, resume="allow" if same else None,
                mode=None if mode else "offline",
                # create_new: never log into (or finish) a W&B run the caller has open in this process;
                # console off: the terminal is the progress bar's, not a stream to copy
                reinit="create_new", settings=wandb.Settings(console="off"),
            )
        except Exception as e:  # a login or network problem online: say what to do, in one line
            reason = " ".join(str(e).split())
            raise GptlabError(f"wandb could not start a run ({reason}); run `wandb login`, or set WANDB_MODE=offline "
                              "to log without a network") from None
        id_file.parent.mkdir(exist_ok=True)
        id_file.write_text(self.run.id + "\n", encoding="utf-8")

    def log(self, step: int, values: dict[str, Any]) -> None:
        if step >= self.top:  # an equal step joins the same row (progress, then eval at that step)
            self.run.log(values, step=step)
            self.top = step

    def __call__(self, event: str, **fields: Any) -> None:
        if event == "start":
            self.start(fields["resume"])
        elif self.run is None:
            return
        elif event == "progress":
            values = {"lr": fields["lr"], "tokens_per_sec": fields["tokens_per_sec"]}
            if fields["train_loss"] is not None:
                values["train/loss_running"] = fields["train_loss"]
            self.log(fields["step"], values)
        elif event == "eval":
            self.log(fields["step"], {name: fields[name] for name in ("train_loss", "val_loss", "tokens_seen")})
            if fields.get("sample") is not None:
                self.run.summary["sample"] = fields["sample"]  # the latest one; events.jsonl has them all
        elif event == "finished":
            self.run.summary["best_val_loss"] = fields["best_val_loss"]
        elif event == "failed":
            self.failed = True

    def close(self) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if self.failed else 0)
            self.run = None
