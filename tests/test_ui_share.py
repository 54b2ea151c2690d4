"""The Share tab's exports: zips transformers loads, a Space zip, a GGUF llama.cpp reads, and a push that keeps its token."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from gptlab.config import resolve_config
from gptlab.errors import GptlabError
from gptlab.generation import load
from gptlab.ui.share import Shelf

from .conftest import TINY_MODEL
from .test_hf_import import prepared

TEXT = "ROMEO: Is it so? then\nI defy you, stars!"
TOKEN = "hf_share0test0token0which0must0stay0in0memory"


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def snapshot(folder: Path) -> dict[str, int]:
    """Each file under `folder` and its modification time in nanoseconds."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in files_under(folder)}


def unzip(zip_path: Path, into: Path) -> list[str]:
    with zipfile.ZipFile(zip_path) as zf:
        assert zf.testzip() is None
        zf.extractall(into)
        return zf.namelist()


@pytest.fixture
def shelf(tmp_path) -> Shelf:
    return Shelf(tmp_path / "work")


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory, small_corpus) -> Path:
    """A tiny bpe:300 run: GGUF takes byte-level BPE runs only, not the char run of conftest."""
    from gptlab.train import train

    out = tmp_path_factory.mktemp("share-runs") / "tiny-bpe"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model_cfg, cfg = resolve_config(overrides=dict(
            **TINY_MODEL, data=str(prepared(tmp_path_factory, small_corpus, "bpe:300")), out=str(out), batch_size=8,
            max_iters=10, eval_interval=10, eval_iters=2, num_samples=1, sample_tokens=10, warmup_iters=5,
            learning_rate=3e-3,
        ))
        train(model_cfg, cfg, quiet=True)
    finally:
        torch.set_num_threads(threads)
    return out


def test_hf_zip_loads_in_transformers_with_our_logits_and_tokens(tiny_run, shelf, tmp_path, one_thread):
    transformers = pytest.importorskip("transformers")
    zip_path = shelf.hf_zip(tiny_run)
    assert zip_path == shelf.folder / "zips" / "tiny-hf.zip"
    names = unzip(zip_path, tmp_path / "unzipped")
    top = tmp_path / "unzipped" / "tiny-hf"
    assert all(n.startswith("tiny-hf/") for n in names)
    assert {"tiny-hf/config.json", "tiny-hf/model.safetensors", "tiny-hf/tokenizer.json"} <= set(names)
    assert not any(Path(n).name.startswith(".") for n in names)  # no export marker, no temporary file

    theirs = transformers.AutoModelForCausalLM.from_pretrained(top).eval()
    tm = load(tiny_run, device="cpu")
    ids = torch.randint(0, tm.tokenizer.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (theirs(ids).logits - tm.model(ids)[..., :tm.tokenizer.vocab_size]).abs().max().item()
    assert diff <= 1e-4
    tokenizer = transformers.AutoTokenizer.from_pretrained(top)
    assert tokenizer(TEXT)["input_ids"] == tm.tokenizer.encode(TEXT)
    assert tokenizer.decode(tokenizer(TEXT)["input_ids"]) == TEXT


def test_space_zip_holds_the_app_and_the_run_weights(tiny_run, shelf):
    zip_path = shelf.space_zip(tiny_run)
    assert zip_path == shelf.folder / "zips" / "tiny-space.zip"
    with zipfile.ZipFile(zip_path) as zf:
        names = set(zf.namelist())
        weights = zf.read("tiny-space/models/tiny/best.safetensors")
    assert {"tiny-space/app.py", "tiny-space/requirements.txt", "tiny-space/README.md"} <= names
    assert weights == (tiny_run / "best.safetensors").read_bytes()


def test_gguf_is_read_by_gguf_and_llama_cpp(bpe_run, tiny_run, shelf):
    import gguf

    path = shelf.gguf(bpe_run)
    assert path == shelf.folder / "gguf" / "tiny-bpe.gguf" and path.with_suffix(".Modelfile").is_file()
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["token_embd.weight"] == types["blk.1.ffn_down.weight"] == "F16"  # the default outtype
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(path), n_ctx=32, n_threads=1, verbose=False)
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == load(bpe_run, device="cpu").tokenizer.encode(TEXT)

    with pytest.raises(GptlabError) as e:  # llama.cpp has no char vocabulary
        shelf.gguf(tiny_run)
    assert len(str(e.value).splitlines()) == 1 and "this run uses char" in str(e.value)


@pytest.mark.parametrize("repo_id, token, expected", [
    ("someone/tiny", "", "no Hugging Face token"),
    ("someone/tiny", " \n", "no Hugging Face token"),
    ("someone/tiny", None, "no Hugging Face token"),
    ("someone/tiny", "hf_abc def", "spaces or unusual characters"),
    ("", TOKEN, "no repo id"),
    ("not a repo", TOKEN, "is not a Hub repo id; write it as user/name"),
    ("someone/../x", TOKEN, "is not a Hub repo id"),
    ("someone", TOKEN, "is not a Hub repo id"),
])
def test_push_refuses_a_missing_token_or_a_bad_repo_id_in_one_line(tiny_run, shelf, repo_id, token, expected):
    with pytest.raises(GptlabError) as e:
        shelf.push(tiny_run, repo_id, token)
    message = str(e.value)
    assert len(message.splitlines()) == 1 and expected in message
    assert TOKEN not in message
    assert files_under(shelf.folder) == []  # refused before exporting anything


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: connections are refused


@pytest.mark.parametrize("kind", ["hf", "space"])
def test_push_to_an_unreachable_hub_fails_fast_and_leaves_no_trace_of_the_token(
        kind, tiny_run, shelf, tmp_path, monkeypatch, caplog):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    hf_home = tmp_path / "hf-home"
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # The Hub client reads its settings once, at import; this process may have imported it already.
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    caplog.set_level(logging.DEBUG)

    start = time.monotonic()
    with pytest.raises(GptlabError) as e:
        shelf.push(tiny_run, "someone/tiny-gpt", f" {TOKEN}\n", kind=kind, private=True)
    assert time.monotonic() - start < 20
    message = str(e.value)
    assert len(message.splitlines()) == 1 and f"cannot reach the Hugging Face Hub at {endpoint}" in message
    assert files_under(shelf.folder) == []  # the export made for the upload is gone

    assert TOKEN not in message and TOKEN not in caplog.text
    assert not any(TOKEN in value for value in os.environ.values())
    searched = [tmp_path, hf_home, Path(huggingface_hub.constants.HF_HOME)]
    for folder in searched:
        for path in files_under(folder) if folder.is_dir() else []:
            assert TOKEN.encode() not in path.read_bytes(), path


def test_re_export_replaces_the_zip_whole_and_writes_only_in_the_work_folder(copy_run, shelf, tmp_path, monkeypatch):
    run = copy_run()
    monkeypatch.chdir(tmp_path)
    outside = snapshot(tmp_path)
    first = shelf.hf_zip(run)
    assert "run-hf/loss.png" in zipfile.ZipFile(first).namelist()

    (run / "loss.png").unlink()  # the next export has one file fewer: none of the first may linger
    outside = {k: v for k, v in outside.items() if k != "run/loss.png"}
    second = shelf.hf_zip(run)
    assert second == first
    assert "run-hf/loss.png" not in zipfile.ZipFile(second).namelist()
    assert "run-hf/config.json" in zipfile.ZipFile(second).namelist()
    assert [p.relative_to(shelf.folder).as_posix() for p in files_under(shelf.folder)] == ["zips/run-hf.zip"]
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("work/")} == outside


def test_two_clicks_at_once_give_one_whole_zip(tiny_run, shelf):
    results, errors = [], []

    def click() -> None:
        try:
            results.append(shelf.hf_zip(tiny_run))
        except Exception as e:  # noqa: BLE001 - any failure is reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=click) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == [] and len(results) == 2 and results[0] == results[1]
    with zipfile.ZipFile(results[0]) as zf:
        assert zf.testzip() is None and "tiny-hf/model.safetensors" in zf.namelist()
    assert [p.relative_to(shelf.folder).as_posix() for p in files_under(shelf.folder)] == ["zips/tiny-hf.zip"]
