"""`gptlab serve` under concurrent streaming clients, on loopback: total tokens/s and time to first token.

    .venv/bin/python benchmarks/bench_serve.py                          # tiny and GPT-2 124M, 1/4/16/64 clients
    .venv/bin/python benchmarks/bench_serve.py --sizes gpt2-124m --clients 1,16 --quantize int8

For each model size a real `gptlab serve` process is started on 127.0.0.1 (its own process, so the
clients' Python does not share its interpreter), with room for every client at once
(`--concurrency` and `--queue-size` at the largest client count). Each client streams
`/v1/completions` requests one after another (temperature 1, top-k 50, a fixed number of tokens per
request, never stopped early), for a fixed number of requests per client: the load is bounded, and
every client makes the same amount of work. Reported per client count: total new tokens per second
over the wall-clock of the whole round, time to first token (p50/p95, from sending a request to its
first text), the most rows seen in the server's batch (`/health`, polled), and the total against
one client's.

Sizes: tiny is the cpu-tiny shape trained briefly on tiny Shakespeare (characters; the text comes
from --text, else the named dataset); gpt2-124m is GPT-2 small with random weights and GPT-2's
tokenizer (its text is noise; speed does not depend on the weights). The server gets --threads
cores (default: all); the clients run in this process with asyncio and httpx.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

SIZES = {"tiny": 200, "gpt2-124m": 48}  # new tokens per request


def make_tiny(folder: Path, text: str | None) -> Path:
    """A cpu-tiny char run trained for 150 steps."""
    run = folder / "tiny"
    source = [text] if text else ["shakespeare"]
    subprocess.run([sys.executable, "-m", "gptlab", "train", *source, "--preset", "cpu-tiny", "--max-iters", "150",
                    "--eval-interval", "150", "--eval-iters", "2", "--num-samples", "0", "--out", str(run), "--quiet"],
                   check=True, cwd=folder)
    return run


def make_gpt2(folder: Path) -> Path:
    """GPT-2 124M with random weights and GPT-2's tokenizer, as a run folder."""
    import torch

    from gptlab import rundir
    from gptlab.checkpoint import save_weights
    from gptlab.config import ModelConfig, TrainConfig
    from gptlab.model import build_model
    from gptlab.tokenizer import GPT2Tokenizer

    run = folder / "gpt2-124m"
    run.mkdir()
    torch.manual_seed(0)
    config = ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, bias=True,
                         gelu_approximate="tanh")
    tokenizer = GPT2Tokenizer.build()
    tokenizer.save(run)
    rundir.write_run_config(run, config, TrainConfig(), {"type": "gpt2", "vocab_size": tokenizer.vocab_size})
    save_weights(run / rundir.BEST, build_model(config))
    return run


def start_server(run: Path, clients: int, threads: int, quantize: str) -> tuple[subprocess.Popen, str]:
    """`gptlab serve RUN` on a free port, waited for until /health answers; (process, base url)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptlab", "serve", str(run), "--port", "0", "--concurrency", str(clients),
         "--queue-size", str(clients), "--max-new-tokens-limit", "4096", "--quantize", quantize],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = None
    for line in proc.stdout:  # the banner names the address
        if "http://127.0.0.1:" in line:
            url = "http://127.0.0.1:" + line.split("http://127.0.0.1:")[1].split("/")[0].split()[0]
            break
    if url is None:
        proc.kill()
        raise SystemExit(f"the server did not start:\n{proc.stdout.read() if proc.stdout else ''}")
    for _ in range(600):
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not answer /health")


async def one_round(url: str, model: str, clients: int, requests: int, tokens: int) -> tuple[float, list[float], int]:
    """Every client streams `requests` completions in turn; (total tokens/s, first-token seconds, most rows seen in a batch)."""
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    first: list[float] = []
    made = 0
    widest = 0
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        done = asyncio.Event()

        async def watch() -> None:  # the batch's width, from /health, a few times a second
            nonlocal widest
            while not done.is_set():
                stats = (await http.get("/health")).json()["models"][model]
                widest = max(widest, stats.get("batch_rows", 0))
                await asyncio.sleep(0.2)

        async def client(number: int) -> None:
            nonlocal made
            for r in range(requests):
                body = {"model": model, "prompt": "\n", "max_tokens": tokens, "temperature": 1.0, "top_k": 50,
                        "stream": True, "seed": number * 1000 + r, "stream_options": {"include_usage": True}}
                sent = time.perf_counter()
                seen_first = False
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    assert response.status_code == 200, await response.aread()
                    async for line in response.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        event = json.loads(line[6:])
                        if event.get("usage"):
                            made += event["usage"]["completion_tokens"]
                        if not seen_first and event.get("choices") and event["choices"][0].get("text"):
                            first.append(time.perf_counter() - sent)
                            seen_first = True

        watcher = asyncio.create_task(watch())
        start = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        seconds = time.perf_counter() - start
        done.set()
        await watcher
    return made / seconds, first, widest


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,gpt2-124m", help="comma-separated: tiny, gpt2-124m")
    parser.add_argument("--clients", default="1,4,16,64", help="concurrent clients, comma-separated")
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after another (default: 2)")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per request (default: 200 tiny, 48 gpt2-124m)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores for the server (default: all)")
    parser.add_argument("--quantize", default="none", help="the server's --quantize: none, bf16 or int8")
    parser.add_argument("--text", default=None, help="text to train the tiny model on (default: the shakespeare dataset)")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    print(f"gptlab serve on 127.0.0.1, {args.threads} server threads, weights {args.quantize}; each client streams "
          f"{args.requests} requests in turn")
    with tempfile.TemporaryDirectory() as folder:
        for size in args.sizes.split(","):
            run = make_tiny(Path(folder), args.text) if size == "tiny" else make_gpt2(Path(folder))
            tokens = args.tokens or SIZES[size]
            proc, url = start_server(run, max(counts), args.threads, args.quantize)
            try:
                asyncio.run(one_round(url, run.name, 1, 1, 8))  # warm-up: loads pages, starts the decoder
                print(f"\n{size}: {tokens} new tokens per request")
                print(f"  {'clients':>7}  {'tokens/s':>9}  {'x one':>6}  {'first token p50 / p95':>22}  {'batch rows':>10}")
                single = None
                for clients in counts:
                    rate, first, widest = asyncio.run(one_round(url, run.name, clients, args.requests, tokens))
                    single = single or rate
                    print(f"  {clients:>7}  {rate:>9,.1f}  {rate / single:>5.2f}x  "
                          f"{percentile(first, 0.5) * 1000:>9,.0f} / {percentile(first, 0.95) * 1000:>6,.0f} ms  "
                          f"{widest:>10}")
            finally:
                proc.terminate()
                proc.wait(timeout=30)


if __name__ == "__main__":
    main()
