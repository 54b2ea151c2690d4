"""/ui/api: the page's verbs over plain HTTP, for scripts and tests (uploads, prepare, jobs, runs).

    POST   /ui/api/uploads?name=notes.txt      body: the file's bytes      -> the stored upload
    POST   /ui/api/prepare                     {"uploads": [...], "tokenizer": "char"} -> {"data": NAME}
    POST   /ui/api/jobs                        {"data": NAME, "run"?, "preset"?, "minutes"? | "steps"?, "settings"?}
    GET    /ui/api/runs                        every run with its status
    GET    /ui/api/runs/{run}                  one job's status, progress, evals, sample (and log tail if failed)
    POST   /ui/api/runs/{run}/stop | /resume
    DELETE /ui/api/runs/{run}

Errors are {"error": {"message": ...}}: 400 for a bad value, 404 for an unknown name, 409 for a job
that cannot do that now. The key (--api-key) and the upload ceiling are checked before a body is
read (`serve.app.ApiGuard`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gptlab.errors import GptlabError
from gptlab.ui.jobs import JobConflict
from gptlab.ui.studio import Studio, UnknownName


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message}}, status_code=status)


def _status_of(error: GptlabError) -> int:
    if isinstance(error, UnknownName):
        return 404
    return 409 if isinstance(error, JobConflict) else 400


def build_ui_router(studio: Studio) -> APIRouter:
    router = APIRouter(prefix="/ui/api")

    async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except GptlabError as e:
            return _error(_status_of(e), str(e))

    async def body_json(request: Request) -> dict[str, Any] | JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the request body must be a JSON object")
        return body if isinstance(body, dict) else _error(400, "the request body must be a JSON object")

    @router.post("/uploads")
    async def upload(request: Request, name: str = "upload.txt") -> Any:
        content = await request.body()

        def save() -> dict[str, Any]:
            up = studio.workspace.save_upload(name, content)
            return {"name": up.name, "bytes": up.bytes, "chars": up.chars}

        return await call(save)

    @router.get("/uploads")
    async def uploads() -> Any:
        return {"uploads": studio.workspace.uploads()}

    @router.post("/prepare")
    async def prepare(request: Request) -> Any:
        body = await body_json(request)
        if isinstance(body, JSONResponse):
            return body
        names, tokenizer = body.get("uploads"), body.get("tokenizer", "char")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            return _error(400, "uploads must be a list of upload names")
        if not isinstance(tokenizer, str):
            return _error(400, "tokenizer must be text, e.g. char, byte, gpt2 or bpe:512")
        result = await call(studio.workspace.prepare, names, tokenizer)
        return result if isinstance(result, JSONResponse) else {"data": result.name}

    @router.get("/data")
    async def data() -> Any:
        return {"data": await call(studio.workspace.data_folders)}

    @router.post("/jobs")
    async def start(request: Request) -> Any:
        body = await body_json(request)
        if isinstance(body, JSONResponse):
            return body
        known = {"data", "run", "preset", "minutes", "steps", "settings"}
        unknown = sorted(set(body) - known)
        if unknown:
            return _error(400, f"unknown field {unknown[0]!r}; a job takes {', '.join(sorted(known))}")
        if not isinstance(body.get("data"), str):
            return _error(400, "data must name a prepared data folder (GET /ui/api/data lists them)")
        if body.get("settings") is not None and not isinstance(body["settings"], dict):
            return _error(400, "settings must be an object of setting names and values")

        def plan_and_start() -> dict[str, Any]:
            plan = studio.plan(body["data"], body.get("run"), body.get("preset"), body.get("minutes"),
                               body.get("steps"), body.get("settings"))
            return {**studio.start(plan), "shape": plan.shape, "params": plan.params, "reason": plan.reason,
                    "warning": plan.warning}

        return await call(plan_and_start)

    @router.get("/runs")
    async def runs() -> Any:
        return {"runs": await call(studio.workspace.runs)}

    @router.get("/runs/{run}")
    async def status(run: str) -> Any:
        return await call(studio.status, run)

    @router.post("/runs/{run}/stop")
    async def stop(run: str) -> Any:
        return await call(studio.stop, run)

    @router.post("/runs/{run}/resume")
    async def resume(run: str) -> Any:
        return await call(studio.resume, run)

    @router.delete("/runs/{run}")
    async def delete(run: str) -> Any:
        result = await call(studio.delete, run)
        return result if isinstance(result, JSONResponse) else {"deleted": run}

    return router
