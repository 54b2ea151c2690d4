"""Text generation, streaming, stop strings, evaluation, the copy check, the temperature plot and the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from gptlab import load
from gptlab.config import ModelConfig
from gptlab.copycheck import NgramIndex, check_copying
from gptlab.data import load_tokens
from gptlab.errors import GptlabError
from gptlab.evaluate import evaluate, score_tokens, window_plan
from gptlab.generation import SampleText, TextModel, token_byte_lengths
from gptlab.model import GPT
from gptlab.report import plot_temperature
from gptlab.tokenizer import CharTokenizer, GPT2Tokenizer

PROMPT = "naïve café — 日本語"
RECITED = " ü日本語のテキスト — Ünïcödé ✓ 😀"


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: one thread is fastest, and never stalls


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def gpt2_tokenizer() -> GPT2Tokenizer:
    return GPT2Tokenizer.build()


def reciter(tokenizer: GPT2Tokenizer, prompt: str, continuation: list[int]) -> TextModel:
    """A real GPT (vocab 50257) whose weights make it recite `continuation` after `prompt`.

    Blocks add nothing (zero output projections) and a huge one-hot position embedding dominates
    each position's LayerNorm output, so the tied head picks the token planted at that position.
    """
    block = 64
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=1, n_embd=block, block_size=block, vocab_size=50257))
    start = len(tokenizer.encode(prompt)) - 1
    assert start + len(continuation) <= block
    with torch.no_grad():
        for block_ in model.transformer.h:
            block_.attn.c_proj.weight.zero_()
            block_.mlp.c_proj.weight.zero_()
        model.transformer.wpe.weight.copy_(1000.0 * torch.eye(block))
        for offset, token in enumerate(continuation):
            model.transformer.wte.weight[token, start + offset] += 10.0
    return TextModel(model, tokenizer)


def byte_tokens(tokenizer: GPT2Tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte: every multi-byte character is split across tokens."""
    return [tokenizer.enc.encode_single_token(bytes([b])) for b in text.encode("utf-8")]


@pytest.fixture(scope="session")
def recited_ids(gpt2_tokenizer) -> list[int]:
    return gpt2_tokenizer.encode(RECITED) + byte_tokens(gpt2_tokenizer, "é日😀")


@pytest.fixture(scope="session")
def utf8_model(gpt2_tokenizer, recited_ids) -> TextModel:
    return reciter(gpt2_tokenizer, PROMPT, recited_ids)


@pytest.fixture(scope="session")
def char_model(tiny_run) -> TextModel:
    return load(tiny_run)


# ---- text generation ----

def test_generate_returns_strings_and_a_seed_reproduces_them(char_model):
    a = char_model.generate("ROMEO:", max_new_tokens=40, num_samples=2, temperature=0.8, top_k=20, seed=7)
    b = char_model.generate("ROMEO:", max_new_tokens=40, num_samples=2, temperature=0.8, top_k=20, seed=7)
    c = char_model.generate("ROMEO:", max_new_tokens=40, num_samples=2, temperature=0.8, top_k=20, seed=8)
    assert a == b != c
    assert all(isinstance(t, str) and len(t) == 40 for t in a)  # char tokens: one character each
    assert a[0] != a[1]


def test_stream_pieces_join_to_the_generated_text(char_model):
    settings = dict(max_new_tokens=60, temperature=1.0, top_p=0.9, repetition_penalty=1.2, seed=3)
    pieces = list(char_model.stream("KING", **settings))
    assert len(pieces) > 1
    assert "".join(pieces) == char_model.generate("KING", **settings)[0]


def test_generation_past_the_context(char_model):
    assert char_model.config.block_size == 32
    text = char_model.generate("First Citizen:", max_new_tokens=150, seed=0)[0]
    assert len(text) == 150


def test_greedy_is_deterministic(char_model):
    a = char_model.generate("ROMEO:", max_new_tokens=30, temperature=0, seed=1)
    b = char_model.generate("ROMEO:", max_new_tokens=30, temperature=0, seed=2)
    assert a == b


def test_stop_string_split_across_tokens_stops_and_is_left_out(char_model):
    full = char_model.generate("ROMEO:", max_new_tokens=80, temperature=0)[0]
    stop = full[20:23]  # three characters = three char tokens
    cut = full.index(stop)
    assert char_model.generate("ROMEO:", max_new_tokens=80, temperature=0, stop=(stop, "never-seen"))[0] == full[:cut]
    streamed = "".join(char_model.stream("ROMEO:", max_new_tokens=80, temperature=0, stop=stop))
    assert streamed == full[:cut]


def test_several_samples_stop_independently(char_model):
    texts = char_model.generate("", max_new_tokens=120, num_samples=3, temperature=1.0, seed=11)
    stop = texts[0][30:32]
    stopped = char_model.generate("", max_new_tokens=120, num_samples=3, temperature=1.0, seed=11, stop=stop)
    for full, cut in zip(texts, stopped):
        assert cut == (full[: full.index(stop)] if stop in full else full)


def test_empty_prompt_starts_from_the_start_token(char_model, utf8_model):
    assert char_model.encode_prompt("") == char_model.tokenizer.encode("\n")
    assert utf8_model.encode_prompt("") == [50256]
    assert len(char_model.generate("", max_new_tokens=10, seed=0)[0]) == 10


def test_char_prompt_with_unseen_characters_names_them(char_model):
    with pytest.raises(GptlabError, match="'日'"):
        char_model.generate("ROMEO 日本", max_new_tokens=5)


def test_utf8_streaming_never_splits_a_character(utf8_model, gpt2_tokenizer, recited_ids):
    to_bytes = gpt2_tokenizer.token_bytes
    split = [t for t in recited_ids if not _is_utf8(to_bytes(t))]
    assert len(split) >= 10  # the output really is full of characters cut across tokens
    expected = gpt2_tokenizer.decode(recited_ids)
    assert expected == RECITED + "é日😀"
    settings = dict(max_new_tokens=len(recited_ids), temperature=1.0, seed=5)
    pieces = list(utf8_model.stream(PROMPT, **settings))
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == utf8_model.generate(PROMPT, **settings)[0] == expected
    assert len(pieces) < len(recited_ids)  # bytes waited for the rest of their character


def test_stop_string_across_bpe_tokens(utf8_model, gpt2_tokenizer):
    full = RECITED + "é日😀"
    for stop in ["本語", "ü日", "ö", "✓ 😀é"]:
        expected = full[: full.index(stop)]
        assert utf8_model.generate(PROMPT, max_new_tokens=40, temperature=0, stop=stop)[0] == expected
        assert "".join(utf8_model.stream(PROMPT, max_new_tokens=40, temperature=0, stop=stop)) == expected


def test_end_of_text_ends_the_sample(gpt2_tokenizer):
    ids = gpt2_tokenizer.encode(" the end") + [50256] + gpt2_tokenizer.encode(" more")
    model = reciter(gpt2_tokenizer, "Once upon a time", ids)
    assert model.generate("Once upon a time", max_new_tokens=10, temperature=0) == [" the end"]


def test_sample_text_holds_back_only_a_possible_stop():
    chars = CharTokenizer("abc\n")
    text = SampleText(chars.token_bytes, stop=("\n\n",))
    shown = [text.push(i) for i in chars.encode("ab\nc\n")] + [text.finish()]
    assert shown == ["a", "b", "", "\nc", "", "\n"]
    text = SampleText(chars.token_bytes, stop=("\n\n",))
    assert [text.push(i) for i in chars.encode("a\n\nb")] == ["a", "", "", ""] and text.done


def test_stream_refuses_several_samples(char_model):
    with pytest.raises(GptlabError, match="one sample"):
        list(char_model.stream("A", num_samples=2))


# ---- evaluation ----

@pytest.mark.parametrize("n_tokens, block, stride", [(100, 16, 16), (100, 16, 5), (17, 16, 16), (5, 16, 3), (64, 8, 1)])
def test_eval_windows_score_every_target_once(n_tokens, block, stride):
    length, plan = window_plan(n_tokens, block, stride)
    scored = []
    for start, first in plan:
        scored += [start + i for i in range(first, length)]
    assert sorted(scored) == list(range(n_tokens - 1))


def test_eval_perplexity_is_exp_loss_on_the_val_split(char_model):
    result = evaluate(char_model, progress=False)
    assert result.perplexity == pytest.approx(math.exp(result.loss), rel=1e-12)
    val = load_tokens(char_model.training_data(), "val")
    assert result.tokens == len(val) - 1
    assert result.bytes == sum(len(c.encode()) for c in char_model.tokenizer.decode(val[1:].tolist()))
    assert result.bits_per_byte == pytest.approx(result.loss / math.log(2), rel=1e-6)  # one byte per token here
    assert 1.0 < result.loss < math.log(char_model.config.vocab_size) + 0.5


def test_eval_matches_a_direct_cross_entropy(char_model, tmp_path, shakespeare_text):
    text = shakespeare_text[200_000:200_000 + 32 * 6 + 1]  # exactly six windows of 32
    path = tmp_path / "other.txt"
    path.write_text(text, encoding="utf-8")
    result = evaluate(char_model, path, progress=False)
    ids = torch.tensor(char_model.tokenizer.encode(text))
    with torch.no_grad():
        logits = char_model.model(ids[:-1].view(6, 32))
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[1:].view(-1)).item()
    assert result.windows == 6 and result.tokens == 192
    assert result.loss == pytest.approx(loss, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.loss), rel=1e-12)
    overlapping = evaluate(char_model, path, stride=8, progress=False)
    assert overlapping.tokens == 192 and overlapping.windows > 6


def test_bits_per_byte_counts_utf8_bytes_and_skips_end_of_text(gpt2_tokenizer):
    lengths = token_byte_lengths(gpt2_tokenizer)
    assert lengths[50256] == 0
    ids = gpt2_tokenizer.encode(RECITED)
    assert lengths[ids].sum() == len(RECITED.encode("utf-8"))
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=1, n_embd=16, block_size=8, vocab_size=50257)).eval()
    tokens = np.array(ids + [50256] + ids)
    result = score_tokens(model, tokens, lengths, "test", progress=False)
    assert result.tokens == len(tokens) - 1
    assert result.bytes == 2 * len(RECITED.encode("utf-8")) - lengths[ids[0]]


def test_eval_errors_are_one_line(char_model, tmp_path):
    with pytest.raises(GptlabError, match="not found"):
        evaluate(char_model, tmp_path / "missing.txt")
    (tmp_path / "one.txt").write_text("A", encoding="utf-8")
    with pytest.raises(GptlabError, match="too short"):
        evaluate(char_model, tmp_path / "one.txt")
    (tmp_path / "two.txt").write_text("ABC", encoding="utf-8")
    with pytest.raises(GptlabError, match="--stride"):
        evaluate(char_model, tmp_path / "two.txt", stride=999)


# ---- copy check ----

def test_copy_check_finds_a_copied_passage(char_model, shakespeare_text):
    train = load_tokens(char_model.training_data(), "train")
    copied = shakespeare_text[5000:5100]
    novel = "zzqx jjvq kkww"
    report = check_copying([novel + copied + novel], char_model.tokenizer, train, n=8)[0]
    assert report.longest_text == copied and report.longest_tokens == 100
    assert report.copied_chars >= 100 and report.copied_share == pytest.approx(report.copied_chars / 128)
    none = check_copying(["zq" * 30], char_model.tokenizer, train, n=8)[0]
    assert none.copied_share == 0 and none.longest_tokens == 0


def test_copy_index_answers_fast_on_a_million_tokens(shakespeare_text):
    tokenizer = CharTokenizer.from_texts([shakespeare_text])
    tokens = np.asarray(tokenizer.encode(shakespeare_text), dtype=np.uint16)
    assert len(tokens) > 1_000_000
    start = time.perf_counter()
    index = NgramIndex(tokens, 8, tokenizer.vocab_size)
    build = time.perf_counter() - start
    start = time.perf_counter()
    reports = check_copying([shakespeare_text[777_000:777_400], "To be, or not to be"], tokenizer, tokens, 8)
    query = time.perf_counter() - start
    assert reports[0].longest_tokens == 400 and reports[0].copied_share == 1.0
    assert index.contains(index.hashes(tokens[:50])).all()
    assert build < 5.0 and query < 5.0  # about 0.2 s and 0.3 s on a quiet 2-core machine; generous for busy ones


def test_copy_check_with_bpe_counts_whole_characters(gpt2_tokenizer):
    train = np.array(gpt2_tokenizer.encode("日本語のテキストです。" * 3))
    report = check_copying(["日本語のテキスト" + "xyz"], gpt2_tokenizer, train, n=4)[0]
    assert report.longest_text == "日本語のテキスト"
    assert report.copied_chars == 8 and report.total_chars == 11


# ---- temperature plot ----

def test_temperature_plot_writes_a_png(char_model, tmp_path):
    path = plot_temperature(char_model, "ROMEO:", tmp_path / "t.png", temperatures=(0.1, 1.0, 5.0))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))


# ---- the command line ----

def gptlab(*args):
    return subprocess.run([sys.executable, "-m", "gptlab", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=ONE_THREAD)


BAD_FLAGS = [
    (["--temperature", "-1"], "--temperature"),
    (["--top-k", "0"], "--top-k"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--repetition-penalty", "0"], "--repetition-penalty"),
    (["--num-samples", "0"], "--num-samples"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-new-tokens", "200000"], "--max-new-tokens"),
    (["--min-p", "2"], "--min-p"),
    (["--greedy", "--temperature", "0.5"], "--greedy"),
]


def test_cli_bad_values_are_one_line_exit_2(tiny_run):
    # All at once: each is a separate `gptlab sample` process, and they start in parallel.
    procs = [subprocess.Popen([sys.executable, "-m", "gptlab", "sample", str(tiny_run), *flags],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ONE_THREAD)
             for flags, _ in BAD_FLAGS]
    for (flags, named), proc in zip(BAD_FLAGS, procs):
        _, stderr = proc.communicate(timeout=300)
        lines = stderr.strip().splitlines()
        assert proc.returncode == 2, (flags, stderr)
        assert len(lines) == 1 and named in lines[0] and "Traceback" not in stderr, (flags, stderr)
        assert lines[0].startswith("gptlab sample: error:"), (flags, stderr)


def test_cli_sample_stream_and_check_copying(tiny_run):
    r = gptlab("sample", tiny_run, "--prompt", "ROMEO:", "--max-new-tokens", "60", "--stream", "--seed", "7",
               "--check-copying", "--stop", "\\n\\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ROMEO:") and "copy check" in r.stdout and "copied" in r.stdout
    r = gptlab("sample", tiny_run, "--prompt", "ROMEO:", "--max-new-tokens", "30", "--num-samples", "2",
               "--greedy", "--top-k", "40", "--top-p", "0.95", "--repetition-penalty", "1.1")
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.split("-" * 40)
    assert first.strip() == second.strip()  # greedy: both samples agree


def test_cli_eval_and_plot(tiny_run, tmp_path):
    r = gptlab("eval", tiny_run, "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    r = gptlab("plot", "temperature", tiny_run, "--prompt", "ROMEO:", "--out", tmp_path / "t.png")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
