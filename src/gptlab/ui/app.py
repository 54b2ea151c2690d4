"""`gptlab ui`: the page at /, its job control at /ui/api, and `gptlab serve`'s OpenAI-compatible /v1, in one server.

    gptlab ui                                   # http://127.0.0.1:8000/
    gptlab ui --runs runs --data data --host 0.0.0.0 --api-key secret

Design choices:
- The server is `gptlab serve`'s (`serve.app`): the same key guard (/v1 and /ui/api need
  `Authorization: Bearer KEY`, the page asks for the key as a password), the same binding rules,
  and /v1 serves every run of the runs folder by its folder name, loaded on first use.
- Uploads are capped twice: Gradio's upload route refuses files over --max-upload-mb, and
  /ui/api refuses bodies over it before reading them.
- Training jobs outlive the server (see `ui/jobs.py`); stopping the server stops only the page.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

from gptlab.errors import GptlabError
from gptlab.serve.app import NEEDED, api_app, bind, local_url, mount_page

DEFAULT_MAX_UPLOAD_MB = 50.0


def build_ui_app(studio: Any, api_key: str | None = None) -> Any:
    """The FastAPI app of `gptlab ui` for `studio` (a `ui.studio.Studio`)."""
    from gptlab.ui.api import build_ui_router
    from gptlab.ui.page import build_ui_page

    ceiling = studio.workspace.max_upload_bytes
    app = api_app(studio.models, studio.limits, api_key, bodies={"/ui/api": ceiling + 65536})
    app.include_router(build_ui_router(studio))
    mount_page(app, build_ui_page(studio), api_key, max_file_size=ceiling)
    return app


def ui(runs: str | Path = "runs", data: str | Path = "data", host: str = "127.0.0.1", port: int = 8000,
       api_key: str | None = None, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, device: str = "auto") -> None:
    """Serve the app until Ctrl-C."""
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        raise GptlabError(f"gptlab ui needs {', '.join(missing)}: pip install 'gptlab[serve]'")
    if api_key is not None and not api_key.strip():
        raise GptlabError("--api-key is empty; give a key, or leave the flag out for an open server")
    if not max_upload_mb > 0:
        raise GptlabError(f"--max-upload-mb must be a positive number, got {max_upload_mb}")
    from gptlab.ui.studio import Studio

    sock = bind(host, port)
    try:
        port = sock.getsockname()[1]
        studio = Studio(runs, data, int(max_upload_mb * 1e6), device=device)
        try:
            url = local_url(host, port)
            app = build_ui_app(studio, api_key)

            import uvicorn

            server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                   timeout_graceful_shutdown=5, lifespan="on"))
            print(banner(url, host, studio, api_key), flush=True)
            server.run(sockets=[sock])
        finally:
            studio.close()
    finally:
        sock.close()
        sys.stdout.flush()


def banner(url: str, host: str, studio: Any, api_key: str | None) -> str:
    everywhere = " (listening on every interface)" if host in ("", "0.0.0.0", "::") else ""
    ws = studio.workspace
    lines = [
        f"gptlab ui at {url}{everywhere}",
        f"  page    {url}/  (data, training, runs, generate, share)",
        f"  folders runs in {ws.runs_dir}, data and uploads in {ws.data_dir}",
        f"  API     {url}/v1 (OpenAI-compatible, every run by name), {url}/ui/api (jobs)",
        f"  cores   a training job gets {studio.jobs.threads} thread(s) and lends one while the page or the API "
        "generates; one job at a time, the rest queued",
    ]
    if api_key is not None:
        lines.append("  key     /v1 and /ui/api need Authorization: Bearer <your --api-key>; the page asks for it")
    lines += ["", "Ctrl-C stops the server; a training job goes on, and the page finds it again."]
    return "\n".join(lines)
