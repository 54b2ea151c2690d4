"""Training beside generation in `gptlab ui`: how much training speed the app's core split keeps.

    .venv/bin/python benchmarks/bench_ui.py            # about 4 minutes on an idle 2-core machine
    .venv/bin/python benchmarks/bench_ui.py --quick    # a smoke run, a minute or two
    .venv/bin/python benchmarks/bench_ui.py --steps 1000 --every 2

The app's server generates text (the Generate tab, /v1/completions) while training runs as a
separate `gptlab train` process; on a small machine two torch processes that each take every core
slow each other down many times over. The app splits the cores (`ui/jobs.py`): a training job gets
all but one (OMP_NUM_THREADS), the server's generations the last one. This script starts a real
`gptlab ui` server, uploads tiny Shakespeare, prepares it (char), trains a small `base` run to
sample from, and then trains the same job (--preset, --steps, evaluation only at the ends) in each
of these cases:

  solo, command line   `gptlab train` with the job's own arguments and every core, nothing beside it
  app, alone           the job through POST /ui/api/jobs, nothing beside it
  app + generations    the job through the app while a client streams --gen-tokens tokens from
                       `base` through the app's /v1/completions every --every seconds
  no policy            `gptlab train` with every core while a `gptlab serve` of `base`, also given
                       every core, answers the same requests: what the split avoids

Training tokens/s is the trainer's own account in its run folder's events.jsonl: Δtokens_seen /
Δelapsed_sec between the first progress event after --warmup seconds of training and the last one,
so process start, data loading and the evaluations at either end are left out. A case that runs
longer than --cap seconds is stopped (it saves and exits) and measured over what it did. For each
generation the client records the time to its first token, the time to its last, and tokens/s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from gptlab.rundir import process_alive

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
URL = re.compile(r" at (http://\S+)")
ENDINGS = {"finished", "stopped", "failed"}
NO_EVAL = 1_000_000  # evaluation interval: only the evaluations at the start and the end remain
PROMPT = "ROMEO:"


# ---- processes: every one started here is stopped at the end ---------------------------------------


class Processes:
    """Every process this script starts, each in its own session, so one killpg stops it and its children."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.started: list[subprocess.Popen] = []
        self.pids: list[int] = []  # app training jobs: started by the server, in sessions of their own

    def start(self, args: list[str], log: Path, threads: int | None = None) -> subprocess.Popen:
        env = dict(self.env)
        if threads is not None:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "gptlab", *args], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.started.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, grace: float = 10.0) -> None:
        """SIGINT first (a trainer saves, a server cleans its temporary folders), SIGKILL after `grace` seconds."""
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGINT)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_all(self) -> None:
        for pid in self.pids:
            if process_alive(pid):
                _signal_group(pid, signal.SIGINT)
        deadline = time.monotonic() + 10
        while any(process_alive(p) for p in self.pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in self.pids:
            _signal_group(pid, signal.SIGKILL)
        for proc in reversed(self.started):
            self.stop(proc)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass



def wait_for_url(proc: subprocess.Popen, log: Path, timeout: float = 180.0) -> str:
    """The URL in a server's banner line (`gptlab ui at http://...`, `gptlab serve: ... at http://...`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("gptlab ") and (m := URL.search(line)):
                return m.group(1)
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}) before it listened:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)
    raise SystemExit(f"no banner from the server after {timeout:.0f} s:\n{log.read_text()[-2000:]}")


# ---- the app's API ---------------------------------------------------------------------------------


def api(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    reply = client.request(method, path, **kwargs)
    if reply.status_code >= 400:
        raise SystemExit(f"{method} {path}: {reply.status_code} {reply.text[:500]}")
    return reply.json()


def train_in_app(client: httpx.Client, procs: Processes, runs: Path, data: str, run: str, preset: str, steps: int,
                 cap: float) -> dict[str, Any]:
    """Submit a job, wait for its end (stopping it after `cap` seconds); its final status."""
    api(client, "POST", "/ui/api/jobs", json={"data": data, "run": run, "preset": preset, "steps": steps,
                                              "settings": {"eval_interval": NO_EVAL}})
    started, stopped = time.monotonic(), False
    while True:
        time.sleep(1.0)
        job = _read_json(runs / run / "job.json")
        if job.get("pid") and job["pid"] not in procs.pids:
            procs.pids.append(job["pid"])  # the server does not stop its jobs when it stops: we do
        status = api(client, "GET", f"/ui/api/runs/{run}")
        if status["status"] in ENDINGS:
            # a job stopped in its last moments may end as failed; its progress events still count
            if status["status"] == "failed" and not (stopped and status.get("progress")):
                raise SystemExit(f"job {run} failed:\n{status.get('log', '')}")
            return status
        if not stopped and time.monotonic() - started > cap:
            print(f"  {run}: past --cap {cap:.0f} s, stopping it; measured over the steps it made", flush=True)
            api(client, "POST", f"/ui/api/runs/{run}/stop")
            stopped = True


def train_directly(procs: Processes, args: list[str], out: Path, threads: int, cap: float, log: Path) -> None:
    """`gptlab train ARGS --out OUT` with `threads` threads; SIGINT (save and stop) after `cap` seconds."""
    proc = procs.start([*args, "--out", str(out)], log, threads=threads)
    try:
        proc.wait(cap)
    except subprocess.TimeoutExpired:
        print(f"  {out.name}: past --cap {cap:.0f} s, stopping it; measured over the steps it made", flush=True)
    procs.stop(proc, grace=60.0)
    if not (out / "events.jsonl").is_file():
        raise SystemExit(f"{out.name} wrote no events:\n{log.read_text()[-2000:]}")


def job_args(run_dir: Path) -> list[str]:
    """The app's `gptlab train` arguments for a job, without its --out (each case has its own)."""
    args = list(_read_json(run_dir / "job.json")["args"])
    i = args.index("--out")
    return args[:i] + args[i + 2 :]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# ---- measuring -------------------------------------------------------------------------------------


def training_rate(run_dir: Path, warmup: float) -> tuple[float, int, int]:
    """(steady tokens/s, steps measured, trainer threads) from the run's events.jsonl."""
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines() if line.strip()]
    start = next(e for e in events if e["event"] == "start")
    progress = [e for e in events if e["event"] == "progress"]
    steady = [e for e in progress if e["elapsed_sec"] >= warmup]
    if len(steady) < 2:  # too short a run for the warm-up to be left out: measure what there is
        steady = progress
    if len(steady) < 2 or steady[-1]["elapsed_sec"] <= steady[0]["elapsed_sec"]:
        return math.nan, 0, start.get("threads", 0)
    first, last = steady[0], steady[-1]
    rate = (last["tokens_seen"] - first["tokens_seen"]) / (last["elapsed_sec"] - first["elapsed_sec"])
    return rate, last["step"] - first["step"], start.get("threads", 0)


class Generations(threading.Thread):
    """A client asking `model` for a streamed completion every `every` seconds (one at a time) until stopped."""

    def __init__(self, url: str, model: str, tokens: int, every: float) -> None:
        super().__init__(name="generations", daemon=True)
        self.url, self.model, self.tokens, self.every = url, model, tokens, every
        self.halt = threading.Event()
        self.records: list[tuple[float, float, int]] = []  # (first token s, whole s, tokens)
        self.errors: list[str] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=300) as client:
            while not self.halt.is_set():
                began = time.monotonic()
                try:
                    self.records.append(stream_once(client, self.model, self.tokens))
                except (httpx.HTTPError, ValueError) as e:
                    self.errors.append(str(e) or type(e).__name__)
                self.halt.wait(max(0.0, began + self.every - time.monotonic()))

    def stop(self) -> None:
        self.halt.set()
        self.join()


def stream_once(client: httpx.Client, model: str, tokens: int) -> tuple[float, float, int]:
    """One streamed completion: (seconds to the first text, seconds to the end, tokens made)."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0.8, "stream": True,
            "stream_options": {"include_usage": True}}
    began = time.perf_counter()
    first, made = math.nan, 0
    with client.stream("POST", "/v1/completions", json=body) as reply:
        if reply.status_code != 200:
            raise ValueError(f"HTTP {reply.status_code}: {reply.read()[:300]!r}")
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise ValueError(chunk["error"].get("message", "error in the stream"))
            if math.isnan(first) and any(c.get("text") for c in chunk.get("choices", [])):
                first = time.perf_counter() - began
            if chunk.get("usage"):
                made = chunk["usage"]["completion_tokens"]
    return first, time.perf_counter() - began, made


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (a handful of samples: no interpolation)."""
    ordered = sorted(v for v in values if not math.isnan(v))
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] if ordered else math.nan


# ---- the table -------------------------------------------------------------------------------------


def row(case: str, train: tuple[float, int, int] | None, solo: float, gens: Generations | None) -> list[str]:
    cells = [case]
    if train is None:
        cells += ["-", "-", "-"]
    else:
        rate, steps, threads = train
        cells += [str(threads), f"{rate:,.0f} ({steps} steps)", f"{rate / solo:.0%}" if solo else "-"]
    if gens is None or not gens.records:
        cells += ["-"] * 4 if gens is None else [f"0 ({len(gens.errors)} failed)", "-", "-", "-"]
        return cells
    firsts = [r[0] * 1000 for r in gens.records]
    wholes = [r[1] for r in gens.records]
    rates = [r[2] / r[1] for r in gens.records if r[1] > 0]
    failed = f", {len(gens.errors)} failed" if gens.errors else ""
    cells += [f"{len(gens.records)}{failed}",
              f"{percentile(firsts, 50):,.0f} / {percentile(firsts, 95):,.0f}",
              f"{percentile(wholes, 50):.2f} / {percentile(wholes, 95):.2f}",
              f"{statistics.median(rates):,.0f}"]
    return cells


def print_table(rows: list[list[str]], tokens: int) -> None:
    head = ["case", "train threads", "training tok/s", "vs solo", "generations",
            "first token p50/p95 ms", f"{tokens} tokens p50/p95 s", "gen tok/s (median)"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for cells in [head, ["-" * w for w in widths], *rows]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |")


# ---- the run ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=None,
                        help=f"the text to train on (default: {DEFAULT_TEXT} if it exists, else tiny Shakespeare "
                             "from gptlab's dataset cache or its download)")
    parser.add_argument("--preset", default="cpu-tiny", help="the training job's preset (default: cpu-tiny)")
    parser.add_argument("--steps", type=int, default=500, help="steps of each measured job (default: 500)")
    parser.add_argument("--base-steps", type=int, default=300, help="steps of the run generations sample from (300)")
    parser.add_argument("--every", type=float, default=3.0, help="seconds between generation requests (default: 3)")
    parser.add_argument("--gen-tokens", type=int, default=200, help="tokens per generation (default: 200)")
    parser.add_argument("--warmup", type=float, default=3.0,
                        help="seconds of training left out of each rate (default: 3)")
    parser.add_argument("--cap", type=float, default=60.0,
                        help="stop a case after this many seconds and measure what it did (default: 60)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: --steps 100 --base-steps 40 --cap 30 --warmup 2 (a minute or two)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.base_steps, args.cap, args.warmup = 100, 40, 30.0, 2.0
    text = args.text or (DEFAULT_TEXT if DEFAULT_TEXT.is_file() else None)
    if text is None:
        from gptlab.data import fetch_named_dataset

        text = fetch_named_dataset("shakespeare")
    cores = os.cpu_count() or 1

    # SIGTERM ends the run like Ctrl-C does: through the finally below, which stops every process
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="bench-ui-") as tmp:
        root = Path(tmp)
        runs, data, logs = root / "runs", root / "data", root / "logs"
        logs.mkdir()
        # children keep their temporary files in ours, so nothing outlives the run
        procs = Processes({**os.environ, "TMPDIR": tmp, "PYTHONUNBUFFERED": "1"})
        try:
            table, verdict = measure(args, text, cores, procs, root, runs, data, logs)
        finally:
            procs.stop_all()
    print()
    print_table(table, args.gen_tokens)
    print()
    for line in verdict:
        print(line)


def measure(args: argparse.Namespace, text: Path, cores: int, procs: Processes, root: Path, runs: Path, data: Path,
            logs: Path) -> tuple[list[list[str]], list[str]]:
    print(f"{cores} cores; preset {args.preset}, {args.steps} steps per case, a {args.gen_tokens}-token generation "
          f"every {args.every:g} s; text {text}", flush=True)
    server = procs.start(["ui", "--runs", str(runs), "--data", str(data), "--port", "0"], logs / "ui.log")
    url = wait_for_url(server, logs / "ui.log")
    print(f"gptlab ui at {url}", flush=True)
    client = httpx.Client(base_url=url, timeout=300)
    name = text.name if text.suffix == ".txt" else f"{text.stem}.txt"
    api(client, "POST", "/ui/api/uploads", params={"name": name}, content=text.read_bytes())
    prepared = api(client, "POST", "/ui/api/prepare", json={"uploads": [name], "tokenizer": "char"})["data"]
    print(f"prepared {prepared}; training base ({args.base_steps} steps) to sample from", flush=True)
    train_in_app(client, procs, runs, prepared, "base", args.preset, args.base_steps, cap=max(args.cap, 300))

    # generation with nothing beside it (the first request loads the run; it is not counted)
    alone = Generations(url, "base", args.gen_tokens, 0.0)
    with httpx.Client(base_url=url, timeout=300) as warm:
        stream_once(warm, "base", args.gen_tokens)
        for _ in range(5):
            alone.records.append(stream_once(warm, "base", args.gen_tokens))

    print("app, alone", flush=True)
    train_in_app(client, procs, runs, prepared, "app-alone", args.preset, args.steps, args.cap)
    app_alone = training_rate(runs / "app-alone", args.warmup)
    train_args = job_args(runs / "app-alone")  # the very job the app ran, for the command-line cases

    print("solo, command line", flush=True)
    train_directly(procs, train_args, root / "solo", cores, args.cap, logs / "solo.log")
    solo = training_rate(root / "solo", args.warmup)

    print("app + generations", flush=True)
    beside = Generations(url, "base", args.gen_tokens, args.every)
    beside.start()
    try:
        train_in_app(client, procs, runs, prepared, "app-beside", args.preset, args.steps, args.cap)
    finally:
        beside.stop()
    app_beside = training_rate(runs / "app-beside", args.warmup)

    print("no policy: gptlab train and gptlab serve, every core each", flush=True)
    serve = procs.start(["serve", str(runs / "base"), "--port", "0", "--concurrency", "1"], logs / "serve.log",
                        threads=cores)
    serve_url = wait_for_url(serve, logs / "serve.log")
    with httpx.Client(base_url=serve_url, timeout=300) as warm:
        stream_once(warm, "base", args.gen_tokens)
    contrast = Generations(serve_url, "base", args.gen_tokens, args.every)
    contrast.start()
    try:
        train_directly(procs, train_args, root / "no-policy", cores, args.cap, logs / "no-policy.log")
    finally:
        contrast.stop()
    procs.stop(serve)
    no_policy = training_rate(root / "no-policy", args.warmup)
    client.close()

    base = solo[0]
    table = [
        row("solo, command line", solo, base, None),
        row("app, alone", app_alone, base, None),
        row("generation alone (app)", None, base, alone),
        row("app + generations", app_beside, base, beside),
        row("no policy (train + serve)", no_policy, base, contrast),
    ]
    verdict = [
        f"training keeps {app_beside[0] / base:.0%} of its solo speed with generations beside it (target >= 50%)",
        f"without the split it keeps {no_policy[0] / base:.0%}; the app alone keeps {app_alone[0] / base:.0%} "
        f"(its job gets {app_alone[2]} of {cores} cores)",
        f"generation beside training: {len(beside.records)} streamed, {len(beside.errors)} failed; first token p95 "
        f"{percentile([r[0] for r in beside.records], 95) * 1000:,.0f} ms against "
        f"{percentile([r[0] for r in alone.records], 95) * 1000:,.0f} ms alone",
    ]
    if base < app_alone[0]:
        verdict.append(f"warning: every core made training slower than {app_alone[2]} thread(s) did, so something else "
                       "was using the cores during the solo case; its ratios say little: run again on an idle machine")
    if beside.errors or contrast.errors:
        verdict.append(f"generation errors: {(beside.errors + contrast.errors)[:3]}")
    return table, verdict


if __name__ == "__main__":
    main()
