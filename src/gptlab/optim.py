"""The optimizers `--optimizer` names, in one registry: each a function (model, cfg, device) -> optimizer.

Design choices:
- AdamW decays matrices and embeddings but not biases or LayerNorm gains (`LanguageModel.optimizer_groups`),
  and runs fused where the device has a fused kernel.
- Muon (gptlab/muon.py) takes the blocks' matrices as the model names them (`block_matrices`), GPT's
  fused query/key/value weight as three square matrices; AdamW takes the rest (embeddings, the
  tied head, gains, biases). The two step together as one `OptimizerSet`.
- Each group's "lr" is its peak; the trainer scales every group by the schedule, so Muon keeps
  its own peak (`--muon-lr`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gptlab.config import TrainConfig
from gptlab.errors import GptlabError
from gptlab.model import LanguageModel
from gptlab.muon import Muon, OptimizerSet


def _fused_adamw(groups: list[dict], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    kwargs: dict[str, Any] = dict(lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
    if device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):  # no fused kernel for these parameters here
            pass
    return torch.optim.AdamW(groups, **kwargs)


def adamw(model: LanguageModel, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over every parameter, with weight decay on matrices and embeddings only."""
    return _fused_adamw(model.optimizer_groups(cfg.weight_decay), cfg, device)


def muon(model: LanguageModel, cfg: TrainConfig, device: torch.device) -> OptimizerSet:
    """Muon for the blocks' matrices (query, key and value orthogonalised apart), AdamW for the rest."""
    qkv, other = ([p for p in group if p.requires_grad] for group in model.block_matrices())
    groups = [{"params": qkv, "split": 3}, {"params": other}]  # a model without a fused qkv has no first group
    matrices = Muon([g for g in groups if g["params"]], lr=cfg.muon_lr, weight_decay=cfg.weight_decay)
    rest = model.optimizer_groups(cfg.weight_decay, exclude=frozenset(id(p) for p in qkv + other))
    return OptimizerSet(matrices, _fused_adamw(rest, cfg, device))


OPTIMIZERS: dict[str, Callable[[LanguageModel, TrainConfig, torch.device], Any]] = {"adamw": adamw, "muon": muon}


def make_optimizer(model: LanguageModel, cfg: TrainConfig, device: torch.device) -> Any:
    """The optimizer `cfg.optimizer` names, built for `model` on `device`."""
    build = OPTIMIZERS.get(cfg.optimizer)
    if build is None:
        raise GptlabError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer!r}")
    return build(model, cfg, device)
