"""Text in, text out: a trained run loaded with its tokenizer, sampled as strings or streamed pieces.

    from gptlab import load
    m = load("runs/shakespeare")
    m.generate("ROMEO:", max_new_tokens=200, num_samples=2, temperature=0.8, stop="\\n\\n", seed=7)
    for piece in m.stream("Once upon a time"):
        print(piece, end="", flush=True)

Design choices:
- The returned text is the continuation only, never the prompt; an empty prompt starts from the
  end-of-text token (BPE) or a newline (char), as `samples.txt` does.
- Decoding is incremental and byte-level: each token's bytes go through one UTF-8 incremental
  decoder per sample, so a character split across tokens waits for its last byte instead of
  showing up as U+FFFD. `generate` is built from the same pieces as `stream`, so for the same seed
  the streamed pieces join to exactly the generated text.
- Stop strings are matched on the decoded text, so one split across tokens still stops. The text
  is cut before the stop string. While streaming, a tail that could be the start of a stop string
  is held back until the next token settles it.
- Settings are the fields of `SampleConfig` (validated there, with the flag names the CLI uses),
  given as keywords or as a config.
- `events` also says why each sample ended, as OpenAI's finish_reason does: "stop" for a stop
  string or end-of-text, "length" for max_new_tokens; `pieces`, `generate` and `stream` are built on it.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from gptlab.batching import BatchEngine
from gptlab.checkpoint import load_weights_into
from gptlab.config import ModelConfig, SampleConfig, invalid_unicode_at
from gptlab.device import autodetect_device
from gptlab.engine import Engine, check_memory
from gptlab.errors import GptlabError
from gptlab.model import LanguageModel, build_model
from gptlab.quantize import check_kind, quantize_model_
from gptlab.rundir import RunFiles, check_run
from gptlab.tokenizer import Tokenizer, start_ids


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """Bytes of text behind every token id (0 for end-of-text, which stands for no text)."""
    to_bytes = tokenizer.token_bytes
    lengths = np.fromiter((len(to_bytes(i)) for i in range(tokenizer.vocab_size)), dtype=np.int64,
                          count=tokenizer.vocab_size)
    if tokenizer.eot_id is not None:
        lengths[tokenizer.eot_id] = 0
    return lengths


def unescape(text: str) -> str:
    """Text typed on a command line with \\n, \\t and \\\\ read as newline, tab and backslash."""
    out, i = [], 0
    while i < len(text):
        pair = text[i : i + 2]
        if pair in ("\\n", "\\t", "\\\\"):
            out.append({"\\n": "\n", "\\t": "\t", "\\\\": "\\"}[pair])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


class SampleText:
    """One sample's text as tokens arrive: incremental UTF-8, stop strings, and what is safe to show."""

    def __init__(self, token_bytes: Callable[[int], bytes], stop: Iterable[str] = ()) -> None:
        self.token_bytes = token_bytes
        self.stop = tuple(stop)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""  # decoded, not yet shown: it could be the start of a stop string
        self.done = False
        self.tokens = 0  # tokens pushed, the one that completed a stop string included
        self.stopped = False  # ended by a stop string

    def push(self, token: int) -> str:
        """Add one token; return the text that is now settled (possibly empty)."""
        self.tokens += 1
        return self._settle(self.utf8.decode(self.token_bytes(token)), final=False)

    def finish(self) -> str:
        """End the sample (end-of-text or max tokens); return what was still held back."""
        return self._settle(self.utf8.decode(b"", final=True), final=True)

    def _settle(self, new: str, final: bool) -> str:
        if self.done:
            return ""
        text = self.pending + new
        # Shown text never ends in the start of a stop string, so any match lies within `text`.
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.done, self.stopped, self.pending = True, True, ""
            return text[: min(cuts)]
        if final:
            self.done, self.pending = True, ""
            return text
        hold = 0
        for n in range(min(len(text), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                hold = n
                break
        self.pending = text[len(text) - hold :]
        return text[: len(text) - hold]


class TextModel:
    """A trained GPT and its tokenizer: generate text, stream it, look at next-token probabilities."""

    def __init__(self, model: LanguageModel, tokenizer: Tokenizer, run_dir: str | Path | None = None,
                 data_dir: str | None = None, slide: int | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.data_dir = data_dir or None
        self.engine = Engine(model, eot_id=tokenizer.eot_id, slide=slide, stop_ids=getattr(tokenizer, "stop_ids", ()))
        self.token_bytes = tokenizer.token_bytes

    def batched(self, max_rows: int, threads: int | None = None) -> TextModel:
        """Decode calls made at the same time, from any threads, together in one batch (gptlab/batching.py); self.

        `max_rows`: most samples decoded at once; `threads`: the decoder's intra-op threads.
        """
        e = self.engine
        self.engine = BatchEngine(self.model, eot_id=e.eot_id, slide=e.slide, stop_ids=e.more_stops,
                                  max_rows=max_rows, threads=threads)
        return self

    @property
    def config(self) -> ModelConfig:
        """The model's shape."""
        return self.model.config

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return self.engine.device

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a prompt; the tokenizer's start token for an empty one."""
        if not isinstance(prompt, str):
            raise GptlabError(f"the prompt must be text, got {type(prompt).__name__}")
        bad = invalid_unicode_at(prompt)
        if bad is None:
            return self.tokenizer.encode(prompt) if prompt else start_ids(self.tokenizer)
        try:  # a tokenizer that knows its characters names the unknown one itself
            self.tokenizer.encode(prompt)
        except GptlabError:
            raise
        except Exception:  # noqa: S110 - others fail on it in their own words; ours follow
            pass
        raise GptlabError(f"the prompt holds a character that is not valid Unicode ({prompt[bad]!r}, a lone "
                          f"surrogate, at character {bad}); give valid UTF-8 text")

    @property
    def chats(self) -> bool:
        """Whether the model was fine-tuned for conversation (its tokenizer has the chat turn markers)."""
        return hasattr(self.tokenizer, "conversation")

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The ids of a conversation, ready for the assistant's reply (the run's chat template)."""
        if not self.chats:
            raise GptlabError("this run was not fine-tuned for chat (no chat template); train it with "
                              "`gptlab train --init-from RUN --chat conversations.jsonl`")
        for message in messages:
            self.encode_prompt(message["content"] or " ")  # unknown characters and bad text are named here
        return self.tokenizer.conversation(messages, add_generation_prompt=True)[0]

    def chat_events(self, messages: list[dict[str, str]], config: SampleConfig | None = None,
                    **settings: Any) -> Iterator[tuple[int, str, Finish | None]]:
        """`events` for the assistant's reply to `messages`; it ends at the template's end-of-turn."""
        return self.events_for(self.chat_ids(messages), _config(config, settings))

    def events(self, prompt: str = "", config: SampleConfig | None = None,
               **settings: Any) -> Iterator[tuple[int, str, Finish | None]]:
        """(sample index, text piece, None) as the samples are made, then one (index, last piece, Finish) per sample."""
        return self.events_for(self.encode_prompt(prompt), _config(config, settings))

    def events_for(self, ids: list[int], config: SampleConfig) -> Iterator[tuple[int, str, Finish | None]]:
        """`events` after the prompt ids `ids`."""
        check_memory(self.model, config, min(len(ids), self.config.block_size))  # before any per-sample state
        samples = [SampleText(self.token_bytes, config.stop) for _ in range(config.num_samples)]
        live = len(samples)
        for column in self.engine.stream(ids, config):
            for row, token in enumerate(column):
                sample = samples[row]
                if sample.done:
                    continue
                piece = sample.finish() if token is None else sample.push(token)
                if sample.done:
                    live -= 1
                    yield row, piece, _finish(sample, config)
                elif piece:
                    yield row, piece, None
            if live == 0:
                return
        for row, sample in enumerate(samples):
            if not sample.done:
                yield row, sample.finish(), _finish(sample, config)

    def pieces(self, prompt: str = "", config: SampleConfig | None = None, **settings: Any) -> Iterator[tuple[int, str]]:
        """(sample index, text piece) as the samples are made; each sample's pieces join to its text."""
        for row, piece, _ in self.events(prompt, _config(config, settings)):
            if piece:
                yield row, piece

    def generate(self, prompt: str = "", config: SampleConfig | None = None, **settings: Any) -> list[str]:
        """`num_samples` continuations of `prompt` (settings: any SampleConfig field, e.g. temperature=0.8)."""
        config = _config(config, settings)
        texts: dict[int, list[str]] = {}  # filled as pieces come: `events` checks the memory first
        for row, piece in self.pieces(prompt, config):
            texts.setdefault(row, []).append(piece)
        return ["".join(texts.get(row, ())) for row in range(config.num_samples)]

    def stream(self, prompt: str = "", config: SampleConfig | None = None, **settings: Any) -> Iterator[str]:
        """One continuation of `prompt`, yielded in pieces as it is made."""
        config = _config(config, settings)
        if config.num_samples != 1:
            raise GptlabError("streaming shows one sample as it is made; use --num-samples 1 (or generate() for several)")
        for _, piece in self.pieces(prompt, config):
            yield piece

    @torch.inference_mode()
    def next_token_logits(self, prompt: str = "") -> torch.Tensor:
        """Logits (vocab,) for the token after `prompt` (its last `block_size` tokens)."""
        ids = self.encode_prompt(prompt)[-self.config.block_size :]
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self.model(idx)[0, -1].float().cpu()

    def training_data(self) -> Path:
        """The prepared data folder this run was trained on (config.json's train.data)."""
        if not self.data_dir:
            raise GptlabError("this model does not know its training data (no train.data in config.json)")
        path = Path(self.data_dir)
        # A relative path was relative to where training ran: usually the folder that holds runs/.
        if not path.is_absolute() and not path.is_dir() and self.run_dir is not None:
            beside_runs = self.run_dir.resolve().parent.parent / path
            path = beside_runs if beside_runs.is_dir() else path
        if not (path / "meta.json").is_file():
            raise GptlabError(
                f"the run's training data {path} (train.data in config.json) is not there; "
                "run gptlab from the folder you trained in (`gptlab eval --data FILE` scores other text)"
            )
        return path


class Finish(NamedTuple):
    """How a sample ended: "stop" (a stop string or end-of-text) or "length" (max_new_tokens), and its token count."""

    reason: str
    tokens: int


def _finish(sample: SampleText, config: SampleConfig) -> Finish:
    # The engine drops the end-of-text token, so a sample short of max_new_tokens ended on one.
    length = not sample.stopped and sample.tokens >= config.max_new_tokens
    return Finish("length" if length else "stop", sample.tokens)


def _config(config: SampleConfig | None, settings: dict[str, Any]) -> SampleConfig:
    if config is None:
        return SampleConfig(**settings)
    return replace(config, **settings) if settings else config


def load(run_dir: str | Path, checkpoint: str = "best", device: str = "auto", slide: int | None = None,
         files: RunFiles | None = None, quantize: str | None = None) -> TextModel:
    """Load a run folder (config, tokenizer, weights) ready to generate text (`files`: the run, already opened).

    `quantize`: the weights to decode with, "bf16" or "int8" (gptlab/quantize.py); None keeps float32.
    """
    run_dir = Path(run_dir)
    target = autodetect_device(device)
    check_kind(quantize, target)  # a bad kind is named before the weights load
    files = files or check_run(run_dir, checkpoint)
    model = build_model(files.model_cfg)
    load_weights_into(model, files.weights)
    quantize_model_(model.to(target), quantize)
    return TextModel(model, files.tokenizer, run_dir=run_dir, data_dir=files.train_cfg.data, slide=slide)
