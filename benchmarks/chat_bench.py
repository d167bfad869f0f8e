"""Chat benchmark: the Chatlaya streaming path with the echo provider.

Starts SecantusDB and uvicorn workers running `innova_server.asgi:app` as
separate processes and drives them over loopback with httpx-sse:

- time to first token (request sent → first `token` event), short messages;
- time per token (1000- vs 10-word replies with ECHO_DELAY_MS=0), from the
  server's own response-time histogram and as the client sees it;
- MongoDB round trips per chat turn, from the server's
  `innova_mongo_commands_total`, for a 10-word and a 1000-word message (they
  must be equal: tokens are never written one by one);
- round trips of replies that last 1, 3 and 6 s (ECHO_DELAY_MS=50): a
  constant plus one checkpoint per CHAT_CHECKPOINT_MS (1000) of generation,
  whatever the number of tokens;
- how many concurrent streams one worker holds (default 500; ECHO_DELAY_MS
  keeps them open), with errors and the worker's memory (RSS, psutil).

    python benchmarks/chat_bench.py [--turns 30] [--streams 500]

Figures land in benchmarks/results/chat.json. Everything runs on one machine:
the load generator and SecantusDB share its cores with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from common import PASSWORD, metric_sum, start_server, write_results
from httpx_sse import aconnect_sse

from innova_server.embedded import EmbeddedMongo, free_port
from innova_server.testing.server import wait_until_healthy

WORDS = [
    "Chatlaya",
    "aide",
    "les",
    "entrepreneurs",
    "africains",
    "à",
    "structurer",
    "leurs",
    "projets",
    "et",
    "leurs",
    "idées",
]


# Accounts are created, not benchmarked here: cheap argon2.
CHEAP_ARGON2 = {"ARGON2_TIME_COST": "1", "ARGON2_MEMORY_COST": "1024", "ARGON2_PARALLELISM": "1"}


def words(n: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


# The server's own time for a whole streamed response, from the HTTP latency histogram.
STREAM_SECONDS = 'innova_http_request_duration_seconds_sum{method="POST",route="/chatlaya/message"}'


def register(url: str, email: str) -> dict[str, str]:
    response = httpx.post(f"{url}/auth/register", json={"email": email, "password": PASSWORD}, timeout=60)
    response.raise_for_status()
    return {"innova_session": response.cookies["innova_session"]}


class Turn:
    def __init__(self) -> None:
        self.first_token: float | None = None
        self.total: float = 0.0
        self.tokens = 0
        self.events: list[str] = []
        self.error: str | None = None


async def one_turn(client: httpx.AsyncClient, content: str, on_start: asyncio.Event | None = None) -> Turn:
    turn = Turn()
    started = time.perf_counter()
    try:
        async with aconnect_sse(client, "POST", "/chatlaya/message", json={"content": content}) as source:
            if source.response.status_code != 200:
                await source.response.aread()
                turn.error = f"HTTP {source.response.status_code} {source.response.text[:100]}"
                return turn
            async for event in source.aiter_sse():
                turn.events.append(event.event)
                if event.event == "start" and on_start is not None:
                    on_start.set()
                elif event.event == "token":
                    turn.tokens += 1
                    if turn.first_token is None:
                        turn.first_token = time.perf_counter() - started
                elif event.event == "error":
                    turn.error = event.data
    except httpx.HTTPError as error:
        turn.error = f"{type(error).__name__}: {error}"
    turn.total = time.perf_counter() - started
    if turn.error is None and (not turn.events or turn.events[-1] != "done"):
        turn.error = "stream ended without done"
    return turn


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else float("nan")


async def latency_and_round_trips(url: str, turns: int) -> dict[str, Any]:
    cookies = register(url, "latency@example.com")
    results: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=url, cookies=cookies, timeout=60) as client:
        for _ in range(3):  # warm up (imports, connection, first conversation)
            await one_turn(client, words(10))

        for label, size in (("10_words", 10), ("1000_words", 1000)):
            before = metric_sum(url, "innova_mongo_commands_total")
            server_before = metric_sum(url, STREAM_SECONDS)
            runs = [await one_turn(client, words(size)) for _ in range(turns)]
            after = metric_sum(url, "innova_mongo_commands_total")
            server_seconds = (metric_sum(url, STREAM_SECONDS) - server_before) / turns
            errors = [r.error for r in runs if r.error]
            ttft = [r.first_token for r in runs if r.first_token is not None]
            totals = [r.total for r in runs]
            results[label] = {
                "turns": turns,
                "errors": len(errors),
                "tokens_per_turn": statistics.fmean(r.tokens for r in runs),
                "ttft_p50_ms": round(pct(ttft, 0.5) * 1000, 2),
                "ttft_p99_ms": round(pct(ttft, 0.99) * 1000, 2),
                "turn_p50_ms": round(pct(totals, 0.5) * 1000, 2),
                "server_turn_mean_ms": round(server_seconds * 1000, 2),
                "mongo_round_trips_per_turn": round((after - before) / turns, 2),
            }
            row = results[label]
            print(
                f"{label:<11} ttft p50 {row['ttft_p50_ms']:>7.2f} ms  p99 {row['ttft_p99_ms']:>7.2f} ms"
                f"  turn p50 {row['turn_p50_ms']:>8.2f} ms  tokens {row['tokens_per_turn']:.0f}"
                f"  mongo/turn {row['mongo_round_trips_per_turn']:.2f}  errors {len(errors)}"
            )
    short, long = results["10_words"], results["1000_words"]
    per_token_ms = (long["turn_p50_ms"] - short["turn_p50_ms"]) / (long["tokens_per_turn"] - short["tokens_per_turn"])
    results["time_per_token_us"] = round(per_token_ms * 1000, 1)
    server_per_token_ms = (long["server_turn_mean_ms"] - short["server_turn_mean_ms"]) / (
        long["tokens_per_turn"] - short["tokens_per_turn"]
    )
    results["server_time_per_token_us"] = round(server_per_token_ms * 1000, 1)
    results["round_trips_grow_with_tokens"] = long["mongo_round_trips_per_turn"] > short["mongo_round_trips_per_turn"]
    print(
        f"time per token: server ≈ {results['server_time_per_token_us']:.1f} µs, "
        f"client-measured ≈ {results['time_per_token_us']:.1f} µs (1000- vs 10-word replies)"
    )
    return results


async def checkpoint_round_trips(url: str, delay_ms: int, turns: int) -> dict[str, Any]:
    """Round trips per reply as its duration grows: a constant plus one per checkpoint interval."""
    cookies = register(url, "checkpoints@example.com")
    results: dict[str, Any] = {"echo_delay_ms": delay_ms, "checkpoint_ms": 1000}
    async with httpx.AsyncClient(base_url=url, cookies=cookies, timeout=60) as client:
        await one_turn(client, words(3))
        for seconds in (1, 3, 6):
            size = seconds * 1000 // delay_ms + 1
            before = metric_sum(url, "innova_mongo_commands_total")
            runs = [await one_turn(client, words(size)) for _ in range(turns)]
            after = metric_sum(url, "innova_mongo_commands_total")
            row = {
                "tokens": size,
                "turn_p50_s": round(pct([r.total for r in runs], 0.5), 2),
                "mongo_round_trips_per_turn": round((after - before) / turns, 2),
                "errors": sum(1 for r in runs if r.error),
            }
            results[f"{seconds}s"] = row
            print(
                f"reply of ~{seconds} s ({size} tokens): {row['mongo_round_trips_per_turn']:.2f} round trips"
                f" (turn p50 {row['turn_p50_s']} s, errors {row['errors']})"
            )
    return results


async def concurrent_streams(url: str, server_pid: int, streams: int, users: int, delay_ms: int) -> dict[str, Any]:
    worker = psutil.Process(server_pid)
    cookies = [register(url, f"load{i}@example.com") for i in range(users)]
    rss_idle = worker.memory_info().rss
    content = words(12)  # 12 chunks, `delay_ms` apart: each stream stays open ~11 delays
    limits = httpx.Limits(max_connections=streams + 10, max_keepalive_connections=streams + 10)
    clients = [httpx.AsyncClient(base_url=url, cookies=c, limits=limits, timeout=120) for c in cookies]
    started_events = [asyncio.Event() for _ in range(streams)]
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(one_turn(clients[i % users], content, started_events[i])) for i in range(streams)]
    peak_rss, peak_active, all_open_s = rss_idle, 0.0, None
    cpu_before = worker.cpu_times()
    while not all(t.done() for t in tasks):
        await asyncio.sleep(0.25)
        peak_rss = max(peak_rss, worker.memory_info().rss)
        active = await asyncio.to_thread(metric_sum, url, "innova_chat_active_streams")
        peak_active = max(peak_active, active)
        if all_open_s is None and all(e.is_set() for e in started_events):
            all_open_s = time.perf_counter() - t0
        if time.perf_counter() - t0 > 300:
            break
    turns = [await t for t in tasks]
    elapsed = time.perf_counter() - t0
    cpu_after = worker.cpu_times()
    for client in clients:
        await client.aclose()
    errors = [t.error for t in turns if t.error]
    result = {
        "streams": streams,
        "users": users,
        "echo_delay_ms": delay_ms,
        "completed": sum(1 for t in turns if not t.error),
        "errors": len(errors),
        "first_errors": errors[:3],
        "peak_active_streams_on_server": int(peak_active),
        "all_started_after_s": round(all_open_s, 2) if all_open_s is not None else None,
        "elapsed_s": round(elapsed, 2),
        "rss_idle_mb": round(rss_idle / 2**20, 1),
        "rss_peak_mb": round(peak_rss / 2**20, 1),
        "rss_per_stream_kb": round((peak_rss - rss_idle) / 1024 / max(1, peak_active), 1),
        "server_cpu_s": round((cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system), 2),
    }
    print(
        f"{streams} concurrent streams ({users} users): completed {result['completed']}, errors {result['errors']}, "
        f"peak active {result['peak_active_streams_on_server']}, all started after {result['all_started_after_s']} s, "
        f"RSS {result['rss_idle_mb']} → {result['rss_peak_mb']} MB (~{result['rss_per_stream_kb']} KB/stream)"
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=30, help="turns per message size for latency/round trips")
    parser.add_argument("--streams", type=int, default=500, help="concurrent streams to hold")
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--delay-ms", type=int, default=2000, help="ECHO_DELAY_MS of the concurrency run")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="innova-chat-bench-") as tmp, EmbeddedMongo(Path(tmp) / "db") as mongo:
        port = free_port()
        server = start_server(mongo.uri, port, "innova_chat_bench", ECHO_DELAY_MS="0", **CHEAP_ARGON2)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_healthy(url, process=server)
            results["latency"] = asyncio.run(latency_and_round_trips(url, args.turns))
        finally:
            server.terminate()
            server.wait(30)

        port = free_port()
        server = start_server(mongo.uri, port, "innova_chat_bench_checkpoints", ECHO_DELAY_MS="50", **CHEAP_ARGON2)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_healthy(url, process=server)
            results["checkpoints"] = asyncio.run(checkpoint_round_trips(url, 50, max(3, args.turns // 10)))
        finally:
            server.terminate()
            server.wait(30)

        port = free_port()
        server = start_server(
            mongo.uri, port, "innova_chat_bench_load", ECHO_DELAY_MS=str(args.delay_ms), **CHEAP_ARGON2
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_healthy(url, process=server)
            results["concurrency"] = asyncio.run(
                concurrent_streams(url, server.pid, args.streams, args.users, args.delay_ms)
            )
        finally:
            server.terminate()
            server.wait(60)
    write_results("chat", results, server="1 uvicorn worker, PROVIDER=echo")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
