"""One FastAPI app for everything: the OpenAI-compatible API under /v1, /health, and the Gradio page at /.

Design choices:
- The page is mounted last, at /, so every route of the API is matched before it.
- `--api-key` guards /v1 with `Authorization: Bearer KEY` (checked before the body is read), and the
  page with a login form that takes the same key as its password. /health stays open for probes.
- FastAPI's own /docs and /redoc are off: they load their scripts from a CDN. /openapi.json stays.
- The run folders are checked, then the socket is bound, then the weights load: a port in use is
  reported before a large model spends time loading. Port 0 picks a free port (the banner shows which).
- Uvicorn logs only warnings; the banner says where everything is. Shutdown stops every generation
  at its next token.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import secrets
import socket
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptlab.config import invalid_unicode_at
from gptlab.errors import GptlabError
from gptlab.serve.limits import Limits

if TYPE_CHECKING:
    from gptlab.serve.models import ServedModel

NEEDED = ("fastapi", "uvicorn", "gradio")
RAISE_HINT = {"/v1": "raise --max-prompt-chars for longer prompts", "/ui/api": "raise --max-upload-mb for larger files"}


class ApiGuard:
    """ASGI middleware for the HTTP APIs: the API key, and a ceiling on the body size, before anything is read.

    `bodies` maps each guarded path prefix (/v1, and /ui/api under `gptlab ui`) to the most bytes a
    request body there may have.
    """

    def __init__(self, app: Any, api_key: str | None, bodies: dict[str, int]) -> None:
        self.app, self.api_key, self.bodies = app, api_key, bodies

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        prefix = next((p for p in self.bodies if scope["path"].startswith(p)), None) if scope["type"] == "http" else None
        if prefix is not None:
            error = self.check(dict(scope["headers"]), self.bodies[prefix], prefix)
            if error is not None:
                await error.response()(scope, receive, send)
                return
            receive = await self.read_body(scope, receive, send, self.bodies[prefix], prefix)
            if receive is None:
                return
        await self.app(scope, receive, send)

    async def read_body(self, scope: dict[str, Any], receive: Any, send: Any, max_body: int, prefix: str) -> Any:
        """The body read here, at most `max_body` bytes whatever the transfer encoding; a `receive` that replays it.

        A chunked upload has no Content-Length to check up front, so the ceiling is applied to the
        bytes as they arrive: the 413 goes out as soon as they pass it, and the rest is never read.
        None when the answer has been sent (too large, or the client left).
        """
        from gptlab.serve.openai_api import ApiError

        parts, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > max_body:
                error = ApiError(413, f"the request body is over {max_body:,} bytes, the most this server reads "
                                      f"({RAISE_HINT[prefix]})", code="body_too_large")
                await error.response()(scope, receive, send)
                return None
            parts.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(parts)
        error = text_error(body) if prefix == "/v1" else None  # uploads are checked as files, by the app
        if error is not None:
            await error.response()(scope, receive, send)
            return None
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect that cancels a generation

        return replay

    def check(self, headers: dict[bytes, bytes], max_body: int, prefix: str = "/v1") -> Any:
        """An ApiError for a missing or wrong key or an oversized body, else None."""
        from gptlab.serve.openai_api import ApiError

        if self.api_key is not None:
            auth = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, key = auth.partition(" ")
            if not auth:
                return ApiError(401, "missing API key: this server was started with --api-key; send the header "
                                     "Authorization: Bearer KEY (api_key=KEY in the openai client)", code="invalid_api_key")
            if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), self.api_key.encode()):
                return ApiError(401, "wrong API key: send the key given to gptlab serve --api-key as "
                                     "Authorization: Bearer KEY", code="invalid_api_key")
        length = headers.get(b"content-length", b"0")
        if length.isdigit() and int(length) > max_body:
            return ApiError(413, f"the request body is {int(length):,} bytes; this server reads at most "
                                 f"{max_body:,} ({RAISE_HINT[prefix]})", code="body_too_large")
        return None


def text_error(body: bytes) -> Any:
    """An ApiError when the body is not UTF-8, or a JSON string in it is not valid Unicode; else None.

    JSON may escape a lone surrogate (\\ud800), which no UTF-8 text can hold: such a prompt or stop
    string would fail only when echoed or streamed back. Every field of every request is refused the
    same way, before any work, naming the field.
    """
    from gptlab.serve.openai_api import ApiError

    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return ApiError(400, f"the request body is not valid UTF-8 (bad byte at offset {e.start}); send JSON "
                             "encoded as UTF-8", code="invalid_encoding")
    try:
        value = json.loads(text) if text.strip() else None
    except ValueError:
        return None  # not JSON: the route's own check says so
    bad = _bad_text(value, "")
    if bad is None:
        return None
    where, index = bad
    return ApiError(400, f"{where or 'the request body'} holds a character that is not valid Unicode (a lone "
                         f"surrogate at character {index}); send valid UTF-8 text", param=where or None,
                    code="invalid_text")


def _bad_text(value: Any, where: str) -> tuple[str, int] | None:
    """Where (a field path like messages[0].content) the first string with a lone surrogate is, and at which character."""
    if isinstance(value, str):
        index = invalid_unicode_at(value)
        return None if index is None else (where, index)
    if isinstance(value, dict):
        for key, item in value.items():
            found = _bad_text(key, where) or _bad_text(item, f"{where}.{key}" if where else str(key))
            if found is not None:
                return found
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = _bad_text(item, f"{where}[{i}]")
            if found is not None:
                return found
    return None


def build_app(models: Sequence[ServedModel], limits: Limits | None = None, api_key: str | None = None,
              page: bool = True, api_help: str | None = None) -> Any:
    """The FastAPI app: /v1 (OpenAI-compatible), /health and, unless page=False, the Gradio page at /."""
    limits = limits or Limits()
    app = api_app({m.name: m for m in models}, limits, api_key)
    if page:
        from gptlab.serve.page import build_page

        mount_page(app, build_page(models, limits, api_help=api_help), api_key)
    return app


def api_app(models: Mapping[str, ServedModel], limits: Limits, api_key: str | None,
            bodies: dict[str, int] | None = None) -> Any:
    """A FastAPI app with /v1 for `models` (name -> model, looked up per request) and /health.

    `bodies`: more guarded path prefixes and their body ceilings, for routes the caller adds.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError

    from gptlab.serve.openai_api import ApiError, build_router, validation_error_response

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        for m in getattr(models, "loaded", models).values():  # a lazy shelf stops only what it loaded
            m.close()

    app = FastAPI(title="gptlab", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.add_middleware(ApiGuard, api_key=api_key,
                       bodies={"/v1": 6 * limits.max_prompt_chars * limits.max_n + 65536, **(bodies or {})})

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Any:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Any:
        return validation_error_response(exc)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Up, and what each loaded model is doing."""
        loaded = getattr(models, "loaded", models)
        return {"status": "ok", "models": {name: {**m.queue.stats(), **m.batch_stats()} for name, m in loaded.items()}}

    app.include_router(build_router(models, limits))
    return app


def mount_page(app: Any, blocks: Any, api_key: str | None, max_file_size: int | None = None) -> None:
    """Mount Gradio `blocks` at / (last, so every API route is matched first), behind the key when there is one."""
    import gradio as gr

    auth = None
    if api_key is not None:
        def auth(user: str, password: str) -> bool:
            return secrets.compare_digest(password.encode(), api_key.encode())
    gr.mount_gradio_app(
        app, blocks, path="/", footer_links=["api", "settings"], run_history=False, ssr_mode=False,
        mcp_server=False, auth=auth, auth_message="Enter the server's API key as the password (any user name).",
        max_file_size=max_file_size,
    )


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a GptlabError saying why not."""
    if not 0 <= port <= 65535:
        raise GptlabError(f"--port must be from 1 to 65535 (0 = any free port), got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise GptlabError(f"--host {host}: not an address or a known host name ({e}); "
                          "use 127.0.0.1 (this machine) or 0.0.0.0 (every interface)") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise GptlabError(f"port {port} on {host} is in use (another server?); pick another with --port") from None
        if e.errno == errno.EACCES:
            raise GptlabError(f"port {port} needs administrator rights; use a port from 1024 up, e.g. --port 8000") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise GptlabError(f"--host {host} is not an address of this machine; use 127.0.0.1 or 0.0.0.0") from None
        raise GptlabError(f"cannot listen on {host}:{port} ({e.strerror}); try another --host or --port") from None
    sock.setblocking(False)
    return sock


def local_url(host: str, port: int) -> str:
    """The URL to open on this machine for a server bound to host:port."""
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def client_snippet(url: str, model: str, api_key: str | None) -> str:
    """The openai client code for this server."""
    key = '"<your --api-key>"' if api_key is not None else '"none"'
    return "\n".join([
        "from openai import OpenAI",
        f'client = OpenAI(base_url="{url}/v1", api_key={key})',
        f'reply = client.completions.create(model="{model}", prompt="ROMEO:", max_tokens=100, temperature=0.8)',
        "print(reply.choices[0].text)",
    ])


def banner(models: Sequence[ServedModel], runs: Sequence[str | Path], url: str, host: str, limits: Limits,
           api_key: str | None, chainlit: bool = False) -> str:
    """What `gptlab serve` prints once it is listening."""
    names = ", ".join(f"{m.name} ({r})" for m, r in zip(models, runs))
    everywhere = " (listening on every interface)" if host in ("", "0.0.0.0", "::") else ""
    lines = [
        f"gptlab serve: {names} at {url}{everywhere}",
        f"  page    {url}/",
        *([f"  chat    {url}/chainlit  (Chainlit)"] if chainlit else []),
        f"  API     {url}/v1  (GET /v1/models, POST /v1/completions, POST /v1/chat/completions)",
        f"  health  {url}/health",
        f"  limits  max_tokens <= {limits.max_new_tokens_limit:,}, n <= {limits.max_n}, prompts <= "
        f"{limits.max_prompt_chars:,} characters; per model {limits.concurrency} generating, "
        f"{limits.queue_size} waiting, then 429",
    ]
    if api_key is not None:
        lines.append("  key     /v1 needs Authorization: Bearer <your --api-key>; the page asks for it as a password"
                     + (", and so does the chat" if chainlit else ""))
    lines += ["", "From Python (pip install openai):", "", client_snippet(url, models[0].name, api_key), "",
              "Ctrl-C stops the server."]
    return "\n".join(lines)


def serve(runs: Sequence[str | Path], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: Limits | None = None, checkpoint: str = "best", device: str = "auto", chainlit: bool = False,
          quantize: str | None = None) -> None:
    """Load `runs` and serve the page and the API (and with `chainlit`, a Chainlit chat at /chainlit) until Ctrl-C."""
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        raise GptlabError(f"gptlab serve needs {', '.join(missing)}: pip install 'gptlab[serve]'")
    if chainlit:
        from gptlab.serve import chainlit as chat

        chat.check_installed()
    if api_key is not None and not api_key.strip():
        raise GptlabError("--api-key is empty; give a key, or leave the flag out for an open server")
    limits = limits or Limits()
    from gptlab.serve.models import check_runs, load_models

    checked = check_runs(runs, checkpoint)
    sock = bind(host, port)  # before the weights load: a port in use is reported at once
    try:
        port = sock.getsockname()[1]
        models = load_models(runs, limits, checkpoint, device, checked, quantize)
        url = local_url(host, port)
        app = build_app(models, limits, api_key, page=False)
        if chainlit:  # before the page: a mount at / would match /chainlit first
            chat.mount(app, models, limits, api_key)
        from gptlab.serve.page import build_page

        mount_page(app, build_page(models, limits, api_help=_api_help(url, models[0].name, api_key)), api_key)

        import uvicorn

        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                               timeout_graceful_shutdown=5, lifespan="on"))
        print(banner(models, runs, url, host, limits, api_key, chainlit), flush=True)
        server.run(sockets=[sock])
    finally:
        sock.close()
        sys.stdout.flush()


def _api_help(url: str, model: str, api_key: str | None) -> str:
    return f"#### The same model over HTTP\nOpenAI-compatible API at `{url}/v1`:\n```python\n" \
           f"{client_snippet(url, model, api_key)}\n```"
