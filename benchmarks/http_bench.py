"""HTTP benchmark of the core: /health, /auth/me and login under load.

Starts SecantusDB and one uvicorn worker running `innova_server.asgi:app` as
separate processes, drives them from this process over loopback, and reports
requests/s, p50/p99 latency and MongoDB round trips per request (the server's
`innova_mongo_commands_total`, counted with PyMongo command monitoring).

    python benchmarks/http_bench.py [--seconds 10] [--concurrency 50]

Figures land in benchmarks/results/http.json. The load generator shares the
machine's cores with the server and the database: compare runs on one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from argon2 import PasswordHasher
from common import PASSWORD, mongo_commands, start_server, write_results

from innova_server.embedded import EmbeddedMongo, free_port
from innova_server.testing.server import wait_until_healthy


def summarize(latencies: list[float], errors: int, seconds: float) -> dict[str, Any]:
    ordered = sorted(latencies)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000 if ordered else float("nan")

    return {
        "requests": len(latencies),
        "errors": errors,
        "requests_per_s": round(len(latencies) / seconds, 1),
        "p50_ms": round(pct(0.50), 2),
        "p99_ms": round(pct(0.99), 2),
        "mean_ms": round(statistics.fmean(ordered) * 1000, 2) if ordered else None,
    }


async def load(
    request: Callable[[httpx.AsyncClient], Awaitable[httpx.Response]],
    client: httpx.AsyncClient,
    *,
    concurrency: int,
    seconds: float,
    expect: int = 200,
) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal errors
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                response = await request(client)
                ok = response.status_code == expect
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1

    started = time.monotonic()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return summarize(latencies, errors, time.monotonic() - started)


async def measure(url: str, name: str, request: Callable[[httpx.AsyncClient], Awaitable[httpx.Response]],
                  *, concurrency: int, seconds: float, cookies: dict[str, str] | None = None) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, cookies=cookies, timeout=30) as client:
        await load(request, client, concurrency=concurrency, seconds=1)  # warm up
        before = mongo_commands(url)
        result = await load(request, client, concurrency=concurrency, seconds=seconds)
        after = mongo_commands(url)
    result["mongo_round_trips_per_request"] = round((after - before) / max(1, result["requests"]), 3)
    result["concurrency"] = concurrency
    print(f"{name:<28} {result['requests_per_s']:>9.1f} req/s  p50 {result['p50_ms']:>7.2f} ms  "
          f"p99 {result['p99_ms']:>7.2f} ms  mongo/req {result['mongo_round_trips_per_request']:.2f}  "
          f"errors {result['errors']}")
    return result


async def bench(url: str, seconds: float, concurrency: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    register = httpx.post(f"{url}/auth/register", json={"email": "bench@example.com", "password": PASSWORD})
    cookie = register.cookies["innova_session"]

    results["health"] = await measure(url, "GET /health", lambda c: c.get("/health"),
                                      concurrency=concurrency, seconds=seconds)
    results["auth_me"] = await measure(url, "GET /auth/me", lambda c: c.get("/auth/me"),
                                       concurrency=concurrency, seconds=seconds, cookies={"innova_session": cookie})

    # Login throughput, and /health latency while logins saturate argon2.
    login_body = {"email": "bench@example.com", "password": PASSWORD}
    cores = os.cpu_count() or 1

    def login(c: httpx.AsyncClient) -> Awaitable[httpx.Response]:
        return c.post("/auth/login", json=login_body)

    results["login"] = await measure(url, "POST /auth/login", login, concurrency=2 * cores, seconds=seconds)

    async def health_during() -> dict[str, Any]:
        await asyncio.sleep(1.5)  # let the logins' warm-up pass
        return await measure(url, "GET /health during logins", lambda c: c.get("/health"),
                             concurrency=1, seconds=seconds - 1)

    # Both at once: the round-trip figures of this pair are mixed, the latencies are not.
    _, results["health_during_logins"] = await asyncio.gather(
        measure(url, "  (logins, concurrently)", login, concurrency=2 * cores, seconds=seconds), health_during()
    )
    results["health_during_logins"].pop("mongo_round_trips_per_request")

    # The ceiling: argon2 alone, verifying in as many threads as the server
    # would use (argon2 itself runs its lanes in parallel, so per-verify wall
    # time times cores would overstate it).
    hasher = PasswordHasher()  # the production parameters (settings' defaults)
    stored = hasher.hash(PASSWORD)
    runs = 8 * cores
    with ThreadPoolExecutor(2 * cores) as pool:
        started = time.perf_counter()
        list(pool.map(lambda _: hasher.verify(stored, PASSWORD), range(runs)))
        ceiling = runs / (time.perf_counter() - started)
    share = results["login"]["requests_per_s"] / ceiling
    results["argon2"] = {"cores": cores, "ceiling_verifies_per_s": round(ceiling, 1), "login_share": round(share, 3)}
    print(f"argon2id alone: {ceiling:.1f} verifies/s on {cores} cores; logins reach {share:.0%} of it")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="innova-bench-") as tmp, EmbeddedMongo(Path(tmp) / "db") as mongo:
        port = free_port()
        server = start_server(mongo.uri, port, "innova_bench")
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_healthy(url, process=server)
            results = asyncio.run(bench(url, args.seconds, args.concurrency))
        finally:
            server.terminate()
            server.wait(30)
    write_results("http", results, server="1 uvicorn worker", seconds=args.seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
