"""Hugging Face Llama in and out: --init-from a LlamaForCausalLM folder, export as one, parity with transformers.

Every model here is a tiny random LlamaForCausalLM built locally or a tiny run trained here, on the
bpe:300 tokenizer of a slice of Shakespeare; nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from gptlab.config import ModelConfig
from gptlab.engine import generate
from gptlab.errors import GptlabError
from gptlab.generation import load
from gptlab.hf import llama
from gptlab.hf.init import load_init
from gptlab.model import build_model
from gptlab.rundir import read_metrics
from gptlab.tokenizer import load_tokenizer

from .test_hf_import import hf_logits, prepared, run_cli

transformers = pytest.importorskip("transformers")

# 2 layers, 4 query heads sharing 2 key/value heads, a SwiGLU of 160, Llama 3's rotary base and eps.
TINY_LLAMA = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, rope_theta=500000.0, rms_norm_eps=1e-6)

# A trained run of the same shape, through the CLI: the llama flags, tied embeddings (the default).
LLAMA_FLAGS = ("--arch", "llama", "--n-layer", "2", "--n-head", "4", "--n-kv-head", "2", "--n-embd", "64",
               "--block-size", "64")
SHORT_RUN = ("--batch-size", "8", "--eval-iters", "2", "--warmup-iters", "5", "--num-samples", "1",
             "--sample-tokens", "20", "--quiet")


def assert_same_greedy_tokens(tm, hf_model, prompt: str = "ROMEO:", n: int = 20) -> None:
    """Our greedy continuation of `prompt` is transformers' `generate(do_sample=False)`, token for token."""
    ids = torch.tensor([tm.tokenizer.encode(prompt)])
    ours = generate(tm.model, ids, n, temperature=0.0)
    with torch.no_grad():
        theirs = hf_model.generate(ids, do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None,
                                   pad_token_id=0, attention_mask=torch.ones_like(ids))
    assert ours.tolist() == theirs.tolist()


def make_hf_llama(folder: Path, vocab_size: int, tokenizer_files: dict[str, str], seed: int = 0,
                  **overrides) -> transformers.LlamaForCausalLM:
    """A tiny random LlamaForCausalLM saved in shards, as large Hub models are, with a tokenizer.json."""
    torch.manual_seed(seed)
    settings = {**TINY_LLAMA, "tie_word_embeddings": False, **overrides}
    config = transformers.LlamaConfig(vocab_size=vocab_size, dtype="float32", **settings)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norm gains away from 1, so a dropped or misplaced one shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder, max_shard_size="100KB")
    for name, text in tokenizer_files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return model


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory, small_corpus) -> Path:
    return prepared(tmp_path_factory, small_corpus, "bpe:300")


@pytest.fixture(scope="module")
def hf_untied(tmp_path_factory, bpe_data):
    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    tok = load_tokenizer(bpe_data)
    return folder, make_hf_llama(folder, tok.vocab_size, tok.hf_files())


@pytest.fixture(scope="module")
def hf_tied(tmp_path_factory, bpe_data):
    folder = tmp_path_factory.mktemp("hf") / "tiny-llama-tied"
    tok = load_tokenizer(bpe_data)
    return folder, make_hf_llama(folder, tok.vocab_size, tok.hf_files(), seed=1, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def llama_runs(tmp_path_factory, bpe_data, hf_untied) -> dict[str, Path]:
    """'imported': the untied HF model held as a run (a learning rate that moves nothing); 'trained': a tied run."""
    from gptlab import cli

    root = tmp_path_factory.mktemp("llama-runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see conftest's one_thread
    try:
        imported, trained = root / "imported", root / "trained"
        assert cli.main([str(a) for a in ("train", "--data", bpe_data, "--init-from", hf_untied[0], "--lr", "1e-9",
                                          "--warmup-iters", "0", "--max-iters", "1", "--eval-interval", "1",
                                          "--eval-iters", "1", "--batch-size", "2", "--num-samples", "0",
                                          "--out", imported, "--quiet")]) == 0
        assert cli.main([str(a) for a in ("train", "--data", bpe_data, *LLAMA_FLAGS, "--max-iters", "30",
                                          "--eval-interval", "10", "--lr", "3e-3", *SHORT_RUN, "--out", trained)]) == 0
    finally:
        torch.set_num_threads(threads)
    return {"imported": imported, "trained": trained}


def test_llama_shapes_are_what_the_model_saves():
    from gptlab.checkpoint import state_dict_for_saving

    for tie in (True, False):
        cfg = ModelConfig(arch="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=8, vocab_size=11,
                          tie_embeddings=tie)
        assert cfg.param_shapes() == {k: tuple(v.shape) for k, v in state_dict_for_saving(build_model(cfg)).items()}


def test_a_sharded_untied_gqa_llama_imports_with_transformers_logits(hf_untied, bpe_data, one_thread):
    folder, hf = hf_untied
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    model_cfg, weights, tokenizer = load_init(folder, ModelConfig(), load_tokenizer(bpe_data))
    assert (model_cfg.arch, model_cfg.n_layer, model_cfg.n_embd, model_cfg.n_head, model_cfg.kv_heads) == ("llama", 2, 64, 4, 2)
    assert (model_cfg.hidden, model_cfg.block_size, model_cfg.rope_theta, model_cfg.norm_eps) == (160, 64, 500000.0, 1e-6)
    assert not model_cfg.tie_embeddings and tokenizer.name == "bpe"
    assert all(w.dtype == torch.float32 for w in weights.values())
    ours = build_model(model_cfg).eval()
    ours.load_state_dict(weights)  # strict: every name and shape
    ids = torch.randint(0, tokenizer.vocab_size, (3, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - hf_logits(hf, ids)).abs().max().item() <= 1e-4


def test_a_shorter_context_changes_no_logit(hf_untied, bpe_data, one_thread):
    folder, hf = hf_untied
    model_cfg, weights, _ = load_init(folder, ModelConfig(), load_tokenizer(bpe_data), block_size=16)
    assert model_cfg.block_size == 16
    ours = build_model(model_cfg).eval()
    ours.load_state_dict(weights)
    ids = torch.randint(0, model_cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (ours(ids) - hf_logits(hf, ids)).abs().max().item() <= 1e-4
    with pytest.raises(GptlabError, match=r"--block-size 65 is longer than the 64 positions .* give at most 64"):
        load_init(folder, ModelConfig(), block_size=65)


def test_a_tied_llama_fills_its_head_from_the_embedding(hf_tied, bpe_data, one_thread):
    folder, hf = hf_tied
    model_cfg, weights, _ = load_init(folder, ModelConfig(), load_tokenizer(bpe_data))
    assert model_cfg.tie_embeddings
    assert weights["lm_head.weight"] is weights["model.embed_tokens.weight"]
    ours = build_model(model_cfg).eval()
    ours.load_state_dict(weights)
    ids = torch.randint(0, model_cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(ids) - hf_logits(hf, ids)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", ["imported", "trained"])
def test_an_exported_llama_is_ours_in_plain_transformers(kind, llama_runs, hf_untied, tmp_path, capsys, one_thread):
    from safetensors import safe_open

    run = llama_runs[kind]
    out = tmp_path / "export"
    code, _, err = run_cli(capsys, "export", run, "--out", out)
    assert code == 0, err
    tm = load(run, device="cpu")
    tied = kind == "trained"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["num_key_value_heads"], config["tie_word_embeddings"]) == (2, tied)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) is not tied  # a tied head is written once, as save_pretrained does
    card = (out / "README.md").read_text()
    assert "A Llama-style language model" in card and "- llama\n" in card and "- gpt2" not in card
    assert "4 query heads sharing 2 key/value heads" in card and "`LlamaForCausalLM`" in card

    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, tm.tokenizer.vocab_size, (3, 64), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = tm.model(ids)
    assert (hf_logits(back, ids) - ours).abs().max().item() <= 1e-4
    if kind == "imported":  # and the run is the folder it came from
        assert (hf_logits(hf_untied[1], ids) - ours).abs().max().item() <= 1e-4

    assert_same_greedy_tokens(tm, back)

    # And the export imports back as the same model.
    model_cfg, weights, _ = load_init(out, ModelConfig(), tm.tokenizer)
    again = build_model(model_cfg).eval()
    again.load_state_dict(weights)
    with torch.no_grad():
        assert (again(ids) - ours).abs().max().item() <= 1e-5


def test_a_llama_run_can_start_another(llama_runs, bpe_data, tmp_path, one_thread):
    model_cfg, weights, _ = load_init(llama_runs["trained"], ModelConfig(), load_tokenizer(bpe_data))
    assert model_cfg.arch == "llama" and model_cfg.tie_embeddings
    build_model(model_cfg).load_state_dict(weights)  # strict, the tied head included


def test_fine_tuning_an_imported_llama_lowers_the_loss(tmp_path, bpe_data, capsys, one_thread):
    folder = tmp_path / "hf"
    tok = load_tokenizer(bpe_data)
    make_hf_llama(folder, tok.vocab_size, tok.hf_files(), seed=3)
    run = tmp_path / "ft"
    code, _, err = run_cli(capsys, "train", "--init-from", folder, "--data", bpe_data, "--max-iters", "60",
                           "--eval-interval", "30", "--lr", "3e-3", *SHORT_RUN, "--out", run)
    assert code == 0, err
    evals = [r for r in read_metrics(run) if not math.isnan(r["val_loss"])]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 60
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5, evals


def _bad_copy(source: Path, dest: Path, **config_changes) -> Path:
    shutil.copytree(source, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(config_changes)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_what_our_block_cannot_compute_is_a_one_line_error(hf_untied, bpe_data, tmp_path, capsys):
    folder, hf = hf_untied
    no_head = tmp_path / "no-head"
    shutil.copytree(folder, no_head)
    index = json.loads((no_head / "model.safetensors.index.json").read_text())
    shard = index["weight_map"].pop("lm_head.weight")
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(no_head / shard))
    del tensors["lm_head.weight"]
    save_file(tensors, str(no_head / shard), metadata={"format": "pt"})
    (no_head / "model.safetensors.index.json").write_text(json.dumps(index))
    llama3_rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 32, "rope_theta": 500000.0}
    cases = [
        (_bad_copy(folder, tmp_path / "rope", rope_parameters=llama3_rope, rope_scaling=llama3_rope),
         "rope_scaling is 'llama3' (scaled rotary positions), which gptlab's Llama block does not compute"),
        (_bad_copy(folder, tmp_path / "gelu", hidden_act="gelu"), "hidden_act is 'gelu', not silu"),
        (_bad_copy(folder, tmp_path / "bert", model_type="bert"),
         "describes a bert model; --init-from takes Hugging Face models of type gpt2 or llama, or gptlab runs"),
        (no_head, "the output head is untied (tie_word_embeddings false) but the weights have no lm_head.weight"),
    ]
    for source, expected in cases:
        code, _, err = run_cli(capsys, "train", "--data", bpe_data, "--init-from", source, "--out", tmp_path / "run",
                               "--max-iters", "1", "--quiet")
        assert code == 2, (source, err)
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith("gptlab train: error: ") and expected in err, err
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("change, expected", [
    ({"attention_bias": True}, "attention_bias is on"),
    ({"mlp_bias": True}, "mlp_bias is on"),
    ({"head_dim": 32}, "head_dim 32 is not hidden_size / num_attention_heads (16)"),
    ({"num_key_value_heads": 3}, "num_key_value_heads 3 does not divide num_attention_heads 4"),
    ({"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling is 'linear'"),
    ({"rope_parameters": None, "rope_scaling": None, "rope_theta": 10000.0}, None),  # transformers 4's spelling
    ({"pretraining_tp": 2}, None),  # slices of the same matmuls: the same maths
])
def test_llama_configs_are_read_or_refused_by_field(hf_untied, change, expected):
    folder, _ = hf_untied
    config = {**json.loads((folder / "config.json").read_text()), **change}
    if expected is None:
        cfg = llama.model_config_from_hf(config, folder)
        assert cfg.arch == "llama" and cfg.rope_theta == config.get("rope_theta", 500000.0)
        return
    with pytest.raises(GptlabError) as e:
        llama.model_config_from_hf(config, folder)
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_exporting_a_qk_norm_run_says_llama_cannot_express_it(bpe_data, tmp_path, capsys, one_thread):
    run = tmp_path / "qk"
    code, _, err = run_cli(capsys, "train", "--data", bpe_data, *LLAMA_FLAGS, "--qk-norm", "--max-iters", "2",
                           "--eval-interval", "2", *SHORT_RUN, "--out", run)
    assert code == 0, err
    code, _, err = run_cli(capsys, "export", run, "--out", tmp_path / "export")
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("gptlab export: error: ") and "has --qk-norm, which LlamaForCausalLM cannot express" in err
    assert not (tmp_path / "export").exists() and not list(tmp_path.glob(".*export*"))


@pytest.mark.parametrize("style", ["byte-level-chat", "sentencepiece-prepend"])
def test_a_llama_with_its_own_tokenizer_prepares_fine_tunes_and_exports(style, small_corpus, tmp_path, capsys, one_thread):
    """The README's SmolLM2 recipe in small: prepare --tokenizer-from, train --init-from, export, transformers."""
    from tokenizers import Tokenizer as HFTokenizer

    from .test_tokenizer_from import FOLDERS

    hf = FOLDERS[style](tmp_path / "hf")  # SmolLM2's byte-level BPE with chat tokens, or TinyLlama's SentencePiece
    vocab = HFTokenizer.from_file(str(hf / "tokenizer.json")).get_vocab_size()
    torch.manual_seed(5)
    config = transformers.LlamaConfig(vocab_size=vocab, tie_word_embeddings=True, dtype="float32", **TINY_LLAMA)
    transformers.LlamaForCausalLM(config).save_pretrained(hf)
    data, run, out = tmp_path / "data", tmp_path / "run", tmp_path / "export"
    for argv in (("prepare", small_corpus, "--tokenizer-from", hf, "--out", data),
                 ("train", "--init-from", hf, "--data", data, "--max-iters", "3", "--eval-interval", "3", *SHORT_RUN,
                  "--out", run),
                 ("export", run, "--out", out)):
        code, _, err = run_cli(capsys, *argv)
        assert code == 0, (argv[0], err)

    tm = load(run, device="cpu")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "ROMEO: Is it so? then\nI defy you, stars!"
    assert their_tokenizer(text, add_special_tokens=False)["input_ids"] == tm.tokenizer.encode(text)
    assert_same_greedy_tokens(tm, back)


def test_text_with_init_from_keeps_the_models_shape_and_takes_a_shorter_context(hf_tied, small_corpus, tmp_path,
                                                                                  capsys, one_thread):
    """`gptlab train TEXT --init-from DIR --block-size N --time T`: the sizing picks only the length (no
    from-scratch preset's shape or learning rates), and the context is the one asked for."""
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", small_corpus, "--init-from", hf_tied[0], "--block-size", "32",
                             "--time", "3s", "--eval-iters", "1", "--batch-size", "2", "--num-samples", "0",
                             "--out", run)
    assert code == 0, err
    assert "picked the" not in out  # no shape is picked for a model that comes whole
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["arch"] == "llama" and config["model"]["block_size"] == 32
    assert config["model"]["n_embd"] == TINY_LLAMA["hidden_size"]
    assert config["train"]["optimizer"] == "adamw" and config["train"]["learning_rate"] == 1e-3
    assert config["train"]["time"] == "3s"
