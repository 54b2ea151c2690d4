"""Our GPT and Hugging Face's `GPT2LMHeadModel`: the same computation under two layouts, mapped both ways.

- Our parameter names are GPT-2's, so the weights are a copy: the four Conv1D matrices transposed
  (HF stores them (in, out)), zero biases where the model was trained without, the tied output head
  written once, and a vocabulary padded past the tokenizer's cut back to it.
- The MLP calls `F.gelu`, exact or in its tanh form, so the config names the HF activation that
  calls the same function ("gelu" or "gelu_pytorch_tanh"); GPT-2's own "gelu_new" is a hand-written
  tanh formula that differs in the last bits.
- Every shape comes from `ModelConfig.param_shapes`, the one statement of the model's layout.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptlab.config import SAMPLES_SETTINGS, ModelConfig
from gptlab.errors import GptlabError

if TYPE_CHECKING:
    import torch

    from gptlab.model import GPT

# Weights HF's GPT-2 keeps in Conv1D layers, stored (in, out) where nn.Linear holds (out, in).
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# HF activation names that call exactly what our MLP calls: F.gelu(x, approximate=...).
HF_ACTIVATION = {"none": "gelu", "tanh": "gelu_pytorch_tanh"}

# HF activation names and the F.gelu form each one computes (the tanh ones agree to ~1e-7).
GELU_FORMS = {"gelu": "none", "gelu_python": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh",
              "gelu_fast": "tanh", "gelu_python_tanh": "tanh"}

LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, and ModelConfig.norm_eps's

DEFAULT_MAX_LENGTH = 256

def hf_config(model_cfg: ModelConfig, vocab_size: int, eot_id: int | None) -> dict[str, Any]:
    """config.json for a `GPT2LMHeadModel` that computes what our GPT computes."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab_size,
        "n_positions": model_cfg.block_size,
        # The Hub's gpt2 carries n_ctx too, and llama.cpp's convert_hf_to_gguf.py reads it.
        "n_ctx": model_cfg.block_size,
        "n_embd": model_cfg.n_embd,
        "n_layer": model_cfg.n_layer,
        "n_head": model_cfg.n_head,
        "n_inner": model_cfg.hidden,
        "activation_function": HF_ACTIVATION[model_cfg.gelu_approximate],
        # Dropout is a training choice; an exported model is for inference (set them to fine-tune).
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": model_cfg.norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
    }

def hf_generation_config(model_cfg: ModelConfig, eot_id: int | None) -> dict[str, Any]:
    """generation_config.json: sample as `samples.txt` does, never past the context length."""
    return {
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "do_sample": True,
        "temperature": SAMPLES_SETTINGS.temperature,
        "top_k": SAMPLES_SETTINGS.top_k,
        # max_length counts the prompt too, so generation stops before running out of positions.
        "max_length": min(model_cfg.block_size, DEFAULT_MAX_LENGTH),
    }

def hf_state_dict(model: GPT, vocab_size: int) -> dict[str, torch.Tensor]:
    """Our weights under HF GPT-2's layout: Conv1D transposed, biases filled, head tied, vocab cut."""
    import torch

    from gptlab.checkpoint import state_dict_for_saving

    cfg = model.config
    ours = state_dict_for_saving(model)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in ours.items():
        if name == "transformer.wte.weight":
            tensor = tensor[:vocab_size]
        elif name.endswith(CONV1D):
            tensor = tensor.t()
        out[name] = tensor.float().contiguous()
    for name, shape in replace(cfg, bias=True).param_shapes(vocab_size).items():  # zero biases where it had none
        out.setdefault(name, torch.zeros(shape))
    return out


def model_config_from_hf(config: dict[str, Any], folder: Path, dropout: float = 0.0) -> ModelConfig:
    """Our ModelConfig for a GPT-2 config.json, or a one-line error for what we cannot run."""
    where = folder / "config.json"
    model_type = config.get("model_type")
    if model_type != "gpt2":
        raise GptlabError(f"{where} describes a {model_type or 'non-GPT-2'!s} model, not GPT-2; "
                          "--init-from takes GPT-2 models (model_type gpt2) or gptlab runs")
    act = config.get("activation_function", "gelu_new")
    if act not in GELU_FORMS:
        raise GptlabError(f"{where}: activation_function {act!r} is not a GELU this model has; use a GPT-2 with gelu or gelu_new")
    n_embd = config.get("n_embd", 768)
    n_inner = config.get("n_inner") or 4 * n_embd  # None means 4 x n_embd
    eps = config.get("layer_norm_epsilon", LAYER_NORM_EPS)
    if not isinstance(n_inner, int) or isinstance(n_inner, bool) or n_inner < 1:
        raise GptlabError(f"{where}: n_inner is {n_inner!r}, not a positive whole number; the file is damaged, download it again")
    if not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise GptlabError(f"{where}: layer_norm_epsilon is {eps!r}, not a small positive number; the file is damaged, download it again")
    checks = [
        (config.get("scale_attn_weights", True), "scale_attn_weights is off"),
        (not config.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx is on"),
        (not config.get("add_cross_attention", False), "it has cross-attention"),
    ]
    for ok, problem in checks:
        if not ok:
            raise GptlabError(f"{where}: {problem}, which gptlab's GPT does not do; this GPT-2 variant cannot be imported")
    return ModelConfig(
        n_layer=config.get("n_layer", 12), n_head=config.get("n_head", 12), n_embd=n_embd,
        block_size=config.get("n_positions", 1024), vocab_size=config.get("vocab_size", 50257),
        dropout=dropout, bias=True, gelu_approximate=GELU_FORMS[act],
        mlp_hidden=n_inner if n_inner != 4 * n_embd else 0, norm_eps=float(eps),
    )

def state_dict_from_hf(tensors: dict[str, torch.Tensor], model_cfg: ModelConfig, config: dict[str, Any],
                       folder: Path) -> dict[str, torch.Tensor]:
    """HF GPT-2 tensors renamed and transposed into our GPT's state dict (float32, head tied)."""
    import torch

    from gptlab.checkpoint import with_tied_head

    ours: dict[str, torch.Tensor] = {}
    head = None
    for name, tensor in tensors.items():
        name = name.removeprefix("transformer.")
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of older checkpoints
            continue
        if name == "lm_head.weight":
            head = tensor
            continue
        tensor = tensor.float()
        if name.endswith(CONV1D):
            tensor = tensor.t()
        ours[f"transformer.{name}"] = tensor.contiguous()
    wte = ours.get("transformer.wte.weight")
    if head is not None and wte is not None and not config.get("tie_word_embeddings", True) \
            and not torch.equal(head.float(), wte):
        raise GptlabError(f"{folder}: the output head is not tied to the token embedding (tie_word_embeddings false); "
                          "gptlab's GPT ties them, so this model cannot be imported")
    _check_shapes(ours, model_cfg, folder / "model.safetensors", "its config.json")
    return with_tied_head(ours, model_cfg)

def _check_shapes(tensors: dict[str, torch.Tensor], model_cfg: ModelConfig, path: Path, against: str) -> None:
    expected = model_cfg.param_shapes()
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got == expected:
        return
    missing = sorted(set(expected) - set(got))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    detail = (f"missing {missing[0]}" if missing else
              f"{wrong[0]} is {got[wrong[0]]}, {against} says {expected[wrong[0]]}" if wrong else
              f"unexpected {sorted(set(got) - set(expected))[0]}")
    raise GptlabError(f"weights in {path} do not fit {against} ({detail}); the files come from different models")

