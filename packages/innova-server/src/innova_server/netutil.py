"""Who is the client: the peer, or what a trusted proxy says in `X-Forwarded-For`."""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from starlette.requests import HTTPConnection


@lru_cache(maxsize=64)
def _networks(trusted: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(item, strict=False) for item in trusted)


def _parse(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        return None


def _is_trusted(address: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    ip = _parse(address)
    return ip is not None and any(ip in network for network in networks)


# The client behind a trusted proxy whose `X-Forwarded-For` we cannot read:
# not an address, so never loopback (`/metrics`), and one shared rate-limit key.
UNKNOWN_CLIENT = "unknown"


def client_ip(connection: HTTPConnection, trusted_proxies: list[str]) -> str:
    """The client address as the rate limits and `/metrics` see it.

    `X-Forwarded-For` is believed only when the peer is a trusted proxy, and
    then read from the right, skipping further trusted hops (the left-most
    entries are whatever the client chose to send). A hop that is not an IP
    address, met before any untrusted one, makes the client `UNKNOWN_CLIENT`:
    answering with the proxy's own (loopback) address would hand an outside
    client the privileges of the proxy's host.
    """
    peer = connection.client.host if connection.client else ""
    networks = _networks(tuple(trusted_proxies))
    if not _is_trusted(peer, networks):
        return peer
    forwarded = connection.headers.get("x-forwarded-for")
    if forwarded is None:
        return peer
    hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
    if not hops:
        return UNKNOWN_CLIENT
    for hop in reversed(hops):
        if _parse(hop) is None:
            return UNKNOWN_CLIENT
        if not _is_trusted(hop, networks):
            return hop
    return hops[0]


def is_loopback(address: str) -> bool:
    ip = _parse(address)
    return ip is not None and ip.is_loopback


def rate_limit_subject(ip: str, ipv6_prefix: int) -> str:
    """What per-IP limits count for `ip`: an IPv6 client by its network (`/64` by default).

    One ordinary IPv6 allocation gives a client 2^64 addresses: keyed by the
    whole address, register, login and forgot limits would do nothing. An
    IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) counts as its IPv4 address.
    Anything that is not an address (`unknown`) stays as it is: one shared key.
    """
    address = _parse(ip)
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/{ipv6_prefix}", strict=False))
    return str(address) if address is not None else ip
