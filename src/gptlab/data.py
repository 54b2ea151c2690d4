"""Text -> token files on disk (memory-mapped) -> batches.

Design choices:
- Input is one UTF-8 file, several files, a folder of `.txt` files (recursively, sorted), or a named
  dataset (`shakespeare`) fetched once into a checksum-verified cache.
- The train/val split is by position: the last `val_fraction` of the bytes (cut at a character
  boundary) is validation, so no validation text leaks into training. With several files the cut
  falls in whichever file holds that byte.
- Text is streamed in chunks cut at line ends, so preparing a 1 GB file never holds 1 GB of text;
  tokens are appended to `train.bin` / `val.bin` (uint16 when the vocabulary fits, else uint32).
- Files are separated by the end-of-text token when the tokenizer has one.
- Batches come from `RandomBatches` (random windows, as nanoGPT) or `SlidingBatches` (every window
  at a stride, shuffled once per epoch, as LLMs-from-scratch's GPTDatasetV1). Both keep their
  position in a `state_dict`, so a resumed run continues the same stream.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptlab.errors import GptlabError
from gptlab.tokenizer import BPETokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer, load_tokenizer, parse_spec

CHUNK_BYTES = 4 << 20
META = "meta.json"

NAMED_DATASETS: dict[str, dict[str, Any]] = {
    "shakespeare": {
        "filename": "tinyshakespeare.txt",
        "url": "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "bytes": 1115394,
        "md5": "6fb458f1232090904fb40fe944165e91",
        "about": "tiny Shakespeare: 40,000 lines of Shakespeare's plays (Karpathy's char-rnn corpus)",
    },
}


def gptlab_home() -> Path:
    """Cache folder: $GPTLAB_HOME or ~/.cache/gptlab."""
    return Path(os.environ.get("GPTLAB_HOME") or Path.home() / ".cache" / "gptlab")


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_named_dataset(name: str) -> Path:
    """Path to a named dataset's verified text: mirror folder, then cache, then download."""
    spec = NAMED_DATASETS[name]
    mirror = os.environ.get("GPTLAB_DATA_MIRROR")
    if mirror:
        candidate = Path(mirror) / spec["filename"]
        if candidate.is_file() and _md5(candidate) == spec["md5"]:
            return candidate
    cached = gptlab_home() / "datasets" / spec["filename"]
    if cached.is_file() and _md5(cached) == spec["md5"]:
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(cached.name + ".part")
    try:
        with urllib.request.urlopen(spec["url"], timeout=30) as response, open(tmp, "wb") as f:
            while block := response.read(1 << 16):
                f.write(block)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise GptlabError(
            f"could not download {name} from {spec['url']} ({e}); fetch {spec['filename']} by hand "
            "and point GPTLAB_DATA_MIRROR at its folder"
        ) from None
    if _md5(tmp) != spec["md5"]:
        tmp.unlink(missing_ok=True)
        raise GptlabError(f"downloaded {name} does not match its md5 {spec['md5']}; try again later or use GPTLAB_DATA_MIRROR")
    os.replace(tmp, cached)
    return cached


def resolve_inputs(inputs: list[str]) -> tuple[str, list[Path]]:
    """A short dataset name and the list of text files behind the user's inputs."""
    if not inputs:
        raise GptlabError("no input text given; pass a file, a folder of .txt files, or a named dataset (shakespeare)")
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if not path.exists() and item in NAMED_DATASETS:
            files.append(fetch_named_dataset(item))
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not found:
                raise GptlabError(f"folder {path} holds no .txt files; put your text in .txt files or pass a file")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            named = ", ".join(NAMED_DATASETS)
            raise GptlabError(f"input {item} not found; pass an existing file or folder, or a named dataset ({named})")
    first = inputs[0]
    name = first if first in NAMED_DATASETS and not Path(first).exists() else Path(first).expanduser().resolve().stem
    return name, files


def check_text_file(path: Path) -> None:
    """Raise a GptlabError if `path` is empty, binary or not UTF-8 (naming the byte offset)."""
    size = path.stat().st_size
    if size == 0:
        raise GptlabError(f"{path} is empty; give it some text")
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            nul = block.find(b"\0")
            if nul >= 0:
                raise GptlabError(f"{path} looks binary (NUL byte at offset {offset + nul}); give a UTF-8 text file")
            pending = len(decoder.getstate()[0])  # bytes of a character begun in the previous block
            try:
                decoder.decode(block)
            except UnicodeDecodeError as e:
                bad = offset - pending + e.start
                raise GptlabError(
                    f"{path} is not valid UTF-8 (bad byte at offset {bad}); convert it to UTF-8 "
                    "(e.g. `iconv -f latin1 -t utf-8`)"
                ) from None
            offset += len(block)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            start = offset - len(decoder.getstate()[0])
            raise GptlabError(f"{path} is not valid UTF-8 (it ends inside a character at offset {start}); convert it to UTF-8") from None


def _char_boundary(path: Path, cut: int) -> int:
    """Move a byte offset forward to the start of a UTF-8 character."""
    with open(path, "rb") as f:
        f.seek(cut)
        tail = f.read(4)
    for i, byte in enumerate(tail):
        if byte & 0xC0 != 0x80:
            return cut + i
    return cut + len(tail)


def iter_text(path: Path, start: int, end: int, chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """Text of bytes [start, end) of `path` in chunks that end at a line end where possible."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry = ""
    with open(path, "rb") as f:
        f.seek(start)
        remaining = end - start
        while remaining > 0:
            block = f.read(min(chunk_bytes, remaining))
            if not block:
                break
            remaining -= len(block)
            text = carry + decoder.decode(block, final=remaining == 0)
            cut = text.rfind("\n") + 1
            if cut == 0 or remaining == 0:
                cut = len(text)
            carry = text[cut:]
            if cut:
                yield text[:cut]
    if carry:
        yield carry


@dataclass
class Segment:
    """A byte range of one source file that belongs to one split."""

    path: Path
    start: int
    end: int


def plan_split(files: list[Path], val_fraction: float) -> tuple[list[Segment], list[Segment]]:
    """Train and val byte ranges: the last `val_fraction` of all bytes, cut at a character boundary."""
    sizes = [p.stat().st_size for p in files]
    total = sum(sizes)
    cut = int(total * (1.0 - val_fraction))
    train, val = [], []
    offset = 0
    for path, size in zip(files, sizes):
        if offset + size <= cut:
            train.append(Segment(path, 0, size))
        elif offset >= cut:
            val.append(Segment(path, 0, size))
        else:
            local = _char_boundary(path, cut - offset)
            if local > 0:
                train.append(Segment(path, 0, local))
            if local < size:
                val.append(Segment(path, local, size))
        offset += size
    return train, val


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _encode_chunk(tokenizer: Tokenizer, text: str) -> np.ndarray:
    if isinstance(tokenizer, CharTokenizer):
        # Vectorised lookup: code points -> sorted vocabulary index (10x faster than a dict per char).
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        return np.searchsorted(tokenizer.codepoints, codes)
    if isinstance(tokenizer, (GPT2Tokenizer, BPETokenizer)):
        pieces = _split_pieces(text, 1 << 16)
        return np.fromiter((i for ids in tokenizer.encode_batch(pieces) for i in ids), dtype=np.int64)
    return np.asarray(tokenizer.encode(text), dtype=np.int64)


def _split_pieces(text: str, size: int) -> list[str]:
    """Cut text into pieces of about `size` characters at line ends, for batch encoding."""
    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + size)
        if end < len(text):
            nl = text.rfind("\n", start, end)
            end = nl + 1 if nl > start else end
        pieces.append(text[start:end])
        start = end
    return pieces


def _write_tokens(
    tokenizer: Tokenizer, segments: list[Segment], path: Path, dtype: np.dtype, progress: Any = None
) -> int:
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    try:
        with open(tmp, "wb") as f:
            for n, seg in enumerate(segments):
                for chunk in iter_text(seg.path, seg.start, seg.end):
                    ids = _encode_chunk(tokenizer, chunk).astype(dtype)
                    f.write(ids.tobytes())
                    count += len(ids)
                    if progress is not None:
                        progress(len(chunk.encode("utf-8")))
                if tokenizer.eot_id is not None and n < len(segments) - 1 and seg.end == seg.path.stat().st_size:
                    f.write(np.array([tokenizer.eot_id], dtype=dtype).tobytes())
                    count += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise GptlabError(f"could not write {path} ({e.strerror or e}); free disk space or choose another --out") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


def build_tokenizer(spec: str, train_segments: list[Segment], all_segments: list[Segment]) -> Tokenizer:
    """Make the tokenizer a --tokenizer spec asks for, learning from the text where it must."""
    kind, n = parse_spec(spec)
    if kind == "gpt2":
        return GPT2Tokenizer.build()
    if kind == "char":
        return CharTokenizer.from_texts(chunk for s in all_segments for chunk in iter_text(s.path, s.start, s.end))
    return BPETokenizer.train((c for s in train_segments for c in iter_text(s.path, s.start, s.end)), n)


def default_data_dir(name: str, spec: str) -> Path:
    """data/<name>-<tokenizer>, e.g. data/shakespeare-char or data/book-bpe4096."""
    return Path("data") / f"{name}-{spec.replace(':', '')}"


def prepare(
    inputs: list[str],
    tokenizer: str = "char",
    out: str | Path | None = None,
    val_fraction: float = 0.1,
    log: Any = print,
) -> Path:
    """Tokenize text into `out` (train.bin, val.bin, meta.json, tokenizer files); returns `out`."""
    parse_spec(tokenizer)
    if not 0.0 < val_fraction < 1.0:
        raise GptlabError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    name, files = resolve_inputs(inputs)
    for path in files:
        check_text_file(path)
    out = Path(out) if out else default_data_dir(name, tokenizer)
    if out.exists() and not out.is_dir():
        raise GptlabError(f"{out} exists and is not a folder; choose another --out")
    train_segs, val_segs = plan_split(files, val_fraction)
    if not train_segs or not val_segs:
        raise GptlabError("the text is too short to split into train and val; give more text")
    out.mkdir(parents=True, exist_ok=True)
    total_bytes = sum(p.stat().st_size for p in files)
    t0 = time.time()
    log(f"preparing {total_bytes:,} bytes from {len(files)} file(s) with the {tokenizer} tokenizer -> {out}")
    tok = build_tokenizer(tokenizer, train_segs, train_segs + val_segs)
    dtype = token_dtype(tok.vocab_size)
    progress = _progress_bar(total_bytes)
    try:
        n_train = _write_tokens(tok, train_segs, out / "train.bin", dtype, progress.update if progress else None)
        n_val = _write_tokens(tok, val_segs, out / "val.bin", dtype, progress.update if progress else None)
    finally:
        if progress is not None:
            progress.close()
    tok.save(out)
    meta = {
        "format": 1,
        "name": name,
        "tokenizer": tokenizer,
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "dtype": dtype.name,
        "train_tokens": n_train,
        "val_tokens": n_val,
        "val_fraction": val_fraction,
        "bytes": total_bytes,
        "sources": [{"path": str(p.resolve()), "bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files],
    }
    _write_json(out / META, meta)
    seconds = time.time() - t0
    log(f"  {n_train:,} train + {n_val:,} val tokens, vocab {tok.vocab_size:,}, {dtype.name}, "
        f"{total_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s")
    return out


def _progress_bar(total_bytes: int) -> Any:
    import sys

    if not sys.stderr.isatty() or total_bytes < 64 << 20:
        return None
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="tokenizing")


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def matches_sources(data_dir: Path, inputs: list[str], tokenizer: str, val_fraction: float) -> bool:
    """Whether `data_dir` already holds these inputs prepared the same way (so it can be reused)."""
    try:
        meta = read_meta(data_dir)
        _, files = resolve_inputs(inputs)
    except GptlabError:
        return False
    if meta.get("tokenizer") != tokenizer or meta.get("val_fraction") != val_fraction:
        return False
    known = [(s["path"], s["bytes"], s["sha256"]) for s in meta.get("sources", [])]
    return known == [(str(p.resolve()), p.stat().st_size, _sha256(p)) for p in files]


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    """The meta.json of a prepared data folder, with a clear error when it is not one."""
    data_dir = Path(data_dir)
    path = data_dir / META
    if not data_dir.is_dir():
        raise GptlabError(f"data folder {data_dir} not found; make it with `gptlab prepare <text> --out {data_dir}`")
    if not path.is_file():
        raise GptlabError(f"{data_dir} has no meta.json, so it is not a prepared data folder; run `gptlab prepare` on your text first")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        meta["train_tokens"], meta["val_tokens"], meta["dtype"]  # noqa: B018 - presence check
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise GptlabError(f"{path} is corrupt; re-run `gptlab prepare`") from None
    return meta


def load_tokens(data_dir: str | Path, split: str) -> np.memmap:
    """The token ids of one split, memory-mapped read-only."""
    meta = read_meta(data_dir)
    path = Path(data_dir) / f"{split}.bin"
    dtype = np.dtype(meta["dtype"])
    expected = meta[f"{split}_tokens"] * dtype.itemsize
    if not path.is_file() or path.stat().st_size != expected:
        raise GptlabError(f"{path} is missing or truncated (expected {expected:,} bytes); re-run `gptlab prepare`")
    if expected == 0:
        return np.zeros(0, dtype=dtype)  # type: ignore[return-value]
    return np.memmap(path, dtype=dtype, mode="r")


def load_data_tokenizer(data_dir: str | Path) -> Tokenizer:
    """The tokenizer saved beside the token files."""
    return load_tokenizer(data_dir)


def _windows(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + np.arange(block_size + 1)[None, :]  # (B, T+1)
    batch = torch.from_numpy(tokens[idx].astype(np.int64))
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


def check_enough_tokens(tokens: np.ndarray, block_size: int, split: str) -> None:
    """Raise if a split cannot fill one context window plus the next-token target."""
    if len(tokens) < block_size + 1:
        raise GptlabError(
            f"the {split} split has {len(tokens):,} tokens but one context window needs {block_size + 1}; "
            "use more text, a smaller --block-size"
            + (" or a larger --val-fraction" if split == "val" else "")
        )


class RandomBatches:
    """Windows at uniformly random positions (nanoGPT's get_batch), from a seeded generator."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int) -> None:
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.windows_served = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (inputs, targets) pair, each (batch_size, block_size) int64."""
        high = len(self.tokens) - self.block_size
        starts = torch.randint(high, (self.batch_size,), generator=self.generator).numpy()
        self.windows_served += self.batch_size
        return _windows(self.tokens, starts, self.block_size)

    def epoch(self) -> float:
        """Passes over the split so far, counted in tokens."""
        return self.windows_served * self.block_size / max(1, len(self.tokens))

    def state_dict(self) -> dict[str, Any]:
        """Position in the stream, for exact resume."""
        return {"kind": "random", "rng": self.generator.get_state(), "windows_served": self.windows_served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position."""
        self.generator.set_state(state["rng"])
        self.windows_served = int(state["windows_served"])


class SlidingBatches:
    """Every window at a fixed stride, shuffled once per epoch (LLMs-from-scratch's GPTDatasetV1)."""

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int, stride: int = 0) -> None:
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.stride = stride or block_size
        self.starts = np.arange(0, len(tokens) - block_size, self.stride, dtype=np.int64)
        self.seed = seed
        self.epoch_index, self.cursor = 0, 0
        self.order = self._order(0)

    def _order(self, epoch: int) -> np.ndarray:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return self.starts[torch.randperm(len(self.starts), generator=g).numpy()]

    def windows_per_epoch(self) -> int:
        """How many windows one epoch holds."""
        return len(self.starts)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (inputs, targets) pair; an epoch boundary inside a batch rolls into the next."""
        picked = []
        need = self.batch_size
        while need:
            take = self.order[self.cursor : self.cursor + need]
            picked.append(take)
            need -= len(take)
            self.cursor += len(take)
            if self.cursor >= len(self.order):
                self.epoch_index += 1
                self.cursor = 0
                self.order = self._order(self.epoch_index)
        return _windows(self.tokens, np.concatenate(picked), self.block_size)

    def epoch(self) -> float:
        """Passes over the split so far."""
        return self.epoch_index + self.cursor / max(1, len(self.order))

    def state_dict(self) -> dict[str, Any]:
        """Position in the stream, for exact resume."""
        return {"kind": "sliding", "epoch": self.epoch_index, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position."""
        self.epoch_index, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.order = self._order(self.epoch_index)
