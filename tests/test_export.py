"""gptlab export --format hf and gptlab push: folders transformers loads, the same text, safe writes, clear errors."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptlab import cli
from gptlab.config import ModelConfig, resolve_config
from gptlab.folders import EXPORT_MARKER
from gptlab.generation import load
from gptlab.hf.export import export
from gptlab.hf.init import load_init
from gptlab.tokenizer import load_tokenizer

from .conftest import TINY_MODEL
from .test_hf_import import prepared

transformers = pytest.importorskip("transformers")


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def tiny_train(data: Path, out: Path, steps: int) -> Path:
    from gptlab.train import train

    model_cfg, cfg = resolve_config(overrides=dict(
        **TINY_MODEL, data=str(data), out=str(out), batch_size=8, max_iters=steps, eval_interval=10,
        eval_iters=2, num_samples=1, sample_tokens=20, warmup_iters=5, learning_rate=3e-3,
    ))
    train(model_cfg, cfg, quiet=True)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_corpus) -> dict[str, Path]:
    """A tiny trained run for each tokenizer kind, on one thread (see conftest's one_thread: 8x faster here)."""
    root = tmp_path_factory.mktemp("export-runs")
    found = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for spec, steps in (("char", 30), ("gpt2", 10), ("bpe:300", 20)):
            kind = spec.split(":")[0]
            found[kind] = tiny_train(prepared(tmp_path_factory, small_corpus, spec), root / f"run-{kind}", steps)
    finally:
        torch.set_num_threads(threads)
    return found


@pytest.mark.parametrize("kind", ["char", "gpt2", "bpe"])
def test_pipeline_on_the_export_writes_our_greedy_text(kind, runs, tmp_path, one_thread):
    out = export(runs[kind], tmp_path / "exported")
    generator = transformers.pipeline("text-generation", str(out), device="cpu")
    theirs = generator("ROMEO:", do_sample=False, max_new_tokens=20)[0]["generated_text"]
    tm = load(runs[kind], device="cpu")
    ours = tm.generate("ROMEO:", temperature=0.0, max_new_tokens=20)[0]
    assert theirs == "ROMEO:" + ours

    ids = torch.randint(0, tm.tokenizer.vocab_size, (2, tm.config.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (generator.model(ids).logits - tm.model(ids)).abs().max().item()
    assert diff <= 1e-4
    text = "ROMEO: Is it so? then\nI defy you, stars!"
    assert generator.tokenizer(text)["input_ids"] == tm.tokenizer.encode(text)
    assert generator.tokenizer.decode(tm.tokenizer.encode(text)) == text


def test_export_folder_holds_a_gpt2_that_matches_the_run(runs, tmp_path):
    from safetensors import safe_open

    out = export(runs["char"], tmp_path / "shakespeare-gpt")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "README.md", "loss.png"} <= names
    config = json.loads((out / "config.json").read_text())
    run_model = json.loads((runs["char"] / "config.json").read_text())["model"]
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["model_type"] == "gpt2"
    assert config["n_positions"] == run_model["block_size"] and config["n_embd"] == run_model["n_embd"]
    assert config["n_ctx"] == config["n_positions"]  # llama.cpp's convert_hf_to_gguf.py reads n_ctx
    assert config["activation_function"] == "gelu"  # F.gelu exact, as model.py's default
    assert config["resid_pdrop"] == config["embd_pdrop"] == config["attn_pdrop"] == 0.0
    assert config["layer_norm_epsilon"] == 1e-5 and config["tie_word_embeddings"] is True
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        assert "lm_head.weight" not in keys  # tied: written once, as save_pretrained does
        assert not run_model["bias"] and torch.count_nonzero(f.get_tensor("transformer.h.0.attn.c_attn.bias")) == 0
        assert tuple(f.get_tensor("transformer.h.0.mlp.c_fc.weight").shape) == (32, 128)  # Conv1D: (in, out)
    card = (out / "README.md").read_text()
    assert "# shakespeare-gpt" in card and "pipeline_tag: text-generation" in card
    best = min(float(r.split(",")[5]) for r in (runs["char"] / "metrics.csv").read_text().splitlines()[1:])
    assert f"{best:.4f}" in card and "![train and validation loss" in card and "## Samples" in card
    assert "small.txt" in card and "parameters" in card and "30 steps" in card
    assert not list(tmp_path.glob(".*export*"))  # no temporary folder left behind


def test_a_padded_vocabulary_is_cut_back_to_the_tokenizer(runs, tmp_path):
    from gptlab.checkpoint import read_weights, save_weights
    from gptlab.model import GPT

    run = tmp_path / "run"
    shutil.copytree(runs["char"], run)
    raw = json.loads((run / "config.json").read_text())
    vocab = raw["model"]["vocab_size"]
    raw["model"]["vocab_size"] = 64
    model = GPT(ModelConfig(**raw["model"]))
    tensors, _ = read_weights(run / "best.safetensors")
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name in tensors:
                p[: tensors[name].shape[0]].copy_(tensors[name])
    save_weights(run / "best.safetensors", model)
    (run / "config.json").write_text(json.dumps(raw))

    out = export(run, tmp_path / "cut")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == vocab
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(ids).logits - model.eval()(ids)[..., :vocab]).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_an_export_imports_back_with_the_same_tokenizer_and_weights(kind, runs, tmp_path):
    out = export(runs[kind], tmp_path / "exported")
    data_tokenizer = load_tokenizer(runs[kind])
    model_cfg, weights, tokenizer = load_init(out, ModelConfig(), data_tokenizer)
    assert tokenizer.name == kind and tokenizer.vocab_size == data_tokenizer.vocab_size
    from gptlab.model import GPT

    model = GPT(model_cfg).eval()
    model.load_state_dict(weights)
    tm = load(runs[kind], device="cpu")
    ids = torch.randint(0, tokenizer.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids) - tm.model(ids)).abs().max().item() <= 1e-5


def test_export_refuses_a_non_empty_folder_and_overwrite_replaces_it_whole(runs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "export", runs["char"], "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "already exists and is not empty; pass --overwrite" in err
    assert (out / "notes.txt").read_text() == "mine"
    code, stdout, err = run_cli(capsys, "export", runs["char"], "--out", out, "--overwrite")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"--overwrite would delete {out / 'notes.txt'}, which gptlab did not write" in err
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    assert run_cli(capsys, "export", runs["char"], "--out", out)[0] == 0
    code, stdout, err = run_cli(capsys, "export", runs["char"], "--out", out, "--overwrite")
    assert code == 0, err
    assert (out / "model.safetensors").is_file()
    code, _, err = run_cli(capsys, "export", runs["char"], "--out", runs["gpt2"], "--overwrite")
    assert code == 2 and "holds a run" in err


def test_a_failed_export_leaves_the_previous_one(runs, tmp_path, monkeypatch):
    from gptlab.errors import GptlabError
    from gptlab.hf import export as export_module

    out = export(runs["char"], tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def half_then_fail(src, folder):
        (folder / "config.json").write_text("{}")
        raise GptlabError("disk gone")

    monkeypatch.setitem(export_module.FORMATS, "hf", half_then_fail)
    with pytest.raises(GptlabError, match="disk gone"):
        export(runs["char"], out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_unknown_formats_and_missing_runs_are_one_line_errors(runs, tmp_path, capsys):
    cases = [
        (["export", runs["char"], "--format", "onnx", "--out", tmp_path / "s"], "--format 'onnx' is not available; choose one of: hf, space"),
        (["export", tmp_path / "nosuch", "--out", tmp_path / "x"], "not found"),
        (["push", tmp_path / "nosuch", "--repo-id", "user/name", "--dry-run"], "not found; export a run first"),
        (["push", runs["char"], "--repo-id", "not a repo", "--dry-run"], "is not a Hub repo id; write it as user/name"),
    ]
    for argv, expected in cases:
        code, _, err = run_cli(capsys, *argv)
        assert code == 2, argv
        assert len(err.strip().splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "s").exists() and not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------
# push: real subprocesses where the Hub client is used, so it reads a clean environment at import


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: connections are refused


def push(folder: Path, tmp_path: Path, *flags: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    base.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1", **env)
    return subprocess.run([sys.executable, "-m", "gptlab", "push", str(folder), "--repo-id", "someone/tiny-gpt", *flags],
                          env=base, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> Path:
    return export(runs["char"], tmp_path_factory.mktemp("push") / "tiny-gpt")


def test_push_dry_run_lists_the_files_without_a_token_or_network(exported, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    code, out, err = run_cli(capsys, "push", exported, "--repo-id", "someone/tiny-gpt", "--dry-run", "--private")
    assert code == 0, err
    for p in exported.iterdir():
        if p.name != EXPORT_MARKER:  # which local files the export wrote; it stays here
            assert f"{p.stat().st_size:,}  {p.name}" in out
    assert "would upload 7 files" in out and "https://huggingface.co/someone/tiny-gpt (private)" in out
    assert out.rstrip().endswith("nothing was sent")


def test_push_without_a_token_says_so(exported, tmp_path):
    r = push(exported, tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == "gptlab push: error: no Hugging Face token: set HF_TOKEN or run `hf auth login`, then push again"


def test_push_offline_says_the_hub_cannot_be_reached(exported, tmp_path):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    r = push(exported, tmp_path, HF_TOKEN="hf_not_a_real_token", HF_ENDPOINT=endpoint)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert f"cannot reach the Hugging Face Hub at {endpoint}" in r.stderr and "offline?" in r.stderr


def test_push_needs_no_torch_and_export_knows_the_run_file_names():
    from gptlab import rundir as checkpoint
    from gptlab.hf import card as export_module

    assert (export_module.LOSS_PLOT, export_module.SAMPLES) == (checkpoint.LOSS_PLOT, checkpoint.SAMPLES)
    assert checkpoint.CHECKPOINT_FILES == (checkpoint.BEST, checkpoint.LAST, checkpoint.TRAIN_STATE)
    r = subprocess.run([sys.executable, "-c", "import sys, gptlab.hf.hub; assert 'torch' not in sys.modules"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
