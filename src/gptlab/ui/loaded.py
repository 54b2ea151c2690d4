"""The runs of the app's runs folder as the served models of the page's Generate tab and of /v1, loaded on first use.

A run is loaded when first asked for, and loaded again when its weights file changed (a job went on
training it). Names are folder names inside the runs folder and nothing else: a name that is not one
of them is simply not there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from gptlab import rundir
from gptlab.folders import folder_kind
from gptlab.serve.limits import GenerationQueue, Limits
from gptlab.serve.models import ServedModel


class LoadedRuns(Mapping[str, ServedModel]):
    """name -> ServedModel for every run in `runs_dir` with weights; each loaded on first access."""

    def __init__(self, runs_dir: Path, limits: Limits, threads: int, device: str = "auto",
                 on_busy: Callable[[bool], None] | None = None) -> None:
        self.runs_dir, self.limits, self.threads, self.device = runs_dir, limits, threads, device
        self.on_busy = on_busy  # told when any generation starts and ends
        self.loaded: dict[str, ServedModel] = {}
        self.stamps: dict[str, tuple[str, float]] = {}
        self.lock = threading.Lock()

    def names(self) -> list[str]:
        """Runs that have weights to sample, newest first."""
        found = [p for p in self.runs_dir.iterdir() if _samplable(p)] if self.runs_dir.is_dir() else []
        return [p.name for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __contains__(self, name: object) -> bool:
        # Only the named folder is looked at: the API asks for every request.
        return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
                and _samplable(self.runs_dir / name))

    def __getitem__(self, name: str) -> ServedModel:
        if name not in self:
            raise KeyError(name)
        run_dir = self.runs_dir / name
        weights = rundir.weights_path(run_dir, "best")
        stamp = (weights.name, weights.stat().st_mtime)
        with self.lock:
            served = self.loaded.get(name)
            if served is None or self.stamps.get(name) != stamp:
                served = self._load(name, run_dir, served)
                self.stamps[name] = stamp
            return served

    def _load(self, name: str, run_dir: Path, previous: ServedModel | None) -> ServedModel:
        from gptlab.generation import load

        files = rundir.check_run(run_dir, "best")
        tm = load(run_dir, "best", self.device, files=files).batched(self.limits.batch_rows(), self.threads)
        queue = previous.queue if previous is not None else GenerationQueue(
            self.limits.concurrency, self.limits.queue_size, name, self.on_busy)
        served = ServedModel(name=name, model=tm, queue=queue, summary=rundir.run_summary(run_dir, files),
                             created=int((run_dir / rundir.CONFIG).stat().st_mtime))
        self.loaded[name] = served
        return served

    def forget(self, name: str) -> None:
        """Drop a loaded run (it was deleted)."""
        with self.lock:
            served = self.loaded.pop(name, None)
            self.stamps.pop(name, None)
        if served is not None:
            served.close()


def _samplable(path: Path) -> bool:
    """A run folder (not hidden) with weights to sample."""
    return (not path.name.startswith(".") and path.is_dir() and folder_kind(path) == "run"
            and rundir.weights_path(path, "best").is_file())
