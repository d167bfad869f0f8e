"""Error paths through the real HTTP/SSE endpoint, against a loopback fake API (each reply a real server could give).

The request's model name picks the fake's behaviour (see conftest.FakeAPI).
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from innova_provider_cloud import make_mistral, make_openai
from innova_server.chat import (
    ChatMessage,
    ChatRequest,
    ContextTooLong,
    ProviderAuthError,
    ProviderError,
    ProviderRateLimited,
    ProviderTimeout,
    ProviderUnavailable,
)
from innova_server.settings import ConfigError
from innova_server.testing.chat_client import chat, signed_in

PROVIDERS = ["openai", "mistral"]
MAKERS = {"openai": make_openai, "mistral": make_mistral}
SECRET_KEY = "sk-test-SECRET-0123456789abcdef"


@pytest.fixture(params=PROVIDERS)
def provider(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def fresh(scenario: str) -> str:
    """A model name for `scenario` with its own request counter."""
    return f"{scenario}:{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize(
    ("scenario", "status", "code", "retry_after"),
    [
        ("401", 502, "provider_auth", None),
        ("403", 502, "provider_auth", None),
        ("429", 503, "provider_rate_limited", "7"),
        ("ctx-openai", 413, "context_too_long", None),
        ("500", 503, "provider_unavailable", "5"),
        ("503", 503, "provider_unavailable", "5"),
        ("stall-first", 504, "provider_timeout", "5"),
    ],
)
def test_failure_before_the_first_token_is_the_documented_http_error(
    provider, scenario, status, code, retry_after, fake_api, point_at, fast_timeouts, start_server, caplog
):
    url, api = fake_api
    point_at(provider, url)
    model = fresh(scenario)
    server = start_server(provider=provider, chat_model=model)
    with signed_in(server.url) as client:
        reply = chat(client, "Bonjour")
    assert reply.status == status, reply.body
    assert reply.body["detail"]["code"] == code
    assert reply.headers.get("retry-after") == retry_after
    # Retried (once, CLOUD_MAX_RETRIES=1) only when retrying can help, and never a 429
    # whose Retry-After is beyond CLOUD_RETRY_MAX_WAIT_SECONDS, nor a timeout.
    assert api.requests[model] == (2 if scenario in ("500", "503") else 1)
    # The key reached the API, but no log line, no error body.
    assert api.authorization[-1] == f"Bearer {SECRET_KEY}"
    assert SECRET_KEY not in caplog.text and SECRET_KEY not in str(reply.body)


@pytest.mark.parametrize(
    ("provider", "status", "code"),
    [
        # OpenAI: `context_length_exceeded` in its code, whatever the message says.
        ("openai", 413, "context_too_long"),
        # Mistral: 400, type `invalid_request_invalid_args`, code "3051" — shared
        # with other invalid arguments; only the message text says "context
        # length", and text never decides (README, "Errors").
        ("mistral", 503, "provider_unavailable"),
    ],
)
def test_each_apis_own_context_length_reply(provider, status, code, fake_api, point_at, fast_timeouts, start_server):
    url, api = fake_api
    point_at(provider, url)
    model = fresh("ctx")
    server = start_server(provider=provider, chat_model=model)
    with signed_in(server.url) as client:
        reply = chat(client, "Bonjour")
    assert reply.status == status, reply.body
    assert reply.body["detail"]["code"] == code
    assert api.requests[model] == 1  # neither is retried


def test_with_the_default_timeouts_a_stalled_api_is_a_504_before_the_stream_opens(
    fake_api, point_at, start_server, monkeypatch
):
    # The shipped defaults: CLOUD_FIRST_TOKEN_TIMEOUT_SECONDS (12 s) and the
    # core's CHAT_PING_SECONDS (15 s), the time the core waits for the first
    # chunk before it opens the stream. One provider: the rule is in the shared loop.
    for name in ("CLOUD_FIRST_TOKEN_TIMEOUT_SECONDS", "CLOUD_TOTAL_TIMEOUT_SECONDS", "CLOUD_MAX_RETRIES"):
        monkeypatch.delenv(name, raising=False)
    url, api = fake_api
    point_at("openai", url)
    model = fresh("stall-first")
    server = start_server(provider="openai", chat_model=model)
    assert server.settings.chat_ping_seconds == 15.0
    with signed_in(server.url) as client:
        reply = chat(client, "Bonjour")
    assert reply.status == 504, reply.body
    assert reply.body["detail"]["code"] == "provider_timeout"
    assert api.requests[model] == 1


def test_retries_stay_inside_the_first_token_timeout(provider, fake_api, point_at, start_server, monkeypatch):
    # The defaults' relationship (first token 12 s < CHAT_PING_SECONDS 15 s),
    # scaled down: a 429 with Retry-After: 1 is retried, the retry stalls, and
    # the timeout still comes before the core opens the stream, as an HTTP 504
    # — not `start` then an `error` event, as when each try had its own timeout.
    monkeypatch.setenv("CLOUD_FIRST_TOKEN_TIMEOUT_SECONDS", "2.4")
    monkeypatch.setenv("CLOUD_RETRY_MAX_WAIT_SECONDS", "1")
    monkeypatch.setenv("CLOUD_MAX_RETRIES", "2")
    url, api = fake_api
    point_at(provider, url)
    model = fresh("slow-down-stall")
    server = start_server(provider=provider, chat_model=model, chat_ping_seconds=3.0)
    with signed_in(server.url) as client:
        reply = chat(client, "Bonjour")
    assert reply.status == 504, reply.body
    assert reply.body["detail"]["code"] == "provider_timeout"
    assert api.requests[model] == 2  # the 429, then the retry that stalled


def test_a_first_token_timeout_above_the_core_wait_is_said_at_startup(monkeypatch, make_settings, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET_KEY)
    monkeypatch.setenv("CLOUD_FIRST_TOKEN_TIMEOUT_SECONDS", "60")
    with caplog.at_level("WARNING", logger="innova.provider.cloud"):
        asyncio.run(make_openai(make_settings(provider="openai")).aclose())
    assert "CHAT_PING_SECONDS=15" in caplog.text and "`error` event" in caplog.text


def test_connection_refused_is_provider_unavailable(provider, refused_url, point_at, fast_timeouts, start_server):
    point_at(provider, refused_url)
    server = start_server(provider=provider, chat_model="any")
    with signed_in(server.url) as client:
        reply = chat(client, "Bonjour")
    assert reply.status == 503 and reply.body["detail"]["code"] == "provider_unavailable"


def test_a_failure_before_the_first_token_is_retried(provider, fake_api, point_at, fast_timeouts, start_server):
    url, api = fake_api
    point_at(provider, url)
    model = fresh("flaky")  # 503 once, then a reply
    server = start_server(provider=provider, chat_model=model)
    with signed_in(server.url) as client:
        reply = chat(client, "Bonjour")
    assert reply.status == 200
    assert reply.text() == "Bonjour le monde !"
    assert api.requests[model] == 2
    done = reply.data("done")
    assert done["finish_reason"] == "stop"
    assert done["usage"] == {"prompt_tokens": 11, "completion_tokens": 4}


def test_a_429_with_a_short_retry_after_is_waited_for_and_retried(
    provider, fake_api, point_at, fast_timeouts, start_server
):
    url, api = fake_api
    point_at(provider, url)
    model = fresh("slow-down")  # 429 + Retry-After: 1, then a reply
    server = start_server(provider=provider, chat_model=model)
    started = time.monotonic()
    with signed_in(server.url) as client:
        reply = chat(client, "Bonjour")
    assert reply.status == 200 and reply.text() == "Bonjour le monde !"
    assert api.requests[model] == 2
    assert time.monotonic() - started >= 1.0


def test_a_stream_cut_after_a_token_is_an_error_event(provider, fake_api, point_at, fast_timeouts, start_server):
    url, api = fake_api
    point_at(provider, url)
    model = fresh("cut")
    server = start_server(provider=provider, chat_model=model)
    with signed_in(server.url) as client:
        reply = chat(client, "Bonjour")
    assert reply.names() == ["start", "token", "error", "done"]
    assert reply.data("error")["code"] == "provider_unavailable" and reply.data("error")["retryable"] is True
    assert api.requests[model] == 1


def test_a_stall_after_the_first_token_is_an_error_event_and_never_retried(
    provider, fake_api, point_at, fast_timeouts, start_server
):
    url, api = fake_api
    point_at(provider, url)
    model = fresh("stall-mid")
    server = start_server(provider=provider, chat_model=model)
    started = time.monotonic()
    with signed_in(server.url) as client:
        reply = chat(client, "Bonjour")
    assert reply.status == 200
    assert reply.names() == ["start", "token", "error", "done"]
    assert reply.text() == "Bonjour"
    assert reply.data("error") == {
        "code": "provider_timeout",
        "message": "The chat model sent nothing for 1s.",
        "retryable": True,
    }
    assert reply.data("done")["finish_reason"] == "error"
    assert time.monotonic() - started < 10  # CLOUD_IDLE_TIMEOUT_SECONDS=1, not the fake's 30 s stall
    assert api.requests[model] == 1


def test_finish_reason_length_and_usage_reach_the_stream(provider, fake_api, point_at, start_server):
    url, _ = fake_api
    point_at(provider, url)
    server = start_server(provider=provider, chat_model=fresh("long"))
    with signed_in(server.url) as client:
        reply = chat(client, "Bonjour")
    assert reply.text() == "Bonjour le monde !"
    assert reply.data("done")["finish_reason"] == "length"
    assert reply.data("done")["usage"] == {"prompt_tokens": 11, "completion_tokens": 4}


# -- the provider itself ------------------------------------------------------


def request_for(model: str) -> ChatRequest:
    return ChatRequest(messages=[ChatMessage("user", "Bonjour")], model=model)


async def first_error(provider_obj, model: str) -> ProviderError:
    try:
        async for _ in provider_obj.stream(request_for(model)):
            pass
    except ProviderError as error:
        return error
    finally:
        await provider_obj.aclose()
    raise AssertionError("no error")


@pytest.mark.parametrize(
    ("scenario", "expected", "retryable"),
    [
        ("401", ProviderAuthError, False),
        ("429", ProviderRateLimited, True),
        ("ctx-openai", ContextTooLong, False),
        ("400", ProviderError, False),  # "context length" in the text, another code: not ContextTooLong
        ("503", ProviderUnavailable, True),
        ("stall-first", ProviderTimeout, True),
    ],
)
def test_error_mapping_uses_status_and_code_only(
    provider, scenario, expected, retryable, fake_api, point_at, fast_timeouts
):
    url, _ = fake_api
    point_at(provider, url)
    error = asyncio.run(first_error(MAKERS[provider](None), fresh(scenario)))
    assert type(error) is expected
    assert error.retryable is retryable
    if scenario == "429":
        assert isinstance(error, ProviderRateLimited) and error.retry_after == 7
    assert SECRET_KEY not in error.message


def test_closing_the_stream_closes_the_upstream_connection_at_once(provider, fake_api, point_at, fast_timeouts):
    url, api = fake_api
    point_at(provider, url)
    model = fresh("stall-mid")

    async def body() -> float:
        p = MAKERS[provider](None, cloud_idle_timeout_seconds=60)
        try:
            stream = p.stream(request_for(model))
            first = await anext(stream)
            assert first.text == "Bonjour"
            closed = time.monotonic()
            await stream.aclose()  # what the core does when the client leaves
            return closed
        finally:
            await p.aclose()

    closed = asyncio.run(body())
    deadline = time.monotonic() + 5
    while model not in api.disconnected and time.monotonic() < deadline:
        time.sleep(0.01)
    assert model in api.disconnected, "the fake server never saw the connection close"
    assert api.disconnected[model] - closed < 1.0


def test_total_timeout_bounds_a_slow_reply(provider, fake_api, point_at, fast_timeouts):
    url, _ = fake_api
    point_at(provider, url)

    async def body() -> ProviderError:
        p = MAKERS[provider](None, cloud_total_timeout_seconds=0.5, cloud_idle_timeout_seconds=5)
        return await first_error(p, fresh("stall-mid"))

    started = time.monotonic()
    error = asyncio.run(body())
    assert isinstance(error, ProviderTimeout) and error.message == "The chat model did not finish within 0.5s."
    assert time.monotonic() - started < 5  # not the idle timeout


def http_client_closed(provider_obj) -> bool:
    if provider_obj.name == "openai":
        return bool(provider_obj.client.is_closed())
    return bool(provider_obj.client.sdk_configuration.async_client.is_closed)


def test_one_sdk_client_serves_every_request_and_aclose_closes_it(provider, fake_api, point_at, fast_timeouts):
    url, api = fake_api
    point_at(provider, url)
    model = fresh("ok")

    async def body() -> None:
        p = MAKERS[provider](None)
        client = p.client
        for _ in range(3):
            assert "".join([c.text async for c in p.stream(request_for(model))]) == "Bonjour le monde !"
            assert p.client is client
        assert not http_client_closed(p)
        await p.aclose()
        assert http_client_closed(p)
        with pytest.raises(ProviderUnavailable):
            await anext(p.stream(request_for(model)))

    asyncio.run(body())
    assert api.requests[model] == 3
    if provider == "openai":
        # One TCP connection for the three replies: the client's pool is reused, not rebuilt.
        # (The Mistral SDK closes the response at `[DONE]`, before the body's end is read,
        # so httpx drops that connection: one new connection per reply — README, "Clients".)
        assert len(set(api.client_ports[model])) == 1


# -- configuration ---------------------------------------------------------------


@pytest.mark.parametrize(("provider_name", "variable"), [("openai", "OPENAI_API_KEY"), ("mistral", "MISTRAL_API_KEY")])
def test_a_missing_key_stops_startup_with_one_line(provider_name, variable, monkeypatch, make_settings):
    from innova_server.app import create_app

    monkeypatch.delenv(variable, raising=False)
    with pytest.raises(ConfigError) as caught:
        create_app(make_settings(provider=provider_name))
    assert len(caught.value.lines) == 1 and variable in caught.value.lines[0]


@pytest.mark.parametrize("value", ["0", "-1", "inf", "nan", "abc"])
def test_timeouts_cannot_be_unlimited_or_invalid(value, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET_KEY)
    monkeypatch.setenv("CLOUD_IDLE_TIMEOUT_SECONDS", value)
    with pytest.raises(ConfigError) as caught:
        make_openai(None)
    assert caught.value.lines[0].startswith("CLOUD_IDLE_TIMEOUT_SECONDS")
    assert SECRET_KEY not in str(caught.value)


def test_the_key_is_a_secret_in_the_settings(monkeypatch):
    from innova_provider_cloud.settings import load_cloud_settings

    monkeypatch.setenv("OPENAI_API_KEY", SECRET_KEY)
    monkeypatch.setenv("MISTRAL_API_KEY", SECRET_KEY)
    settings = load_cloud_settings()
    assert SECRET_KEY not in repr(settings) and SECRET_KEY not in str(settings.model_dump())
    assert SECRET_KEY not in settings.model_dump_json()
