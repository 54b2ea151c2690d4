"""A run as one GGUF file for llama.cpp and Ollama, with an Ollama Modelfile beside it.

    gptlab export runs/shakespeare --format gguf --out exports/shakespeare.gguf [--outtype q8_0]

Design choices:
- The file is llama.cpp's `gpt2` architecture, written with the `gguf` package llama.cpp maintains;
  the weights are those of the HF export (zero biases filled, vocabulary cut) under llama.cpp's
  tensor names, each linear weight (out, in) as nn.Linear holds it.
- The output head is written as its own tensor (`output.weight`), as llama.cpp's converter does.
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

from gptlab.config import SAMPLES_SETTINGS
from gptlab.errors import GptlabError
from gptlab.fsutil import atomic_write_text, cause, fsync_dir
from gptlab.hf.gpt2 import CONV1D, LAYER_NORM_EPS, hf_state_dict
from gptlab.tokenizer import ENDOFTEXT, Tokenizer, merge_lines

if TYPE_CHECKING:
    import numpy as np

    from gptlab.hf.source import ExportSource

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
GGUF_MAGIC = b"GGUF"
SUPPORTED_TOKENIZERS = ("gpt2", "bpe")
MODELFILE_MARK = "# Ollama Modelfile written by gptlab export"

# Our (HF GPT-2) tensor names, per block and for the whole model, and llama.cpp's gpt2 names.
BLOCK_NAMES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
               "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
TOP_NAMES = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
             "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}


def gguf_name(name: str) -> str:
    """llama.cpp's name for one of our tensors, e.g. transformer.h.0.mlp.c_fc.weight -> blk.0.ffn_up.weight."""
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    _, _, layer, rest = name.split(".", 3)  # transformer.h.N.<module>.<weight|bias>
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{BLOCK_NAMES[module]}.{kind}"


def gguf_tensors(src: ExportSource) -> dict[str, np.ndarray]:
    """The model's tensors under llama.cpp's names, float32, linear weights (out, in)."""
    out = {}
    for name, tensor in hf_state_dict(src.model, src.tokenizer.vocab_size).items():
        if name == "lm_head.weight":
            continue
        if name.endswith(CONV1D):  # HF's Conv1D holds (in, out); GGUF wants nn.Linear's (out, in)
            tensor = tensor.t()
        out[gguf_name(name)] = tensor.contiguous().numpy()
    out["output.weight"] = out["token_embd.weight"]  # tied
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
    writer.add_feed_forward_length(4 * cfg.n_embd)
    writer.add_block_count(cfg.n_layer)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(LAYER_NORM_EPS)
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
    writer = gguf.GGUFWriter(tmp, "gpt2")
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
