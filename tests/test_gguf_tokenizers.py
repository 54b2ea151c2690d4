"""gptlab export --format gguf of runs with a model's own tokenizer (`--tokenizer-from`): llama.cpp's ids are ours.

Tokenizers are built with `tokenizers` itself (see test_tokenizer_from.py): SmolLM2's byte-level BPE
(digits apart, chat tokens, <|endoftext|> at id 0), Llama 3's (its split regex, ignore_merges) and a
SentencePiece-style BPE whose merges are listed as a conversion from SentencePiece lists them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from gptlab import cli
from gptlab.config import resolve_config
from gptlab.errors import GptlabError
from gptlab.generation import load
from gptlab.hf.export import export
from gptlab.hf.gguf import check_tokenizer
from gptlab.hf.tokenizers import tokenizer_of

from .test_gguf import BLOCK, llama
from .test_gguf_llama import assert_llama_cpp_logits
from .test_tokenizer_from import FOLDERS, MIXED, byte_level_bpe_with_chat, model_folder, sentencepiece_bpe

PROMPT = "ROMEO: Is it so? then\nI defy you, stars!"
# Beyond MIXED: digits in a run, a double space, code and a line of tabs.
TEXT = MIXED + "Call 12345 or 2024-06-01  now.\n\tif x == 3:\n\t\tprint('ok')  # 7\n"


def with_model(tok: HFTokenizer, **changes) -> HFTokenizer:
    """The tokenizer with fields of its BPE model changed (e.g. ignore_merges), through its JSON."""
    spec = json.loads(tok.to_str())
    spec["model"].update(changes)
    return HFTokenizer.from_str(json.dumps(spec))


def sentencepiece_merges(tok: HFTokenizer) -> HFTokenizer:
    """The SentencePiece-style BPE with its merges listed as transformers converts a SentencePiece model:
    every split of a token into two tokens, in the order of the token made (its score)."""
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    merges = [[t[:i], t[i:]] for t in sorted(vocab, key=vocab.get) for i in range(1, len(t))
              if t[:i] in vocab and t[i:] in vocab]
    return with_model(tok, merges=merges)


def llama3_folder(root: Path) -> Path:
    tok = byte_level_bpe_with_chat("llama3", ("<|end_of_text|>", "<|begin_of_text|>"))
    return model_folder(root, with_model(tok, ignore_merges=True), "<|end_of_text|>", "<|begin_of_text|>")


# Per tokenizer: how its folder is made, and what llama.cpp's file names it (tokenizer.ggml.model, .pre).
TOKENIZERS = {
    "smollm": (FOLDERS["byte-level-digits"], ("gpt2", "smollm")),
    "llama3": (llama3_folder, ("gpt2", "llama-bpe")),
    "llama3-all-merges": (FOLDERS["byte-level-llama3"], ("gpt2", "smaug-bpe")),  # ignore_merges false
    "sentencepiece": (lambda root: model_folder(root, sentencepiece_merges(sentencepiece_bpe("prepend")), "</s>", "<s>"),
                      ("llama", None)),
}


def tiny_run(root: Path, folder: Path, corpus: Path, steps: int) -> Path:
    """A tiny llama run on the corpus prepared with the folder's tokenizer."""
    from gptlab.data import prepare
    from gptlab.train import train

    data = prepare([str(corpus)], tokenizer=tokenizer_of(folder), out=root / "data", log=lambda *a: None)
    model_cfg, cfg = resolve_config(overrides=dict(
        arch="llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=BLOCK, dropout=0.0, data=str(data),
        out=str(root / "run"), batch_size=8, max_iters=steps, eval_interval=steps, eval_iters=2, num_samples=1,
        sample_tokens=10, warmup_iters=min(5, steps), learning_rate=3e-3,
    ))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(model_cfg, cfg, quiet=True)
    finally:
        torch.set_num_threads(threads)
    return root / "run"


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def exported(request, tmp_path_factory, small_corpus) -> tuple[str, Path, Path]:
    """(name, run, gguf file) of a run trained 30 steps with one of TOKENIZERS."""
    root = tmp_path_factory.mktemp(f"gguf-{request.param}")
    run = tiny_run(root, TOKENIZERS[request.param][0](root / "hf"), small_corpus, 30)
    return request.param, run, export(run, root / "model.gguf", fmt="gguf")


def test_llama_cpp_gives_our_ids_and_text(exported, one_thread):
    name, run, out = exported
    llm = llama(out, vocab_only=True)
    model, pre = TOKENIZERS[name][1]
    assert llm.metadata["tokenizer.ggml.model"] == model
    assert llm.metadata.get("tokenizer.ggml.pre") == pre
    tok = load(run, device="cpu").tokenizer
    for text in (TEXT, *TEXT.splitlines(keepends=True), "12345", "  two  spaces", "\n\n", "x"):
        ids = tok.encode(text)
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, text
        # token by token, as our streaming shows it (a SentencePiece text keeps the "▁" it starts with)
        assert llm.detokenize(ids) == b"".join(tok.token_bytes(i) for i in ids), text
    ids = tok.encode(TEXT)
    assert llm.detokenize(ids).decode().removeprefix(" " if model == "llama" else "") == TEXT == tok.decode(ids)
    # `tokenizers` reads special tokens in any text; llama.cpp its control tokens with special=True
    chat = f"{tok.special_tokens['bos_token']}user\n12 + 30?{tok.special_tokens['eos_token']}\n"
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == tok.encode(chat)


def test_the_file_names_the_tokenizers_special_tokens(exported):
    import gguf

    name, run, out = exported
    tok = load(run, device="cpu").tokenizer
    fields = {k: f.contents() for k, f in gguf.GGUFReader(out).fields.items() if k.startswith("tokenizer.")}
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    assert len(tokens) == tok.vocab_size
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eot_id
    assert tokens[fields["tokenizer.ggml.bos_token_id"]] == tok.special_tokens["bos_token"]
    assert fields["tokenizer.ggml.add_bos_token"] is False  # our data has no BOS in front
    control = {tokens[i] for i, t in enumerate(types) if t == gguf.TokenType.CONTROL}
    assert tok.special_tokens["eos_token"] in control
    if name == "smollm":
        assert tok.eot_id == 0 and {"<|im_start|>", "<|im_end|>"} <= control
    if TOKENIZERS[name][1][0] == "llama":
        assert [tokens[i] for i, t in enumerate(types) if t == gguf.TokenType.BYTE] == [f"<0x{b:02X}>" for b in range(256)]
        assert tokens[fields["tokenizer.ggml.unknown_token_id"]] == "<unk>"
        assert fields["tokenizer.ggml.add_space_prefix"] is True
    else:
        assert len(fields["tokenizer.ggml.merges"]) > 0
    # Ollama stops at the model's own end-of-text
    assert f'PARAMETER stop "{tok.special_tokens["eos_token"]}"' in out.with_suffix(".Modelfile").read_text()


def test_llama_cpp_computes_our_logits(exported, one_thread):
    name, run, out = exported
    llm = llama(out, logits_all=True, type_k=0, type_v=0)  # GGML_TYPE_F32: a KV cache as exact as our model
    assert_llama_cpp_logits(llm, load(run, device="cpu"), PROMPT)


def test_a_sentencepiece_bpe_whose_merges_llama_cpp_would_not_follow_is_refused(tmp_path):
    # Trained by `tokenizers`: some tokens split into two tokens that are no listed merge.
    tok = tokenizer_of(FOLDERS["sentencepiece-prepend"](tmp_path / "hf"))
    with pytest.raises(GptlabError, match="SentencePiece-style BPE of hf has merges llama.cpp"):
        check_tokenizer(tok)


def test_a_metaspace_bpe_is_refused(tmp_path):
    # Metaspace gives " a" one "▁" in front, llama.cpp's space prefix two.
    folder = model_folder(tmp_path / "hf", sentencepiece_merges(sentencepiece_bpe("metaspace")), "</s>", "<s>")
    with pytest.raises(GptlabError, match="Metaspace pre-tokenizer of hf adds no"):
        check_tokenizer(tokenizer_of(folder))


def test_a_split_llama_cpp_has_no_name_for_is_one_line(tmp_path, small_corpus, capsys, one_thread):
    from tokenizers import pre_tokenizers

    tok = byte_level_bpe_with_chat("digits")
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=False),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    run = tiny_run(tmp_path, model_folder(tmp_path / "hf", tok, "<|endoftext|>", "<|endoftext|>"), small_corpus, 2)
    code = cli.main(["export", str(run), "--format", "gguf", "--out", str(tmp_path / "x.gguf")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "splits text in a way llama.cpp has no name for" in err and "--format hf" in err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))
