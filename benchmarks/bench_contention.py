"""Training beside another busy torch process: how much of its solo speed a trainer keeps, with and without adapting its threads.

    .venv/bin/python benchmarks/bench_contention.py              # about 7 minutes on a 2-core machine
    .venv/bin/python benchmarks/bench_contention.py --repeat 2 --cap 45   # every case twice, medians (10 minutes)
    .venv/bin/python benchmarks/bench_contention.py --modes off,adapt,off-passive,adapt-passive

On a small machine two torch processes that each use every core slow each other far more than a
fair share would: an OpenMP parallel region waits for its slowest thread, and a thread descheduled
by the other process stalls the whole step. The trainer watches its step times and drops a thread
when they jump (gptlab/cores.py; GPTLAB_ADAPT_THREADS=0 turns that off). This script prepares tiny
Shakespeare (char), trains `gptlab train --preset cpu-tiny` for --steps steps (evaluation only at the
start and the end) with every core, and does so in each of these cases:

  alone        nothing beside it
  busy 1t      beside a torch process multiplying matrices in a loop on one thread
  busy 2t      the same on two threads
  sample       beside `gptlab sample` generating from the run of the first case, back to back

and in each mode: `adapt` (the default), `off` (GPTLAB_ADAPT_THREADS=0), and optionally either with
OMP_WAIT_POLICY=PASSIVE given to the trainer (`adapt-passive`, `off-passive`: waiting threads sleep
instead of spinning). The process beside it never gets these settings.

Training tokens/s is the trainer's own account from its events.jsonl: Δtokens_seen / Δelapsed_sec
between the first progress event after --warmup seconds and the last one. A case still running after
--cap seconds is stopped (it saves and exits) and measured over the steps it made. "vs solo" is
against the same mode's `alone` case. "threads" is the share of progress events at each thread
count. With --repeat N every case runs N times (cases interleaved, so slow spells of the machine hit
every mode alike) and the table shows medians. The target: training keeps >= 45% of its solo speed
beside each of them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
NO_EVAL = 1_000_000
MODES = {
    "adapt": {},
    "off": {"GPTLAB_ADAPT_THREADS": "0"},
    "adapt-passive": {"OMP_WAIT_POLICY": "PASSIVE"},
    "off-passive": {"GPTLAB_ADAPT_THREADS": "0", "OMP_WAIT_POLICY": "PASSIVE"},
}
CASES = ["alone", "busy 1t", "busy 2t", "sample"]
BUSY = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
a, b = torch.randn(256, 256), torch.randn(256, 256)
while True:
    a @ b
"""


def gptlab(*args: str) -> list[str]:
    return [sys.executable, "-m", "gptlab", *args]


def start_beside(case: str, sample_run: Path | None, env: dict[str, str], log: Path) -> subprocess.Popen | None:
    """The process a case runs beside the trainer, in a session of its own (one killpg stops it)."""
    if case == "alone":
        return None
    if case.startswith("busy"):
        args = [sys.executable, "-c", BUSY, case.split()[1].rstrip("t")]
    else:  # generations back to back, each a fresh `gptlab sample` of many tokens
        sample = " ".join(gptlab("sample", str(sample_run), "--max-new-tokens", "20000", "--checkpoint", "last"))
        args = ["bash", "-c", f"while true; do {sample} > /dev/null; done"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    time.sleep(3.0 if case == "sample" else 1.0)  # let it get going
    return proc


def stop(proc: subprocess.Popen | None, sig: int = signal.SIGKILL, grace: float = 30.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(grace)
    except (ProcessLookupError, PermissionError):
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def train(data: Path, out: Path, steps: int, env: dict[str, str], cap: float, log: Path) -> None:
    args = gptlab("train", "--preset", "cpu-tiny", "--data", str(data), "--out", str(out), "--max-iters", str(steps),
                  "--eval-interval", str(NO_EVAL), "--quiet")
    with open(log, "ab") as f:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        proc.wait(cap)
    except subprocess.TimeoutExpired:
        print(f"    past --cap {cap:.0f} s: stopping it, measured over the steps it made", flush=True)
        stop(proc, signal.SIGINT, grace=60.0)
    if not (out / "events.jsonl").is_file():
        raise SystemExit(f"{out.name} wrote no events:\n{log.read_text()[-2000:]}")


def measure(run: Path, warmup: float) -> tuple[float, Counter]:
    """(steady training tokens/s, progress events per thread count) from the run's events.jsonl."""
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines() if line.strip()]
    progress = [e for e in events if e["event"] == "progress"]
    steady = [e for e in progress if e["elapsed_sec"] >= warmup]
    if len(steady) < 2:
        steady = progress
    threads = Counter(e.get("threads", 0) for e in steady)
    if len(steady) < 2 or steady[-1]["elapsed_sec"] <= steady[0]["elapsed_sec"]:
        return math.nan, threads
    first, last = steady[0], steady[-1]
    return (last["tokens_seen"] - first["tokens_seen"]) / (last["elapsed_sec"] - first["elapsed_sec"]), threads


def describe_threads(counts: list[Counter]) -> str:
    total = Counter()
    for c in counts:
        total.update(c)
    n = sum(total.values()) or 1
    return " ".join(f"{t}:{total[t] / n:.0%}" for t in sorted(total, reverse=True))


def print_table(modes: list[str], cases: list[str], results: dict[tuple[str, str], list[tuple[float, Counter]]]) -> None:
    head = ["case"]
    for mode in modes:
        head += [f"{mode} tok/s", "vs solo", "threads"]
    if "adapt" in modes and "off" in modes:
        head.append("adapt / off")
    rows = []
    for case in cases:
        cells = [case]
        rates = {}
        for mode in modes:
            got = results.get((mode, case), [])
            if not got:
                cells += ["-", "-", "-"]
                continue
            rate = statistics.median(r for r, _ in got)
            rates[mode] = rate
            solo = statistics.median(r for r, _ in results.get((mode, "alone"), [(math.nan, None)]))
            cells += [f"{rate:,.0f}", f"{rate / solo:.0%}", describe_threads([c for _, c in got])]
        if "adapt" in modes and "off" in modes:
            cells.append(f"{rates['adapt'] / rates['off']:.2f}x" if "adapt" in rates and "off" in rates else "-")
        rows.append(cells)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for cells in [head, ["-" * w for w in widths], *rows]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT,
                        help=f"the text to train on (default: {DEFAULT_TEXT.relative_to(REPO.parent)} beside the repository)")
    parser.add_argument("--steps", type=int, default=300, help="training steps per case (default: 300)")
    parser.add_argument("--modes", default="adapt,off",
                        help=f"comma-separated, from {', '.join(MODES)} (default: adapt,off)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--repeat", type=int, default=1, help="runs of every case; the table shows medians (1)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of training left out of each rate (2)")
    parser.add_argument("--cap", type=float, default=90.0, help="stop a case after this many seconds (default: 90)")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if unknown := [m for m in modes if m not in MODES] + [c for c in cases if c not in CASES]:
        parser.error(f"unknown modes or cases: {unknown}")
    if "alone" not in cases:
        cases.insert(0, "alone")  # every mode needs its solo figure
    if not args.text.is_file():
        parser.error(f"no text at {args.text}; give --text")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results: dict[tuple[str, str], list[tuple[float, Counter]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-contention-") as tmp:
        root = Path(tmp)
        logs = root / "logs"
        logs.mkdir()
        base_env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GPTLAB_ADAPT_THREADS")}
        base_env.update(TMPDIR=tmp, PYTHONUNBUFFERED="1")
        data = root / "data"
        subprocess.run(gptlab("prepare", str(args.text), "--out", str(data)), env=base_env, check=True,
                       stdout=subprocess.DEVNULL)
        print(f"{os.cpu_count()} cores; cpu-tiny, {args.steps} steps per case; modes {', '.join(modes)}; "
              f"{args.repeat} run(s) each", flush=True)
        sample_run = None
        for rep in range(args.repeat):
            for case in cases:
                for mode in modes:
                    name = f"{mode}-{case.replace(' ', '')}-{rep}"
                    beside = start_beside(case, sample_run, base_env, logs / f"{name}-beside.log")
                    began = time.monotonic()
                    try:
                        train(data, root / name, args.steps, {**base_env, **MODES[mode]}, args.cap,
                              logs / f"{name}.log")
                    finally:
                        stop(beside)
                    rate, threads = measure(root / name, args.warmup)
                    results.setdefault((mode, case), []).append((rate, threads))
                    print(f"  {case:8s} {mode:14s} {rate:9,.0f} tok/s  threads {describe_threads([threads]):12s} "
                          f"({time.monotonic() - began:.0f} s)", flush=True)
                    if sample_run is None:
                        sample_run = root / name  # the first finished run is what `sample` generates from
    print()
    print_table(modes, cases, results)
    print()
    for mode in modes:
        solo = statistics.median(r for r, _ in results[(mode, "alone")])
        worst = min((statistics.median(r for r, _ in results[(mode, c)]) / solo, c) for c in cases if c != "alone")
        print(f"{mode}: the worst case keeps {worst[0]:.0%} of solo ({worst[1]}; target >= 45%)")


if __name__ == "__main__":
    main()
