"""Preparing a big corpus: throughput and peak memory of `gptlab prepare`, per tokenizer.

Makes a synthetic corpus of --size-mb (tiny Shakespeare's lines, reshuffled for every megabyte, or
random words when the corpus is not beside the checkout) in a temporary folder, prepares it with
each tokenizer in a fresh process, prints a table and deletes the folder.

Peak memory is reported two ways, from /proc every 0.1 s (Linux): the largest sum of the resident
sets of the whole process tree (the prepare process and its workers; an upper bound, as pages
shared between processes count once per process), and the largest peak of a single process
(VmHWM).

    python benchmarks/bench_prepare.py                          # 1 GB, char and gpt2
    python benchmarks/bench_prepare.py --size-mb 64 --tokenizers char,gpt2,bpe:4096 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def make_corpus(path: Path, size_mb: int, files: int = 1) -> list[Path]:
    """Write about `size_mb` MB of English-like text into `files` files under `path`."""
    if SHAKESPEARE.is_file():
        lines = SHAKESPEARE.read_text(encoding="utf-8").splitlines(keepends=True)
    else:
        rng = random.Random(0)
        words = ["".join(rng.choice("etaoinshrdlucmfwypvbgkjqxz") for _ in range(rng.randint(1, 9))) for _ in range(5000)]
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + "\n" for _ in range(40_000)]
    rng = random.Random(1)
    per_file = size_mb * 1_000_000 // files
    written = []
    for n in range(files):
        out = path / f"part{n:04d}.txt"
        with open(out, "w", encoding="utf-8") as f:
            size = 0
            while size < per_file:
                block = "".join(rng.choices(lines, k=25_000))  # about 1 MB
                f.write(block)
                size += len(block.encode("utf-8"))
        written.append(out)
    return written


def tree_memory(root: int) -> tuple[int, int]:
    """Resident set of `root` and all its descendants, summed, and the largest peak of one of them (bytes)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                parents[int(entry)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                pass
    family, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        kids = [child for child, parent in parents.items() if parent == pid and child not in family]
        family.update(kids)
        frontier.extend(kids)
    total, largest = 0, 0
    for pid in family:
        try:
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
            total += int(status["VmRSS"].split()[0]) * 1024
            largest = max(largest, int(status["VmHWM"].split()[0]) * 1024)
        except (OSError, KeyError, ValueError):
            pass
    return total, largest


def run_prepare(inputs: list[Path], spec: str, out: Path, workers: int) -> dict[str, float]:
    """Prepare in a fresh process: wall time, peak RSS of the process tree, largest peak of one process."""
    code = (f"from gptlab.data import prepare; prepare({[str(p) for p in inputs]!r}, {spec!r}, {str(out)!r}, "
            f"workers={workers}, log=lambda *a: None)")
    peak, largest = 0, 0
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code])
    done = threading.Event()

    def sample() -> None:
        nonlocal peak, largest
        while not done.is_set():
            tree, one = tree_memory(proc.pid)
            peak, largest = max(peak, tree), max(largest, one)
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = proc.wait()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if code != 0:
        raise SystemExit(f"prepare with {spec} failed (exit {code})")
    return {"seconds": seconds, "tree_peak": peak, "largest": largest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=1000, help="corpus size in MB (default: 1000)")
    parser.add_argument("--files", type=int, default=1, help="split the corpus into this many files (default: 1)")
    parser.add_argument("--tokenizers", default="char,gpt2", help="comma-separated (default: char,gpt2)")
    parser.add_argument("--workers", type=int, default=0, help="prepare's --workers (default: 0 = automatic)")
    args = parser.parse_args()

    from gptlab.data import default_workers

    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        root = Path(tmp)
        (root / "text").mkdir()
        t = time.perf_counter()
        inputs = make_corpus(root / "text", args.size_mb, args.files)
        total = sum(p.stat().st_size for p in inputs)
        workers = args.workers or default_workers()
        print(f"corpus: {total / 1e6:,.0f} MB in {len(inputs)} file(s), made in {time.perf_counter() - t:.1f}s; "
              f"{workers} worker processes; {os.cpu_count()} CPUs")
        print(f"{'tokenizer':<10} {'seconds':>8} {'MB/s':>7} {'tokens':>14} {'peak RSS, all processes':>24} "
              f"{'largest process':>16}")
        for spec in args.tokenizers.split(","):
            out = root / f"out-{spec.replace(':', '')}"
            r = run_prepare(inputs, spec, out, args.workers)
            meta = json.loads((out / "meta.json").read_text())
            tokens = meta["train_tokens"] + meta["val_tokens"]
            print(f"{spec:<10} {r['seconds']:>8.1f} {total / 1e6 / r['seconds']:>7.1f} {tokens:>14,} "
                  f"{r['tree_peak'] / 1e6:>21,.0f} MB {r['largest'] / 1e6:>13,.0f} MB", flush=True)


if __name__ == "__main__":
    main()
