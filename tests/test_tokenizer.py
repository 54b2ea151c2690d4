"""Tokenizers: round trips, the real GPT-2 BPE offline, trained BPE, save/load as plain files."""

from __future__ import annotations

import json

import pytest

from gptlab.errors import GptlabError
from gptlab.tokenizer import (
    EOT_SPECIAL_TOKENS,
    KINDS,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    kinds_help,
    load_tokenizer,
    parse_spec,
    start_ids,
)


def test_char_round_trip_and_sorted_vocab():
    tok = CharTokenizer.from_texts(["hello ", "world\n"])
    assert tok.chars == sorted(set("hello world\n"))
    assert tok.vocab_size == len(set("hello world\n"))
    ids = tok.encode("hello world\n")
    assert tok.decode(ids) == "hello world\n"
    assert ids[0] == tok.chars.index("h")


def test_char_unseen_characters_raise_a_named_error_not_keyerror():
    tok = CharTokenizer.from_texts(["abc"])
    with pytest.raises(GptlabError) as e:
        tok.encode("abzq")
    assert "'z'" in str(e.value) and "'q'" in str(e.value)
    assert tok.encode("abzq", unknown="drop") == tok.encode("ab")


def test_gpt2_is_the_real_gpt2_bpe():
    tok = GPT2Tokenizer.build()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    text = "Über naïve café — 東京 🙂 <|endoftext|>"
    assert tok.decode(tok.encode(text)) == text
    # a literal end-of-text string in user text is text, not the special token
    assert 50256 not in tok.encode("<|endoftext|>")


def test_gpt2_saves_and_reloads_from_plain_files(tmp_path):
    tok = GPT2Tokenizer.build()
    tok.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["type"] == "gpt2"
    first_line = (tmp_path / "gpt2.tiktoken").read_text().splitlines()[0]
    assert len(first_line.split()) == 2  # tiktoken's "base64 rank" text format
    again = load_tokenizer(tmp_path)
    assert again.encode("Hello world") == [15496, 995]


def test_trained_bpe_learns_requested_size_and_round_trips(tmp_path, shakespeare_text):
    tok = BPETokenizer.train(iter([shakespeare_text[:200_000]]), vocab_size=512)
    assert tok.vocab_size == 512
    assert tok.eot_id is not None
    sample = "ROMEO:\nBut soft, what light through yonder window breaks? ünïcödé"
    assert tok.decode(tok.encode(sample)) == sample
    # merges make frequent words shorter than their bytes
    assert len(tok.encode("the king")) < len("the king")
    tok.save(tmp_path)
    again = load_tokenizer(tmp_path)
    assert again.encode(sample) == tok.encode(sample)
    assert (tmp_path / "hf_tokenizer.json").is_file()


def test_char_saves_and_reloads(tmp_path):
    tok = CharTokenizer.from_texts(["to be or not"])
    tok.save(tmp_path)
    assert load_tokenizer(tmp_path).encode("to be") == tok.encode("to be")


@pytest.mark.parametrize("spec,expected", [("char", ("char", 0)), ("gpt2", ("gpt2", 0)), ("bpe:4096", ("bpe", 4096))])
def test_parse_spec_accepts_known_kinds(spec, expected):
    assert parse_spec(spec) == expected


@pytest.mark.parametrize("spec", ["wordpiece", "bpe:", "bpe:abc", "bpe:100"])
def test_parse_spec_rejects_unknown_kinds(spec):
    with pytest.raises(GptlabError):
        parse_spec(spec)


def test_corrupt_tokenizer_file_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(GptlabError, match="corrupt"):
        load_tokenizer(tmp_path)


def test_every_kind_in_the_registry_parses_and_is_listed_in_the_help():
    for name, kind in KINDS.items():
        assert kind.name == name and kind.usage in kinds_help()
    assert parse_spec("bpe:512") == ("bpe", 512)
    with pytest.raises(GptlabError, match="takes no size"):
        parse_spec("char:5")
    with pytest.raises(GptlabError, match=kinds_help()):
        parse_spec("wordpiece")


def test_char_encode_array_matches_encode_and_still_names_unseen_characters():
    tok = CharTokenizer.from_texts(["hello wörld 🙂\n"])
    assert tok.encode_array("wörld 🙂\nhello").tolist() == tok.encode("wörld 🙂\nhello")
    with pytest.raises(GptlabError, match="'z'"):
        tok.encode_array("hellz")
    with pytest.raises(GptlabError, match="'\U0001f600'"):
        tok.encode_array("\U0001f600")  # beyond the table's largest code point


def test_same_as_compares_vocabularies_not_just_kinds():
    a, b = CharTokenizer.from_texts(["abc"]), CharTokenizer.from_texts(["abd"])
    assert a.same_as(CharTokenizer.from_texts(["cba"])) and not a.same_as(b)
    assert not a.same_as(GPT2Tokenizer.build())


def test_a_char_tokenizer_exported_to_hugging_face_is_recognised_on_import(tmp_path):
    tok = CharTokenizer.from_texts(["to be or not"])
    spec = json.loads(tok.hf_files()["tokenizer.json"])
    again = CharTokenizer.from_hf_spec(spec, tmp_path / "tokenizer.json")
    assert again is not None and again.same_as(tok)
    assert BPETokenizer.from_hf_spec(spec, tmp_path / "tokenizer.json") is None


def test_byte_gives_every_utf8_byte_its_own_id_in_any_language(tmp_path):
    tok = ByteTokenizer()
    text = "héllo 東京 🙂 שלום\n"
    assert tok.encode(text) == list(text.encode("utf-8")) and tok.vocab_size == 256
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_array(text).tolist() == tok.encode(text)
    assert b"".join(tok.token_bytes(i) for i in tok.encode("🙂")) == "🙂".encode()
    assert tok.decode(tok.encode("🙂")[:2]) == "\ufffd"  # half a character decodes to the replacement
    assert tok.eot_id is None and start_ids(tok) == [ord("\n")]
    tok.save(tmp_path)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer) and load_tokenizer(tmp_path).same_as(tok)
    assert parse_spec("byte") == ("byte", 0)
    with pytest.raises(GptlabError, match="takes no size"):
        parse_spec("byte:300")


def test_the_hf_kind_comes_only_from_a_folder():
    with pytest.raises(GptlabError, match="use --tokenizer-from DIR"):
        parse_spec("hf")
    assert "--tokenizer-from DIR" in kinds_help()


def test_a_bpe_folder_saved_without_special_tokens_still_ends_texts_with_endoftext(tmp_path, shakespeare_text):
    tok = BPETokenizer.train(iter([shakespeare_text[:20_000]]), 300)
    tok.save(tmp_path)
    desc = json.loads((tmp_path / "tokenizer.json").read_text())
    del desc["special_tokens"]  # as tokenizer.json was written before it recorded them
    (tmp_path / "tokenizer.json").write_text(json.dumps(desc))
    again = load_tokenizer(tmp_path)
    assert again.eot_id == tok.eot_id == again.hf.token_to_id("<|endoftext|>")
    assert again.special_tokens == EOT_SPECIAL_TOKENS and again.same_as(tok)
