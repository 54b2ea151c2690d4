"""Time-to-quality on tiny Shakespeare (char level): train candidate settings for a wall-clock budget, side by side.

    python benchmarks/tune_cpu.py --budget 43s --candidates recipe fast-a fast-b
    python benchmarks/tune_cpu.py --budget 5m --candidates cpu-small llama-small --repeats 2

Each candidate is `gptlab train shakespeare --tokenizer char --time BUDGET` plus its own flags, run
one after another (never two at once: they would share the cores and both be slowed). The table
shows, per candidate: optimizer steps made, ms per step, the val loss at the end of the budget and
the first elapsed second at which an evaluation reached --threshold (nanoGPT's CPU recipe reaches
1.886 in 86 s here). With --repeats N the candidates take turns N times (A B A B ...), so a drift in
the machine's speed touches each alike, and the summary gives each one's mean. Results go to
stdout; record the search in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

_MUON = "--optimizer muon --learning-rate 3e-3 --warmup-iters 50"
# Flags beyond `--tokenizer char --time BUDGET`. "recipe" is nanoGPT's CPU recipe with its
# schedule laid over the budget.
CANDIDATES: dict[str, list[str]] = {
    "recipe": "--n-layer 4 --n-head 4 --n-embd 128 --block-size 64 --batch-size 12 --learning-rate 1e-3 --warmup-iters 100".split(),
    "cpu-tiny": "--preset cpu-tiny".split(),
    "cpu-quick": "--preset cpu-quick".split(),
    "cpu-small": "--preset cpu-small".split(),  # fast-g's settings since they won the 5-minute search
    "fast-a": "--n-layer 4 --n-head 4 --n-embd 128 --block-size 64 --batch-size 12 --learning-rate 2e-3 --warmup-iters 50".split(),
    "fast-b": "--n-layer 4 --n-head 4 --n-embd 128 --block-size 64 --batch-size 16 --learning-rate 3e-3 --warmup-iters 50".split(),
    "fast-c": "--n-layer 4 --n-head 4 --n-embd 128 --block-size 64 --batch-size 24 --learning-rate 3e-3 --warmup-iters 50".split(),
    "fast-d": "--n-layer 3 --n-head 4 --n-embd 128 --block-size 64 --batch-size 24 --learning-rate 3e-3 --warmup-iters 50".split(),
    "fast-e": "--n-layer 4 --n-head 4 --n-embd 192 --block-size 64 --batch-size 16 --learning-rate 2e-3 --warmup-iters 50".split(),
    "fast-f": "--n-layer 4 --n-head 4 --n-embd 128 --block-size 64 --batch-size 16 --learning-rate 5e-3 --warmup-iters 50".split(),
    "fast-g": "--n-layer 4 --n-head 4 --n-embd 128 --block-size 128 --batch-size 12 --learning-rate 3e-3 --warmup-iters 50".split(),
    "small-a": "--n-layer 6 --n-head 6 --n-embd 192 --block-size 128 --batch-size 24 --learning-rate 2e-3 --warmup-iters 100".split(),
    "small-b": "--n-layer 4 --n-head 4 --n-embd 256 --block-size 128 --batch-size 24 --learning-rate 2e-3 --warmup-iters 100".split(),
    "small-c": "--n-layer 6 --n-head 8 --n-embd 256 --block-size 128 --batch-size 16 --learning-rate 1.5e-3 --warmup-iters 100".split(),
    "small-d": "--n-layer 4 --n-head 4 --n-embd 192 --block-size 128 --batch-size 32 --learning-rate 3e-3 --warmup-iters 100".split(),
    # Muon for the blocks' matrices (AdamW at --learning-rate for the rest)
    "muon-a": f"{_MUON} --muon-lr 0.02 --n-layer 3 --n-head 4 --n-embd 128 --block-size 64 --batch-size 16".split(),
    "muon-b": f"{_MUON} --muon-lr 0.03 --n-layer 3 --n-head 4 --n-embd 128 --block-size 64 --batch-size 16".split(),
    "muon-c": f"{_MUON} --muon-lr 0.015 --n-layer 3 --n-head 4 --n-embd 128 --block-size 64 --batch-size 16".split(),
    "muon-d": f"{_MUON} --muon-lr 0.01 --n-layer 3 --n-head 4 --n-embd 128 --block-size 64 --batch-size 16".split(),
    "muon-e": f"{_MUON} --muon-lr 0.015 --n-layer 3 --n-head 4 --n-embd 128 --block-size 64 --batch-size 12".split(),
    "muon-f": f"{_MUON} --muon-lr 0.02 --n-layer 4 --n-head 4 --n-embd 128 --block-size 64 --batch-size 16".split(),
    "muon-g": f"{_MUON} --muon-lr 0.02 --n-layer 2 --n-head 4 --n-embd 192 --block-size 64 --batch-size 16".split(),
    "muon-s1": f"{_MUON} --muon-lr 0.015 --n-layer 4 --n-head 4 --n-embd 128 --block-size 128 --batch-size 12".split(),
    "muon-s2": f"{_MUON} --muon-lr 0.015 --n-layer 4 --n-head 4 --n-embd 192 --block-size 128 --batch-size 12".split(),
    "muon-s3": f"{_MUON} --muon-lr 0.015 --n-layer 3 --n-head 4 --n-embd 128 --block-size 64 --batch-size 16".split(),
    "muon-s4": f"{_MUON} --muon-lr 0.015 --n-layer 6 --n-head 6 --n-embd 192 --block-size 128 --batch-size 12".split(),
    # The Llama block (rotary positions, RMSNorm, SwiGLU) at the presets' shapes and around them
    "llama-quick": "--preset cpu-quick --arch llama".split(),
    "llama-small": "--preset cpu-small --arch llama".split(),
    "llama-quick-h256": "--preset cpu-quick --arch llama --mlp-hidden 256".split(),
    "llama-small-h256": "--preset cpu-small --arch llama --mlp-hidden 256".split(),
    "llama-quick-kv2": "--preset cpu-quick --arch llama --n-kv-head 2".split(),
    "llama-small-kv2": "--preset cpu-small --arch llama --n-kv-head 2".split(),
    "llama-small-m15": "--preset cpu-small --arch llama --mlp-hidden 256 --muon-lr 0.015".split(),
    "llama-small-l3": "--preset cpu-small --arch llama --mlp-hidden 256 --n-layer 3".split(),
    "llama-small-c256": "--preset cpu-small --arch llama --mlp-hidden 256 --block-size 256 --batch-size 6".split(),
    # Over 5 minutes a fast machine makes ~4,000 steps of cpu-small: several passes over the text, and
    # the train loss runs away from the val loss. Dropout and a wider model against that.
    "small-drop1": "--preset cpu-small --dropout 0.1".split(),
    "small-drop2": "--preset cpu-small --dropout 0.2".split(),
}


def run_candidate(name: str, flags: list[str], budget: str, out: Path, eval_interval: int) -> dict:
    """Train one candidate; its steps, ms/step, final val loss and the metrics rows."""
    cmd = [sys.executable, "-m", "gptlab", "train", "shakespeare", "--tokenizer", "char", "--time", budget,
           "--out", str(out), "--overwrite", "--eval-interval", str(eval_interval), "--num-samples", "0",
           "--quiet", *flags]
    subprocess.run(cmd, check=True)
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    last = rows[-1]
    steps = int(last["step"])
    train_seconds = float(last["elapsed_sec"])
    return {"name": name, "steps": steps, "ms_per_step": 1000 * train_seconds / max(1, steps),
            "val": float(last["val_loss"]), "rows": rows}


def first_reaching(rows: list[dict], threshold: float) -> str:
    for row in rows:
        if float(row["val_loss"]) <= threshold:
            return f"{float(row['elapsed_sec']):.0f} s (step {row['step']})"
    return "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="5m", help="wall-clock budget per candidate (default: 5m)")
    parser.add_argument("--candidates", nargs="+", default=["recipe"], choices=list(CANDIDATES))
    parser.add_argument("--threshold", type=float, default=1.886, help="val loss whose first arrival is timed")
    parser.add_argument("--eval-interval", type=int, default=100, help="steps between evaluations (default: 100)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all candidates, taking turns (default: 1)")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {name: [] for name in args.candidates}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name in args.candidates:
                result = run_candidate(name, CANDIDATES[name], args.budget, Path(tmp) / name, args.eval_interval)
                results[name].append(result)
                print(f"{name:<12} {result['steps']:>6} steps  {result['ms_per_step']:7.1f} ms/step  "
                      f"val {result['val']:.4f}  val<={args.threshold} at {first_reaching(result['rows'], args.threshold)}",
                      flush=True)
    print(f"\nbudget {args.budget}, {args.repeats} round(s):")
    for name, runs in results.items():
        vals = [r["val"] for r in runs]
        steps = sum(r["steps"] for r in runs) / len(runs)
        print(f"  {name:<12} mean val {sum(vals) / len(vals):.4f}  (runs: {', '.join(f'{v:.4f}' for v in vals)}; "
              f"{steps:,.0f} steps on average)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
