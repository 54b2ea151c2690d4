"""New tokens per second at batch 1 on the CPU: our KV-cached engine, recompute-everything, and Hugging Face.

    .venv/bin/python benchmarks/bench_generate.py                 # both sizes, 2 threads
    .venv/bin/python benchmarks/bench_generate.py --sizes tiny-char --runs 5

Columns, all from the same random weights, sampling at temperature 1 with top-k 50:
- engine: `gptlab.engine.decode` (prefill once, preallocated KV cache, flat decode path).
- recompute: nanoGPT's generate, written out below: the whole window runs through the model for
  every token, and only the last position goes through the output head (as nanoGPT does).
- llama.cpp (gpt2-124m only, GGUF needs a byte-level BPE vocabulary): the same weights written by
  `gptlab export --format gguf` as f32, f16 and q8_0 and decoded by llama-cpp-python at the same
  thread count, one token at a time from end-of-text (sampling top-k 50, temperature 1). Skipped
  with a note when llama-cpp-python is not installed.
- hf: transformers' GPT2LMHeadModel.generate(use_cache=True, do_sample=True, top_k=50) with our
  weights copied in (Conv1D weights are our Linear weights transposed; missing biases are zeros).
  Skipped with a note when transformers is not installed (it is not a gptlab dependency). GPT-2's
  learned positions stop at the context length, so on the tiny-char shape (context 64) it makes
  only as many tokens as fit, and the row says so.
- engine, bf16 / int8 weights: the same engine and weights decoding with `--quantize bf16` (the
  model cast to bfloat16) and `--quantize int8` (per-channel int8 rows, gptlab/quantize.py).
Quality: the val loss and perplexity of a trained run (`gptlab train shakespeare --time 2m`, or
--quality-run) with float32, bf16 and int8 weights, as `gptlab eval --quantize`
scores them.
Sizes: tiny-char is the cpu-tiny preset's shape with the tiny Shakespeare char vocabulary (500 new
tokens from a 1-token prompt: past the context, so the engine's window slides); gpt2-124m is GPT-2
small, random init (200 new tokens from a 1-token prompt). Each figure is the median of --runs
timed runs after one warm-up. On a machine shared with other work the figures move a lot: run it
twice and compare.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F

from gptlab.config import ModelConfig, SampleConfig
from gptlab.engine import decode, decode_threads, make_generator
from gptlab.model import GPT
from gptlab.quantize import quantize_model_

SIZES = {
    "tiny-char": (dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, bias=False), 500),
    "gpt2-124m": (dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, bias=True,
                       gelu_approximate="tanh"), 200),
}
TOP_K = 50


@torch.no_grad()
def recompute_generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, top_k: int = TOP_K) -> torch.Tensor:
    """nanoGPT's generate: crop to the context, run it all, sample from the last position, append."""
    t = model.transformer
    for _ in range(max_new_tokens):
        idx_cond = idx if idx.size(1) <= model.config.block_size else idx[:, -model.config.block_size :]
        pos = torch.arange(idx_cond.size(1), device=idx.device)
        x = t.drop(t.wte(idx_cond) + t.wpe(pos))
        for block in t.h:
            x = block(x)
        logits = model.lm_head(t.ln_f(x)[:, [-1], :])[:, -1, :]  # nanoGPT's inference-time head
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("Inf")
        probs = F.softmax(logits, dim=-1)
        idx_next = torch.multinomial(probs, num_samples=1)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


def to_hf(model: GPT):  # type: ignore[no-untyped-def]
    """A transformers GPT2LMHeadModel holding the same weights as `model`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hf_config = GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        activation_function="gelu_new" if c.gelu_approximate == "tanh" else "gelu", resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=None, pad_token_id=0,
    )
    hf = GPT2LMHeadModel(hf_config).eval()
    ours = model.state_dict()
    with torch.no_grad():
        for name, tensor in hf.state_dict().items():
            if name.endswith(".attn.bias") or name.endswith(".attn.masked_bias"):
                continue  # causal-mask buffers in older transformers versions
            source = ours.get(name)
            if source is None:  # a bias our bias=False model does not have
                tensor.zero_()
            elif any(name.endswith(s) for s in ("c_attn.weight", "c_proj.weight", "c_fc.weight")):
                tensor.copy_(source.t())  # Conv1D stores (in, out)
            else:
                tensor.copy_(source)
    return hf


def timed(fn: Callable[[], object], runs: int) -> float:
    """Median seconds of `runs` calls of `fn`, after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_size(name: str, runs: int, threads: int | None) -> list[tuple[str, str]]:
    """(column, figure) for one size."""
    settings, new_tokens = SIZES[name]
    torch.manual_seed(0)
    model = GPT(ModelConfig(**settings)).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    rows = []

    def engine() -> None:
        config = SampleConfig(max_new_tokens=new_tokens, temperature=1.0, top_k=TOP_K)
        for _ in decode(model, prompt, config, make_generator("cpu", 0), threads=threads):
            pass

    seconds = timed(engine, runs)
    engine_threads = decode_threads(model) if threads is None else threads
    rows.append(("engine (KV cache)", f"{new_tokens / seconds:,.1f} tok/s  ({engine_threads} thread{'s' * (engine_threads > 1)})"))
    for kind in ("bf16", "int8"):
        quantized = quantize_model_(copy.deepcopy(model), kind)

        def engine_with(quantized=quantized) -> None:
            config = SampleConfig(max_new_tokens=new_tokens, temperature=1.0, top_k=TOP_K)
            for _ in decode(quantized, prompt, config, make_generator("cpu", 0), threads=threads):
                pass

        seconds = timed(engine_with, runs)
        rows.append((f"engine, {kind} weights", f"{new_tokens / seconds:,.1f} tok/s"))
        del quantized
    seconds = timed(lambda: recompute_generate(model, prompt, new_tokens), max(1, runs if name == "tiny-char" else 1))
    rows.append(("recompute (nanoGPT generate)", f"{new_tokens / seconds:,.1f} tok/s"))
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("note: transformers is not installed, so the Hugging Face column is skipped (pip install transformers)")
        rows.append(("hf GPT2LMHeadModel.generate", "skipped (no transformers)"))
        return rows
    hf = to_hf(model)
    hf_tokens = min(new_tokens, settings["block_size"] - prompt.size(1))
    with torch.no_grad():  # same function, same weights: the logits must agree
        ids = torch.randint(0, settings["vocab_size"], (1, min(16, settings["block_size"])))
        gap = (hf(ids).logits - model(ids)).abs().max().item()
    assert gap < 1e-3, f"Hugging Face copy differs from our model by {gap}"

    def hf_generate() -> None:
        with torch.no_grad():
            hf.generate(prompt, max_new_tokens=hf_tokens, min_new_tokens=hf_tokens, do_sample=True, top_k=TOP_K,
                        use_cache=True, pad_token_id=0)

    seconds = timed(hf_generate, runs)
    note = f"  ({hf_tokens} tokens: its context ends there)" if hf_tokens < new_tokens else ""
    rows.append(("hf GPT2LMHeadModel.generate", f"{hf_tokens / seconds:,.1f} tok/s{note}"))
    return rows


def decode_with(llm, start: int, new_tokens: int) -> None:  # type: ignore[no-untyped-def]
    """`new_tokens` tokens from llama.cpp, one at a time after `start` (end-of-text does not stop it)."""
    llm.reset()
    for count, _ in enumerate(llm.generate([start], top_k=TOP_K, temp=1.0), 1):
        if count == new_tokens:
            break


def llama_cpp_rows(model: GPT, new_tokens: int, runs: int, threads: int) -> list[tuple[str, str]]:
    """llama.cpp (through llama-cpp-python) on the same weights, exported by `gptlab export --format gguf`."""
    import tempfile
    from pathlib import Path

    try:
        import llama_cpp
    except ImportError:
        return [("llama.cpp", "skipped (pip install llama-cpp-python)")]
    from gptlab.config import TrainConfig
    from gptlab.hf.gguf import write_gguf
    from gptlab.hf.source import ExportSource
    from gptlab.tokenizer import GPT2Tokenizer

    tokenizer = GPT2Tokenizer.build()  # GGUF carries a byte-level BPE vocabulary: GPT-2's fits the gpt2-124m shape
    src = ExportSource(Path("."), model.config, TrainConfig(), tokenizer, "gpt2", model, Path("random.safetensors"),
                       "bench")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for outtype in ("f32", "f16", "q8_0"):
            path = Path(folder) / f"bench-{outtype}.gguf"
            write_gguf(src, path, outtype)
            llm = llama_cpp.Llama(str(path), n_ctx=model.config.block_size, n_threads=threads,
                                  n_threads_batch=threads, n_batch=64, verbose=False, seed=0)

            seconds = timed(lambda llm=llm: decode_with(llm, tokenizer.eot_id, new_tokens), runs)
            rows.append((f"llama.cpp {outtype} ({path.stat().st_size / 1e6:,.0f} MB)", f"{new_tokens / seconds:,.1f} tok/s"))
            del llm
    return rows


def quality_rows(run: str | None, train_time: str) -> list[tuple[str, str]]:
    """Val loss and perplexity of a trained run with float32, bf16 and int8 weights (`gptlab train
    shakespeare --time TRAIN_TIME` when no run is given)."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from gptlab.evaluate import evaluate
    from gptlab.generation import load

    with tempfile.TemporaryDirectory() as folder:
        if run is None:
            run = str(Path(folder) / "runs" / "shakespeare")  # runs/NAME: its data folder is found beside runs/
            trained = subprocess.run([sys.executable, "-m", "gptlab", "train", "shakespeare", "--time", train_time,
                                      "--out", run, "--quiet"], cwd=folder)
            if trained.returncode != 0:  # its one-line reason is on stderr already (offline, say)
                return [("skipped", "the training run failed (above); give --quality-run RUN or --quality-time 0")]
        rows, base = [], None
        for kind in ("none", "bf16", "int8"):
            result = evaluate(load(run, device="cpu", quantize=kind), progress=False)
            base = base or result
            rows.append((f"{'float32' if kind == 'none' else kind} weights",
                         f"val loss {result.loss:.4f} ({result.loss - base.loss:+.4f}), perplexity "
                         f"{result.perplexity:.3f} ({100 * (result.perplexity / base.perplexity - 1):+.2f}%)"))
        return rows


def main() -> None:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny-char,gpt2-124m", help="comma-separated: tiny-char, gpt2-124m")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default: 2)")
    parser.add_argument("--engine-threads", type=int, default=None,
                        help="force the engine's decode threads (default: its own choice, see engine.decode_threads)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per figure, median reported (default: 3)")
    parser.add_argument("--quality-run", default=None, metavar="RUN",
                        help="a trained run to measure the weights' quality cost on (default: train one)")
    parser.add_argument("--quality-time", default="2m",
                        help="how long to train the Shakespeare model for the quality rows (default: 2m; 0 skips them)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"batch 1, CPU, torch {torch.__version__}, {args.threads} threads, temperature 1, top-k {TOP_K}")
    for name in filter(None, args.sizes.split(",")):  # --sizes '' measures the quality rows only
        settings, new_tokens = SIZES[name]
        print(f"\n{name}: {settings['n_layer']} layers, {settings['n_head']} heads, {settings['n_embd']} wide, "
              f"context {settings['block_size']}, vocab {settings['vocab_size']:,}; {new_tokens} new tokens")
        for column, figure in bench_size(name, args.runs, args.engine_threads):
            print(f"  {column:<30} {figure}")
        if settings["vocab_size"] == 50257:  # a GPT-2 vocabulary: the GGUF export can carry it
            torch.manual_seed(0)
            model = GPT(ModelConfig(**settings)).eval()  # the same weights bench_size used
            for column, figure in llama_cpp_rows(model, new_tokens, args.runs, args.threads):
                print(f"  {column:<30} {figure}")
    if args.quality_run or args.quality_time not in ("0", "0s", "0m"):
        print("\nquality of the decode weights: val loss and perplexity on the run's val split "
              f"({args.quality_run or 'gptlab train shakespeare --time ' + args.quality_time})")
        for column, figure in quality_rows(args.quality_run, args.quality_time):
            print(f"  {column:<30} {figure}")


if __name__ == "__main__":
    main()
