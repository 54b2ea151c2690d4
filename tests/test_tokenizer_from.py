"""`--tokenizer-from DIR`: a model's own Hugging Face BPE runs as `tokenizers` runs it, in prepare, streaming and export.

Two tokenizers are built here with `tokenizers` itself, no downloads: a SentencePiece-style BPE
(Llama 2 / TinyLlama / Mistral: "▁" for spaces, <0xNN> byte fallback, <unk> <s> </s>) in its two
spellings (a Prepend + Replace normalizer, or a Metaspace pre-tokenizer), and a byte-level BPE with
chat tokens and <|endoftext|> at id 0, as SmolLM2 has.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from gptlab import cli
from gptlab.data import load_tokens, read_meta
from gptlab.generation import SampleText
from gptlab.hf.tokenizers import tokenizer_of, write_hf_tokenizer
from gptlab.tokenizer import BPETokenizer, HFBPETokenizer, load_tokenizer

from .conftest import TINY_MODEL

TRAIN_TEXT = (
    "The quick brown fox jumps over the lazy dog. Café crème brûlée, naïve façade, señor. "
    "def add(a, b): return a + b  # two  spaces. Hello world, hello there! It's 42, isn't it? "
) * 30
# Accents, CJK, emoji, tabs, runs of spaces, code and newlines the tokenizers never saw in training.
MIXED = (
    "Héllo wörld, crème brûlée à la façon de Zoë.\n日本語のテキスト、中文字符。 🙂🚀👩‍👩‍👧\n"
    "\tdef f(x):\n\t\treturn {'k': [x, x**2]}  # comment\n\n  leading spaces   and   runs\n"
    "Ünïcödé ñ ß ø — “quotes” … 12345 3.14159\n"
)
CHAT = ["<|im_start|>", "<|im_end|>"]
# Llama 3's pre-tokenizer regex: it joins punctuation with the line end after it (".\n" is one pre-token).
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *words: str, exit_code: int = 2) -> None:
    assert code == exit_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines[0]


def sentencepiece_bpe(style: str) -> HFTokenizer:
    """A SentencePiece-style BPE: merges learnt within words, 256 <0xNN> tokens, <unk> <s> </s> first."""
    trainer_tok = HFTokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never", split=True)
    # Newlines and tabs stay out of the vocabulary (byte fallback), as in Llama 2's.
    trainer_tok.train_from_iterator([TRAIN_TEXT], trainers.BpeTrainer(vocab_size=400, show_progress=False))
    learnt = json.loads(trainer_tok.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for token in sorted(learnt["vocab"], key=learnt["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learnt["merges"]]
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if style == "prepend":  # Llama 2 / TinyLlama's tokenizer.json
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:  # transformers' newer conversion of the same model
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="first")])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return tok


def byte_level_bpe_with_chat(split: str, specials: tuple[str, ...] = ("<|endoftext|>", *CHAT)) -> HFTokenizer:
    """A byte-level BPE, the first special token at id 0; `split`: GPT-2's regex, digits apart (SmolLM2) or Llama 3's."""
    tok = HFTokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = {
        "gpt2": byte_level,
        "digits": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "llama3": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated"),
                                           pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
    }[split]
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TRAIN_TEXT, MIXED], trainer=trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def model_folder(root: Path, tok: HFTokenizer, eos: str, bos: str) -> Path:
    """A Hugging Face model folder's tokenizer files: tokenizer.json and tokenizer_config.json."""
    root.mkdir(parents=True)
    tok.save(str(root / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "unk_token": {"content": bos},
              "eos_token": {"__type": "AddedToken", "content": eos, "special": True}}
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    return root


FOLDERS = {
    "sentencepiece-prepend": lambda root: model_folder(root, sentencepiece_bpe("prepend"), "</s>", "<s>"),
    "sentencepiece-metaspace": lambda root: model_folder(root, sentencepiece_bpe("metaspace"), "</s>", "<s>"),
    "byte-level-chat": lambda root: model_folder(root, byte_level_bpe_with_chat("gpt2"), "<|endoftext|>", "<|endoftext|>"),
    "byte-level-digits": lambda root: model_folder(root, byte_level_bpe_with_chat("digits"), "<|endoftext|>",
                                                   "<|endoftext|>"),
    "byte-level-llama3": lambda root: model_folder(
        root, byte_level_bpe_with_chat("llama3", ("<|end_of_text|>", "<|begin_of_text|>")), "<|end_of_text|>",
        "<|begin_of_text|>"),
}


@pytest.fixture(scope="module", params=list(FOLDERS))
def hf_folder(request, tmp_path_factory) -> Path:
    return FOLDERS[request.param](tmp_path_factory.mktemp("hf") / request.param)


@pytest.fixture(scope="module")
def documents(tmp_path_factory) -> tuple[Path, Path]:
    """Two files whose train/val cut falls exactly between them; the first is long enough to be cut in parts."""
    root = tmp_path_factory.mktemp("docs")
    # Over split_text's 65,536 characters, so it is encoded in parts, with lines ending in "." where it is cut.
    first = (MIXED * 700)[:65_000] + "Zoë.\n" * 300 + " the end."
    second = MIXED * 3
    a, b = root / "a.txt", root / "b.txt"
    a.write_text(first, encoding="utf-8")
    b.write_text(second, encoding="utf-8")
    return a, b


def val_fraction_between(a: Path, b: Path) -> float:
    total = a.stat().st_size + b.stat().st_size
    fraction = b.stat().st_size / total
    assert int(total * (1.0 - fraction)) == a.stat().st_size  # the cut is the end of the first file
    return fraction


def test_prepare_gives_exactly_the_ids_of_tokenizers(hf_folder, documents, tmp_path, capsys):
    a, b = documents
    code, out, err = run_cli(capsys, "prepare", a, b, "--tokenizer-from", hf_folder, "--out", tmp_path / "data",
                             "--val-fraction", val_fraction_between(a, b))
    assert code == 0, err
    hf = HFTokenizer.from_file(str(hf_folder / "tokenizer.json"))
    train = load_tokens(tmp_path / "data", "train").tolist()
    val = load_tokens(tmp_path / "data", "val").tolist()
    assert train == hf.encode(a.read_text(encoding="utf-8"), add_special_tokens=False).ids
    assert val == hf.encode(b.read_text(encoding="utf-8"), add_special_tokens=False).ids
    meta = read_meta(tmp_path / "data")
    assert meta["tokenizer_from"] == str(hf_folder.resolve())
    saved = load_tokenizer(tmp_path / "data")
    assert saved.encode(MIXED) == hf.encode(MIXED, add_special_tokens=False).ids
    assert meta["tokenizer"] == saved.spec and meta["eot_id"] == saved.eot_id


def test_kinds_and_end_of_text_come_from_the_folder(hf_folder):
    tok = tokenizer_of(hf_folder)
    hf = HFTokenizer.from_file(str(hf_folder / "tokenizer.json"))
    if hf_folder.name.startswith("sentencepiece"):
        assert isinstance(tok, HFBPETokenizer) and tok.name == "hf"
        assert tok.eot_id == hf.token_to_id("</s>") == 2
        assert tok.special_tokens == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<s>"}
    else:
        assert tok.eot_id == 0  # <|endoftext|> (<|end_of_text|>) at id 0, named eos_token
        # GPT-2's pre-tokenization is the bpe kind (llama.cpp's byte-level BPE); any other split is hf.
        assert tok.name == ("bpe" if hf_folder.name == "byte-level-chat" else "hf")


def stream(tok, ids: list[int]) -> str:
    """What generation shows for `ids`, through its incremental decoder over token_bytes."""
    sample = SampleText(tok.token_bytes)
    return "".join(sample.push(i) for i in ids) + sample.finish()


def test_streaming_shows_what_tokenizers_decodes(hf_folder):
    tok = tokenizer_of(hf_folder)
    hf = HFTokenizer.from_file(str(hf_folder / "tokenizer.json"))
    prompt = hf.encode("Once upon a time,", add_special_tokens=False).ids
    continuation = hf.encode(" " + MIXED, add_special_tokens=False).ids
    specials = [hf.token_to_id(t) for t in ("<s>", "</s>", *CHAT) if hf.token_to_id(t) is not None]
    # (between whole characters: tokenizers' ByteFallback turns a whole run of byte tokens into U+FFFDs
    # when a special token breaks a character, where a UTF-8 decoder replaces only the broken character)
    stream_ids = continuation + specials + continuation
    # A continuation is shown as decoding the prompt and it together shows it (spaces, bytes and specials).
    whole = hf.decode(prompt + stream_ids, skip_special_tokens=False)
    head = hf.decode(prompt, skip_special_tokens=False)
    assert whole.startswith(head)
    assert stream(tok, stream_ids) == whole[len(head):]
    # From the start of a text, only the one space a SentencePiece decoder strips there differs.
    ids = hf.encode(MIXED, add_special_tokens=False).ids
    streamed, decoded = stream(tok, ids), hf.decode(ids, skip_special_tokens=False)
    assert decoded == tok.decode(ids) == MIXED
    assert streamed == (" " + MIXED if hf_folder.name.startswith("sentencepiece") else MIXED)


def test_a_byte_cut_in_the_middle_of_a_character_waits_for_its_last_byte(hf_folder):
    tok = tokenizer_of(hf_folder)
    ids = tok.encode("日本🙂")
    sample = SampleText(tok.token_bytes)
    shown = [sample.push(i) for i in ids]
    assert "\ufffd" not in "".join(shown) and "".join(shown).strip() == "日本🙂"


def test_export_files_load_in_transformers_to_the_same_ids(hf_folder, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = tokenizer_of(hf_folder)
    out = tmp_path / "export"
    out.mkdir()
    write_hf_tokenizer(tok, out, block_size=64)
    expected = tok.encode(MIXED)
    for loaded in (AutoTokenizer.from_pretrained(out), PreTrainedTokenizerFast.from_pretrained(out)):
        assert loaded(MIXED)["input_ids"] == expected  # no <s> added: gptlab's data has none
        assert loaded.decode(expected) == tok.decode(expected)
        assert loaded.eos_token_id == tok.eot_id
    again = tokenizer_of(out)  # the export read back is the same tokenizer, with the same end-of-text
    assert again.same_as(tok) and again.eot_id == tok.eot_id and again.name == tok.name


def test_tokenizer_from_a_data_folder_and_a_run_folder(hf_folder, documents, tmp_path, capsys):
    a, _ = documents
    text = tmp_path / "more.txt"
    text.write_text(MIXED * 20, encoding="utf-8")
    assert run_cli(capsys, "prepare", text, "--tokenizer-from", hf_folder, "--out", tmp_path / "d1")[0] == 0
    # (in a worker process: the tokenizer travels to it)
    assert run_cli(capsys, "prepare", text, "--tokenizer-from", tmp_path / "d1", "--out", tmp_path / "d2",
                   "--workers", "2")[0] == 0
    for split in ("train", "val"):
        assert load_tokens(tmp_path / "d1", split).tolist() == load_tokens(tmp_path / "d2", split).tolist()
    assert load_tokenizer(tmp_path / "d2").same_as(tokenizer_of(hf_folder))
    assert read_meta(tmp_path / "d2")["tokenizer_from"] == str((tmp_path / "d1").resolve())


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory) -> Path:
    """A tiny run trained on data prepared with a SentencePiece-style tokenizer."""
    root = tmp_path_factory.mktemp("run")
    folder = FOLDERS["sentencepiece-prepend"](root / "sp")
    text = root / "story.txt"
    text.write_text(TRAIN_TEXT * 4, encoding="utf-8")
    assert cli.main(["prepare", str(text), "--tokenizer-from", str(folder), "--out", str(root / "data")]) == 0
    args = ["train", "--data", str(root / "data"), "--out", str(root / "run"), "--max-iters", "5", "--quiet",
            "--batch-size", "4", "--eval-interval", "5", "--eval-iters", "1", "--num-samples", "1",
            "--sample-tokens", "8", "--warmup-iters", "1"]
    for key, value in TINY_MODEL.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    assert cli.main(args) == 0
    return root / "run"


def test_run_folder_keeps_the_tokenizer_and_train_text_init_from_uses_it(bpe_run, tmp_path, capsys, monkeypatch):
    tok = load_tokenizer(bpe_run)
    assert tok.name == "hf" and tok.eot_id == 2
    code, _, err = run_cli(capsys, "prepare", tmp_path / "x.txt", "--tokenizer-from", bpe_run, "--out", tmp_path / "d")
    assert code == 2 and "x.txt not found" in err  # the run folder itself is accepted
    text = tmp_path / "fresh.txt"
    text.write_text(MIXED * 40, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    args = ["train", text, "--init-from", bpe_run, "--max-iters", "5", "--batch-size", "4", "--eval-interval", "5",
            "--eval-iters", "1", "--num-samples", "1", "--sample-tokens", "8", "--warmup-iters", "1"]
    code, out, err = run_cli(capsys, *args, "--out", tmp_path / "tuned")
    assert code == 0, err
    assert f"with the {bpe_run.name} tokenizer" in out
    data = tmp_path / "data" / f"fresh-{bpe_run.name}"
    assert load_tokenizer(data).same_as(tok)
    hf = HFTokenizer.from_file(str(bpe_run / "hf_tokenizer.json"))
    train = load_tokens(data, "train").tolist()
    assert train == hf.encode(MIXED * 40, add_special_tokens=False).ids[: len(train)]
    assert json.loads((tmp_path / "tuned" / "config.json").read_text())["tokenizer"]["type"] == "hf"
    # The same text again reuses the prepared data.
    code, out, err = run_cli(capsys, *args, "--out", tmp_path / "tuned2")
    assert code == 0, err
    assert f"using prepared data in {Path('data') / data.name}" in out
    # An explicit --tokenizer that is not the run's is refused.
    code, _, err = run_cli(capsys, "train", text, "--init-from", bpe_run, "--tokenizer", "char", "--max-iters", "1",
                           "--out", tmp_path / "tuned3")
    assert_one_line_error(code, err, "--tokenizer char is not the tokenizer of --init-from", "drop --tokenizer")
    assert not (tmp_path / "tuned3").exists()


def test_bad_tokenizer_folders_are_one_line_errors(tmp_path, capsys, documents):
    a, _ = documents
    wordpiece = tmp_path / "bert"
    wordpiece.mkdir()
    wp = HFTokenizer(models.WordPiece(vocab={"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    wp.save(str(wordpiece / "tokenizer.json"))
    unigram = tmp_path / "t5"
    unigram.mkdir()
    HFTokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0)], unk_id=0)).save(str(unigram / "tokenizer.json"))
    empty = tmp_path / "empty"
    empty.mkdir()
    no_decoder = tmp_path / "no-decoder"
    no_decoder.mkdir()
    HFTokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")])).save(str(no_decoder / "tokenizer.json"))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "tokenizer.json").write_text('{"model": {"type": "BPE"')
    cases = [
        (wordpiece, "is a WordPiece tokenizer, which gptlab cannot run"),
        (unigram, "is a Unigram tokenizer, which gptlab cannot run"),
        (no_decoder, "has no decoder"),
        (corrupt, "are corrupt"),
        (empty, "the folder has no tokenizer"),
        (tmp_path / "nosuch", "folder not found"),
    ]
    for folder, expected in cases:
        code, _, err = run_cli(capsys, "prepare", a, "--tokenizer-from", folder, "--out", tmp_path / "out")
        assert_one_line_error(code, err, expected, str(folder))
        assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as usage:  # argparse's own usage error
        cli.main(["prepare", str(a), "--tokenizer-from", str(empty), "--tokenizer", "char"])
    assert_one_line_error(usage.value.code, capsys.readouterr().err, "not allowed with argument --tokenizer-from")
    code, _, err = run_cli(capsys, "prepare", a, "--tokenizer", "hf", "--out", tmp_path / "out")
    assert_one_line_error(code, err, "--tokenizer hf", "--tokenizer-from DIR")


def test_bpe_from_a_folder_saves_its_special_tokens(tmp_path):
    folder = FOLDERS["byte-level-chat"](tmp_path / "chat")
    tok = tokenizer_of(folder)
    assert isinstance(tok, BPETokenizer) and tok.special_tokens["eos_token"] == "<|endoftext|>"
    (tmp_path / "saved").mkdir()
    tok.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.same_as(tok) and again.special_tokens == tok.special_tokens and again.eot_id == 0
    assert again.token_bytes(again.hf.token_to_id("<|im_start|>")) == b"<|im_start|>"
    ids = np.asarray(tok.encode("a<|im_end|>b"))
    assert tok.hf.token_to_id("<|im_end|>") in ids  # a literal special token is read as it, as tokenizers does
