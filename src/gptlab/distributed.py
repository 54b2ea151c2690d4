"""Several processes training one model: the process group, rank helpers, and the launcher.

Design choices:
- torchrun (torch.distributed.run) starts one process per device and puts RANK, LOCAL_RANK,
  WORLD_SIZE and the rendezvous address in the environment. Everything here reads that environment;
  without it every helper is a no-op, so one process trains exactly as it always did.
- NCCL carries CUDA tensors and gloo CPU tensors ("cpu:gloo,cuda:nccl" when CUDA is present), so
  the small agreements below (stop flags, clocks, losses, RNG states) never touch the GPU.
- Rank 0 is the main process: it alone prints and writes files. Every rank evaluates its share of
  the evaluation batches and the mean is all-reduced, so the figures are those of the whole batch.
- Per-rank seeds come from `numpy.random.SeedSequence([seed, rank])`: well mixed, reproducible,
  and unrelated to the stream that initialised the weights.
- `gptlab train --nproc N` re-runs the same command under `python -m gptlab.distributed`, a thin
  wrapper of torch.distributed.run that returns a failed rank's exit code instead of printing
  torchrun's failure report (the rank has already printed its one-line error).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

from gptlab.errors import GptlabError


def launched() -> bool:
    """Whether torchrun started this process (its environment is set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def rank() -> int:
    """This process's global rank (0 when not distributed)."""
    return int(os.environ.get("RANK", 0)) if launched() else 0


def local_rank() -> int:
    """This process's rank on its machine, which picks its GPU."""
    return int(os.environ.get("LOCAL_RANK", 0)) if launched() else 0


def world_size() -> int:
    """How many processes train together (1 when not distributed)."""
    return int(os.environ.get("WORLD_SIZE", 1)) if launched() else 1


def is_main() -> bool:
    """Whether this is rank 0, the process that prints and writes files."""
    return rank() == 0


def _active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def init() -> None:
    """Join the process group torchrun set up (idempotent; nothing to do without torchrun)."""
    if world_size() == 1:
        return
    import torch
    import torch.distributed as dist

    if _active():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank() % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)


def teardown() -> None:
    """Leave the process group (at the end of training)."""
    if _active():
        import torch.distributed as dist

        dist.destroy_process_group()


def device_for_rank(device: Any) -> Any:
    """The device this rank trains on: cuda:LOCAL_RANK for CUDA, the device itself otherwise."""
    import torch

    if world_size() == 1:
        return device
    if device.type == "cuda":
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    if device.type != "cpu":
        raise GptlabError(f"training in several processes works on CUDA GPUs or the CPU, not {device.type}; "
                          "use --device cuda or --device cpu, or train in one process")
    return device


def wrap(model: Any, device: Any) -> Any:
    """The model in DistributedDataParallel when distributed (gradients averaged over ranks), else itself."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(model: Any, sync: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce on the inner steps of gradient accumulation."""
    if not sync and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def rank_seed(seed: int) -> int:
    """A seed for this rank's own randomness (dropout), derived from the run seed and the rank."""
    import numpy as np

    return int(np.random.SeedSequence([seed, rank()]).generate_state(1, np.uint64)[0] % 2**63)


def barrier() -> None:
    """Wait until every rank gets here."""
    if _active():
        _all_reduce_cpu([0.0])


def _all_reduce_cpu(values: list[float]) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def mean(value: float) -> float:
    """The mean of a number over every rank."""
    if not _active():
        return value
    return _all_reduce_cpu([value])[0] / world_size()


def agree(main_value: float, any_flag: bool) -> tuple[float, bool]:
    """Rank 0's `main_value` (e.g. its clock) and whether any rank raised `any_flag`, in one all-reduce."""
    if not _active():
        return main_value, any_flag
    total, flags = _all_reduce_cpu([main_value if is_main() else 0.0, float(any_flag)])
    return total, flags > 0


def all_ranks(flag: bool) -> bool:
    """True only if `flag` is true on every rank."""
    if not _active():
        return flag
    return _all_reduce_cpu([float(not flag)])[0] == 0


def gather(obj: Any) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere); [obj] when not distributed."""
    if not _active():
        return [obj]
    import torch.distributed as dist

    out: list[Any] | None = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0)
    return out


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """Run the block on rank 0 first, then on the others (so rank 0 prepares data the others reuse)."""
    init()
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


# --------------------------------------------------------------------------------------------------
# gptlab train --nproc N


def launch(nproc: int | None, argv: list[str], nnodes: int | None = None, rdzv_endpoint: str | None = None) -> int:
    """Run `gptlab ARGV` in `nproc` processes per machine through torchrun; returns its exit code."""
    if nproc is None:
        raise GptlabError("--nnodes and --rdzv-endpoint go with --nproc N (processes per machine)")
    if nproc < 1:
        raise GptlabError(f"--nproc must be a positive integer (processes per machine), got {nproc}")
    nnodes = 1 if nnodes is None else nnodes
    if nnodes < 1:
        raise GptlabError(f"--nnodes must be a positive integer (machines), got {nnodes}")
    if nnodes > 1 and not rdzv_endpoint:
        raise GptlabError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT, the same on every machine")
    if nnodes == 1 and not rdzv_endpoint:
        rendezvous = ["--standalone"]  # a free local port, so two runs on one machine never collide
    else:
        rendezvous = ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", str(rdzv_endpoint),
                      "--rdzv-id", "gptlab"]
    cmd = [sys.executable, "-m", "gptlab.distributed", "--nproc-per-node", str(nproc), *rendezvous, "--", *argv]
    env = dict(os.environ)
    # CPU ranks share the cores; torchrun would otherwise set 1 thread each and say so.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    proc = subprocess.Popen(cmd, env=env)
    # Ctrl-C reaches torchrun from the terminal, and torchrun stops the ranks (they save and exit);
    # a SIGTERM sent to this process alone is passed on.
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),
                signal.SIGTERM: signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _torchrun(argv: list[str]) -> int:
    """`TORCHRUN_FLAGS -- GPTLAB_ARGS`: torch.distributed.run of `python -m gptlab GPTLAB_ARGS`.

    A failed rank is reported by its exit code, not torchrun's failure report (the rank has printed
    its error). The gptlab arguments bypass torchrun's parser, which would take `--nproc` for an
    ambiguous abbreviation of its own `--nproc-per-node`.
    """
    os.environ.setdefault("LOGLEVEL", "CRITICAL")  # read when torch.distributed.elastic creates its loggers
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    split = argv.index("--")
    args = parse_args([*argv[:split], "-m", "gptlab"])
    args.training_script_args = argv[split + 1 :]
    try:
        run(args)
    except ChildFailedError as e:
        code = e.get_first_failure()[1].exitcode
        return code if code > 0 else 128 - code
    except SignalException:
        return 130  # the ranks saved their state and stopped, as one process does on Ctrl-C
    return 0


if __name__ == "__main__":
    raise SystemExit(_torchrun(sys.argv[1:]))
