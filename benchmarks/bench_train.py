"""Training speed: gptlab's trainer against a nanoGPT-style reference loop, side by side, one machine.

Prints ms/iter, tokens/s and model FLOPs utilisation (MFU) for three shapes:
  recipe      nanoGPT's CPU recipe: 4 layers, 4 heads, 128 wide, context 64, batch 12, vocab 65
  char-small  6 layers, 6 heads, 384 wide, context 256, batch 64, vocab 65
  gpt2-124m   12 layers, 12 heads, 768 wide, vocab 50257, batch 4 x 128

MFU = (6 N + 12 L C T) FLOPs per token x tokens/s / peak, where the peak is this machine's float32
matmul rate, measured by the script itself (at the start and after each shape; the best reading
counts). The reference is written here the way nanoGPT's
train.py runs on a CPU: eager, float32, torch AdamW without fused or foreach kernels, nanoGPT's
get_batch (a fresh memmap and one slice per row), loss.item() every step. Each trainer runs in a
fresh process of its own, so neither inherits the other's heap or library settings. gptlab runs
twice: eagerly (its default for CPU runs shorter than 30 minutes) and with `--compile on`; the
compile happens in warm-up steps, which are not timed.

Where the CPU has bf16 instructions (AVX512-BF16, AMX), gptlab also runs eagerly under bf16
autocast (`--dtype bfloat16`), and its row gives its speed over gptlab's float32 row ("vs f32")
beside the probe's prediction for that width, which is what `--dtype auto` decides by (gptlab/cpu_bf16.py).
Without those instructions the row is skipped with a note: bf16 runs >100x slower there.

A shared machine's speed moves by 10-20% within seconds, so the trainers take turns (`--repeats`),
and each trainer's figure is its fastest run (the median step of that run): what it does when the
machine lets it. Every run's median is printed beside it.

    python benchmarks/bench_train.py                 # all shapes
    python benchmarks/bench_train.py --shapes recipe # one shape
    python benchmarks/bench_train.py --repeats 3     # alternate the trainers three times per shape
    python benchmarks/bench_train.py --compile off   # gptlab eagerly only
    python benchmarks/bench_train.py --dtype float32 # no bf16 autocast row
    python benchmarks/bench_train.py --shapes recipe --steps 20  # a quick look: fewer timed steps
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

TRAINER_COMPILED = "gptlab compiled"  # `gptlab train --compile on`
TRAINER_BF16 = "gptlab bf16"  # `gptlab train --dtype bfloat16`, eager
OURS = {"off": ["gptlab"], "on": [TRAINER_COMPILED], "both": ["gptlab", TRAINER_COMPILED]}  # by --compile

SHAPES = {
    "recipe": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, tokenizer="char", steps=150, warmup=15),
    "char-small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, tokenizer="char", steps=6, warmup=2),
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=128, batch_size=4, tokenizer="gpt2", steps=5, warmup=2),
}


def matmul_peak_gflops(n: int = 2048, reps: int = 6) -> float:
    """This machine's float32 matmul rate in GFLOP/s (best of `reps`)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


# ---- the reference: nanoGPT's model and loop, as it runs on a CPU ---------------------------------


class RefAttention(nn.Module):
    def __init__(self, c: dict) -> None:
        super().__init__()
        self.c_attn = nn.Linear(c["n_embd"], 3 * c["n_embd"], bias=c["bias"])
        self.c_proj = nn.Linear(c["n_embd"], c["n_embd"], bias=c["bias"])
        self.n_head, self.n_embd = c["n_head"], c["n_embd"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class RefBlock(nn.Module):
    def __init__(self, c: dict) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(c["n_embd"], bias=c["bias"])
        self.attn = RefAttention(c)
        self.ln_2 = nn.LayerNorm(c["n_embd"], bias=c["bias"])
        self.c_fc = nn.Linear(c["n_embd"], 4 * c["n_embd"], bias=c["bias"])
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * c["n_embd"], c["n_embd"], bias=c["bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(self.gelu(self.c_fc(self.ln_2(x))))


class RefGPT(nn.Module):
    def __init__(self, c: dict) -> None:
        super().__init__()
        self.wte = nn.Embedding(c["vocab_size"], c["n_embd"])
        self.wpe = nn.Embedding(c["block_size"], c["n_embd"])
        self.h = nn.ModuleList([RefBlock(c) for _ in range(c["n_layer"])])
        self.ln_f = nn.LayerNorm(c["n_embd"], bias=c["bias"])
        self.lm_head = nn.Linear(c["n_embd"], c["vocab_size"], bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.size(1), device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def reference_step_seconds(shape: dict, vocab_size: int, data_dir: Path, seed: int = 1337) -> list[float]:
    """Per-step wall time of the nanoGPT-style loop, its batch fetching included."""
    import numpy as np

    torch.manual_seed(seed)
    c = dict(shape, vocab_size=vocab_size, bias=shape["tokenizer"] == "gpt2")
    model = RefGPT(c)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=1e-3, betas=(0.9, 0.99), foreach=False, fused=False)
    dtype = np.dtype(json.loads((data_dir / "meta.json").read_text())["dtype"])
    block, batch = shape["block_size"], shape["batch_size"]

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        # as nanoGPT does it: a fresh memmap per batch, one slice per row, stacked
        data = np.memmap(data_dir / "train.bin", dtype=dtype, mode="r")
        ix = torch.randint(len(data) - block, (batch,))
        x = torch.stack([torch.from_numpy(data[i:i + block].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block].astype(np.int64)) for i in ix])
        return x, y

    times = []
    for _ in range(shape["warmup"] + shape["steps"]):
        t = time.perf_counter()
        x, y = get_batch()
        loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss.item()
        times.append(time.perf_counter() - t)
    return times[shape["warmup"]:]


def ours_step_seconds(shape: dict, data_dir: Path, out: Path, compile: str = "off", dtype: str = "float32") -> list[float]:
    """Per-step wall time of gptlab's own training loop (evaluation time and the warm-up steps, in
    which `torch.compile` does its work, excluded)."""
    from gptlab.config import resolve_config
    from gptlab.train import train

    overrides = dict(
        n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"], block_size=shape["block_size"],
        dropout=0.0, bias=shape["tokenizer"] == "gpt2", batch_size=shape["batch_size"], data=str(data_dir), out=str(out),
        max_iters=shape["warmup"] + shape["steps"], eval_interval=10**6, eval_iters=1, num_samples=0,
        compile=compile, dtype=dtype,
    )
    model_cfg, cfg = resolve_config(None, None, overrides)
    return train(model_cfg, cfg, quiet=True, overwrite=True).step_seconds[shape["warmup"]:]


def flops_per_token(shape: dict, vocab_size: int) -> int:
    """Training FLOPs per token of the model both trainers train at `shape`."""
    from gptlab.config import ModelConfig
    from gptlab.model import GPT

    config = ModelConfig(n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"],
                         block_size=shape["block_size"], vocab_size=vocab_size, bias=shape["tokenizer"] == "gpt2")
    with torch.device("meta"):  # the count needs the shapes only
        return GPT(config).flops_per_token()


def measure_in_child(trainer: str, name: str, data_dir: Path, tmp: Path, threads: int, steps: int | None) -> list[float]:
    """Run one trainer on one shape in a fresh process: neither inherits the other's heap or settings."""
    cmd = [sys.executable, __file__, "--child", trainer, "--shapes", name, "--data-dir", str(data_dir),
           "--tmp", str(tmp), "--threads", str(threads), *(["--steps", str(steps)] if steps else [])]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["times"]


def vocab_size(data_dir: Path) -> int:
    return json.loads((data_dir / "meta.json").read_text())["vocab_size"]


def child(trainer: str, name: str, data_dir: Path, tmp: Path, steps: int | None) -> int:
    shape = dict(SHAPES[name], **({"steps": steps} if steps else {}))
    if trainer == "nanoGPT":
        times = reference_step_seconds(shape, vocab_size(data_dir), data_dir)
    else:
        times = ours_step_seconds(shape, data_dir, tmp / f"run-{name}", "on" if trainer == TRAINER_COMPILED else "off",
                                  "bfloat16" if trainer == TRAINER_BF16 else "float32")
    print(json.dumps({"times": times}))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=1,
                        help="alternate the trainers this many times per shape; each trainer's fastest run counts")
    parser.add_argument("--compile", choices=list(OURS), default="both",
                        help="gptlab eagerly, with --compile on, or both (default), each its own row")
    parser.add_argument("--steps", type=int, help="timed steps per run (default: each shape's own)")
    parser.add_argument("--dtype", choices=["float32", "both"], default="both",
                        help="gptlab in float32 only, or also eagerly under bf16 autocast (default; CPUs with bf16 only)")
    parser.add_argument("--child", choices=["gptlab", TRAINER_COMPILED, TRAINER_BF16, "nanoGPT"], help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tmp", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        return child(args.child, args.shapes[0], args.data_dir, args.tmp, args.steps)

    from gptlab.cpu_bf16 import bf16_speedup, cpu_has_native_bf16, detect_cpu_bf16
    from gptlab.data import prepare

    peak = matmul_peak_gflops()
    print(f"torch {torch.__version__}, {args.threads} threads, float32 matmul peak {peak:,.0f} GFLOP/s (measured)")
    print("each trainer runs in its own process; the ratio is gptlab's tokens/s over the reference's")
    bf16 = args.dtype == "both" and cpu_has_native_bf16()
    if args.dtype == "both" and not bf16:
        print(f"no bf16 autocast row: {detect_cpu_bf16().why_not_native()}")
    print()
    header = f"{'shape':<11} {'trainer':<16} {'ms/iter':>9} {'tokens/s':>10} {'MFU':>6}   ratio  vs f32  (ms/iter of each run)"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        prepared: dict[str, Path] = {}
        for name in args.shapes:
            shape = SHAPES[name]
            kind = shape["tokenizer"]
            if kind not in prepared:
                prepared[kind] = prepare(["shakespeare"], kind, tmp / f"data-{kind}", log=lambda *a: None)
            trainers = ["nanoGPT", *OURS[args.compile], *([TRAINER_BF16] if bf16 else [])]
            run_medians: dict[str, list[float]] = {trainer: [] for trainer in trainers}
            for _ in range(args.repeats):
                for trainer in trainers:
                    times = measure_in_child(trainer, name, prepared[kind], tmp, args.threads, args.steps)
                    run_medians[trainer].append(statistics.median(times))
            flops = flops_per_token(shape, vocab_size(prepared[kind]))
            tokens_per_step = shape["batch_size"] * shape["block_size"]
            rows = []
            # the peak moves with the machine's load too: its best reading so far counts
            peak = max(peak, matmul_peak_gflops())
            for label in trainers:
                step = min(run_medians[label])
                tps = tokens_per_step / step
                rows.append((label, step, tps, flops * tps / (peak * 1e9)))
            float32_tps = {label: tps for label, _, tps, _ in rows}.get("gptlab")
            for label, step, tps, mfu in rows:
                ratio = f"{tps / rows[0][2]:.2f}x" if label != "nanoGPT" else ""
                vs_f32 = f"{tps / float32_tps:.2f}x" if label == TRAINER_BF16 and float32_tps else ""
                runs = " ".join(f"{m * 1e3:.1f}" for m in run_medians[label])
                print(f"{name:<11} {label:<16} {step * 1e3:>9.1f} {tps:>10,.0f} {mfu:>6.1%}   {ratio:<6} {vs_f32:<6}  "
                      f"runs: {runs}")
            print(f"{'':<11} (MFU against the best peak measured so far: {peak:,.0f} GFLOP/s)")
            if bf16:
                probe, _ = bf16_speedup(shape["n_embd"])
                print(f"{'':<11} (the probe --dtype auto decides by: bf16 autocast {probe.speedup:.2f}x float32 "
                      f"at width {probe.width})")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
