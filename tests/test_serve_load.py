"""`gptlab serve` under load, on loopback: 50 concurrent completions against two generations at a time.

With a queue of 64 every request is answered, and /health keeps answering meanwhile; with a queue
of 8 the excess is turned away with 429 and Retry-After, and the server stays up. Prints
requests/s and p50/p95 latency.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import statistics
import time

import httpx
import pytest

from tests.servers import Server, wait_idle

pytestmark = pytest.mark.slow

MODEL = "tiny"
REQUESTS = 50


@pytest.fixture(scope="module")
def servers(tiny_run):
    """Two servers, started side by side: queue 64 and queue 8, both with two generations at a time."""
    flags = {64: ("--concurrency", "2", "--queue-size", "64"), 8: ("--concurrency", "2", "--queue-size", "8")}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = {q: pool.submit(Server, str(tiny_run), *f) for q, f in flags.items()}
        started = {q: f.result() for q, f in futures.items()}
    yield started
    for server in started.values():
        server.stop()


async def load(url: str, max_tokens: int) -> tuple[list[httpx.Response], list[float], list[float], float]:
    """REQUESTS completions at once, and /health polled all along; (responses, latencies, health latencies, seconds)."""
    body = {"model": MODEL, "prompt": "ROMEO:", "max_tokens": max_tokens, "temperature": 0.8}
    limits = httpx.Limits(max_connections=REQUESTS + 5, max_keepalive_connections=REQUESTS + 5)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        done = asyncio.Event()
        health: list[float] = []

        async def poll_health() -> None:
            while not done.is_set():
                t = time.perf_counter()
                r = await http.get("/health", timeout=10)
                assert r.status_code == 200
                health.append(time.perf_counter() - t)
                await asyncio.sleep(0.05)

        async def one() -> tuple[httpx.Response, float]:
            t = time.perf_counter()
            r = await http.post("/v1/completions", json=body)
            return r, time.perf_counter() - t

        poller = asyncio.create_task(poll_health())
        start = time.perf_counter()
        results = await asyncio.gather(*(one() for _ in range(REQUESTS)))
        seconds = time.perf_counter() - start
        done.set()
        await poller
    return [r for r, _ in results], [t for _, t in results], health, seconds


def test_fifty_concurrent_requests_all_answered(servers):
    server = servers[64]
    responses, latencies, health, seconds = asyncio.run(load(server.url, 32))
    assert [r.status_code for r in responses] == [200] * REQUESTS
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == REQUESTS  # none lost, none answered twice
    for r in responses:
        body = r.json()
        assert body["usage"]["completion_tokens"] == 32 and len(body["choices"][0]["text"]) == 32
    assert len(health) >= 2 and max(health) < 2.0, health
    q = statistics.quantiles(latencies, n=20)
    print(f"\n{REQUESTS} requests x 32 tokens, concurrency 2, queue 64: {REQUESTS / seconds:.1f} requests/s, "
          f"p50 {statistics.median(latencies) * 1000:.0f} ms, p95 {q[18] * 1000:.0f} ms; "
          f"/health answered {len(health)} times meanwhile, slowest {max(health) * 1000:.0f} ms")
    wait_idle(server.url, MODEL)


def test_full_queue_answers_429_and_stays_up(servers):
    server = servers[8]
    # Longer generations than above, so the first ten are still running when the other forty arrive.
    responses, latencies, health, seconds = asyncio.run(load(server.url, 200))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429}, codes
    assert codes.count(200) >= 10, codes  # two running + eight waiting at least
    assert codes.count(429) > 0, codes
    for r in responses:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            error = r.json()["error"]
            assert error["code"] == "queue_full" and "busy" in error["message"]
        else:
            assert len(r.json()["choices"][0]["text"]) == 200
    print(f"\nqueue 8: {codes.count(200)} answered, {codes.count(429)} turned away with 429 in {seconds:.1f} s")
    assert health and max(health) < 2.0
    wait_idle(server.url, MODEL)
    after = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 3}, timeout=30)
    assert after.status_code == 200
