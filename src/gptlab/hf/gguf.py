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
- The gpt2 and bpe:N kinds are GPT-2's byte-level BPE (`tokenizer.ggml.model = "gpt2"`, pre-tokenizer
  "gpt-2"). char and byte are refused: llama.cpp's BPE vocabulary falls back to token 11 as its
  end-of-text when a file names none, so a vocabulary without one would stop generating at its
  twelfth token.
- A model's own tokenizer (the hf kind) is written only where llama.cpp gives the same ids, as
  recognised from the tokenizer.json's structure, never from a model's name: a byte-level BPE whose
  pre-tokenizer is one llama.cpp names (`BYTE_LEVEL_PRE`: GPT-2's, SmolLM's digits apart, Llama 3's
  split), or a SentencePiece-style BPE with byte fallback (llama.cpp's `llama` vocabulary, scored by
  merge rank), when its merges are what SentencePiece's merging follows (`merge_scores`). A
  Metaspace spelling, any other split and anything else are one-line errors pointing to --format hf.
- A chat run's markers are control tokens (tokenizer.json's special added tokens), <|end|> is its
  end-of-text, and `tokenizer.chat_template` holds the template, which llama.cpp's --jinja and
  llama-cpp-python render; the Modelfile carries the same template in Ollama's own syntax.
- No BOS in front of a prompt (add_bos_token false, whatever the tokenizer's post-processor adds):
  gptlab's data has none, so the model never saw one.
- 1-D tensors (norms, biases) and the position embedding stay f32, as llama.cpp's converter keeps
  them; a matrix whose rows do not split into q8_0's 32-value blocks is written f16.
- llama.cpp's gpt2 computes GELU in its tanh form through an f16 table, whatever form the model
  was trained with: logits agree with ours to ~1e-4 on a tiny model, not to the last bit.
- The file is written under a temporary name beside the target and renamed into place.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptlab.config import SAMPLES_SETTINGS, ModelConfig
from gptlab.errors import GptlabError
from gptlab.fsutil import atomic_write_text, cause, fsync_dir
from gptlab.hf.gpt2 import CONV1D, hf_state_dict
from gptlab.tokenizer import ENDOFTEXT, ChatTokenizer, Tokenizer, merge_lines

if TYPE_CHECKING:
    import numpy as np
    import torch

    from gptlab.hf.source import ExportSource

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
GGUF_MAGIC = b"GGUF"
SUPPORTED_TOKENIZERS = ("gpt2", "bpe")
MODELFILE_MARK = "# Ollama Modelfile written by gptlab export"
# CHAT_TEMPLATE in Ollama's Go template syntax: per message its marker, content and <|end|>, then the reply's marker.
OLLAMA_CHAT_TEMPLATE = "{{- range .Messages }}<|{{ .Role }}|>{{ .Content }}<|end|>{{ end }}<|assistant|>"

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


# llama.cpp's byte-level pre-tokenizers (tokenizer.ggml.pre), each as a tokenizer.json spells the same split:
# (its pre-tokenizer steps, whether the BPE takes a pre-token found whole in the vocabulary as it is).
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}  # GPT-2's regex, then bytes
_BYTES_ONLY = {**_BYTE_LEVEL, "use_regex": False}
_LLAMA3_SPLIT = {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated", "invert": False}
BYTE_LEVEL_PRE = {
    "gpt-2": ([_BYTE_LEVEL], False),
    "smollm": ([{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL], False),  # SmolLM, SmolLM2
    "llama-bpe": ([_LLAMA3_SPLIT, _BYTES_ONLY], True),  # Llama 3
    "smaug-bpe": ([_LLAMA3_SPLIT, _BYTES_ONLY], False),  # Llama 3's split with every pre-token merged
}
SPIECE = "\u2581"  # SentencePiece's "▁", standing for a space
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _steps(node: dict[str, Any] | None, key: str) -> list[dict[str, Any]]:
    """A normalizer's or pre-tokenizer's steps in order (a Sequence flattened; none: [])."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [step for inner in node.get(key) or [] for step in _steps(inner, key)]
    return [node]


def _matches(step: dict[str, Any], expected: dict[str, Any]) -> bool:
    """Whether a step has every field `expected` gives (ByteLevel's use_regex defaults to true)."""
    return all(step.get(k, True if k == "use_regex" else None) == v for k, v in expected.items())


def byte_level_pre(spec: dict[str, Any]) -> str | None:
    """llama.cpp's name for a byte-level BPE's pre-tokenizer, or None when it knows no such split."""
    if spec.get("normalizer") or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        return None
    steps = _steps(spec.get("pre_tokenizer"), "pretokenizers")
    ignore_merges = bool(spec["model"].get("ignore_merges"))
    for name, (expected, ignores) in BYTE_LEVEL_PRE.items():
        if ignores == ignore_merges and len(steps) == len(expected) and all(map(_matches, steps, expected)):
            return name
    return None


def space_prefix(spec: dict[str, Any]) -> bool | None:
    """For a SentencePiece-style BPE (spaces as "▁", byte fallback): whether a "▁" starts each text; None if not one.

    Its two spellings in tokenizer.json: a Prepend("▁") + Replace(" ", "▁") normalizer (Llama 2,
    TinyLlama), or a Metaspace pre-tokenizer that does not split (transformers' newer conversion).
    Only the first is llama.cpp's: Metaspace puts no "▁" before a text that starts with a space,
    llama.cpp always does, so it is refused.
    """
    model = spec["model"]
    vocab = model.get("vocab") or {}
    if not model.get("byte_fallback") or model.get("ignore_merges") or not all(f"<0x{b:02X}>" in vocab for b in range(256)):
        return None
    norms, pres = _steps(spec.get("normalizer"), "normalizers"), _steps(spec.get("pre_tokenizer"), "pretokenizers")
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPIECE}
    if not pres and norms and _matches(norms[-1], replace):
        if norms[:-1] == [] or (len(norms) == 2 and _matches(norms[0], {"type": "Prepend", "prepend": SPIECE})):
            return len(norms) == 2
    if not norms and len(pres) == 1 and _matches(pres[0], {"type": "Metaspace", "replacement": SPIECE, "split": False}):
        scheme = pres[0].get("prepend_scheme") or ("always" if pres[0].get("add_prefix_space", True) else "never")
        return scheme != "never"  # "first" and "always" differ only after a special token
    return None


def merge_scores(spec: dict[str, Any]) -> dict[str, float] | None:
    """Scores for llama.cpp's SentencePiece merging (-rank of the merge that makes each token), or None when
    that merging would not give the BPE's ids.

    llama.cpp merges any two neighbours whose text is a token, the highest score first; the BPE
    merges only listed pairs, the lowest rank first. They agree when every split of a token into
    two parts that can stand side by side is a listed merge, and merges that make the same token
    come together: so a tokenizer.json converted from SentencePiece lists them.
    """
    vocab = spec["model"]["vocab"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in spec["model"].get("merges") or []]
    ranks = {pair: r for r, pair in reversed(list(enumerate(merges)))}
    scores: dict[str, float] = {}
    previous = None
    for rank, (a, b) in enumerate(merges):
        made = a + b
        if made in scores and made != previous:
            return None  # the same token made again after other merges: ranks and scores would not agree
        scores.setdefault(made, -float(rank))
        previous = made

    def standalone(piece: str) -> bool:  # a symbol llama.cpp's merging may hold: a token, or one character
        return piece in vocab or len(piece) == 1

    for token in vocab:
        for i in range(1, len(token)):
            a, b = token[:i], token[i:]
            if standalone(a) and standalone(b) and (a, b) not in ranks:
                return None
    return scores


def _hf_plan(tokenizer: Tokenizer) -> tuple[str, str | None]:
    """(tokenizer.ggml.model, tokenizer.ggml.pre) for an hf-kind tokenizer, or a one-line error."""
    spec = json.loads(tokenizer.hf_files()["tokenizer.json"])
    name = getattr(tokenizer, "source", "") or "this run"
    fix = "export it with --format hf"
    if spec["model"].get("dropout") or spec["model"].get("continuing_subword_prefix") or spec["model"].get("end_of_word_suffix"):
        raise GptlabError(f"--format gguf: the BPE of {name} uses dropout or word marks, which llama.cpp cannot "
                          f"reproduce; {fix}")
    if tokenizer.eot_id is None:
        raise GptlabError(f"--format gguf: the BPE of {name} has no end-of-text token, which llama.cpp needs; {fix}")
    pre = byte_level_pre(spec)
    if pre is not None:
        return "gpt2", pre
    if space_prefix(spec) is not None:
        if _steps(spec.get("pre_tokenizer"), "pretokenizers") and space_prefix(spec):
            raise GptlabError(f"--format gguf: the Metaspace pre-tokenizer of {name} adds no \"\u2581\" before a text "
                              f"that starts with a space, where llama.cpp always adds one; {fix}")
        if merge_scores(spec) is None:
            raise GptlabError(f"--format gguf: the SentencePiece-style BPE of {name} has merges llama.cpp's "
                              f"SentencePiece merging would not follow (not all splits of its tokens are merges); {fix}")
        return "llama", None
    raise GptlabError(f"--format gguf: the BPE of {name} splits text in a way llama.cpp has no name for (it knows "
                      f"GPT-2's, SmolLM's and Llama 3's byte-level splits, and SentencePiece-style BPE); {fix}")


def check_tokenizer(tokenizer: Tokenizer) -> None:
    """A one-line error for a tokenizer llama.cpp would not tokenize as we do."""
    if tokenizer.name == "hf":
        _hf_plan(tokenizer)
    elif tokenizer.name not in SUPPORTED_TOKENIZERS:
        raise GptlabError(f"--format gguf takes runs with the gpt2 or bpe:N tokenizer (llama.cpp's byte-level BPE); "
                          f"this run uses {tokenizer.spec}: export it with --format hf, or train with --tokenizer bpe:N")


def vocab_lists(spec: dict[str, Any], size: int) -> tuple[list[str], list[str], set[str], set[str]]:
    """Tokens (as tokenizer.json spells them, by id), merges ("a b"), the special added tokens' texts and
    the other added tokens' texts."""
    added = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    specials = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    tokens = [""] * size
    for text, i in {**spec["model"]["vocab"], **added}.items():
        if i < size:
            tokens[i] = text
    return tokens, merge_lines(spec["model"].get("merges", [])), specials, set(added) - specials


def _token_id(tokenizer: Tokenizer, key: str) -> int | None:
    """The id of a special token tokenizer_config.json names (e.g. bos_token), None if none."""
    text = (getattr(tokenizer, "special_tokens", None) or {}).get(key)
    return tokenizer.hf.token_to_id(text) if text is not None else None  # type: ignore[attr-defined]


def _add_tokenizer(writer: Any, tokenizer: Tokenizer) -> None:
    import gguf

    spec = json.loads(tokenizer.hf_files()["tokenizer.json"])
    model, pre = _hf_plan(tokenizer) if tokenizer.name == "hf" else ("gpt2", "gpt-2")
    tokens, merges, specials, user = vocab_lists(spec, tokenizer.vocab_size)
    # Special added tokens are control tokens (read in text only with special=True); other added tokens
    # are user-defined, which llama.cpp picks out of any text, as `tokenizers` does.
    types = [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.USER_DEFINED if t in user
             else gguf.TokenType.NORMAL for t in tokens]
    writer.add_tokenizer_model(model)
    eot = tokenizer.eot_id
    named_bos = _token_id(tokenizer, "bos_token") if tokenizer.name == "hf" else None
    bos = eot if named_bos is None else named_bos
    eos = eot
    if isinstance(tokenizer, ChatTokenizer):
        eos = tokenizer.end_id  # a reply ends at <|end|>
        writer.add_chat_template(tokenizer.template)
    if model == "gpt2":
        writer.add_tokenizer_pre(pre)
        writer.add_token_merges(merges)
    else:
        scores = merge_scores(spec) or {}
        unk = spec["model"].get("unk_token")
        types = [gguf.TokenType.BYTE if _BYTE_TOKEN.fullmatch(t) else gguf.TokenType.UNKNOWN if t == unk else ty
                 for t, ty in zip(tokens, types)]
        # Only a merged token's score is ever read; single characters, bytes and specials get 0.
        writer.add_token_scores([scores.get(t, 0.0) for t in tokens])
        if unk is not None and tokenizer.hf.token_to_id(unk) is not None:  # type: ignore[attr-defined]
            writer.add_unk_token_id(tokenizer.hf.token_to_id(unk))  # type: ignore[attr-defined]
        # The "▁" that starts each text, as our encode puts it (llama.cpp's add_space_prefix).
        writer.add_add_space_prefix(bool(space_prefix(spec)))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if eos is not None:
        writer.add_bos_token_id(bos)
        writer.add_eos_token_id(eos)
    # Our prompts start with no token in front (gptlab's data has no BOS added, whatever the tokenizer's
    # post-processor does); end-of-text is added only where the text has one.
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
    """An Ollama Modelfile, sampled as samples.txt is: the prompt as is, or a chat run's conversation in its template."""
    template = OLLAMA_CHAT_TEMPLATE if isinstance(tokenizer, ChatTokenizer) else "{{ .Prompt }}"
    lines = [MODELFILE_MARK, f"FROM ./{gguf_path.name}", f'TEMPLATE """{template}"""',
             f"PARAMETER temperature {SAMPLES_SETTINGS.temperature}", f"PARAMETER top_k {SAMPLES_SETTINGS.top_k}"]
    if isinstance(tokenizer, ChatTokenizer):  # gptlab's engine ends a reply at any marker
        lines += [f"PARAMETER stop {json.dumps(marker)}" for marker in tokenizer.markers]
    if tokenizer.eot_id is not None:  # a model's own end-of-text may be another token, e.g. </s>
        stop = tokenizer.token_bytes(tokenizer.eot_id).decode("utf-8", "replace") if tokenizer.name == "hf" else ENDOFTEXT
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
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
