"""GPU training figures: bf16 matmul peak, GPT-2 124M MFU, and nanoGPT's Shakespeare-char recipe against the clock.

    python benchmarks/bench_gpu.py                    # everything
    python benchmarks/bench_gpu.py --parts mfu        # one part: peak, mfu, char

Parts:
  peak  the bf16 dense matmul rate of this GPU, measured (8192 x 8192 x 8192)
  mfu   gptlab's trainer on GPT-2 124M at batch 16 x 1024 (bf16 autocast, torch.compile, fused AdamW,
        flash attention through SDPA, TF32, vocab padded to a multiple of 64): ms/step, tokens/s and
        MFU = 6 N + attention FLOPs per token x tokens/s over the spec peak (989 TFLOP/s on an H100
        SXM) and over the measured peak
  char  nanoGPT's train_shakespeare_char config (6/6/384, context 256, batch 64, 5000 steps,
        dropout 0.2, lr 1e-3): training seconds (evaluation excluded), compile included, and the
        val loss at the end and when it first reached 1.47

Needs a CUDA GPU; on a machine without one it says so and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def bf16_peak_tflops(n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def mfu_part(tmp: Path, spec_peak: float, measured_peak: float | None, steps: int, gpt2_data: Path | None) -> None:
    from gptlab.config import ModelConfig, resolve_config
    from gptlab.data import prepare
    from gptlab.model import GPT
    from gptlab.train import train

    data = gpt2_data or prepare(["shakespeare"], "gpt2", tmp / "data-gpt2", log=lambda *a: None)
    model_cfg, cfg = resolve_config("gpt2-124m", None, dict(
        data=str(data), out=str(tmp / "run-124m"), batch_size=16, grad_accum=1, max_iters=steps,
        eval_interval=10**6, eval_iters=1, num_samples=0, warmup_iters=10, dropout=0.0,
    ))
    result = train(model_cfg, cfg, quiet=True, overwrite=True)
    steady = result.step_seconds[len(result.step_seconds) // 2:]  # compile and warm-up are in the first half
    step = statistics.median(steady)
    tokens = 16 * 1024
    flops_per_token = GPT(ModelConfig(**{**model_cfg.__dict__, "vocab_size": 50257})).flops_per_token()
    achieved = flops_per_token * tokens / step / 1e12
    print(f"gpt2-124m, batch 16 x 1024, bf16, compiled: {step * 1e3:.1f} ms/step, {tokens / step:,.0f} tokens/s, "
          f"{achieved:.0f} TFLOP/s = MFU {achieved / spec_peak:.1%} of the {spec_peak:.0f} TFLOP/s spec"
          + (f", {achieved / measured_peak:.1%} of the measured {measured_peak:.0f}" if measured_peak else ""))
    print(f"  first step (compile): {result.step_seconds[0]:.1f} s")


def char_part(tmp: Path, eval_interval: int, eval_iters: int) -> None:
    from gptlab.config import resolve_config
    from gptlab.data import prepare
    from gptlab.train import train

    data = prepare(["shakespeare"], "char", tmp / "data-char", log=lambda *a: None)
    model_cfg, cfg = resolve_config("char-small", None, dict(
        data=str(data), out=str(tmp / "run-char"), eval_interval=eval_interval, eval_iters=eval_iters, num_samples=0,
    ))
    t = time.perf_counter()
    result = train(model_cfg, cfg, quiet=True, overwrite=True)
    wall = time.perf_counter() - t
    with open(Path(result.run_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    train_seconds = sum(result.step_seconds)
    first = next((r for r in rows if float(r["val_loss"]) <= 1.47), None)
    print(f"char-small (nanoGPT train_shakespeare_char), {result.steps} steps: {train_seconds:.1f} s of training steps "
          f"(compile included; first step {result.step_seconds[0]:.1f} s), {result.elapsed_sec:.1f} s with "
          f"evaluation every {eval_interval} steps x {eval_iters} batches, {wall:.1f} s wall in all")
    print(f"  final val {result.final_val_loss:.4f}, best val {result.best_val_loss:.4f}; "
          + (f"val <= 1.47 first at step {first['step']} ({float(first['elapsed_sec']):.1f} s elapsed)" if first
             else "val 1.47 not reached"))
    for r in rows:
        print(f"  step {r['step']:>5}  train {float(r['train_loss']):.4f}  val {float(r['val_loss']):.4f}  "
              f"elapsed {float(r['elapsed_sec']):6.1f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["peak", "mfu", "char"], choices=["peak", "mfu", "char"])
    parser.add_argument("--spec-peak", type=float, default=989.0, help="the GPU's dense bf16 TFLOP/s (H100 SXM: 989)")
    parser.add_argument("--mfu-steps", type=int, default=40)
    parser.add_argument("--gpt2-data", type=Path, help="a prepared gpt2 data folder to use instead of preparing one")
    parser.add_argument("--eval-interval", type=int, default=500)
    parser.add_argument("--eval-iters", type=int, default=100)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU here; nothing to measure")
        return 0
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    sys.stdout.flush()
    measured = None
    if "peak" in args.parts:
        measured = bf16_peak_tflops()
        print(f"bf16 matmul peak, measured: {measured:.0f} TFLOP/s")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if "mfu" in args.parts:
            mfu_part(tmp, args.spec_peak, measured, args.mfu_steps, args.gpt2_data)
            sys.stdout.flush()
        if "char" in args.parts:
            char_part(tmp, args.eval_interval, args.eval_iters)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
