"""The training loop and what it needs: the run folder, model, batches, budget, evaluation, checkpoints, logs.

Design choices:
- One flat loop in `train_steps`, in nanoGPT's order: fetch batch, forward, loss, backward
  (x grad_accum), clip, step, log; then, every `eval_interval` steps and at the end, evaluate,
  append a metrics row and save `last` (and `best` when val improves). Setup is a few small helpers
  before it (`open_run_dir`, `seeded_model`, `make_batches`, `Budget`, `build_run`).
- Where training stands is one `TrainState` (step, best val loss, tokens seen, time, LR scale,
  rollbacks): a checkpoint saves it, and `--resume` and a rollback restore it.
- A run is bounded by steps (--max-iters, --epochs) or by the clock (--time); `Budget` knows which
  and how far along it is. With a clock, the learning rate decays over the fraction of time used.
- Evaluation uses its own fixed-seed generators, so every evaluation scores the same batches
  (fair best-by-val comparisons) and never disturbs the training stream's randomness.
- The learning rate is a linear warm-up then a cosine decay to `min_lr_ratio * learning_rate`.
- `loss.item()` (a host sync) happens only at log and eval steps; the one other sync per step is
  the check that loss and gradient are finite. A non-finite step is skipped; `nan_patience` of them
  in a row roll back to the last checkpoint with the learning rate halved, `max_rollbacks` times at
  most. `loss_hooks` (empty unless a test installs one) may replace each loss: fault injection.
- Precision comes from `device.resolve_dtype` (on a CPU, bf16 autocast only where it measured faster), and the
  process-wide settings (determinism, TF32 on CUDA, the CPU allocator) from `device.process_settings`,
  held while a run trains and undone after it.
- `torch.compile` (loss included) is on by default on CUDA, with CUDA graphs in a single process,
  and on a CPU for time budgets of 30 minutes or more, through a C++ wrapper (see
  `compile_wanted`); if it fails, training continues eagerly.
- Under torchrun the model is wrapped in DistributedDataParallel; every rank draws the same global
  batch and keeps its slice (see `RandomBatches`), rank 0 alone prints and writes the run folder,
  and each rank's RNG state is gathered into the checkpoint (gptlab/distributed.py has the rest).
- Ctrl-C and SIGTERM become a flag checked between steps (`StopRequest`): the run saves `last` and
  stops with the command that resumes it. SIGUSR1 and SIGUSR2 lend a core to another process and
  take it back, and the thread count follows contention (`cores.CoreShare`).
- What happens is told to `Run.observers`, each called as observer(event, **fields): the run
  folder's events.jsonl (start, progress about once a second, eval with an optional fresh sample,
  stopped, finished, failed), and the experiment logs --log names (`experiment_logs.py`). Live views
  read the folder, never the trainer's memory.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from gptlab import chat, distributed, rundir
from gptlab import checkpoint as ckpt
from gptlab.config import ModelConfig, TrainConfig, parse_duration
from gptlab.cores import CoreShare
from gptlab.data import RandomBatches, SlidingBatches, check_enough_tokens, load_tokens, read_meta
from gptlab.device import (
    autocast_for,
    autodetect_device,
    process_settings,
    resolve_dtype,
    rng_state,
    seed_everything,
    set_rng_state,
    warn,
)
from gptlab.errors import GptlabError, TrainingInterrupted
from gptlab.experiment_logs import check_experiment_logs, open_experiment_logs
from gptlab.model import LanguageModel, build_model
from gptlab.optim import make_optimizer
from gptlab.sizing import memorisation_warning
from gptlab.tokenizer import Tokenizer, load_tokenizer

loss_hooks: list[Callable[[int, torch.Tensor], torch.Tensor]] = []
"""Called as hook(step, loss) on every micro-batch's loss, each returning the loss to train on (fault injection)."""


def learning_rate(step: int, cfg: TrainConfig, total_steps: int, time_fraction: float | None = None) -> float:
    """Linear warm-up to the peak, then cosine decay to min_lr_ratio * peak.

    With a time budget, the decay follows the fraction of the budget used instead of the step count.
    """
    peak = cfg.learning_rate
    floor = peak * cfg.min_lr_ratio
    if step < cfg.warmup_iters:
        return peak * (step + 1) / (cfg.warmup_iters + 1)
    if time_fraction is not None:
        progress = min(1.0, time_fraction)
    else:
        decay_steps = cfg.lr_decay_iters or total_steps
        if step >= decay_steps:
            return floor
        progress = (step - cfg.warmup_iters) / max(1, decay_steps - cfg.warmup_iters)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)


@dataclass
class TrainResult:
    """What a finished run reports."""

    run_dir: Path
    steps: int
    best_val_loss: float
    final_train_loss: float
    final_val_loss: float
    tokens_seen: int
    elapsed_sec: float
    num_params: int
    step_seconds: list[float]


@dataclass
class TrainState:
    """Where training stands: what a checkpoint saves, and what --resume and a rollback restore."""

    step: int = 0
    best_val: float = math.inf
    tokens_seen: int = 0
    elapsed: float = 0.0  # seconds of training, every session of the run together
    lr_scale: float = 1.0  # halved by each rollback
    rollbacks: int = 0

    def saved(self) -> dict[str, Any]:
        """The fields under train_state.pt's names."""
        return {"step": self.step, "best_val_loss": self.best_val, "tokens_seen": self.tokens_seen,
                "elapsed_sec": self.elapsed, "lr_scale": self.lr_scale, "rollbacks": self.rollbacks}

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> TrainState:
        """The state `saved` wrote (runs from before rollbacks existed have no LR scale or rollback count)."""
        return cls(step=int(saved["step"]), best_val=float(saved["best_val_loss"]),
                   tokens_seen=int(saved["tokens_seen"]), elapsed=float(saved["elapsed_sec"]),
                   lr_scale=float(saved.get("lr_scale", 1.0)), rollbacks=int(saved.get("rollbacks", 0)))


def plan_steps(cfg: TrainConfig, train_tokens: int, block_size: int, sampler: Any) -> int:
    """Total optimizer steps: --max-iters, or enough for --epochs passes over the train split."""
    if cfg.epochs <= 0:
        return cfg.max_iters
    windows_per_step = cfg.batch_size * cfg.grad_accum * distributed.world_size()
    if isinstance(sampler, SlidingBatches):
        return max(1, math.ceil(cfg.epochs * sampler.windows_per_epoch() / windows_per_step))
    return max(1, math.ceil(cfg.epochs * train_tokens / (windows_per_step * block_size)))


@dataclass(frozen=True)
class Budget:
    """How far a run goes: `steps` optimizer steps, or `seconds` of wall-clock time (then the clock decides)."""

    steps: int | None = None
    seconds: float | None = None

    @classmethod
    def plan(cls, cfg: TrainConfig, train_tokens: int, block_size: int, sampler: Any) -> Budget:
        """--time's clock if given, else the steps --max-iters or --epochs make."""
        if cfg.time:
            return cls(seconds=parse_duration(cfg.time))
        return cls(steps=plan_steps(cfg, train_tokens, block_size, sampler))

    @property
    def clocked(self) -> bool:
        """Whether the clock, not a step count, ends the run."""
        return self.seconds is not None

    def done(self, step: int, elapsed: float) -> bool:
        """Whether a run at `step` after `elapsed` seconds has spent its budget."""
        if self.seconds is not None:
            return elapsed >= self.seconds
        return step >= (self.steps or 0)

    def lr(self, step: int, elapsed: float, cfg: TrainConfig) -> float:
        """The scheduled learning rate at `step` (before any rollback's scaling)."""
        if self.seconds is not None:
            return learning_rate(step, cfg, 0, elapsed / self.seconds)
        return learning_rate(step, cfg, self.steps or 0)

    def eta(self, step: int, elapsed: float, seconds_per_step: float) -> float:
        """Seconds left: what the clock has left, or the steps left at the current pace."""
        if self.seconds is not None:
            return max(0.0, self.seconds - elapsed)
        return ((self.steps or 0) - step) * seconds_per_step


class Clock:
    """Seconds of training: what earlier sessions of the run took, plus this session's so far."""

    def __init__(self, before: float) -> None:
        self.before, self.started = before, time.perf_counter()

    def elapsed(self, now: float | None = None) -> float:
        return self.before + (time.perf_counter() if now is None else now) - self.started


class Throughput:
    """Tokens trained per second since the last loss shown."""

    def __init__(self) -> None:
        self.restart()

    def restart(self, now: float | None = None) -> None:
        self.since, self.tokens = time.perf_counter() if now is None else now, 0

    def rate(self, now: float) -> float:
        return self.tokens / max(now - self.since, 1e-9)


class Progress:
    """A tqdm bar on a terminal; plain log lines every `log_interval` steps otherwise."""

    def __init__(self, total: int | None, start: int, log_interval: int, enabled: bool = True) -> None:
        self.total, self.log_interval, self.enabled = total, log_interval, enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)

    def step(self, step: int, loss: float | None, lr: float, tokens_per_sec: float, elapsed: float, eta: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_sec:,.0f}", refresh=False)
        elif loss is not None and self.enabled:
            print(
                f"step {step:>6}{f'/{self.total}' if self.total else ''} | loss {loss:.4f} | lr {lr:.2e} | {tokens_per_sec:,.0f} tok/s"
                f" | {elapsed:,.0f}s elapsed | ETA {eta:,.0f}s",
                flush=True,
            )

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        elif self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so a checkpoint is never cut in half."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # a second Ctrl-C: the user means it
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        import signal

        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------------------------------
# The loss, compiled or eager

# On a CPU, compiling the training step costs 25-35 s the first time (inductor's C++ build, two
# cores) and then makes each step 4-7% faster (cpu-small and nanoGPT's recipe shape): it pays for
# itself after about ten minutes, so `auto` turns it on only for budgets at least this long.
CPU_COMPILE_MIN_BUDGET_SEC = 30 * 60


def compile_wanted(setting: str, device_type: str, budget_sec: float) -> bool:
    """Whether `--compile` (auto, on or off) compiles the training step on this device and budget."""
    if setting != "auto":
        return setting == "on"
    if device_type == "cuda":
        return True
    return device_type == "cpu" and budget_sec >= CPU_COMPILE_MIN_BUDGET_SEC


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # reshape: on a GPU the training logits are a view cut from vocab-padded ones (see GPT.forward)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))


def model_loss(model: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The function from a batch to its mean cross-entropy under `model`."""

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _cross_entropy(model(x), y)

    return loss


def compile_loss(loss: Callable, device: torch.device) -> Callable | None:
    """`loss` through torch.compile with this device's options, or None where torch.compile is unavailable."""
    # CUDA graphs replay a step's kernels with one launch each way: nanoGPT's Shakespeare-char step
    # went from 13 to 7.8 ms on an H100. DDP's communication cannot be captured in a graph.
    # On a CPU, a C++ wrapper calls the generated kernels without Python in between: ~2% per step
    # at cpu-tiny.
    how: dict[str, Any] = {}
    if device.type == "cuda" and distributed.world_size() == 1:
        how = dict(mode="reduce-overhead")
    elif device.type == "cpu":
        how = dict(options={"cpp_wrapper": True})
    try:
        return torch.compile(loss, **how)
    except Exception as e:  # compile is an optimisation; never the reason a run fails
        warn(f"torch.compile unavailable ({type(e).__name__}); training eagerly")
        return None


class StepLoss:
    """A batch's training loss under autocast; compiled when asked, and eager for good once compiling fails.

    The loss is compiled with the model: the float32 logits and softmax then never reach memory whole.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, autocast: Any, compile_on: bool) -> None:
        self.eager = model_loss(model)
        self.fn = (compile_loss(self.eager, device) if compile_on else None) or self.eager
        self.autocast = autocast

    @property
    def compiled(self) -> bool:
        return self.fn is not self.eager

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        try:
            with self.autocast():
                return self.fn(x, y)
        except Exception as e:
            if not self.compiled:
                raise
            warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); training eagerly")
            self.fn = self.eager
            with self.autocast():
                return self.fn(x, y)


def eval_batches(tokens: Any, offset: int, cfg: TrainConfig, block_size: int) -> Any:
    """The batches a split is scored on: the same ones at every evaluation (their own seed per split)."""
    ranks = dict(rank=distributed.rank(), world_size=distributed.world_size())
    if isinstance(tokens, chat.Rows):  # chat: scored on what the model learns to write
        return chat.RowBatches(tokens, cfg.batch_size, cfg.seed + 1000 + offset, cfg.chat_loss, **ranks)
    return RandomBatches(tokens, block_size, cfg.batch_size, seed=cfg.seed + 1000 + offset, **ranks)


@torch.no_grad()
def estimate_loss(
    model: torch.nn.Module, splits: dict[str, np.ndarray], cfg: TrainConfig, block_size: int,
    device: torch.device, autocast: Any,
) -> dict[str, float]:
    """Mean loss over `eval_iters` batches per split, the same batches at every evaluation."""
    model.eval()
    out = {}
    for offset, (name, tokens) in enumerate(splits.items()):
        batches = eval_batches(tokens, offset, cfg, block_size)
        total = torch.zeros((), device=device)
        for _ in range(cfg.eval_iters):
            x, y = batches.next()
            with autocast():
                total += _cross_entropy(model(x.to(device)), y.to(device))
        out[name] = distributed.mean((total / cfg.eval_iters).item())
    model.train()
    return out


# --------------------------------------------------------------------------------------------------
# Setup


def read_inputs(
    model_cfg: ModelConfig, cfg: TrainConfig, resume: bool,
    init: tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer] | None,
) -> tuple[ModelConfig, Tokenizer, dict[str, torch.Tensor] | None, dict[str, Any]]:
    """The model's shape, the tokenizer, the starting weights (from --init-from) and the data folder's meta."""
    if not cfg.data:
        raise GptlabError("no training data; pass --data <prepared folder> or a text file (gptlab train my.txt)")
    meta = read_meta(cfg.data)
    tokenizer = load_tokenizer(cfg.data)
    weights = None
    if cfg.init_from and not resume:  # the shape and tokenizer come with the weights
        if init is None:
            raise GptlabError(f"--init-from {cfg.init_from}: resolve it with gptlab.hf.init.load_init and pass init=")
        model_cfg, weights, tokenizer = init
    if model_cfg.vocab_size == 0:
        model_cfg = replace(model_cfg, vocab_size=tokenizer.vocab_size)
    elif model_cfg.vocab_size < tokenizer.vocab_size:
        raise GptlabError(
            f"--vocab-size {model_cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}; "
            "use --vocab-size 0 to take it from the tokenizer"
        )
    return model_cfg, tokenizer, weights, meta


def load_splits(data_dir: str, block_size: int) -> dict[str, Any]:
    """The train and val tokens, each checked to hold more than one window (or a chat folder's packed rows)."""
    meta = read_meta(data_dir)
    if meta.get("kind") == chat.KIND:
        splits = {name: chat.load_rows(data_dir, name, meta) for name in ("train", "val")}
        if splits["train"].block_size != block_size:
            raise GptlabError(f"{data_dir} was packed for a context of {splits['train'].block_size} tokens, not "
                              f"{block_size}; prepare the chat data again for this model (gptlab train --chat ...)")
        return splits
    splits = {name: load_tokens(data_dir, name) for name in ("train", "val")}
    for name, tokens in splits.items():
        check_enough_tokens(tokens, block_size, name)
    return splits


def open_run_dir(cfg: TrainConfig, resume: bool, overwrite: bool) -> Path:
    """The run folder (--out, or runs/<data folder name>), checked and ready: a run to resume, or room for a new one."""
    run_dir = Path(cfg.out) if cfg.out else rundir.default_run_dir(cfg.data)
    if run_dir.exists() and not run_dir.is_dir():
        raise GptlabError(f"--out {run_dir} is a file, not a folder; choose another --out")
    if resume:
        if distributed.is_main():
            ckpt.recover_resume_point(run_dir)
        distributed.barrier()
        if not (run_dir / rundir.LAST).is_file():
            raise GptlabError(f"nothing to resume in {run_dir} (no {rundir.LAST}); drop --resume to start a new run")
    elif rundir.is_run_dir(run_dir):
        if not overwrite:
            raise GptlabError(
                f"{run_dir} already holds a run; pass --resume {run_dir} to continue it, --overwrite to replace it, "
                "or another --out"
            )
        if distributed.is_main():
            rundir.clear_run_dir(run_dir)
    distributed.barrier()  # every rank has checked the folder before rank 0 writes into it
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def seeded_model(model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device,
                 weights: dict[str, torch.Tensor] | None) -> LanguageModel:
    """The model, initialised from the run seed (or loaded from `weights`), on `device`."""
    seed_everything(cfg.seed)
    model = build_model(model_cfg).to(device)
    if weights is not None:
        model.load_state_dict(weights)
    if distributed.world_size() > 1:  # same weights everywhere, but each rank its own dropout
        seed_everything(distributed.rank_seed(cfg.seed))
    return model


def make_batches(tokens: Any, block_size: int, cfg: TrainConfig) -> Any:
    """The training stream --sampler names (packed rows for chat data), this rank's slice of each global batch."""
    ranks = dict(rank=distributed.rank(), world_size=distributed.world_size())
    if isinstance(tokens, chat.Rows):
        return chat.RowBatches(tokens, cfg.batch_size, cfg.seed, cfg.chat_loss, **ranks)
    if cfg.sampler == "sliding":
        return SlidingBatches(tokens, block_size, cfg.batch_size, cfg.seed, cfg.stride, **ranks)
    return RandomBatches(tokens, block_size, cfg.batch_size, cfg.seed, **ranks)


@dataclass
class Run:
    """A run's working parts, built once before the loop, and how they save, restore and evaluate."""

    cfg: TrainConfig
    model_cfg: ModelConfig
    run_dir: Path
    device: torch.device
    dtype: torch.dtype
    model: LanguageModel
    ddp_model: torch.nn.Module  # the model itself in one process
    optimizer: Any
    scaler: torch.amp.GradScaler
    batches: RandomBatches | SlidingBatches
    splits: dict[str, np.ndarray]
    budget: Budget
    autocast: Callable[[], Any]  # a fresh autocast context (a no-op one for float32)
    loss: StepLoss
    metrics: rundir.MetricsLog
    peak_lrs: list[float]  # each group's own peak: Muon's differs from AdamW's
    losses: dict[str, float] = field(default_factory=lambda: {"train": math.nan, "val": math.nan})
    evaluated_at: int | None = None  # the step of the latest evaluation (or resume point)
    observers: list[Callable[..., Any]] = field(default_factory=list)  # told every event (rank 0 only)
    live_sample: Callable[[], str] | None = None  # a fresh sample for each eval event
    told_at: float = 0.0  # when the last progress event went out

    def tell(self, event: str, **fields: Any) -> None:
        """Tell every observer (events.jsonl, experiment logs) what happened."""
        for observer in self.observers:
            observer(event, **fields)

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.model_cfg.block_size * distributed.world_size()

    def set_lr(self, state: TrainState) -> float:
        """Set every group's learning rate for the next step; returns the schedule's value at the AdamW peak."""
        lr = self.budget.lr(state.step, state.elapsed, self.cfg) * state.lr_scale
        for group, peak in zip(self.optimizer.param_groups, self.peak_lrs):
            group["lr"] = lr * peak / self.cfg.learning_rate
        return lr

    def save(self, state: TrainState, is_best: bool) -> None:
        """Write the resume point (weights, optimizer, data position, RNG states, `state`), and `best` if asked."""
        per_rank = distributed.gather({"sampler": self.batches.state_dict(), "rng": rng_state()})
        if not distributed.is_main():
            return
        info = {"step": state.step, "val_loss": f"{self.losses['val']:.6f}", "tokens_seen": state.tokens_seen}
        if is_best:
            ckpt.save_weights(self.run_dir / rundir.BEST, self.model, info, self.run_dir)
        saved = {
            **state.saved(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "sampler": self.batches.state_dict(),
            "rng": rng_state(),
        }
        if distributed.world_size() > 1:
            saved["ranks"] = per_rank
        ckpt.save_resume_point(self.run_dir, self.model, saved, info)

    def restore(self) -> TrainState:
        """Load the resume point into the model, optimizer, scaler, data stream and RNGs; returns its state."""
        saved = ckpt.load_train_state(self.run_dir / rundir.TRAIN_STATE)
        ckpt.load_weights_into(self.model, self.run_dir / rundir.LAST)
        try:
            self.optimizer.load_state_dict(saved["optimizer"])
        except (ValueError, KeyError) as e:
            raise GptlabError(
                f"{self.run_dir}'s optimizer state does not fit --optimizer {self.cfg.optimizer} ({e}); "
                "resume with the optimizer the run was started with"
            ) from None
        if saved.get("scaler"):
            self.scaler.load_state_dict(saved["scaler"])
        per_rank = saved.get("ranks") or [{"sampler": saved["sampler"], "rng": saved["rng"]}]
        if len(per_rank) == distributed.world_size():
            self.batches.load_state_dict(per_rank[distributed.rank()]["sampler"])
            set_rng_state(per_rank[distributed.rank()]["rng"])
        else:  # the shared data stream continues; the other ranks' dropout streams cannot
            warn(f"the run was saved by {len(per_rank)} process(es) and continues in {distributed.world_size()}; "
                 "it will not match an uninterrupted run exactly")
            self.batches.load_state_dict(saved["sampler"])
            if distributed.is_main():
                set_rng_state(saved["rng"])
        state = TrainState.from_saved(saved)
        self.evaluated_at = state.step  # scored (or stopped) there already: the loop goes on from it
        return state

    def evaluate_and_save(self, state: TrainState, progress: Progress) -> None:
        """Score both splits, append a metrics row, save `last` (and `best` when val improved), show the losses."""
        self.losses = estimate_loss(self.model, self.splits, self.cfg, self.model_cfg.block_size, self.device,
                                    self.autocast)
        self.evaluated_at = state.step
        is_best = self.losses["val"] < state.best_val
        state.best_val = min(state.best_val, self.losses["val"])
        if distributed.is_main():
            last_lr = self.budget.lr(max(state.step - 1, 0), state.elapsed, self.cfg) * state.lr_scale
            self.metrics.append(
                {
                    "step": state.step, "tokens_seen": state.tokens_seen, "epoch": f"{self.batches.epoch():.4f}",
                    "lr": f"{last_lr:.6g}",
                    "train_loss": f"{self.losses['train']:.6f}", "val_loss": f"{self.losses['val']:.6f}",
                    "tokens_per_sec": f"{state.tokens_seen / state.elapsed if state.elapsed > 0 else 0.0:.1f}",
                    "elapsed_sec": f"{state.elapsed:.2f}",
                },
                ckpt.resume_hint(self.run_dir),
            )
        self.save(state, is_best)
        if self.observers:
            sample = self.live_sample() if self.live_sample is not None else None
            self.tell("eval", step=state.step, tokens_seen=state.tokens_seen, train_loss=round(self.losses["train"], 6),
                      val_loss=round(self.losses["val"], 6), best=is_best, elapsed_sec=round(state.elapsed, 2),
                      **({"sample": sample} if sample is not None else {}))
        progress.write(
            f"step {state.step:>6}: train loss {self.losses['train']:.4f}, val loss {self.losses['val']:.4f}"
            f"{' (best so far, saved)' if is_best else ''}"
        )

    def between_steps(self, state: TrainState, clock: Clock, stop: StopRequest, progress: Progress) -> bool:
        """Read the clock, evaluate and save when due, stop if asked to; returns whether training is over."""
        # every rank follows rank 0's clock and stops when any rank was asked to
        state.elapsed, stopping = distributed.agree(clock.elapsed(), stop.signal is not None)
        finished = self.budget.done(state.step, state.elapsed)
        if (state.step % self.cfg.eval_interval == 0 or finished) and state.step != self.evaluated_at:
            self.evaluate_and_save(state, progress)
            if self.cfg.target_loss and self.losses["val"] <= self.cfg.target_loss:
                progress.write(f"reached target val loss {self.cfg.target_loss} at step {state.step}; stopping")
                return True
        if stopping:
            self.save(state, is_best=False)
            progress.close()
            nproc = f" --nproc {distributed.world_size()}" if distributed.world_size() > 1 else ""
            message = (f"stopped at step {state.step} and saved {self.run_dir / rundir.LAST}; "
                       f"continue with `gptlab train --resume {self.run_dir}{nproc}`")
            self.tell("stopped", step=state.step, elapsed_sec=round(state.elapsed, 2), message=message)
            raise TrainingInterrupted(message)
        return finished

    def roll_back(self, state: TrainState, progress: Progress) -> TrainState:
        """Return to the last checkpoint with the learning rate halved, or give up after `max_rollbacks`."""
        if state.rollbacks >= self.cfg.max_rollbacks:
            progress.close()
            raise GptlabError(
                f"training diverged: non-finite loss after {state.rollbacks} rollbacks; lower --learning-rate "
                f"(now {self.cfg.learning_rate * state.lr_scale:.2e}) or use --dtype float32, then --resume {self.run_dir}"
            )
        distributed.barrier()  # rank 0 has finished writing the checkpoint
        restored = self.restore()
        restored.lr_scale, restored.rollbacks = state.lr_scale * 0.5, state.rollbacks + 1
        self.metrics.truncate(restored.step)
        progress.write(
            f"rolled back to step {restored.step} with the learning rate halved (x{restored.lr_scale:g}); "
            f"rollback {restored.rollbacks} of {self.cfg.max_rollbacks}"
        )
        return restored


def build_run(model_cfg: ModelConfig, cfg: TrainConfig, run_dir: Path, device: torch.device,
              weights: dict[str, torch.Tensor] | None, splits: dict[str, np.ndarray], quiet: bool = False) -> Run:
    """The model, optimizer, grad scaler, batches, budget and loss of a run, ready for the loop."""
    dtype = resolve_dtype(cfg.dtype, device, model_cfg.n_embd, quiet=quiet)  # a CPU's bf16 is measured at this width
    model = seeded_model(model_cfg, cfg, device, weights)
    optimizer = make_optimizer(model, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    batches = make_batches(splits["train"], model_cfg.block_size, cfg)
    budget = Budget.plan(cfg, len(splits["train"]), model_cfg.block_size, batches)
    ddp_model = distributed.wrap(model, device)
    autocast = autocast_for(device, dtype)
    compile_on = compile_wanted(cfg.compile, device.type, budget.seconds or 0.0)
    return Run(
        cfg=cfg, model_cfg=model_cfg, run_dir=run_dir, device=device, dtype=dtype, model=model, ddp_model=ddp_model,
        optimizer=optimizer, scaler=scaler, batches=batches, splits=splits, budget=budget, autocast=autocast,
        loss=StepLoss(ddp_model, device, autocast, compile_on),
        metrics=rundir.MetricsLog(run_dir / rundir.METRICS), peak_lrs=[g["lr"] for g in optimizer.param_groups],
    )


def start_state(run: Run, resume: bool, tokenizer: Tokenizer, meta: dict[str, Any], say: Callable) -> TrainState:
    """Step 0, or the resume point; config.json (and for a new run the tokenizer) written to the run folder."""
    if resume:
        state = run.restore()
        run.metrics.load(up_to_step=state.step)
        say(f"resuming {run.run_dir} at step {state.step:,}" + ("" if run.budget.clocked else f" of {run.budget.steps:,}"))
    else:
        state = TrainState()
        if run.budget.clocked:
            fit_evaluation_to_budget(run)
        if distributed.is_main():
            tokenizer.save(run.run_dir)
    if distributed.is_main():
        tokenizer_summary = {"type": meta["tokenizer"], "vocab_size": tokenizer.vocab_size}
        rundir.write_run_config(run.run_dir, run.model_cfg, run.cfg, tokenizer_summary)
    return state


EVAL_SHARE = 0.05  # the most of a time budget one evaluation (both splits) may take


@torch.no_grad()
def fit_evaluation_to_budget(run: Run) -> None:
    """With a time budget, score fewer batches when one evaluation would take more than EVAL_SHARE of it.

    The clock counts evaluations too, and a run is evaluated before its first step: a preset made
    for a GPU (char-small scores 2 x 200 batches of 64 x 256) would spend minutes of a CPU's budget,
    or all of it, scoring instead of training. One batch is timed (after a warm-up one) and
    --eval-iters lowered to fit; the run's config.json records what it used, so --resume scores the
    same batches.
    """
    cfg = run.cfg
    x, _ = eval_batches(run.splits["val"], 1, cfg, run.model_cfg.block_size).next()
    x = x.to(run.device)
    run.model.eval()
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        with run.autocast():
            run.model(x)
        if run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        seconds.append(time.perf_counter() - start)
    run.model.train()
    per_batch = distributed.mean(seconds[-1])
    allowed = EVAL_SHARE * (run.budget.seconds or 0.0)
    if 2 * cfg.eval_iters * per_batch <= allowed:
        return
    iters = max(1, int(allowed / (2 * per_batch)))
    warn(f"one evaluation of {cfg.eval_iters} batches per split would take ~{2 * cfg.eval_iters * per_batch:,.0f} s "
         f"of the {cfg.time} budget; scoring {iters} batch{'es' * (iters > 1)} per split instead "
         f"(--eval-iters {iters}), so the budget goes to training")
    run.cfg = replace(cfg, eval_iters=iters)


def describe(run: Run, say: Callable, quiet: bool) -> None:
    """Print the model, the data, the device and the run folder; warn when the model could memorise the data."""
    m, train_tokens = run.model_cfg, len(run.splits["train"])
    n_params = run.model.num_params()
    say(f"model: {n_params:,} parameters ({m.describe()}, vocab {m.vocab_size:,})")
    say(
        f"data: {train_tokens:,} train / {len(run.splits['val']):,} val tokens from {run.cfg.data}; "
        f"{run.tokens_per_step:,} tokens per step; device {run.device}, {str(run.dtype).replace('torch.', '')}"
        f"{', compiled' if run.loss.compiled else ''}"
        f"{f'; {distributed.world_size()} processes' if distributed.world_size() > 1 else ''}"
    )
    say(f"run folder: {run.run_dir}")
    too_big = memorisation_warning(n_params, train_tokens)
    if too_big and not quiet:
        warn(too_big)
    if run.budget.clocked:
        say(f"training for {run.cfg.time} of wall-clock time; the learning rate decays over the budget")


# --------------------------------------------------------------------------------------------------
# The loop


def all_finite(loss: torch.Tensor, grad_norm: torch.Tensor, scaler: torch.amp.GradScaler) -> bool:
    """Whether this step may reach the weights: a finite loss and gradient on every rank."""
    # One host sync per step: a non-finite loss or gradient must never reach the weights.
    # (With float16 the grad scaler skips overflowing steps itself; only a bad loss counts.)
    finite = bool(torch.isfinite(loss)) and (scaler.is_enabled() or bool(torch.isfinite(grad_norm)))
    return distributed.all_ranks(finite)  # every rank skips, or none does


PROGRESS_EVERY = 1.0  # seconds between progress events (each costs one loss.item())


def log_step(run: Run, state: TrainState, progress: Progress, clock: Clock, meter: Throughput, lr: float,
             loss: torch.Tensor) -> None:
    """Advance the progress output; every `log_interval` steps show the loss, averaged over ranks (a host sync)."""
    now = time.perf_counter()
    rate = meter.rate(now)
    shown = None
    if state.step % run.cfg.log_interval == 0 or state.step == run.budget.steps:
        shown = distributed.mean(loss.item())
        meter.restart(now)
    elapsed = clock.elapsed(now)
    eta = run.budget.eta(state.step, elapsed, run.tokens_per_step / max(rate, 1e-9))
    progress.step(state.step, shown, lr, rate, elapsed, eta)
    if run.observers and now - run.told_at >= PROGRESS_EVERY:
        run.told_at = now
        train_loss = shown if shown is not None else loss.item()
        run.tell("progress", step=state.step, tokens_seen=state.tokens_seen,
                 train_loss=round(train_loss, 6) if math.isfinite(train_loss) else None, lr=float(f"{lr:.6g}"),
                 tokens_per_sec=round(rate, 1), elapsed_sec=round(elapsed, 2), eta_sec=round(eta, 1),
                 threads=torch.get_num_threads())


def train_steps(run: Run, state: TrainState, progress: Progress, stop: StopRequest,
                cores: CoreShare | None = None) -> tuple[TrainState, list[float]]:
    """The loop, until the budget is spent or the target loss reached; returns the final state and step times."""
    cfg, model, optimizer, scaler = run.cfg, run.model, run.optimizer, run.scaler
    clock, meter = Clock(state.elapsed), Throughput()
    step_seconds: list[float] = []  # optimizer steps only, no evaluation or checkpoint time
    bad_streak = 0
    model.train()
    finished = run.between_steps(state, clock, stop, progress)  # step 0 is evaluated before training
    while not finished:
        t_step = time.perf_counter()
        lr = run.set_lr(state)
        for micro in range(cfg.grad_accum):
            x, y = run.batches.next()
            x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
            with distributed.no_sync(run.ddp_model, sync=micro == cfg.grad_accum - 1):
                loss = run.loss(x, y)
                for hook in loss_hooks:
                    loss = hook(state.step, loss)
                last_loss = loss.detach().clone()  # a CUDA-graph replay reuses loss's memory
                scaler.scale(loss / cfg.grad_accum).backward()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        if all_finite(last_loss, grad_norm, scaler):
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens_seen += run.tokens_per_step
            step_seconds.append(time.perf_counter() - t_step)
            bad_streak = 0
            meter.tokens += run.tokens_per_step
            log_step(run, state, progress, clock, meter, lr, last_loss)
        else:
            optimizer.zero_grad(set_to_none=True)
            scaler.update()
            bad_streak += 1
            progress.write(f"step {state.step}: non-finite loss or gradient norm; step skipped ({bad_streak} in a row)")
            if bad_streak >= cfg.nan_patience:
                state, bad_streak = run.roll_back(state, progress), 0
                meter.restart()
        finished = run.between_steps(state, clock, stop, progress)
        if cores is not None:
            cores.apply(step_seconds)
    progress.close()
    state.elapsed = clock.elapsed()
    return state, step_seconds


def train(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    init: tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer] | None = None,
) -> TrainResult:
    """Train a GPT on a prepared data folder and write the run folder; returns the summary.

    `init` is what `--init-from` names, resolved by the caller: shape, weights and tokenizer.
    """
    distributed.init()
    quiet = quiet or not distributed.is_main()
    say = (lambda *a, **k: None) if quiet else (lambda text: print(text, flush=True))
    model_cfg, tokenizer, weights, meta = read_inputs(model_cfg, cfg, resume, init)
    splits = load_splits(cfg.data, model_cfg.block_size)
    if distributed.is_main():
        check_experiment_logs(cfg.log)  # before the run folder is touched: a bad --log leaves nothing behind
    run_dir = open_run_dir(cfg, resume, overwrite)
    cfg = replace(cfg, out=str(run_dir))
    device = distributed.device_for_rank(autodetect_device(cfg.device))
    with process_settings(device, cfg.deterministic):
        run = build_run(model_cfg, cfg, run_dir, device, weights, splits, quiet)
        state = start_state(run, resume, tokenizer, meta, say)
        describe(run, say, quiet)
        if distributed.is_main():
            run.observers = [rundir.EventLog(run_dir / rundir.EVENTS), *open_experiment_logs(cfg, run_dir)]
            run.live_sample = live_sampler(run, tokenizer)
        try:
            # Both listen before the start event (`gptlab ui` signals after it). A stop asked for after
            # the last step changes nothing: the run is complete and says so.
            with StopRequest() as stop, CoreShare(adapt=device.type == "cpu" and not cfg.deterministic) as cores:
                run.tell("start", pid=os.getpid(), step=state.step, resume=resume, total_steps=run.budget.steps,
                         budget_sec=run.budget.seconds, tokens_per_step=run.tokens_per_step,
                         params=run.model.num_params(), shape=model_cfg.describe(), data=cfg.data, device=str(device),
                         dtype=str(run.dtype).replace("torch.", ""), threads=torch.get_num_threads())
                progress = Progress(run.budget.steps, state.step, cfg.log_interval, enabled=not quiet)
                state, step_seconds = train_steps(run, state, progress, stop, cores)
                say(f"done: {state.step:,} steps in {state.elapsed:,.1f}s, best val loss {state.best_val:.4f}")
                if distributed.is_main():
                    finish_run(run_dir, run.model, tokenizer, cfg, say)
            run.tell("finished", step=state.step, elapsed_sec=round(state.elapsed, 2),
                     best_val_loss=round(state.best_val, 6))
        except TrainingInterrupted:
            raise
        except BaseException as e:
            run.tell("failed", error=str(e) or type(e).__name__)
            raise
        finally:
            for observer in run.observers:
                close = getattr(observer, "close", None)
                if close is not None:
                    close()
    distributed.teardown()
    return TrainResult(
        run_dir=run_dir, steps=state.step, best_val_loss=state.best_val, final_train_loss=run.losses["train"],
        final_val_loss=run.losses["val"], tokens_seen=state.tokens_seen, elapsed_sec=state.elapsed,
        num_params=run.model.num_params(), step_seconds=step_seconds,
    )


def live_sampler(run: Run, tokenizer: Tokenizer) -> Callable[[], str] | None:
    """A function drawing one short sample from the model as it is (for eval events), or None when off."""
    if run.cfg.live_sample_tokens < 1:
        return None

    def sample() -> str:
        from gptlab.report import sample_text

        text = sample_text(run.model, tokenizer, run.cfg.live_sample_tokens, seed=run.cfg.seed)
        run.model.train()
        return text

    return sample


def finish_run(run_dir: Path, model: LanguageModel, tokenizer: Any, cfg: TrainConfig, say: Any) -> None:
    """Write loss.png and samples.txt (from the best weights) and print where everything is."""
    from gptlab.report import plot_losses, write_samples

    plot_losses(run_dir)
    if (run_dir / rundir.BEST).is_file():
        ckpt.load_weights_into(model, run_dir / rundir.BEST)
    samples = write_samples(run_dir, model, tokenizer, cfg.num_samples, cfg.sample_tokens, seed=cfg.seed)
    if samples:
        say("\n--- sample from the best checkpoint ---")
        say(samples[0])
        say("---------------------------------------")
    say(f"loss plot: {(run_dir / rundir.LOSS_PLOT).resolve()}")
    say(f"samples:   {(run_dir / rundir.SAMPLES).resolve()}")
