"""Our tokenizers as Hugging Face `tokenizer.json` files, Hugging Face tokenizer files as ours, and the tokenizer of a folder.

Design choices:
- `tokenizer_of` is the one reader of `--tokenizer-from DIR` (prepare) and of `--init-from DIR`'s
  tokenizer for text given to train: a gptlab run or data folder gives its saved tokenizer, a Hugging
  Face folder its tokenizer.json (or vocab.json + merges.txt), with the bos/eos/unk/pad tokens its
  tokenizer_config.json names.
- A folder's tokenizer.json is gptlab's own description when it names a `type`, Hugging Face's
  when it holds a `model`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gptlab.errors import GptlabError
from gptlab.fsutil import write_text
from gptlab.tokenizer import DESCRIPTOR, KINDS, Tokenizer, byte_level_bpe, load_tokenizer

HINTS = {"--tokenizer-from": "give a gptlab run or data folder, or a Hugging Face model folder with its tokenizer files",
         "--init-from": "give a gptlab run folder, or a Hugging Face model folder with its tokenizer files"}


def write_hf_tokenizer(tokenizer: Tokenizer, folder: Path, block_size: int) -> None:
    """The kind's Hugging Face files (tokenizer.json and any it adds) and tokenizer_config.json."""
    for name, text in tokenizer.hf_files().items():
        write_text(folder / name, text)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": block_size,
        # Cleaning would drop the space before punctuation that a model wrote on purpose.
        "clean_up_tokenization_spaces": False,
        **tokenizer.special_tokens,
    }
    write_text(folder / "tokenizer_config.json", json.dumps(config, indent=1))


def hf_tokenizer(folder: Path) -> Tokenizer:
    """Our tokenizer for the tokenizer files of a Hugging Face folder."""
    vocab_file, merges_file, tok_file = folder / "vocab.json", folder / "merges.txt", folder / "tokenizer.json"
    try:
        if tok_file.is_file():  # fuller than vocab.json + merges.txt: it also holds the added tokens
            spec, path = json.loads(tok_file.read_text(encoding="utf-8")), tok_file
        elif vocab_file.is_file() and merges_file.is_file():
            vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
            merges = [line for line in merges_file.read_text(encoding="utf-8").splitlines()
                      if line.strip() and not line.startswith("#version")]
            spec, path = json.loads(byte_level_bpe(vocab, merges).to_str()), vocab_file
        else:
            raise GptlabError(f"{folder} has no tokenizer (vocab.json + merges.txt, or tokenizer.json); "
                              "copy the model's tokenizer files into it")
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else None
        if not isinstance(spec, dict) or not isinstance(spec.get("model", {}), dict) \
                or not isinstance(config, (dict, type(None))):
            raise TypeError("not a tokenizer.json object")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError) as e:
        raise GptlabError(f"the tokenizer files in {folder} are corrupt ({type(e).__name__}); download or export them again") from None
    return _tokenizer_from_spec(spec, path, config)


def _tokenizer_from_spec(spec: dict[str, Any], path: Path, config: dict[str, Any] | None = None) -> Tokenizer:
    """The first kind that recognises the tokenizer.json as its own."""
    for kind in KINDS.values():
        tokenizer = kind.from_hf_spec(spec, path, config)
        if tokenizer is not None:
            return tokenizer
    model = spec.get("model", {}).get("type")
    raise GptlabError(f"{path} is a {model} tokenizer, which gptlab cannot run; gptlab runs BPE tokenizers "
                      "(byte-level, or SentencePiece-style with byte fallback): use a model that has one, "
                      "or prepare with --tokenizer bpe:N")


def tokenizer_of(folder: str | Path, flag: str = "--tokenizer-from") -> Tokenizer:
    """The tokenizer of a gptlab run or data folder, or of a Hugging Face model folder (`flag` names it in errors)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GptlabError(f"{flag} {folder}: folder not found; {HINTS[flag]}")
    descriptor = folder / DESCRIPTOR
    if descriptor.is_file():
        try:
            desc = json.loads(descriptor.read_text(encoding="utf-8"))
            own = isinstance(desc, dict) and "type" in desc and "model" not in desc
        except (json.JSONDecodeError, UnicodeDecodeError):
            own = False  # hf_tokenizer names the corrupt file
        if own:
            return load_tokenizer(folder)
    elif not ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        raise GptlabError(f"{flag} {folder}: the folder has no tokenizer (no tokenizer.json, nor vocab.json + merges.txt); "
                          f"{HINTS[flag]}")
    return hf_tokenizer(folder)


def _describe(tok: Tokenizer) -> str:
    return f"the {tok.name} tokenizer ({tok.vocab_size:,} tokens)"

def check_same_tokenizer(model_tok: Tokenizer, data_tok: Tokenizer, source: Path, data_dir: str | Path = "",
                         run_data: str | None = None) -> None:
    """A one-line error when the data was tokenized differently from what the model learned."""
    if model_tok.same_as(data_tok):
        return
    data = f"the data folder {data_dir}" if data_dir else "the data"
    if model_tok.learning is None and model_tok.usage == model_tok.spec:  # a fixed vocabulary --tokenizer names
        fix = f"prepare the text with `gptlab prepare TEXT --tokenizer {model_tok.spec}`"
    elif run_data:
        fix = f"train on the data that run used (--data {run_data}), or prepare the text with `--tokenizer-from {source}`"
    else:
        fix = f"prepare the text with the model's tokenizer: `gptlab prepare TEXT --tokenizer-from {source}`"
    if model_tok.name == data_tok.name:
        what = f"uses a different {data_tok.name} vocabulary ({data_tok.vocab_size:,} tokens) from {source} ({model_tok.vocab_size:,})"
    else:
        what = f"uses {_describe(data_tok)} but {source} uses {_describe(model_tok)}"
    raise GptlabError(f"{data} {what}; {fix}")
