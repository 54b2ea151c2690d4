"""The app's folders (uploads, prepared data, runs) and everything that turns browser input into files.

Design choices:
- The security rule: no name or path typed in the browser reaches the file system outside the app's
  folders. An uploaded file's name is only ever a source for a new, safe name (`safe_stem`);
  every other name from the browser goes through `Workspace.resolve`, which accepts one path
  component of safe characters naming something that exists directly in its folder, symlinks
  followed and checked.
- Uploads are checked as `gptlab prepare` checks a text file (not empty, no NUL byte, UTF-8) before
  anything is written, then written to a temporary file and hard-linked into place: a link fails
  when the name exists, so two uploads of the same name at once never overwrite each other.
- Text statistics read the uploads as prepare reads them (byte-order mark dropped, CRLF as LF,
  several files joined, with end-of-text between them for tokenizers that have one), so the counts
  shown are the counts prepare will make.
- Deleting removes only what gptlab writes: a run folder loses its run files, lock, job record,
  log and experiment-log folders; anything else stays, and the user is told what stayed.
- No gradio, fastapi or torch here: the page, the API and the tests all use this module as is.
"""

from __future__ import annotations

import functools
import math
import os
import re
import shutil
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptlab import data, rundir
from gptlab.errors import GptlabError
from gptlab.folders import folder_kind
from gptlab.fsutil import cause, check_writable_folder, fsync_dir, read_json_object
from gptlab.tokenizer import ENDOFTEXT, GPT2Tokenizer, parse_spec
from gptlab.ui.jobs import JOB, LOG, job_status, read_job

UPLOADS = "uploads"
KIND_LABELS = {"upload": "upload", "data": "data folder", "run": "run"}
EXPERIMENT_LOG_FOLDERS = ("tensorboard", "wandb")
# Everything gptlab writes directly in a run folder; nothing else there is ever deleted.
RUN_FOLDER_FILES = (*rundir.RUN_FILES, rundir.TEMPERATURE_PLOT, rundir.LOCK, JOB, LOG)
MAX_NAME = 80  # characters of a stored name, suffix included
SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")
PREVIEW_CHARS = 1000
EXACT_TOKEN_BYTES = 4 << 20  # GPT-2 encodes ~5 MB/s: above this a prefix is counted and scaled ("about")
SAMPLE_BYTES = 2 << 20
SHOWN_NAMES = 8  # names listed in a "not found" message before "and N more"


@dataclass
class Upload:
    """A stored upload: its name inside uploads/, its path, and its size."""

    name: str
    path: Path
    bytes: int
    chars: int


def shown(name: str) -> str:
    """A name from the browser as an error message may quote it: one line, not too long."""
    return repr(name if len(name) <= 60 else name[:57] + "...")


def safe_name(text: str, fallback: str) -> str:
    """`text` as letters, digits, '.', '_' and '-' only, not starting with a dot, short enough to number.

    Accents come off letters that have an ASCII base (café -> cafe); any other run of characters
    outside the safe set becomes one "_". It starts with a letter or digit: no hidden files, no "." or "..".
    """
    plain = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", plain)
    name = re.sub(r"^[._-]+", "", name).rstrip("_")  # a leading "-" would read as an option on a command line
    return name[: MAX_NAME - 10] or fallback  # room for ".txt" and a "-NNNN" that makes it unique


def safe_stem(name: str, fallback: str = "text") -> str:
    """The last path component of `name` (cut at / or \\), without its extension, as a safe name."""
    base = re.split(r"[/\\]", name)[-1]
    base = re.sub(r"\.[A-Za-z0-9]{1,8}$", "", base)  # every upload is stored as .txt
    return safe_name(base, fallback)


def numbered(stem: str, n: int, suffix: str = "") -> str:
    """`stem` + `suffix` for the first try, `stem-N` + `suffix` after."""
    return f"{stem}{suffix}" if n == 1 else f"{stem}-{n}{suffix}"


def check_text(label: str, content: bytes, limit: int) -> str:
    """The text of an upload, or a one-line error naming `label` and the fix."""
    if not content:
        raise GptlabError(f"{label} is empty; choose a file with some text in it")
    if len(content) > limit:
        raise GptlabError(f"{label} is {len(content) / 1e6:.1f} MB, over the {limit / 1e6:g} MB upload limit; "
                          "upload a smaller file, or start `gptlab ui` with a larger --max-upload-mb")
    nul = content.find(b"\0")
    if nul >= 0:
        raise GptlabError(f"{label} looks binary (NUL byte at offset {nul}); upload a UTF-8 text file")
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GptlabError(f"{label} is not valid UTF-8 (bad byte at offset {e.start}); convert it to UTF-8 "
                          "(e.g. `iconv -f latin1 -t utf-8`) and upload it again") from None
    if not text.strip():
        raise GptlabError(f"{label} holds only whitespace; give it some text")
    return text


def prepared_text(path: Path) -> str:
    """A text file as `gptlab prepare` reads it: byte-order mark dropped, Windows line ends as LF."""
    return data.read_piece((str(path), 0, path.stat().st_size, False))


@functools.cache
def gpt2_tokenizer() -> GPT2Tokenizer:
    """GPT-2's tokenizer, built once per process (building it takes about a second)."""
    return GPT2Tokenizer.build()


def gpt2_count(texts: list[str]) -> tuple[int, bool]:
    """GPT-2 tokens of `texts` joined by end-of-text, and whether the count is estimated.

    Up to EXACT_TOKEN_BYTES the count is exact; beyond, a prefix of each text (cut at a newline,
    where no token crosses) is counted and scaled by bytes.
    """
    enc = gpt2_tokenizer().enc
    total, estimated = max(0, len(texts) - 1), False
    budget = EXACT_TOKEN_BYTES
    for text in texts:
        size = len(text.encode("utf-8"))
        if size <= budget:
            total += len(enc.encode_ordinary(text))
            budget -= size
            continue
        prefix = sample_prefix(text)
        counted = len(enc.encode_ordinary(prefix))
        total += round(counted * size / max(1, len(prefix.encode("utf-8"))))
        estimated = True
    return total, estimated


def sample_prefix(text: str) -> str:
    """About SAMPLE_BYTES of the start of `text`, ending at a line end when there is one."""
    prefix = text[:SAMPLE_BYTES]
    cut = prefix.rfind("\n")
    return prefix[: cut + 1] if cut > 0 else prefix


def token_entry(count: int | None, about: bool = False, note: str = "") -> dict[str, Any]:
    """One tokenizer's count as the page shows it."""
    shown_count = "" if count is None else f"about {count:,}" if about else f"{count:,}"
    return {"count": count, "about": about, "shown": shown_count or note, "note": note}


def size_on_disk(folder: Path) -> int:
    """Bytes of every file under `folder` (symlinks not followed)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += (Path(root) / name).lstat().st_size
            except OSError:
                continue
    return total


def last_modified(folder: Path) -> float:
    """The newest modification time of `folder` and the files directly in it (0 if it just vanished)."""
    try:
        entries = list(folder.iterdir())
        times = [folder.stat().st_mtime]
    except OSError:  # deleted while the list was made (a queued job taken out of the queue)
        return 0.0
    for path in entries:
        try:
            times.append(path.lstat().st_mtime)
        except OSError:
            continue
    return max(times)


def entries_inside(folder: Path) -> list[Path]:
    """The visible entries of `folder`, sorted, leaving out links that lead out of it (`resolve` refuses those)."""
    found = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not SAFE_NAME.fullmatch(path.name):
            continue  # temporary files, and names the browser could not ask for
        if path.is_symlink() and folder.resolve() not in path.resolve().parents:
            continue
        found.append(path)
    return found


def one_line(error: Exception) -> str:
    """An exception as one line of text."""
    text = str(error) or type(error).__name__
    return " ".join(text.split())


class Workspace:
    """The uploads, prepared data folders and run folders of one `gptlab ui`."""

    def __init__(self, runs_dir: Path, data_dir: Path, max_upload_bytes: int) -> None:
        self.runs_dir = Path(runs_dir).resolve()
        self.data_dir = Path(data_dir).resolve()
        self.uploads_dir = self.data_dir / UPLOADS
        self.max_upload_bytes = max_upload_bytes
        for folder, flag in ((self.runs_dir, "--runs"), (self.uploads_dir, "--data")):
            check_writable_folder(folder, flag)

    # ---- uploads

    def save_upload(self, name: str, content: bytes) -> Upload:
        """Check an uploaded file and store it in uploads/ under a new safe name derived from `name`."""
        name = name if isinstance(name, str) else ""
        text = check_text(f"upload {shown(name)}", content, self.max_upload_bytes)
        stored = self._store(safe_stem(name), content)
        return Upload(stored.name, stored, len(content), len(text))

    def save_text(self, text: str, name: str = "pasted") -> Upload:
        """Store pasted text as an upload."""
        return self.save_upload(name, text.encode("utf-8"))

    def uploads(self) -> list[str]:
        """The stored uploads' names, sorted."""
        return sorted(p.name for p in entries_inside(self.uploads_dir) if p.is_file())

    def delete_upload(self, name: str) -> None:
        """Delete one stored upload."""
        path = self.resolve("upload", name)
        if not path.is_file():
            raise GptlabError(f"upload {shown(name)} is not a file; nothing was deleted")
        path.unlink()

    def _store(self, stem: str, content: bytes) -> Path:
        """Write `content` to a temporary file, then link it to the first free `stem[-N].txt`."""
        tmp = self.uploads_dir / f".upload-{os.getpid()}-{time.monotonic_ns()}.tmp"
        try:
            with open(tmp, "xb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
            for n in range(1, 10_000):
                path = self.uploads_dir / numbered(stem, n, ".txt")
                try:
                    os.link(tmp, path)  # fails if the name is taken: no upload ever replaces another
                except FileExistsError:
                    continue
                fsync_dir(self.uploads_dir)
                return path
            raise GptlabError(f"uploads/ already holds 10,000 files named {stem}; delete some uploads")
        except OSError as e:
            raise GptlabError(f"could not store the upload in {self.uploads_dir}: {cause(e, self.uploads_dir)}") from None
        finally:
            tmp.unlink(missing_ok=True)

    # ---- names from the browser

    def resolve(self, kind: str, name: str) -> Path:
        """The path a name typed in the browser stands for: an existing entry directly inside its folder.

        `kind` is "upload", "data" or "run". Anything but one path component of safe characters, a
        name whose target (symlinks followed) lies outside the folder, or a name that does not
        exist is refused with a one-line error.
        """
        folder = self._folder(kind)
        label = KIND_LABELS[kind]
        if not isinstance(name, str) or not SAFE_NAME.fullmatch(name) or name.startswith("."):
            raise GptlabError(f"{shown(str(name))} is not a valid {label} name; use a name from the list "
                              "(letters, digits, '.', '_' and '-', not starting with '.')")
        path = folder / name
        if (kind == "data" and name == UPLOADS) or not os.path.lexists(path):
            raise GptlabError(f"no {label} named {shown(name)}; choose one of: {self._listing(kind)}")
        real = path.resolve()
        if folder not in real.parents:  # a link out of the folder, or to the folder itself
            raise GptlabError(f"{label} {shown(name)} points outside {folder}; move it into the folder itself")
        if not real.exists():
            raise GptlabError(f"{label} {shown(name)} is a link to nothing; remove it, or choose one of: "
                              f"{self._listing(kind)}")
        return real

    def _folder(self, kind: str) -> Path:
        folders = {"upload": self.uploads_dir, "data": self.data_dir, "run": self.runs_dir}
        if kind not in folders:
            raise GptlabError(f"unknown kind of name {kind!r}; use upload, data or run")
        return folders[kind].resolve()

    def _listing(self, kind: str) -> str:
        folder = self._folder(kind)
        names = self.uploads() if kind == "upload" else [
            p.name for p in entries_inside(folder) if p.is_dir() and p.name != UPLOADS]
        if not names:
            return f"(none yet: there is no {KIND_LABELS[kind]} at all)"
        more = f" and {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else ""
        return ", ".join(names[:SHOWN_NAMES]) + more

    # ---- text statistics

    def text_stats(self, names: list[str]) -> dict[str, Any]:
        """What the chosen uploads hold, read as `gptlab prepare` would read them together.

        bytes (UTF-8 of the text as prepared), chars, distinct chars, lines, a preview, and token
        counts per tokenizer: exact for char and byte; exact for gpt2 up to a few MB (else "about");
        bpe:N learns its vocabulary from the text, so it is counted when prepared.
        """
        if not names:
            raise GptlabError("no upload chosen; pick one or more uploads first")
        texts = [prepared_text(self.resolve("upload", name)) for name in names]
        joined = "".join(texts)  # char and byte have no end-of-text: prepare joins files as they are
        n_bytes = sum(len(t.encode("utf-8")) for t in texts)
        gpt2, about = gpt2_count(texts)
        return {
            "uploads": list(names),
            "bytes": n_bytes,
            "chars": len(joined),
            "distinct_chars": len(set(joined)),
            "lines": sum(t.count("\n") + (not t.endswith("\n")) for t in texts if t),
            "preview": joined[:PREVIEW_CHARS],
            "tokens": {
                "char": token_entry(len(joined)),
                "byte": token_entry(n_bytes),
                "gpt2": token_entry(gpt2, about, f"{ENDOFTEXT} between files" if len(texts) > 1 else ""),
                "bpe:N": token_entry(None, note="counted when prepared (bpe learns its vocabulary from the text)"),
            },
        }

    # ---- prepared data

    def prepare(self, names: list[str], tokenizer: str,
                progress: Callable[[float, str], Any] | None = None) -> Path:
        """Prepare the chosen uploads with `tokenizer` into a new data folder `<stem>-<tokenizer>`; its path."""
        report = progress or (lambda fraction, message: None)
        if not names:
            raise GptlabError("no upload chosen; pick one or more uploads to prepare")
        paths = [self.resolve("upload", name) for name in names]
        if not isinstance(tokenizer, str):
            raise GptlabError("no tokenizer chosen; choose char, byte, gpt2 or bpe:N")
        kind, size = parse_spec(tokenizer)
        tokenizer = f"{kind}:{size}" if size else kind  # bpe:0300 and bpe:300 are one tokenizer
        out = self._new_data_folder(safe_name(f"{paths[0].stem}-{kind}{size or ''}", "data"))
        report(0.0, f"preparing {len(paths)} upload(s) with the {tokenizer} tokenizer into {out.name}")
        try:
            data.prepare([str(p) for p in paths], tokenizer, out=out, log=lambda line: report(0.5, str(line).strip()))
        except BaseException:
            self._remove_partial_data(out)
            raise
        meta = data.read_meta(out)
        report(1.0, f"prepared {out.name}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens")
        return out

    def _new_data_folder(self, wanted: str) -> Path:
        """Create the first free `wanted[-N]` inside data_dir (creating it reserves the name)."""
        for n in range(1, 10_000):
            path = self.data_dir / numbered(wanted, n)
            try:
                path.mkdir()
            except FileExistsError:
                continue
            except OSError as e:
                raise GptlabError(f"could not create {path}: {cause(e, path)}") from None
            return path
        raise GptlabError(f"{self.data_dir} already holds 10,000 folders named {wanted}; delete some")

    @staticmethod
    def _remove_partial_data(out: Path) -> None:
        """After a failed prepare: remove the files prepare writes in `out`, then `out` if it is empty."""
        for path in out.iterdir():
            if path.name in ("train.bin", "val.bin", data.META) or path.suffix == ".tmp" \
                    or path.name in rundir.TOKENIZER_FILES:
                path.unlink(missing_ok=True)
        try:
            out.rmdir()
        except OSError:
            pass

    def data_folders(self) -> list[dict[str, Any]]:
        """Every prepared data folder directly inside data_dir, with what its meta.json says."""
        found = []
        for path in entries_inside(self.data_dir):
            if path.name == UPLOADS or not path.is_dir() or not (path / data.META).is_file():
                continue
            entry: dict[str, Any] = {"name": path.name, "size_bytes": size_on_disk(path)}
            try:
                meta = data.read_meta(path)
                entry.update(tokenizer=meta.get("tokenizer"), vocab_size=meta.get("vocab_size"),
                             train_tokens=meta["train_tokens"], val_tokens=meta["val_tokens"], error=None)
            except GptlabError as e:
                entry.update(tokenizer=None, vocab_size=None, train_tokens=None, val_tokens=None, error=one_line(e))
            found.append(entry)
        return found

    # ---- runs

    def runs(self) -> list[dict[str, Any]]:
        """Every run folder directly inside runs_dir (and folders the job runner has queued), described."""
        return [self._describe_run(path) for path in entries_inside(self.runs_dir)
                if path.is_dir() and (folder_kind(path) == "run" or (path / JOB).is_file())]

    def _describe_run(self, path: Path) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": path.name, "data": None, "tokenizer": None, "params": None, "steps": 0,
                                 "best_val_loss": None, "elapsed_sec": 0.0, "status": "broken", "error": None,
                                 "modified": last_modified(path)}
        try:
            if folder_kind(path) != "run":
                entry.update(self._job_only(path))
                return entry
            model_cfg, train_cfg, tokenizer = rundir.read_run_config(path)
            rows = rundir.read_metrics(path)
            vals = [v for r in rows if (v := r.get("val_loss")) is not None and not math.isnan(v)]
            entry.update(data=train_cfg.data, tokenizer=tokenizer.get("type"), params=model_cfg.num_params(),
                         steps=int(rows[-1]["step"]) if rows else 0, best_val_loss=min(vals) if vals else None,
                         elapsed_sec=rows[-1].get("elapsed_sec", 0.0) if rows else 0.0,
                         status=self._status(path))
        except (GptlabError, OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            entry.update(status="broken", error=one_line(e))
        return entry

    def _job_only(self, path: Path) -> dict[str, Any]:
        """A folder with a job record and no run yet: queued, starting, or failed before it began."""
        job = read_json_object(path / JOB, f"{path / JOB} not found", "delete the run and start it again")
        args = job.get("args") if isinstance(job.get("args"), list) else []
        data_arg = str(args[1]) if len(args) > 1 and not str(args[1]).startswith("-") else None  # train DATA ...
        return {"data": Path(data_arg).name if data_arg else None, "status": self._status(path, job)}

    @staticmethod
    def _status(path: Path, job: dict[str, Any] | None = None) -> str:
        """queued, running, finished, stopped or failed, as the job runner says (`jobs.job_status`)."""
        return job_status(path, job if isinstance(job, dict) else read_job(path))

    def delete_run(self, name: str) -> None:
        """Delete a run folder's gptlab files, then the folder; refuse one that trains, keep anything else."""
        path = self.resolve("run", name)
        if not path.is_dir() or (folder_kind(path) != "run" and not (path / JOB).is_file()):
            raise GptlabError(f"{shown(name)} is not a run folder; nothing was deleted")
        if self._status(path) in ("running", "queued"):
            raise GptlabError(f"run {shown(name)} is training or queued now; stop it first, then delete it")
        for file_name in RUN_FOLDER_FILES:
            target = path / file_name
            if target.is_file() or target.is_symlink():
                target.unlink()
        for folder_name in EXPERIMENT_LOG_FOLDERS:
            target = path / folder_name
            if target.is_symlink():
                target.unlink()  # the link only: what it points to is not the run's
            elif target.is_dir():
                shutil.rmtree(target)
        left = sorted(p.name for p in path.iterdir())
        if left:
            more = f" and {len(left) - SHOWN_NAMES} more" if len(left) > SHOWN_NAMES else ""
            raise GptlabError(f"deleted the run's files, but {path} still holds {', '.join(left[:SHOWN_NAMES])}{more}, "
                              "which gptlab did not write; move them away and delete the folder yourself")
        path.rmdir()
