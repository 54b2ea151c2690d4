"""`gptlab ui` in a real headless Chromium: the whole path from a text file to a model you can sample and share.

Upload a text file, prepare it, start a ~20-second training and watch the loss chart and a sample
arrive, Stop, Resume, generate from the run, download its Hugging Face export, and check that every
request went to the server's own address. Screenshots of each tab go to the test's folder (and to
$GPTLAB_SCREENSHOTS when set: `GPTLAB_SCREENSHOTS=docs pytest tests/test_ui_browser.py` refreshes the
README's pictures).
"""

from __future__ import annotations

import os
import shutil
import time
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.servers import Server, browser_page

pytestmark = pytest.mark.slow



def status_text(page) -> str:
    return page.locator("#train-status").inner_text()


def wait_status(page, word: str, timeout: float) -> str:
    """Wait until the Train tab's status line says `word` (running, stopped, finished)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = status_text(page)
        if f": {word}" in text:
            return text
        time.sleep(0.25)
    raise AssertionError(f"the status never said {word!r}; it says: {status_text(page)}")


def test_the_whole_path_in_a_real_browser(chromium, shakespeare_text, tmp_path):
    from playwright.sync_api import expect

    text_file = tmp_path / "my notes.txt"
    text_file.write_text(shakespeare_text[:120_000], encoding="utf-8")
    shots = tmp_path / "shots"
    shots.mkdir()
    server = Server("--runs", tmp_path / "runs", "--data", tmp_path / "data", command="ui", cwd=tmp_path)
    requests: list[str] = []
    try:
        with browser_page(chromium, requests, (1400, 1000)) as page:
            page.goto(server.url + "/", timeout=60_000)

            # Data: upload, see what it holds, prepare.
            page.locator("#upload-files input[type=file]").set_input_files(str(text_file))
            expect(page.locator("#uploads")).to_contain_text("my_notes.txt", timeout=30_000)
            expect(page.locator("#data-stats")).to_contain_text("distinct characters", timeout=30_000)
            page.locator("#prepare").click()
            expect(page.locator("#prepared")).to_contain_text("Prepared", timeout=60_000)
            page.screenshot(path=str(shots / "ui-data.png"), full_page=True)

            # Train: ~20 seconds, evaluating often enough to see the chart move.
            page.get_by_role("tab", name="Train").click()
            expect(page.locator("#plan")).to_contain_text("parameters", timeout=30_000)
            page.locator("#budget input").fill("0.35")
            page.locator("#eval-interval input").fill("60")
            page.locator("#run-name textarea").fill("first")
            page.locator("#run-name textarea").press("Tab")
            expect(page.locator("#plan")).to_contain_text("first", timeout=10_000)
            page.locator("#start").click()
            wait_status(page, "running", 60)
            charts = chart_changes(page, lambda: evaluations(page) >= 2, timeout=90)
            expect(page.locator("#live-sample textarea")).not_to_have_value("", timeout=30_000)
            sample = page.locator("#live-sample textarea").input_value()
            page.screenshot(path=str(shots / "ui-train.png"), full_page=True)

            # Stop saves; Resume continues from the same step.
            page.locator("#stop-training").click()
            stopped = wait_status(page, "stopped", 60)
            page.locator("#resume").click()
            wait_status(page, "running", 60)
            finished = wait_status(page, "finished", 120)

            # Runs: the table lists it.
            page.get_by_role("tab", name="Runs").click()
            expect(page.locator("#runs-table")).to_contain_text("first", timeout=30_000)
            expect(page.locator("#runs-table")).to_contain_text("finished", timeout=30_000)
            page.locator("#compare").get_by_label("first").check()
            expect(page.locator("#compare-chart")).to_contain_text("val loss", timeout=30_000)
            page.screenshot(path=str(shots / "ui-runs.png"), full_page=True)

            # Generate from the new run.
            page.get_by_role("tab", name="Generate").click()
            expect(page.locator("#gen-model input")).to_have_value("first", timeout=30_000)
            page.locator("#prompt textarea").fill("ROMEO:")
            page.locator("#generate").click()
            page.wait_for_function(
                "() => document.querySelector('#output textarea').value.length >= 'ROMEO:'.length + 100",
                timeout=60_000)
            generated = page.locator("#output textarea").input_value()
            page.screenshot(path=str(shots / "ui-generate.png"), full_page=True)

            # Share: the Hugging Face export as a zip, downloaded by the browser.
            page.get_by_role("tab", name="Share").click()
            expect(page.locator("#share-run input")).to_have_value("first", timeout=30_000)
            page.locator("#share-hf").click()
            link = page.locator("#share-file a").first
            expect(link).to_be_visible(timeout=60_000)
            with page.expect_download(timeout=60_000) as download:
                link.click()
            zip_path = tmp_path / "export.zip"
            download.value.save_as(str(zip_path))
            page.screenshot(path=str(shots / "ui-share.png"), full_page=True)
    finally:
        server.stop()

    assert charts >= 2, f"the loss chart changed {charts} time(s) while training"
    assert sample.strip(), "no live sample"
    assert "stopped" in stopped and "finished" in finished
    assert generated.startswith("ROMEO:") and len(generated) > len("ROMEO:") + 100
    with zipfile.ZipFile(zip_path) as z:
        names = z.namelist()
    assert any(n.endswith("/config.json") for n in names) and any(n.endswith("model.safetensors") for n in names)
    events = (tmp_path / "runs" / "first" / "events.jsonl").read_text()
    starts = [line for line in events.splitlines() if '"event": "start"' in line]
    assert len(starts) == 2 and '"resume": true' in starts[1], "Resume did not continue the same run"
    host = urlsplit(server.url).netloc
    outside = [u for u in requests if urlsplit(u).scheme in ("http", "https", "ws", "wss") and urlsplit(u).netloc != host]
    assert not outside, f"the page reached beyond {host}: {outside}"
    target = os.environ.get("GPTLAB_SCREENSHOTS")
    if target:
        for shot in shots.iterdir():
            shutil.copy(shot, Path(target) / shot.name)


def evaluations(page) -> int:
    """How many evaluations the status line counts."""
    import re

    found = re.search(r"(\d+) evaluations", status_text(page))
    return int(found.group(1)) if found else 0


def chart_changes(page, done, timeout: float) -> int:
    """How many times the loss chart's drawing changed until `done()` (polled every 0.3 s)."""
    chart = page.locator("#loss-chart")
    seen, changes = None, -1
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        drawing = chart.inner_html()
        if drawing != seen:
            seen, changes = drawing, changes + 1
        if done():
            return changes
        time.sleep(0.3)
    raise AssertionError(f"training did not reach its evaluations in {timeout} s; status: {status_text(page)}")
