"""Bad requests to a real `gptlab serve`, and bad `gptlab serve` command lines.

Every bad request gets its status code, OpenAI's error envelope {"error": {"message", "type",
"param", "code"}} and a message that names the problem; every bad command line exits with code 2
and one line on stderr, without a traceback. The rows of docs/errors.md ("Serving") come from here.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys

import httpx
import pytest

from tests.servers import REPO, ThreadServer, main_server

MODEL = "tiny"


@pytest.fixture(scope="module")
def server(tiny_run):
    return main_server(tiny_run)


def post(server, path: str, body, **kw) -> httpx.Response:
    if isinstance(body, (dict, list)):
        return httpx.post(f"{server.url}{path}", json=body, timeout=30, **kw)
    return httpx.post(f"{server.url}{path}", content=body, timeout=30,
                      headers={"Content-Type": "application/json", **kw.pop("headers", {})}, **kw)


def assert_error(r: httpx.Response, status: int, *expect: str, param: str | None = "any") -> dict:
    """Status, the envelope's four keys, and every `expect` string in the message."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    for text in expect:
        assert text in error["message"], error
    if param != "any":
        assert error["param"] == param, error
    return error


# ---- request bodies ----

BAD_REQUESTS = {
    "malformed JSON": ("/v1/completions", b'{"prompt": "ROMEO:", "max_tokens": 5', 400,
                       ("not valid JSON", "Content-Type: application/json"), None),
    "body not an object": ("/v1/completions", [1, 2], 400, ("must be a JSON object",), None),
    "max_tokens as text": ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400,
                           ('max_tokens must be an integer, got "ten"',), "max_tokens"),
    "max_tokens as a decimal": ("/v1/completions", {"prompt": "x", "max_tokens": 2.5}, 400,
                                ("max_tokens must be an integer, got 2.5",), "max_tokens"),
    "temperature as text": ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400,
                            ('temperature must be a number, got "hot"',), "temperature"),
    "prompt as a number": ("/v1/completions", {"prompt": 5}, 400,
                           ("prompt must be a string or a list of strings, got 5",), "prompt"),
    "stream as text": ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400,
                       ('stream must be true or false, got "yes"',), "stream"),
    "messages as text": ("/v1/chat/completions", {"messages": "hi"}, 400,
                         ("messages must be a list of {role, content} objects",), "messages"),
    "messages missing": ("/v1/chat/completions", {"model": MODEL}, 400, ("messages is required",), "messages"),
    "message without a role": ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400,
                               ("messages[0].role is required",), "messages[0].role"),
    "unknown role": ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400,
                     ("messages[0].role must be one of system, user, assistant, got 'wizard'",), "messages[0].role"),
    "huge n": ("/v1/completions", {"prompt": "x", "n": 1000}, 400,
               ("n must be an integer from 1 to 4 (this server's --max-n), got 1000",), "n"),
    "huge max_tokens": ("/v1/completions", {"prompt": "x", "max_tokens": 10**9}, 400,
                        ("max_tokens must be an integer from 1 to 20,000 (this server's --max-new-tokens-limit), "
                         "got 1000000000",), "max_tokens"),
    "zero max_tokens": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
                        400, ("max_tokens must be an integer from 1 to 20,000",), "max_tokens"),
    "negative temperature": ("/v1/completions", {"prompt": "x", "temperature": -0.5}, 400,
                             ("temperature must be a number >= 0 (0 = greedy), got -0.5",), "temperature"),
    "top_p above 1": ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400,
                      ("top_p must be in (0, 1] (1 = off), got 1.5",), "top_p"),
    "top_k zero": ("/v1/completions", {"prompt": "x", "top_k": 0}, 400,
                   ("top_k must be an integer >= 1",), "top_k"),
    "negative seed": ("/v1/completions", {"prompt": "x", "seed": -1}, 400,
                      ("seed must be an integer from 0 to 2**63 - 1, got -1",), "seed"),
    "empty stop string": ("/v1/completions", {"prompt": "x", "stop": [""]}, 400,
                          ("stop strings must be non-empty text",), "stop"),
    "prompt too long": ("/v1/completions", {"prompt": "a" * 3000}, 400,
                        ("prompt is 3,000 characters; this server takes at most 2,000 (--max-prompt-chars)",),
                        "prompt"),
    "chat too long": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * 3000}]}, 400,
                      ("messages is 3,017 characters; this server takes at most 2,000",), "messages"),
    "character the tokenizer never saw": ("/v1/completions", {"prompt": "ROMEO\x01:"}, 400,
                                          ("never saw in training", "\\x01"), "prompt"),
    "unsupported parameter": ("/v1/completions", {"prompt": "x", "presence_penalty": 0.5}, 400,
                              ("presence_penalty is not supported", "repetition_penalty"), "presence_penalty"),
    "unknown model": ("/v1/completions", {"model": "nosuch", "prompt": "x"}, 404,
                      ("the model 'nosuch' does not exist; this server has 'tiny'",), "model"),
    "unknown route": ("/v1/embeddings", {"input": "x"}, 404,
                      ("no route POST /v1/embeddings", "POST /v1/completions"), None),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request(server, case):
    path, body, status, expect, param = BAD_REQUESTS[case]
    error = assert_error(post(server, path, body), status, *expect, param=param)
    assert error["type"] == "invalid_request_error"


def test_unknown_model_code(server):
    error = assert_error(post(server, "/v1/chat/completions",
                              {"model": "nosuch", "messages": [{"role": "user", "content": "x"}]}), 404)
    assert error["code"] == "model_not_found"


def test_body_too_large_is_refused_before_reading(server):
    r = httpx.post(f"{server.url}/v1/completions", content=b" " * (6 * 2000 * 4 + 65537),
                   headers={"Content-Type": "application/json"}, timeout=30)
    assert_error(r, 413, "this server reads at most")


def test_server_still_fine_after_bad_requests(server):
    r = post(server, "/v1/completions", {"prompt": "ROMEO:", "max_tokens": 3})
    assert r.status_code == 200 and len(r.json()["choices"][0]["text"]) == 3


# ---- the API key, and an error after a stream has begun ----

@pytest.fixture(scope="module")
def keyed(tiny_run):
    from gptlab.serve import Limits, build_app, load_models

    models = load_models([tiny_run], Limits(concurrency=1, queue_size=2))
    server = ThreadServer(build_app(models, Limits(), api_key="secret"))
    yield server
    server.stop()


def test_missing_api_key(keyed):
    error = assert_error(post(keyed, "/v1/completions", {"prompt": "x"}), 401, "missing API key", "Bearer")
    assert error["code"] == "invalid_api_key"
    assert_error(httpx.get(f"{keyed.url}/v1/models"), 401, "missing API key")


def test_wrong_api_key(keyed):
    r = post(keyed, "/v1/completions", {"prompt": "x"}, headers={"Authorization": "Bearer nope"})
    assert_error(r, 401, "wrong API key")
    r = post(keyed, "/v1/completions", b"{not json", headers={"Authorization": "Bearer nope"})
    assert_error(r, 401, "wrong API key")  # the key is checked before the body is read


def test_right_api_key_and_open_health(keyed):
    import openai

    client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="secret", max_retries=0)
    assert client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=4).choices[0].finish_reason == "length"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{keyed.url}/health").status_code == 200


def test_page_asks_for_the_key(keyed):
    assert httpx.get(f"{keyed.url}/config").status_code == 401
    with httpx.Client(base_url=keyed.url) as http:
        assert http.post("/login", data={"username": "me", "password": "nope"}).status_code == 400
        assert http.post("/login", data={"username": "me", "password": "secret"}).status_code == 200
        assert http.get("/config").status_code == 200


def test_error_after_the_stream_began_is_an_event(tiny_run):
    from gptlab.errors import GptlabError
    from gptlab.serve import Limits, build_app, load_models

    models = load_models([tiny_run], Limits(concurrency=1, queue_size=2))

    def broken_step(idx, cache):  # the first token comes from the prefill; the step after it fails
        raise GptlabError("slide must be from 1 to the context length (an injected failure)")

    models[0].model.model.decode_step = broken_step
    server = ThreadServer(build_app(models, page=False))
    try:
        with httpx.stream("POST", f"{server.url}/v1/completions",
                          json={"prompt": "ROMEO:", "max_tokens": 5, "stream": True}, timeout=30) as r:
            assert r.status_code == 200
            events = [line for line in r.iter_lines() if line]
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2][len("data: "):])["error"]
        assert "slide must be from 1" in error["message"] and set(error) == {"message", "type", "param", "code"}
        assert_error(post(server, "/v1/completions", {"prompt": "ROMEO:", "max_tokens": 5}), 400, "slide must be")
    finally:
        server.stop()


# ---- the command line ----

def gptlab_serve(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    env.pop("GPTLAB_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "gptlab", "serve", *args], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.fixture(scope="module")
def cli_results(tiny_run, tmp_path_factory):
    """Every bad command line, run at once (two at a time: each costs about two seconds of imports)."""
    empty = tmp_path_factory.mktemp("not-a-run")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    run = str(tiny_run)
    cases = {
        "missing run folder": (("nosuch",), ("run folder nosuch not found",)),
        "folder that is not a run": ((str(empty),), ("has no config.json", "not a gptlab run folder")),
        "port out of range": ((run, "--port", "70000"), ("--port must be from 1 to 65535",)),
        "port not a number": ((run, "--port", "http"), ("argument --port: invalid int value: 'http'",)),
        "port in use": ((run, "--port", str(port)), (f"port {port} on 127.0.0.1 is in use", "--port")),
        "host not on this machine": ((run, "--host", "10.255.255.1"), ("is not an address of this machine",)),
        "zero concurrency": ((run, "--concurrency", "0"), ("--concurrency must be an integer >= 1, got 0",)),
        "negative queue": ((run, "--queue-size", "-1"), ("--queue-size must be an integer >= 0",)),
        "zero token ceiling": ((run, "--max-new-tokens-limit", "0"), ("--max-new-tokens-limit must be an integer >= 1",)),
        "empty api key": ((run, "--api-key", ""), ("--api-key is empty",)),
        "no run at all": ((), ("the following arguments are required: RUN",)),
    }
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = {name: pool.submit(gptlab_serve, *args) for name, (args, _) in cases.items()}
            return {name: (futures[name].result(), cases[name][1]) for name in cases}
    finally:
        busy.close()


CLI_CASES = ["missing run folder", "folder that is not a run", "port out of range", "port not a number", "port in use",
             "host not on this machine", "zero concurrency", "negative queue", "zero token ceiling", "empty api key",
             "no run at all"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_bad_command_line(cli_results, case):
    proc, expect = cli_results[case]
    shown = f"\n--- stdout ---\n{proc.stdout}--- stderr ---\n{proc.stderr}"
    assert proc.returncode == 2, shown
    assert "Traceback" not in proc.stdout + proc.stderr, shown
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptlab"), shown
    for text in expect:
        assert text in lines[0], shown
