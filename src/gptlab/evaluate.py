"""How well a trained model predicts text: mean loss, perplexity and bits per byte.

Design choices:
- Every token of the text is scored exactly once (except the first, which nothing predicts), with
  windows of the context length that slide over the whole text; no random subset. With
  `stride < block_size` the windows overlap and only each window's last `stride` targets are scored,
  so most tokens are predicted with more context (the Hugging Face perplexity recipe). The default
  stride is the context length: disjoint windows, what training's val loss measures.
- The last window is aligned to the end of the text, so every window has the same length and
  windows batch together.
- Perplexity is exp(mean loss). Bits per byte is the summed loss in bits over the UTF-8 bytes of the
  scored tokens; end-of-text tokens stand for no bytes and are left out of it (as nanochat does),
  which makes the figure comparable across tokenizers.
- Text files are checked (UTF-8, not binary) and encoded with the run's own tokenizer; a prepared
  data folder (or the run's own, by default) is scored on its val split.
- A progress bar (tqdm) appears on a terminal only.
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from gptlab.data import check_text_file, load_tokens, read_meta
from gptlab.errors import GptlabError
from gptlab.generation import TextModel, token_byte_lengths

LOGITS_BUDGET = 1 << 26  # floats of logits per batch (256 MB): batch size = budget / (window * vocab)


@dataclass
class EvalResult:
    """The scores of one evaluation."""

    loss: float  # mean cross-entropy in nats per token
    perplexity: float  # exp(loss)
    bits_per_byte: float
    tokens: int  # tokens scored
    bytes: int  # UTF-8 bytes behind the scored tokens
    windows: int
    source: str

    def as_dict(self) -> dict[str, Any]:
        """The JSON-ready form."""
        return asdict(self)


def window_plan(n_tokens: int, block_size: int, stride: int) -> tuple[int, list[tuple[int, int]]]:
    """Window length and (start, first scored offset) per window, so each target is scored once."""
    targets = n_tokens - 1
    length = min(block_size, targets)
    plan: list[tuple[int, int]] = []
    scored_to = 0  # targets [0, scored_to) are done; target j is token j + 1
    start = 0
    while scored_to < targets:
        start = min(start, targets - length)  # the last window ends at the end of the text
        end = start + length
        plan.append((start, scored_to - start))
        scored_to = end
        start += stride
    return length, plan


@torch.inference_mode()
def score_tokens(
    model: torch.nn.Module, tokens: np.ndarray, byte_lengths: np.ndarray, source: str,
    stride: int = 0, batch_size: int = 0, progress: bool = True,
) -> EvalResult:
    """Mean loss, perplexity and bits per byte of `model` on `tokens`, every target scored once."""
    block_size = model.config.block_size
    vocab_size = model.config.vocab_size
    stride = stride or block_size
    if not 1 <= stride <= block_size:
        raise GptlabError(f"--stride must be from 1 to the context length {block_size}, got {stride}")
    if len(tokens) < 2:
        raise GptlabError(f"{source} is too short to evaluate: it has {len(tokens)} token(s) and needs at least 2")
    length, plan = window_plan(len(tokens), block_size, stride)
    batch_size = batch_size or max(1, LOGITS_BUDGET // (length * vocab_size))
    device = next(model.parameters()).device
    model.eval()
    offsets = np.arange(length + 1)
    position = torch.arange(length, device=device)
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    text_nats = torch.zeros((), dtype=torch.float64, device=device)
    n_scored, n_bytes = 0, 0
    bar = _progress(len(plan)) if progress else None
    try:
        for b in range(0, len(plan), batch_size):
            chunk = plan[b : b + batch_size]
            starts = np.array([s for s, _ in chunk])
            window = np.asarray(tokens[starts[:, None] + offsets[None, :]], dtype=np.int64)  # (b, length + 1)
            x = torch.from_numpy(window[:, :-1]).to(device)
            y = torch.from_numpy(window[:, 1:]).to(device)
            first = torch.tensor([f for _, f in chunk], device=device)[:, None]
            scored = position[None, :] >= first  # (b, length): targets not scored by an earlier window
            logits = model(x).float()  # (b, length, vocab)
            nats = F.cross_entropy(logits.view(-1, vocab_size), y.reshape(-1), reduction="none").view_as(y)  # (b, length)
            target_bytes = torch.from_numpy(byte_lengths[window[:, 1:]]).to(device)
            total_nats += nats[scored].sum(dtype=torch.float64)
            text_nats += nats[scored & (target_bytes > 0)].sum(dtype=torch.float64)
            n_scored += int(scored.sum())
            n_bytes += int(target_bytes[scored].sum())
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    loss = total_nats.item() / n_scored
    return EvalResult(
        loss=loss, perplexity=math.exp(loss),
        bits_per_byte=text_nats.item() / math.log(2) / n_bytes if n_bytes else float("nan"),
        tokens=n_scored, bytes=n_bytes, windows=len(plan), source=source,
    )


def _progress(total: int) -> Any:
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="window", desc="evaluating", dynamic_ncols=True, file=sys.stderr)


def eval_tokens(tm: TextModel, data: str | Path | None) -> tuple[np.ndarray, str]:
    """The tokens to score and a description: a text file, a prepared folder's val split, or the run's."""
    if data is None:
        folder = tm.training_data()
        return _val_split(tm, folder), f"the val split of {folder}"
    path = Path(data)
    if path.is_dir():
        if not (path / "meta.json").is_file():
            raise GptlabError(f"--data {path} is a folder but not a prepared data folder (no meta.json); give a text file")
        return _val_split(tm, path), f"the val split of {path}"
    if not path.is_file():
        raise GptlabError(f"--data {path} not found; give a text file or a prepared data folder")
    check_text_file(path)
    text = path.read_text(encoding="utf-8")
    return np.asarray(tm.tokenizer.encode(text), dtype=np.int64), str(path)


def _val_split(tm: TextModel, folder: Path) -> np.ndarray:
    meta = read_meta(folder)
    if meta.get("vocab_size") != tm.tokenizer.vocab_size:
        raise GptlabError(
            f"{folder} was prepared with a {meta.get('tokenizer')} tokenizer of {meta.get('vocab_size')} tokens, "
            f"but this run's has {tm.tokenizer.vocab_size}; evaluate on a text file instead"
        )
    return load_tokens(folder, "val")


def evaluate(
    tm: TextModel, data: str | Path | None = None, stride: int = 0, batch_size: int = 0, progress: bool = True,
) -> EvalResult:
    """Score a run on a text file, a prepared data folder's val split, or (default) its own val split."""
    tokens, source = eval_tokens(tm, data)
    return score_tokens(tm.model, tokens, token_byte_lengths(tm.tokenizer), source, stride, batch_size, progress)
