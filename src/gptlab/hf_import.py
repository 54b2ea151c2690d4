"""Starting weights for training (`--init-from`): a Hugging Face GPT-2 folder or another gptlab run.

Design choices:
- The folder is read without transformers: config.json, then model.safetensors (or the shards of
  model.safetensors.index.json), or pytorch_model.bin loaded with `weights_only=True`, so a pickle
  may hold tensors but can never run code.
- The model's shape (layers, heads, width, context, vocabulary, GELU form, biases) comes from the
  folder and replaces the preset's; dropout stays the caller's, being a training choice.
- HF GPT-2 always has biases, so an imported model has them (`bias=True`); the four Conv1D matrices
  are transposed back into nn.Linear's (out, in), and an untied output head is refused (ours is tied).
- The tokenizer comes with the weights: GPT-2's vocabulary files become our `gpt2` tokenizer, any
  other byte-level BPE (tokenizer.json, or vocab.json + merges.txt) our `bpe`, and the character
  tokenizer `gptlab export` writes our `char`. It must equal the data folder's tokenizer, because
  the token ids in the data mean nothing to a model that learned other ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from gptlab import checkpoint as ckpt
from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.export import CONV1D, LAYER_NORM_EPS, byte_level_bpe, gpt2_vocab_files
from gptlab.tokenizer import BPETokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer, load_tokenizer

# HF activation names and the F.gelu form each one computes (the tanh ones agree to ~1e-7).
GELU_FORMS = {"gelu": "none", "gelu_python": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh",
              "gelu_fast": "tanh", "gelu_python_tanh": "tanh"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
HINT = "give a Hugging Face GPT-2 folder (config.json + model.safetensors) or a gptlab run folder"


def load_init(source: str | Path, model_cfg: ModelConfig, data_tokenizer: Tokenizer | None = None,
              data_dir: str | Path = "") -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """The model config, weights (our names, float32) and tokenizer to start training from."""
    folder = Path(source)
    if not folder.is_dir():
        raise GptlabError(f"--init-from {folder}: folder not found; {HINT}")
    config = _read_json(folder / ckpt.CONFIG, f"--init-from {folder}: no config.json there; {HINT}")
    run_data = None
    if "model" in config and "train" in config:
        cfg, weights, tokenizer = read_run(folder, model_cfg.dropout)
        run_data = (config.get("train") or {}).get("data") or None
    else:
        cfg, weights, tokenizer = read_hf_folder(folder, config, model_cfg.dropout)
    if data_tokenizer is not None:
        check_same_tokenizer(tokenizer, data_tokenizer, folder, data_dir, run_data)
    return cfg, weights, tokenizer


def read_run(run_dir: Path, dropout: float = 0.0) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Config, best (else last) weights and tokenizer of a gptlab run folder."""
    from dataclasses import replace

    from gptlab.generation import weights_path

    model_cfg, _, _ = ckpt.read_run_config(run_dir)
    model_cfg = replace(model_cfg, dropout=dropout)
    path = weights_path(run_dir, "best")
    tensors, _ = ckpt.read_weights(path)
    tensors = {k: v.float() for k, v in tensors.items()}
    _check_shapes(tensors, model_cfg, path, "its config.json")
    return model_cfg, _tie(tensors), load_tokenizer(run_dir)


def read_hf_folder(folder: Path, config: dict[str, Any] | None = None,
                   dropout: float = 0.0) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """Config, weights and tokenizer of a Hugging Face GPT-2 folder, in gptlab's terms."""
    if config is None:
        config = _read_json(folder / ckpt.CONFIG, f"--init-from {folder}: no config.json there; {HINT}")
    model_cfg = model_config_from_hf(config, folder, dropout)
    tokenizer = hf_tokenizer(folder)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise GptlabError(
            f"{folder}: the tokenizer has {tokenizer.vocab_size:,} tokens but config.json's vocab_size is "
            f"{model_cfg.vocab_size:,}; the tokenizer files belong to another model"
        )
    weights = state_dict_from_hf(read_hf_weights(folder), model_cfg, config, folder)
    return model_cfg, weights, tokenizer


def model_config_from_hf(config: dict[str, Any], folder: Path, dropout: float = 0.0) -> ModelConfig:
    """Our ModelConfig for a GPT-2 config.json, or a one-line error for what we cannot run."""
    where = folder / ckpt.CONFIG
    model_type = config.get("model_type")
    if model_type != "gpt2":
        raise GptlabError(f"{where} describes a {model_type or 'non-GPT-2'!s} model, not GPT-2; "
                          "--init-from takes GPT-2 models (model_type gpt2) or gptlab runs")
    act = config.get("activation_function", "gelu_new")
    if act not in GELU_FORMS:
        raise GptlabError(f"{where}: activation_function {act!r} is not a GELU this model has; use a GPT-2 with gelu or gelu_new")
    n_embd = config.get("n_embd", 768)
    checks = [
        (config.get("n_inner") in (None, 4 * n_embd), f"n_inner {config.get('n_inner')} is not 4 x n_embd"),
        (abs(float(config.get("layer_norm_epsilon", LAYER_NORM_EPS)) - LAYER_NORM_EPS) < 1e-12,
         f"layer_norm_epsilon {config.get('layer_norm_epsilon')} is not 1e-5"),
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
    )


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's weights file(s), as stored."""
    from gptlab.checkpoint import read_weights

    if (folder / "model.safetensors").is_file():
        return read_weights(folder / "model.safetensors")[0]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index, f"{index} is not valid JSON; download the model again").get("weight_map", {})
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(read_weights(folder / shard)[0])
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


def state_dict_from_hf(tensors: dict[str, torch.Tensor], model_cfg: ModelConfig, config: dict[str, Any],
                       folder: Path) -> dict[str, torch.Tensor]:
    """HF GPT-2 tensors renamed and transposed into our GPT's state dict (float32, head tied)."""
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
    return _tie(ours)


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor a GPT of this config saves (the tied head once), without building it.

    Building one on the meta device would be the obvious way, but its first use imports torch._dynamo (~3 s).
    """
    C, b = cfg.n_embd, cfg.bias
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (cfg.vocab_size, C),
                                          "transformer.wpe.weight": (cfg.block_size, C)}
    per_layer = {"ln_1": (C, C), "attn.c_attn": (3 * C, C), "attn.c_proj": (C, C), "ln_2": (C, C),
                 "mlp.c_fc": (4 * C, C), "mlp.c_proj": (C, 4 * C)}
    for layer in range(cfg.n_layer):
        for module, (out, inp) in per_layer.items():
            prefix = f"transformer.h.{layer}.{module}"
            shapes[f"{prefix}.weight"] = (out,) if module.startswith("ln") else (out, inp)
            if b:
                shapes[f"{prefix}.bias"] = (out,)
    shapes["transformer.ln_f.weight"] = (C,)
    if b:
        shapes["transformer.ln_f.bias"] = (C,)
    return shapes


def _check_shapes(tensors: dict[str, torch.Tensor], model_cfg: ModelConfig, path: Path, against: str) -> None:
    expected = expected_shapes(model_cfg)
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got == expected:
        return
    missing = sorted(set(expected) - set(got))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    detail = (f"missing {missing[0]}" if missing else
              f"{wrong[0]} is {got[wrong[0]]}, {against} says {expected[wrong[0]]}" if wrong else
              f"unexpected {sorted(set(got) - set(expected))[0]}")
    raise GptlabError(f"weights in {path} do not fit {against} ({detail}); the files come from different models")


def _tie(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {**tensors, "lm_head.weight": tensors["transformer.wte.weight"]}


def _read_json(path: Path, missing: str) -> dict[str, Any]:
    if not path.is_file():
        raise GptlabError(missing)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GptlabError(f"{path} is not valid JSON ({type(e).__name__}); download or export it again") from None
    if not isinstance(value, dict):
        raise GptlabError(f"{path} must hold a JSON object")
    return value


# ---------------------------------------------------------------------------------------------
# Tokenizers


def _merge_lines(merges: list[Any]) -> list[str]:
    # tokenizer.json has stored merges as "a b" strings and, since tokenizers 0.20, as [a, b] pairs.
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def hf_tokenizer(folder: Path) -> Tokenizer:
    """Our tokenizer for the tokenizer files of a Hugging Face folder."""
    vocab_file, merges_file, tok_file = folder / "vocab.json", folder / "merges.txt", folder / "tokenizer.json"
    vocab: dict[str, int] | None = None
    merges: list[str] | None = None
    spec: dict[str, Any] | None = None
    try:
        if tok_file.is_file():
            spec = json.loads(tok_file.read_text(encoding="utf-8"))
            model = spec.get("model", {})
            if model.get("type") == "BPE":
                vocab, merges = model.get("vocab"), _merge_lines(model.get("merges", []))
        if vocab_file.is_file() and merges_file.is_file():
            vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
            merges = [line for line in merges_file.read_text(encoding="utf-8").splitlines()
                      if line.strip() and not line.startswith("#version")]
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError) as e:
        raise GptlabError(f"the tokenizer files in {folder} are corrupt ({type(e).__name__}); download or export them again") from None
    if vocab is None and spec is None:
        raise GptlabError(f"{folder} has no tokenizer (vocab.json + merges.txt, or tokenizer.json); copy the model's tokenizer files into it")
    if vocab is not None and merges is not None:
        gpt2_vocab, gpt2_merges = gpt2_vocab_files()
        if vocab == gpt2_vocab and merges == gpt2_merges:
            return GPT2Tokenizer.build()
    if spec is not None:  # fuller than vocab.json + merges.txt: it also holds the added tokens
        return _tokenizer_from_spec(spec, tok_file)
    from tokenizers import Tokenizer as HFTokenizer

    return BPETokenizer(HFTokenizer.from_str(byte_level_bpe(vocab, merges).to_str()))  # type: ignore[arg-type]


def _tokenizer_from_spec(spec: dict[str, Any], path: Path) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    kind = spec.get("model", {}).get("type")
    if kind == "WordLevel":  # the character tokenizer `gptlab export` writes
        vocab = spec["model"].get("vocab", {})
        chars = sorted(vocab, key=vocab.get)
        if all(len(c) == 1 for c in chars) and [vocab[c] for c in chars] == list(range(len(chars))) \
                and chars == sorted(chars):
            return CharTokenizer(chars)
    if kind == "BPE":
        try:
            return BPETokenizer(HFTokenizer.from_str(json.dumps(spec)))
        except Exception as e:  # tokenizers' own error types for a spec it cannot build
            raise GptlabError(f"{path} could not be read by tokenizers ({type(e).__name__}); export or download it again") from None
    raise GptlabError(f"{path} is a {kind} tokenizer; gptlab takes byte-level BPE (GPT-2 style) or its own character tokenizer")


def _describe(tok: Tokenizer) -> str:
    return f"the {tok.name} tokenizer ({tok.vocab_size:,} tokens)"


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether two tokenizers give every text the same ids."""
    if a.name != b.name or a.vocab_size != b.vocab_size:
        return False
    if a.name == "char":
        return a.chars == b.chars  # type: ignore[attr-defined]
    if a.name == "gpt2":
        return a.mergeable_ranks == b.mergeable_ranks  # type: ignore[attr-defined]
    if a.name == "bpe":
        spec_a, spec_b = (json.loads(t.hf.to_str()) for t in (a, b))  # type: ignore[attr-defined]
        return spec_a.get("model") == spec_b.get("model") and spec_a.get("added_tokens") == spec_b.get("added_tokens")
    return False


def check_same_tokenizer(model_tok: Tokenizer, data_tok: Tokenizer, source: Path, data_dir: str | Path = "",
                         run_data: str | None = None) -> None:
    """A one-line error when the data was tokenized differently from what the model learned."""
    if same_tokenizer(model_tok, data_tok):
        return
    data = f"the data folder {data_dir}" if data_dir else "the data"
    if model_tok.name == "gpt2":
        fix = "prepare the text with `gptlab prepare TEXT --tokenizer gpt2`"
    elif run_data:
        fix = f"train on the data that run used (--data {run_data}), or train without --init-from"
    else:
        fix = "train on data tokenized with the model's tokenizer, or without --init-from"
    if model_tok.name == data_tok.name:
        what = f"uses a different {data_tok.name} vocabulary ({data_tok.vocab_size:,} tokens) from {source} ({model_tok.vocab_size:,})"
    else:
        what = f"uses {_describe(data_tok)} but {source} uses {_describe(model_tok)}"
    raise GptlabError(f"{data} {what}; {fix}")
