"""Per-IP limits key an IPv6 client by its /64: one allocation is one client, not 2^64 of them."""

from __future__ import annotations

import httpx
import pytest

from innova_server.netutil import rate_limit_subject


@pytest.mark.parametrize(
    ("ip", "prefix", "subject"),
    [
        ("2001:db8:1:2:aaaa::1", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:3::1", 64, "2001:db8:1:3::/64"),
        ("2001:db8:1:2:aaaa::1", 48, "2001:db8:1::/48"),
        ("2001:db8::1", 128, "2001:db8::1/128"),
        ("[2001:db8::1]", 64, "2001:db8::/64"),
        ("::ffff:203.0.113.9", 64, "203.0.113.9"),
        ("203.0.113.9", 64, "203.0.113.9"),
        ("unknown", 64, "unknown"),
    ],
)
def test_rate_limit_subject(ip, prefix, subject):
    assert rate_limit_subject(ip, prefix) == subject


def test_a_64_shares_one_budget_and_another_64_has_its_own(start_server):
    server = start_server(rate_limit_register_ip="3/1h")

    def register(index: int, client_ip: str) -> int:
        body = {"email": f"v6-{index}@example.com", "password": "correct horse battery"}
        # Through the trusted (loopback) proxy, as nginx forwards it.
        return httpx.post(f"{server.url}/auth/register", json=body, headers={"X-Forwarded-For": client_ip}).status_code

    same_64 = [register(index, f"2001:db8:aa:1::{index + 1:x}") for index in range(3)]
    assert same_64 == [201, 201, 201]
    assert register(3, "2001:db8:aa:1:ffff:ffff:ffff:fffe") == 429  # a fourth address of that /64
    assert register(4, "2001:db8:aa:2::1") == 201  # the neighbouring /64 is someone else
    assert register(5, "203.0.113.7") == 201  # IPv4 keeps per-address keys
