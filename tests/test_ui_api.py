"""`gptlab ui`'s job control over HTTP, against a real server and real `gptlab train` processes.

Bad uploads and hostile names are refused with nothing written outside the app's folders; a second
job waits for the first; a job killed with SIGKILL shows as failed with its log and resumes from its
last save; a server killed mid-job finds the job again when it comes back; --api-key locks the API.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests.servers import Server

pytestmark = pytest.mark.slow
JOB = {"preset": "cpu-tiny", "settings": {"eval_interval": 20, "batch_size": 8}}


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def wait_for(url: str, run: str, statuses: set[str], timeout: float = 90, check=None) -> dict:
    """Poll a run's status until it is one of `statuses` (and `check(status)` holds, if given)."""
    end = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < end:
        status = httpx.get(f"{url}/ui/api/runs/{run}", timeout=10).json()
        if status.get("status") in statuses and (check is None or check(status)):
            return status
        time.sleep(0.3)
    raise AssertionError(f"{run} never reached {statuses}: {status}")


@pytest.fixture(scope="module")
def app(tmp_path_factory, small_corpus):
    """A `gptlab ui` with a 0.2 MB upload ceiling and the small corpus uploaded and prepared."""
    root = tmp_path_factory.mktemp("ui")
    server = Server("--runs", root / "runs", "--data", root / "data", "--max-upload-mb", "0.2", command="ui",
                    cwd=root)
    try:
        up = httpx.post(f"{server.url}/ui/api/uploads", params={"name": "small.txt"},
                        content=small_corpus.read_bytes(), timeout=30)
        assert up.status_code == 200, up.text
        prepared = httpx.post(f"{server.url}/ui/api/prepare", json={"uploads": [up.json()["name"]],
                                                                     "tokenizer": "char"}, timeout=60)
        assert prepared.status_code == 200, prepared.text
        yield server, root, prepared.json()["data"]
    finally:
        server.stop()


def test_bad_uploads_are_refused_and_nothing_is_written(app):
    server, root, _ = app
    before = files_under(root)
    cases = {
        "empty": (b"", 400, "is empty"),
        "binary": (b"hello\x00world" * 10, 400, "binary"),
        "latin-1": ("caf\xe9 au lait".encode("latin-1"), 400, "not valid UTF-8"),
        "blank": (b"  \n\t\n", 400, "only whitespace"),
        "oversized": (b"a" * 300_000, 413, "--max-upload-mb"),
    }
    for name, (body, code, words) in cases.items():
        r = httpx.post(f"{server.url}/ui/api/uploads", params={"name": f"{name}.txt"}, content=body, timeout=30)
        assert r.status_code == code, (name, r.status_code, r.text)
        message = r.json()["error"]["message"]
        assert words in message and "\n" not in message, (name, message)
    assert files_under(root) == before


def test_names_from_the_browser_never_reach_outside_the_app_folders(app, tmp_path):
    server, root, data = app
    outside = root.parent
    before_outside = {p.name for p in outside.iterdir()}
    r = httpx.post(f"{server.url}/ui/api/uploads", params={"name": "../../../evil.txt"}, content=b"some text\n",
                   timeout=30)
    assert r.status_code == 200, r.text
    stored = r.json()["name"]
    assert "/" not in stored and ".." not in stored
    assert (root / "data" / "uploads" / stored).is_file()
    hostile = ["../small.txt", "..", "/etc/passwd", "a/b", "%2e%2e", ".hidden"]
    for name in hostile:
        r = httpx.post(f"{server.url}/ui/api/prepare", json={"uploads": [name], "tokenizer": "char"}, timeout=30)
        assert r.status_code in (400, 404), (name, r.text)
        r = httpx.post(f"{server.url}/ui/api/jobs", json={"data": name, **JOB, "steps": 5}, timeout=30)
        assert r.status_code in (400, 404), (name, r.text)
    for run in ["../evil", "/tmp/x", "a/b", "..", ".x"]:
        r = httpx.post(f"{server.url}/ui/api/jobs", json={"data": data, "run": run, **JOB, "steps": 5}, timeout=30)
        assert r.status_code == 400 and "not allowed" in r.json()["error"]["message"], (run, r.text)
    for path in ["..%2F..%2Fetc", "%2E%2E", "..", "x%00y"]:
        for method, suffix in (("GET", ""), ("POST", "/stop"), ("POST", "/resume"), ("DELETE", "")):
            r = httpx.request(method, f"{server.url}/ui/api/runs/{path}{suffix}", timeout=30)
            assert r.status_code in (400, 404, 405), (method, path, r.status_code)
    assert {p.name for p in outside.iterdir()} == before_outside
    assert not (root / "evil.txt").exists() and not (root.parent / "evil.txt").exists()


def test_a_second_job_waits_for_the_first(app):
    server, root, data = app
    first = httpx.post(f"{server.url}/ui/api/jobs", json={"data": data, "run": "one", **JOB, "steps": 3000},
                       timeout=60).json()
    assert first["status"] == "running", first
    second = httpx.post(f"{server.url}/ui/api/jobs", json={"data": data, "run": "two", **JOB, "steps": 40},
                        timeout=60).json()
    assert second["status"] == "queued" and second["position"] == 1, second
    again = httpx.post(f"{server.url}/ui/api/jobs", json={"data": data, "run": "one", **JOB, "steps": 5}, timeout=60)
    assert again.status_code == 400 and "exists already" in again.json()["error"]["message"]
    wait_for(server.url, "one", {"running"}, check=lambda s: s["progress"] is not None)
    assert httpx.get(f"{server.url}/ui/api/runs/two", timeout=10).json()["status"] == "queued"
    assert not (root / "runs" / "two" / "events.jsonl").exists()  # it has not started
    stopped = httpx.post(f"{server.url}/ui/api/runs/one/stop", timeout=30)
    assert stopped.status_code == 200
    wait_for(server.url, "one", {"stopped"})
    wait_for(server.url, "two", {"finished"}, timeout=120)
    runs = {r["name"]: r["status"] for r in httpx.get(f"{server.url}/ui/api/runs", timeout=10).json()["runs"]}
    assert runs["one"] == "stopped" and runs["two"] == "finished"
    nothing = httpx.post(f"{server.url}/ui/api/runs/two/stop", timeout=30)
    assert nothing.status_code == 409 and "nothing to stop" in nothing.json()["error"]["message"]


def test_a_job_killed_with_sigkill_shows_failed_and_resumes(app):
    server, root, data = app
    r = httpx.post(f"{server.url}/ui/api/jobs", json={"data": data, "run": "killed", **JOB, "steps": 120},
                   timeout=60)
    assert r.status_code == 200, r.text
    status = wait_for(server.url, "killed", {"running"}, check=lambda s: len(s["evals"]) >= 3)
    os.kill(status["start"]["pid"], signal.SIGKILL)
    failed = wait_for(server.url, "killed", {"failed"}, timeout=30)
    assert "step" in failed["log"], failed  # the last lines of its log
    saved_at = failed["evals"][-1]["step"]
    resumed = httpx.post(f"{server.url}/ui/api/runs/killed/resume", timeout=30)
    assert resumed.status_code == 200, resumed.text
    done = wait_for(server.url, "killed", {"finished"}, timeout=120)
    assert done["start"]["resume"] is True and done["start"]["step"] == saved_at
    assert done["evals"][-1]["step"] == 120


def test_a_restarted_server_finds_the_running_job(tmp_path, small_corpus):
    folders = ["--runs", tmp_path / "runs", "--data", tmp_path / "data"]
    key = {"Authorization": "Bearer sesame"}
    server = Server(*folders, "--api-key", "sesame", command="ui", cwd=tmp_path)
    pid = None
    try:
        assert httpx.get(f"{server.url}/ui/api/runs", timeout=10).status_code == 401
        assert httpx.get(f"{server.url}/v1/models", timeout=10).status_code == 401
        name = httpx.post(f"{server.url}/ui/api/uploads", params={"name": "s.txt"}, content=small_corpus.read_bytes(),
                          headers=key, timeout=30).json()["name"]
        data = httpx.post(f"{server.url}/ui/api/prepare", json={"uploads": [name], "tokenizer": "char"}, headers=key,
                          timeout=60).json()["data"]
        r = httpx.post(f"{server.url}/ui/api/jobs", json={"data": data, "run": "long", **JOB, "steps": 5000},
                       headers=key, timeout=60)
        assert r.status_code == 200, r.text
        end = time.monotonic() + 60
        while time.monotonic() < end:
            status = httpx.get(f"{server.url}/ui/api/runs/long", headers=key, timeout=10).json()
            if status["progress"]:
                pid = status["start"]["pid"]
                break
            time.sleep(0.3)
        assert pid is not None
    finally:
        os.killpg(server.proc.pid, signal.SIGKILL)  # the server dies; its job, in a session of its own, does not
        server.proc.wait(10)
    time.sleep(1)
    os.kill(pid, 0)  # still training
    server = Server(*folders, "--api-key", "sesame", command="ui", cwd=tmp_path)
    try:
        runs = httpx.get(f"{server.url}/ui/api/runs", headers=key, timeout=10).json()["runs"]
        assert [(r["name"], r["status"]) for r in runs] == [("long", "running")]
        step = httpx.get(f"{server.url}/ui/api/runs/long", headers=key, timeout=10).json()["progress"]["step"]
        time.sleep(2.5)
        later = httpx.get(f"{server.url}/ui/api/runs/long", headers=key, timeout=10).json()
        assert later["status"] == "running" and later["progress"]["step"] > step
        assert httpx.post(f"{server.url}/ui/api/runs/long/stop", headers=key, timeout=30).status_code == 200
        end = time.monotonic() + 60
        while httpx.get(f"{server.url}/ui/api/runs/long", headers=key, timeout=10).json()["status"] != "stopped":
            assert time.monotonic() < end, "the adopted job did not stop"
            time.sleep(0.3)
    finally:
        server.stop()
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
