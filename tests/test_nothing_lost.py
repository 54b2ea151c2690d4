"""Nothing lost, nothing silently wrong: what --overwrite may delete, run files that disagree, one trainer per
run, and request bodies bounded whatever their transfer encoding. Real commands, real files, a real server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.servers import REPO, Server, main_server

from .conftest import TINY_MODEL
from .test_bad_run_folders import assert_one_line_error

TINY_FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY_MODEL.items()]


def gptlab(*args, cwd=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "gptlab", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def listing(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- --overwrite deletes only what gptlab wrote, of its own kind ----

def test_export_overwrite_onto_a_folder_holding_data_and_a_run_deletes_nothing(tmp_path, tiny_run, char_data):
    work = tmp_path / "work"
    shutil.copytree(char_data, work / "data" / "small-char")
    shutil.copytree(tiny_run, work / "runs" / "tiny")
    before = listing(work)
    for target in (work, work / "runs", work / "data"):
        r = gptlab("export", tiny_run, "--out", target, "--overwrite")
        assert_one_line_error(r, "nothing was deleted")
    assert listing(work) == before


def test_export_overwrite_refuses_a_run_a_data_folder_and_foreign_files_but_replaces_its_own(tmp_path, tiny_run,
                                                                                               char_data):
    run, data = tmp_path / "run", tmp_path / "data"
    shutil.copytree(tiny_run, run)
    shutil.copytree(char_data, data)
    assert_one_line_error(gptlab("export", run, "--out", data, "--overwrite"), "prepared data folder")
    assert_one_line_error(gptlab("export", run, "--out", run, "--overwrite"), "holds a run")
    out = tmp_path / "export"
    assert gptlab("export", run, "--out", out).returncode == 0
    (out / "my-notes.md").write_text("mine")
    assert_one_line_error(gptlab("export", run, "--out", out, "--overwrite"), "my-notes.md", "did not write")
    assert (out / "my-notes.md").read_text() == "mine"
    (out / "my-notes.md").unlink()
    r = gptlab("export", run, "--out", out, "--overwrite")
    assert r.returncode == 0, r.stderr


def test_train_refuses_to_write_into_a_data_folder_or_an_export(tmp_path, tiny_run, char_data):
    data = tmp_path / "data"
    shutil.copytree(char_data, data)
    before = listing(data)
    r = gptlab("train", "--data", data, "--out", data, "--max-iters", "2", *TINY_FLAGS, "--overwrite")
    assert_one_line_error(r, "prepared data folder", "--out")
    assert listing(data) == before
    export = tmp_path / "export"
    assert gptlab("export", tiny_run, "--out", export).returncode == 0
    r = gptlab("train", "--data", data, "--out", export, "--max-iters", "2", *TINY_FLAGS)
    assert_one_line_error(r, "export")


# ---- a run's files are checked against each other wherever the run is opened ----

def swap_tokenizer(run: Path, other_data: Path) -> tuple[str, ...]:
    shutil.copyfile(other_data / "tokenizer.json", run / "tokenizer.json")
    return ("tokenizer.json", "tokenizer files were replaced")


def drop_n_head(run: Path, _: Path) -> tuple[str, ...]:
    config = json.loads((run / "config.json").read_text())
    del config["model"]["n_head"]
    (run / "config.json").write_text(json.dumps(config))
    return ("config.json", "model.n_head")


def impossible_n_head(run: Path, _: Path) -> tuple[str, ...]:
    config = json.loads((run / "config.json").read_text())
    config["model"]["n_head"] = 3
    (run / "config.json").write_text(json.dumps(config))
    return ("config.json", "model.n_head 3")


@pytest.fixture(scope="module")
def other_char_data(tmp_path_factory) -> Path:
    text = tmp_path_factory.mktemp("other") / "other.txt"
    text.write_text("abc abc ab ba cab " * 400, encoding="utf-8")
    out = tmp_path_factory.mktemp("other-data") / "other-char"
    r = gptlab("prepare", text, "--out", out)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("damage", [swap_tokenizer, drop_n_head, impossible_n_head])
def test_a_run_whose_files_disagree_is_refused_by_every_command(tmp_path, tiny_run, other_char_data, damage):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    words = damage(run, other_char_data)
    for args in (["export", run, "--out", tmp_path / "export"], ["sample", run, "--max-new-tokens", "5"],
                 ["eval", run], ["info", run], ["serve", run, "--port", "0"], ["train", "--resume", run]):
        r = gptlab(*args, timeout=120)
        assert_one_line_error(r, *words)
    assert not (tmp_path / "export").exists()


# ---- one trainer per run folder ----

def test_a_second_train_into_the_same_out_refuses_while_the_first_runs(tmp_path, char_data):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "gptlab", "train", "--data", str(char_data), "--out", str(out),
                              "--time", "60s", "--eval-interval", "50", "--eval-iters", "1", "--num-samples", "0",
                              *TINY_FLAGS], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / "last.safetensors").is_file():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.2)
        for extra in ([], ["--overwrite"]):
            r = gptlab("train", "--data", char_data, "--out", out, "--max-iters", "2", *TINY_FLAGS, *extra)
            assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
            assert "being trained by process" in r.stderr or "already holds a run" in r.stderr
        r = gptlab("train", "--resume", out)
        assert_one_line_error(r, f"being trained by process {first.pid}")
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=60)
    assert first.returncode == 130 and "--resume" in err
    assert not any(p.name.endswith(".lock") for p in out.iterdir())


def test_a_lock_left_by_a_dead_trainer_is_taken_over(tmp_path, char_data):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".gptlab-train.lock").write_text(f"{dead.pid}\n")
    r = gptlab("train", "--data", char_data, "--out", out, "--max-iters", "2", "--eval-iters", "1",
               "--num-samples", "0", *TINY_FLAGS, "--quiet")
    assert r.returncode == 0, r.stderr
    assert (out / "last.safetensors").is_file() and not (out / ".gptlab-train.lock").exists()


# ---- request bodies are bounded whatever their transfer encoding ----

def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the server's memory from /proc")
def test_a_chunked_50_mb_body_is_refused_without_being_read_whole(tiny_run):
    server = main_server(tiny_run)
    url = urlparse(server.url)
    before = rss_kb(server.proc.pid)
    chunk = b"x" * (1 << 20)
    sent = 0
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(50):
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
                sent += len(chunk)
        except OSError:
            pass  # the server answered and closed: the rest is never read
        response = b""
        sock.settimeout(30)
        try:
            while b"\r\n\r\n" not in response:
                part = sock.recv(65536)
                if not part:
                    break
                response += part
        except OSError:
            pass
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    grew_mb = (rss_kb(server.proc.pid) - before) / 1024
    assert grew_mb < 25, f"the server grew by {grew_mb:.0f} MB reading a refused body"


# ---- signals end the whole process tree, with Ctrl-C's clean-up ----

def children_of(pid: int) -> set[int]:
    found = set()
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if int(fields.get("PPid", "0").strip()) == pid:
            found.add(int(status.parent.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the process table from /proc")
def test_sigterm_during_a_two_worker_prepare_leaves_no_process_and_no_tmp(tmp_path, shakespeare_text):
    text = tmp_path / "big.txt"
    text.write_text(shakespeare_text * 30, encoding="utf-8")  # ~33 MB: gpt2 takes many seconds on two workers
    out = tmp_path / "prepared"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "gptlab", "prepare", str(text), "--tokenizer", "gpt2",
                             "--workers", "2", "--out", str(out)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    workers: set[int] = set()
    while len(workers) < 2 or not any(out.glob("*.tmp")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        workers |= children_of(proc.pid)
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["gptlab prepare: interrupted"], err
    time.sleep(0.5)
    alive = [pid for pid in workers if Path(f"/proc/{pid}").exists()
             and "zombie" not in Path(f"/proc/{pid}/status").read_text()]
    assert alive == []
    assert [p.name for p in out.rglob("*") if ".tmp" in p.name] == []


# ---- one normalisation of input text; standard input; help ----

def test_bom_and_windows_line_ends_are_normalised_unless_kept(tmp_path):
    text = tmp_path / "windows.txt"
    text.write_bytes(b"\xef\xbb\xbf" + b"First line of the play\r\nSecond line here\r\n\r\n" * 60)
    r = gptlab("prepare", text, "--out", tmp_path / "lf")
    assert r.returncode == 0, r.stderr
    chars = json.loads((tmp_path / "lf" / "tokenizer.json").read_text(encoding="utf-8"))["chars"]
    assert "\r" not in chars and "\ufeff" not in chars and "\n" in chars
    r = gptlab("prepare", text, "--out", tmp_path / "kept", "--keep-crlf")
    assert r.returncode == 0, r.stderr
    chars = json.loads((tmp_path / "kept" / "tokenizer.json").read_text(encoding="utf-8"))["chars"]
    assert "\r" in chars and "\ufeff" not in chars


def test_standard_input_as_dash(tmp_path, shakespeare_text):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "GPTLAB_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "-m", "gptlab", "prepare", "-", "--out", str(tmp_path / "piped")],
                       input=shakespeare_text[:20_000], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "piped" / "meta.json").read_text())
    assert meta["train_tokens"] + meta["val_tokens"] == 20_000


def test_help_and_a_dash_value_are_understood(tmp_path):
    r = gptlab("help", "train")
    assert r.returncode == 0 and "--max-iters" in r.stdout
    assert_one_line_error(gptlab("help", "trian"), "no command 'trian'", "train")
    assert_one_line_error(gptlab("train", "x.txt", "--time", "-5s"), "--time '-5s' is not a duration")


# ---- every resource a request asks for is bounded before it is allocated ----

def test_a_request_too_big_for_memory_is_refused_before_allocating(tiny_run, tmp_path):
    r = gptlab("sample", tiny_run, "--num-samples", "100000000", "--max-new-tokens", "300", timeout=120)
    assert_one_line_error(r, "--num-samples 100,000,000", "GB", "fewer samples")
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    r = gptlab("sample", run, "--stream", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr


def test_the_api_refuses_a_request_too_big_for_memory_and_invalid_text_in_every_field(tiny_run):
    import httpx

    roomy = Server(tiny_run, "--max-n", "100000000", "--max-new-tokens-limit", "1000")
    try:  # ceilings a server owner set too high: memory still bounds the request, before it runs
        r = httpx.post(f"{roomy.url}/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 300, "n": 100_000_000},
                       timeout=60)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "n" and "GB" in r.json()["error"]["message"]
        assert httpx.get(f"{roomy.url}/health", timeout=10).json()["models"]["tiny"]["running"] == 0
    finally:
        roomy.stop()
    server = main_server(tiny_run)
    for body, param in ((b'{"prompt": "ROMEO:\\ud800", "echo": true, "max_tokens": 2}', "prompt"),
                        (b'{"prompt": "ROMEO:\\ud800", "stream": true, "max_tokens": 2}', "prompt"),
                        (b'{"prompt": "ROMEO:", "stop": ["a", "\\udfff"], "max_tokens": 2}', "stop[1]")):
        r = httpx.post(f"{server.url}/v1/completions", content=body, timeout=30,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == param and "not valid Unicode" in error["message"]
    body = b'{"messages": [{"role": "user", "content": "hi \\ud83d"}], "max_tokens": 2}'
    r = httpx.post(f"{server.url}/v1/chat/completions", content=body, timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content"
    r = httpx.post(f"{server.url}/v1/completions", content=b'{"prompt": "caf\xe9"}', timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid UTF-8" in r.json()["error"]["message"]


# ---- permission and disk errors name the path and the real cause ----

def in_read_only_folder(folder: Path, *args) -> subprocess.CompletedProcess:
    """Run gptlab with `folder` mounted read-only (root cannot be kept out of a folder by its mode bits)."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    command = " ".join(map(str, [sys.executable, "-m", "gptlab", *args]))
    script = f"mount --bind {folder} {folder} && mount -o remount,ro,bind {folder} && exec {command}"
    return subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=env,
                          timeout=300)


def can_mount() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount --bind / /mnt 2>/dev/null || exit 1"], capture_output=True).returncode == 0


@pytest.mark.skipif(not can_mount(), reason="needs unshare and mount (root) to make a read-only folder")
def test_read_only_folders_give_one_line(tmp_path, small_corpus, char_data):
    folder = tmp_path / "ro"
    folder.mkdir()
    r = in_read_only_folder(folder, "prepare", small_corpus, "--out", folder / "data")
    assert_one_line_error(r, str(folder / "data"), "read-only file system")
    r = in_read_only_folder(folder, "train", "--data", char_data, "--out", folder / "run", "--max-iters", "2",
                            *TINY_FLAGS)
    assert_one_line_error(r, str(folder / "run"), "read-only file system")
    assert list(folder.iterdir()) == []


def test_non_latin_run_names_draw_without_warnings(tmp_path, char_data):
    out = tmp_path / "莎士比亚"
    r = gptlab("train", "--data", char_data, "--out", out, "--max-iters", "4", "--eval-interval", "2",
               "--eval-iters", "1", "--num-samples", "0", *TINY_FLAGS)
    assert r.returncode == 0, r.stderr
    assert (out / "loss.png").is_file()
    assert "Glyph" not in r.stderr and "warning" not in r.stderr.lower(), r.stderr


def test_text_that_is_not_unicode_is_refused_the_same_on_the_command_line(tiny_run):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    # the char tokenizer names the character it cannot take; the stop strings' check names the flag
    for flag, words in (("--prompt", ("'\\udcff'",)), ("--stop", ("--stop", "valid Unicode"))):
        # an undecodable byte on a command line reaches Python as a lone surrogate
        r = subprocess.run([sys.executable.encode(), b"-m", b"gptlab", b"sample", str(tiny_run).encode(),
                            flag.encode(), b"ROMEO\xff", b"--max-new-tokens", b"3"],
                           capture_output=True, text=True, env=env, timeout=120)
        assert_one_line_error(r, *words)


@pytest.mark.skipif(not can_mount(), reason="needs unshare and mount (root) to make a small disk")
def test_a_full_disk_at_the_first_checkpoint_does_not_suggest_resuming(tmp_path, char_data):
    disk = tmp_path / "disk"
    disk.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    train = " ".join(map(str, [sys.executable, "-m", "gptlab", "train", "--data", char_data, "--out", disk / "run",
                               "--max-iters", "2", "--eval-iters", "1", *TINY_FLAGS, "--n-embd=256", "--n-head=4"]))
    script = f"mount -t tmpfs -o size=1m tmpfs {disk} && {train}; code=$?; ls -a {disk}/run; exit $code"
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=300)
    errors = [line for line in r.stderr.strip().splitlines() if not line.startswith("warning: ")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "is full" in errors[0] and "--resume" not in errors[0] and "start the run again" in errors[0], errors[0]
    assert ".tmp" not in r.stdout, r.stdout  # the listing of the run folder, from inside the mount
