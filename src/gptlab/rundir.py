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
    events.jsonl        what training did, one JSON object per line: start, progress, eval, stopped,
                        finished, failed (what `gptlab ui` and other live views read)

The weights and the training state are read and written by `checkpoint.py` (which needs torch);
everything else about a run folder is here, so the server, `info` and the exporters can describe a
run without loading a model.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, NamedTuple

from gptlab.config import LATER_MODEL_FIELDS, ModelConfig, TrainConfig, split_settings
from gptlab.errors import GptlabError
from gptlab.fsutil import atomic_write_text, read_json_object
from gptlab.tokenizer import Tokenizer, load_tokenizer

CONFIG = "config.json"
BEST = "best.safetensors"
LAST = "last.safetensors"
TRAIN_STATE = "train_state.pt"
METRICS = "metrics.csv"
LOSS_PLOT = "loss.png"
SAMPLES = "samples.txt"
TEMPERATURE_PLOT = "temperature.png"
EVENTS = "events.jsonl"
TOKENIZER_FILES = ("tokenizer.json", "gpt2.tiktoken", "hf_tokenizer.json")
CHECKPOINT_FILES = (BEST, LAST, TRAIN_STATE)
RUN_FILES = (CONFIG, BEST, LAST, TRAIN_STATE, METRICS, LOSS_PLOT, SAMPLES, EVENTS) + TOKENIZER_FILES
METRIC_COLUMNS = ("step", "tokens_seen", "epoch", "lr", "train_loss", "val_loss", "tokens_per_sec", "elapsed_sec")


def default_run_dir(data_dir: str | Path) -> Path:
    """runs/<data folder name>: where a run goes when --out is not given."""
    return Path("runs") / Path(data_dir).resolve().name


def write_run_config(run_dir: Path, model: ModelConfig, train: TrainConfig, tokenizer: dict[str, Any]) -> None:
    """Write config.json: the resolved model, training and tokenizer settings."""
    payload = {"model": asdict(model), "train": asdict(train), "tokenizer": tokenizer}
    atomic_write_text(run_dir / CONFIG, json.dumps(payload, indent=1) + "\n")


def read_run_config(run_dir: str | Path) -> tuple[ModelConfig, TrainConfig, dict[str, Any]]:
    """Model and train configs plus the tokenizer summary from a run's config.json.

    The model section must name every shape setting: a missing one would silently take a default
    the weights were not trained with. (Training settings added in later versions may be absent.)
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GptlabError(f"run folder {run_dir} not found; train one with `gptlab train --out {run_dir}`")
    path = run_dir / CONFIG
    if not path.is_file():
        raise GptlabError(f"{run_dir} has no config.json, so it is not a gptlab run folder")
    raw = read_json_object(path, f"{path} not found", "restore it from a copy of the run")
    model_section = raw.get("model")
    if not isinstance(model_section, dict) or "train" not in raw:
        raise GptlabError(f"{path} has no \"model\" and \"train\" sections, so it is not a run's config.json")
    missing = [f.name for f in fields(ModelConfig) if f.name not in model_section and f.name not in LATER_MODEL_FIELDS]
    if missing:
        raise GptlabError(f"{path} lacks the key model.{missing[0]}; put back the value the run was trained with "
                          "(the weights fix the shape), or retrain")
    heads, width = model_section.get("n_head"), model_section.get("n_embd")
    if isinstance(heads, int) and isinstance(width, int) and heads > 0 and width % heads:
        raise GptlabError(f"{path}: model.n_head {heads} does not divide model.n_embd {width}; the file was "
                          "edited: put back the value the run was trained with")
    try:
        model, train = split_settings(raw, path)
        model_cfg, train_cfg = ModelConfig(**model), TrainConfig(**train)
    except GptlabError as e:
        raise GptlabError(f"{path} holds a setting gptlab cannot use ({e}); put back the value the run was trained "
                          "with") from None
    tokenizer = raw.get("tokenizer", {})
    return model_cfg, train_cfg, tokenizer if isinstance(tokenizer, dict) else {}


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensor shapes a safetensors file holds, read from its header alone (no torch, no weights)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= 100 << 20:
                raise ValueError("bad header size")
            header = json.loads(f.read(size))
        return {name: tuple(entry["shape"]) for name, entry in header.items() if name != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise GptlabError(f"weights file {path} is corrupt or truncated; use another checkpoint (best/last) "
                          "or retrain") from None


class RunFiles(NamedTuple):
    """A run folder opened by `check_run`: what its files say, checked against each other."""

    model_cfg: ModelConfig
    train_cfg: TrainConfig
    tokenizer: Tokenizer
    weights: Path  # the chosen checkpoint (it may not exist yet in a run that has not saved one)
    recorded: dict[str, Any]  # the tokenizer as config.json records it


def check_run(run_dir: str | Path, checkpoint: str = "best") -> RunFiles:
    """Open a run folder, checking its files against each other; its configs, tokenizer and weights path.

    config.json's keys, the tokenizer it records against tokenizer.json, and the shapes of the chosen
    weights (when they exist yet) against the config: a run whose files come from different places is
    refused with one line, before anything is computed with it.
    """
    run_dir = Path(run_dir)
    model_cfg, train_cfg, recorded = read_run_config(run_dir)
    tokenizer = load_tokenizer(run_dir)
    kind, size = str(recorded.get("type", tokenizer.name)).split(":")[0], recorded.get("vocab_size", tokenizer.vocab_size)
    if kind != tokenizer.name or size != tokenizer.vocab_size:
        raise GptlabError(
            f"{run_dir / 'tokenizer.json'} holds a {tokenizer.name} tokenizer of {tokenizer.vocab_size:,} tokens, but "
            f"the run was trained with {kind} ({size:,} tokens, config.json); the tokenizer files were replaced: "
            "restore the run's own, or retrain")
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise GptlabError(f"{run_dir}: the tokenizer has {tokenizer.vocab_size:,} tokens but the model only "
                          f"{model_cfg.vocab_size:,}; the files come from different runs")
    path = weights_path(run_dir, checkpoint)
    if path.is_file():
        expected, got = model_cfg.param_shapes(), weight_shapes(path)
        if expected != got:
            wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
            missing = sorted(set(expected) - set(got))
            detail = (f"{wrong[0]} is {got[wrong[0]]}, config.json says {expected[wrong[0]]}" if wrong else
                      f"missing {missing[0]}" if missing else f"unexpected {sorted(set(got) - set(expected))[0]}")
            raise GptlabError(f"weights in {path} do not fit the model in config.json ({detail}); "
                              "the files come from different runs")
    return RunFiles(model_cfg, train_cfg, tokenizer, path, recorded)


def is_run_dir(path: Path) -> bool:
    """Whether `path` already holds a gptlab run."""
    return (path / CONFIG).is_file() or (path / LAST).is_file() or (path / BEST).is_file()


# The subfolders `--log` writes (experiment_logs.py), each with the names in it that gptlab's loggers
# write: the TensorBoard writer's event files; W&B's run folders, its links to the latest, and the id file.
LOG_DIRS = {
    "tensorboard": ("events.out.tfevents.*",),
    "wandb": ("run-*", "offline-run-*", "latest-run", "debug.log", "debug-internal.log", "gptlab-run-id"),
}


def clear_run_dir(run_dir: Path) -> None:
    """Remove the files of a previous run (only ours, nothing else in the folder)."""
    import shutil
    from fnmatch import fnmatch

    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for folder, patterns in LOG_DIRS.items():
        if not (run_dir / folder).is_dir():
            continue
        for path in (run_dir / folder).iterdir():  # not glob: a link whose target went first still goes
            if any(fnmatch(path.name, pattern) for pattern in patterns):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        if not any((run_dir / folder).iterdir()):  # a file someone else put there keeps the folder
            (run_dir / folder).rmdir()


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


def run_summary(run_dir: str | Path, files: RunFiles | None = None) -> dict[str, Any]:
    """What `gptlab info` shows about a run folder (`files`: the run, if `check_run` has opened it already)."""
    run_dir = Path(run_dir)
    model_cfg, train_cfg, _, _, tok = files or check_run(run_dir)
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


class EventLog:
    """events.jsonl: what training did, appended one JSON line at a time, so a reader never sees half a record.

    Each line is {"event": NAME, "time": UNIX SECONDS, ...}. A run started over (--overwrite) starts
    a new file; a resumed run appends to it, so the file tells the whole story of the folder.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, event: str, **fields: Any) -> None:
        import time

        line = json.dumps({"event": event, "time": round(time.time(), 3), **fields}, allow_nan=False,
                          default=str) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)  # one write of one line: appends from one process never interleave


def read_events(run_dir: str | Path) -> list[dict[str, Any]]:
    """The events of a run, oldest first (a line cut short by a crash, or not JSON, is skipped)."""
    path = Path(run_dir) / EVENTS
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    events = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and isinstance(event.get("event"), str):
            events.append(event)
    return events


ENDINGS = {"finished", "stopped", "failed"}


def training_status(run_dir: str | Path, events: list[dict[str, Any]] | None = None) -> str:
    """"running", "finished", "stopped" or "failed" from the run folder alone (no memory of who started it).

    A trainer holds the folder's lock while it runs; a run whose last story has no ending and whose
    trainer is gone was killed (SIGKILL, out of memory, power): failed. A folder trained before
    events.jsonl existed counts as finished when it has weights.
    """
    run_dir = Path(run_dir)
    if training_pid(run_dir) is not None:
        return "running"
    events = read_events(run_dir) if events is None else events
    endings = [e["event"] for e in events if e["event"] in ENDINGS or e["event"] == "start"]
    if not endings:
        return "finished" if (run_dir / BEST).is_file() or (run_dir / LAST).is_file() else "failed"
    return "failed" if endings[-1] == "start" else endings[-1]


def training_pid(run_dir: str | Path) -> int | None:
    """The process training `run_dir` now, or None."""
    try:
        pid = int((Path(run_dir) / LOCK).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if process_alive(pid) else None


LOCK = ".gptlab-train.lock"


class RunLock:
    """Held while `gptlab train` writes a run folder: a second trainer of the same folder is refused.

    The lock file holds the owner's PID. A lock whose process is gone (a crash, a kill -9) is stale
    and taken over, so a crashed run never stays locked. Creating it with O_EXCL makes two trainers
    that start at once agree on one owner.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self.created_dir = False
        self.held = False

    def __enter__(self) -> RunLock:
        import os

        from gptlab.fsutil import check_writable_folder

        self.created_dir = not self.run_dir.exists()
        check_writable_folder(self.run_dir)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and process_alive(owner):
                    self._undo_dir()
                    raise GptlabError(f"{self.run_dir} is being trained by process {owner}; wait for it to finish, "
                                      f"stop it, or train into another --out") from None
                self.path.unlink(missing_ok=True)  # stale: its owner is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            self.held = True
            return self
        raise GptlabError(f"could not lock {self.run_dir} for training; remove {self.path} if no gptlab trains there")

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None

    def _undo_dir(self) -> None:
        if self.created_dir:
            try:
                self.run_dir.rmdir()  # only if still empty: nothing of the user's is ever removed
            except OSError:
                pass

    def __exit__(self, *exc: Any) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
        self._undo_dir()


def process_alive(pid: int) -> bool:
    import os

    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
