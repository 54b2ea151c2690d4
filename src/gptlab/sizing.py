"""Settings sized to the data and the machine, for `gptlab train FILE` with no preset.

Design choices:
- Only what the user left open is chosen: any model-shape flag, a preset or a --config file
  turns the model choice off; any of --max-iters, --epochs, --time turns the length choice off.
- The length is a wall-clock budget (5 minutes on a CPU, 10 on a GPU), because how many steps fit
  depends on the machine; the learning-rate schedule spans the budget.
- The shape grows with the corpus in steps taken from the presets tuned for this budget: a model
  with far more parameters than training tokens memorises its corpus instead of learning it (a
  124M model on 1 MB of text reaches a train loss near 0.1 while its val loss climbs).
- A short CPU budget (under 2 minutes, given with --time) gets the small, fast `cpu-quick` shape
  whatever the corpus: in 43 s it learns more than `cpu-small`, whose larger steps pay off only
  over minutes (benchmarks/README.md has the timed search). `cpu-quick` is a llama block, which won
  every pair at 43 s; at 5 minutes GPT-2's block did, so `cpu-small` stays GPT-2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MODEL_SHAPE = ("n_layer", "n_head", "n_embd", "block_size")
LENGTH = ("max_iters", "epochs", "time")
CPU_BUDGET, GPU_BUDGET = "5m", "10m"
SHORT_CPU_BUDGET_SEC = 120.0
# Flagged: more parameters than this many per unique training token. nanoGPT's char-small (10.7M
# parameters on 1M characters, 10 per token) overfits within its 5000 steps; 2-3 per token does not.
MEMORISE_RATIO = 5.0


@dataclass
class Choice:
    """Settings chosen for the user and the reason, to print."""

    model: dict[str, Any]
    train: dict[str, Any]
    reason: str


# (fewest train tokens, preset name or "micro", model settings, train settings), small to large; a
# preset's own settings come first and the tier's settings override them.
CPU_TIERS: list[tuple[int, str, dict[str, Any], dict[str, Any]]] = [
    (0, "micro", dict(n_layer=2, n_head=2, n_embd=64, block_size=64, dropout=0.1),
     dict(batch_size=16, learning_rate=2e-3, warmup_iters=50, eval_interval=100)),
    (150_000, "cpu-quick", {}, {}),
    (600_000, "cpu-small", {}, {}),
]
GPU_TIERS: list[tuple[int, str, dict[str, Any], dict[str, Any]]] = [
    (0, "cpu-small", {}, {}),
    (500_000, "char-small", {}, {}),
    (50_000_000, "gpt2-124m", {}, dict(grad_accum=8, eval_interval=500)),
]


def choose(train_tokens: int, device_type: str, given: set[str], budget_sec: float | None = None) -> Choice | None:
    """Model and length settings for `train_tokens` of training text on `device_type`; None if all were given.

    `budget_sec` is the user's own --time, if any; the shape then fits that budget.
    """
    from gptlab.config import get_preset, preset_names

    pick_model = not (given & set(MODEL_SHAPE))
    pick_length = not (given & set(LENGTH))
    if not pick_model and not pick_length:
        return None
    on_gpu = device_type in ("cuda", "mps")
    tiers = GPU_TIERS if on_gpu else CPU_TIERS
    _, name, model, train = [t for t in tiers if t[0] <= train_tokens][-1]
    short = not on_gpu and budget_sec is not None and budget_sec < SHORT_CPU_BUDGET_SEC
    if short and name != "micro":
        name, model, train = "cpu-quick", {}, {}
    if name in preset_names():
        preset = get_preset(name)
        model, train = {**preset["model"], **model}, {**preset["train"], **train}
    # the tokenizer was already chosen (the data is prepared); the vocabulary comes from it
    model = {k: v for k, v in model.items() if k != "vocab_size"}
    train = {k: v for k, v in train.items() if k not in ("tokenizer", "max_iters") and k not in given}
    chosen_model = {k: v for k, v in model.items() if k not in given} if pick_model else {}
    chosen_train = train if pick_model else {}
    budget = GPU_BUDGET if on_gpu else CPU_BUDGET
    if pick_length:
        chosen_train["time"] = budget
    parts = []
    if pick_model:
        parts.append(
            f"the {name} shape ({model.get('arch', 'gpt2')} block, {model['n_layer']} layers, {model['n_embd']} wide, "
            f"context {model['block_size']}) "
            f"for {train_tokens:,} training tokens on {'a GPU' if on_gpu else 'the CPU'}"
            + (" and a budget under 2 minutes" if short and name == "cpu-quick" else "")
        )
    if pick_length:
        parts.append(f"a {budget} budget (give --max-iters, --epochs or --time to choose)")
    reason = "picked " + " and ".join(parts) + ("; pass --preset or shape flags to choose yourself" if pick_model else "")
    return Choice(chosen_model, chosen_train, reason)


def memorisation_warning(n_params: int, train_tokens: int) -> str | None:
    """A warning when the model is big enough to memorise its training text, else None."""
    if train_tokens <= 0 or n_params <= MEMORISE_RATIO * train_tokens:
        return None
    return (
        f"the model has {n_params:,} parameters for {train_tokens:,} training tokens "
        f"({n_params / train_tokens:.1f} per token): big enough to memorise this text rather than learn from it. "
        "Watch the val loss (the best-by-val checkpoint is kept), or use more text, more --dropout or a smaller model"
    )
