"""`gptlab serve RUN --chainlit` in a real headless Chromium: a two-turn conversation in the Chainlit chat.

The chat decodes greedily, so each reply must be exactly what the run itself gives for the same
conversation. Every request the page makes must go to the server's own address. The screenshot goes to
the test's folder (and to $GPTLAB_SCREENSHOTS/chainlit.png when set: `GPTLAB_SCREENSHOTS=docs`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.servers import Server, browser_page

QUESTIONS = ["What is 12 + 7?", "And plus 3 more?"]
REPLY = '[data-step-type="assistant_message"] .message-content'


@pytest.fixture(scope="module", autouse=True)
def chainlit_installed() -> None:
    if importlib.util.find_spec("chainlit") is None:
        pytest.fail("chainlit is not installed: pip install 'gptlab[chainlit]' (make install puts in .[all])")


def expected_replies(run: Path, questions: list[str] = QUESTIONS) -> list[str]:
    """The run's own greedy replies to `questions`, each turn after the true history."""
    from gptlab import load
    from gptlab.serve.openai_api import CHAT_MAX_TOKENS

    model = load(run)
    messages: list[dict[str, str]] = []
    replies = []
    for question in questions:
        messages.append({"role": "user", "content": question})
        text = "".join(piece for _, piece, _ in model.chat_events(messages, temperature=0.0,
                                                                   max_new_tokens=CHAT_MAX_TOKENS))
        messages.append({"role": "assistant", "content": text})
        replies.append(text)
    return replies


def test_chainlit_chat_in_a_real_browser(chat_run, chromium, tmp_path):
    from playwright.sync_api import expect

    work, temp = tmp_path / "work", tmp_path / "temp"
    work.mkdir()
    temp.mkdir()
    server = Server(str(chat_run), "--chainlit", cwd=work, env={"TMPDIR": str(temp)})
    requests: list[str] = []
    try:
        assert f"{server.url}/chainlit" in server.output
        with browser_page(chromium, requests) as page:
            page.goto(server.url + "/chainlit", timeout=60_000)
            replies = page.locator(REPLY)
            for turn, question in enumerate(QUESTIONS, 1):
                page.locator("#chat-input").fill(question)
                page.locator("#chat-submit").click()
                expect(page.get_by_text(question)).to_be_visible(timeout=10_000)
                expect(replies).to_have_count(turn, timeout=20_000)
                expect(page.locator("#stop-button")).to_have_count(0, timeout=20_000)  # the reply is whole
            shown = [" ".join(t.split()) for t in replies.all_inner_texts()]
            page.get_by_text(QUESTIONS[0]).scroll_into_view_if_needed()  # both turns in the picture
            page.screenshot(path=str(tmp_path / "chainlit.png"), full_page=True)
        health = httpx.get(f"{server.url}/health", timeout=5).json()
    finally:
        server.stop()
    print(f"screenshot: {tmp_path / 'chainlit.png'}")
    expected = [" ".join(t.split()) for t in expected_replies(chat_run)]
    assert all(shown) and shown == expected, f"the chat showed {shown}, the run gives {expected}"
    alone = " ".join(expected_replies(chat_run, QUESTIONS[1:])[0].split())
    assert alone != expected[1], "the second reply does not show whether the first turn was kept"
    assert health["models"][chat_run.name]["running"] == 0
    host = urlsplit(server.url).netloc
    outside = [u for u in requests if urlsplit(u).scheme in ("http", "https", "ws", "wss") and urlsplit(u).netloc != host]
    assert not outside, f"the chat reached beyond {host}: {outside}"
    assert any("/chainlit/ws/socket.io" in u for u in requests)
    assert not list(work.iterdir()), "serving wrote into its folder"
    assert not list(temp.glob("gptlab-chainlit-*")), "Chainlit's app root outlived the server"
    target = os.environ.get("GPTLAB_SCREENSHOTS")
    if target:
        shutil.copy(tmp_path / "chainlit.png", Path(target) / "chainlit.png")


def test_api_key_guards_the_chat(chat_run, chromium, tmp_path):
    """With --api-key, the chat's socket and routes need Chainlit's login, whose password is the key."""
    server = Server(str(chat_run), "--chainlit", "--api-key", "sesame", cwd=tmp_path)
    try:
        with httpx.Client(base_url=f"{server.url}/chainlit", timeout=10) as client:
            assert client.get("/auth/config").json()["requireLogin"] is True
            assert client.get("/project/settings", params={"language": "en-US"}).status_code == 401
            assert not socket_connects(client)
            assert client.post("/login", data={"username": "me", "password": "wrong"}).status_code == 401
            assert client.post("/login", data={"username": "me", "password": "sesame"}).status_code == 200
            assert client.get("/project/settings", params={"language": "en-US"}).status_code == 200
            assert socket_connects(client)
    finally:
        server.stop()


def socket_connects(client: httpx.Client) -> bool:
    """Whether Chainlit's Socket.IO accepts a connection from `client` (Engine.IO long-polling, by hand)."""
    import json

    base = "/ws/socket.io/?EIO=4&transport=polling"
    sid = json.loads(client.get(base).text[1:])["sid"]
    client.post(f"{base}&sid={sid}", content='40{"sessionId": "s", "clientType": "webapp"}')
    answer = client.get(f"{base}&sid={sid}").text
    assert answer.startswith(("40", "44")), answer
    return answer.startswith("40")
