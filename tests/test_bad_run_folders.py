"""Sampling from damaged or mismatched run folders, and hostile prompts: one clear line, exit 2."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest


def gptlab(*args):
    return subprocess.run([sys.executable, "-m", "gptlab", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def assert_one_line_error(r, *words):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    for word in words:
        assert word in lines[0], lines[0]


def damage_missing_tokenizer(run):
    (run / "tokenizer.json").unlink()
    return ("tokenizer.json", "missing")


def damage_corrupt_tokenizer(run):
    (run / "tokenizer.json").write_text("{oops")
    return ("tokenizer.json", "corrupt")


def damage_missing_config(run):
    (run / "config.json").unlink()
    return ("config.json",)


def damage_corrupt_config(run):
    (run / "config.json").write_text("garbage")
    return ("config.json", "JSON")


def damage_missing_weights(run):
    # without best.safetensors sampling falls back to last.safetensors; with neither it must say so
    (run / "best.safetensors").unlink()
    (run / "last.safetensors").unlink()
    return ("last.safetensors", "not found")


def damage_truncated_weights(run):
    data = (run / "best.safetensors").read_bytes()
    (run / "best.safetensors").write_bytes(data[: len(data) // 3])
    return ("best.safetensors", "corrupt or truncated")


def damage_weights_of_another_shape(run):
    import torch
    from safetensors.torch import save_file

    from gptlab.config import ModelConfig
    from gptlab.model import GPT

    other = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=48, block_size=32, vocab_size=65))
    tensors = {k: v.contiguous() for k, v in other.state_dict().items() if k != "lm_head.weight"}
    save_file(tensors, str(run / "best.safetensors"), metadata={"format": "pt"})
    assert torch.is_tensor(tensors["transformer.wte.weight"])
    return ("best.safetensors", "do not fit")


@pytest.mark.parametrize("damage", [damage_missing_tokenizer, damage_corrupt_tokenizer, damage_missing_config,
                                    damage_corrupt_config, damage_missing_weights, damage_truncated_weights,
                                    damage_weights_of_another_shape], ids=lambda f: f.__name__[len("damage_"):])
def test_sampling_from_a_damaged_run_folder(copy_run, damage):
    run = copy_run()
    words = damage(run)
    assert_one_line_error(gptlab("sample", run, "--max-new-tokens", "5"), *words)


@pytest.mark.parametrize("prompt,words", [("ROMEO\x01\x07:", ("'\\x01'", "'\\x07'")), ("caf\udce9", ("'\\udce9'",))],
                         ids=["control-characters", "unpaired-surrogate"])
def test_prompt_with_characters_the_char_tokenizer_never_saw(tiny_run, prompt, words):
    r = subprocess.run([sys.executable, "-m", "gptlab", "sample", str(tiny_run), "--prompt", prompt,
                        "--max-new-tokens", "5"], capture_output=True, text=True, timeout=300,
                       errors="surrogateescape")
    assert_one_line_error(r, "never saw", *words)


def test_a_one_megabyte_prompt_is_cropped_from_the_left_not_a_crash(tiny_run, tmp_path):
    prompt = tmp_path / "big.txt"
    prompt.write_text("First Citizen:\n" * 70_000)  # ~1 MB
    r = gptlab("sample", tiny_run, "--prompt-file", prompt, "--max-new-tokens", "5", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "using its last 32" in r.stderr


def test_resuming_from_a_folder_whose_data_moved_is_a_clear_error(copy_run):
    run = copy_run()
    import json

    config = json.loads((run / "config.json").read_text())
    config["train"]["data"] = str(run / "no-such-data")
    (run / "config.json").write_text(json.dumps(config))
    assert_one_line_error(gptlab("train", "--resume", run, "--max-iters", "40"), "no-such-data")
    shutil.rmtree(run)


def test_a_run_written_before_the_llama_settings_is_a_gpt2_run(copy_run):
    """config.json from before arch, n_kv_head, ... existed: the defaults describe what it was trained as."""
    import json

    from gptlab.config import LATER_MODEL_FIELDS

    run = copy_run()
    config = json.loads((run / "config.json").read_text())
    before = {k: v for k, v in config["model"].items() if k not in LATER_MODEL_FIELDS}
    assert len(before) == len(config["model"]) - len(LATER_MODEL_FIELDS)
    (run / "config.json").write_text(json.dumps({**config, "model": before}))
    r = gptlab("sample", run, "--max-new-tokens", "5", "--seed", "1")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr


def test_a_run_whose_arch_was_edited_no_longer_fits_its_weights(copy_run):
    import json

    run = copy_run()
    config = json.loads((run / "config.json").read_text())
    config["model"]["arch"] = "llama"
    (run / "config.json").write_text(json.dumps(config))
    assert_one_line_error(gptlab("sample", run, "--max-new-tokens", "5"), "best.safetensors", "do not fit")
