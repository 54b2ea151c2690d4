"""Many generations of one model decoded together: requests join a running batch and leave it when done.

    engine = BatchEngine(model, eot_id=tok.eot_id)      # starts nothing until the first request
    for column in engine.stream(prompt_ids, SampleConfig(seed=7)):   # from any number of threads
        ...
    engine.close()

Design choices:
- Decoding one token reads every weight once whatever the batch, so at batch 1 a CPU waits on memory
  while its arithmetic idles. One decoder thread per model runs every request that is live at once
  through one forward per step: the weights are read once for all of them.
- Continuous batching: a request that arrives while others decode is prefilled on its own (into
  a cache of its own, exactly as `engine.decode` does) and its rows join the batch at the next step;
  a request leaves as soon as it ends, is cancelled or fails, and the rows after it move up so the
  batch's rows stay 0..B-1 of the cache. Prefill runs between steps, so a long prompt holds up the
  others for its length once.
- Each row sits at its own position. `SlotCache` keeps one row of keys and values per sample and
  hands the model per-row positions and a per-row mask (`decode_step` reads positions as a tensor).
  Attention reads positions up to the furthest row only, not the whole context.
- Each request keeps its own settings, its own `torch.Generator` (made from its seed) and its own
  repetition-penalty record, and samples from its own rows of the logits with the same functions
  `engine.decode` uses, so a seeded request draws the same numbers whoever it shares a batch with.
  Its rows are a slice of the batch, so a request with n samples draws (n, V) at once, as it would
  alone.
- Past the context a request's window slides as in `engine.decode`: its rows are prefilled again
  from their last tokens, on their own, and go on in the batch.
- `stream` has `Engine.stream`'s contract (one list per step, None for a sample that ended), so
  everything built on an engine (text, stop strings, the server) runs on this one unchanged. The
  caller's thread only waits on a queue; closing the iterator (a client that went away) marks the
  request cancelled and the decoder frees its rows before its next step.
- The decoder thread starts with the first request and ends after a few idle seconds, so an engine
  nobody uses holds no thread (a server that reloads a run's weights just drops the old engine),
  and drops its cache then: the rows a burst of requests needed do not stay allocated.
- At most `max_rows` rows decode at once; a request that does not fit waits for rows to free up
  (one that needs more rows than that on its own runs alone).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from gptlab.config import SampleConfig
from gptlab.engine import (
    Engine,
    KVCache,
    additive_causal_mask,
    apply_repetition_penalty,
    check_memory,
    decode_threads,
    default_slide,
    make_generator,
    prompt_start,
    sample_next,
)
from gptlab.errors import GptlabError

_END = object()
IDLE_SECONDS = 5.0  # the decoder thread ends after this long without work


class SlotCache:
    """Keys and values of up to `rows` samples, each at its own position: (rows, kv_heads, length, head_size) per layer.

    Grows (rows and positions) as requests need it; the rows of a step are always 0..B-1.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        c = model.config
        p = next(model.parameters())
        self.n_layer, self.kv_heads, self.head_size, self.block_size = c.n_layer, c.kv_heads, c.head_size, c.block_size
        self.device, self.dtype = p.device, p.dtype
        self.rows = self.length = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        causal = additive_causal_mask(c.block_size, self.device, self.dtype)
        self._visible = causal  # row p: what a query at position p sees (0) and does not (-inf)
        self._row_index = torch.arange(0, device=self.device)
        self._seen_now = torch.zeros((), dtype=self.dtype, device=self.device)
        self._k_rows: list[torch.Tensor] = []  # the same memory as k and v, as (rows, length, heads, head_size)
        self._v_rows: list[torch.Tensor] = []
        # The current step: rows 0..B-1 at `_positions`; `_seen` says what each row's query sees.
        self._last: list[int] = []
        self._rows = self._row_index
        self._positions = torch.zeros(0, dtype=torch.long, device=self.device)
        self._seen = causal[:0]
        self._mask = causal[:0]
        self._span = 0

    def reserve(self, rows: int, length: int) -> None:
        """Room for `rows` rows of `length` positions, keeping what is stored (grows by doubling)."""
        if rows <= self.rows and length <= self.length:
            return
        new_rows = max(rows, min(2 * self.rows, rows + 16)) if rows > self.rows else self.rows
        new_length = min(self.block_size, max(length, 2 * self.length)) if length > self.length else self.length
        shape = (new_rows, self.kv_heads, new_length, self.head_size)
        for cache in (self.k, self.v):
            for layer in range(self.n_layer):
                grown = torch.zeros(shape, device=self.device, dtype=self.dtype)
                if layer < len(cache):
                    grown[: self.rows, :, : self.length].copy_(cache[layer])
                    cache[layer] = grown
                else:
                    cache.append(grown)
        self.rows, self.length = new_rows, new_length
        self._row_index = torch.arange(new_rows, device=self.device)
        self._k_rows = [k.transpose(1, 2) for k in self.k]
        self._v_rows = [v.transpose(1, 2) for v in self.v]
        self._last = []  # the next step builds its positions and mask afresh

    def load(self, first: int, n: int, cache: KVCache) -> None:
        """Copy a prefilled cache's positions into rows first..first+n-1 (a one-row cache fills all n)."""
        filled = cache.pos
        for layer in range(self.n_layer):
            self.k[layer][first : first + n, :, :filled].copy_(cache.k[layer][:, :, :filled])
            self.v[layer][first : first + n, :, :filled].copy_(cache.v[layer][:, :, :filled])

    def move(self, src: int, dst: int, n: int, filled: int) -> None:
        """Move rows src..src+n-1 (their first `filled` positions) up to dst..dst+n-1 (dst < src)."""
        for cache in (self.k, self.v):
            for layer in range(self.n_layer):
                cache[layer][dst : dst + n, :, :filled] = cache[layer][src : src + n, :, :filled].clone()

    def begin_step(self, positions: list[int]) -> None:
        """Set where each of rows 0..len(positions)-1 writes its next token.

        Most steps move every row one position on: then the positions and the mask are updated in
        place (two small ops) instead of being built again.
        """
        B, span = len(positions), max(positions) + 1
        if len(self._last) == B and all(p == q + 1 for p, q in zip(positions, self._last)):
            self._positions.add_(1)
            self._seen.index_put_((self._rows, self._positions), self._seen_now)
        else:
            self._positions = torch.tensor(positions, dtype=torch.long, device=self.device)
            self._rows = self._row_index[:B]
            self._seen = self._visible.index_select(0, self._positions)  # (B, block_size), a copy of its own
        self._last = positions
        self._mask = self._seen.narrow(1, 0, span).view(B, 1, 1, span)
        self._span = span

    # What `decode_step` reads (the same names as engine.KVCache's).

    def step_positions(self) -> torch.Tensor:
        """(B,) positions the rows of this step write at."""
        return self._positions

    def step_mask(self) -> torch.Tensor:
        """(B, 1, 1, span), added to the scores: 0 where each row's query sees a cached position, -inf elsewhere."""
        return self._mask

    def write_step(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store each row's new keys/values (B, nh, 1, hs) at its position; return rows 0..B-1 up to the furthest."""
        at = (self._rows, self._positions)
        self._k_rows[layer].index_put_(at, k.squeeze(2))  # (rows, length, nh, hs) views: one (nh, hs) block per row
        self._v_rows[layer].index_put_(at, v.squeeze(2))
        B = k.size(0)
        return self.k[layer].narrow(0, 0, B).narrow(2, 0, self._span), self.v[layer].narrow(0, 0, B).narrow(2, 0, self._span)

    def advance(self, n: int) -> None:
        """Positions are the batch's to count (each request keeps its own)."""


@dataclass(eq=False)
class _Request:
    """One `stream` call: its rows of the batch and its sampling state."""

    prompt: torch.Tensor  # (1, T) or (rows, T)
    config: SampleConfig
    generator: torch.Generator
    out: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    done: bool = False  # ended, cancelled by its caller, or failed: it leaves before the next step
    first: int = 0  # its first row in the cache
    pos: int = 0  # positions its rows have cached (all its rows move together)
    step: int = 0  # tokens drawn so far, per row
    pending: torch.Tensor | None = None  # (rows, 1) ids to feed at the next step
    seen: torch.Tensor | None = None  # (rows, V) bool, for the repetition penalty
    history: torch.Tensor | None = None  # (rows, T0 + max_new) when the window may slide
    n: int = 0  # tokens in history

    @property
    def rows(self) -> int:
        return self.config.num_samples


class BatchEngine(Engine):
    """An `Engine` whose `stream` calls, from any threads, are decoded together by one thread."""

    def __init__(self, model: torch.nn.Module, eot_id: int | None = None, slide: int | None = None,
                 stop_ids: Iterable[int] = (), max_rows: int = 16, threads: int | None = None) -> None:
        """`threads`: the cores the decoder may use (a small model decodes on one, see `engine.decode_threads`)."""
        super().__init__(model, eot_id=eot_id, slide=slide, stop_ids=stop_ids)
        if max_rows < 1:
            raise GptlabError(f"max_rows must be >= 1, got {max_rows}")
        self.max_rows = max_rows
        self.threads = decode_threads(model, threads)
        self.block_size = model.config.block_size
        self.slide_by = default_slide(self.block_size) if slide is None else slide
        if not 1 <= self.slide_by <= self.block_size:
            raise GptlabError(f"slide must be from 1 to the context length {self.block_size}, got {self.slide_by}")
        self.cache = SlotCache(model)
        self.lock = threading.Condition()
        self.arrived: list[_Request] = []
        self.active: list[_Request] = []
        self.closed = False
        self.thread: threading.Thread | None = None
        self.steps = 0  # batched forwards run, for stats
        self.widest = 0  # most rows in one step

    # ---- the callers' side ----

    def stream(self, prompt: list[int], config: SampleConfig | None = None) -> Iterator[list[int | None]]:
        """One list per step with each sample's new id, None once that sample has ended; as `Engine.stream`."""
        config = config or SampleConfig()
        request = self._request(prompt, config)
        with self.lock:
            if self.closed:
                raise GptlabError("the model is shutting down; try again")
            self.arrived.append(request)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="gptlab-batch", daemon=True)
                self.thread.start()
            self.lock.notify()
        return self._columns(request)

    def _request(self, prompt: list[int], config: SampleConfig) -> _Request:
        self.check_ids(prompt)
        prompt = prompt[prompt_start(len(prompt), self.block_size) :]
        check_memory(self.model, config, len(prompt))
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        return _Request(ids, config, make_generator(self.device, config.seed))

    def _columns(self, request: _Request) -> Iterator[list[int | None]]:
        try:
            yield from self.until_stopped(self._items(request), request.rows)
        finally:
            request.done = True  # ended, stopped or dropped by its caller: its rows go free

    @staticmethod
    def _items(request: _Request) -> Iterator[list[int | None]]:
        """What the decoder sends `request`, until its end (an error it sends is raised here)."""
        while True:
            item = request.out.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def stats(self) -> dict[str, int]:
        """Rows decoding and requests waiting now; steps so far and the widest step."""
        with self.lock:
            return {"rows": sum(r.rows for r in self.active), "requests": len(self.active),
                    "waiting": len(self.arrived), "steps": self.steps, "widest": self.widest}

    def close(self) -> None:
        """Stop decoding: every request ends with an error, and the thread exits."""
        with self.lock:
            self.closed = True
            self.lock.notify()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout=10)

    # ---- the decoder thread ----

    def _run(self) -> None:
        torch.set_num_threads(self.threads)
        with torch.inference_mode():
            while True:
                with self.lock:
                    if not self.closed and not self.arrived and not self.active:
                        self.lock.wait(IDLE_SECONDS)
                        if not self.closed and not self.arrived:  # idle: the next request starts a new thread
                            self.thread = None
                            self.cache = SlotCache(self.model)  # and a cache of its size: a burst's memory goes back
                            return
                    if self.closed:
                        for r in self.arrived + self.active:
                            r.out.put(GptlabError("the model is shutting down; try again"))
                        self.arrived, self.active = [], []
                        return
                    joining = self._admit()
                for request in joining:
                    self._join(request)
                self._drop_finished()
                if self.active:
                    self._step()
                    self._drop_finished()

    def _admit(self) -> list[_Request]:
        """Requests that fit now (under the lock); cancelled waiting ones are dropped."""
        for r in self.arrived:
            if r.done:
                r.out.put(_END)
        self.arrived = [r for r in self.arrived if not r.done]
        rows = sum(r.rows for r in self.active)
        joining = []
        while self.arrived and (rows + self.arrived[0].rows <= self.max_rows or rows == 0):
            request = self.arrived.pop(0)
            request.first = rows
            rows += request.rows
            joining.append(request)
            self.active.append(request)
            if rows >= self.max_rows:
                break
        return joining

    def _join(self, r: _Request) -> None:
        """Prefill a new request into its rows and draw its first tokens."""
        try:
            T0 = r.prompt.size(1)
            max_new = r.config.max_new_tokens
            self.cache.reserve(r.first + r.rows, min(self.block_size, T0 + max_new - 1))
            if r.config.repetition_penalty != 1.0:
                r.seen = torch.zeros(r.rows, self.model.config.vocab_size, dtype=torch.bool, device=self.device)
                r.seen.scatter_(1, r.prompt.expand(r.rows, -1), True)
            if T0 + max_new - 1 > self.block_size:
                r.history = torch.empty(r.rows, T0 + max_new, dtype=torch.long, device=self.device)
                r.history[:, :T0] = r.prompt
            r.n = T0
            self._take(r, self._prefill(r, r.prompt))
        except Exception as e:  # noqa: BLE001 - handed to its caller
            self._fail(r, e)

    def _prefill(self, r: _Request, window: torch.Tensor) -> torch.Tensor:
        """Logits (rows, V) after `window` (1 or rows, T) run into an empty cache of its own, copied into r's rows."""
        own = KVCache.for_model(self.model, window.size(0), window.size(1))
        logits = self.model.forward_cached(window, own)
        self.cache.load(r.first, r.rows, own)
        r.pos = window.size(1)
        return logits.expand(r.rows, -1) if logits.size(0) != r.rows else logits

    def _step(self) -> None:
        """One batched forward for every active request's pending tokens, then each draws its next."""
        live = self.active  # every one has tokens to feed: the others left in _drop_finished
        try:
            ids = torch.cat([r.pending for r in live])
            positions = [r.pos for r in live for _ in range(r.rows)]
            self.cache.begin_step(positions)
            logits = self.model.decode_step(ids, self.cache)
        except Exception as e:  # noqa: BLE001 - every request in the step gets it
            for r in live:
                self._fail(r, e)
            return
        self.steps += 1
        self.widest = max(self.widest, len(positions))
        for r in list(live):
            r.pos += 1
            r.pending = None
            try:
                self._take(r, logits[r.first : r.first + r.rows])
            except Exception as e:  # noqa: BLE001
                self._fail(r, e)

    def _take(self, r: _Request, logits: torch.Tensor) -> None:
        """Draw r's next tokens from its logits and send them; then queue them to feed, slide, or finish."""
        c = r.config
        while True:
            if r.seen is not None:
                logits = apply_repetition_penalty(logits, r.seen, c.repetition_penalty)
            next_ids = sample_next(logits, r.generator, c.temperature, c.top_k, c.top_p, c.min_p)  # (rows, 1)
            r.step += 1
            r.out.put(next_ids.view(-1).tolist())
            if r.step >= c.max_new_tokens or r.done:
                r.done = True
                return
            if r.seen is not None:
                r.seen.scatter_(1, next_ids, True)
            if r.history is not None:
                r.history.narrow(1, r.n, 1).copy_(next_ids)
            r.n += 1
            if r.pos < self.block_size:
                r.pending = next_ids
                return
            keep = self.block_size - self.slide_by + 1  # the window moves: recompute its cache, as decode does
            logits = self._prefill(r, r.history[:, r.n - keep : r.n])

    def _fail(self, r: _Request, error: BaseException) -> None:
        if not r.done:
            r.out.put(error)
        r.done = True
        r.pending = None

    def _drop_finished(self) -> None:
        """Let ended and cancelled requests go, moving the rows after them up."""
        with self.lock:
            if not any(r.done for r in self.active):
                return
            kept, row = [], 0
            for r in self.active:
                if r.done:
                    r.out.put(_END)  # harmless when it ended: its iterator stops at the first _END
                    continue
                if r.first != row:
                    self.cache.move(r.first, row, r.rows, r.pos)
                    r.first = row
                kept.append(r)
                row += r.rows
            self.active = kept

