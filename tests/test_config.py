"""Config: presets as data, precedence preset < file < flags, validation with named flags."""

from __future__ import annotations

import json

import pytest

from gptlab.config import ModelConfig, get_preset, resolve_config
from gptlab.errors import GptlabError
from gptlab.model import GPT


def test_gpt2_124m_preset_has_gpt2_parameter_count():
    model = ModelConfig(**get_preset("gpt2-124m")["model"])
    assert model.num_params() == 124_439_808


def test_char_small_preset_is_about_10_7m_params():
    model = ModelConfig(**get_preset("char-small")["model"])
    assert 10.6e6 < model.num_params(65) < 10.9e6


def test_cpu_tiny_is_the_nanogpt_cpu_recipe_shape():
    model, train = resolve_config("cpu-tiny")
    assert (model.n_layer, model.n_head, model.n_embd, model.block_size, model.dropout) == (4, 4, 128, 64, 0.0)
    assert train.batch_size == 12


@pytest.mark.parametrize("bias", [True, False])
def test_analytic_param_count_matches_the_real_model(bias):
    cfg = ModelConfig(n_layer=3, n_head=2, n_embd=48, block_size=40, vocab_size=77, bias=bias)
    assert cfg.num_params() == GPT(cfg).num_params()


def test_precedence_preset_then_file_then_flags(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": {"n_layer": 7}, "train": {"max_iters": 11, "batch_size": 5}}))
    model, train = resolve_config("cpu-tiny", path, {"max_iters": 99})
    assert model.n_layer == 7  # file beats preset
    assert model.n_embd == 128  # preset kept where nothing overrides
    assert train.max_iters == 99  # flag beats file
    assert train.batch_size == 5


def test_flat_config_file_works(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"n_embd": 64, "learning_rate": 3e-4}))
    model, train = resolve_config(None, path)
    assert model.n_embd == 64 and train.learning_rate == 3e-4


@pytest.mark.parametrize(
    "overrides,flag",
    [
        ({"n_embd": 130, "n_head": 4}, "--n-embd"),
        ({"learning_rate": 0.0}, "--learning-rate"),
        ({"learning_rate": -1.0}, "--learning-rate"),
        ({"batch_size": 0}, "--batch-size"),
        ({"max_iters": -5}, "--max-iters"),
        ({"dropout": 1.0}, "--dropout"),
        ({"sampler": "circular"}, "--sampler"),
        ({"dtype": "int8"}, "--dtype"),
    ],
)
def test_bad_values_name_their_flag(overrides, flag):
    with pytest.raises(GptlabError, match=flag):
        resolve_config("cpu-tiny", None, overrides)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(GptlabError, match="cpu-tiny"):
        resolve_config("gpt5")
