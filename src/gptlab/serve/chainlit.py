"""`gptlab serve --chainlit`: a Chainlit chat at /chainlit of the same server, on the models already loaded.

Design choices:
- The chat script (chainlit_app.py) is loaded by Chainlit from its file, in this process; it reads the
  models from `MODELS` here, filled before the mount: the weights are loaded once, and every reply goes
  through the model's generation queue, shared with the page and /v1.
- Chainlit reads and writes files under its app root (.chainlit/config.toml, chainlit.md, translations,
  a .files upload folder), by default the current directory, fixed when chainlit is first imported. The
  root is a temporary folder of this process instead, removed at exit: serving leaves nothing behind.
- Nothing leaves the server: Chainlit's index.html links Google Fonts and a KaTeX stylesheet on a CDN, so a
  copy without them is served through Chainlit's `custom_build` setting (LaTeX is off; the font falls back
  to the system's). No data layer: conversations live in the browser session only, whatever DATABASE_URL
  or LITERAL_API_KEY say. Chainlit has no telemetry of its own.
- `--api-key` turns on Chainlit's password login (any user name, the key as the password); it guards the
  socket the chat runs on and every Chainlit route but the static files.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import importlib.util
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptlab.errors import GptlabError
from gptlab.serve.limits import Limits

if TYPE_CHECKING:
    from gptlab.serve.models import ServedModel

PATH = "/chainlit"
SCRIPT = Path(__file__).with_name("chainlit_app.py")

# What the chat script reads: filled by `mount`, before Chainlit loads it.
MODELS: dict[str, ServedModel] = {}
LIMITS = Limits()
API_KEY: str | None = None


def check_installed() -> None:
    """A GptlabError when chainlit is not installed (checked before any weights load)."""
    if importlib.util.find_spec("chainlit") is None:
        raise GptlabError("gptlab serve --chainlit needs chainlit: pip install 'gptlab[chainlit]'")


def mount(app: Any, models: Sequence[ServedModel], limits: Limits, api_key: str | None) -> None:
    """Mount the chat at /chainlit of `app` (before the page at /, which would match first)."""
    check_installed()
    global LIMITS, API_KEY
    MODELS.update({m.name: m for m in models})
    LIMITS, API_KEY = limits, api_key
    root = Path(tempfile.mkdtemp(prefix="gptlab-chainlit-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    write_app_root(root, models)
    os.environ["CHAINLIT_APP_ROOT"] = str(root)
    # Login tokens are signed with this; a fresh one per process (a restart asks for the key again).
    os.environ.setdefault("CHAINLIT_AUTH_SECRET", secrets.token_urlsafe(32))
    from chainlit.utils import mount_chainlit
    from fastapi.responses import RedirectResponse

    @app.get(PATH, include_in_schema=False)
    async def chat_folder() -> RedirectResponse:
        """/chainlit to /chainlit/: the mount matches only paths below it, and the page at / would answer 404."""
        return RedirectResponse(PATH + "/")

    mount_chainlit(app, str(SCRIPT), path=PATH)
    # One readme serves every language; Chainlit would warn on each page load that no translation exists.
    logging.getLogger("chainlit").addFilter(lambda r: not r.getMessage().startswith("Translated markdown file"))


def write_app_root(root: Path, models: Sequence[ServedModel]) -> None:
    """Chainlit's settings, its readme (the model cards), and its front end without links off the server."""
    (root / ".chainlit").mkdir()
    (root / ".chainlit" / "config.toml").write_text(CONFIG.format(version=importlib.metadata.version("chainlit")))
    (root / "chainlit.md").write_text("\n\n".join(m.card() for m in models) + "\n")
    spec = importlib.util.find_spec("chainlit")
    assert spec is not None and spec.submodule_search_locations
    dist = Path(spec.submodule_search_locations[0]) / "frontend" / "dist"
    ui = root / "ui"
    ui.mkdir()
    for item in dist.iterdir():
        if item.name != "index.html":
            (ui / item.name).symlink_to(item, target_is_directory=item.is_dir())
    html = (dist / "index.html").read_text(encoding="utf-8")
    (ui / "index.html").write_text(re.sub(r"<link[^>]*href=\"https?://[^>]*>", "", html), encoding="utf-8")


# Chainlit's defaults, less what does not fit a small local model: no file uploads (the models read text
# only), no message editing (the conversation is kept by the script, not rebuilt from the page), no LaTeX.
CONFIG = """\
[project]
user_env = []
session_timeout = 3600
cache = false

[features]
unsafe_allow_html = false
latex = false
edit_message = false

[features.spontaneous_file_upload]
enabled = false

[features.audio]
enabled = false

[features.mcp]
enabled = false

[UI]
name = "gptlab"
description = "Chat with a model trained with gptlab"
default_theme = "light"
cot = "hidden"
custom_build = "ui"

[meta]
generated_by = "{version}"
"""
