"""Token ids in, token ids out: the KV cache, the sampling functions and the decode loop.

Design choices:
- The engine knows only token ids; text (decoding, stop strings) lives in `generation.py`.
- Prefill once, then decode one token at a time against a KV cache preallocated per layer for
  exactly the positions the call can reach (never more than the context length). Several samples of
  one prompt share its prefill: the prompt runs as one row and its keys and values are broadcast
  into every row of the cache.
- Sampling is a chain of pure functions over logits, in Hugging Face's order: repetition penalty
  (the CTRL rule: positive logits divided, negative multiplied), temperature, top-k, top-p, min-p,
  then one draw. Filters that are off cost nothing; temperature 0 is argmax. The draw is the
  exponential race torch.multinomial itself uses for one sample, argmax(p / E) with E ~ Exp(1),
  minus its input checks.
- Randomness comes from a `torch.Generator` made per call from the seed, so a seed reproduces the
  same ids whatever else ran before, and two seeds differ.
- top-k keeps exactly k tokens (ties at the k-th logit broken by torch.topk), and then the other
  filters and the draw run over those k candidates only.
- top-p keeps the fewest most-likely tokens whose probabilities sum to at least p (each token is
  kept when the mass before it, in descending order, is below p); ties are ordered by token id.
- The repetition penalty looks at every token of the prompt and of the sample so far (as Hugging
  Face does), not only the tokens still in the context window.
- A prompt longer than the context is cropped from the left, with a warning.
- Past the context length the window slides: learned position embeddings mean cached keys cannot be
  shifted, so the cache is recomputed for the cropped window. The window moves `slide` tokens at a
  time, by default half the context as llama.cpp's context shift drops half: each token still sees
  at least half the context and one recompute is paid per `slide` tokens (a 33-token recompute of
  the cpu-tiny shape costs about four one-token steps). `slide=1` recomputes for every token and
  gives exactly nanoGPT's sampling (always the last `block_size` tokens).
- The decode loop takes the `SampleConfig` itself (its lengths and its sampling knobs), so a new
  knob is a field there and a line here, not a new argument on every call between them.
- The decode loop runs under `torch.inference_mode` and does per token only the model step, the
  draw and two small copies. `decode` yields a (B, 1) tensor per step; `Engine.stream` turns it
  into a list of ids with None for samples that have ended (end-of-text).
- A small model (up to 512 wide) decodes on the CPU with one intra-op thread, set for the duration
  of the loop and restored after (`cores.intra_op_threads`): at one token per step its matrices are
  too small to split, and a second OpenMP thread only adds hand-offs (and stalls badly when another
  process holds a core). A bigger one starts on every thread it is given and gives one up while
  its steps say another process holds a core (`cores.AdaptiveThreads`, the trainer's policy).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

import torch
from torch.nn import functional as F

from gptlab.config import SampleConfig, SettingError
from gptlab.cores import AdaptiveThreads, intra_op_threads
from gptlab.errors import GptlabError

# Up to this width a decode step's matrices are too small to split: a second thread only adds
# hand-offs. On this 2-core machine, with the other core busy, the cpu-tiny shape decoded at
# 35 tok/s with 2 threads and 920 tok/s with 1.
SMALL_WIDTH = 512


class KVCache:
    """Keys and values of every layer, preallocated: one (B, kv_heads, max_len, head_size) pair per layer."""

    def __init__(
        self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_size: int,
        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, n_head, max_len, head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len
        self.pos = 0  # positions filled so far
        # Made once as Python lists of views, so a decode step picks its index and mask tensors
        # without a single torch op.
        self._index = list(torch.arange(max_len, device=device).view(max_len, 1).unbind(0))
        causal = additive_causal_mask(max_len, device, dtype)
        self._visible = list(causal.view(max_len, 1, 1, 1, max_len).unbind(0))

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_len: int) -> KVCache:
        """A cache shaped for `model`, on its device and in its dtype."""
        c = model.config
        p = next(model.parameters())
        return cls(c.n_layer, batch_size, c.kv_heads, max_len, c.head_size, p.device, p.dtype)

    def reset(self) -> None:
        """Forget every position (the tensors are reused)."""
        self.pos = 0

    def advance(self, n: int) -> None:
        """Mark `n` more positions as filled (the model calls this after its last layer)."""
        self.pos += n

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a window's keys/values (b, nh, T, hs) for `layer` in an empty cache; return what attention reads.

        Tokens after the window go through `write_step` (one position at a time, read under `step_mask`).
        """
        T = k.size(2)
        if self.pos != 0:
            raise ValueError("a cache that already holds positions takes one token at a time (write)")
        if T > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {T} asked for")
        # copy_ broadcasts, so a one-row prefill fills every sample's row.
        self.k[layer].narrow(2, 0, T).copy_(k)
        self.v[layer].narrow(2, 0, T).copy_(v)
        return k, v  # a window filling the cache attends to itself (causally)

    def step_positions(self) -> int:
        """Where the next token goes: the same position for every row."""
        return self.pos

    def write_step(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one position's keys/values (B, nh, 1, hs) at `pos`; return the whole cache of `layer`.

        Positions past `pos` hold stale or zero values: read them under the mask `step_mask()`.
        """
        index = self._index[self.pos]
        return self.k[layer].index_copy_(2, index, k), self.v[layer].index_copy_(2, index, v)

    def step_mask(self) -> torch.Tensor:
        """Attention mask (1, 1, 1, max_len) for a query at `pos`, added to its scores: 0 at positions 0..pos, -inf after."""
        return self._visible[self.pos]


def additive_causal_mask(length: int, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
    """(length, length): row p is 0 at positions 0..p and -inf after, what a query at p adds to its scores.

    An additive mask rather than a boolean one: SDPA turns a boolean mask into this one on every call
    (two ops per layer per token, ~5% of a cpu-tiny decode step).
    """
    return torch.full((length, length), float("-inf"), device=device, dtype=dtype).triu(1)


# ---- sampling: pure functions over logits (B, V) ----

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """The CTRL rule: for tokens in `seen` (B, V bool), divide positive logits and multiply negative ones."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits with all but exactly the `k` largest set to -inf (ties at the k-th broken by torch.topk)."""
    if k >= logits.size(-1):
        return logits
    values, ids = torch.topk(logits, k, dim=-1)  # (B, k)
    return torch.full_like(logits, float("-inf")).scatter_(-1, ids, values)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Logits outside the nucleus set to -inf: the fewest most-likely tokens whose probabilities reach `p`."""
    if p >= 1.0:
        return logits
    probs = F.softmax(logits, dim=-1)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # the first token always has 0 < p
    drop_sorted = mass_before >= p
    drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Logits of tokens less likely than `min_p` times the most likely one set to -inf."""
    if min_p <= 0.0:
        return logits
    probs = F.softmax(logits, dim=-1)
    drop = probs < min_p * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    generator: torch.Generator | None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> torch.Tensor:
    """Next ids (B, 1) from last-position logits (B, V); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        # Work on the k candidates only: top-p, min-p and the draw then cost O(k), not O(vocab).
        values, ids = torch.topk(logits, top_k, dim=-1)  # (B, k), the same set top_k_filter keeps
        values = min_p_filter(top_p_filter(values, top_p), min_p)
        return ids.gather(-1, draw(F.softmax(values, dim=-1), generator))
    logits = min_p_filter(top_p_filter(logits, top_p), min_p)
    return draw(F.softmax(logits, dim=-1), generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row (B, 1) with probability `probs` (B, V): the race argmax(p / E), E ~ Exp(1)."""
    # The same draw torch.multinomial makes for one sample, without its input checks (34 -> 14 us at
    # vocab 65); a token of probability 0 can never win.
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(dim=-1, keepdim=True)


def make_generator(device: torch.device | str, seed: int | None) -> torch.Generator:
    """A generator on `device`, seeded with `seed` (or from the OS when None)."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


# ---- the decode loop ----

def decode_threads(model: torch.nn.Module, available: int | None = None) -> int:
    """Intra-op threads for decoding: one for a small model on the CPU, else `available` (default: torch's current setting)."""
    on_cpu = next(model.parameters()).device.type == "cpu"
    if on_cpu and model.config.n_embd <= SMALL_WIDTH:
        return 1
    return available or torch.get_num_threads()


def prompt_start(length: int, block_size: int) -> int:
    """Where a prompt of `length` tokens starts to fit the context: 0, or (with a warning) its last `block_size` tokens."""
    if length == 0:
        raise GptlabError("the prompt has no tokens; give at least one (an empty text prompt starts from the tokenizer's start token)")
    if length <= block_size:
        return 0
    warnings.warn(f"the prompt has {length} tokens but the context holds {block_size}; using its last {block_size}",
                  stacklevel=4)
    return length - block_size


def default_slide(block_size: int) -> int:
    """How far the window moves when generation runs past the context: half of it."""
    return max(1, block_size // 2)


def free_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device` (None when it cannot be told)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def decode_bytes(model: torch.nn.Module, rows: int, prompt_len: int, max_new_tokens: int, penalty: bool) -> int:
    """What one generation allocates: the KV cache, a few logits-sized buffers, the token history, and the
    text bookkeeping of each sample (an incremental decoder and its pieces, ~4 KB)."""
    c = model.config
    itemsize = next(model.parameters()).element_size()
    positions = min(c.block_size, prompt_len + max_new_tokens - 1)
    cache = 2 * c.n_layer * rows * positions * c.kv_heads * c.head_size * itemsize
    logits = 4 * rows * c.vocab_size * 4  # logits, softmax and the filters' copies, float32
    text = rows * (4096 + (prompt_len + max_new_tokens) * 8)
    return cache + logits + text + (rows * c.vocab_size if penalty else 0)


def check_memory(model: torch.nn.Module, config: SampleConfig, prompt_len: int) -> None:
    """Refuse, before anything is allocated, a request whose buffers would not fit in the memory free now."""
    device = next(model.parameters()).device
    need = decode_bytes(model, config.num_samples, prompt_len, config.max_new_tokens, config.repetition_penalty != 1)
    free = free_memory(device)
    if free is not None and need > 0.8 * free:
        raise SettingError("num_samples", f"{config.num_samples:,} with {config.max_new_tokens:,} new tokens needs "
                                          f"{need / 1e9:.1f} GB for the KV cache, more than the {free / 1e9:.1f} GB free "
                                          "here; ask for fewer samples or fewer tokens")


@torch.inference_mode()
def decode(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    config: SampleConfig,
    generator: torch.Generator | None,
    slide: int | None = None,
    threads: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next ids (config.num_samples, 1) once per step, `config.max_new_tokens` times.

    `prompt` is (1, T), shared by every row, or (num_samples, T), one prompt per row. The draws come
    from `generator` (`config.seed` is the caller's to turn into one). `threads` sets torch's
    intra-op threads while the generator runs (default: `decode_threads(model)`).
    """
    num_rows, max_new_tokens, penalty = config.num_samples, config.max_new_tokens, config.repetition_penalty
    block_size = model.config.block_size
    slide = default_slide(block_size) if slide is None else slide
    if not 1 <= slide <= block_size:
        raise GptlabError(f"slide must be from 1 to the context length {block_size}, got {slide}")
    if prompt.size(0) not in (1, num_rows):
        raise ValueError(f"prompt has {prompt.size(0)} rows for {num_rows} samples")
    prompt = prompt[:, prompt_start(prompt.size(1), block_size) :]
    device = next(model.parameters()).device
    prompt = prompt.to(device)
    T0 = prompt.size(1)
    check_memory(model, config, T0)
    # The last sampled token is never fed back, so the cache needs T0 + max_new_tokens - 1 positions.
    try:
        cache = KVCache.for_model(model, num_rows, min(block_size, T0 + max_new_tokens - 1))
    except (RuntimeError, MemoryError) as e:  # torch's OutOfMemoryError is a RuntimeError
        raise GptlabError(f"not enough memory for {num_rows:,} samples of {max_new_tokens:,} tokens "
                          f"({type(e).__name__}); ask for fewer samples or fewer tokens") from None
    may_slide = T0 + max_new_tokens - 1 > block_size
    keep = block_size - slide + 1  # window length right after a slide, the new token included
    if may_slide:  # the recent tokens of every row, to rebuild the window from
        history = torch.empty(num_rows, T0 + max_new_tokens, dtype=torch.long, device=device)
        history[:, :T0] = prompt
    n = T0
    seen = None
    if penalty != 1.0:
        seen = torch.zeros(num_rows, model.config.vocab_size, dtype=torch.bool, device=device)
        seen.scatter_(1, prompt.expand(num_rows, -1), True)

    threads = decode_threads(model) if threads is None else threads
    with intra_op_threads(threads):
        adapt = AdaptiveThreads(threads)  # gives up a thread while another process holds a core
        logits = model.forward_cached(prompt, cache)  # (1 or num_rows, V)
        if logits.size(0) != num_rows:
            logits = logits.expand(num_rows, -1)
        for step in range(max_new_tokens):
            if seen is not None:
                logits = apply_repetition_penalty(logits, seen, penalty)
            next_ids = sample_next(logits, generator, config.temperature, config.top_k, config.top_p,
                                   config.min_p)  # (B, 1)
            yield next_ids
            if step == max_new_tokens - 1:
                break
            if seen is not None:
                seen.scatter_(1, next_ids, True)
            if may_slide:
                history.narrow(1, n, 1).copy_(next_ids)
            n += 1
            if cache.pos == block_size:  # the window is full: move it and recompute the cache
                cache.reset()
                logits = model.forward_cached(history[:, n - keep : n], cache)
            else:
                began = time.perf_counter()
                logits = model.forward_cached(next_ids, cache)
                adapt.step_done(time.perf_counter() - began)


class Engine:
    """Samples token ids from a GPT: one prompt, several samples, stop at end-of-text (or a stop id) or max tokens."""

    def __init__(self, model: torch.nn.Module, eot_id: int | None = None, slide: int | None = None,
                 stop_ids: Iterable[int] = ()) -> None:
        self.model = model.eval()
        self.eot_id = eot_id
        self.more_stops = frozenset(stop_ids)  # beside end-of-text: a chat model's turn markers
        self.slide = slide
        self.device = next(model.parameters()).device

    def stream(self, prompt: list[int], config: SampleConfig | None = None) -> Iterator[list[int | None]]:
        """One list per step with each sample's new id, None once that sample has ended (end-of-text)."""
        config = config or SampleConfig()
        self.check_ids(prompt)
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        generator = make_generator(self.device, config.seed)
        steps = decode(self.model, ids, config, generator, self.slide)
        yield from self.until_stopped((next_ids.view(-1).tolist() for next_ids in steps), config.num_samples)

    def check_ids(self, prompt: list[int]) -> None:
        """A GptlabError naming the first prompt id outside the model's vocabulary."""
        vocab = self.model.config.vocab_size
        bad = [i for i in prompt if not 0 <= i < vocab]
        if bad:
            raise GptlabError(f"prompt token id {bad[0]} is outside the model's vocabulary of {vocab}")

    def until_stopped(self, columns: Iterable[list[int | None]], rows: int) -> Iterator[list[int | None]]:
        """`columns` with each row None from its end-of-text (or stop id) on; over once every row has ended."""
        ended = [False] * rows
        stops = self.more_stops | {self.eot_id}
        for column in columns:
            for row, token in enumerate(column):
                if ended[row] or token in stops:
                    ended[row] = True
                    column[row] = None
            if all(ended):
                return
            yield column

    def generate(self, prompt: list[int], config: SampleConfig | None = None) -> list[list[int]]:
        """Each sample's new ids, ending before end-of-text or at max_new_tokens."""
        config = config or SampleConfig()
        rows: list[list[int]] = [[] for _ in range(config.num_samples)]
        for column in self.stream(prompt, config):
            for row, token in zip(rows, column):
                if token is not None:
                    row.append(token)
        return rows


def generate(
    model: torch.nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    config: SampleConfig | None = None,
    slide: int | None = None,
    **settings: Any,
) -> torch.Tensor:
    """Append `max_new_tokens` sampled ids to every row of `idx` (B, T); returns (B, T + max_new_tokens).

    nanoGPT's generate: no stop at end-of-text. How to sample: `config` and/or SampleConfig fields
    as keywords (e.g. temperature=0.8, top_k=200, seed=1337); the draws come from `seed`.
    """
    if max_new_tokens < 1:
        return idx
    config = replace(config or SampleConfig(), max_new_tokens=max_new_tokens, num_samples=idx.size(0), **settings)
    generator = make_generator(next(model.parameters()).device, config.seed)
    new = torch.cat(list(decode(model, idx, config, generator, slide)), dim=1).to(idx.device)
    return torch.cat([idx, new.clone()], dim=1)
