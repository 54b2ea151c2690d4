"""Training jobs for `gptlab ui`: each a separate `gptlab train` process, one at a time, the rest queued.

Design choices:
- A job is the command line `gptlab train` would get, written to `job.json` in its run folder
  before anything runs: the queue lives on disk, so a restarted server finds its waiting jobs (in
  the order they were queued), and the job that was running, again.
- The trainer runs in its own session (`start_new_session`): Ctrl-C on the server, a server crash or
  a restart leave it training; the page picks it up from the run folder. Its output goes to
  `train.log` in the run folder (appended by each session: a resume adds to it).
- What a job is doing is never kept in memory: it is read from the run folder each time
  (`rundir.training_status` over events.jsonl and the trainer's lock), so a job killed with SIGKILL
  shows as failed, with the last lines of its log, and `--resume` continues it from its last save.
- Stop is SIGINT, the trainer's own Ctrl-C: it finishes the step, saves `last`, and exits with the
  command that resumes it. A queued job that is stopped leaves the queue.
- Cores are shared by design. Two processes that each use every core slow each other 4-40x (each
  thread of a parallel region waits for the slowest, which is descheduled). A training job gets
  every core while nothing else runs; when the server starts a generation (on one thread), the
  trainer is asked to lend it a core (SIGUSR1, `cores.CoreShare`), and it gets the core back
  (SIGUSR2) as soon as no generation runs. Sampling while a model trains then costs the trainer
  about one core's share, for as long as it lasts. (Keeping the core lent a few seconds longer, in
  case another generation comes, cost more than it saved: with a 200-token generation every 3 s,
  a 2-second hold left cpu-tiny's trainer 73% of its solo speed, handing it back at once 90%+.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gptlab import rundir
from gptlab.errors import GptlabError
from gptlab.fsutil import atomic_write_text

JOB = "job.json"
LOG = "train.log"
POLL_SEC = 0.5


class JobConflict(GptlabError):
    """The job cannot do that now: it is training or queued already, or it is not training."""


def train_threads(cores: int | None = None) -> int:
    """Intra-op threads for a training job: every core (one is lent while the server generates)."""
    return cores or os.cpu_count() or 1


GENERATION_THREADS = 1  # the core a trainer lends (one generation at a time; small models decode on one anyway)


def read_job(run_dir: Path) -> dict[str, Any] | None:
    """The job record of a run folder, or None when the folder was not trained from the app."""
    try:
        job = json.loads((run_dir / JOB).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return job if isinstance(job, dict) and isinstance(job.get("args"), list) else None


def log_tail(run_dir: Path, lines: int = 12) -> str:
    """The last lines of a job's train.log (progress bars' carriage returns folded)."""
    try:
        with open(run_dir / LOG, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    kept = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join([line for line in kept if line.strip()][-lines:])


class Jobs:
    """The training queue of one runs folder: submit, stop, resume; status always read from the folders."""

    def __init__(self, runs_dir: str | Path, threads: int | None = None, python: str = sys.executable) -> None:
        self.runs_dir = Path(runs_dir)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.threads = threads or train_threads()
        self.python = python
        self.lock = threading.RLock()
        self.children: dict[str, subprocess.Popen] = {}  # jobs this server started (to reap them)
        self.closed = threading.Event()
        self.generations = 0  # running now, in the server
        self.lent_by: int | None = None  # the trainer that lent a core, until it gets it back
        self.worker = threading.Thread(target=self._loop, name="gptlab-jobs", daemon=True)
        self.worker.start()

    # ---- what the page and the API call

    def submit(self, name: str, args: list[str]) -> dict[str, Any]:
        """Queue `gptlab train ARGS` for the run folder `name`; it starts at once when nothing else trains."""
        run_dir = self.runs_dir / name
        with self.lock:
            if self._active(run_dir):
                raise JobConflict(f"run {name} is already training or queued; stop it first, or pick another name")
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / JOB, json.dumps({"args": list(args), "queued_at": time.time()}) + "\n")
            self._start_next()
        return self.status(name)

    def resume(self, name: str) -> dict[str, Any]:
        """Queue the continuation of a stopped (or failed) run from its last save."""
        run_dir = self.runs_dir / name
        if not (run_dir / rundir.LAST).is_file():
            raise GptlabError(f"run {name} has no saved point to resume from ({rundir.LAST}); start it again instead")
        return self.submit(name, ["train", "--resume", str(run_dir.resolve()), "--live-sample-tokens",
                                  str(self._live_tokens(run_dir))])

    def stop(self, name: str) -> dict[str, Any]:
        """Ask a running job to save and stop (SIGINT), or take a queued one out of the queue."""
        run_dir = self.runs_dir / name
        with self.lock:
            job = read_job(run_dir)
            pid = self._pid(run_dir, job)
            if pid is not None:
                os.kill(pid, signal.SIGINT)
            elif job is not None and "pid" not in job:
                self._dequeue(run_dir)
            else:
                raise JobConflict(f"run {name} is not training or queued; nothing to stop")
        return self.status(name)

    def status(self, name: str) -> dict[str, Any]:
        """Where a job stands: status, its last progress and eval, the log's tail when it failed."""
        run_dir = self.runs_dir / name
        events = rundir.read_events(run_dir)
        status = job_status(run_dir, read_job(run_dir), events)
        session = _last_session(events)
        out: dict[str, Any] = {"name": name, "status": status, "position": self._position(name) if status == "queued" else 0}
        start = next((e for e in session if e["event"] == "start"), None)
        out["start"] = start
        out["progress"] = next((e for e in reversed(session) if e["event"] == "progress"), None)
        evals = [e for e in events if e["event"] == "eval"]
        out["points"] = [{k: e.get(k) for k in ("step", "tokens_seen", "train_loss")}
                         for e in events if e["event"] == "progress"]
        out["evals"] = evals
        out["sample"] = next((e["sample"] for e in reversed(evals) if "sample" in e), None)
        out["ending"] = session[-1] if session and session[-1]["event"] in rundir.ENDINGS else None
        if status == "failed":
            out["log"] = log_tail(run_dir)
        return out

    def close(self) -> None:
        """Stop watching (jobs keep training; a restarted server finds them again), giving back a lent core."""
        self.closed.set()
        with self.lock:
            self._give_back()

    def generating(self, busy: bool) -> None:
        """The server started (True) or ended (False) a generation: borrow a core from the trainer meanwhile."""
        with self.lock:
            self.generations = max(0, self.generations + (1 if busy else -1))
            if busy:
                self._borrow()
            elif not self.generations:
                self._give_back()

    def _borrow(self) -> None:
        pid = self._trainer()
        if pid is not None and pid != self.lent_by:
            self._give_back()
            if _signal(pid, signal.SIGUSR1):
                self.lent_by = pid

    def _give_back(self) -> None:
        if self.lent_by is not None:
            _signal(self.lent_by, signal.SIGUSR2)
            self.lent_by = None

    def _share_cores(self) -> None:
        """Each poll: a trainer that started during a generation lends its core too."""
        if self.generations:
            self._borrow()

    def _trainer(self) -> int | None:
        """The training process, once it listens for core requests (after its start event)."""
        for run_dir in self._job_dirs():
            pid = self._pid(run_dir, read_job(run_dir))
            if pid is not None:
                starts = [e for e in rundir.read_events(run_dir) if e["event"] == "start"]
                return pid if starts and starts[-1].get("pid") == pid else None
        return None

    # ---- the queue

    def _loop(self) -> None:
        while not self.closed.wait(POLL_SEC):
            try:
                with self.lock:
                    self._reap()
                    self._start_next()
                    self._share_cores()
            except Exception as e:  # the watcher must outlive any one bad folder
                print(f"gptlab ui: job watcher: {e}", file=sys.stderr, flush=True)

    def _reap(self) -> None:
        for name, child in list(self.children.items()):
            code = child.poll()
            if code is not None:
                del self.children[name]
                run_dir = self.runs_dir / name
                job = read_job(run_dir)
                if job is not None:
                    job["exit_code"] = code
                    job["ended_at"] = time.time()
                    atomic_write_text(run_dir / JOB, json.dumps(job) + "\n")

    def _start_next(self) -> None:
        if any(self._pid(d, read_job(d)) is not None for d in self._job_dirs()):
            return
        waiting = self._queue()
        if not waiting:
            return
        run_dir = waiting[0]
        job = read_job(run_dir) or {}
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(self.threads),
               "MKL_NUM_THREADS": str(self.threads)}
        with open(run_dir / LOG, "ab") as log:
            log.write(f"$ gptlab {' '.join(job.get('args', []))}\n".encode())
            log.flush()
            child = subprocess.Popen([self.python, "-m", "gptlab", *job.get("args", [])], stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.children[run_dir.name] = child
        job.update(pid=child.pid, started_at=time.time())
        atomic_write_text(run_dir / JOB, json.dumps(job) + "\n")

    def _queue(self) -> list[Path]:
        """Run folders waiting to train, oldest first."""
        waiting = [(job.get("queued_at", 0), d) for d in self._job_dirs() if (job := read_job(d)) and "pid" not in job]
        return [d for _, d in sorted(waiting)]

    def _position(self, name: str) -> int:
        names = [d.name for d in self._queue()]
        return names.index(name) + 1 if name in names else 0

    def _dequeue(self, run_dir: Path) -> None:
        (run_dir / JOB).unlink(missing_ok=True)
        (run_dir / LOG).unlink(missing_ok=True)
        try:
            run_dir.rmdir()  # a queued new run has nothing else yet; a queued resume keeps its run
        except OSError:
            pass

    def _job_dirs(self) -> list[Path]:
        return [p.parent for p in self.runs_dir.glob(f"*/{JOB}")]

    @staticmethod
    def _pid(run_dir: Path, job: dict[str, Any] | None) -> int | None:
        return job_pid(run_dir, job)

    def _active(self, run_dir: Path) -> bool:
        job = read_job(run_dir)
        return self._pid(run_dir, job) is not None or (job is not None and "pid" not in job)

    @staticmethod
    def _live_tokens(run_dir: Path) -> int:
        try:
            raw = json.loads((run_dir / rundir.CONFIG).read_text(encoding="utf-8"))
            return int(raw["train"].get("live_sample_tokens") or 0)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return 0


def job_pid(run_dir: Path, job: dict[str, Any] | None) -> int | None:
    """The live process training `run_dir`: the trainer's lock, or (before it takes it) the job's own.

    An exited child the server has not reaped yet counts as gone (`rundir.process_alive`).
    """
    pid = rundir.training_pid(run_dir)
    if pid is not None:
        return pid
    if job is None or not isinstance(job.get("pid"), int) or "exit_code" in job:
        return None
    return job["pid"] if rundir.process_alive(job["pid"]) and _is_gptlab(job["pid"]) else None


def job_status(run_dir: Path, job: dict[str, Any] | None, events: list[dict[str, Any]] | None = None) -> str:
    """queued, running, finished, stopped or failed: from the job record and the run folder alone."""
    if job is not None and "pid" not in job:
        return "queued"
    if job_pid(run_dir, job) is not None:
        return "running"
    events = rundir.read_events(run_dir) if events is None else events
    if job is not None and not events:
        return "failed"  # the trainer ended before it could tell anything (a bad setting, a crash)
    return rundir.training_status(run_dir, events)


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _last_session(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events since the last start."""
    starts = [i for i, e in enumerate(events) if e["event"] == "start"]
    return events[starts[-1]:] if starts else events


def _is_gptlab(pid: int) -> bool:
    """Whether process `pid` runs gptlab (a recycled PID after a reboot is someone else's)."""
    try:
        return b"gptlab" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (macOS): trust the PID
