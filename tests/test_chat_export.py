"""A chat run exported for transformers and llama.cpp: its markers, template and end of turn give gptlab's ids and replies."""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

import jinja2
import pytest
import torch

from gptlab.cli import main
from gptlab.errors import GptlabError
from gptlab.generation import load
from gptlab.hf.export import export
from gptlab.report import CHAT_PROBES
from gptlab.synthetic_chats import make_conversations, write_jsonl
from gptlab.tokenizer import CHAT_END, CHAT_TEMPLATE, load_tokenizer

transformers = pytest.importorskip("transformers")

CONVERSATIONS = make_conversations(20, seed=3)
QUIET = ["--eval-iters", "1", "--eval-interval", "10", "--num-samples", "1", "--sample-tokens", "8", "--quiet"]


def build_chat_run(root: Path, kind: str, block_size: int, steps: tuple[int, int], reply: str | None = None,
                   learning_rate: float = 1e-3) -> Path:
    """A base of `kind` trained on the conversations' own text, then fine-tuned on them (`steps`: base and chat
    steps; every assistant message `reply` when given: a reply short enough that the model learns where it ends)."""
    chats = make_conversations(60, seed=0)
    for message in (m for c in chats for m in c["messages"] if reply is not None and m["role"] == "assistant"):
        message["content"] = reply
    write_jsonl(root / "chats.jsonl", chats)
    # char learns its characters from the base text: every content, and the probes the run's samples ask.
    contents = [m["content"] for c in chats + CONVERSATIONS for m in c["messages"]]
    contents += [m["content"] for probe in CHAT_PROBES for m in probe]
    (root / "base.txt").write_text("\n".join(contents * 4), encoding="utf-8")
    shape = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", str(block_size), "--batch-size", "4"]
    cwd = os.getcwd()
    os.chdir(root)  # text and chats given to `train` are prepared into ./data
    try:
        assert main(["train", "base.txt", "--tokenizer", kind, "--max-iters", str(steps[0]), *shape, *QUIET, "--out", "base"]) == 0
        assert main(["train", "--init-from", "base", "--chat", "chats.jsonl", "--max-iters", str(steps[1]),
                     "--learning-rate", str(learning_rate), "--batch-size", "4", *QUIET, "--out", "chat"]) == 0
    finally:
        os.chdir(cwd)
    return root / "chat"


@pytest.fixture(scope="module")
def chat_runs(tmp_path_factory, chat_run) -> dict[str, Path]:
    """conftest's byte-level chat run, and a char and a gpt2 one built here, on one thread (the char one
    answers "ok" and stops, so a reply that ends at <|end|> is compared too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {"byte": chat_run,
                "char": build_chat_run(tmp_path_factory.mktemp("chat-char"), "char", 192, (10, 80), "ok", 5e-3),
                "gpt2": build_chat_run(tmp_path_factory.mktemp("chat-gpt2"), "gpt2", 96, (4, 4))}
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def exports(chat_runs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat-exports")
    out = {}
    for kind, run in chat_runs.items():
        assert main(["export", str(run), "--format", "hf", "--out", str(root / kind)]) == 0
        out[kind] = root / kind
    return out


def ids_of(encoded) -> list[int]:
    """apply_chat_template's ids: a list, or (transformers 5) a BatchEncoding holding them."""
    if not isinstance(encoded, list):
        encoded = encoded["input_ids"]
    return list(encoded)


def without_last_reply(conversation) -> list[dict[str, str]]:
    messages = conversation["messages"]
    assert messages[-1]["role"] == "assistant"
    return messages[:-1]


@pytest.mark.parametrize("kind", ["byte", "char", "gpt2"])
def test_apply_chat_template_gives_our_ids(kind, chat_runs, exports):
    ours = load_tokenizer(chat_runs[kind])
    theirs = transformers.AutoTokenizer.from_pretrained(exports[kind])
    config = json.loads((exports[kind] / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["chat_template"] == CHAT_TEMPLATE and theirs.eos_token == CHAT_END
    assert theirs.eos_token_id == ours.end_id
    for marker, i in ours.marker_ids.items():
        assert theirs.convert_tokens_to_ids(marker) == i == ours.base.vocab_size + ours.markers.index(marker)
        assert theirs.added_tokens_decoder[i].special
    for conversation in CONVERSATIONS:
        asked = without_last_reply(conversation)
        prompt = theirs.apply_chat_template(asked, tokenize=True, add_generation_prompt=True)
        assert ids_of(prompt) == ours.conversation(asked, add_generation_prompt=True)[0]
        whole = theirs.apply_chat_template(conversation["messages"], tokenize=True)
        assert ids_of(whole) == ours.conversation(conversation["messages"])[0]


@pytest.mark.parametrize("kind", ["byte", "char", "gpt2"])
def test_greedy_generate_gives_our_reply_and_stops_at_a_marker(kind, chat_runs, exports, one_thread):
    tm = load(chat_runs[kind], device="cpu")
    stops = sorted(tm.tokenizer.stop_ids | ({tm.tokenizer.eot_id} - {None}))
    for name in ("config.json", "generation_config.json"):
        eos = json.loads((exports[kind] / name).read_text(encoding="utf-8"))["eos_token_id"]
        assert eos[0] == tm.tokenizer.end_id and sorted(eos) == stops
    tokenizer = transformers.AutoTokenizer.from_pretrained(exports[kind])
    model = transformers.AutoModelForCausalLM.from_pretrained(exports[kind])
    replies = []
    for conversation in CONVERSATIONS[:3]:
        asked = without_last_reply(conversation)
        inputs = tokenizer.apply_chat_template(asked, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        out = model.generate(**inputs, do_sample=False, max_new_tokens=30)[0, inputs["input_ids"].shape[1]:].tolist()
        ended = next((n for n, token in enumerate(out) if token in stops), None)
        # generate stops at the first stop id, as our engine does (only a batch pads after it).
        assert ended is None or ended == len(out) - 1
        theirs = tokenizer.decode(out[:ended])
        ours = "".join(piece for _, piece, _ in tm.chat_events(asked, temperature=0, max_new_tokens=30))
        assert theirs == ours
        replies.append((ours, ended))
    if kind == "char":
        assert replies == [("ok", 2)] * 3  # both stopped at the <|end|> after "ok"


def test_the_card_says_chat_and_its_snippet_runs(exports, one_thread):
    card = (exports["byte"] / "README.md").read_text(encoding="utf-8")
    assert "chat model" in card and "apply_chat_template" in card and "ROMEO" not in card
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    exec(snippet.replace('"byte"', repr(str(exports["byte"]))), {})  # prints the reply, which may be empty


def test_a_chat_space_app_loads_the_chat_run(chat_run, tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    out = tmp_path / "space"
    assert main(["export", str(chat_run), "--format", "space", "--out", str(out)]) == 0
    monkeypatch.setattr(sys, "path", list(sys.path))  # the app puts its folder first
    app = runpy.run_path(str(out / "app.py"), run_name="space_app")
    assert app["demo"] is not None
    tm = load(out / "models" / chat_run.name, device="cpu")
    assert tm.tokenizer.same_as(load_tokenizer(chat_run))  # the chat markers came along


def test_gguf_of_a_chat_run_carries_the_template_and_control_markers(chat_runs, tmp_path):
    pytest.importorskip("gguf")
    ours = load_tokenizer(chat_runs["gpt2"])
    path = export(chat_runs["gpt2"], tmp_path / "chat.gguf", fmt="gguf")
    modelfile = path.with_suffix(".Modelfile").read_text(encoding="utf-8")
    assert "{{- range .Messages }}<|{{ .Role }}|>" in modelfile
    assert all(f'PARAMETER stop "{marker}"' in modelfile for marker in ours.markers)
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(path), n_ctx=96, n_threads=1, verbose=False)
    assert llm.metadata["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert int(llm.metadata["tokenizer.ggml.eos_token_id"]) == ours.end_id
    for marker, i in ours.marker_ids.items():  # control tokens: printed only when asked for special tokens
        assert llm.detokenize([i]) == b"" and llm.detokenize([i], special=True) == marker.encode()
    template = jinja2.Template(CHAT_TEMPLATE)
    for conversation in CONVERSATIONS[:5]:
        asked = without_last_reply(conversation)
        rendered = template.render(messages=asked, add_generation_prompt=True)
        assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == ours.conversation(asked, True)[0]


@pytest.mark.parametrize("kind", ["byte", "char"])
def test_gguf_refuses_a_chat_run_of_a_kind_llama_cpp_cannot_run(kind, chat_runs, tmp_path):
    pytest.importorskip("gguf")
    with pytest.raises(GptlabError, match=f"this run uses {kind}: export it with --format hf"):
        export(chat_runs[kind], tmp_path / "chat.gguf", fmt="gguf")
