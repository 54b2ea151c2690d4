"""The OpenAI-compatible API of `gptlab serve`, driven by the official `openai` client against a real server."""

from __future__ import annotations

import json
import shutil
import time

import httpx
import openai
import pytest

from tests.servers import ThreadServer, main_server, wait_idle

MODEL = "tiny"  # the folder name of the conftest run


@pytest.fixture(scope="module")
def server(tiny_run):
    return main_server(tiny_run)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)


def test_banner_prints_urls_and_client_snippet(server):
    out = server.output
    for text in (f"page    {server.url}/", f"API     {server.url}/v1", f"health  {server.url}/health",
                 "from openai import OpenAI", f'OpenAI(base_url="{server.url}/v1", api_key="none")',
                 f'model="{MODEL}"'):
        assert text in out, out


def test_health_and_models(server, client):
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok"
    assert health["models"][MODEL]["concurrency"] == 2
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "gptlab"


def test_completion_counts_tokens_and_says_length(client):
    r = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=20, temperature=0.8, seed=1)
    assert r.object == "text_completion" and r.model == MODEL
    (choice,) = r.choices
    assert choice.finish_reason == "length"
    assert len(choice.text) == 20  # one character per token
    assert r.usage.prompt_tokens == len("ROMEO:")
    assert r.usage.completion_tokens == 20 and r.usage.total_tokens == 26


def test_seed_reproducibility(client):
    def text(seed):
        return client.completions.create(model=MODEL, prompt="JULIET:", max_tokens=30, seed=seed).choices[0].text

    assert text(7) == text(7)
    assert text(7) != text(8)


def test_n_gives_distinct_choices(client):
    r = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=30, n=2, seed=3)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text != r.choices[1].text
    assert r.usage.completion_tokens == 60


def test_prompt_list_gives_n_choices_per_prompt(client):
    r = client.completions.create(model=MODEL, prompt=["ROMEO:", "JULIET:"], max_tokens=5, n=2, seed=3)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == len("ROMEO:") + len("JULIET:")


def test_stop_string_ends_with_stop_reason(client):
    r = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=400, stop=["e"], seed=5)
    choice = r.choices[0]
    assert choice.finish_reason == "stop"
    assert "e" not in choice.text and len(choice.text) < 400


def test_empty_prompt_and_echo(client):
    assert client.completions.create(model=MODEL, prompt="", max_tokens=10, seed=1).choices[0].text
    r = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=10, seed=1, echo=True)
    assert r.choices[0].text.startswith("ROMEO:")


def test_extra_parameters_top_k_and_repetition_penalty(client):
    greedy = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=20, temperature=0).choices[0].text
    top1 = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=20, seed=9,
                                     extra_body={"top_k": 1}).choices[0].text
    assert top1 == greedy  # top-k 1 is argmax whatever the seed
    penalized = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=20, temperature=0,
                                          extra_body={"repetition_penalty": 5.0}).choices[0].text
    assert penalized != greedy


def test_streaming_completion_joins_to_the_same_text(client):
    whole = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=40, n=2, seed=11)
    pieces = {0: [], 1: []}
    finish = {}
    usage = None
    for chunk in client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=40, n=2, seed=11, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces[c.index].append(c.text)
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert len(pieces[0]) > 5  # it came in pieces
    assert ["".join(pieces[i]) for i in (0, 1)] == [c.text for c in whole.choices]
    assert finish == {0: "length", 1: "length"}
    assert usage.completion_tokens == 80


def test_chat_completion_and_stream(client):
    messages = [{"role": "system", "content": "You speak like a play."}, {"role": "user", "content": "Who art thou?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, seed=4)
    assert r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert "\nUser:" not in msg.content
    assert r.choices[0].finish_reason in ("stop", "length")
    prompt = "System: You speak like a play.\nUser: Who art thou?\nAssistant:"
    assert r.usage.prompt_tokens == len(prompt)

    deltas, roles, reasons = [], [], []
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, seed=4, stream=True):
        assert chunk.object == "chat.completion.chunk"
        d = chunk.choices[0].delta
        roles += [d.role] if d.role else []
        deltas.append(d.content or "")
        reasons += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
    assert roles == ["assistant"]
    assert "".join(deltas) == msg.content
    assert reasons == [r.choices[0].finish_reason]


def test_bad_value_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="ROMEO:", temperature=-1)
    assert e.value.status_code == 400
    assert "temperature must be a number >= 0" in e.value.message
    with pytest.raises(openai.NotFoundError, match="nosuch"):
        client.completions.create(model="nosuch", prompt="ROMEO:")


def test_bad_min_p_names_the_parameter(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="ROMEO:", extra_body={"min_p": 1.5})
    assert e.value.body["param"] == "min_p"
    assert e.value.body["message"] == "min_p must be in [0, 1] (0 = off), got 1.5"


def test_min_p_reaches_generation(client):
    greedy = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=30, temperature=0).choices[0].text
    hot = client.completions.create(model=MODEL, prompt="ROMEO:", max_tokens=30, temperature=2.0, seed=1,
                                    extra_body={"min_p": 1.0}).choices[0].text
    assert hot == greedy  # min_p 1 keeps only the most likely token


def test_every_api_name_in_the_table_is_a_request_field():
    from gptlab.config import SAMPLE_FIELD_NAMES
    from gptlab.serve.openai_api import Sampling

    names = {names["api"] for names in SAMPLE_FIELD_NAMES.values() if names["api"]}
    assert names - set(Sampling.model_fields) == set()


def test_raw_stream_is_server_sent_events(server):
    with httpx.stream("POST", f"{server.url}/v1/completions",
                      json={"model": MODEL, "prompt": "ROMEO:", "max_tokens": 5, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_streaming_client_that_disconnects_stops_generation(server):
    start = time.monotonic()
    with httpx.stream("POST", f"{server.url}/v1/completions",
                      json={"model": MODEL, "prompt": "ROMEO:", "max_tokens": 20000, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one piece, then leave
    assert wait_idle(server.url, MODEL, timeout=3) < 3
    assert time.monotonic() - start < 6  # 20,000 tokens would take far longer


def test_waiting_client_that_disconnects_stops_generation(server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "ROMEO:", "max_tokens": 20000},
                   timeout=httpx.Timeout(5, read=0.5))
    assert wait_idle(server.url, MODEL, timeout=3) < 3


def test_health_answers_while_generating(server):
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{server.url}/v1/completions",
                         json={"model": MODEL, "prompt": "", "max_tokens": 20000, "stream": True}) as r:
            lines = r.iter_lines()  # held: a dropped iterator closes the response
            next(lines)
            t0 = time.monotonic()
            health = httpx.get(f"{server.url}/health", timeout=5).json()
            assert time.monotonic() - t0 < 1.0
            assert health["models"][MODEL]["running"] == 1
    wait_idle(server.url, MODEL)


def test_several_models_by_name(tmp_path, tiny_run):
    from gptlab.serve import Limits, build_app, load_models

    for name in ("a", "b"):
        shutil.copytree(tiny_run, tmp_path / name)
    models = load_models([tmp_path / "a", tmp_path / "b"], Limits(concurrency=1, queue_size=2))
    server = ThreadServer(build_app(models, page=False))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["a", "b"]
        texts = [client.completions.create(model=m, prompt="ROMEO:", max_tokens=10, seed=2).choices[0].text
                 for m in ("a", "b")]
        assert texts[0] == texts[1]  # the same weights under two names
        assert httpx.get(f"{server.url}/health").json()["models"].keys() == {"a", "b"}
    finally:
        server.stop()


def test_finish_reasons_from_generation(tiny_run, one_thread):
    from gptlab.generation import load

    tm = load(tiny_run, device="cpu")
    ends = {row: f for row, _, f in tm.events("ROMEO:", max_new_tokens=30, num_samples=2, seed=1) if f}
    assert ends == {0: ("length", 30), 1: ("length", 30)}
    ends = [f for _, _, f in tm.events("ROMEO:", max_new_tokens=300, stop="e", seed=1) if f]
    assert ends[0].reason == "stop" and ends[0].tokens < 300
    # A char model has no end-of-text token; treat "e" as one to see a sample end on it.
    tm.engine.eot_id = tm.tokenizer.encode("e")[0]
    ends = [f for _, _, f in tm.events("ROMEO:", max_new_tokens=300, seed=1) if f]
    assert ends[0].reason == "stop" and ends[0].tokens < 299


def test_concurrent_seeded_requests_are_decoded_together_and_each_gives_its_own_text(tiny_run, one_thread):
    """Eight requests with different settings at once: one batch, and each text is what the library gives alone."""
    from concurrent.futures import ThreadPoolExecutor

    from gptlab.generation import load
    from gptlab.serve import Limits, build_app, load_models

    requests = [
        dict(prompt="ROMEO:", max_tokens=120, seed=1, temperature=0.8),
        dict(prompt="JULIET:", max_tokens=90, seed=2, temperature=1.2, extra_body={"top_k": 5}),
        dict(prompt="First Citizen:", max_tokens=150, seed=3, top_p=0.9, n=2),
        dict(prompt="KING", max_tokens=100, seed=4, temperature=0, extra_body={"repetition_penalty": 1.3}),
        dict(prompt="\n", max_tokens=130, seed=5, stop=["e\n", "the"]),
        dict(prompt="O", max_tokens=110, seed=6, extra_body={"min_p": 0.1}),
        dict(prompt="What", max_tokens=80, seed=7, temperature=0.5, stream=True),
        dict(prompt="ROMEO:", max_tokens=140, seed=8, temperature=0.8),
    ]
    alone = load(tiny_run, device="cpu")

    def expected(r):
        extra = r.get("extra_body", {})
        return alone.generate(r["prompt"], max_new_tokens=r["max_tokens"], seed=r["seed"], num_samples=r.get("n", 1),
                              temperature=r.get("temperature", 1.0), top_p=r.get("top_p", 1.0),
                              stop=tuple(r.get("stop", ())), **extra)

    server = ThreadServer(build_app(load_models([tiny_run], Limits(concurrency=8)), page=False))
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)

        def ask(r):
            reply = client.completions.create(model=MODEL, **r)
            if r.get("stream"):
                return ["".join(chunk.choices[0].text for chunk in reply if chunk.choices)]
            return [c.text for c in sorted(reply.choices, key=lambda c: c.index)]

        with ThreadPoolExecutor(len(requests)) as pool:
            got = list(pool.map(ask, requests))
        assert got == [expected(r) for r in requests]
        health = httpx.get(f"{server.url}/health").json()["models"][MODEL]
        assert health["batch_widest"] >= 4, health  # they were decoded together, not in turn
        assert health["batch_rows"] == 0 and health["running"] == 0
    finally:
        server.stop()
