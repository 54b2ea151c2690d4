"""The page of `gptlab serve` in a real headless Chromium: type, click Generate, watch the text arrive.

Playwright drives the system Chromium (`apt-get install chromium`, which `make test` does; or set
GPTLAB_CHROMIUM to a Chromium or Chrome binary). Without one the test fails and says how to get it.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from tests.servers import browser_page, main_server, wait_idle

MODEL = "tiny"



def test_page_generates_in_a_real_browser(tiny_run, chromium, tmp_path):
    from playwright.sync_api import expect

    server = main_server(tiny_run)
    requests: list[str] = []
    with browser_page(chromium, requests) as page:
        page.goto(server.url + "/", timeout=60_000)
        page.locator("#prompt textarea").fill("ROMEO:")
        page.locator("#generate").click()
        output = page.locator("#output textarea")
        expect(output).to_have_value(lambda_value_startswith("ROMEO:"), timeout=30_000)
        page.wait_for_function(
            "() => document.querySelector('#output textarea').value.length >= 'ROMEO:'.length + 200",
            timeout=30_000,
        )
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        text = output.input_value()

        # A long generation, stopped with the Stop button: the server frees the model at once.
        max_tokens = page.get_by_label("number input for Max new tokens")
        max_tokens.fill("20000")
        max_tokens.press("Enter")
        page.locator("#generate").click()
        page.wait_for_function(
            "() => document.querySelector('#output textarea').value.length >= 'ROMEO:'.length + 300",
            timeout=30_000,
        )
        page.locator("#stop").click()
        assert wait_idle(server.url, MODEL, timeout=5) < 5
        stopped = output.input_value()
        assert len(stopped) < len("ROMEO:") + 20000
        page.get_by_role("tab", name="Model").click()
        expect(page.get_by_text("best val loss")).to_be_visible(timeout=10_000)
        expect(page.locator("img").first).to_be_visible(timeout=10_000)
        page.screenshot(path=str(tmp_path / "model.png"), full_page=True)
    print(f"screenshot: {tmp_path / 'page.png'}")
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 200  # the page's default max new tokens
    host = urlsplit(server.url).netloc
    outside = [u for u in requests if urlsplit(u).scheme in ("http", "https", "ws", "wss") and urlsplit(u).netloc != host]
    assert not outside, f"the page reached beyond {host}: {outside}"
    assert any("/gradio_api/" in u for u in requests)
    wait_idle(server.url, MODEL)


def lambda_value_startswith(prefix: str):
    """A regular expression matching values that start with `prefix`."""
    import re

    return re.compile("^" + re.escape(prefix))
