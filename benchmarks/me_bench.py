"""GET /auth/me side by side with fastapi-users, one run, and what the fast event loop buys.

Three servers on one SecantusDB process, one uvicorn worker each, access logs
off, loaded in turn by `hey` (Debian package `hey`; 50 connections, `--seconds`
each), A B C A B C, the median of the rounds kept:

- **innova**: as deployed (`innova_server.asgi:app`; uvloop and httptools,
  which uvicorn picks up by itself when installed: the `production` extra);
- **innova-asyncio**: the same app with `--loop asyncio --http h11` (the
  before line for uvloop/httptools);
- **peer**: fastapi-users' cookie + database strategy on Beanie
  (`peer/peer_fastapi_users.py`), in a virtualenv of its own made on first use
  under benchmarks/results/ (plain uvicorn, as `pip install uvicorn` gives).

Also, in the same run: MongoDB commands per /auth/me under that load (from
the server's own counter), /auth/me's p50 alone (concurrency 1) and a chat
turn's first token alone (10 words, echo): the turn's first token is asked to
stay within 2.5x of the session lookup's p50.

    python benchmarks/me_bench.py [--seconds 8] [--rounds 2]

Figures land in benchmarks/results/me.json.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from chat_bench import CHEAP_ARGON2, register, words
from common import RESULTS, mongo_commands, start_server, write_results
from httpx_sse import connect_sse

from innova_server.embedded import EmbeddedMongo, free_port
from innova_server.testing.server import wait_for, wait_until_healthy

HERE = Path(__file__).resolve().parent
PEER_VENV = RESULTS / ".peer-venv"
PEER_PACKAGES = ["fastapi-users[beanie]", "fastapi-users-db-beanie", "uvicorn"]


def peer_python() -> Path:
    python = PEER_VENV / "bin" / "python"
    if not python.exists():
        RESULTS.mkdir(exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    return python


def hey(url: str, cookie: str, seconds: int) -> dict[str, float]:
    out = subprocess.run(
        ["hey", "-z", f"{seconds}s", "-c", "50", "-H", f"Cookie: innova_session={cookie}", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def grab(pattern: str) -> float:
        match = re.search(pattern, out)
        return float(match.group(1)) if match else float("nan")

    return {
        "requests_per_s": grab(r"Requests/sec:\s+([\d.]+)"),
        "ok": grab(r"\[200\]\s+(\d+)"),
        "p50_ms": grab(r"50%+ in ([\d.]+) secs") * 1000,
        "p99_ms": grab(r"99%+ in ([\d.]+) secs") * 1000,
    }


def alone_p50(url: str, cookie: str, n: int = 300) -> float:
    """/auth/me one at a time: its p50 in ms."""
    times = []
    with httpx.Client(base_url=url, cookies={"innova_session": cookie}) as client:
        for _ in range(n):
            started = time.perf_counter()
            client.get("/auth/me").raise_for_status()
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def first_token_p50(url: str, cookie: str, n: int = 40) -> float:
    """A 10-word echo turn one at a time: request sent → first `token` event, p50 in ms."""
    times = []
    with httpx.Client(base_url=url, cookies={"innova_session": cookie}, timeout=30) as client:
        for _ in range(n):
            started = time.perf_counter()
            first = None
            with connect_sse(client, "POST", "/chatlaya/message", json={"content": words(10)}) as source:
                for event in source.iter_sse():
                    if event.event == "token" and first is None:
                        first = time.perf_counter() - started
            assert first is not None
            times.append(first)
    return statistics.median(times) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if shutil.which("hey") is None:
        print("me_bench: `hey` is not installed (apt-get install hey); skipped")
        return 0
    python = peer_python()
    processes: list[subprocess.Popen[bytes]] = []
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="innova-me-bench-") as tmp, EmbeddedMongo(Path(tmp) / "db") as mongo:
        try:
            ports = {"innova": free_port(), "innova-asyncio": free_port(), "peer": free_port()}
            env = {**CHEAP_ARGON2, "ECHO_DELAY_MS": "0"}
            processes.append(start_server(mongo.uri, ports["innova"], "innova_me_bench", **env))
            processes.append(
                start_server(
                    mongo.uri,
                    ports["innova-asyncio"],
                    "innova_me_bench",
                    uvicorn_args=("--loop", "asyncio", "--http", "h11"),
                    **env,
                )
            )
            peer_env = {**os.environ, "MONGO_URI": mongo.uri, "DB_NAME": "peer_db"}
            processes.append(
                subprocess.Popen(
                    [str(python), "-m", "uvicorn", "peer_fastapi_users:app", "--port", str(ports["peer"]),
                     "--log-level", "warning", "--no-access-log"],
                    cwd=HERE / "peer",
                    env=peer_env,
                )
            )
            urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
            wait_until_healthy(urls["innova"], process=processes[0])
            wait_until_healthy(urls["innova-asyncio"], process=processes[1])
            wait_for(lambda: _answers(urls["peer"] + "/docs"), timeout=60, what="the peer")
            email, password = "bench@example.org", "correct horse 9"
            cookie = register(urls["innova"], email)["innova_session"]
            httpx.post(f"{urls['peer']}/auth/register", json={"email": email, "password": password})
            login = httpx.post(f"{urls['peer']}/auth/login", data={"username": email, "password": password})
            cookies = {"innova": cookie, "innova-asyncio": cookie, "peer": login.cookies["innova_session"]}

            runs: dict[str, list[dict[str, float]]] = {name: [] for name in urls}
            commands_per_request: list[float] = []
            for _ in range(args.rounds):
                for name, url in urls.items():
                    before = mongo_commands(url) if name == "innova" else 0.0
                    run = hey(f"{url}/auth/me", cookies[name], args.seconds)
                    runs[name].append(run)
                    if name == "innova":
                        commands_per_request.append((mongo_commands(url) - before) / max(1.0, run["ok"]))
                    print(f"{name}: {run['requests_per_s']:.0f} req/s, p50 {run['p50_ms']:.1f} ms")
            for name, name_runs in runs.items():
                results[name] = {
                    "runs": name_runs,
                    "requests_per_s": statistics.median(r["requests_per_s"] for r in name_runs),
                    "p50_ms": statistics.median(r["p50_ms"] for r in name_runs),
                    "p99_ms": statistics.median(r["p99_ms"] for r in name_runs),
                }
            innova, peer = results["innova"]["requests_per_s"], results["peer"]["requests_per_s"]
            results["ratio_vs_peer"] = round(innova / peer, 2)
            results["uvloop_httptools_gain"] = round(innova / results["innova-asyncio"]["requests_per_s"], 2)
            results["mongo_commands_per_request_under_load"] = round(statistics.median(commands_per_request), 3)
            me_alone = alone_p50(urls["innova"], cookie)
            ttft_alone = first_token_p50(urls["innova"], cookie)
            results["me_p50_alone_ms"] = round(me_alone, 2)
            results["first_token_p50_alone_ms"] = round(ttft_alone, 2)
            results["first_token_over_me_p50"] = round(ttft_alone / me_alone, 2)
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(30)
    print(
        f"/auth/me: innova {results['innova']['requests_per_s']:.0f} req/s vs fastapi-users "
        f"{results['peer']['requests_per_s']:.0f} req/s: ratio {results['ratio_vs_peer']}; "
        f"uvloop+httptools {results['uvloop_httptools_gain']}x plain asyncio+h11; "
        f"{results['mongo_commands_per_request_under_load']} MongoDB commands per request under load; "
        f"first token alone {results['first_token_p50_alone_ms']} ms = {results['first_token_over_me_p50']}x "
        f"/auth/me alone ({results['me_p50_alone_ms']} ms)"
    )
    write_results("me", results, server="1 uvicorn worker each, hey -c 50")
    return 0


def _answers(url: str) -> bool:
    try:
        httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return False
    return True


if __name__ == "__main__":
    raise SystemExit(main())
