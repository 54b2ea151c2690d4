"""The gptlab CLI with NaN losses injected: `python tests/inject_nan.py "5,12*3" train ...`.

"5,12*3" makes the loss NaN for the first attempt at step 5 and the first three attempts at step 12
(a skipped step is attempted again at the same step number).
"""

from __future__ import annotations

import sys
from collections import Counter

import torch

from gptlab import cli
from gptlab import train as trainer


def nan_attempts(spec: str) -> Counter[int]:
    """How many attempts at each step get a NaN loss, from "STEP[*TIMES],...". """
    counts: Counter[int] = Counter()
    for item in spec.split(","):
        if item.strip():
            at, _, times = item.partition("*")
            counts[int(at)] += int(times or 1)
    return counts


def install(spec: str) -> None:
    """Add a loss hook that turns the loss NaN at the attempts `spec` names."""
    left = nan_attempts(spec)

    def poison(step: int, loss: torch.Tensor) -> torch.Tensor:
        if left[step] > 0:
            left[step] -= 1
            return loss * float("nan")
        return loss

    trainer.loss_hooks.append(poison)


if __name__ == "__main__":
    install(sys.argv[1])
    raise SystemExit(cli.main(sys.argv[2:]))
