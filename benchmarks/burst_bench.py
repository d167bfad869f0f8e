"""Burst benchmark: N echo streams fired at once at one worker, and /health meanwhile.

What a load balancer and a front end see when a host gets a burst: every
stream is a `POST /chatlaya/message` sent at the same instant (30 words, one
every ECHO_DELAY_MS=100 ms, so each stays open ~3 s) by returning users (each
has sent one message before: the burst does not create their conversations), while `/health` (the
readiness probe) and `/health/live` (liveness) are polled every 50 ms, each from a
process of its own (as a balancer would, not from the load generator's loop).

Reports: streams completed and errors, when the last one opened (its `start`
event) after the burst was fired, the worker's RSS growth (psutil), and the
probes' latency percentiles during the burst, and the CPU seconds the worker
and the database spent on it.

The streams are read with a minimal HTTP/1.1 client on raw asyncio sockets,
not httpx: a thousand httpx-sse streams cost the load generator more CPU than
the server, on the same cores, and the figure would measure the client.

    python benchmarks/burst_bench.py [--streams 1000] [--users 250]

Figures land in benchmarks/results/burst.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from chat_bench import CHEAP_ARGON2, pct, register, words
from common import start_server, write_results

from innova_server.embedded import EmbeddedMongo, free_port
from innova_server.testing.server import wait_until_healthy


class Stream:
    def __init__(self) -> None:
        self.opened: float | None = None
        self.done = False
        self.error: str | None = None


async def raw_stream(port: int, cookie: str, body: bytes, fired: float) -> Stream:
    """One SSE turn over a bare socket: headers, then events until `done` (or an error)."""
    result = Stream()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as error:
        result.error = f"connect: {error}"
        return result
    try:
        writer.write(
            b"POST /chatlaya/message HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\nCookie: innova_session={cookie}\r\n".encode()
            + b"Accept: text/event-stream\r\n\r\n"
            + body
        )
        status = await asyncio.wait_for(reader.readline(), 120)
        if b" 200 " not in status:
            head = await asyncio.wait_for(reader.read(2048), 5)
            body = head.split(b"\r\n\r\n", 1)[-1][:200]
            result.error = f"{status.decode(errors='replace').strip()} {body.decode(errors='replace')}"
            return result
        buffer = b""
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), 120)
            if not chunk:
                result.error = "closed before done"
                return result
            buffer = buffer[-64:] + chunk
            if result.opened is None and b"event: start" in buffer:
                result.opened = time.perf_counter() - fired
            if b"event: error" in buffer:
                result.error = "error event"
                return result
            if b"event: done" in buffer:
                result.done = True
                return result
    except (OSError, TimeoutError) as error:
        result.error = f"{type(error).__name__}: {error}"
        return result
    finally:
        writer.close()


class Prober:
    """GET `path` every 50 ms on a fresh connection, from a process of its own, as a balancer does.

    Not from the load generator's event loop: there, a probe's latency would
    include the generator's own waits (a thousand streams waking at once),
    which no balancer suffers. Latencies (seconds) count while `recording`.
    """

    def __init__(self, url: str, path: str) -> None:
        context = multiprocessing.get_context("spawn")
        self.recording = context.Event()
        self._stop = context.Event()
        self._receive, send = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_probe_process, args=(url, path, self.recording, self._stop, send), daemon=True
        )
        self._process.start()

    def finish(self) -> tuple[list[float], list[str], list[float]]:
        """Latencies, failures, and the loop lags the worker reported (`/health/live` says it)."""
        self._stop.set()
        latencies, failures, lags = self._receive.recv()
        self._process.join(10)
        return latencies, failures, lags


def _probe_process(url: str, path: str, recording: Any, stop: Any, send: Any) -> None:
    latencies: list[float] = []
    failures: list[str] = []
    lags: list[float] = []

    async def run() -> None:
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    response = await client.get(path)
                    failure = None if response.status_code == 200 else str(response.status_code)
                    lag = response.json().get("loop_lag_ms") if failure is None else None
                except httpx.HTTPError as error:
                    failure, lag = type(error).__name__, None
                if recording.is_set():
                    latencies.append(time.perf_counter() - started)
                    if failure:
                        failures.append(failure)
                    if lag is not None:
                        lags.append(lag / 1000)
                await asyncio.sleep(0.05)

    asyncio.run(run())
    send.send((latencies, failures, lags))


def commands_by_name(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    pattern = r'^innova_mongo_commands_total\{command="([^"]+)"\} (\S+)$'
    return {name: float(count) for name, count in re.findall(pattern, text, re.M)}


def probe_summary(latencies: list[float], failures: list[str]) -> dict[str, Any]:
    return {
        "probes": len(latencies),
        "failures": len(failures),
        "p50_ms": round(pct(latencies, 0.5) * 1000, 1),
        "p99_ms": round(pct(latencies, 0.99) * 1000, 1),
        "max_ms": round(max(latencies) * 1000, 1) if latencies else None,
    }


async def burst(url: str, port: int, server_pid: int, database_pid: int, streams: int, users: int) -> dict[str, Any]:
    worker = psutil.Process(server_pid)
    database = psutil.Process(database_pid)
    cookies = [register(url, f"burst{i}@example.com")["innova_session"] for i in range(users)]
    body = json.dumps({"content": words(30)}).encode()
    # Returning users: each has had a conversation (its first message, which
    # creates it, is the sign-up's event, not the burst's).
    warm = json.dumps({"content": words(1)}).encode()
    await asyncio.gather(*(raw_stream(port, cookie, warm, time.perf_counter()) for cookie in cookies))
    rss_idle = worker.memory_info().rss
    stop = asyncio.Event()
    probes = [Prober(url, "/health"), Prober(url, "/health/live")]
    await asyncio.sleep(2)  # the probers' interpreters start, and their first probes warm up
    for prober in probes:
        prober.recording.set()
    peak_rss = rss_idle

    async def watch_rss() -> None:
        nonlocal peak_rss
        while not stop.is_set():
            peak_rss = max(peak_rss, worker.memory_info().rss)
            await asyncio.sleep(0.1)

    watcher = asyncio.create_task(watch_rss())
    commands_before = commands_by_name(url)
    cpu_before = worker.cpu_times()
    database_cpu_before = database.cpu_times()
    client_cpu_before = psutil.Process().cpu_times()
    fired = time.perf_counter()
    results = await asyncio.gather(*(raw_stream(port, cookies[i % users], body, fired) for i in range(streams)))
    elapsed = time.perf_counter() - fired
    cpu_after = worker.cpu_times()
    database_cpu_after = database.cpu_times()
    client_cpu_after = psutil.Process().cpu_times()
    stop.set()
    await watcher
    (ready, ready_failures, _), (live, live_failures, lags) = (prober.finish() for prober in probes)
    commands = {
        name: int(count - commands_before.get(name, 0))
        for name, count in commands_by_name(url).items()
        if count > commands_before.get(name, 0)
    }
    opened = [r.opened for r in results if r.opened is not None]
    errors = [r.error for r in results if r.error]
    result = {
        "streams": streams,
        "users": users,
        "completed": sum(1 for r in results if r.done),
        "errors": len(errors),
        "first_errors": errors[:3],
        "all_opened_within_s": round(max(opened), 2) if len(opened) == streams else None,
        "opened_p50_s": round(pct(opened, 0.5), 2),
        "elapsed_s": round(elapsed, 2),
        "rss_idle_mb": round(rss_idle / 2**20, 1),
        "rss_peak_mb": round(peak_rss / 2**20, 1),
        "rss_growth_mb": round((peak_rss - rss_idle) / 2**20, 1),
        "server_cpu_s": round(sum(cpu_after[:2]) - sum(cpu_before[:2]), 2),
        "database_cpu_s": round(sum(database_cpu_after[:2]) - sum(database_cpu_before[:2]), 2),
        # The load generator shares the cores: what it took is not the server's.
        "client_cpu_s": round(sum(client_cpu_after[:2]) - sum(client_cpu_before[:2]), 2),
        "cores": psutil.cpu_count(),
        "mongo_commands": commands,
        "mongo_commands_per_stream": round(sum(commands.values()) / streams, 2),
        "health_ready": probe_summary(ready, ready_failures),
        "health_live": probe_summary(live, live_failures),
        # The worker's own event-loop lag, as its last monitor tick measured it (what /health/live reports).
        "worker_loop_lag": probe_summary(lags, []),
    }
    print(
        f"burst of {streams} streams: completed {result['completed']}, errors {result['errors']}, all opened within "
        f"{result['all_opened_within_s']} s (p50 {result['opened_p50_s']} s), RSS +{result['rss_growth_mb']} MB; "
        f"/health p99 {result['health_ready']['p99_ms']} ms ({result['health_ready']['failures']} failures), "
        f"/health/live p99 {result['health_live']['p99_ms']} ms (the worker's loop lag p99 "
        f"{result['worker_loop_lag']['p99_ms']} ms); {result['mongo_commands_per_stream']} MongoDB commands"
        f" per stream {commands}; CPU: server {result['server_cpu_s']} s, database {result['database_cpu_s']} s,"
        f" load generator {result['client_cpu_s']} s over {result['elapsed_s']} s on {result['cores']} cores"
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--users", type=int, default=250)
    parser.add_argument("--delay-ms", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="innova-burst-bench-") as tmp, EmbeddedMongo(Path(tmp) / "db") as mongo:
        port = free_port()
        server = start_server(mongo.uri, port, "innova_burst_bench", ECHO_DELAY_MS=str(args.delay_ms), **CHEAP_ARGON2)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_healthy(url, process=server)
            assert mongo.process is not None
            results = asyncio.run(burst(url, port, server.pid, mongo.process.pid, args.streams, args.users))
        finally:
            server.terminate()
            server.wait(60)
    write_results("burst", results, server="1 uvicorn worker, PROVIDER=echo")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
