"""Configuration as plain dataclasses, and the named presets as plain data.

Design choices:
- The dataclasses are the one source of truth: the CLI generates its flags from their fields
  (name, type, default and the `help` metadata), and `config.json` in a run is their `asdict`.
- Precedence is preset < config file < flags, resolved by `resolve_config`.
- `vocab_size = 0` means "take it from the tokenizer"; the data decides, not the preset.
- Every check a user can fail lives in `__post_init__` and raises `GptlabError` naming the flag.
- A sampling setting has a name on each front end: a flag of `gptlab sample`, a control of the page,
  a parameter of the API. `SAMPLE_FIELD_NAMES` is the one table of them. SampleConfig's checks raise
  `SettingError` with the field and the problem; its text is the CLI's, and `message_for(front)`
  words it with that front end's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from gptlab.errors import GptlabError
from gptlab.fsutil import read_json_object

ARCHS = ("gpt2", "llama")
# Model settings added with the llama block: a run's config.json written before them is a gpt2 run,
# which is what their defaults describe, so they may be absent (every other model key must be there).
LATER_MODEL_FIELDS = ("arch", "n_kv_head", "mlp_hidden", "rope_theta", "norm_eps", "tie_embeddings", "qk_norm")


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class ModelConfig:
    """Shape of the model: a GPT-2 block or a Llama-style one (`arch`)."""

    n_layer: int = _help("number of transformer blocks", default=4)
    n_head: int = _help("attention heads per block (must divide n_embd)", default=4)
    n_embd: int = _help("embedding width", default=128)
    block_size: int = _help("context length in tokens", default=64)
    vocab_size: int = _help("vocabulary size; 0 = take it from the tokenizer", default=0)
    dropout: float = _help("dropout probability in [0, 1)", default=0.0)
    bias: bool = _help("biases in Linear and LayerNorm layers (GPT-2 has them)", default=False)
    gelu_approximate: str = _help(
        "GELU form: 'none' (exact erf) or 'tanh' (the GPT-2 original)", default="none"
    )
    arch: str = _help(
        "block design: gpt2 (learned positions, LayerNorm, GELU MLP) or llama (rotary positions, RMSNorm, "
        "SwiGLU MLP, no biases)", default="gpt2"
    )
    n_kv_head: int = _help("key/value heads (llama): fewer than --n-head is grouped-query attention; 0 = --n-head", default=0)
    mlp_hidden: int = _help(
        "MLP hidden width; 0 = 4 x n_embd (gpt2) or 8/3 x n_embd rounded up to a multiple of 64 (llama)", default=0
    )
    rope_theta: float = _help("rotary embedding base (llama)", default=10000.0)
    norm_eps: float = _help("epsilon of the LayerNorm (gpt2) or RMSNorm (llama) layers", default=1e-5)
    tie_embeddings: bool = _help("share one matrix between the token embedding and the output head", default=True)
    qk_norm: bool = _help(
        "RMSNorm on each head's queries and keys (llama; beyond LlamaForCausalLM: GGUF writes it as qwen3)", default=False
    )

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                flag = "--" + name.replace("_", "-")
                raise GptlabError(f"{flag} must be a positive integer, got {value!r}")
        if self.vocab_size < 0:
            raise GptlabError(f"--vocab-size must be 0 (from tokenizer) or positive, got {self.vocab_size}")
        if self.n_embd % self.n_head != 0:
            raise GptlabError(
                f"--n-embd {self.n_embd} is not divisible by --n-head {self.n_head}; "
                f"pick a width that is a multiple of the head count (e.g. {self.n_head * max(1, round(self.n_embd / self.n_head))})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise GptlabError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.gelu_approximate not in ("none", "tanh"):
            raise GptlabError(f"--gelu-approximate must be 'none' or 'tanh', got {self.gelu_approximate!r}")
        if self.arch not in ARCHS:
            raise GptlabError(f"--arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        for name in ("n_kv_head", "mlp_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise GptlabError(f"--{name.replace('_', '-')} must be 0 (the default) or a positive integer, got {value!r}")
        if not (isinstance(self.rope_theta, (int, float)) and math.isfinite(self.rope_theta) and self.rope_theta > 1):
            raise GptlabError(f"--rope-theta must be a number above 1 (10000 is usual), got {self.rope_theta!r}")
        if not (isinstance(self.norm_eps, (int, float)) and 0 < self.norm_eps < 1):
            raise GptlabError(f"--norm-eps must be a small positive number (1e-5 is usual), got {self.norm_eps!r}")
        if self.arch == "gpt2":
            if self.n_kv_head not in (0, self.n_head):
                raise GptlabError("--n-kv-head (grouped-query attention) needs --arch llama; drop it for gpt2")
            if self.qk_norm:
                raise GptlabError("--qk-norm needs --arch llama; drop it for gpt2")
            if not self.tie_embeddings:
                raise GptlabError("--no-tie-embeddings needs --arch llama (GPT-2 ties its output head); drop it for gpt2")
        else:
            if self.n_head % self.kv_heads:
                raise GptlabError(f"--n-kv-head {self.n_kv_head} does not divide --n-head {self.n_head}; "
                                  f"pick a divisor of {self.n_head} (e.g. {self.n_head // 2 or 1})")
            if self.head_size % 2:
                raise GptlabError(f"--arch llama needs an even head size for rotary positions; --n-embd {self.n_embd} / "
                                  f"--n-head {self.n_head} is {self.head_size}")
            if self.bias:
                raise GptlabError("--arch llama has no biases; drop --bias")

    @property
    def kv_heads(self) -> int:
        """Heads of keys and values: n_kv_head, or one per query head."""
        return self.n_kv_head or self.n_head

    @property
    def head_size(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head

    @property
    def hidden(self) -> int:
        """The MLP's hidden width."""
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.arch == "llama":  # SwiGLU's three matrices cost what GELU's two of 4x do (Llama's rule)
            return -(-8 * self.n_embd // 3 // 64) * 64
        return 4 * self.n_embd

    def describe(self) -> str:
        """The shape in words, for the training log, `gptlab info`, the page and model cards."""
        heads = f"{self.n_head} heads"
        if self.kv_heads != self.n_head:
            heads = f"{self.n_head} query heads sharing {self.kv_heads} key/value head{'s' if self.kv_heads > 1 else ''}"
        text = f"{self.arch} block, {self.n_layer} layers, {heads}, {self.n_embd} wide, MLP {self.hidden} wide, " \
               f"context {self.block_size}"
        if self.arch == "llama":
            text += f", rotary base {self.rope_theta:g}, {'tied' if self.tie_embeddings else 'untied'} output head"
            text += ", QK-norm" if self.qk_norm else ""
        return text

    def param_shapes(self, vocab_size: int | None = None) -> dict[str, tuple[int, ...]]:
        """Name and shape of every tensor the model of this config saves (a tied head once), without torch.

        The one statement of the model's shape outside model.py: the importers, the exporters and the
        parameter count read it, and a test holds it equal to the built model's state dict.
        """
        V, C, H = vocab_size or self.vocab_size, self.n_embd, self.hidden
        if self.arch == "llama":
            return self._llama_shapes(V)
        shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (self.block_size, C)}
        per_layer = {"ln_1": (C, C), "attn.c_attn": (3 * C, C), "attn.c_proj": (C, C), "ln_2": (C, C),
                     "mlp.c_fc": (H, C), "mlp.c_proj": (C, H)}
        for layer in range(self.n_layer):
            for module, (out, inp) in per_layer.items():
                prefix = f"transformer.h.{layer}.{module}"
                shapes[f"{prefix}.weight"] = (out,) if module.startswith("ln") else (out, inp)
                if self.bias:
                    shapes[f"{prefix}.bias"] = (out,)
        shapes["transformer.ln_f.weight"] = (C,)
        if self.bias:
            shapes["transformer.ln_f.bias"] = (C,)
        return shapes

    def _llama_shapes(self, V: int) -> dict[str, tuple[int, ...]]:
        """Hugging Face LlamaForCausalLM's names (Qwen3's q_norm/k_norm for --qk-norm)."""
        C, H, hs, kv = self.n_embd, self.hidden, self.head_size, self.kv_heads * self.head_size
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, C)}
        for layer in range(self.n_layer):
            p = f"model.layers.{layer}"
            shapes[f"{p}.input_layernorm.weight"] = (C,)
            shapes.update({f"{p}.self_attn.q_proj.weight": (C, C), f"{p}.self_attn.k_proj.weight": (kv, C),
                           f"{p}.self_attn.v_proj.weight": (kv, C), f"{p}.self_attn.o_proj.weight": (C, C)})
            if self.qk_norm:
                shapes[f"{p}.self_attn.q_norm.weight"] = shapes[f"{p}.self_attn.k_norm.weight"] = (hs,)
            shapes[f"{p}.post_attention_layernorm.weight"] = (C,)
            shapes.update({f"{p}.mlp.gate_proj.weight": (H, C), f"{p}.mlp.up_proj.weight": (H, C),
                           f"{p}.mlp.down_proj.weight": (C, H)})
        shapes["model.norm.weight"] = (C,)
        if not self.tie_embeddings:
            shapes["lm_head.weight"] = (V, C)
        return shapes

    def num_params(self, vocab_size: int | None = None) -> int:
        """Parameter count (a tied embedding counted once, position embeddings included)."""
        return sum(math.prod(shape) for shape in self.param_shapes(vocab_size).values())


@dataclass
class TrainConfig:
    """How to train: data, optimisation, evaluation, hardware."""

    data: str = _help("prepared data folder (made by `gptlab prepare`)", default="")
    out: str = _help("run folder for checkpoints, metrics and plots; default runs/<data name>", default="")
    tokenizer: str = _help("tokenizer when training straight from text: a kind `gptlab prepare --tokenizer` takes", default="char")
    init_from: str = _help(
        "start from these weights: a Hugging Face GPT-2 or Llama folder or a gptlab run folder "
        "(its model shape and tokenizer come with it; the data must use the same tokenizer)", default=""
    )
    val_fraction: float = _help("share of the text held out for validation (taken from the end)", default=0.1)
    batch_size: int = _help("sequences per micro-batch", default=12)
    grad_accum: int = _help("micro-batches accumulated per optimizer step", default=1)
    max_iters: int = _help("optimizer steps to train for", default=2000)
    epochs: float = _help("train for this many passes over the train split instead of --max-iters; 0 = off", default=0.0)
    target_loss: float = _help("stop as soon as an evaluation reaches this val loss; 0 = off", default=0.0)
    time: str = _help("train for a wall-clock budget instead (90s, 5m, 1h); the LR schedule spans the budget", default="")
    learning_rate: float = _help("peak learning rate", default=1e-3)
    min_lr_ratio: float = _help("final learning rate as a fraction of the peak (cosine decay)", default=0.1)
    warmup_iters: int = _help("linear warm-up steps", default=100)
    lr_decay_iters: int = _help("cosine decay length in steps; 0 = until the last step", default=0)
    optimizer: str = _help(
        "adamw, or muon: Muon for the blocks' weight matrices and AdamW for embeddings, norms and biases", default="adamw"
    )
    muon_lr: float = _help("Muon's peak learning rate (with --optimizer muon; follows the same schedule)", default=0.02)
    weight_decay: float = _help("weight decay (matrices only, not biases or norms)", default=0.1)
    beta1: float = _help("AdamW beta1", default=0.9)
    beta2: float = _help("AdamW beta2", default=0.99)
    grad_clip: float = _help("clip the gradient norm to this; 0 = off", default=1.0)
    eval_interval: int = _help("evaluate on train and val every this many steps", default=250)
    eval_iters: int = _help("batches averaged per evaluation", default=20)
    log_interval: int = _help("steps between progress log lines (when not on a terminal)", default=50)
    sampler: str = _help("batches: 'random' windows (nanoGPT) or 'sliding' epochs with a stride", default="random")
    stride: int = _help("sliding-window stride in tokens; 0 = the context length", default=0)
    device: str = _help("auto, cpu, cuda, cuda:N or mps", default="auto")
    dtype: str = _help("auto, float32, bfloat16 or float16 (autocast; float16 uses a grad scaler)", default="auto")
    compile: str = _help("torch.compile: auto (on for CUDA, and on a CPU for --time of 30m or more), on or off", default="auto")
    seed: int = _help("random seed for weights, batches and dropout", default=1337)
    deterministic: bool = _help("reproducible kernels (torch.use_deterministic_algorithms); slower on GPU", default=False)
    nan_patience: int = _help("non-finite steps in a row before rolling back to the last checkpoint", default=3)
    max_rollbacks: int = _help("rollbacks (each halving the learning rate) before giving up", default=3)
    num_samples: int = _help("samples written to samples.txt after training", default=2)
    sample_tokens: int = _help("tokens per sample in samples.txt", default=300)
    chat: str = _help("fine-tune for conversation on this JSON Lines file of {\"messages\": [...]} (needs --init-from); "
                      "the run learns the chat turn markers", default="")
    chat_loss: str = _help("with --chat: learn from the assistant's tokens only (assistant) or from every token (all)",
                           default="assistant")
    live_sample_tokens: int = _help("tokens of a fresh sample drawn at each evaluation into events.jsonl "
                                    "(what live views show); 0 = none", default=0)
    log: str = _help("also log the metrics to tensorboard or wandb (comma-separated for both); wandb runs "
                     "offline unless WANDB_MODE says otherwise", default="")

    def __post_init__(self) -> None:
        positive_ints = ("batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval", "sample_tokens",
                         "nan_patience")
        for name in positive_ints + ("max_iters",):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                flag = "--" + name.replace("_", "-")
                raise GptlabError(f"{flag} must be a positive integer, got {value!r}")
        for name in ("warmup_iters", "lr_decay_iters", "stride", "num_samples", "max_rollbacks", "live_sample_tokens"):
            if getattr(self, name) < 0:
                raise GptlabError(f"--{name.replace('_', '-')} must be zero or positive, got {getattr(self, name)}")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise GptlabError(f"--learning-rate must be a positive number, got {self.learning_rate}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise GptlabError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.epochs < 0:
            raise GptlabError(f"--epochs must be zero (off) or positive, got {self.epochs}")
        if self.time:
            parse_duration(self.time)
            if self.epochs:
                raise GptlabError("give either --time or --epochs, not both")
        if self.target_loss < 0:
            raise GptlabError(f"--target-loss must be zero (off) or positive, got {self.target_loss}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise GptlabError("--weight-decay and --grad-clip must be zero or positive")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise GptlabError("--beta1 and --beta2 must be in [0, 1)")
        if not 0.0 < self.val_fraction < 1.0:
            raise GptlabError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}")
        if self.chat_loss not in ("assistant", "all"):
            raise GptlabError(f"--chat-loss must be assistant or all, got {self.chat_loss!r}")
        if self.sampler not in ("random", "sliding"):
            raise GptlabError(f"--sampler must be 'random' or 'sliding', got {self.sampler!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise GptlabError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.optimizer not in ("adamw", "muon"):
            raise GptlabError(f"--optimizer must be adamw or muon, got {self.optimizer!r}")
        if not (self.muon_lr > 0 and math.isfinite(self.muon_lr)):
            raise GptlabError(f"--muon-lr must be a positive number, got {self.muon_lr}")
        if self.compile not in ("auto", "on", "off"):
            raise GptlabError(f"--compile must be auto, on or off, got {self.compile!r}")


def parse_duration(text: str) -> float:
    """Seconds in '90s', '5m', '1h', '1h30m' or a bare number of seconds."""
    import re

    value = text.strip().lower()
    parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?", value)
    if not value or not parts or not any(parts.groups()):
        raise GptlabError(f"--time {text!r} is not a duration; write it like 90s, 5m, 1h or 1h30m")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in parts.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise GptlabError(f"--time {text!r} must be longer than zero")
    return total


# Presets are data. `model` and `train` hold only what differs from the dataclass defaults.
PRESETS: list[dict[str, Any]] = [
    {
        "name": "cpu-tiny",
        "about": "nanoGPT's CPU recipe shape: 4 layers, 4 heads, 128 wide, context 64, batch 12",
        "model": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, bias=False),
        "train": dict(
            tokenizer="char", batch_size=12, max_iters=2000, learning_rate=1e-3, warmup_iters=100,
            beta2=0.99, eval_interval=250, eval_iters=20,
        ),
    },
    {
        "name": "cpu-quick",
        "about": "the most tiny-Shakespeare learning in 43 CPU seconds of what we tried: the llama block, 3 layers, "
                 "128 wide, SwiGLU 256, context 64, Muon",
        "model": dict(arch="llama", n_layer=3, n_head=4, n_embd=128, mlp_hidden=256, block_size=64, dropout=0.0,
                      bias=False),
        "train": dict(
            tokenizer="char", batch_size=16, max_iters=2000, optimizer="muon", muon_lr=0.01, learning_rate=3e-3,
            warmup_iters=50, min_lr_ratio=0.0, beta2=0.99, eval_interval=250, eval_iters=20,
        ),
    },
    {
        "name": "cpu-small",
        "about": "the most tiny-Shakespeare learning in 5 CPU minutes of what we tried: 4 layers, 128 wide, context 128, Muon",
        "model": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, dropout=0.0, bias=False),
        "train": dict(
            tokenizer="char", batch_size=12, max_iters=5000, optimizer="muon", muon_lr=0.01, learning_rate=3e-3,
            warmup_iters=50, min_lr_ratio=0.0, beta2=0.99, eval_interval=500, eval_iters=20,
        ),
    },
    {
        "name": "char-small",
        "about": "nanoGPT's Shakespeare-char GPU recipe: 6 layers, 6 heads, 384 wide, context 256",
        "model": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, bias=False),
        "train": dict(
            tokenizer="char", batch_size=64, max_iters=5000, learning_rate=1e-3, warmup_iters=100,
            beta2=0.99, eval_interval=250, eval_iters=200,
        ),
    },
    {
        "name": "gpt2-124m",
        "about": "GPT-2 small: 12 layers, 12 heads, 768 wide, context 1024, GPT-2 BPE vocabulary",
        "model": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, dropout=0.0, bias=True),
        "train": dict(
            tokenizer="gpt2", batch_size=12, grad_accum=40, max_iters=600000, learning_rate=6e-4,
            warmup_iters=2000, beta2=0.95, eval_interval=2000, eval_iters=200,
        ),
    },
]


def preset_names() -> list[str]:
    """Names of the built-in presets."""
    return [p["name"] for p in PRESETS]


def get_preset(name: str) -> dict[str, Any]:
    """The preset called `name`, or a GptlabError listing the known ones."""
    for preset in PRESETS:
        if preset["name"] == name:
            return preset
    raise GptlabError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")


def _check_type(key: str, expected: str, value: Any, source: str) -> Any:
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
    }[expected]
    if not ok:
        raise GptlabError(f"{source}: {key} must be {'a number' if expected == 'float' else f'a {expected}'}, got {value!r}")
    return float(value) if expected == "float" else value


def _split_flat(values: dict[str, Any], source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    model_types = {f.name: str(f.type) for f in fields(ModelConfig)}
    train_types = {f.name: str(f.type) for f in fields(TrainConfig)}
    model, train = {}, {}
    for key, value in values.items():
        if key in model_types:
            model[key] = _check_type(key, model_types[key], value, source)
        elif key in train_types:
            train[key] = _check_type(key, train_types[key], value, source)
        else:
            raise GptlabError(f"{source}: unknown setting {key!r}; see `gptlab train --help` for the list")
    return model, train


def read_config_file(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model and train settings from a JSON file: a run's config.json or a flat {field: value} map."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    raw = read_json_object(path, f"config file {path} not found; pass a run's config.json or a JSON file of settings",
                           "fix or regenerate it")
    return split_settings(raw, path)


def split_settings(raw: dict[str, Any], path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model and train settings of a JSON object read from `path`: {"model": ..., "train": ...} or flat."""
    if "model" in raw or "train" in raw:
        sections = {name: raw.get(name, {}) for name in ("model", "train")}
        for name, section in sections.items():
            if not isinstance(section, dict):
                raise GptlabError(f"config file {path}: \"{name}\" must be a JSON object of settings")
        return _split_flat({**sections["model"], **sections["train"]}, str(path))
    return _split_flat(raw, str(path))


def resolve_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[ModelConfig, TrainConfig]:
    """Merge preset < config file < overrides into validated ModelConfig and TrainConfig."""
    model: dict[str, Any] = {}
    train: dict[str, Any] = {}
    if preset:
        p = get_preset(preset)
        model.update(p["model"])
        train.update(p["train"])
    if config_file:
        m, t = read_config_file(config_file)
        model.update(m)
        train.update(t)
    if overrides:
        m, t = _split_flat(overrides, "settings")
        model.update(m)
        train.update(t)
    return ModelConfig(**model), TrainConfig(**train)


# Each sampling field's name on each front end: a flag of `gptlab sample`, a label on the page, a
# parameter of the API (None: that front end does not take it).
SAMPLE_FIELD_NAMES: dict[str, dict[str, str | None]] = {
    "max_new_tokens": {"cli": "--max-new-tokens", "page": "Max new tokens", "api": "max_tokens"},
    "num_samples": {"cli": "--num-samples", "page": "Samples", "api": "n"},
    "temperature": {"cli": "--temperature", "page": "Temperature", "api": "temperature"},
    "top_k": {"cli": "--top-k", "page": "Top-k", "api": "top_k"},
    "top_p": {"cli": "--top-p", "page": "Top-p", "api": "top_p"},
    "min_p": {"cli": "--min-p", "page": "Min-p", "api": "min_p"},
    "repetition_penalty": {"cli": "--repetition-penalty", "page": "Repetition penalty", "api": "repetition_penalty"},
    "stop": {"cli": "--stop", "page": "Stop strings", "api": "stop"},
    "seed": {"cli": "--seed", "page": "Seed", "api": "seed"},
    "max_new_tokens_limit": {"cli": "--max-new-tokens-limit", "page": None, "api": None},
}

# How the page shows a setting that is not a server ceiling or a list of texts: a slider over
# (lowest, highest, step), or a number box whose `unset` value stands for None.
SAMPLE_PAGE_CONTROLS: dict[str, dict[str, Any]] = {
    "temperature": {"range": (0, 2, 0.05)},
    "top_k": {"unset": 0},
    "top_p": {"range": (0.01, 1, 0.01)},
    "min_p": {"range": (0, 1, 0.01)},
    "repetition_penalty": {"range": (0.5, 2, 0.05)},
    "seed": {"unset": -1},
}


class SettingError(GptlabError):
    """A sampling setting the checks refuse: which field, and what is wrong with its value."""

    def __init__(self, field: str, problem: str) -> None:
        self.field, self.problem = field, problem
        super().__init__(self.message_for("cli"))

    def name_for(self, front: str) -> str:
        """The field's name on `front` ("cli", "page" or "api"); its flag where that front end has none."""
        names = SAMPLE_FIELD_NAMES[self.field]
        return names[front] or names["cli"]  # type: ignore[return-value]

    def message_for(self, front: str) -> str:
        """The message, naming the field as `front` ("cli", "page" or "api") names it."""
        return f"{self.name_for(front)} {self.problem}"


@dataclass
class SampleConfig:
    """How to sample: lengths, randomness, the sampling filters and where to stop."""

    max_new_tokens: int = _help("tokens to generate per sample", default=300)
    num_samples: int = _help("samples per prompt (they share one pass over the prompt)", default=1)
    temperature: float = _help("softmax temperature; 0 = greedy (always the most likely token)", default=0.8)
    top_k: int | None = _help("keep only the k most likely tokens; unset (None) = off", default=None)
    top_p: float = _help("nucleus: keep the fewest tokens whose probabilities sum to p; 1 = off", default=1.0)
    min_p: float = _help("drop tokens less likely than min_p times the most likely one; 0 = off", default=0.0)
    repetition_penalty: float = _help(
        "tokens already in the text: positive logits divided, negative multiplied by this (CTRL); 1 = off", default=1.0
    )
    stop: tuple[str, ...] = _help("stop at the first of these strings (left out of the text)", default=())
    seed: int | None = _help("random seed: the same seed gives the same text; unset (None) = a fresh one", default=None)
    max_new_tokens_limit: int = _help("ceiling on max_new_tokens, against typos like 3000000", default=100_000)

    def __post_init__(self) -> None:
        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not is_int(self.max_new_tokens_limit) or self.max_new_tokens_limit < 1:
            raise SettingError("max_new_tokens_limit", f"must be an integer >= 1, got {self.max_new_tokens_limit!r}")
        if not is_int(self.max_new_tokens) or not 1 <= self.max_new_tokens <= self.max_new_tokens_limit:
            raise SettingError(
                "max_new_tokens", f"must be an integer from 1 to {self.max_new_tokens_limit:,} "
                f"(raise the ceiling with --max-new-tokens-limit), got {self.max_new_tokens!r}"
            )
        if not is_int(self.num_samples) or self.num_samples < 1:
            raise SettingError("num_samples", f"must be an integer >= 1, got {self.num_samples!r}")
        if not is_number(self.temperature) or self.temperature < 0:
            raise SettingError("temperature", f"must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            raise SettingError("top_k", f"must be an integer >= 1 (leave it out for no top-k), got {self.top_k!r}")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise SettingError("top_p", f"must be in (0, 1] (1 = off), got {self.top_p!r}")
        if not is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise SettingError("min_p", f"must be in [0, 1] (0 = off), got {self.min_p!r}")
        if not is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise SettingError("repetition_penalty", f"must be a number > 0 (1 = off), got {self.repetition_penalty!r}")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise SettingError("seed", f"must be an integer from 0 to 2**63 - 1, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SettingError("stop", "strings must be non-empty text")
        if any(invalid_unicode_at(s) is not None for s in self.stop):
            raise SettingError("stop", "strings must be valid Unicode (one holds a lone surrogate); give UTF-8 text")


def invalid_unicode_at(text: str) -> int | None:
    """Where `text` holds a lone surrogate (text no UTF-8 file or response can carry), or None.

    Python lets one into a str from a JSON escape (\\ud800) or an undecodable command-line byte;
    every text a user gives is checked with this, so each front end refuses it the same way.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


# How samples.txt, the model card and an export's generation_config.json sample (nanoGPT's sample.py).
SAMPLES_SETTINGS = SampleConfig(temperature=0.8, top_k=200)
