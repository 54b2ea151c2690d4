"""Where `--init-from` starts training: the shape, weights and tokenizer of a Hugging Face folder or a gptlab run.

The caller (the command line) resolves `--init-from` with `load_init` and hands the result to
`train.train`, so training never reads foreign folders itself.

- A Hugging Face folder is read by the mapping its config.json's `model_type` names (`MAPPINGS`:
  gpt2.py, llama.py); any other type is refused in one line listing those taken.
- The weights returned load with `model.load_state_dict` strictly: a tied head is named too.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from gptlab import checkpoint as ckpt
from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.fsutil import read_json_object
from gptlab.hf import gpt2, llama
from gptlab.hf.gpt2 import _check_shapes
from gptlab.hf.tokenizers import check_same_tokenizer, hf_tokenizer
from gptlab.rundir import CONFIG, read_run_config, weights_path
from gptlab.tokenizer import Tokenizer, load_tokenizer

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")

HINT = "give a Hugging Face GPT-2 or Llama folder (config.json + model.safetensors) or a gptlab run folder"

# config.json's model_type -> the module that maps it (model_config_from_hf, state_dict_from_hf).
MAPPINGS = {"gpt2": gpt2, "llama": llama}

def load_init(source: str | Path, model_cfg: ModelConfig, data_tokenizer: Tokenizer | None = None,
              data_dir: str | Path = "", block_size: int = 0) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """The model config, weights (our names, float32) and tokenizer to start training from.

    `block_size` (a --block-size the user gave; 0 = none) trains at a shorter context than the model's.
    """
    folder = Path(source)
    if not folder.is_dir():
        raise GptlabError(f"--init-from {folder}: folder not found; {HINT}")
    config = read_json_object(folder / CONFIG, f"--init-from {folder}: no config.json there; {HINT}", "download or export it again")
    run_data = None
    if "model" in config and "train" in config:
        cfg, weights, tokenizer = read_run(folder, model_cfg.dropout)
        run_data = (config.get("train") or {}).get("data") or None
    else:
        cfg, weights, tokenizer = read_hf_folder(folder, config, model_cfg.dropout)
    if data_tokenizer is not None:
        check_same_tokenizer(tokenizer, data_tokenizer, folder, data_dir, run_data)
    if block_size:
        cfg, weights = shorter_context(cfg, weights, block_size, folder)
    return cfg, weights, tokenizer

def shorter_context(model_cfg: ModelConfig, weights: dict[str, torch.Tensor], block_size: int,
                    source: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The same model at a context of `block_size` tokens, at most its own.

    A model computes position t from positions 0..t alone, so cutting the context changes no logit: a
    rotary model (SmolLM2's 8,192 positions) keeps every weight, and GPT-2 keeps its first position rows.
    """
    if block_size > model_cfg.block_size:
        raise GptlabError(f"--block-size {block_size} is longer than the {model_cfg.block_size:,} positions {source} "
                          f"was trained for; give at most {model_cfg.block_size}, or drop --block-size")
    if model_cfg.arch == "gpt2":
        weights = {**weights, "transformer.wpe.weight": weights["transformer.wpe.weight"][:block_size]}
    return replace(model_cfg, block_size=block_size), weights

def read_run(run_dir: Path, dropout: float = 0.0) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Config, best (else last) weights and tokenizer of a gptlab run folder."""
    model_cfg, _, _ = read_run_config(run_dir)
    model_cfg = replace(model_cfg, dropout=dropout)
    path = weights_path(run_dir, "best")
    tensors, _ = ckpt.read_weights(path)
    tensors = {k: v.float() for k, v in tensors.items()}
    _check_shapes(tensors, model_cfg, path, "its config.json")
    return model_cfg, ckpt.with_tied_head(tensors, model_cfg), load_tokenizer(run_dir)

def read_hf_folder(folder: Path, config: dict[str, Any] | None = None,
                   dropout: float = 0.0) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Config, weights and tokenizer of a Hugging Face GPT-2 or Llama folder, in gptlab's terms."""
    if config is None:
        config = read_json_object(folder / CONFIG, f"--init-from {folder}: no config.json there; {HINT}", "download or export it again")
    model_type = config.get("model_type")
    mapping = MAPPINGS.get(model_type) if isinstance(model_type, str) else None
    if mapping is None:
        what = f"describes a {model_type} model" if isinstance(model_type, str) and model_type else "names no model_type"
        raise GptlabError(f"{folder / CONFIG} {what}; --init-from takes Hugging Face models of type "
                          f"{' or '.join(MAPPINGS)}, or gptlab runs")
    model_cfg = mapping.model_config_from_hf(config, folder, dropout)
    tokenizer = hf_tokenizer(folder)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise GptlabError(
            f"{folder}: the tokenizer has {tokenizer.vocab_size:,} tokens but config.json's vocab_size is "
            f"{model_cfg.vocab_size:,}; the tokenizer files belong to another model"
        )
    weights = mapping.state_dict_from_hf(read_hf_weights(folder), model_cfg, config, folder)
    return model_cfg, weights, tokenizer

def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's weights file(s), as stored."""
    if (folder / "model.safetensors").is_file():
        return ckpt.read_weights(folder / "model.safetensors")[0]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, f"{index} not found", "download the model again").get("weight_map", {})
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(ckpt.read_weights(folder / shard)[0])
        return tensors
    path = folder / "pytorch_model.bin"
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses any pickle that is more than tensors and plain types
            raise GptlabError(
                f"{path} is not plain tensors ({type(e).__name__}); it may hold code, so it was not loaded; "
                "use a model.safetensors instead"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise GptlabError(f"{path} is not a state dict of tensors; use a model.safetensors instead")
        return state
    raise GptlabError(f"{folder} has config.json but no weights ({', '.join(WEIGHT_FILES)}); download them too")
