"""Property test: whatever JSON a client sends, the auth endpoints answer a documented status."""

from __future__ import annotations

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=300),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=20), children, max_size=4),
    max_leaves=12,
)
bodies = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"email": st.one_of(st.emails(), st.text(max_size=300), json_values), "password": json_values},
        optional={"name": json_values, "token": json_values},
    ),
)
DOCUMENTED = {
    "/auth/register": {201, 409, 422, 429},
    "/auth/login": {200, 401, 422, 429},
    "/auth/logout": {204},
    "/auth/forgot": {202, 422, 429},
    "/auth/reset": {200, 400, 422},
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(sorted(DOCUMENTED)), body=bodies)
def test_any_json_body_gets_a_documented_answer(server, path, body):
    response = httpx.post(server.url + path, json=body, timeout=30)
    assert response.status_code in DOCUMENTED[path], (response.status_code, response.text)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=2000))
def test_any_bytes_get_a_4xx(server, raw):
    response = httpx.post(f"{server.url}/auth/login", content=raw, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500
