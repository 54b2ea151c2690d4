"""Token ids in, token ids out: sampling from a trained model.

Design choices:
- The engine knows only token ids; text lives in the tokenizer.
- Sampling is a pure function of (logits, generator, temperature, top_k); randomness comes from a
  `torch.Generator` passed in, so a seed reproduces the same ids.
- Past the context length the window slides: the model sees the last `block_size` tokens.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def sample_next(
    logits: torch.Tensor, generator: torch.Generator | None, temperature: float = 1.0, top_k: int | None = None
) -> torch.Tensor:
    """Next ids (B, 1) from last-position logits (B, V); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Append `max_new_tokens` sampled ids to `idx` (B, T); returns (B, T + max_new_tokens)."""
    block_size = model.config.block_size
    for _ in range(max_new_tokens):
        logits = model(idx[:, -block_size:])[:, -1, :]  # (B, V)
        idx = torch.cat([idx, sample_next(logits, generator, temperature, top_k)], dim=1)
    return idx
