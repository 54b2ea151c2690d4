"""The `gptlab` command end to end, as a user runs it (real subprocesses)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields

from gptlab.config import SAMPLE_FIELD_NAMES, ModelConfig, SampleConfig, TrainConfig

TINY_FLAGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8",
              "--eval-iters", "2", "--num-samples", "1", "--sample-tokens", "30", "--warmup-iters", "2"]


def gptlab(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gptlab", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_info_preset_gpt2_124m_prints_its_parameter_count():
    r = gptlab("info", "--preset", "gpt2-124m")
    assert r.returncode == 0, r.stderr
    assert "124,439,808" in r.stdout
    assert "12" in r.stdout and "768" in r.stdout


def test_train_help_lists_every_config_field_with_its_default():
    r = gptlab("train", "--help")
    assert r.returncode == 0
    for f in fields(ModelConfig) + fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in r.stdout, f.name
    assert "(default: 0.001)" in r.stdout  # learning rate
    for flag in ["--preset", "--config", "--resume", "--overwrite"]:
        assert flag in r.stdout


def test_prepare_then_train_then_info(tmp_path, small_corpus):
    r = gptlab("prepare", small_corpus, "--tokenizer", "char", "--out", tmp_path / "data", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "data" / "meta.json").is_file()
    r = gptlab("train", "--data", tmp_path / "data", "--out", tmp_path / "run", "--max-iters", "20",
               "--eval-interval", "10", "--log-interval", "5", *TINY_FLAGS, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # not a terminal: plain log lines with loss, throughput and ETA, then the sample and the plot path
    assert "step     10/20 | loss" in r.stdout and "tok/s" in r.stdout and "ETA" in r.stdout
    assert "loss plot:" in r.stdout and str(tmp_path / "run" / "loss.png") in r.stdout
    r = gptlab("info", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert "parameters" in r.stdout and "best" in r.stdout and "best.safetensors" in r.stdout
    info = json.loads(gptlab("info", tmp_path / "run", "--json").stdout)
    assert info["steps"] == 20 and info["tokens_seen"] == 20 * 8 * 32
    assert info["params"] == ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=info["model"]["vocab_size"]).num_params()


def test_train_straight_from_a_text_file(tmp_path, small_corpus):
    r = gptlab("train", small_corpus, "--tokenizer", "char", "--preset", "cpu-tiny", "--max-iters", "10",
               "--eval-interval", "5", *TINY_FLAGS, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "data" / "small-char" / "meta.json").is_file()
    assert (tmp_path / "runs" / "small-char" / "best.safetensors").is_file()
    # the prepared folder is reused the second time
    r = gptlab("train", small_corpus, "--preset", "cpu-tiny", "--max-iters", "5", "--eval-interval", "5",
               "--overwrite", *TINY_FLAGS, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "using prepared data" in r.stdout


def test_config_file_plus_flag_overrides(tmp_path, tiny_run):
    r = gptlab("train", "--config", tiny_run / "config.json", "--max-iters", "12", "--eval-interval", "6",
               "--out", tmp_path / "again", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    original = json.loads((tiny_run / "config.json").read_text())
    assert config["train"]["max_iters"] == 12
    assert config["model"] == original["model"]
    assert config["train"]["learning_rate"] == original["train"]["learning_rate"]


def test_resume_from_the_command_line(tmp_path, small_corpus):
    base = ["--out", tmp_path / "run", "--eval-interval", "5", *TINY_FLAGS]
    assert gptlab("prepare", small_corpus, "--out", tmp_path / "d").returncode == 0
    assert gptlab("train", "--data", tmp_path / "d", "--max-iters", "5", *base).returncode == 0
    r = gptlab("train", "--resume", tmp_path / "run", "--max-iters", "10")
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout
    info = json.loads(gptlab("info", tmp_path / "run", "--json").stdout)
    assert info["steps"] == 10


def test_sample_flags_are_the_cli_names_of_the_table():
    assert list(SAMPLE_FIELD_NAMES) == [f.name for f in fields(SampleConfig)]
    r = gptlab("sample", "--help")
    assert r.returncode == 0
    for names in SAMPLE_FIELD_NAMES.values():
        assert names["cli"] in r.stdout.split(), names


def test_bad_min_p_names_the_flag(tiny_run):
    r = gptlab("sample", tiny_run, "--min-p", "1.5")
    assert r.returncode == 2
    assert r.stderr.strip() == "gptlab sample: error: --min-p must be in [0, 1] (0 = off), got 1.5"
