"""gptlab export --format gguf of llama runs: llama.cpp's `llama` (and `qwen3` with QK-norm) computing what we do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gptlab.config import resolve_config
from gptlab.generation import load
from gptlab.hf.export import export

from .test_gguf import BLOCK, GREEDY_PROMPT, PROMPT, llama, llama_greedy
from .test_hf_import import prepared

# Per run: what it shows, and its settings beyond the shared ones (n_layer 2, n_head 4, n_embd 64).
RUNS = {
    "gqa": dict(n_kv_head=2),  # grouped-query attention, tied head, the defaults otherwise
    # one key/value head, an untied head, and every llama setting away from its default; an MLP
    # width of 80 does not split into q8_0's 32-value blocks
    "untied": dict(n_kv_head=1, tie_embeddings=False, mlp_hidden=80, rope_theta=500_000.0, norm_eps=1e-6),
    "qk_norm": dict(n_kv_head=2, qk_norm=True),  # llama.cpp's qwen3
}
ARCHITECTURE = {"gqa": "llama", "untied": "llama", "qk_norm": "qwen3"}  # llama.cpp's, in the file
# f32 files: llama.cpp's logits agree with ours to ~2e-6 (float32 rounding; f16 files ~8e-4, q8_0
# ~2e-2); the bound leaves room for other CPUs' kernels. With the q/k rows left in HF's rotate-half
# order, the llama files miss by ~5e-2.
TOLERANCE = 1e-4
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_corpus) -> dict[str, Path]:
    """A tiny trained llama run (bpe:300) per entry of RUNS: enough steps that every weight matters."""
    from gptlab.train import train

    root = tmp_path_factory.mktemp("gguf-llama-runs")
    data = prepared(tmp_path_factory, small_corpus, "bpe:300")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, settings in RUNS.items():
            model_cfg, cfg = resolve_config(overrides=dict(
                arch="llama", n_layer=2, n_head=4, n_embd=64, block_size=BLOCK, dropout=0.0, **settings,
                data=str(data), out=str(root / name), batch_size=8, max_iters=60, eval_interval=30, eval_iters=2,
                num_samples=1, sample_tokens=10, warmup_iters=5, learning_rate=3e-3,
            ))
            train(model_cfg, cfg, quiet=True)
    finally:
        torch.set_num_threads(threads)
    return {name: root / name for name in RUNS}


def fields(path: Path) -> dict:
    """The file's metadata (scalars and strings) and each tensor's type, read back with the gguf package."""
    import gguf

    reader = gguf.GGUFReader(path)
    meta = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("tokenizer.")}
    return {"meta": meta, "types": {t.name: t.tensor_type.name for t in reader.tensors},
            "tensors": {t.name: np.array(t.data) for t in reader.tensors}}


def assert_llama_cpp_logits(llm, tm, prompt: str = PROMPT) -> None:
    """llama.cpp tokenizes `prompt` to our ids and scores every position as our model does (within TOLERANCE)."""
    ids = tm.tokenizer.encode(prompt)
    assert llm.tokenize(prompt.encode(), add_bos=False, special=False) == ids
    llm.eval(ids)
    with torch.no_grad():
        ours = tm.model(torch.tensor([ids]))[0].numpy()
    assert np.abs(llm.scores[:len(ids)] - ours).max() <= TOLERANCE


@pytest.mark.parametrize("name", list(RUNS))
def test_llama_cpp_runs_the_llama_export_as_we_do(name, runs, tmp_path, one_thread):
    out = export(runs[name], tmp_path / "model.gguf", fmt="gguf")
    llm = llama(out, logits_all=True, type_k=0, type_v=0)  # GGML_TYPE_F32: a KV cache as exact as our model
    assert llm.metadata["general.architecture"] == ARCHITECTURE[name]
    tm = load(runs[name], device="cpu")
    assert_llama_cpp_logits(llm, tm)

    ids = tm.tokenizer.encode(GREEDY_PROMPT)
    theirs = llama_greedy(llm, ids, NEW_TOKENS)
    greedy = tm.generate(GREEDY_PROMPT, temperature=0.0, max_new_tokens=NEW_TOKENS)[0]
    assert tm.tokenizer.decode(theirs) == greedy
    with torch.no_grad():  # and along the continuation, where the model feeds on its own tokens
        ours = tm.model(torch.tensor([ids + theirs]))[0].numpy()
    assert np.abs(llm.scores[:len(ids) + NEW_TOKENS] - ours).max() <= TOLERANCE
    llm.reset()
    completion = llm.create_completion(GREEDY_PROMPT, max_tokens=NEW_TOKENS, temperature=0.0)["choices"][0]["text"]
    assert completion == greedy


@pytest.mark.parametrize("name", list(RUNS))
def test_the_file_states_the_runs_shape(name, runs, tmp_path):
    out = export(runs[name], tmp_path / "model.gguf", fmt="gguf")
    cfg = load(runs[name], device="cpu").config
    found = fields(out)
    meta, arch = found["meta"], ARCHITECTURE[name]
    assert meta["general.architecture"] == arch
    assert meta[f"{arch}.context_length"] == cfg.block_size == BLOCK
    assert meta[f"{arch}.feed_forward_length"] == cfg.hidden == (80 if name == "untied" else 192)
    assert meta[f"{arch}.attention.head_count"] == 4
    assert meta[f"{arch}.attention.head_count_kv"] == cfg.kv_heads
    assert meta[f"{arch}.rope.dimension_count"] == 16
    assert meta[f"{arch}.rope.freq_base"] == pytest.approx(cfg.rope_theta)
    assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
    assert meta[f"{arch}.vocab_size"] == 300
    block = {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"}
    if name == "qk_norm":
        block |= {"attn_q_norm", "attn_k_norm"}
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}
    expected |= {f"blk.{n}.{t}.weight" for n in range(2) for t in block}
    assert set(found["types"]) == expected
    tensors = found["tensors"]
    tied = np.array_equal(tensors["output.weight"], tensors["token_embd.weight"])
    assert tied == (name != "untied")  # the head is written out either way


def test_q8_0_keeps_norms_f32_and_writes_f16_where_rows_do_not_split_into_its_blocks(runs, tmp_path, one_thread):
    out = export(runs["untied"], tmp_path / "q.gguf", fmt="gguf", outtype="q8_0")
    types = fields(out)["types"]
    assert types["blk.0.attn_q.weight"] == types["blk.0.ffn_up.weight"] == types["output.weight"] == "Q8_0"  # rows of 64
    assert types["blk.0.ffn_down.weight"] == "F16"  # rows of 80
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    assert llama(out).create_completion("ROMEO:", max_tokens=10, temperature=0.0)["choices"][0]["text"]


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
@pytest.mark.parametrize("name", ["gqa", "qk_norm"])
def test_smaller_outtypes_load_and_generate(name, outtype, runs, tmp_path, one_thread):
    out = export(runs[name], tmp_path / f"model-{outtype}.gguf", fmt="gguf", outtype=outtype)
    assert out.stat().st_size < export(runs[name], tmp_path / "f32.gguf", fmt="gguf").stat().st_size
    llm = llama(out)
    text = llm.create_completion("ROMEO:", max_tokens=NEW_TOKENS, temperature=0.0)["choices"][0]["text"]
    assert text
