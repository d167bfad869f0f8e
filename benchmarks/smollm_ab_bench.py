"""Two SMOLLM_PARALLEL=4 servers side by side, differing only by environment: which one streams 4 replies faster?

For trying a change to the batched path (a setting, or code switched by an
environment variable) against what runs now, by figures: both servers are
up together (one SecantusDB), and each round gives each of them, in
alternating order (A B, then B A), 4 conversations sent at once, with
llama.cpp's own batched decode at batch 4 (the anchor of
`smollm_parallel_bench.py`, in a process of its own) measured just before
and just after. Per round and server: the generation rate of the 4 streams
(tokens/s while all 4 stream), its ratio to the mean of the two anchors,
and A's rate over B's in the same round; then the medians. On this shared
machine single rounds spread widely (A against an identical B: 0.84–1.09),
so only differences well beyond that, over 8 rounds or more, mean anything.

And where the CPU goes while all 4 stream — from every stream's 10th token
until one of them reaches its 140th, so prompts, requests and database
writes at the ends are left out: the server's cores, its event loop
thread's (from `/proc`, in µs per token), the database's and this client's.

    python benchmarks/smollm_ab_bench.py --a-env GOMP_SPINCOUNT=10000 [--b-env K=V,...] [--rounds 8] [--threads 2]

Run it under `flock /tmp/innova-bench.lock ...` on a shared machine.
Figures in benchmarks/results/smollm_ab.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import start_server
from smollm_bench import SYSTEM, tiny_model
from smollm_parallel_bench import Ceiling, Reply, converse, machine, steady_rate, user

CONCURRENT = 4
WARM_TOKENS = 10
LAST_TOKEN = 140


def parse_env(text: str) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"--a-env/--b-env: KEY=VALUE[,KEY=VALUE...], not {text!r}")
    return dict(pairs)


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of a process (or of one of its threads)."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def snapshot(server: int, database: int) -> dict[str, float]:
    return {
        "wall": time.perf_counter(),
        "server": cpu_seconds(server),
        "loop": cpu_seconds(server, server),  # the main thread: uvicorn's event loop
        "database": cpu_seconds(database),
        "client": cpu_seconds(os.getpid()),
    }


def four_streams(clients: list[Any], server: int, database: int) -> tuple[list[Reply], dict[str, float]]:
    """4 conversations sent at once; their replies, and the CPU used while all of them streamed."""
    counts = [0] * len(clients)
    marks: dict[str, Any] = {}
    lock = threading.Lock()
    replies: list[Reply | None] = [None] * len(clients)
    start = threading.Barrier(len(clients))

    def one(index: int) -> None:
        def seen(count: int) -> None:
            with lock:
                counts[index] = count
                if "first" not in marks and min(counts) >= WARM_TOKENS:
                    marks["first"], marks["first_tokens"] = snapshot(server, database), sum(counts)
                elif "first" in marks and "last" not in marks and max(counts) >= LAST_TOKEN:
                    marks["last"], marks["last_tokens"] = snapshot(server, database), sum(counts)

        start.wait()
        replies[index] = converse(clients[index], on_token=seen)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    first, last = marks["first"], marks["last"]
    tokens = marks["last_tokens"] - marks["first_tokens"]
    wall = last["wall"] - first["wall"]
    usage = {f"{key}_cores": (last[key] - first[key]) / wall for key in ("server", "loop", "database", "client")}
    usage["loop_us_per_token"] = (last["loop"] - first["loop"]) / tokens * 1e6
    return [r for r in replies if r is not None], usage


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a-env", default="", help="KEY=VALUE,... for server A")
    parser.add_argument("--b-env", default="", help="KEY=VALUE,... for server B (default: nothing more)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "smollm_ab.json")
    args = parser.parse_args()
    model = (args.model or tiny_model()).resolve()
    extra = {"A": parse_env(args.a_env), "B": parse_env(args.b_env)}
    if args.max_tokens <= LAST_TOKEN:
        raise SystemExit(f"--max-tokens must be above {LAST_TOKEN}")

    from innova_server.embedded import EmbeddedMongo, free_port
    from innova_server.testing.server import wait_until_healthy

    here = str(Path(__file__).resolve())
    parallel_bench = str(Path(here).with_name("smollm_parallel_bench.py"))
    ceiling = Ceiling([
        sys.executable, parallel_bench, "--model", str(model), "--threads", str(args.threads),
        "--max-tokens", str(args.max_tokens), "--n-ctx", str(args.n_ctx), "--ceiling",
    ])  # fmt: skip
    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="innova-smollm-ab-") as tmp, EmbeddedMongo(Path(tmp) / "db") as db:
        assert db.process is not None
        processes = []
        servers: dict[str, tuple[str, int]] = {}
        try:
            for name in ("A", "B"):
                port = free_port()
                env = {
                    "PROVIDER": "local", "SMOLLM_MODEL_PATH": str(model), "SMOLLM_N_CTX": str(args.n_ctx),
                    "SMOLLM_N_THREADS": str(args.threads), "SMOLLM_PARALLEL": str(CONCURRENT),
                    "SMOLLM_MAX_QUEUE": "16", "SMOLLM_LOAD": "startup", "CHAT_MAX_TOKENS": str(args.max_tokens),
                    "CHAT_TEMPERATURE": "0", "CHAT_SYSTEM_PROMPT": SYSTEM, "ARGON2_TIME_COST": "1",
                    "ARGON2_MEMORY_COST": "1024", "ARGON2_PARALLELISM": "1", **extra[name],
                }  # fmt: skip
                process = start_server(db.uri, port, f"smollm_ab_{name}", **env)
                processes.append(process)
                url = f"http://127.0.0.1:{port}"
                wait_until_healthy(url, process=process, timeout=180)
                servers[name] = (url, process.pid)
            clients = {name: [user(url) for _ in range(CONCURRENT)] for name, (url, _) in servers.items()}
            for name, (_, pid) in servers.items():  # warm-up
                four_streams(clients[name], pid, db.process.pid)
            for index in range(args.rounds):
                result: dict[str, Any] = {"order": "AB" if index % 2 == 0 else "BA"}
                for name in result["order"]:
                    before = ceiling.rate(CONCURRENT)
                    replies, usage = four_streams(clients[name], servers[name][1], db.process.pid)
                    after = ceiling.rate(CONCURRENT)
                    rate = steady_rate(replies)
                    result[name] = {
                        "tokens_per_s": rate, "anchor_tokens_per_s": [before, after],
                        "ratio_to_anchor": rate / statistics.mean([before, after]), **usage,
                    }  # fmt: skip
                result["a_over_b"] = result["A"]["tokens_per_s"] / result["B"]["tokens_per_s"]
                rounds.append(result)
                print(
                    f"round {index + 1}/{args.rounds} ({result['order']}): "
                    + "  ".join(
                        f"{name} {result[name]['tokens_per_s']:.1f} tok/s, "
                        f"{result[name]['ratio_to_anchor']:.3f} of the anchor, "
                        f"loop {result[name]['loop_us_per_token']:.0f} µs/token"
                        for name in "AB"
                    )
                    + f"  A/B {result['a_over_b']:.3f}",
                    flush=True,
                )
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(60)
            ceiling.close()
    keys = ("tokens_per_s", "ratio_to_anchor", "server_cores", "loop_cores", "database_cores", "client_cores",
            "loop_us_per_token")  # fmt: skip
    summary: dict[str, Any] = {
        name: {key: statistics.median(r[name][key] for r in rounds) for key in keys} for name in "AB"
    }
    summary["a_over_b"] = statistics.median(r["a_over_b"] for r in rounds)
    for name in "AB":
        print(f"{name} {args.a_env if name == 'A' else args.b_env or '(as is)'}: median of {args.rounds} rounds:",
              ", ".join(f"{key} {value:.3f}" for key, value in summary[name].items()))  # fmt: skip
    print(f"A/B median {summary['a_over_b']:.3f}; rounds " + " ".join(f"{r['a_over_b']:.2f}" for r in rounds))
    results = {
        "summary": summary, "rounds": rounds,
        "meta": {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
                 "a_env": extra["A"], "b_env": extra["B"], "threads": args.threads, "max_tokens": args.max_tokens,
                 "model": model.name},
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
