"""Files written whole or not at all, JSON read with one-line errors, digests, and disk errors named.

Design choices:
- Every file gptlab writes goes to a temporary name in the same folder, is fsynced and renamed into
  place, so a crash or a full disk leaves the previous version, never half of a new one.
- An OSError while writing becomes one GptlabError that names the path and the real cause: a full
  disk, a read-only file system or a folder without write permission each get their own fix.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from gptlab.errors import GptlabError


def cause(e: OSError, path: str | Path) -> str:
    """What went wrong writing `path`, and the fix, in words."""
    if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
        return f"the disk holding {path} is full; free disk space"
    if e.errno == errno.EROFS:
        return f"{path} is on a read-only file system; choose a folder you can write to"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"no permission to write {path}; choose a folder you can write to"
    return f"{e.strerror or e}"


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], hint: str = "") -> None:
    """Write `path` through `write(file)` into a temporary file, fsync it, and rename it into place.

    `hint` is added to the error message (e.g. how to continue after a full disk).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
        raise GptlabError(f"could not write {path}: {cause(e, path)}; {kept}{hint}") from None
    except BaseException:  # Ctrl-C or SIGTERM mid-write: no stray temporary file
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes, hint: str = "") -> None:
    """Atomically write bytes."""
    atomic_write(path, lambda f: f.write(data), hint)


def atomic_write_text(path: str | Path, text: str, hint: str = "") -> None:
    """Atomically write UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"), hint)


def write_json(path: str | Path, payload: Any, hint: str = "") -> None:
    """Atomically write `payload` as indented JSON (non-ASCII kept as it is)."""
    atomic_write_text(path, json.dumps(payload, indent=1, ensure_ascii=False) + "\n", hint)


def read_json_object(path: str | Path, missing: str, corrupt: str = "") -> dict[str, Any]:
    """The JSON object in `path`; `missing` is the error when there is no file, `corrupt` the fix when it is broken."""
    path = Path(path)
    if not path.is_file():
        raise GptlabError(missing)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        fix = corrupt or "fix or regenerate it"
        raise GptlabError(f"{path} is not valid JSON ({type(e).__name__}: {e}); {fix}") from None
    except OSError as e:
        raise GptlabError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(value, dict):
        raise GptlabError(f"{path} must hold a JSON object; {corrupt or 'fix or regenerate it'}")
    return value


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`."""
    for path in folder.iterdir():
        if path.is_dir():
            fsync_tree(path)
        elif path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in blocks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_writable_folder(folder: str | Path, flag: str = "--out") -> Path:
    """Create `folder` (and its parents); a one-line error naming the real cause when that fails."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise GptlabError(f"{flag} {folder} is a file, not a folder; choose another {flag}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GptlabError(f"cannot create {flag} {folder}: {cause(e, folder)}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise GptlabError(f"{flag} {folder}: no permission to write there; choose a folder you can write to")
    return folder


def write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text ending in a newline, in place: for files inside a folder that is renamed into place whole."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def gptlab_home() -> Path:
    """gptlab's cache folder (downloaded datasets, measurements of this machine): $GPTLAB_HOME or ~/.cache/gptlab."""
    return Path(os.environ.get("GPTLAB_HOME") or Path.home() / ".cache" / "gptlab")
