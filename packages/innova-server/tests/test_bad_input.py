"""Malformed, oversized and hostile input gets a quick 4xx, never a 500."""

from __future__ import annotations

import re

import httpx
import pytest

PASSWORD = "correct horse battery"
JSON = {"content-type": "application/json"}


def argon2_runs(client: httpx.Client) -> float:
    text = client.get("/metrics").text
    return sum(float(m) for m in re.findall(r'^innova_argon2_operations_total\{op="\w+"\} (\S+)$', text, re.M))


@pytest.mark.parametrize("path", ["/auth/register", "/auth/login"])
@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b"{not json", {"content-type": "application/json"}),
        (b"", {"content-type": "application/json"}),
        (b"[]", {"content-type": "application/json"}),
        (b'"a string"', {"content-type": "application/json"}),
        (b'{"email": 5, "password": ["x"]}', {"content-type": "application/json"}),
        (b'{"email": "a@example.com"}', {"content-type": "application/json"}),
        (b'{"password": "long enough"}', {"content-type": "application/json"}),
        (b'{"email": "a@example.com", "password": "long enough", "admin": true}', {"content-type": "application/json"}),
        (b'{"email": "not-an-email", "password": "long enough"}', {"content-type": "application/json"}),
        (b'{"email": null, "password": null}', {"content-type": "application/json"}),
        (b"email=a@example.com&password=long+enough", {"content-type": "application/x-www-form-urlencoded"}),
        (b"\xff\xfe\x00garbage", {"content-type": "application/json"}),
        # Valid JSON that Python's parser refuses: nested too deeply, an
        # integer past int()'s 4300-digit limit.
        (b"[" * 100_000, {"content-type": "application/json"}),
        (b'{"email": "a@example.com", "password": ' + b"1" * 5000 + b"}", {"content-type": "application/json"}),
        (b'{"email": "a@example.com", "password": "long enough", "n": ' + b"9" * 5000 + b"}", JSON),
    ],
)
def test_malformed_bodies_are_422(server, path, body, headers):
    response = httpx.post(server.url + path, content=body, headers=headers)
    assert response.status_code == 422, response.text
    # FastAPI's validation shape: a list of {loc, msg, type}, nothing echoed.
    errors = response.json()["detail"]
    assert isinstance(errors, list) and errors
    assert all(set(error) == {"loc", "msg", "type"} for error in errors), errors


@pytest.mark.parametrize("password", ["short", "x" * 129])
def test_register_password_policy(server, password):
    response = httpx.post(f"{server.url}/auth/register", json={"email": "p@example.com", "password": password})
    assert response.status_code == 422


def test_huge_password_is_refused_without_running_argon2(server):
    with httpx.Client(base_url=server.url) as client:
        before = argon2_runs(client)
        for path in ("/auth/register", "/auth/login"):
            response = client.post(path, json={"email": "big@example.com", "password": "x" * 100_000})
            assert response.status_code == 422
        assert argon2_runs(client) == before
        # The counter does move when argon2 runs.
        assert client.post("/auth/register", json={"email": "ok@example.com", "password": PASSWORD}).status_code == 201
        assert argon2_runs(client) == before + 1


def test_oversized_body_is_413(start_server):
    server = start_server(max_body_bytes=4096)
    body = {"email": "a@example.com", "password": "x" * 10_000}
    response = httpx.post(f"{server.url}/auth/register", json=body)
    assert response.status_code == 413
    assert response.json()["detail"]["code"] == "payload_too_large"


def test_oversized_chunked_body_is_413(start_server):
    server = start_server(max_body_bytes=4096)

    def chunks():
        yield b'{"email": "a@example.com", "password": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    response = httpx.post(f"{server.url}/auth/register", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["detail"]["code"] == "payload_too_large"


def test_long_email_is_422(server):
    response = httpx.post(
        f"{server.url}/auth/register", json={"email": "a" * 5000 + "@example.com", "password": PASSWORD}
    )
    assert response.status_code == 422


def test_unknown_routes_and_methods_use_the_error_shape(server):
    missing = httpx.get(f"{server.url}/nope")
    assert missing.status_code == 404 and missing.json()["detail"]["code"] == "not_found"
    wrong = httpx.get(f"{server.url}/auth/login")
    assert wrong.status_code == 405 and wrong.json()["detail"]["code"] == "method_not_allowed"


@pytest.mark.parametrize(
    ("path", "password"),
    [("/auth/register", "short1"), ("/auth/register", "y" * 100_000), ("/auth/login", "y" * 100_000)],
)
def test_validation_errors_never_echo_the_input(server, path, password):
    response = httpx.post(f"{server.url}{path}", json={"email": "p@example.com", "password": password})
    assert response.status_code == 422
    assert password not in response.text
    assert len(response.content) < 2000
    errors = response.json()["detail"]
    assert [error["loc"] for error in errors] == [["body", "password"]]
    assert all(set(error) == {"loc", "msg", "type"} for error in errors)


def test_errors_never_echo_the_password(server):
    response = httpx.post(f"{server.url}/auth/register", json={"email": "bad", "password": "s3cret-value-123"})
    assert response.status_code == 422
    assert "s3cret-value-123" not in response.text
