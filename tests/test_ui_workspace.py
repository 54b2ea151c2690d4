"""The ui workspace: uploads checked and stored under safe names, names from the browser confined to the
app's folders, text statistics against independent counts, prepare, run listing and deletion."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from gptlab import data, rundir
from gptlab.errors import GptlabError
from gptlab.tokenizer import GPT2Tokenizer
from gptlab.ui import workspace as ws_module
from gptlab.ui.workspace import Workspace

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40
LIMIT = 64 << 10
SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.txt")


@pytest.fixture
def ws(tmp_path) -> Workspace:
    return Workspace(tmp_path / "runs", tmp_path / "data", LIMIT)


def files_outside_uploads(root: Path) -> set[str]:
    """Every path under `root` except those inside data/uploads."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if "uploads" not in p.relative_to(root).parts}


def refused(call, *args) -> str:
    """The one-line message of the GptlabError `call(*args)` raises."""
    with pytest.raises(GptlabError) as e:
        call(*args)
    message = str(e.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A tiny run trained with the CLI (its data folder goes beside it, in a folder of its own)."""
    from gptlab.cli import main

    root = tmp_path_factory.mktemp("cli")
    text = root / "text.txt"
    text.write_text(TEXT * 3, encoding="utf-8")
    run = root / "run"
    before = Path.cwd()
    os.chdir(root)  # the CLI puts the data folder it prepares under ./data
    try:
        main(["train", str(text), "--preset", "cpu-tiny", "--max-iters", "30", "--eval-interval", "10",
              "--out", str(run), "--quiet"])
    finally:
        os.chdir(before)
    return run


# ---- uploads refused


@pytest.mark.parametrize("content, words", [
    (b"", ["empty"]),
    (b"x" * (LIMIT + 1), ["over the", "MB upload limit", "--max-upload-mb"]),
    (b"text\x00more", ["binary", "offset 4"]),
    (b"caf\xe9 au lait", ["not valid UTF-8", "offset 3"]),
    (b"ok \xe2\x82", ["not valid UTF-8", "offset 3"]),  # cut inside a character
    (b" \n\t\r\n ", ["only whitespace"]),
])
def test_bad_uploads_are_refused_and_nothing_is_stored(ws, content, words):
    message = refused(ws.save_upload, "notes.txt", content)
    assert "'notes.txt'" in message
    for word in words:
        assert word in message
    assert ws.uploads() == []
    assert list(ws.uploads_dir.iterdir()) == []  # no temporary file left behind either


def test_whitespace_only_pasted_text_is_refused(ws):
    assert "only whitespace" in refused(ws.save_text, "   \n\n  ")
    assert ws.uploads() == []


def test_the_limit_is_inclusive(ws):
    upload = ws.save_upload("full.txt", b"a" * LIMIT)
    assert upload.bytes == LIMIT and upload.path.stat().st_size == LIMIT


# ---- hostile names


HOSTILE_NAMES = [
    "../../etc/passwd", "..", ".", "/abs/path.txt", "C:\\x\\y.txt", "..\\..\\boot.ini", "a\x00b.txt",
    "café.txt", "日本語.txt", "é" * 300, "x" * 1000, "n" * 990 + ".txt", ".hidden", "...", "", "  ",
    "a/b/", "name\nwith\nlines.txt", "-rf.txt", "--help", "_-_.txt", "$(rm -rf ~).txt", "con", "~/.bashrc",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_end_up_as_plain_files_inside_uploads(tmp_path, ws, name):
    before = files_outside_uploads(tmp_path)
    upload = ws.save_upload(name, b"some text\n")
    assert upload.path.parent == ws.uploads_dir
    assert upload.path.is_file() and not upload.path.is_symlink()
    assert upload.name == upload.path.name and SAFE.fullmatch(upload.name)
    assert len(upload.name) <= 80
    assert upload.path.read_bytes() == b"some text\n"
    assert ws.uploads() == [upload.name]
    assert files_outside_uploads(tmp_path) == before


def test_safe_names_keep_what_they_can():
    assert ws_module.safe_stem("../../etc/passwd") == "passwd"
    assert ws_module.safe_stem("C:\\x\\y.txt") == "y"
    assert ws_module.safe_stem("café au lait.md") == "cafe_au_lait"
    assert ws_module.safe_stem("..") == "text"
    assert ws_module.safe_stem("") == "text"
    assert ws_module.safe_stem("--force.txt") == "force"


def test_an_upload_never_overwrites_another(ws):
    names = [ws.save_upload("notes.txt", f"version {n}\n".encode()).name for n in range(3)]
    assert names == ["notes.txt", "notes-2.txt", "notes-3.txt"]
    assert [(ws.uploads_dir / n).read_text() for n in names] == [f"version {n}\n" for n in range(3)]


def test_pasted_text_is_stored_as_utf8(ws):
    upload = ws.save_text("héllo\n")
    assert upload.name == "pasted.txt" and upload.chars == 6 and upload.bytes == 7
    assert upload.path.read_text(encoding="utf-8") == "héllo\n"


def test_delete_upload_removes_just_that_file(ws):
    keep = ws.save_text("keep me\n", "keep")
    gone = ws.save_text("delete me\n", "gone")
    ws.delete_upload(gone.name)
    assert ws.uploads() == [keep.name]
    assert "no upload named" in refused(ws.delete_upload, gone.name)
    assert "not a valid upload name" in refused(ws.delete_upload, "../runs")


# ---- resolve


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".", "..", "/etc/passwd", str(Path.cwd()), "a\\b", "a\x00b",
                                  ".hidden", "x y"])
@pytest.mark.parametrize("kind", ["upload", "data", "run"])
def test_resolve_refuses_anything_but_one_safe_name(ws, kind, name):
    assert "is not a valid" in refused(ws.resolve, kind, name)


def test_resolve_refuses_unknown_names_listing_what_exists(ws):
    (ws.runs_dir / "alpha").mkdir()
    (ws.runs_dir / "beta").mkdir()
    message = refused(ws.resolve, "run", "gamma")
    assert "no run named 'gamma'" in message and "alpha, beta" in message
    for n in range(20):
        ws.save_text("t\n", f"file{n:02d}")
    assert "and 12 more" in refused(ws.resolve, "upload", "nope.txt")
    assert "none yet" in refused(ws.resolve, "data", "nothing")
    assert "no data folder named 'uploads'" in refused(ws.resolve, "data", "uploads")  # the uploads folder is no data folder
    assert "unknown kind" in refused(ws.resolve, "config", "alpha")


def test_resolve_refuses_symlinks_pointing_outside(tmp_path, ws):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret\n")
    (ws.uploads_dir / "link.txt").symlink_to(outside / "secret.txt")
    (ws.runs_dir / "linked").symlink_to(outside)
    (ws.runs_dir / "up").symlink_to(ws.runs_dir)  # the folder itself is not inside it
    (ws.runs_dir / "dangling").symlink_to(tmp_path / "missing")
    assert "points outside" in refused(ws.resolve, "upload", "link.txt")
    assert "points outside" in refused(ws.resolve, "run", "linked")
    assert "points outside" in refused(ws.resolve, "run", "up")
    assert "points outside" in refused(ws.resolve, "run", "dangling")
    (ws.uploads_dir / "inside.txt").symlink_to(ws.uploads_dir / "missing.txt")
    assert "link to nothing" in refused(ws.resolve, "upload", "inside.txt")
    assert ws.uploads() == []  # neither the link out nor the link to nothing is listed
    assert [r["name"] for r in ws.runs()] == []
    with pytest.raises(GptlabError):
        ws.delete_upload("link.txt")
    assert (outside / "secret.txt").read_text() == "secret\n"


def test_resolve_finds_what_exists(ws):
    upload = ws.save_text("text\n", "mine")
    (ws.runs_dir / "run-1").mkdir()
    assert ws.resolve("upload", "mine.txt") == upload.path.resolve()
    assert ws.resolve("run", "run-1") == (ws.runs_dir / "run-1").resolve()


# ---- text statistics


def test_text_stats_match_independent_counts(ws):
    first, second = TEXT, "Zweiter Text: Grüße, naïve café — ünïcödé.\nLast line without end"
    a = ws.save_text(first, "first")
    b = ws.save_text(second, "second")
    stats = ws.text_stats([a.name, b.name])
    joined = first + second
    gpt2 = GPT2Tokenizer.build()
    assert stats["chars"] == len(joined)
    assert stats["bytes"] == len(joined.encode("utf-8"))
    assert stats["distinct_chars"] == len(set(joined))
    assert stats["lines"] == len(first.splitlines()) + len(second.splitlines())
    assert stats["preview"] == joined[:1000]
    tokens = stats["tokens"]
    assert tokens["char"]["count"] == len(joined) and not tokens["char"]["about"]
    assert tokens["byte"]["count"] == len(joined.encode("utf-8"))
    # prepare joins files with <|endoftext|> for gpt2: one token between the two
    assert tokens["gpt2"]["count"] == len(gpt2.encode(first)) + len(gpt2.encode(second)) + 1
    assert not tokens["gpt2"]["about"] and tokens["gpt2"]["shown"] == f"{tokens['gpt2']['count']:,}"
    assert tokens["bpe:N"]["count"] is None and "when prepared" in tokens["bpe:N"]["shown"]


def test_text_stats_read_text_as_prepare_does(ws):
    upload = ws.save_upload("windows.txt", b"\xef\xbb\xbfone\r\ntwo\r\n")  # byte-order mark and CRLF
    stats = ws.text_stats([upload.name])
    assert stats["preview"] == "one\ntwo\n"
    assert stats["chars"] == 8 and stats["lines"] == 2


def test_big_texts_are_counted_about(ws, monkeypatch):
    monkeypatch.setattr(ws_module, "EXACT_TOKEN_BYTES", 2000)
    monkeypatch.setattr(ws_module, "SAMPLE_BYTES", 1000)
    upload = ws.save_text(TEXT * 2, "big")
    gpt2 = ws.text_stats([upload.name])["tokens"]["gpt2"]
    exact = len(GPT2Tokenizer.build().encode(TEXT * 2))
    assert gpt2["about"] and gpt2["shown"].startswith("about ")
    assert abs(gpt2["count"] - exact) <= 0.05 * exact


def test_text_stats_need_known_uploads(ws):
    assert "no upload chosen" in refused(ws.text_stats, [])
    assert "not a valid upload name" in refused(ws.text_stats, ["../../etc/passwd"])


# ---- prepare and data folders


def test_prepare_makes_a_data_folder_gptlab_can_load(ws):
    upload = ws.save_text(TEXT, "notes")
    calls = []
    out = ws.prepare([upload.name], "char", lambda fraction, message: calls.append((fraction, message)))
    assert out == ws.data_dir / "notes-char"
    meta = data.read_meta(out)
    chars = ws.text_stats([upload.name])["tokens"]["char"]["count"]
    assert meta["train_tokens"] + meta["val_tokens"] == chars
    assert len(data.load_tokens(out, "train")) == meta["train_tokens"]
    assert calls[0][0] == 0.0 and calls[-1][0] == 1.0 and all("\n" not in m for _, m in calls)
    assert ws.prepare([upload.name], "char") == ws.data_dir / "notes-char-2"  # never into an existing folder
    [first, second] = ws.data_folders()
    assert first["name"] == "notes-char" and second["name"] == "notes-char-2"
    assert first["tokenizer"] == "char" and first["vocab_size"] == len(set(TEXT))
    assert (first["train_tokens"], first["val_tokens"]) == (meta["train_tokens"], meta["val_tokens"])
    assert first["size_bytes"] >= (out / "train.bin").stat().st_size + (out / "val.bin").stat().st_size


def test_prepare_names_the_folder_after_the_tokenizer(ws):
    upload = ws.save_text(TEXT, "notes")
    out = ws.prepare([upload.name], "bpe:300")
    assert out.name == "notes-bpe300"
    assert data.read_meta(out)["vocab_size"] == 300


def test_prepare_refuses_bad_tokenizers_and_leaves_nothing(ws):
    upload = ws.save_text(TEXT, "notes")
    for bad in ("bpe", "bpe:10", "nonsense", "hf", "gpt2:5"):
        refused(ws.prepare, [upload.name], bad)
    assert "no upload chosen" in refused(ws.prepare, [], "char")
    short = ws.save_text("x", "short")
    assert "too short" in refused(ws.prepare, [short.name], "char")
    assert sorted(p.name for p in ws.data_dir.iterdir()) == ["uploads"]


def test_data_folders_skip_uploads_and_report_broken_meta(ws):
    ws.save_text(TEXT, "notes")
    (ws.data_dir / "other").mkdir()  # not prepared: not listed
    broken = ws.data_dir / "broken"
    broken.mkdir()
    (broken / "meta.json").write_text("{not json")
    [entry] = ws.data_folders()
    assert entry["name"] == "broken" and "not valid JSON" in entry["error"]


# ---- runs


def test_runs_describe_a_real_run_a_broken_one_and_queued_jobs(ws, trained_run):
    shutil.copytree(trained_run, ws.runs_dir / "tiny")
    broken = ws.runs_dir / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model": {}, "train": {}}))
    queued = ws.runs_dir / "queued"
    queued.mkdir()
    (queued / "job.json").write_text(json.dumps({"args": ["train", "/data/notes-char", "--out", "x"]}))
    gone = ws.runs_dir / "gone"
    gone.mkdir()
    (gone / "job.json").write_text(json.dumps({"args": ["train"], "pid": 2**22 + 12345}))  # no such process
    (ws.runs_dir / "not-a-run").mkdir()
    runs = {r["name"]: r for r in ws.runs()}
    assert sorted(runs) == ["broken", "gone", "queued", "tiny"]
    tiny = runs["tiny"]
    metrics = rundir.read_metrics(trained_run)
    assert tiny["status"] == "finished" and tiny["error"] is None
    assert tiny["steps"] == 30 and tiny["tokenizer"] == "char" and tiny["params"] > 0
    assert tiny["best_val_loss"] == min(r["val_loss"] for r in metrics)
    assert tiny["elapsed_sec"] == metrics[-1]["elapsed_sec"] and tiny["modified"] > 0
    assert tiny["data"]
    assert runs["broken"]["status"] == "broken" and "lacks the key" in runs["broken"]["error"]
    assert runs["queued"]["status"] == "queued" and runs["queued"]["data"] == "notes-char"
    assert runs["gone"]["status"] == "failed"


def test_delete_run_keeps_what_gptlab_did_not_write(ws, trained_run):
    run = ws.runs_dir / "tiny"
    shutil.copytree(trained_run, run)
    (run / "notes.txt").write_text("mine\n")
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events.out").write_text("x")
    message = refused(ws.delete_run, "tiny")
    assert "notes.txt" in message and "did not write" in message
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    assert (run / "notes.txt").read_text() == "mine\n"


def test_delete_run_removes_a_real_run_completely(ws, trained_run):
    run = ws.runs_dir / "tiny"
    shutil.copytree(trained_run, run)
    (run / "job.json").write_text(json.dumps({"args": ["train"], "pid": 2**22 + 12345, "exit_code": 0}))
    (run / "train.log").write_text("log\n")
    ws.delete_run("tiny")
    assert not run.exists()
    assert ws.runs() == []


def test_delete_run_refuses_a_training_run_and_other_folders(ws, trained_run):
    run = ws.runs_dir / "tiny"
    shutil.copytree(trained_run, run)
    (run / rundir.LOCK).write_text(f"{os.getpid()}\n")  # this process holds the lock: it trains now
    assert "training or queued now" in refused(ws.delete_run, "tiny")
    assert (run / rundir.BEST).is_file()
    (ws.runs_dir / "plain").mkdir()
    assert "not a run folder" in refused(ws.delete_run, "plain")
    assert "is not a valid run name" in refused(ws.delete_run, "../data")
