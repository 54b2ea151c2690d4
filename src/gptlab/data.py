"""Text -> token files on disk (memory-mapped) -> batches.

Design choices:
- Input is one UTF-8 file, several files, a folder of `.txt` files (recursively, sorted), or a named
  dataset (`shakespeare`) fetched once into a checksum-verified cache.
- The train/val split is by position: the last `val_fraction` of the bytes (cut at a character
  boundary) is validation, so no validation text leaks into training. With several files the cut
  falls in whichever file holds that byte.
- Text is never held whole: it is cut into tasks of ~4 MB at places no token crosses (see
  `safe_cut`), so the pieces tokenize exactly as the whole text would. Worker processes tokenize
  the tasks, at most two each in flight, and the tokens are appended in order to `train.bin` /
  `val.bin` (uint16 when the vocabulary fits, else uint32): memory stays bounded whatever the size.
- torch is imported only where batches are made, so the worker processes start without it.
- Files are separated by the end-of-text token when the tokenizer has one. A part of the text that
  continues a file is encoded as a continuation (`encode_array(continues=True)`), so a tokenizer that
  marks the start of a text (SentencePiece's "▁") marks each file once, as it would the whole.
- `prepare` takes a --tokenizer spec to build, or a tokenizer already made (`--tokenizer-from`: the
  caller reads the folder); meta.json then records the folder it came from.
- No tokenizer kind is known here by name: a kind's class says what it learns from (nothing, the
  characters or the training text: `TaskCorpus` hands over what it asks for), what prepare shows meanwhile,
  and above what input size worker processes pay off; the workers call its `encode_array`.
- Batches come from `RandomBatches` (random windows, as nanoGPT) or `SlidingBatches` (every window
  at a stride, shuffled once per epoch, as LLMs-from-scratch's GPTDatasetV1). Both keep their
  position in a `state_dict`, so a resumed run continues the same stream.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import os
import re
import signal
import time
import urllib.request
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from gptlab.errors import GptlabError
from gptlab.folders import check_writes_kind
from gptlab.fsutil import (
    atomic_write_bytes,
    cause,
    check_writable_folder,
    file_digest,
    gptlab_home,
    read_json_object,
    write_json,
)
from gptlab.tokenizer import Tokenizer, load_tokenizer, tokenizer_kind

if TYPE_CHECKING:
    import torch

CHUNK_BYTES = 4 << 20  # text read per block, and per task of a worker process
SCAN_BYTES = 64 << 10  # looked at a time when searching for a safe cut
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


def fetch_named_dataset(name: str) -> Path:
    """Path to a named dataset's verified text: mirror folder, then cache, then download."""
    spec = NAMED_DATASETS[name]
    mirror = os.environ.get("GPTLAB_DATA_MIRROR")
    if mirror:
        candidate = Path(mirror) / spec["filename"]
        if candidate.is_file() and file_digest(candidate, "md5") == spec["md5"]:
            return candidate
    cached = gptlab_home() / "datasets" / spec["filename"]
    if cached.is_file() and file_digest(cached, "md5") == spec["md5"]:
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
    if file_digest(tmp, "md5") != spec["md5"]:
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
        if item in STDIN:
            files.append(stdin_copy())
        elif not path.exists() and item in NAMED_DATASETS:
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
    if first in STDIN:
        return "stdin", files
    name = first if first in NAMED_DATASETS and not Path(first).exists() else Path(first).expanduser().resolve().stem
    return name, files


STDIN = ("-", "/dev/stdin")
_stdin: list[Path] = []  # standard input can be read once: its copy, once made


def stdin_copy() -> Path:
    """Standard input saved to a file (prepare reads its text several times, by byte ranges)."""
    import sys

    if not _stdin:
        if sys.stdin is None or sys.stdin.isatty():
            raise GptlabError("`-` reads the text from standard input, but nothing is piped in; "
                              "use `cat my.txt | gptlab prepare -` or give the file's name")
        path = gptlab_home() / "stdin" / "stdin.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = sys.stdin.buffer.read()
        if not data:
            raise GptlabError("standard input is empty; pipe some text in (`cat my.txt | gptlab prepare -`)")
        atomic_write_bytes(path, data)
        _stdin.append(path)
    return _stdin[0]


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
    """Move a byte offset forward to the start of a UTF-8 character, and past the LF of a CRLF it would split."""
    with open(path, "rb") as f:
        f.seek(max(0, cut - 1))
        if cut > 0 and f.read(2) == b"\r\n":  # a line end stays whole, so it normalises as one
            return cut + 1
        f.seek(cut)
        tail = f.read(4)
    for i, byte in enumerate(tail):
        if byte & 0xC0 != 0x80:
            return cut + i
    return cut + len(tail)


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


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# --------------------------------------------------------------------------------------------------
# Cutting text where no token crosses, and tokenizing the pieces in worker processes

Piece = tuple[str, int, int, bool]  # path, start byte, end byte, whether it ends a file (not the split's last)
Task = list[Piece]  # about CHUNK_BYTES of text, the unit of work of one worker process
CUT_BEFORE = "\n "  # where a cut may fall (after a non-space) unless the tokenizer's kind says otherwise


@functools.cache
def _cut_patterns(cut_before: str) -> tuple[re.Pattern[bytes], re.Pattern[str]]:
    """The places to cut in bytes, and the same places in decoded text (re's \\s is str.isspace)."""
    chars = re.escape(cut_before)
    return re.compile(f"[{chars}]".encode()), re.compile(f"(?<=\\S)[{chars}]")


def _ends_in_space(before: bytes) -> bool:
    """Whether the last character of `before` (its last 4 bytes or fewer) is whitespace or unreadable."""
    i = len(before) - 1
    while i > 0 and before[i] & 0xC0 == 0x80:
        i -= 1
    try:
        return before[i:].decode("utf-8").isspace()  # Python's whitespace includes the regexes' \s
    except UnicodeDecodeError:
        return True


def safe_cut(f: BinaryIO, at: int, end: int, patience: int = CHUNK_BYTES, cut_before: str = CUT_BEFORE) -> int:
    """The first offset from `at` on where cutting the text changes no token.

    That is a newline or space (`cut_before`, the tokenizer kind's) right after a non-whitespace
    character. No pre-token of the GPT-2
    regex (tiktoken's or Hugging Face's byte-level one) spans such a place: a pre-token holding a
    non-space character never runs on into whitespace, and the regexes look ahead only across
    whitespace and never behind. So both sides tokenize exactly as they would inside the whole
    text; char tokens never depend on cuts at all. A model's own tokenizer (the `hf` kind) cuts only
    before a space: Llama 3's regex joins punctuation with the newline after it. Text without such a
    place for `patience` bytes
    (no space or newline at all) is cut at the next character start instead, the one kind of cut
    where BPE tokens may differ from the uncut text's.
    """
    cut_at = _cut_patterns(cut_before)[0]
    pos, stop = at, min(end, at + patience)
    while pos < stop:
        base = max(0, pos - 4)
        f.seek(base)
        window = f.read(min(end, pos + SCAN_BYTES) - base)
        for m in cut_at.finditer(window, pos - base):
            if m.start() > 0 and not _ends_in_space(window[max(0, m.start() - 4) : m.start()]):
                return base + m.start()
        pos = base + len(window)
    f.seek(stop)
    for i, byte in enumerate(f.read(4)):
        if byte & 0xC0 != 0x80:
            return min(end, stop + i)
    return end


def split_text(text: str, size: int = 1 << 16, cut_before: str = CUT_BEFORE) -> Iterator[str]:
    """`text` in parts of about `size` characters, cut where `safe_cut` would cut (so tokens stay the same).

    BPE encoders hold ~100 bytes per token of bookkeeping while they work (Hugging Face's Encoding),
    and the BPE trainer buffers 256 texts at a time: parts this small keep both to megabytes.
    """
    cut_at = _cut_patterns(cut_before)[1]
    start = 0
    while len(text) - start > size:
        m = cut_at.search(text, start + size)
        if m is None:
            break
        yield text[start : m.start()]
        start = m.start()
    yield text[start:]


def plan_tasks(segments: list[Segment], chunk_bytes: int, cut_before: str = CUT_BEFORE) -> list[Task]:
    """A split's text as tasks of about `chunk_bytes`: pieces cut by `safe_cut`, small files grouped."""
    tasks: list[Task] = []
    current: Task = []
    size = 0
    for n, seg in enumerate(segments):
        ends_file = n < len(segments) - 1 and seg.end == seg.path.stat().st_size
        with open(seg.path, "rb") as f:
            start = seg.start
            while start < seg.end:
                room = chunk_bytes - size
                end = seg.end if seg.end - start <= room else safe_cut(f, start + room, seg.end, chunk_bytes, cut_before)
                current.append((str(seg.path), start, end, ends_file and end == seg.end))
                size += end - start
                start = end
                if size >= chunk_bytes:
                    tasks.append(current)
                    current, size = [], 0
    if current:
        tasks.append(current)
    return tasks


def _task_bytes(task: Task) -> int:
    return sum(end - start for _, start, end, _ in task)


def read_piece(piece: Piece, keep_crlf: bool = False) -> str:
    """The text of one piece (its ends are character boundaries), normalised as every input text is.

    A UTF-8 byte-order mark at the start of a file is dropped (it is an encoding mark, not text), and
    Windows line ends (CRLF) become LF unless kept: otherwise every line of a Windows file would end in
    a `\r` token, and a stop string like "\n\n" would never match what the model writes. No cut
    falls between `\r` and `\n` (`safe_cut` cuts only after a non-space), so pieces normalise alike.
    """
    path, start, end, _ = piece
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    if start == 0 and data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    text = data.decode("utf-8")
    return text if keep_crlf else text.replace("\r\n", "\n")


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


_worker: dict[str, Any] = {}  # what a worker process keeps between tasks


def _start_worker(tokenizer: Tokenizer | None, dtype: str | None, keep_crlf: bool = False, child: bool = True) -> None:
    """Set up a worker: its tokenizer, token dtype and line-end policy; Ctrl-C and SIGTERM are the parent's to handle."""
    if child:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if hasattr(signal, "pthread_sigmask"):  # spawned while the parent held them (see _signals_held)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    _worker.clear()
    _worker.update(tokenizer=tokenizer, dtype=dtype, keep_crlf=keep_crlf)


def _chars_in(task: Task) -> tuple[np.ndarray, int]:
    """The distinct code points of a task's text, and its size in bytes."""
    seen = [np.flatnonzero(np.bincount(_code_points(read_piece(piece, _worker['keep_crlf'])))) for piece in task]
    return np.unique(np.concatenate(seen)), _task_bytes(task)


def _tokens_of(task: Task) -> tuple[np.ndarray, int]:
    """A task's token ids (with end-of-text, if the tokenizer has it, between files), and its size in bytes."""
    tokenizer, dtype = _worker["tokenizer"], _worker["dtype"]
    parts = []
    for piece in task:
        text = read_piece(piece, _worker["keep_crlf"])
        for n, part in enumerate(split_text(text, cut_before=tokenizer.cut_before)):
            parts.append(tokenizer.encode_array(part, continues=n > 0 or piece[1] > 0).astype(dtype))
        if piece[3] and tokenizer.eot_id is not None:
            parts.append(np.array([tokenizer.eot_id], dtype=dtype))
    return np.concatenate(parts), _task_bytes(task)


def default_workers() -> int:
    """Worker processes for prepare: the CPU cores this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def _in_order(fn: Any, tasks: list[Task], workers: int, tokenizer: Tokenizer | None = None,
              dtype: str | None = None, keep_crlf: bool = False) -> Iterator[Any]:
    """fn(task) for every task, in order, from `workers` processes (or this one when it is 1).

    At most two tasks per worker are in flight, so memory stays bounded however many tasks there
    are. Workers are spawned, not forked: the parent may hold torch or tokenizer threads.
    """
    if workers <= 1:
        _start_worker(tokenizer, dtype, keep_crlf, child=False)
        yield from map(fn, tasks)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(tokenizer, dtype, keep_crlf))
    pending: deque = deque()
    try:
        for n, task in enumerate(tasks):
            # A worker is spawned by a submit, which writes its start-up data down a pipe: a signal
            # mid-write would leave it half-started, printing a traceback of its own. So signals wait.
            with _signals_held() if n < workers else contextlib.nullcontext():
                pending.append(pool.submit(fn, task))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM delivered on the way out instead of inside (the main thread on POSIX; elsewhere a no-op)."""
    held = {signal.SIGINT, signal.SIGTERM}
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _write_splits(tokenizer: Tokenizer, dtype: np.dtype, tasks: dict[str, list[Task]], out: Path, workers: int,
                  progress: Any, keep_crlf: bool = False) -> dict[str, int]:
    """Tokenize each split's tasks into out/<split>.bin (written to a temporary name, then renamed)."""
    counts: dict[str, int] = {}
    everything = [task for split_tasks in tasks.values() for task in split_tasks]
    with contextlib.closing(_in_order(_tokens_of, everything, workers, tokenizer, dtype.name, keep_crlf)) as results:
        for split, split_tasks in tasks.items():
            path = out / f"{split}.bin"
            tmp = path.with_name(path.name + ".tmp")
            counts[split] = 0
            try:
                with open(tmp, "wb") as f:
                    for _ in split_tasks:
                        ids, size = next(results)
                        f.write(ids.tobytes())
                        counts[split] += len(ids)
                        progress(size)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise GptlabError(f"could not write {path}: {cause(e, path)}") from None
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    return counts


@dataclass
class TaskCorpus:
    """The prepared text as a tokenizer kind asks for it (see `tokenizer.Corpus`), reporting bytes read to `progress`."""

    train_tasks: list[Task]
    all_tasks: list[Task]
    workers: int = 1
    progress: Any = None
    keep_crlf: bool = False

    def chars(self) -> list[str]:
        """Every distinct character of the whole text, counted by the worker processes."""
        seen = []
        with contextlib.closing(_in_order(_chars_in, self.all_tasks, self.workers, keep_crlf=self.keep_crlf)) as results:
            for chars, size in results:
                seen.append(chars)
                if self.progress is not None:
                    self.progress(size)
        return [chr(c) for c in np.unique(np.concatenate(seen))]

    def texts(self) -> Iterator[str]:
        """The training text in parts that tokenize as the whole would (see `split_text`)."""
        for task in self.train_tasks:
            for piece in task:
                yield from split_text(read_piece(piece, self.keep_crlf))
                if self.progress is not None:
                    self.progress(piece[2] - piece[1])


def build_tokenizer(spec: str | Tokenizer, train_tasks: list[Task], all_tasks: list[Task], workers: int = 1,
                    progress: Any = None, keep_crlf: bool = False) -> Tokenizer:
    """Make the tokenizer a --tokenizer spec asks for, learning from the text where its kind must; one made is kept."""
    if not isinstance(spec, str):
        return spec
    kind, size = tokenizer_kind(spec)
    return kind.from_corpus(size, TaskCorpus(train_tasks, all_tasks, workers, progress, keep_crlf))


def default_data_dir(name: str, spec: str) -> Path:
    """data/<name>-<tokenizer>, e.g. data/shakespeare-char or data/book-bpe4096."""
    return Path("data") / f"{name}-{spec.replace(':', '')}"


def tokenizer_label(tokenizer: str | Tokenizer, tokenizer_from: str | Path = "") -> str:
    """What names the tokenizer in a default data folder and in messages: the spec, or the folder it came from."""
    if isinstance(tokenizer, str):
        return tokenizer
    return Path(tokenizer_from).resolve().name if tokenizer_from else tokenizer.spec


def prepare(
    inputs: list[str],
    tokenizer: str | Tokenizer = "char",
    out: str | Path | None = None,
    val_fraction: float = 0.1,
    log: Any = print,
    workers: int = 0,
    keep_crlf: bool = False,
    tokenizer_from: str | Path = "",
) -> Path:
    """Tokenize text into `out` (train.bin, val.bin, meta.json, tokenizer files); returns `out`.

    `tokenizer` is a --tokenizer spec, or a tokenizer already made, e.g. `hf.tokenizers.tokenizer_of(DIR)`
    with DIR as `tokenizer_from`. `workers` processes tokenize (0: one per core up to 8 for inputs
    over the kind's `parallel_bytes`, else this one).
    """
    kind = tokenizer_kind(tokenizer)[0] if isinstance(tokenizer, str) else type(tokenizer)
    label = tokenizer_label(tokenizer, tokenizer_from)
    if not 0.0 < val_fraction < 1.0:
        raise GptlabError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if workers < 0:
        raise GptlabError(f"--workers must be zero (automatic) or positive, got {workers}")
    name, files = resolve_inputs(inputs)
    for path in files:
        check_text_file(path)
    out = Path(out) if out else default_data_dir(name, label)
    if out.exists() and not out.is_dir():
        raise GptlabError(f"{out} exists and is not a folder; choose another --out")
    check_writes_kind(out, "data")
    train_segs, val_segs = plan_split(files, val_fraction)
    if not train_segs or not val_segs:
        raise GptlabError("the text is too short to split into train and val; give more text")
    check_writable_folder(out)
    total_bytes = sum(p.stat().st_size for p in files)
    workers = workers or (default_workers() if total_bytes > kind.parallel_bytes else 1)
    t0 = time.time()
    log(f"preparing {total_bytes:,} bytes from {len(files)} file(s) with the {label} tokenizer -> {out}"
        f"{f' ({workers} processes)' if workers > 1 else ''}")
    tasks = {split: plan_tasks(segs, CHUNK_BYTES, kind.cut_before) for split, segs in (("train", train_segs), ("val", val_segs))}
    learning = kind.learning if isinstance(tokenizer, str) else None
    with _progress_bar(total_bytes, learning or "", enabled=learning is not None) as bar:
        tok = build_tokenizer(tokenizer, tasks["train"], tasks["train"] + tasks["val"], workers, bar.update, keep_crlf)
    dtype = token_dtype(tok.vocab_size)
    with _progress_bar(total_bytes, "tokenizing") as bar:
        counts = _write_splits(tok, dtype, tasks, out, workers, bar.update, keep_crlf)
    n_train, n_val = counts["train"], counts["val"]
    tok.save(out)
    meta = {
        "format": 1,
        "name": name,
        "tokenizer": tokenizer if isinstance(tokenizer, str) else tok.spec,
        **({"tokenizer_from": str(Path(tokenizer_from).resolve())} if tokenizer_from else {}),
        "vocab_size": tok.vocab_size,
        "eot_id": tok.eot_id,
        "dtype": dtype.name,
        "train_tokens": n_train,
        "val_tokens": n_val,
        "val_fraction": val_fraction,
        "line_ends": "kept" if keep_crlf else "lf",
        "bytes": total_bytes,
        "sources": [{"path": str(p.resolve()), "bytes": p.stat().st_size, "sha256": file_digest(p)} for p in files],
    }
    write_json(out / META, meta)
    seconds = time.time() - t0
    log(f"  {n_train:,} train + {n_val:,} val tokens, vocab {tok.vocab_size:,}, {dtype.name}, "
        f"{total_bytes / 1e6 / max(seconds, 1e-9):.1f} MB/s")
    return out


@contextlib.contextmanager
def _progress_bar(total_bytes: int, desc: str, enabled: bool = True) -> Iterator[Any]:
    """A tqdm bar in MB/s on a terminal for inputs of 64 MB or more; otherwise an object that ignores updates."""
    import sys

    if not enabled or not sys.stderr.isatty() or total_bytes < 64 << 20:
        yield SimpleNamespace(update=lambda n: None)
        return
    from tqdm import tqdm

    with tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc=desc, file=sys.stderr) as bar:
        yield bar


def matches_sources(data_dir: Path, inputs: list[str], tokenizer: str | Tokenizer, val_fraction: float) -> bool:
    """Whether `data_dir` already holds these inputs prepared the same way (so it can be reused).

    A tokenizer already made (not a spec) matches when the saved one gives the same ids and the same end-of-text.
    """
    try:
        meta = read_meta(data_dir)
        _, files = resolve_inputs(inputs)
        if not isinstance(tokenizer, str):
            saved = load_tokenizer(data_dir)
            if not (saved.same_as(tokenizer) and saved.eot_id == tokenizer.eot_id):
                return False
    except GptlabError:
        return False
    spec = tokenizer if isinstance(tokenizer, str) else tokenizer.spec
    if meta.get("tokenizer") != spec or meta.get("val_fraction") != val_fraction \
            or meta.get("line_ends", "kept") != "lf":
        return False
    known = [(s["path"], s["bytes"], s["sha256"]) for s in meta.get("sources", [])]
    return known == [(str(p.resolve()), p.stat().st_size, file_digest(p)) for p in files]


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    """The meta.json of a prepared data folder, with a clear error when it is not one."""
    data_dir = Path(data_dir)
    path = data_dir / META
    if not data_dir.is_dir():
        raise GptlabError(f"data folder {data_dir} not found; make it with `gptlab prepare <text> --out {data_dir}`")
    if not path.is_file():
        raise GptlabError(f"{data_dir} has no meta.json, so it is not a prepared data folder; run `gptlab prepare` on your text first")
    meta = read_json_object(path, f"{path} not found", "re-run `gptlab prepare`")
    if not all(key in meta for key in ("train_tokens", "val_tokens", "dtype")):
        raise GptlabError(f"{path} is corrupt; re-run `gptlab prepare`")
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


def _windows(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

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
    """Windows at uniformly random positions (nanoGPT's get_batch), from a seeded generator.

    With several processes, every rank draws the same global batch of `batch_size * world_size`
    positions from the shared seed and keeps rows [rank * batch_size, (rank + 1) * batch_size).
    The ranks together thus see exactly the windows one process with `batch_size * world_size`
    would, in the same order (so the two runs match to float rounding), and the stream's state is
    the same on every rank.
    """

    def __init__(
        self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        import torch

        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.windows_served = 0  # over all ranks

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (inputs, targets) pair, each (batch_size, block_size) int64."""
        import torch

        high = len(self.tokens) - self.block_size
        starts = torch.randint(high, (self.batch_size * self.world_size,), generator=self.generator).numpy()
        self.windows_served += len(starts)
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return _windows(self.tokens, mine, self.block_size)

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
    """Every window at a fixed stride, shuffled once per epoch (LLMs-from-scratch's GPTDatasetV1).

    With several processes, each rank keeps its slice of every global batch, as `RandomBatches` does.
    """

    def __init__(
        self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int, stride: int = 0,
        rank: int = 0, world_size: int = 1,
    ) -> None:
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.rank, self.world_size = rank, world_size
        self.stride = stride or block_size
        self.starts = np.arange(0, len(tokens) - block_size, self.stride, dtype=np.int64)
        self.seed = seed
        self.epoch_index, self.cursor = 0, 0
        self.order = self._order(0)

    def _order(self, epoch: int) -> np.ndarray:
        import torch

        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return self.starts[torch.randperm(len(self.starts), generator=g).numpy()]

    def windows_per_epoch(self) -> int:
        """How many windows one epoch holds."""
        return len(self.starts)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (inputs, targets) pair; an epoch boundary inside a batch rolls into the next."""
        picked = []
        need = self.batch_size * self.world_size
        while need:
            take = self.order[self.cursor : self.cursor + need]
            picked.append(take)
            need -= len(take)
            self.cursor += len(take)
            if self.cursor >= len(self.order):
                self.epoch_index += 1
                self.cursor = 0
                self.order = self._order(self.epoch_index)
        mine = np.concatenate(picked)[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return _windows(self.tokens, mine, self.block_size)

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
