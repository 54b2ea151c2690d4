"""A run as one GGUF file for llama.cpp and Ollama, with an Ollama Modelfile beside it.

    gptlab export runs/shakespeare --format gguf --out exports/shakespeare.gguf [--outtype q8_0]

Design choices:
- A gpt2 run is llama.cpp's `gpt2` architecture, a llama run its `llama` architecture, and a llama
  run with QK-norm its `qwen3` one (Qwen3's block is Llama's plus a per-head RMSNorm of queries and
  keys before the rotation, as ours). The file is written with the `gguf` package llama.cpp maintains.
- One table per architecture maps our tensor names to llama.cpp's (`GGUF_NAMES`); each linear
  weight is (out, in) as nn.Linear holds it. A gpt2 run's weights are those of the HF export
  (zero biases filled: llama.cpp's gpt2 needs them), a llama run's are ours as they are.
- Rotary positions: we rotate each head's two halves together (HF's rotate_half); llama.cpp's
  `llama` rotates adjacent pairs, so the rows of q_proj and k_proj are reordered per head, as
  llama.cpp's converter reorders HF Llama checkpoints. Its `qwen3` rotates halves, as we do: no
  reordering there.
- The output head is written as its own tensor (`output.weight`) even when tied, so every file
  has the same tensors; the vocabulary is cut to the tokenizer's.
- The tokenizer is GPT-2's byte-level BPE (`tokenizer.ggml.model = "gpt2"`, pre-tokenizer "gpt-2"):
  the gpt2 and bpe:N kinds. char and byte are refused: llama.cpp's BPE vocabulary falls back to
  token 11 as its end-of-text when a file names none, so a vocabulary without one would stop
  generating at its twelfth token.
- 1-D tensors (norms, biases) and the position embedding stay f32, as llama.cpp's converter keeps
  them; a matrix whose rows do not split into q8_0's 32-value blocks is written f16.
- llama.cpp's gpt2 computes GELU in its tanh form through an f16 table, whatever form the model
  was trained with: logits agree with ours to ~1e-4 on a tiny model, not to the last bit.
- The file is written under a temporary name beside the target and renamed into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptlab.config import SAMPLES_SETTINGS, ModelConfig
from gptlab.errors import GptlabError
from gptlab.fsutil import atomic_write_text, cause, fsync_dir
from gptlab.hf.gpt2 import CONV1D, hf_state_dict
from gptlab.tokenizer import ENDOFTEXT, Tokenizer, merge_lines

if TYPE_CHECKING:
    import numpy as np
    import torch

    from gptlab.hf.source import ExportSource

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
GGUF_MAGIC = b"GGUF"
SUPPORTED_TOKENIZERS = ("gpt2", "bpe")
MODELFILE_MARK = "# Ollama Modelfile written by gptlab export"

# Per architecture (ModelConfig.arch), our module names ({n}: the block) and llama.cpp's; the
# .weight or .bias after them is kept.
GGUF_NAMES = {
    "gpt2": {
        "transformer.wte": "token_embd", "transformer.wpe": "position_embd",
        "transformer.h.{n}.ln_1": "blk.{n}.attn_norm", "transformer.h.{n}.attn.c_attn": "blk.{n}.attn_qkv",
        "transformer.h.{n}.attn.c_proj": "blk.{n}.attn_output", "transformer.h.{n}.ln_2": "blk.{n}.ffn_norm",
        "transformer.h.{n}.mlp.c_fc": "blk.{n}.ffn_up", "transformer.h.{n}.mlp.c_proj": "blk.{n}.ffn_down",
        "transformer.ln_f": "output_norm",
    },
    "llama": {
        "model.embed_tokens": "token_embd",
        "model.layers.{n}.input_layernorm": "blk.{n}.attn_norm",
        "model.layers.{n}.self_attn.q_proj": "blk.{n}.attn_q", "model.layers.{n}.self_attn.k_proj": "blk.{n}.attn_k",
        "model.layers.{n}.self_attn.v_proj": "blk.{n}.attn_v", "model.layers.{n}.self_attn.o_proj": "blk.{n}.attn_output",
        "model.layers.{n}.self_attn.q_norm": "blk.{n}.attn_q_norm", "model.layers.{n}.self_attn.k_norm": "blk.{n}.attn_k_norm",
        "model.layers.{n}.post_attention_layernorm": "blk.{n}.ffn_norm",
        "model.layers.{n}.mlp.gate_proj": "blk.{n}.ffn_gate", "model.layers.{n}.mlp.up_proj": "blk.{n}.ffn_up",
        "model.layers.{n}.mlp.down_proj": "blk.{n}.ffn_down",
        "model.norm": "output_norm", "lm_head": "output",
    },
}

# Llama weights whose rows are reordered for llama.cpp's `llama` rotation (see rope_pairs_adjacent).
ROTATED = ("self_attn.q_proj.weight", "self_attn.k_proj.weight")


def gguf_architecture(cfg: ModelConfig) -> str:
    """llama.cpp's architecture for a run: gpt2, llama, or qwen3 (a llama block with QK-norm)."""
    if cfg.arch == "gpt2":
        return "gpt2"
    return "qwen3" if cfg.qk_norm else "llama"


def gguf_name(name: str, arch: str) -> str:
    """llama.cpp's name for one of our tensors, e.g. model.layers.0.mlp.up_proj.weight -> blk.0.ffn_up.weight."""
    module, kind = name.rsplit(".", 1)
    parts = module.split(".")
    layer = next((p for p in parts if p.isdigit()), None)
    key = ".".join("{n}" if p == layer else p for p in parts)
    return f"{GGUF_NAMES[arch][key].format(n=layer)}.{kind}"


def rope_pairs_adjacent(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q_proj or k_proj (n_heads * hs, C) with each head's rows i and i + hs/2 (the pair HF's rotate_half
    turns together) moved to rows 2i and 2i + 1 (the pair llama.cpp's `llama` rope turns)."""
    rows, C = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, C).transpose(1, 2).reshape(rows, C)


def _our_tensors(src: ExportSource) -> dict[str, torch.Tensor]:
    """The model's tensors, float32, linear weights (out, in), the vocabulary cut to the tokenizer's."""
    from gptlab.checkpoint import state_dict_for_saving

    vocab = src.tokenizer.vocab_size
    if src.model_cfg.arch == "gpt2":  # HF's Conv1D holds (in, out); GGUF wants nn.Linear's (out, in)
        return {name: tensor.t() if name.endswith(CONV1D) else tensor
                for name, tensor in hf_state_dict(src.model, vocab).items() if name != "lm_head.weight"}
    out = {}
    for name, tensor in state_dict_for_saving(src.model).items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensor = tensor[:vocab]
        out[name] = tensor.float()
    return out


def gguf_tensors(src: ExportSource) -> dict[str, np.ndarray]:
    """The model's tensors under llama.cpp's names, float32, linear weights (out, in), the head written out."""
    cfg = src.model_cfg
    rotate_pairs = gguf_architecture(cfg) == "llama"
    out = {}
    for name, tensor in _our_tensors(src).items():
        if rotate_pairs and name.endswith(ROTATED):
            tensor = rope_pairs_adjacent(tensor, cfg.n_head if "q_proj" in name else cfg.kv_heads)
        out[gguf_name(name, cfg.arch)] = tensor.contiguous().numpy()
    out.setdefault("output.weight", out["token_embd.weight"])  # tied
    return out


def check_tokenizer(tokenizer: Tokenizer) -> None:
    """A one-line error for a tokenizer llama.cpp would not tokenize as we do."""
    if tokenizer.name not in SUPPORTED_TOKENIZERS:
        raise GptlabError(f"--format gguf takes runs with the gpt2 or bpe:N tokenizer (llama.cpp's byte-level BPE); "
                          f"this run uses {tokenizer.spec}: export it with --format hf, or train with --tokenizer bpe:N")


def byte_level_vocab(tokenizer: Tokenizer) -> tuple[list[str], list[str], list[str]]:
    """Tokens (as GPT-2's vocab.json spells them, by id), merges ("a b") and the special tokens' texts."""
    spec = json.loads(tokenizer.hf_files()["tokenizer.json"])
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    tokens = [""] * tokenizer.vocab_size
    for text, i in {**spec["model"]["vocab"], **specials}.items():
        if i < tokenizer.vocab_size:
            tokens[i] = text
    return tokens, merge_lines(spec["model"].get("merges", [])), list(specials)


def _add_tokenizer(writer: Any, tokenizer: Tokenizer) -> None:
    import gguf

    tokens, merges, specials = byte_level_vocab(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    if tokenizer.eot_id is not None:
        writer.add_bos_token_id(tokenizer.eot_id)
        writer.add_eos_token_id(tokenizer.eot_id)
    # Our prompts start with no token in front; end-of-text is added only where the text has one.
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


def _encode(array: np.ndarray, name: str, outtype: str) -> tuple[np.ndarray, Any]:
    """One tensor in the chosen type (None: let the writer take numpy's dtype)."""
    import gguf
    import numpy as np

    if outtype == "f32" or array.ndim == 1 or name == "position_embd.weight":
        return array.astype(np.float32), None
    if outtype == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    if outtype == "bf16":
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    return array.astype(np.float16), None


def _file_type(outtype: str) -> int:
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]


def _fill(writer: Any, src: ExportSource, outtype: str) -> None:
    import gguf

    cfg = src.model_cfg
    writer.add_name(src.name)
    writer.add_context_length(cfg.block_size)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(cfg.hidden)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_vocab_size(src.tokenizer.vocab_size)
    if cfg.arch == "gpt2":
        writer.add_layer_norm_eps(cfg.norm_eps)
    else:
        writer.add_head_count_kv(cfg.kv_heads)
        writer.add_rope_dimension_count(cfg.head_size)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_file_type(_file_type(outtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, src.tokenizer)
    for name, array in gguf_tensors(src).items():
        data, raw_dtype = _encode(array, name, outtype)
        writer.add_tensor(name, data, raw_dtype=raw_dtype)


def modelfile(gguf_path: Path, tokenizer: Tokenizer) -> str:
    """An Ollama Modelfile for a plain completion model: the prompt as is, sampled as samples.txt is."""
    lines = [MODELFILE_MARK, f"FROM ./{gguf_path.name}", 'TEMPLATE """{{ .Prompt }}"""',
             f"PARAMETER temperature {SAMPLES_SETTINGS.temperature}", f"PARAMETER top_k {SAMPLES_SETTINGS.top_k}"]
    if tokenizer.eot_id is not None:
        lines.append(f'PARAMETER stop "{ENDOFTEXT}"')
    return "\n".join(lines) + "\n"


def modelfile_path(gguf_path: Path) -> Path:
    """exports/x.gguf -> exports/x.Modelfile (`ollama create NAME -f exports/x.Modelfile`)."""
    return gguf_path.with_suffix(".Modelfile")


def is_gguf(path: Path) -> bool:
    """Whether the file starts with GGUF's magic bytes."""
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def check_gguf_target(out: Path, overwrite: bool) -> None:
    """A one-line error unless `out` is free, or a GGUF (and its Modelfile ours) that --overwrite replaces."""
    if out.suffix != ".gguf":
        raise GptlabError(f"--out {out} does not end in .gguf; name the file to write, e.g. --out exports/model.gguf")
    if out.is_dir():
        raise GptlabError(f"--out {out} is a folder; --format gguf writes one file, e.g. --out {out / 'model.gguf'}")
    mf = modelfile_path(out)
    if mf.exists() and (not mf.is_file() or not mf.read_text(encoding="utf-8", errors="replace").startswith(MODELFILE_MARK)):
        raise GptlabError(f"{mf} exists and was not written by gptlab; move it away or choose another --out")
    if not out.exists():
        return
    if not out.is_file() or not is_gguf(out):
        raise GptlabError(f"{out} exists and is not a GGUF file; move it away or choose another --out")
    if not overwrite:
        raise GptlabError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")


def write_gguf(src: ExportSource, out: Path, outtype: str = "f32") -> None:
    """Write the run as a GGUF file at `out` (atomically) and its Ollama Modelfile beside it."""
    try:
        import gguf
    except ImportError:
        raise GptlabError("--format gguf needs the gguf package; run `make install` or `pip install 'gptlab[gguf]'`") from None

    if outtype not in OUTTYPES:
        raise GptlabError(f"--outtype {outtype!r} is not available; choose one of: {', '.join(OUTTYPES)}")
    check_tokenizer(src.tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(tmp, gguf_architecture(src.model_cfg))
    try:
        _fill(writer, src, outtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except OSError as e:
        raise GptlabError(f"could not write {out}: {cause(e, out)}; free disk space or choose another --out") from None
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    atomic_write_text(modelfile_path(out), modelfile(out, src.tokenizer))
