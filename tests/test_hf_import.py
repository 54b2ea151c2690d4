"""--init-from: Hugging Face GPT-2 weights in, parity with transformers, fine-tuning, and unsafe or wrong inputs.

Every model here is a tiny random GPT2LMHeadModel built locally; nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from gptlab import cli
from gptlab.config import ModelConfig, resolve_config
from gptlab.engine import generate
from gptlab.generation import load
from gptlab.hf.init import load_init
from gptlab.model import GPT
from gptlab.rundir import read_metrics
from gptlab.tokenizer import load_tokenizer
from gptlab.train import train

transformers = pytest.importorskip("transformers")

TINY_HF = dict(n_positions=32, n_embd=32, n_layer=2, n_head=2, activation_function="gelu_new")


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def make_hf_gpt2(folder: Path, seed: int = 0, **overrides) -> transformers.GPT2LMHeadModel:
    """A tiny random GPT-2 with the GPT-2 vocabulary, saved like a Hub download (safetensors + tokenizer files)."""
    from gptlab.tokenizer import _gpt2_files

    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=50257, **{**TINY_HF, **overrides})
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # biases and LayerNorms away from 0 and 1, so a dropped or misplaced one shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    vocab_bpe, encoder_json = _gpt2_files()
    shutil.copyfile(encoder_json, folder / "vocab.json")
    shutil.copyfile(vocab_bpe, folder / "merges.txt")
    return model


def prepared(tmp_path_factory, corpus: Path, spec: str) -> Path:
    """The corpus prepared with `spec`, once per pytest run (both HF test modules share it)."""
    from gptlab.data import prepare

    out = tmp_path_factory.getbasetemp() / "hf-data" / spec.replace(":", "")
    if not (out / "meta.json").is_file():
        prepare([str(corpus)], tokenizer=spec, out=out, log=lambda *a: None)
    return out


@pytest.fixture(scope="module")
def gpt2_data(tmp_path_factory, small_corpus) -> Path:
    return prepared(tmp_path_factory, small_corpus, "gpt2")


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    return folder, make_hf_gpt2(folder)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("bias", [True, False])
def test_expected_shapes_are_what_the_model_saves(bias):
    from gptlab.checkpoint import state_dict_for_saving

    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=11, bias=bias)
    assert cfg.param_shapes() == {k: tuple(v.shape) for k, v in state_dict_for_saving(GPT(cfg)).items()}


def test_imported_logits_equal_transformers(hf_gpt2, gpt2_data, one_thread):
    folder, hf = hf_gpt2
    model_cfg, weights, tokenizer = load_init(folder, ModelConfig(), load_tokenizer(gpt2_data))
    assert (model_cfg.n_layer, model_cfg.n_embd, model_cfg.block_size, model_cfg.vocab_size) == (2, 32, 32, 50257)
    assert model_cfg.bias and model_cfg.gelu_approximate == "tanh" and tokenizer.name == "gpt2"
    ours = GPT(model_cfg).eval()
    ours.load_state_dict(weights)
    ids = torch.randint(0, 50257, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - hf_logits(hf, ids)).abs().max().item() <= 1e-4


def test_a_wider_mlp_and_another_layer_norm_eps_import_and_export_back(tmp_path, gpt2_data, one_thread):
    folder = tmp_path / "hf"
    hf = make_hf_gpt2(folder, seed=4, n_inner=48, layer_norm_epsilon=1e-6)
    model_cfg, weights, _ = load_init(folder, ModelConfig(), load_tokenizer(gpt2_data))
    assert (model_cfg.hidden, model_cfg.norm_eps) == (48, 1e-6)
    ours = GPT(model_cfg).eval()
    ours.load_state_dict(weights)
    ids = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (ours(ids) - hf_logits(hf, ids)).abs().max().item() <= 1e-4

    from gptlab.hf.gpt2 import hf_config

    config = hf_config(model_cfg, 50257, 50256)
    assert (config["n_inner"], config["layer_norm_epsilon"]) == (48, 1e-6)
    assert (hf_config(ModelConfig(n_embd=32), 10, None)["n_inner"]) == 128


def test_a_shorter_context_keeps_the_first_positions(hf_gpt2, gpt2_data, one_thread):
    folder, hf = hf_gpt2
    model_cfg, weights, _ = load_init(folder, ModelConfig(), load_tokenizer(gpt2_data), block_size=8)
    assert model_cfg.block_size == 8 and tuple(weights["transformer.wpe.weight"].shape) == (8, 32)
    ours = GPT(model_cfg).eval()
    ours.load_state_dict(weights)
    ids = torch.randint(0, 50257, (2, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (ours(ids) - hf_logits(hf, ids)).abs().max().item() <= 1e-4


def test_init_from_through_the_cli_then_export_round_trips(hf_gpt2, gpt2_data, tmp_path, capsys, one_thread):
    folder, hf = hf_gpt2
    run = tmp_path / "run"
    # A learning rate of 1e-9 moves no weight measurably: the run holds the imported model.
    code, _, err = run_cli(capsys, "train", "--data", gpt2_data, "--init-from", folder, "--lr", "1e-9",
                           "--warmup-iters", "0", "--max-iters", "1", "--eval-interval", "1", "--eval-iters", "1",
                           "--batch-size", "2", "--num-samples", "0", "--out", run, "--quiet")
    assert code == 0, err
    assert json.loads((run / "config.json").read_text())["train"]["init_from"] == str(folder)
    tm = load(run, device="cpu")
    ids = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = tm.model(ids)
    assert (ours - hf_logits(hf, ids)).abs().max().item() <= 1e-4

    exported = tmp_path / "export"
    code, out, err = run_cli(capsys, "export", run, "--out", exported)
    assert code == 0, err
    back = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert (hf_logits(back, ids) - ours).abs().max().item() <= 1e-4

    prompt = ids[:1, :5]
    our_ids = generate(tm.model, prompt, 20, temperature=0.0)
    with torch.no_grad():
        their_ids = back.generate(prompt, do_sample=False, max_new_tokens=20, min_new_tokens=20, eos_token_id=None,
                                  pad_token_id=0, attention_mask=torch.ones_like(prompt))
    assert our_ids.tolist() == their_ids.tolist()


def test_fine_tuning_an_imported_gpt2_lowers_the_loss(tmp_path, gpt2_data, one_thread):
    folder = tmp_path / "hf"
    make_hf_gpt2(folder, seed=3)
    model_cfg, cfg = resolve_config(overrides=dict(
        data=str(gpt2_data), init_from=str(folder), out=str(tmp_path / "ft"), batch_size=4, max_iters=12,
        eval_interval=6, eval_iters=2, learning_rate=3e-3, warmup_iters=2, num_samples=0,
    ))
    result = train(model_cfg, cfg, quiet=True, init=load_init(folder, model_cfg, load_tokenizer(gpt2_data)))
    rows = read_metrics(result.run_dir)
    assert rows[0]["step"] == 0 and rows[-1]["step"] == 12
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 0.5, rows


def test_a_hub_style_checkpoint_imports_too(hf_gpt2, gpt2_data, tmp_path):
    """The Hub's gpt2 stores GPT2Model names (no `transformer.`), the causal-mask buffers, sometimes float16."""
    from safetensors.torch import save_file

    folder, hf = hf_gpt2
    hub = tmp_path / "hub"
    hub.mkdir()
    for name in ("config.json", "vocab.json", "merges.txt"):
        shutil.copyfile(folder / name, hub / name)
    tensors = {k.removeprefix("transformer."): v.half() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    for layer in range(TINY_HF["n_layer"]):
        tensors[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(hub / "model.safetensors"))
    _, weights, _ = load_init(hub, ModelConfig(), load_tokenizer(gpt2_data))
    _, reference, _ = load_init(folder, ModelConfig(), load_tokenizer(gpt2_data))
    assert weights.keys() == reference.keys()
    assert all(weights[k].dtype == torch.float32 and torch.allclose(weights[k], reference[k], atol=1e-2) for k in weights)


def test_pytorch_model_bin_loads_as_plain_tensors(tmp_path, hf_gpt2, gpt2_data):
    folder, hf = hf_gpt2
    binary = tmp_path / "bin"
    binary.mkdir()
    for name in ("config.json", "vocab.json", "merges.txt"):
        shutil.copyfile(folder / name, binary / name)
    torch.save(hf.state_dict(), binary / "pytorch_model.bin")
    _, from_bin, _ = load_init(binary, ModelConfig(), load_tokenizer(gpt2_data))
    _, from_safetensors, _ = load_init(folder, ModelConfig(), load_tokenizer(gpt2_data))
    assert from_bin.keys() == from_safetensors.keys()
    assert all(torch.equal(from_bin[k], from_safetensors[k]) for k in from_bin)


class _Payload:
    """Unpickling this creates a file: what a hostile checkpoint would do (with worse code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path, hf_gpt2, gpt2_data, capsys):
    folder, _ = hf_gpt2
    evil = tmp_path / "evil"
    evil.mkdir()
    for name in ("config.json", "vocab.json", "merges.txt"):
        shutil.copyfile(folder / name, evil / name)
    marker = tmp_path / "pwned"
    torch.save({"transformer.wte.weight": torch.zeros(2), "x": _Payload(marker)}, evil / "pytorch_model.bin")
    torch.load(evil / "pytorch_model.bin", weights_only=False)  # the payload is real: a full unpickle runs it
    assert marker.exists()
    marker.unlink()

    code, _, err = run_cli(capsys, "train", "--data", gpt2_data, "--init-from", evil, "--out", tmp_path / "run",
                           "--max-iters", "1", "--quiet")
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "pytorch_model.bin is not plain tensors" in err and "it may hold code" in err
    assert not marker.exists()
    assert not (tmp_path / "run").exists()


def test_bad_init_from_inputs_are_one_line_errors(tmp_path, hf_gpt2, gpt2_data, char_data, capsys):
    folder, _ = hf_gpt2
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    no_tokenizer = tmp_path / "bare"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(folder / name, no_tokenizer / name)
    cases = [
        (gpt2_data, tmp_path / "nosuch", "folder not found; give a Hugging Face GPT-2 or Llama folder"),
        (gpt2_data, bert, "describes a bert model; --init-from takes Hugging Face models of type gpt2 or llama"),
        (gpt2_data, no_tokenizer, "has no tokenizer (vocab.json + merges.txt, or tokenizer.json)"),
        (char_data, folder, "uses the char tokenizer ("),
    ]
    for data, source, expected in cases:
        code, _, err = run_cli(capsys, "train", "--data", data, "--init-from", source, "--out", tmp_path / "run",
                               "--max-iters", "1", "--quiet")
        assert code == 2, (source, err)
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith("gptlab train: error: ") and expected in err, err
    assert "--tokenizer gpt2" in err  # the mismatch says how to prepare matching data
