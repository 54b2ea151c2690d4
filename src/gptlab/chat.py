"""Chat fine-tuning data: conversations in JSON Lines, checked line by line, encoded with turn markers, packed.

    {"messages": [{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}]}

Design choices:
- The format of OpenAI's and Hugging Face's chat datasets, one conversation per line. Each bad line
  is a one-line error naming its line number (and message number), found before anything is written.
- A conversation is encoded by `tokenizer.ChatTokenizer.conversation`: per message the role's marker,
  the content, <|end|>; the model learns only what the assistant writes (its content and the
  <|end|> that stops it), unless --chat-loss all.
- Conversations are packed whole into rows of `block_size + 1` tokens, in file order, first fit: a
  row holds as many as fit, the rest of it is padding that nothing is learned from. A conversation
  longer than the context is an error (naming the line), never cut silently.
- The last `val_fraction` of the conversations (at least one) are held out for validation.
- A prepared chat folder is a data folder (meta.json, train.bin, val.bin, tokenizer.json) whose
  rows come with a `*_learn.bin` of one code per token: 0 padding, 1 context, 2 learned.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from gptlab.errors import GptlabError
from gptlab.fsutil import atomic_write_bytes, write_json
from gptlab.tokenizer import CHAT_ROLES, ChatTokenizer

KIND = "chat"
PAD, CONTEXT, LEARN = 0, 1, 2
IGNORE = -100  # cross_entropy's ignore_index: targets nothing is learned from
LOSSES = ("assistant", "all")


def read_conversations(path: str | Path, markers: list[str]) -> list[tuple[int, list[dict[str, str]]]]:
    """(line number, messages) for every conversation in a JSON Lines file; a one-line error for the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise GptlabError(f"--chat {path}: file not found; give a JSON Lines file of {{\"messages\": [...]}} objects")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise GptlabError(f"{path}:{line}: not UTF-8 text (bad byte at offset {e.start}); save the file as UTF-8") from None
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            out.append((number, check_conversation(line, f"{path}:{number}", markers)))
    if not out:
        raise GptlabError(f"{path} holds no conversations; write one JSON object per line: "
                          '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}')
    return out


def check_conversation(line: str, where: str, markers: list[str]) -> list[dict[str, str]]:
    """The messages of one line, checked."""
    try:
        record = json.loads(line)
    except ValueError as e:
        raise GptlabError(f"{where}: not JSON ({e.msg} at column {e.colno}); write one JSON object per line") from None
    if not isinstance(record, dict) or "messages" not in record:
        raise GptlabError(f'{where}: expected an object with "messages" (a list of {{"role", "content"}}), '
                          f"got {type(record).__name__ if not isinstance(record, dict) else 'keys ' + ', '.join(record)}")
    messages = record["messages"]
    if not isinstance(messages, list):
        raise GptlabError(f'{where}: "messages" must be a list of {{"role", "content"}} objects')
    if not messages:
        raise GptlabError(f"{where}: an empty conversation; give at least a user and an assistant message")
    checked = []
    for index, message in enumerate(messages, 1):
        at = f"{where}, message {index}"
        if not isinstance(message, dict):
            raise GptlabError(f'{at}: expected {{"role": ..., "content": ...}}, got {type(message).__name__}')
        if "role" not in message:
            raise GptlabError(f'{at} has no "role"; use one of {", ".join(CHAT_ROLES)}')
        role = message["role"]
        if role not in CHAT_ROLES:
            raise GptlabError(f"{at}: unknown role {role!r}; use one of {', '.join(CHAT_ROLES)}")
        content = message.get("content")
        if not isinstance(content, str):
            raise GptlabError(f'{at} ({role}) has no "content" text')
        marker = next((m for m in markers if m in content), None)
        if marker is not None:
            raise GptlabError(f"{at} ({role}) contains the turn marker {marker}, which gptlab writes itself; "
                              "remove it from the text")
        checked.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in checked):
        raise GptlabError(f"{where}: no assistant message, so nothing to learn from; add the reply")
    return checked


def encode_conversations(conversations: list[tuple[int, list[dict[str, str]]]], tokenizer: ChatTokenizer,
                         block_size: int, source: str) -> list[tuple[list[int], list[int]]]:
    """(ids, codes) per conversation (codes: CONTEXT or LEARN per token), each checked to fit the context."""
    encoded = []
    for number, messages in conversations:
        where = f"{source}:{number}"
        for index, message in enumerate(messages, 1):
            try:
                length = len(tokenizer.encode(message["content"])) + 2
            except GptlabError as e:
                hint = "; or fine-tune a byte, gpt2 or bpe base, which reads any text" if tokenizer.name == "char" else ""
                raise GptlabError(f"{where}, message {index}: {e}{hint}") from None
            if length > block_size:
                raise GptlabError(f"{where}, message {index} ({message['role']}) is {length:,} tokens with its markers, "
                                  f"longer than the model's context of {block_size:,}; shorten it")
        ids, learn = tokenizer.conversation(messages)
        if len(ids) > block_size + 1:
            raise GptlabError(f"{where}: the conversation is {len(ids):,} tokens, longer than the model's context of "
                              f"{block_size:,}; split it into shorter conversations")
        encoded.append((ids, [LEARN if x else CONTEXT for x in learn]))
    return encoded


def pack(encoded: list[tuple[list[int], list[int]]], row_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `row_len` ids holding whole conversations in order (first fit), and their codes."""
    rows: list[tuple[list[int], list[int]]] = []
    for ids, codes in encoded:
        if rows and len(rows[-1][0]) + len(ids) <= row_len:
            rows[-1][0].extend(ids)
            rows[-1][1].extend(codes)
        else:
            rows.append((list(ids), list(codes)))
    tokens = np.full((len(rows), row_len), pad_id, dtype=np.int64)
    learn = np.full((len(rows), row_len), PAD, dtype=np.uint8)
    for r, (ids, codes) in enumerate(rows):
        tokens[r, : len(ids)] = ids
        learn[r, : len(codes)] = codes
    return tokens, learn


def prepare_chat(path: str | Path, tokenizer: ChatTokenizer, block_size: int, out: str | Path,
                 val_fraction: float = 0.1) -> Path:
    """Check, encode, split and pack the conversations of `path` into the data folder `out`."""
    from gptlab.data import META, token_dtype

    conversations = read_conversations(path, tokenizer.markers)
    if len(conversations) < 2:
        raise GptlabError(f"{path} holds one conversation; give at least two (one is held out for validation)")
    encoded = encode_conversations(conversations, tokenizer, block_size, str(path))
    n_val = min(len(encoded) - 1, max(1, math.ceil(val_fraction * len(encoded))))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    counts: dict[str, Any] = {}
    for name, part in (("train", encoded[: len(encoded) - n_val]), ("val", encoded[len(encoded) - n_val:])):
        tokens, learn = pack(part, block_size + 1, tokenizer.end_id)
        atomic_write_bytes(out / f"{name}.bin", tokens.astype(dtype).tobytes())
        atomic_write_bytes(out / f"{name}_learn.bin", learn.tobytes())
        counts[f"{name}_tokens"] = int(tokens.size)
        counts[f"{name}_conversations"] = len(part)
        counts[f"{name}_learned_tokens"] = int((learn == LEARN).sum())
    tokenizer.save(out)
    write_json(out / META, {"kind": KIND, "source": str(Path(path).resolve()), "tokenizer": tokenizer.spec,
                            "vocab_size": tokenizer.vocab_size, "dtype": np.dtype(dtype).name,
                            "row_len": block_size + 1, "val_fraction": val_fraction, **counts})
    return out


class Rows:
    """One split of a chat folder: packed rows of ids and what is learned from each token."""

    def __init__(self, tokens: np.ndarray, learn: np.ndarray) -> None:
        self.tokens, self.learn = tokens, learn

    def __len__(self) -> int:  # tokens, as for a plain split
        return int(self.tokens.size)

    @property
    def block_size(self) -> int:
        return self.tokens.shape[1] - 1


def load_rows(data_dir: str | Path, split: str, meta: dict[str, Any]) -> Rows:
    """A chat folder's split, checked against its meta.json."""
    from gptlab.data import load_tokens

    row_len = int(meta["row_len"])
    tokens = np.asarray(load_tokens(data_dir, split)).reshape(-1, row_len)
    path = Path(data_dir) / f"{split}_learn.bin"
    if not path.is_file() or path.stat().st_size != tokens.size:
        raise GptlabError(f"{path} is missing or truncated; prepare the chat data again (gptlab train --chat ...)")
    learn = np.fromfile(path, dtype=np.uint8).reshape(-1, row_len)
    return Rows(tokens, learn)


class RowBatches:
    """Random whole rows (packed conversations) from a seeded generator; targets nothing is learned from are IGNORE.

    Rank `r` of `world_size` keeps its slice of each global batch, as `data.RandomBatches` does.
    """

    def __init__(self, rows: Rows, batch_size: int, seed: int, loss: str = "assistant", rank: int = 0,
                 world_size: int = 1) -> None:
        import torch

        if loss not in LOSSES:
            raise GptlabError(f"--chat-loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        self.rows, self.batch_size, self.rank, self.world_size = rows, batch_size, rank, world_size
        self.lowest = LEARN if loss == "assistant" else CONTEXT
        self.generator = torch.Generator().manual_seed(seed)
        self.rows_served = 0
        self.block_size = rows.block_size

    def next(self) -> tuple[Any, Any]:
        import torch

        picks = torch.randint(len(self.rows.tokens), (self.batch_size * self.world_size,), generator=self.generator)
        self.rows_served += len(picks)
        mine = picks[self.rank * self.batch_size: (self.rank + 1) * self.batch_size].numpy()
        tokens = torch.from_numpy(self.rows.tokens[mine].astype(np.int64))
        learned = torch.from_numpy(self.rows.learn[mine][:, 1:] >= self.lowest)
        targets = tokens[:, 1:].masked_fill(~learned, IGNORE)
        return tokens[:, :-1].contiguous(), targets

    def epoch(self) -> float:
        return self.rows_served / max(1, len(self.rows.tokens))

    def windows_per_epoch(self) -> int:
        return len(self.rows.tokens)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "rows", "rng": self.generator.get_state(), "rows_served": self.rows_served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["rng"])
        self.rows_served = int(state["rows_served"])


def grow_vocab(weights: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """`weights` with the token embedding (and an untied head) grown to `vocab_size` rows.

    New rows (the turn markers) start at the mean of the existing ones: a token the model has never
    seen then looks like an average one, not like noise of another scale.
    """
    import torch

    out = dict(weights)
    for name in ("transformer.wte.weight", "model.embed_tokens.weight", "lm_head.weight"):
        table = out.get(name)
        if table is not None and table.shape[0] < vocab_size:
            extra = table.mean(0, keepdim=True).expand(vocab_size - table.shape[0], -1)
            out[name] = torch.cat([table, extra], 0)
    return out
