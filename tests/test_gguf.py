"""gptlab export --format gguf: a file the real llama.cpp (through llama-cpp-python) runs as we do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gptlab import cli
from gptlab.config import resolve_config
from gptlab.errors import GptlabError
from gptlab.generation import load
from gptlab.hf.export import export

from .conftest import TINY_MODEL
from .test_hf_import import prepared

PROMPT = "ROMEO: Is it so? then\nI defy you, stars!"
MIXED = "Naïve café, 日本語 and 🙂!\n\n  two  spaces,\ttab; it's 1234 o'clock... <|endoftext|> stays text\n"
GREEDY_PROMPT = "ROMEO:\nWhat"
BLOCK = 128  # room for the prompt and 40 new tokens: llama.cpp does not slide past its context


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_corpus) -> dict[str, Path]:
    """A tiny trained run per byte-level BPE kind, without biases (the export fills zero ones).

    Few steps: llama.cpp computes GELU through an f16 table, so its logits drift from ours as the
    weights grow (9e-4 after 300 steps of bpe:300, 1e-4 after 60).
    """
    from gptlab.train import train

    root = tmp_path_factory.mktemp("gguf-runs")
    found = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for spec, steps in (("gpt2", 10), ("bpe:300", 60)):
            kind = spec.split(":")[0]
            model_cfg, cfg = resolve_config(overrides=dict(
                **{**TINY_MODEL, "block_size": BLOCK}, bias=False, data=str(prepared(tmp_path_factory, small_corpus, spec)),
                out=str(root / f"run-{kind}"), batch_size=8, max_iters=steps, eval_interval=10, eval_iters=2,
                num_samples=1, sample_tokens=10, warmup_iters=5, learning_rate=3e-3,
            ))
            train(model_cfg, cfg, quiet=True)
            found[kind] = root / f"run-{kind}"
    finally:
        torch.set_num_threads(threads)
    return found


def llama(path: Path, **kwargs):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(path), n_ctx=BLOCK, n_threads=1, verbose=False, **kwargs)


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    """llama.cpp's own logits, argmax each step, as `--greedy` does with ours."""
    llm.reset()
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_llama_cpp_runs_the_export_as_we_do(kind, runs, tmp_path, one_thread):
    out = export(runs[kind], tmp_path / "model.gguf", fmt="gguf")
    llm = llama(out, logits_all=True, type_k=0, type_v=0)  # GGML_TYPE_F32: a KV cache as exact as our model
    tm = load(runs[kind], device="cpu")
    ids = tm.tokenizer.encode(PROMPT)
    assert len(ids) + 40 <= BLOCK
    assert llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == ids
    assert llm.detokenize(ids).decode() == PROMPT

    llm.eval(ids)
    with torch.no_grad():
        ours = tm.model(torch.tensor([ids]))[0, :, :tm.tokenizer.vocab_size].numpy()
    assert np.abs(llm.scores[:len(ids)] - ours).max() <= 1e-3

    ids = tm.tokenizer.encode(GREEDY_PROMPT)
    theirs = llama_greedy(llm, ids, 40)
    greedy = tm.generate(GREEDY_PROMPT, temperature=0.0, max_new_tokens=40)[0]
    assert tm.tokenizer.decode(theirs) == greedy
    with torch.no_grad():  # and along the continuation, where the model feeds on its own tokens
        ours = tm.model(torch.tensor([ids + theirs]))[0, :, :tm.tokenizer.vocab_size].numpy()
    assert np.abs(llm.scores[:len(ids) + 40] - ours).max() <= 1e-3
    llm.reset()
    completion = llm.create_completion(GREEDY_PROMPT, max_tokens=40, temperature=0.0)["choices"][0]["text"]
    assert completion == greedy


@pytest.mark.parametrize("kind", ["gpt2", "bpe"])
def test_llama_cpp_tokenizes_mixed_text_as_we_do(kind, runs, tmp_path, shakespeare_text):
    out = export(runs[kind], tmp_path / "model.gguf", fmt="gguf")
    llm = llama(out, vocab_only=True)
    tokenizer = load(runs[kind], device="cpu").tokenizer
    # ~20 KB: plays, accents, CJK, emoji, runs of spaces, tabs, digits, code-like punctuation
    text = shakespeare_text[200_000:214_000] + MIXED * 60 + "def f(x):\n\treturn x**2  # 🙂\n" * 20
    assert len(text.encode()) > 20_000
    for sample in (MIXED, text):
        ids = tokenizer.encode(sample)
        # Our bpe:N (Hugging Face tokenizers) reads a literal <|endoftext|> as the token, gpt2 (tiktoken)
        # as text; llama.cpp does either, as asked.
        assert llm.tokenize(sample.encode(), add_bos=False, special=kind == "bpe") == ids
        assert llm.detokenize(ids, special=True).decode() == sample
    assert llm.token_eos() == llm.token_bos() == tokenizer.eot_id


@pytest.mark.parametrize("outtype", ["f16", "bf16", "q8_0"])
def test_smaller_outtypes_load_and_generate(outtype, runs, tmp_path, one_thread):
    out = export(runs["bpe"], tmp_path / f"model-{outtype}.gguf", fmt="gguf", outtype=outtype)
    assert out.stat().st_size < export(runs["bpe"], tmp_path / "f32.gguf", fmt="gguf").stat().st_size
    llm = llama(out)
    text = llm.create_completion("ROMEO:", max_tokens=10, temperature=0.0)["choices"][0]["text"]
    assert text


def test_modelfile_names_the_file_the_stop_and_our_sampling(runs, tmp_path, capsys):
    code = cli.main(["export", str(runs["gpt2"]), "--format", "gguf", "--out", str(tmp_path / "x.gguf")])
    assert code == 0 and "ollama create" in capsys.readouterr().out
    modelfile = (tmp_path / "x.Modelfile").read_text()
    assert "FROM ./x.gguf" in modelfile
    assert 'PARAMETER stop "<|endoftext|>"' in modelfile
    assert "PARAMETER temperature 0.8" in modelfile and "PARAMETER top_k 200" in modelfile


def test_char_tokenizer_is_refused_with_the_kinds_that_work(tiny_run, tmp_path):
    with pytest.raises(GptlabError, match="gpt2 or bpe:N"):
        export(tiny_run, tmp_path / "x.gguf", fmt="gguf")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_is_replaced_only_when_it_is_a_gguf_and_overwrite_is_given(runs, tmp_path):
    out = tmp_path / "x.gguf"
    out.write_text("my notes")
    with pytest.raises(GptlabError, match="not a GGUF"):
        export(runs["bpe"], out, fmt="gguf", overwrite=True)
    assert out.read_text() == "my notes"
    out.unlink()
    export(runs["bpe"], out, fmt="gguf")
    with pytest.raises(GptlabError, match="--overwrite"):
        export(runs["bpe"], out, fmt="gguf")
    before = out.stat().st_mtime_ns
    export(runs["bpe"], out, fmt="gguf", overwrite=True, outtype="q8_0")
    assert out.stat().st_mtime_ns != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.Modelfile", "x.gguf"]


def test_bad_out_and_outtype_are_one_line_errors(runs, tmp_path):
    with pytest.raises(GptlabError, match="end in .gguf"):
        export(runs["bpe"], tmp_path / "x.bin", fmt="gguf")
    with pytest.raises(GptlabError, match="choose one of: f32, f16, bf16, q8_0"):
        export(runs["bpe"], tmp_path / "x.gguf", fmt="gguf", outtype="q4")
    with pytest.raises(GptlabError, match="--outtype is for --format gguf"):
        export(runs["bpe"], tmp_path / "hf", outtype="f16")
    (tmp_path / "y.Modelfile").write_text("FROM llama3\n")
    with pytest.raises(GptlabError, match="not written by gptlab"):
        export(runs["bpe"], tmp_path / "y.gguf", fmt="gguf")


def test_cli_errors_are_one_line_and_write_nothing(runs, tiny_run, tmp_path, capsys):
    cases = [
        ([tiny_run, "--out", tmp_path / "c.gguf"], "this run uses char"),
        ([runs["bpe"], "--out", tmp_path / "x.bin"], "does not end in .gguf"),
        ([runs["bpe"], "--out", tmp_path / "x.gguf", "--outtype", "q4_0"], "choose one of: f32, f16, bf16, q8_0"),
    ]
    for args, expected in cases:
        code = cli.main(["export", *map(str, args), "--format", "gguf"])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and expected in err, err
    assert list(tmp_path.iterdir()) == []


def test_q8_0_writes_f16_where_rows_do_not_split_into_its_blocks(small_corpus, tmp_path_factory, tmp_path, one_thread):
    import gguf

    from gptlab.train import train

    run = tmp_path / "run-48"
    model_cfg, cfg = resolve_config(overrides=dict(
        **{**TINY_MODEL, "n_embd": 48, "block_size": BLOCK}, data=str(prepared(tmp_path_factory, small_corpus, "bpe:300")),
        out=str(run), batch_size=8, max_iters=5, eval_interval=5, eval_iters=1, num_samples=1, sample_tokens=5,
    ))
    train(model_cfg, cfg, quiet=True)
    out = export(run, tmp_path / "q.gguf", fmt="gguf", outtype="q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_qkv.weight"] == "F16"  # rows of 48
    assert types["blk.0.ffn_down.weight"] == "Q8_0"  # rows of 192
    assert types["blk.0.attn_norm.weight"] == types["position_embd.weight"] == "F32"
    assert llama(out).create_completion("ROMEO:", max_tokens=5, temperature=0.0)["choices"][0]["text"]


def test_an_mlp_width_and_norm_eps_of_its_own_reach_llama_cpp(small_corpus, tmp_path_factory, tmp_path, one_thread):
    import gguf

    from gptlab.train import train

    run = tmp_path / "run-wide"
    model_cfg, cfg = resolve_config(overrides=dict(
        **{**TINY_MODEL, "block_size": BLOCK}, mlp_hidden=96, norm_eps=1e-3, bias=False,
        data=str(prepared(tmp_path_factory, small_corpus, "bpe:300")), out=str(run), batch_size=8, max_iters=30,
        eval_interval=30, eval_iters=1, num_samples=1, sample_tokens=5, warmup_iters=5, learning_rate=3e-3,
    ))
    train(model_cfg, cfg, quiet=True)
    out = export(run, tmp_path / "wide.gguf", fmt="gguf")
    fields = gguf.GGUFReader(out).fields
    assert fields["gpt2.feed_forward_length"].contents() == 96
    assert fields["gpt2.attention.layer_norm_epsilon"].contents() == pytest.approx(1e-3)
    llm = llama(out, logits_all=True, type_k=0, type_v=0)
    tm = load(run, device="cpu")
    ids = tm.tokenizer.encode(PROMPT)
    llm.eval(ids)
    with torch.no_grad():
        ours = tm.model(torch.tensor([ids]))[0].numpy()
    # 7e-6 here; the file with LayerNorm's usual 1e-5 instead misses by 3.5e-3
    assert np.abs(llm.scores[:len(ids)] - ours).max() <= 1e-4
