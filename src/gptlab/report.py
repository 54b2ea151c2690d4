"""The human-readable record of a run: loss.png, samples.txt, and the next-token temperature plot."""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptlab import rundir
from gptlab.config import SAMPLES_SETTINGS, SampleConfig
from gptlab.engine import generate
from gptlab.errors import GptlabError
from gptlab.fsutil import atomic_write_bytes, atomic_write_text
from gptlab.generation import TextModel
from gptlab.tokenizer import Tokenizer, start_ids


def plot_losses(run_dir: str | Path) -> Path | None:
    """Draw train and val loss against steps, with tokens seen on a second x-axis; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = rundir.read_metrics(run_dir)
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
    return save_figure(fig, run_dir / rundir.LOSS_PLOT)


def save_figure(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure as PNG atomically and close it; returns the path."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # A run or prompt in a script the default font lacks (Chinese, Arabic, ...) draws as boxes in
        # the title; matplotlib would also print one warning per missing glyph to the terminal.
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font", category=UserWarning)
        fig.tight_layout()
        fig.savefig(buffer, format="png")
    plt.close(fig)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return path


@torch.no_grad()
def write_samples(run_dir: str | Path, model: torch.nn.Module, tokenizer: Any, num_samples: int,
                  max_new_tokens: int, seed: int = 1337, settings: SampleConfig = SAMPLES_SETTINGS) -> list[str]:
    """Write `num_samples` unprompted samples to samples.txt, sampled as `settings` says; returns them."""
    if num_samples < 1:
        return []
    texts = sample_texts(model, tokenizer, num_samples, max_new_tokens, seed, settings)
    body = "\n\n=== Next Sequence ===\n\n".join(texts)
    header = (f"# {num_samples} samples, {max_new_tokens} tokens each, temperature {settings.temperature}, "
              f"top-k {settings.top_k}, seed {seed}\n\n")
    atomic_write_text(Path(run_dir) / rundir.SAMPLES, header + body + "\n")
    return texts


@torch.no_grad()
def sample_texts(model: torch.nn.Module, tokenizer: Any, num_samples: int, max_new_tokens: int, seed: int = 1337,
                 settings: SampleConfig = SAMPLES_SETTINGS) -> list[str]:
    """`num_samples` unprompted samples of `max_new_tokens` tokens (the model is left in eval mode)."""
    device = next(model.parameters()).device
    model.eval()
    if hasattr(tokenizer, "conversation"):
        return chat_replies(model, tokenizer, CHAT_PROBES[:num_samples] or CHAT_PROBES[:1], max_new_tokens, seed,
                            settings)
    prompt = start_ids(tokenizer)
    idx = torch.tensor([prompt] * num_samples, dtype=torch.long, device=device)
    out = generate(model, idx, max_new_tokens, settings, seed=seed)
    return [tokenizer.decode(row[len(prompt):].tolist()) for row in out]


# What a chat run's samples answer: a greeting and a question, whatever the conversations were about.
CHAT_PROBES = ([{"role": "user", "content": "Hello! Who are you?"}],
               [{"role": "user", "content": "What is 2 + 3?"}])


@torch.no_grad()
def chat_replies(model: torch.nn.Module, tokenizer: Any, conversations: Any, max_new_tokens: int, seed: int = 1337,
                 settings: SampleConfig = SAMPLES_SETTINGS) -> list[str]:
    """The assistant's reply to each conversation, written after it ("User: ...", "Assistant: ...")."""
    from dataclasses import replace

    from gptlab.engine import Engine

    engine = Engine(model, eot_id=tokenizer.eot_id, stop_ids=tokenizer.stop_ids)
    config = replace(settings, max_new_tokens=max_new_tokens, seed=seed)
    out = []
    for messages in conversations:
        try:
            ids, _ = tokenizer.conversation(list(messages), add_generation_prompt=True)
        except GptlabError:  # a char tokenizer that never saw one of the question's characters
            continue
        reply = tokenizer.decode(engine.generate(ids, config)[0])
        turns = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
        out.append("\n".join(turns + [f"Assistant: {reply}"]))
    return out


def sample_text(model: torch.nn.Module, tokenizer: Any, max_new_tokens: int, seed: int = 1337) -> str:
    """One unprompted sample."""
    return sample_texts(model, tokenizer, 1, max_new_tokens, seed)[0]


def token_label(tokenizer: Tokenizer, token: int) -> str:
    """A short printable name for a token: whitespace made visible, partial characters as bytes."""
    text = tokenizer.decode([token])
    if "\ufffd" in text:
        return repr(tokenizer.token_bytes(token))[1:]
    return text.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t") or repr(text)


def plot_temperature(
    tm: TextModel, prompt: str = "", path: str | Path | None = None,
    temperatures: tuple[float, ...] = (0.1, 1.0, 5.0), top: int = 20,
) -> Path:
    """Draw the next-token distribution after `prompt` at several temperatures to a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if any(not t > 0 for t in temperatures):
        raise GptlabError(f"temperatures to plot must be > 0, got {', '.join(map(str, temperatures))}")
    if path is None:
        if tm.run_dir is None:
            raise GptlabError("give a path for the plot")
        path = tm.run_dir / rundir.TEMPERATURE_PLOT
    path = Path(path)
    logits = tm.next_token_logits(prompt)
    shown = torch.argsort(logits, descending=True)[: min(top, logits.numel())]  # the most likely at T = 1
    labels = [token_label(tm.tokenizer, int(i)) for i in shown]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.45 * len(labels) + 2), 4.2), dpi=120)
    width = 0.8 / len(temperatures)
    x = np.arange(len(labels))
    for n, t in enumerate(temperatures):
        probs = torch.softmax(logits / t, dim=-1)[shown].numpy()
        ax.bar(x + (n - (len(temperatures) - 1) / 2) * width, probs, width, label=f"temperature {t:g}")
    ax.set_xticks(x, labels, rotation=90 if max(map(len, labels)) > 3 else 0, fontsize=8)
    ax.set_ylabel("probability of the next token")
    tail = prompt[-40:] if prompt else "(empty prompt)"
    ax.set_title(f"next token after {tail!r}: the {len(labels)} most likely at temperature 1", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)
