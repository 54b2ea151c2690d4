"""OpenAI-compatible routes: GET /v1/models, POST /v1/completions and /v1/chat/completions.

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.completions.create(model="shakespeare", prompt="ROMEO:", max_tokens=100, stop=["\\n\\n"], seed=7)

Design choices:
- Every error is OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`, with 400 for a
  bad value or a wrong type (never FastAPI's 422), 401 for a missing or wrong key, 404 for an
  unknown model or route, 429 with Retry-After when the model's queue is full. The message names
  the parameter and what it accepts.
- Request bodies are pydantic models in strict mode, so "0.5" for a number or 2.5 for an integer is
  a 400, not silently converted. null means the default, as in OpenAI's API.
- The sampling parameters become a SampleConfig in `serve/params.py`, the translation the page
  shares, checked by the same rules as `gptlab sample`; a bad value is a 400 whose message and
  `param` give the parameter's name (from config's SAMPLE_FIELD_NAMES).
- Defaults are OpenAI's: temperature 1, top_p 1, n 1, and max_tokens 16 for completions. Chat
  defaults to 256 new tokens (OpenAI's "until done" would be the whole ceiling for a base model).
  top_k, min_p and repetition_penalty are extra parameters (`extra_body` in the openai client).
- A base model has no chat format, so chat messages become plain text: one `Role: content` line per
  message (System, User, Assistant), then `Assistant:` for the model to continue; the reply ends at
  end-of-text, at a line starting `User:`, or at any stop string given.
- `finish_reason` is "stop" (a stop string or end-of-text) or "length" (max_tokens reached); usage
  counts the prompt's tokens (the start token for an empty prompt) and every generated token.
- Streams are server-sent events; an error after the stream has begun is a `data: {"error": ...}`
  event followed by `data: [DONE]`. A client that disconnects cancels its generation at the next
  token, streaming or not.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, create_model

from gptlab.config import SAMPLE_FIELD_NAMES, SampleConfig, SettingError
from gptlab.errors import GptlabError
from gptlab.serve.limits import Busy, Job, Limits
from gptlab.serve.models import ServedModel
from gptlab.serve.params import api_config

COMPLETION_MAX_TOKENS = 16
CHAT_MAX_TOKENS = 256
CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = "\nUser:"

# What each field accepts, for the message when a request gives the wrong type.
EXPECTED = {
    "model": "a string (a name from GET /v1/models)", "prompt": "a string or a list of strings",
    "messages": "a list of {role, content} objects", "max_tokens": "an integer", "max_completion_tokens": "an integer",
    "temperature": "a number", "top_p": "a number", "n": "an integer", "seed": "an integer",
    "stop": "a string or a list of strings", "stream": "true or false", "echo": "true or false",
    "stream_options": 'an object like {"include_usage": true}', "role": "one of system, user, assistant",
    "content": "a string or a list of text parts", "user": "a string",
}


class ApiError(Exception):
    """An error answered in OpenAI's envelope."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers

    def body(self) -> dict[str, Any]:
        """The JSON body: {"error": {...}}."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        """The HTTP response."""
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


# ---- request bodies ----

class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool | None = None


class OpenAISampling(BaseModel):
    """What completions and chat share in OpenAI's API: the model and how to sample."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


def _knobs() -> dict[str, Any]:
    """Every other sampling setting the table gives an API name (top_k, min_p, ...), typed from SampleConfig."""
    knobs: dict[str, Any] = {}
    for name, names in SAMPLE_FIELD_NAMES.items():
        param = names["api"]
        if param is None or param in OpenAISampling.model_fields:
            continue
        kind = str(SampleConfig.__dataclass_fields__[name].type)
        knobs[param] = (float | None, None) if kind.startswith("float") else (int | None, None)
        EXPECTED.setdefault(param, "a number" if kind.startswith("float") else "an integer")
    return knobs


# OpenAI's fields plus gptlab's own knobs (`extra_body` in the openai client).
Sampling = create_model("Sampling", __base__=OpenAISampling, **_knobs())


class CompletionRequest(Sampling):
    """POST /v1/completions."""

    prompt: str | list[str] | None = None
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: str | list[TextPart] | None = None


class ChatRequest(Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


# ---- errors ----

def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 for a body it could not read, as OpenAI's 400."""
    return _validation_error(exc.errors()).response()


def _validation_error(errors: Sequence[Any]) -> ApiError:
    first = errors[0]
    kind, loc = first.get("type", ""), [str(x) for x in first.get("loc", ()) if x != "body"]
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return ApiError(400, f"the request body is not valid JSON ({detail} at character {loc[0] if loc else '?'}); "
                             "send a JSON object with Content-Type: application/json", code="invalid_json")
    if not loc:
        if kind == "missing":
            return ApiError(400, "the request body is missing; send a JSON object with Content-Type: application/json")
        return ApiError(400, f"the request body must be a JSON object (sent with Content-Type: application/json), "
                             f"got {_short(first.get('input'))}")
    # Nested places read as messages[0].content; a union's member (str, list[str]) is not a place.
    fields = {f for model in (ChatRequest, CompletionRequest, ChatMessage, TextPart, StreamOptions)
              for f in model.model_fields}
    param = loc[0]
    for part in loc[1:]:
        if part.isdigit():
            param += f"[{part}]"
        elif part in fields:
            param += f".{part}"
    name = param.split(".")[-1].split("[")[0]
    if kind == "missing":
        return ApiError(400, f"{param} is required", param=param)
    expected = EXPECTED.get(name)
    if expected is None or param.endswith("]"):
        return ApiError(400, f"{param}: {first.get('msg', 'invalid value')}", param=param)
    return ApiError(400, f"{param} must be {expected}, got {_short(first.get('input'))}", param=param)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- turning a request into work ----

@dataclass
class Plan:
    """A checked request: which model, which prompts, how to sample."""

    served: ServedModel
    prompts: list[str]
    config: SampleConfig
    prompt_tokens: int
    stream: bool
    include_usage: bool


def find_model(models: Mapping[str, ServedModel], name: str | None) -> ServedModel:
    """The model a request names (the first one served when it names none)."""
    if name is None:
        first = next(iter(models), None)
        if first is None:
            raise ApiError(404, "this server has no model yet; train a run first", param="model",
                           code="model_not_found")
        return models[first]
    if name not in models:
        raise ApiError(404, f"the model {name!r} does not exist; this server has {', '.join(map(repr, models))} "
                            "(GET /v1/models lists them)", param="model", code="model_not_found")
    return models[name]


def sample_config(body: Sampling, limits: Limits, default_max_tokens: int, max_tokens: int | None,
                  extra_stop: tuple[str, ...] = ()) -> SampleConfig:
    """The SampleConfig a request asks for, or a 400 naming the parameter."""
    unsupported = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}}
    for name, neutral in unsupported.items():
        value = getattr(body, name)
        if value is not None and value != neutral:
            raise ApiError(400, f"{name} is not supported by this server; use repetition_penalty (e.g. 1.1) instead",
                           param=name)
    try:
        return api_config({**body.model_dump(), "max_tokens": max_tokens}, limits, default_max_tokens, extra_stop)
    except SettingError as e:
        raise ApiError(400, e.message_for("api"), param=e.name_for("api")) from None


def check_prompts(served: ServedModel, prompts: list[str], limits: Limits, param: str) -> int:
    """The prompts' total token count, after checking their length and that the tokenizer takes them."""
    total = 0
    for prompt in prompts:
        size = len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)
        if size > limits.max_prompt_chars:
            raise ApiError(400, f"{param} is {size:,} characters; this server takes at most "
                                f"{limits.max_prompt_chars:,} (--max-prompt-chars)", param=param)
        try:
            total += served.prompt_tokens(prompt)
        except GptlabError as e:
            raise ApiError(400, f"{param}: {e}", param=param) from None
    return total


def chat_prompt(messages: Sequence[ChatMessage]) -> str:
    """Chat messages as the plain text a base model continues: `Role: content` lines, then `Assistant:`."""
    lines = [f"{CHAT_ROLES[m['role']]}: {m['content']}" for m in chat_messages(messages)]
    return "\n".join(lines + ["Assistant:"])


def chat_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """The messages as {role, content} text, checked (a run fine-tuned for chat reads them with its template)."""
    out = []
    for i, m in enumerate(messages):
        role = CHAT_ROLES.get(m.role)
        if role is None:
            raise ApiError(400, f"messages[{i}].role must be one of system, user, assistant, got {m.role!r}",
                           param=f"messages[{i}].role")
        if isinstance(m.content, list):
            parts = []
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise ApiError(400, f"messages[{i}].content[{j}] must be a text part ({{\"type\": \"text\", "
                                        f"\"text\": ...}}); this model reads text only, got type {part.type!r}",
                                   param=f"messages[{i}].content")
                parts.append(part.text)
            content = "".join(parts)
        else:
            content = m.content or ""
        out.append({"role": m.role, "content": content})
    return out


# ---- responses ----

def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def _error_body(e: BaseException) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, GptlabError):
        return ApiError(400, str(e))
    return ApiError(500, f"generation failed ({type(e).__name__}: {e})", type="server_error")


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(job: Job, request: Request, choices: int) -> tuple[list[str], list[str], int]:
    """Every choice's text and finish reason, and the generated tokens; cancels the job if the client leaves."""
    texts: list[list[str]] = [[] for _ in range(choices)]
    reasons = ["length"] * choices
    tokens = 0

    async def consume() -> None:
        nonlocal tokens
        async for index, piece, finish in job:
            texts[index].append(piece)
            if finish is not None:
                reasons[index] = finish.reason
                tokens += finish.tokens

    work = asyncio.ensure_future(consume())
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():  # the client left
            job.cancel()
            work.cancel()
    if work.cancelled():
        raise ApiError(499, "the client closed the connection", code="client_closed")
    if work.exception() is not None:
        raise _error_body(work.exception()) from work.exception()
    return ["".join(t) for t in texts], reasons, tokens


def submit(plan: Plan) -> Job:
    """The plan's generation queued on its model, or a 429 when the queue is full."""
    try:
        return plan.served.queue.submit(lambda: plan.served.work(plan.prompts, plan.config))
    except Busy as e:
        raise ApiError(429, str(e), type="server_busy", code="queue_full",
                       headers={"Retry-After": str(e.retry_after)}) from None


def make_plan(models: Mapping[str, ServedModel], limits: Limits, body: Sampling, prompts: list[str], param: str,
              default_max: int, max_tokens: int | None, extra_stop: tuple[str, ...] = ()) -> Plan:
    """A request checked against the server: its model, its SampleConfig, its prompts' size."""
    served = find_model(models, body.model)
    config = sample_config(body, limits, default_max, max_tokens, extra_stop)
    if config.num_samples * len(prompts) > limits.max_n:
        raise ApiError(400, f"n times the number of prompts must be at most {limits.max_n} (this server's "
                            f"--max-n), got {config.num_samples} x {len(prompts)}", param="n")
    prompt_tokens = check_prompts(served, prompts, limits, param)
    try:
        # The prompts run one after another; their total length bounds the longest (no second encoding).
        served.check_memory(config, prompt_tokens)
    except SettingError as e:
        raise ApiError(400, e.message_for("api"), param=e.name_for("api")) from None
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return Plan(served, prompts, config, prompt_tokens, bool(body.stream), include_usage)


async def answer_completions(models: Mapping[str, ServedModel], limits: Limits, body: CompletionRequest,
                             request: Request) -> Any:
    """Continue a prompt (or each of a list of prompts)."""
    for name in ("logprobs", "suffix"):
        if getattr(body, name) is not None:
            raise ApiError(400, f"{name} is not supported by this server; leave it out", param=name)
    if body.best_of not in (None, 1):
        raise ApiError(400, "best_of is not supported by this server; use n for several samples", param="best_of")
    prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt or ""]
    if not prompts:
        raise ApiError(400, "prompt is an empty list; give a string or a list of strings", param="prompt")
    p = make_plan(models, limits, body, prompts, "prompt", COMPLETION_MAX_TOKENS, body.max_tokens)
    job = submit(p)
    rid, created, name = f"cmpl-{uuid.uuid4().hex}", int(time.time()), p.served.name
    n = p.config.num_samples
    echo = [p.prompts[i // n] if body.echo else "" for i in range(n * len(p.prompts))]

    def chunk(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
        out = {"id": rid, "object": "text_completion", "created": created, "model": name, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    if p.stream:
        async def events() -> AsyncIterator[str]:
            for index, text in enumerate(echo):
                if text:
                    yield _sse(chunk([{"index": index, "text": text, "logprobs": None, "finish_reason": None}]))
            counted = _Counted(job)
            async for index, piece, finish in counted:
                yield _sse(chunk([{"index": index, "text": piece, "logprobs": None,
                                   "finish_reason": finish}]))
            if p.include_usage:
                yield _sse(chunk([], _usage(p.prompt_tokens, counted.tokens)))
        return StreamingResponse(_guard(events(), job), media_type="text/event-stream")

    texts, reasons, tokens = await collect(job, request, n * len(p.prompts))
    choices = [{"index": i, "text": echo[i] + t, "logprobs": None, "finish_reason": r}
               for i, (t, r) in enumerate(zip(texts, reasons))]
    return chunk(choices, _usage(p.prompt_tokens, tokens))


async def answer_chat(models: Mapping[str, ServedModel], limits: Limits, body: ChatRequest, request: Request) -> Any:
    """Answer a conversation: with the run's chat template when it was fine-tuned for chat, else the plain one."""
    if body.logprobs:
        raise ApiError(400, "logprobs is not supported by this server; leave it out", param="logprobs")
    if body.tools:
        raise ApiError(400, "tools are not supported by this base model; leave them out", param="tools")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise ApiError(400, "response_format other than text is not supported", param="response_format")
    if not body.messages:
        raise ApiError(400, "messages is empty; give at least one {role, content} message", param="messages")
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise ApiError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if find_model(models, body.model).model.chats:  # its own template; the reply ends at its end-of-turn
        p = make_plan(models, limits, body, [chat_messages(body.messages)], "messages", CHAT_MAX_TOKENS, max_tokens)
    else:
        p = make_plan(models, limits, body, [chat_prompt(body.messages)], "messages", CHAT_MAX_TOKENS, max_tokens,
                      (CHAT_STOP,))
    job = submit(p)
    rid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), p.served.name
    n = p.config.num_samples

    def chunk(obj: str, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
        out = {"id": rid, "object": obj, "created": created, "model": name, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    if p.stream:
        def delta(index: int, d: dict[str, str], finish: str | None = None) -> str:
            return _sse(chunk("chat.completion.chunk",
                              [{"index": index, "delta": d, "logprobs": None, "finish_reason": finish}]))

        async def events() -> AsyncIterator[str]:
            for index in range(n):
                yield delta(index, {"role": "assistant", "content": ""})
            counted = _Counted(job)
            async for index, piece, finish in counted:
                if piece:
                    yield delta(index, {"content": piece})
                if finish is not None:
                    yield delta(index, {}, finish)
            if p.include_usage:
                yield _sse(chunk("chat.completion.chunk", [], _usage(p.prompt_tokens, counted.tokens)))
        return StreamingResponse(_guard(events(), job), media_type="text/event-stream")

    texts, reasons, tokens = await collect(job, request, n)
    choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": r}
               for i, (t, r) in enumerate(zip(texts, reasons))]
    return chunk("chat.completion", choices, _usage(p.prompt_tokens, tokens))


def build_router(models: Mapping[str, ServedModel], limits: Limits) -> APIRouter:
    """The /v1 routes for `models` (name -> loaded model)."""
    router = APIRouter(prefix="/v1")

    def model_object(m: ServedModel) -> dict[str, Any]:
        return {"id": m.name, "object": "model", "created": m.created, "owned_by": "gptlab"}

    @router.get("/models")
    async def list_models() -> dict[str, Any]:
        """The models this server holds."""
        return {"object": "list", "data": [model_object(m) for m in models.values()]}

    @router.get("/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        """One model."""
        return model_object(find_model(models, name))

    @router.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        """Continue a prompt (or each of a list of prompts)."""
        return await answer_completions(models, limits, body, request)

    @router.post("/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Any:
        """Answer a conversation: with the run's chat template when it was fine-tuned for chat, else the plain one."""
        return await answer_chat(models, limits, body, request)

    @router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
    async def unknown_route(path: str, request: Request) -> None:
        raise ApiError(404, f"no route {request.method} /v1/{path}; this API has GET /v1/models, "
                            "POST /v1/completions and POST /v1/chat/completions", code="unknown_url")

    return router


class _Counted:
    """A job's events as (index, piece, finish reason or None), counting generated tokens as samples end."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.tokens = 0

    async def __aiter__(self) -> AsyncIterator[tuple[int, str, str | None]]:
        async for index, piece, finish in self.job:
            if finish is not None:
                self.tokens += finish.tokens
            if piece or finish is not None:
                yield index, piece, None if finish is None else finish.reason


async def _guard(events: AsyncIterator[str], job: Job) -> AsyncIterator[str]:
    """The events, an error as a `data: {"error": ...}` event, then `data: [DONE]`; the job stops if the client leaves."""
    try:
        try:
            async for event in events:
                yield event
        except Exception as e:  # the response has begun: the error can only be an event now
            yield _sse(_error_body(e).body())
        yield _sse("[DONE]")
    finally:
        job.cancel()

