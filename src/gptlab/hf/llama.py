"""Our Llama and Hugging Face's `LlamaForCausalLM`: one computation, one set of names, mapped both ways.

- Our Llama's parameter names are HF's and its rotary embedding is HF's (rotate-half, HF's inv_freq),
  so the weights are a copy: float32, the vocabulary padded past the tokenizer's cut back to it, and
  the output head written only when it is untied (as `save_pretrained` does).
- The config names exactly what our block computes: silu SwiGLU, RMSNorm, plain rotary positions
  (no rope_scaling), no biases, grouped-query attention, head_dim = hidden_size / heads. A folder
  that asks for anything else is refused in one line naming the field, not imported approximately.
- `pretraining_tp` is accepted whatever its value: older transformers only split the same matmuls
  into slices and sum them, and transformers 5 ignores it, so the maths is the same.
- Both rotary spellings are read: transformers 5's `rope_parameters` and the older `rope_theta` +
  `rope_scaling`; exports write both, so either generation of transformers (and llama.cpp's
  converter) reads the same base.
- QK-norm (Qwen3's q_norm/k_norm) has no place in a llama config, so such a run is refused here (gguf
  writes it as qwen3; a Space runs gptlab itself).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.hf.gpt2 import _check_shapes

if TYPE_CHECKING:
    import torch

    from gptlab.model import LanguageModel

EMBEDDING, HEAD = "model.embed_tokens.weight", "lm_head.weight"

# rope_type values that are HF's plain rotary embedding, which ours is.
PLAIN_ROPE = (None, "default")

def check_exportable(model_cfg: ModelConfig, run: Path | str) -> None:
    """A one-line error for a llama run that LlamaForCausalLM cannot express."""
    if model_cfg.qk_norm:
        raise GptlabError(f"{run} has --qk-norm, which LlamaForCausalLM cannot express (it is not Llama-standard); "
                          "export it with --format gguf or space, or train without --qk-norm")

def hf_config(model_cfg: ModelConfig, vocab_size: int, eot_id: int | None) -> dict[str, Any]:
    """config.json for a `LlamaForCausalLM` that computes what our Llama computes."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": model_cfg.n_embd,
        "intermediate_size": model_cfg.hidden,
        "num_hidden_layers": model_cfg.n_layer,
        "num_attention_heads": model_cfg.n_head,
        "num_key_value_heads": model_cfg.kv_heads,
        "head_dim": model_cfg.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": model_cfg.block_size,
        "rms_norm_eps": model_cfg.norm_eps,
        "rope_theta": model_cfg.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": model_cfg.rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,  # dropout is a training choice; an export is for inference
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "tie_word_embeddings": model_cfg.tie_embeddings,
        "use_cache": True,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "dtype": "float32",
    }

def hf_state_dict(model: LanguageModel, vocab_size: int) -> dict[str, torch.Tensor]:
    """Our weights as LlamaForCausalLM's: float32, vocabulary cut to the tokenizer's, a tied head left out."""
    from gptlab.checkpoint import state_dict_for_saving

    out = {}
    for name, tensor in state_dict_for_saving(model).items():
        if name in (EMBEDDING, HEAD):
            tensor = tensor[:vocab_size]
        out[name] = tensor.float().contiguous()
    return out


def _rope(config: dict[str, Any]) -> tuple[Any, Any]:
    """(rope_type, rope_theta) from either generation of config.json."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        return repr(rope), None
    kind = rope.get("rope_type", rope.get("type"))
    return kind, rope.get("rope_theta", config.get("rope_theta", 10000.0))

def model_config_from_hf(config: dict[str, Any], folder: Path, dropout: float = 0.0) -> ModelConfig:
    """Our ModelConfig for a LlamaForCausalLM config.json, or a one-line error for what our block cannot compute."""
    where = folder / "config.json"
    hidden, heads = config.get("hidden_size", 4096), config.get("num_attention_heads", 32)
    kv_heads = config.get("num_key_value_heads") or heads
    rope_type, theta = _rope(config)
    numbers = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size",
               "max_position_embeddings")
    for key in numbers:
        value = config.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise GptlabError(f"{where}: {key} is {value!r}, not a positive whole number; the file is damaged, download it again")
    checks = [
        (config.get("hidden_act", "silu") == "silu", f"hidden_act is {config.get('hidden_act')!r}, not silu"),
        (rope_type in PLAIN_ROPE, f"rope_scaling is {rope_type!r} (scaled rotary positions)"),
        (not config.get("attention_bias", False), "attention_bias is on"),
        (not config.get("mlp_bias", False), "mlp_bias is on"),
        (hidden % heads == 0, f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}"),
        (config.get("head_dim") in (None, hidden // heads),
         f"head_dim {config.get('head_dim')} is not hidden_size / num_attention_heads ({hidden // heads})"),
        (isinstance(kv_heads, int) and heads % kv_heads == 0,
         f"num_key_value_heads {kv_heads} does not divide num_attention_heads {heads}"),
        ((hidden // heads) % 2 == 0, f"the head size {hidden // heads} is odd, and rotary positions need it even"),
        (isinstance(theta, (int, float)) and theta > 1, f"rope_theta is {theta!r}"),
    ]
    for ok, problem in checks:
        if not ok:
            raise GptlabError(f"{where}: {problem}, which gptlab's Llama block does not compute; "
                              "this Llama variant cannot be imported")
    return ModelConfig(
        arch="llama", n_layer=config.get("num_hidden_layers", 32), n_head=heads, n_embd=hidden,
        n_kv_head=kv_heads if kv_heads != heads else 0, mlp_hidden=config.get("intermediate_size", 11008),
        block_size=config.get("max_position_embeddings", 2048), vocab_size=config.get("vocab_size", 32000),
        rope_theta=float(theta), norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        # LlamaConfig's default is an untied head, so a config.json without the key means untied.
        tie_embeddings=bool(config.get("tie_word_embeddings", False)), dropout=dropout, bias=False,
    )

def state_dict_from_hf(tensors: dict[str, torch.Tensor], model_cfg: ModelConfig, config: dict[str, Any],
                       folder: Path) -> dict[str, torch.Tensor]:
    """HF Llama tensors as our Llama's state dict: float32, buffers dropped, the head present (tied or not)."""
    from gptlab.checkpoint import with_tied_head

    ours = {}
    for name, tensor in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):  # a buffer older checkpoints saved; we compute it
            continue
        if not name.startswith(("model.", "lm_head.")):  # LlamaModel alone, saved without the causal-LM wrapper
            name = f"model.{name}"
        ours[name] = tensor.float().contiguous()
    if model_cfg.tie_embeddings:
        ours.pop(HEAD, None)  # a tied head some checkpoints write anyway: the embedding is the one kept
    elif HEAD not in ours:
        raise GptlabError(f"{folder}: config.json says the output head is untied (tie_word_embeddings false) but the "
                          f"weights have no {HEAD}; download the weights again, or set tie_word_embeddings true if the "
                          "model ties them")
    _check_shapes(ours, model_cfg, folder, "its config.json")  # the folder: its weights may be several shards
    return with_tied_head(ours, model_cfg)
