"""The Chat tab of `gptlab serve` in a real headless Chromium: two turns with a chat run, checked against the model.

The page's temperature is set to 0, so each reply is the greedy one: the test computes it with
`gptlab.load(run).chat_events` and expects exactly that text on the page. The second reply is the one
to the whole conversation (system prompt, first turn, second message), which shows that the server
was given the history and not the last message alone. The screenshot goes to the test's folder (and
to $GPTLAB_SCREENSHOTS as chat-tab.png when set: `GPTLAB_SCREENSHOTS=docs pytest tests/test_chat_page.py`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

from tests.servers import Server, browser_page, wait_idle

SYSTEM = "You answer in one line."
FIRST = "What is 12 + 7?"
SECOND = "And plus 3 more?"
MAX_TOKENS = 80

# Every text length the newest reply on the page goes through, to see it stream in.
WATCH_REPLY = """() => {
  window.replyLengths = [];
  new MutationObserver(() => {
    const bots = document.querySelectorAll('#chatbot [data-testid=bot]');
    if (bots.length) window.replyLengths.push(bots[bots.length - 1].innerText.length);
  }).observe(document.querySelector('#chatbot'), {subtree: true, childList: true, characterData: true});
}"""



def greedy_reply(run: Path, messages: list[dict[str, str]]) -> str:
    import gptlab

    model = gptlab.load(run)
    return "".join(piece for _, piece, _ in model.chat_events(messages, temperature=0, max_new_tokens=MAX_TOKENS))


def test_chat_tab_holds_a_conversation(chat_run, chromium, tmp_path):
    from playwright.sync_api import expect

    first_turn = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": FIRST}]
    first_reply = greedy_reply(chat_run, first_turn)
    history = [*first_turn, {"role": "assistant", "content": first_reply}, {"role": "user", "content": SECOND}]
    second_reply = greedy_reply(chat_run, history)
    alone = greedy_reply(chat_run, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": SECOND}])
    assert first_reply.strip() and second_reply.strip()

    server = Server(str(chat_run))
    requests: list[str] = []
    try:
        with browser_page(chromium, requests) as page:
            page.goto(server.url + "/", timeout=60_000)
            page.get_by_role("tab", name="Chat").click()
            settings = page.locator("#chat-settings")
            for label, value in (("Temperature", "0"), ("Max new tokens", str(MAX_TOKENS))):
                box = settings.get_by_label(f"number input for {label}")
                box.fill(value)
                box.press("Enter")
            page.locator("#system-prompt textarea").fill(SYSTEM)
            page.evaluate(WATCH_REPLY)
            message = page.locator("#chat-input textarea")
            bots = page.locator("#chatbot [data-testid=bot]")

            message.fill(FIRST)
            message.press("Enter")
            expect(bots.first).to_have_text(first_reply, timeout=30_000)  # whitespace-normalised
            lengths = page.evaluate("window.replyLengths")
            wait_idle(server.url, "chat")

            message.fill(SECOND)
            message.press("Enter")
            expect(bots.nth(1)).to_have_text(second_reply, timeout=30_000)
            wait_idle(server.url, "chat")
            users = page.locator("#chatbot [data-testid=user]")
            expect(users).to_have_count(2)
            expect(bots).to_have_count(2)
            shown = [users.nth(0).inner_text(), users.nth(1).inner_text()]
            answer = bots.nth(1).inner_text()
            page.screenshot(path=str(tmp_path / "chat-tab.png"), full_page=True)
    finally:
        server.stop()

    assert shown == [FIRST, SECOND]
    assert len({n for n in lengths if n > 0}) > 1, f"the first reply did not stream in: lengths {lengths}"
    if alone != second_reply:  # the tiny model may answer the same either way; then equality is all we can check
        assert answer.split() != alone.split()
    host = urlsplit(server.url).netloc
    outside = [u for u in requests if urlsplit(u).scheme in ("http", "https", "ws", "wss") and urlsplit(u).netloc != host]
    assert not outside, f"the page reached beyond {host}: {outside}"
    assert any("/gradio_api/" in u for u in requests)
    target = os.environ.get("GPTLAB_SCREENSHOTS")
    if target:
        shutil.copy(tmp_path / "chat-tab.png", Path(target) / "chat-tab.png")
