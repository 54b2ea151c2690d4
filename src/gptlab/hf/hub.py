"""Push a folder to the Hugging Face Hub (huggingface_hub is imported only here, and only to upload).

    gptlab push exports/shakespeare-gpt --repo-id user/shakespeare-gpt
    gptlab push exports/shakespeare-space --repo-id user/shakespeare --space
"""

from __future__ import annotations

import re
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.folders import EXPORT_MARKER
from gptlab.hf.space import SPACE_APP

REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")

def _is_network_error(error: BaseException) -> bool:
    # The Hub client has used requests, httpx and httpx2 in turn; their transport errors share these names.
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & {"ConnectionError", "TransportError", "TimeoutException", "Timeout", "ConnectError"}) \
        or isinstance(error, (ConnectionError, TimeoutError))

def upload_listing(folder: str | Path) -> list[tuple[str, int]]:
    """(path inside the repo, bytes) of every file `push` would upload from `folder`."""
    folder = Path(folder)
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        # Running a Space's app.py leaves bytecode and Gradio's working files beside it.
        left_by_running = {"__pycache__", ".gradio"} & set(rel.parts)
        if path.is_file() and rel.parts[0] != ".git" and rel.parts[:2] != (".cache", "huggingface") \
                and not left_by_running and rel.as_posix() != EXPORT_MARKER:
            files.append((rel.as_posix(), path.stat().st_size))
    return files

def push(folder: str | Path, repo_id: str, private: bool = False, space: bool = False, dry_run: bool = False,
         message: str = "Upload with gptlab", token: str | None = None) -> tuple[str, list[tuple[str, int]]]:
    """Upload `folder` to the Hub repo `repo_id` (created if needed); returns its URL and the files.

    The token is `token` when given (held in memory only), else HF_TOKEN or `hf auth login`'s.
    With `dry_run` nothing leaves the machine.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise GptlabError(f"{folder} not found; export a run first (gptlab export RUN --out {folder})")
    if not REPO_ID.fullmatch(repo_id) or ".." in repo_id or repo_id.endswith((".", "-")):
        raise GptlabError(f"--repo-id {repo_id!r} is not a Hub repo id; write it as user/name (letters, digits, - _ .)")
    files = upload_listing(folder)
    if not files:
        raise GptlabError(f"{folder} is empty; export a run into it first")
    # A Space pushed as a model repo never runs, and a model folder pushed as a Space fails to build.
    if space and not (folder / SPACE_APP).is_file():
        raise GptlabError(f"{folder} has no {SPACE_APP}, so it is not a Space; export one with "
                          "`gptlab export RUN --format space`, or push without --space")
    if not space and (folder / SPACE_APP).is_file():
        raise GptlabError(f"{folder} holds a Space ({SPACE_APP}); add --space to upload it as one")
    repo_type = "space" if space else "model"
    url = f"https://huggingface.co/{'spaces/' if space else ''}{repo_id}"
    if dry_run:
        return url, files
    try:
        import huggingface_hub
        from huggingface_hub import HfApi
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:
        raise GptlabError('pushing needs huggingface_hub; pip install "gptlab[hf]"') from None
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise GptlabError("HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it and try again")
    if token is None:
        token = huggingface_hub.get_token()
    if not token:
        raise GptlabError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again")
    endpoint = huggingface_hub.constants.ENDPOINT
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, repo_type=repo_type, exist_ok=True,
                        space_sdk="gradio" if space else None)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type=repo_type, commit_message=message)
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise GptlabError(f"the Hub refused the token ({status}); check HF_TOKEN or `hf auth login`, "
                              f"and that it may write to {repo_id.split('/')[0]}") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GptlabError(f"the Hub refused the upload to {repo_id} ({status or type(e).__name__}: {first[:160]})") from None
    except Exception as e:
        if not _is_network_error(e):
            raise
        raise GptlabError(f"cannot reach the Hugging Face Hub at {endpoint} ({type(e).__name__}); "
                          "check the network (offline?) and push again") from None
    return url, files
