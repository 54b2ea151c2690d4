"""The human-readable record of a run: loss.png and samples.txt."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import torch

from gptlab import checkpoint as ckpt
from gptlab.engine import generate
from gptlab.tokenizer import start_ids


def plot_losses(run_dir: str | Path) -> Path | None:
    """Draw train and val loss against steps, with tokens seen on a second x-axis; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = ckpt.read_metrics(run_dir)
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(steps, [r["train_loss"] for r in rows], marker="o", markersize=3, label="train loss")
    ax.plot(steps, [r["val_loss"] for r in rows], marker="o", markersize=3, linestyle="--", label="val loss")
    best = min(rows, key=lambda r: r["val_loss"] if not math.isnan(r["val_loss"]) else math.inf)
    ax.annotate(f"best val {best['val_loss']:.3f}", (best["step"], best["val_loss"]),
                textcoords="offset points", xytext=(0, 12), ha="center", fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend(title=run_dir.resolve().name, title_fontsize=8)
    if len(rows) > 1 and rows[-1]["step"] > 0:
        tokens_per_step = rows[-1]["tokens_seen"] / rows[-1]["step"]
        top = ax.secondary_xaxis("top", functions=(lambda s: s * tokens_per_step, lambda t: t / tokens_per_step))
        top.set_xlabel("tokens seen")
    return save_figure(fig, run_dir / ckpt.LOSS_PLOT, run_dir)


def save_figure(fig: Any, path: Path, run_dir: Path | None = None) -> Path:
    """Write a matplotlib figure as PNG atomically and close it; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    data = buffer.getvalue()
    ckpt.atomic_write(path, lambda f: f.write(data), run_dir)
    return path


@torch.no_grad()
def write_samples(run_dir: str | Path, model: torch.nn.Module, tokenizer: Any, num_samples: int,
                  max_new_tokens: int, seed: int = 1337, temperature: float = 0.8, top_k: int = 200) -> list[str]:
    """Write `num_samples` unprompted samples to samples.txt; returns them."""
    if num_samples < 1:
        return []
    device = next(model.parameters()).device
    model.eval()
    prompt = start_ids(tokenizer)
    g = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([prompt] * num_samples, dtype=torch.long, device=device)
    out = generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=g)
    texts = [tokenizer.decode(row[len(prompt):].tolist()) for row in out]
    body = "\n\n=== Next Sequence ===\n\n".join(texts)
    header = f"# {num_samples} samples, {max_new_tokens} tokens each, temperature {temperature}, top-k {top_k}, seed {seed}\n\n"
    ckpt.atomic_write_text(Path(run_dir) / ckpt.SAMPLES, header + body + "\n", run_dir)
    return texts
