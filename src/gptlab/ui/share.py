"""The Share tab's work: a run as a Hugging Face zip, a Space zip, a GGUF file, or a Hub repo.

    shelf = Shelf(work_folder)
    shelf.hf_zip(run_dir)                 # <work>/zips/<run>-hf.zip, holding <run>-hf/config.json, ...
    shelf.space_zip(run_dir)              # <work>/zips/<run>-space.zip, holding <run>-space/app.py, ...
    shelf.gguf(run_dir)                   # <work>/gguf/<run>.gguf (and <run>.Modelfile beside it)
    shelf.push(run_dir, "user/name", token)

Design choices:
- Everything is written inside the Shelf's folder, which the app owns: zips/, gguf/ and short-lived
  export folders under building/. Nothing goes beside the run or into the current folder.
- A zip's one top folder is the export's own name (<run>-hf, <run>-space): the model card's snippet
  `pipeline("text-generation", "<run>-hf")` then names the folder the learner unzips.
- A zip holds what `gptlab push` would upload (hub.upload_listing: no export marker). It is built
  under a temporary name and renamed into place, so a download never sees half a zip and a second
  export of the same run replaces the first whole.
- The weights are stored, not deflated: float bytes barely compress, and deflating them costs
  seconds on a large run for a few percent.
- Two clicks on the same button would share the export's temporary names, so exports of one target
  run one at a time (a lock per target); different runs and formats run side by side.
- The push token is an argument only: checked here, then handed to huggingface_hub's HfApi in
  memory. It is never written to a file, put in the environment, logged, or echoed in an error.
- A push exports into its own fresh folder named after the repo (so its card names the repo) and
  removes it after the upload, so a long upload never blocks or is disturbed by another export.
- No gradio or torch import here: torch comes with the export, huggingface_hub with the upload.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from gptlab.errors import GptlabError
from gptlab.fsutil import atomic_write
from gptlab.hf import hub
from gptlab.hf.export import export

KINDS = ("hf", "space")
# llama.cpp's own converter writes f16 by default: half the size of f32, and what its users expect.
DEFAULT_GGUF_OUTTYPE = "f16"
# Files of float weights: stored in the zip as they are (see the design notes).
STORED_SUFFIXES = (".safetensors", ".pt", ".bin", ".gguf")
# A Hub token pasted into a text box: printable ASCII, no spaces (an HTTP header cannot carry more).
TOKEN = re.compile(r"[\x21-\x7e]+")


def run_name(run_dir: str | Path) -> str:
    """The run folder's name: the name of everything exported from it."""
    return Path(run_dir).resolve().name


def check_repo_id(repo_id: str | None) -> str:
    """`repo_id` without surrounding spaces, or a one-line error saying how to write one."""
    repo_id = (repo_id or "").strip()
    if not repo_id:
        raise GptlabError("no repo id: write the Hub repo to push to as user/name, then push again")
    if not hub.REPO_ID.fullmatch(repo_id) or ".." in repo_id or repo_id.endswith((".", "-")):
        shown = repo_id if len(repo_id) <= 60 else repo_id[:57] + "..."
        raise GptlabError(f"repo id {shown!r} is not a Hub repo id; write it as user/name (letters, digits, - _ .)")
    return repo_id


def check_token(token: str | None) -> str:
    """`token` without surrounding spaces (a paste often brings a newline), or a one-line error.

    The error never repeats the token.
    """
    token = (token or "").strip()
    if not token:
        raise GptlabError("no Hugging Face token: paste one with write access "
                          "(huggingface.co/settings/tokens), then push again")
    if not TOKEN.fullmatch(token):
        raise GptlabError("the Hugging Face token has spaces or unusual characters inside; "
                          "copy it again from huggingface.co/settings/tokens, then push again")
    return token


def write_zip(folder: Path, f: BinaryIO) -> None:
    """Zip `folder`'s uploadable files into the open file `f`, under one top folder of its name."""
    with zipfile.ZipFile(f, "w") as zf:
        for rel, _ in hub.upload_listing(folder):
            path = folder / rel
            how = zipfile.ZIP_STORED if path.suffix in STORED_SUFFIXES else zipfile.ZIP_DEFLATED
            zf.write(path, f"{folder.name}/{rel}", compress_type=how)


class Shelf:
    """Exports of runs for download or the Hub, all written inside `folder`."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def hf_zip(self, run_dir: str | Path) -> Path:
        """The run's best weights as a transformers folder, zipped; returns the zip's path."""
        return self._zip(run_dir, "hf")

    def space_zip(self, run_dir: str | Path) -> Path:
        """The run as a Hugging Face Space (app.py, requirements, the run's weights), zipped."""
        return self._zip(run_dir, "space")

    def gguf(self, run_dir: str | Path, outtype: str = DEFAULT_GGUF_OUTTYPE) -> Path:
        """The run's best weights as one GGUF file for llama.cpp and Ollama; returns its path.

        An Ollama Modelfile is written beside it (<run>.Modelfile).
        """
        out = self.folder / "gguf" / f"{run_name(run_dir)}.gguf"
        with self._lock(f"gguf/{out.name}"):
            return export(run_dir, out, fmt="gguf", overwrite=True, outtype=outtype)

    def push(self, run_dir: str | Path, repo_id: str, token: str, kind: str = "hf", private: bool = False) -> str:
        """Export the run as `kind` ("hf" or "space") and upload it to `repo_id` with `token`; returns the URL."""
        if kind not in KINDS:
            raise GptlabError(f"cannot push a {kind!r} export; choose one of: {', '.join(KINDS)}")
        repo_id = check_repo_id(repo_id)
        token = check_token(token)
        with self._building() as building:
            folder = export(run_dir, building / repo_id.split("/")[1], fmt=kind)
            url, _ = hub.push(folder, repo_id, private=private, space=kind == "space", token=token)
        return url

    def _zip(self, run_dir: str | Path, kind: str) -> Path:
        name = f"{run_name(run_dir)}-{kind}"
        target = self.folder / "zips" / f"{name}.zip"
        with self._lock(f"zips/{target.name}"), self._building() as building:
            folder = export(run_dir, building / name, fmt=kind)
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, lambda f: write_zip(folder, f))
        return target

    @contextmanager
    def _building(self) -> Iterator[Path]:
        """A fresh folder for one export, removed afterwards whatever happens."""
        parent = self.folder / "building"
        parent.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(dir=parent))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def _lock(self, target: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(target, threading.Lock())
