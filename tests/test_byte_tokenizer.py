"""The `byte` tokenizer end to end with real components: prepare, train, sample, eval, serve and a Hugging Face export.

The corpus is one line in several scripts (Latin, CJK, Cyrillic, Hebrew, an emoji), repeated: a
tiny model learns it by heart in a few hundred steps, so its greedy text is known in advance and
every multi-byte character in it must come out whole.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch

from gptlab import cli
from gptlab.generation import load
from gptlab.tokenizer import ByteTokenizer, load_tokenizer
from tests.servers import Server

LINE = "Grüße aus 東京 🙂 — привет, мир! שלום עולם. Ça va? ¡Olé!\n"
PROMPT = "Grüße aus "
# The rest of the line and one more whole line: ends on a character boundary.
EXPECTED = LINE[len(PROMPT):] + LINE
MAX_TOKENS = len(EXPECTED.encode("utf-8"))
TRAIN_FLAGS = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8",
               "--max-iters", "300", "--eval-interval", "100", "--eval-iters", "2", "--num-samples", "1",
               "--sample-tokens", "30", "--warmup-iters", "5", "--learning-rate", "1e-2", "--seed", "0"]


def gptlab(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptlab", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("byte") / "multilingual.txt"
    path.write_text(LINE * 300, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(corpus) -> Path:
    out = corpus.parent / "data"
    r = gptlab("prepare", corpus, "--tokenizer", "byte", "--out", out, cwd=corpus.parent)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def run(data) -> Path:
    out = data.parent / "run"
    r = gptlab("train", "--data", data, "--out", out, *TRAIN_FLAGS, cwd=data.parent)
    assert r.returncode == 0, r.stderr
    return out


def test_prepare_stores_every_byte_of_the_text_as_its_own_token(corpus, data):
    meta = json.loads((data / "meta.json").read_text(encoding="utf-8"))
    raw = corpus.read_bytes()
    assert meta["tokenizer"] == "byte" and meta["vocab_size"] == 256 and meta["eot_id"] is None
    assert meta["train_tokens"] + meta["val_tokens"] == len(raw)  # one token per byte, no separators
    train = (data / "train.bin").read_bytes()
    assert bytes(list(memoryview(train).cast("H"))) == raw[: meta["train_tokens"]]
    assert isinstance(load_tokenizer(data), ByteTokenizer)


def test_sample_writes_the_learned_text_with_whole_characters(run, capsys):
    code, out, err = run_cli(capsys, "sample", run, "--prompt", PROMPT, "--greedy", "--max-new-tokens", MAX_TOKENS)
    assert code == 0, err
    assert out.rstrip("\n") == (PROMPT + EXPECTED).rstrip("\n")
    code, streamed, err = run_cli(capsys, "sample", run, "--prompt", PROMPT, "--greedy", "--max-new-tokens",
                                  MAX_TOKENS, "--stream")
    assert code == 0, err
    assert "\ufffd" not in streamed and "東京 🙂" in streamed
    assert streamed.rstrip("\n") == out.rstrip("\n")


def test_eval_scores_the_val_split_far_below_a_uniform_guess(run, capsys):
    code, out, err = run_cli(capsys, "eval", run, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["tokens"] == result["bytes"]  # a token per byte
    assert result["loss"] < 1.0 < torch.log(torch.tensor(256.0)).item()


def test_serve_answers_completions_with_our_text_streamed_or_not(run):
    ours = load(run, device="cpu").generate(PROMPT, temperature=0.0, max_new_tokens=MAX_TOKENS)[0]
    assert ours == EXPECTED
    server = Server(run, "--device", "cpu")
    try:
        request = {"model": run.name, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
        r = httpx.post(f"{server.url}/v1/completions", json=request, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == EXPECTED
        pieces = []
        with httpx.stream("POST", f"{server.url}/v1/completions", json={**request, "stream": True}, timeout=60) as s:
            for line in s.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    pieces.extend(c["text"] for c in json.loads(line[6:])["choices"])
        assert "".join(pieces) == EXPECTED
        assert not any("\ufffd" in piece for piece in pieces)  # no character cut between two events
    finally:
        server.stop()


def test_hf_export_tokenizes_and_generates_as_we_do(run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "exported"
    code, _, err = run_cli(capsys, "export", run, "--format", "hf", "--out", out)
    assert code == 0, err
    ours = ByteTokenizer()
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    for text in (LINE, "日本語のテキスト、한국어, العربية, हिन्दी, 🙂👍🏽🇺🇦 e\u0301", "  two  spaces\r\n\ttab", ""):
        ids = theirs(text)["input_ids"]
        assert ids == ours.encode(text), text
        assert theirs.decode(ids) == text
    # transformers' GPT-2 stops at the context (32 tokens); ours would slide on. Within it, both agree.
    continuation = "東京 🙂 — "
    new_tokens = len(continuation.encode("utf-8"))
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    prompt = torch.tensor([ours.encode(PROMPT)])
    with torch.no_grad():
        generated = model.generate(prompt, do_sample=False, max_new_tokens=new_tokens, pad_token_id=0)
    assert generated[0, prompt.shape[1]:].tolist() == ours.encode(continuation)
    assert theirs.decode(generated[0, prompt.shape[1]:]) == continuation
    assert load(run, device="cpu").generate(PROMPT, temperature=0.0, max_new_tokens=new_tokens)[0] == continuation

    from gptlab.hf.tokenizers import hf_tokenizer

    assert isinstance(hf_tokenizer(out), ByteTokenizer)  # and it imports back as itself
