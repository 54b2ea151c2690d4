"""The training loop and what it needs: device and precision, schedule, evaluation, checkpoints, logs.

Design choices:
- One flat loop in `train()`: fetch batch, forward, loss, backward (x grad_accum), clip, step, and
  every `eval_interval` steps evaluate, log a metrics row and save `last` (and `best` when val
  improves). The order of events is visible in one screen of code.
- Evaluation uses its own fixed-seed generators, so every evaluation scores the same batches
  (fair best-by-val comparisons) and never disturbs the training stream's randomness.
- The learning rate is a linear warm-up then a cosine decay to `min_lr_ratio * learning_rate`.
- `loss.item()` (a host sync) happens only at log and eval steps.
- On a CPU without native bf16 (bf16 matmuls run 140-630x slower than float32 on e.g. Zen 3)
  a request for bfloat16 or float16 falls back to float32 with a warning.
- `torch.compile` (loss included) is on by default on CUDA, with CUDA graphs in a single process,
  and on a CPU for time budgets of 30 minutes or more, through a C++ wrapper (see
  `compile_wanted`); if it fails, training continues eagerly. TF32 is on for float32 matmuls on CUDA.
- On CPU, freed memory stays in the process (gptlab/cpu_memory.py): a large-vocabulary step then
  reuses last step's pages instead of faulting fresh ones in.
- Under torchrun the model is wrapped in DistributedDataParallel; every rank draws the same global
  batch and keeps its slice (see `RandomBatches`), rank 0 alone prints and writes the run folder,
  and each rank's RNG state is gathered into the checkpoint (gptlab/distributed.py has the rest).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from gptlab import checkpoint as ckpt
from gptlab import distributed, rundir
from gptlab.config import ModelConfig, TrainConfig, parse_duration
from gptlab.cpu_memory import keep_freed_memory
from gptlab.data import (
    RandomBatches,
    SlidingBatches,
    check_enough_tokens,
    load_tokens,
    read_meta,
)
from gptlab.device import autodetect_device, resolve_dtype, rng_state, seed_everything, set_rng_state, warn
from gptlab.errors import GptlabError, TrainingInterrupted
from gptlab.model import GPT
from gptlab.muon import Muon, OptimizerSet
from gptlab.sizing import memorisation_warning
from gptlab.tokenizer import Tokenizer, load_tokenizer


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


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> Any:
    """AdamW with weight-decay groups (fused where the device has it), or Muon for the blocks' matrices plus AdamW."""
    kwargs: dict[str, Any] = dict(lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
    if cfg.optimizer == "muon":
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        in_blocks = [(n, p) for n, p in named if p.dim() == 2 and n.startswith("transformer.h.")]
        qkv = [p for n, p in in_blocks if n.endswith("attn.c_attn.weight")]
        other = [p for n, p in in_blocks if not n.endswith("attn.c_attn.weight")]
        muon = Muon([{"params": qkv, "split": 3}, {"params": other}], lr=cfg.muon_lr, weight_decay=cfg.weight_decay)
        groups = model.optimizer_groups(cfg.weight_decay, exclude=frozenset(id(p) for _, p in in_blocks))
        return OptimizerSet(muon, _adamw(groups, device, kwargs))
    return _adamw(model.optimizer_groups(cfg.weight_decay), device, kwargs)


def _adamw(groups: list[dict], device: torch.device, kwargs: dict[str, Any]) -> torch.optim.AdamW:
    if device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.AdamW(groups, **kwargs)


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


@torch.no_grad()
def estimate_loss(
    model: torch.nn.Module, splits: dict[str, np.ndarray], cfg: TrainConfig, block_size: int,
    device: torch.device, autocast: Any,
) -> dict[str, float]:
    """Mean loss over `eval_iters` batches per split, the same batches at every evaluation."""
    model.eval()
    out = {}
    for offset, (name, tokens) in enumerate(splits.items()):
        batches = RandomBatches(tokens, block_size, cfg.batch_size, seed=cfg.seed + 1000 + offset,
                                rank=distributed.rank(), world_size=distributed.world_size())
        total = torch.zeros((), device=device)
        for _ in range(cfg.eval_iters):
            x, y = batches.next()
            with autocast():
                total += _cross_entropy(model(x.to(device)), y.to(device))
        out[name] = distributed.mean((total / cfg.eval_iters).item())
    model.train()
    return out


def resolve_run_dir(cfg: TrainConfig, meta: dict[str, Any]) -> Path:
    """The --out folder, or runs/<data folder name>."""
    return Path(cfg.out) if cfg.out else rundir.default_run_dir(cfg.data)


def plan_steps(cfg: TrainConfig, train_tokens: int, block_size: int, sampler: Any) -> int:
    """Total optimizer steps: --max-iters, or enough for --epochs passes over the train split."""
    if cfg.epochs <= 0:
        return cfg.max_iters
    windows_per_step = cfg.batch_size * cfg.grad_accum * distributed.world_size()
    if isinstance(sampler, SlidingBatches):
        return max(1, math.ceil(cfg.epochs * sampler.windows_per_epoch() / windows_per_step))
    return max(1, math.ceil(cfg.epochs * train_tokens / (windows_per_step * block_size)))


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


def injected_nan_steps() -> Counter[int]:
    """How many attempts at each step get a NaN loss, from GPTLAB_INJECT_NAN="12,20*3" (a fault-injection hook)."""
    import os

    counts: Counter[int] = Counter()
    for item in os.environ.get("GPTLAB_INJECT_NAN", "").split(","):
        if item.strip():
            at, _, times = item.partition("*")
            counts[int(at)] += int(times or 1)
    return counts


def set_determinism(enabled: bool) -> None:
    """Reproducible kernels: deterministic algorithms, no cuDNN autotuning (costs GPU speed)."""
    import os

    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=False)
    torch.backends.cudnn.benchmark = not enabled
    torch.backends.cudnn.deterministic = enabled


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
    if not cfg.data:
        raise GptlabError("no training data; pass --data <prepared folder> or a text file (gptlab train my.txt)")
    meta = read_meta(cfg.data)
    tokenizer = load_tokenizer(cfg.data)
    init_weights = None
    if cfg.init_from and not resume:  # the shape and tokenizer come with the weights
        if init is None:
            raise GptlabError(f"--init-from {cfg.init_from}: resolve it with gptlab.hf.init.load_init and pass init=")
        model_cfg, init_weights, tokenizer = init
    if model_cfg.vocab_size == 0:
        model_cfg = replace(model_cfg, vocab_size=tokenizer.vocab_size)
    elif model_cfg.vocab_size < tokenizer.vocab_size:
        raise GptlabError(
            f"--vocab-size {model_cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}; "
            "use --vocab-size 0 to take it from the tokenizer"
        )
    train_tokens, val_tokens = load_tokens(cfg.data, "train"), load_tokens(cfg.data, "val")
    check_enough_tokens(train_tokens, model_cfg.block_size, "train")
    check_enough_tokens(val_tokens, model_cfg.block_size, "val")

    run_dir = resolve_run_dir(cfg, meta)
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
    cfg = replace(cfg, out=str(run_dir))

    device = distributed.device_for_rank(autodetect_device(cfg.device))
    dtype = resolve_dtype(cfg.dtype, device)
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":  # float32 matmuls (outside autocast) on tensor cores, as TF32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_determinism(cfg.deterministic)
    seed_everything(cfg.seed)
    model = GPT(model_cfg).to(device)
    if init_weights is not None:
        model.load_state_dict(init_weights)
    if distributed.world_size() > 1:  # same weights everywhere, but each rank its own dropout
        seed_everything(distributed.rank_seed(cfg.seed))
    optimizer = make_optimizer(model, cfg, device)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    scaler = torch.amp.GradScaler(device.type, enabled=(dtype == torch.float16))
    if dtype == torch.float32:
        autocast = contextlib.nullcontext
    else:
        autocast = lambda: torch.autocast(device_type=device.type, dtype=dtype)  # noqa: E731
    ranks = dict(rank=distributed.rank(), world_size=distributed.world_size())
    if cfg.sampler == "sliding":
        batches: Any = SlidingBatches(train_tokens, model_cfg.block_size, cfg.batch_size, cfg.seed, cfg.stride, **ranks)
    else:
        batches = RandomBatches(train_tokens, model_cfg.block_size, cfg.batch_size, cfg.seed, **ranks)
    total_steps = plan_steps(cfg, len(train_tokens), model_cfg.block_size, batches)
    budget = parse_duration(cfg.time) if cfg.time else 0.0
    if budget:
        total_steps = 10**12  # the clock decides
    tokens_per_step = cfg.batch_size * cfg.grad_accum * model_cfg.block_size * distributed.world_size()

    step, best_val, tokens_seen, elapsed_before = 0, float("inf"), 0, 0.0
    lr_scale, rollbacks = 1.0, 0
    metrics = rundir.MetricsLog(run_dir / rundir.METRICS)

    def restore(state: dict[str, Any]) -> None:
        nonlocal step, best_val, tokens_seen, elapsed_before, lr_scale, rollbacks
        ckpt.load_weights_into(model, run_dir / rundir.LAST)
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise GptlabError(
                f"{run_dir}'s optimizer state does not fit --optimizer {cfg.optimizer} ({e}); "
                "resume with the optimizer the run was started with"
            ) from None
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        per_rank = state.get("ranks") or [{"sampler": state["sampler"], "rng": state["rng"]}]
        if len(per_rank) == distributed.world_size():
            batches.load_state_dict(per_rank[distributed.rank()]["sampler"])
            set_rng_state(per_rank[distributed.rank()]["rng"])
        else:  # the shared data stream continues; the other ranks' dropout streams cannot
            warn(f"the run was saved by {len(per_rank)} process(es) and continues in {distributed.world_size()}; "
                 "it will not match an uninterrupted run exactly")
            batches.load_state_dict(state["sampler"])
            if distributed.is_main():
                set_rng_state(state["rng"])
        step, best_val = int(state["step"]), float(state["best_val_loss"])
        tokens_seen, elapsed_before = int(state["tokens_seen"]), float(state["elapsed_sec"])
        lr_scale, rollbacks = float(state.get("lr_scale", 1.0)), int(state.get("rollbacks", 0))

    if resume:
        restore(ckpt.load_train_state(run_dir / rundir.TRAIN_STATE))
        metrics.load(up_to_step=step)
        say(f"resuming {run_dir} at step {step:,}" + ("" if budget else f" of {total_steps:,}"))
    elif distributed.is_main():
        tokenizer.save(run_dir)
    if distributed.is_main():
        rundir.write_run_config(run_dir, model_cfg, cfg, {"type": meta["tokenizer"], "vocab_size": tokenizer.vocab_size})

    compile_on = compile_wanted(cfg.compile, device.type, budget)
    ddp_model = distributed.wrap(model, device)  # the model itself in one process

    def model_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _cross_entropy(ddp_model(x), y)

    # The loss is compiled with the model: the float32 logits and softmax then never reach memory whole.
    train_loss: Any = model_loss
    if compile_on:
        try:
            # CUDA graphs replay a step's kernels with one launch each way: nanoGPT's Shakespeare-char step
            # went from 13 to 7.8 ms on an H100. DDP's communication cannot be captured in a graph.
            # On a CPU, a C++ wrapper calls the generated kernels without Python in between: ~2% per step
            # at cpu-tiny.
            how: dict[str, Any] = {}
            if device.type == "cuda" and distributed.world_size() == 1:
                how = dict(mode="reduce-overhead")
            elif device.type == "cpu":
                how = dict(options={"cpp_wrapper": True})
            train_loss = torch.compile(model_loss, **how)
        except Exception as e:  # compile is an optimisation; never the reason a run fails
            warn(f"torch.compile unavailable ({type(e).__name__}); training eagerly")
    n_params = model.num_params()
    say(
        f"model: {n_params:,} parameters ({model_cfg.n_layer} layers, {model_cfg.n_head} heads, "
        f"{model_cfg.n_embd} wide, context {model_cfg.block_size}, vocab {model_cfg.vocab_size:,})"
    )
    say(
        f"data: {len(train_tokens):,} train / {len(val_tokens):,} val tokens from {cfg.data}; "
        f"{tokens_per_step:,} tokens per step; device {device}, {str(dtype).replace('torch.', '')}"
        f"{', compiled' if train_loss is not model_loss else ''}"
        f"{f'; {distributed.world_size()} processes' if distributed.world_size() > 1 else ''}"
    )
    say(f"run folder: {run_dir}")
    too_big = memorisation_warning(n_params, len(train_tokens))
    if too_big and distributed.is_main() and not quiet:
        warn(too_big)

    def forward_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nonlocal train_loss
        try:
            with autocast():
                return train_loss(x, y)
        except Exception as e:
            if train_loss is model_loss:
                raise
            warn(f"torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); training eagerly")
            train_loss = model_loss
            with autocast():
                return model_loss(x, y)

    def save_checkpoint(is_best: bool, val_loss: float) -> None:
        per_rank = distributed.gather({"sampler": batches.state_dict(), "rng": rng_state()})
        if not distributed.is_main():
            return
        info = {"step": step, "val_loss": f"{val_loss:.6f}", "tokens_seen": tokens_seen}
        if is_best:
            ckpt.save_weights(run_dir / rundir.BEST, model, info, run_dir)
        state = {
            "step": step,
            "best_val_loss": best_val,
            "tokens_seen": tokens_seen,
            "elapsed_sec": elapsed,
            "lr_scale": lr_scale,
            "rollbacks": rollbacks,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "sampler": batches.state_dict(),
            "rng": rng_state(),
        }
        if distributed.world_size() > 1:
            state["ranks"] = per_rank
        ckpt.save_resume_point(run_dir, model, state, info)

    splits = {"train": train_tokens, "val": val_tokens}
    progress = Progress(None if budget else total_steps, step, cfg.log_interval, enabled=not quiet)
    if budget:
        say(f"training for {cfg.time} of wall-clock time; the learning rate decays over the budget")
    t_start = time.perf_counter()
    t_window, tokens_window = t_start, 0
    elapsed = elapsed_before
    losses = {"train": float("nan"), "val": float("nan")}
    last_loss: torch.Tensor | None = None
    just_resumed = resume
    nan_steps, bad_streak = injected_nan_steps(), 0
    step_seconds: list[float] = []  # optimizer steps only, no evaluation or checkpoint time
    model.train()
    with StopRequest() as stop:
        while True:
            # every rank follows rank 0's clock and stops when any rank was asked to
            elapsed, stopping = distributed.agree(elapsed_before + time.perf_counter() - t_start, stop.signal is not None)
            finished = step >= total_steps or (budget and elapsed >= budget)
            time_fraction = elapsed / budget if budget else None
            if (step % cfg.eval_interval == 0 or finished) and not just_resumed:
                losses = estimate_loss(model, splits, cfg, model_cfg.block_size, device, autocast)
                is_best = losses["val"] < best_val
                best_val = min(best_val, losses["val"])
                tokens_per_sec = tokens_seen / elapsed if elapsed > 0 else 0.0
                if distributed.is_main():
                    metrics.append(
                        {
                            "step": step, "tokens_seen": tokens_seen, "epoch": f"{batches.epoch():.4f}",
                            "lr": f"{learning_rate(max(step - 1, 0), cfg, total_steps, time_fraction) * lr_scale:.6g}",
                            "train_loss": f"{losses['train']:.6f}", "val_loss": f"{losses['val']:.6f}",
                            "tokens_per_sec": f"{tokens_per_sec:.1f}", "elapsed_sec": f"{elapsed:.2f}",
                        },
                        ckpt.resume_hint(run_dir),
                    )
                save_checkpoint(is_best, losses["val"])
                progress.write(
                    f"step {step:>6}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                    f"{' (best so far, saved)' if is_best else ''}"
                )
                if cfg.target_loss and losses["val"] <= cfg.target_loss:
                    progress.write(f"reached target val loss {cfg.target_loss} at step {step}; stopping")
                    break
            just_resumed = False
            if stopping:
                save_checkpoint(False, losses["val"])
                progress.close()
                nproc = f" --nproc {distributed.world_size()}" if distributed.world_size() > 1 else ""
                raise TrainingInterrupted(
                    f"stopped at step {step} and saved {run_dir / rundir.LAST}; "
                    f"continue with `gptlab train --resume {run_dir}{nproc}`"
                )
            if finished:
                break

            t_step = time.perf_counter()
            lr = learning_rate(step, cfg, total_steps, time_fraction) * lr_scale
            for group, base_lr in zip(optimizer.param_groups, base_lrs):  # Muon's groups keep their own peak
                group["lr"] = lr * base_lr / cfg.learning_rate
            for micro in range(cfg.grad_accum):
                x, y = batches.next()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with distributed.no_sync(ddp_model, sync=micro == cfg.grad_accum - 1):
                    loss = forward_loss(x, y)
                    if nan_steps[step] > 0:
                        nan_steps[step] -= 1
                        loss = loss * float("nan")
                    last_loss = loss.detach().clone()  # a CUDA-graph replay reuses loss's memory
                    scaler.scale(loss / cfg.grad_accum).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            # One host sync per step: a non-finite loss or gradient must never reach the weights.
            # (With float16 the grad scaler skips overflowing steps itself; only a bad loss counts.)
            finite = bool(torch.isfinite(last_loss)) and (scaler.is_enabled() or bool(torch.isfinite(grad_norm)))
            finite = distributed.all_ranks(finite)  # every rank skips, or none does
            if not finite:
                optimizer.zero_grad(set_to_none=True)
                scaler.update()
                bad_streak += 1
                progress.write(f"step {step}: non-finite loss or gradient norm; step skipped ({bad_streak} in a row)")
                if bad_streak >= cfg.nan_patience:
                    if rollbacks >= cfg.max_rollbacks:
                        progress.close()
                        raise GptlabError(
                            f"training diverged: non-finite loss after {rollbacks} rollbacks; lower --learning-rate "
                            f"(now {cfg.learning_rate * lr_scale:.2e}) or use --dtype float32, then --resume {run_dir}"
                        )
                    wall, kept_scale, kept_rollbacks = elapsed_before + time.perf_counter() - t_start, lr_scale, rollbacks
                    distributed.barrier()  # rank 0 has finished writing the checkpoint
                    restore(ckpt.load_train_state(run_dir / rundir.TRAIN_STATE))
                    rollbacks, lr_scale, elapsed_before = kept_rollbacks + 1, kept_scale * 0.5, wall
                    bad_streak = 0
                    t_start = t_window = time.perf_counter()
                    tokens_window = 0
                    metrics.truncate(step)
                    progress.write(
                        f"rolled back to step {step} with the learning rate halved (x{lr_scale:g}); "
                        f"rollback {rollbacks} of {cfg.max_rollbacks}"
                    )
                    just_resumed = True
                continue
            bad_streak = 0
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += tokens_per_step
            step_seconds.append(time.perf_counter() - t_step)
            tokens_window += tokens_per_step

            logging_now = step % cfg.log_interval == 0 or step == total_steps
            shown = None
            now = time.perf_counter()
            rate = tokens_window / max(now - t_window, 1e-9)
            if logging_now and last_loss is not None:
                shown = distributed.mean(last_loss.item())
                t_window, tokens_window = now, 0
            if budget:
                eta = max(0.0, budget - (elapsed_before + now - t_start))
            else:
                eta = (total_steps - step) * tokens_per_step / max(rate, 1e-9)
            progress.step(step, shown, lr, rate, elapsed_before + now - t_start, eta)
    progress.close()
    elapsed = elapsed_before + time.perf_counter() - t_start

    say(f"done: {step:,} steps in {elapsed:,.1f}s, best val loss {best_val:.4f}")
    if distributed.is_main():
        finish_run(run_dir, model, tokenizer, cfg, say)
    distributed.teardown()
    return TrainResult(
        run_dir=run_dir, steps=step, best_val_loss=best_val, final_train_loss=losses["train"],
        final_val_loss=losses["val"], tokens_seen=tokens_seen, elapsed_sec=elapsed, num_params=n_params,
        step_seconds=step_seconds,
    )


def finish_run(run_dir: Path, model: GPT, tokenizer: Any, cfg: TrainConfig, say: Any) -> None:
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
