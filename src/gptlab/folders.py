"""The kinds of folder gptlab writes, how each is recognised, and the rule that nothing else is ever deleted.

Design choices:
- Three kinds, each written by one command and marked by a file of its own: a run (`train`:
  config.json with "model" and "train" sections), a data folder (`prepare`: meta.json) and an
  export (`export`: .gptlab-export.json, listing every file it wrote).
- `--overwrite` may replace a folder only when it is of the command's own kind and holds nothing
  gptlab did not write, at any depth; a folder of another kind, or one with anything else inside
  it, is refused with a one-line error naming what would have been deleted.
- Torch-free, so every command can check its target before loading anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from gptlab.errors import GptlabError

RUN_MARKER = "config.json"
DATA_MARKER = "meta.json"
EXPORT_MARKER = ".gptlab-export.json"
# Running an exported Space leaves Python's bytecode beside it; it is rebuilt at will.
REGENERATED = ("__pycache__",)
KIND_WORDS = {"run": "a run", "data": "a prepared data folder", "export": "an export"}


def folder_kind(path: Path) -> str | None:
    """"run", "data", "export", or None for a folder gptlab did not mark (or no folder)."""
    if not path.is_dir():
        return None
    if (path / EXPORT_MARKER).is_file():
        return "export"
    if (path / DATA_MARKER).is_file():
        return "data"
    config = path / RUN_MARKER
    if config.is_file():
        try:
            raw = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if isinstance(raw, dict) and "model" in raw and "train" in raw:
            return "run"
    if any((path / name).is_file() for name in ("last.safetensors", "best.safetensors", "train_state.pt")):
        return "run"
    return None


def marked_folders_inside(path: Path) -> list[Path]:
    """Folders below `path` (at any depth, not `path` itself) that gptlab marked as a run, data or export."""
    return [p for p in sorted(path.rglob("*")) if p.is_dir() and folder_kind(p) is not None]


def export_files(folder: Path) -> list[str]:
    """Every file under `folder`, as paths relative to it (what an export's marker lists)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def write_export_marker(folder: Path, fmt: str) -> None:
    """Mark `folder` as an export of format `fmt`, listing every file in it."""
    files = export_files(folder)
    payload = {"kind": "export", "format": fmt, "files": files}
    (folder / EXPORT_MARKER).write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


def _foreign_in_export(folder: Path) -> list[str]:
    """Files under an export folder that its marker does not list (bytecode aside)."""
    try:
        listed = set(json.loads((folder / EXPORT_MARKER).read_text(encoding="utf-8")).get("files", []))
    except (OSError, ValueError, AttributeError):
        listed = set()
    listed.add(EXPORT_MARKER)
    extra = []
    for rel in export_files(folder):
        if rel not in listed and not set(Path(rel).parts) & set(REGENERATED):
            extra.append(rel)
    return extra


def _first_content(path: Path) -> tuple[Path, str | None] | None:
    """The first marked folder or plain file met walking `path` top-down (and its kind), or None if it is empty."""
    for root, dirs, files in os.walk(path):
        here = Path(root)
        if here != path and folder_kind(here) is not None:
            return here, folder_kind(here)
        if files:
            return here / sorted(files)[0], None
        dirs.sort()
    return None


def check_replaceable(path: Path, kind: str, flag: str = "--out") -> None:
    """Raise unless `path` may be replaced whole by a command that writes folders of `kind`."""
    found = folder_kind(path)
    if found is not None and found != kind:
        raise GptlabError(f"{flag} {path} holds {KIND_WORDS[found]}, which --overwrite never deletes; "
                          f"nothing was deleted; choose another {flag}")
    inside = marked_folders_inside(path) if found is not None else []
    first = (inside[0], folder_kind(inside[0])) if inside else _first_content(path) if found is None else None
    if first is not None and first[1] is not None:
        raise GptlabError(f"--overwrite would delete {first[0]} ({KIND_WORDS[first[1]]}) inside {path}; "
                          f"nothing was deleted; choose another {flag}")
    if first is not None:
        raise GptlabError(f"--overwrite would delete {first[0]}, which gptlab did not write; "
                          f"nothing was deleted; move it away or choose another {flag}")
    if kind == "export" and found == "export":
        extra = _foreign_in_export(path)
        if extra:
            raise GptlabError(f"--overwrite would delete {path / extra[0]}, which the export did not write; "
                              f"nothing was deleted; move it away or choose another {flag}")


def check_writes_kind(path: Path, kind: str, flag: str = "--out") -> None:
    """Raise if `path` is a folder of another kind than the command writes (each kind is written by its own command)."""
    found = folder_kind(path)
    if found is not None and found != kind:
        command = {"run": "train", "data": "prepare", "export": "export"}[found]
        raise GptlabError(f"{flag} {path} holds {KIND_WORDS[found]} (written by `gptlab {command}`); "
                          f"choose another {flag}")
