"""Several app hosts, on this machine: two gunicorn masters (deploy/gunicorn.conf.py)
on two loopback ports behind one nginx upstream (the production site), and one
database (SecantusDB of its own, as a replica set: `replicaSet=` in the URI).

- what one host does, the other sees: sessions, rate limits, a chat reply
  resumed and stopped through the other host;
- a deploy (gunicorn's graceful reload, what `systemctl reload` sends) while
  a reply streams through nginx: the reply completes, nothing answers 5xx;
- the database's primary steps down mid-traffic (`replSetStepDown`): no
  request gets a 500, writes wait for the primary (or get 503), no message
  is lost, and `/health` keeps every host in the pool.
"""

from __future__ import annotations

import collections
import contextlib
import json
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse
from pymongo import MongoClient
from pymongo.errors import PyMongoError

from innova_server.embedded import secantus_available
from innova_server.testing.chat_client import PASSWORD, Stream, resume
from innova_server.testing.server import start_of_a_fresh_window, wait_until_healthy

from .conftest import (
    SITE_CONF,
    TLSFiles,
    free_port,
    render_nginx,
    require_tool,
    start_gunicorn,
    stop_process,
    wait_for_port,
)

REPLICA_SET = "secantus"  # the set name SecantusDB advertises
DELAY_MS = 60  # between streamed words
LOGIN_LIMIT = 4  # failed logins per email, shared by the hosts


@dataclass
class Host:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Cluster:
    https: str
    ca: Path
    hosts: list[Host]
    mongo_uri: str  # the app's, with replicaSet=
    direct_uri: str  # to this one server, for the test's own reads and commands
    db_name: str
    nginx_log: Path
    threads_errors: list[BaseException] = field(default_factory=list)

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("base_url", self.https)
        kwargs.setdefault("timeout", 60)
        return httpx.Client(verify=ssl.create_default_context(cafile=str(self.ca)), **kwargs)

    def logs(self) -> str:
        parts = [f"--- {h.name} ---\n" + "\n".join(h.log_text().splitlines()[-30:]) for h in self.hosts]
        if self.nginx_log.exists():
            parts.append("--- nginx ---\n" + "\n".join(self.nginx_log.read_text().splitlines()[-20:]))
        return "\n".join(parts)

    def db(self) -> Any:
        client: MongoClient[dict[str, Any]] = MongoClient(self.direct_uri, tz_aware=True)
        return contextlib.closing(client)


@pytest.fixture(scope="module")
def cluster(test_ca: TLSFiles, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    nginx = require_tool("nginx", "Debian package nginx; `nox -s tests` installs it with apt-get when run as root")
    if not secantus_available():
        pytest.skip("SecantusDB is not installed (innova-server[embedded]): the failover test needs replSetStepDown")
    tmp = tmp_path_factory.mktemp("hosts")
    storage = Path(tempfile.mkdtemp(prefix="innova-hosts-db-"))
    database = _start_secantus(storage / "db", tmp / "secantus.log")
    # heartbeatFrequencyMS: SecantusDB's step-down window ends by the clock,
    # without the topology change a real mongod announces to the drivers'
    # awaiting `hello`; the driver would notice the primary again only at its
    # next heartbeat (10 s by default).
    mongo_uri = f"mongodb://127.0.0.1:{database.port}/?replicaSet={REPLICA_SET}&heartbeatFrequencyMS=1000"
    db_name = f"innova_hosts_{uuid.uuid4().hex[:8]}"
    settings = {
        "DB_NAME": db_name,
        "WEB_CONCURRENCY": "1",
        "ECHO_DELAY_MS": str(DELAY_MS),
        "CHAT_CHECKPOINT_MS": "200",
        "RATE_LIMIT_LOGIN_EMAIL": f"{LOGIN_LIMIT}/15m",
        "RATE_LIMIT_CHAT_USER": "1000/1m",
        "RATE_LIMIT_REGISTER_IP": "1000/1h",
        "CHAT_MAX_CONCURRENT_STREAMS": "20",
        "MONGO_TIMEOUT_MS": "15000",
    }
    hosts: list[Host] = []
    nginx_process = None
    try:
        for name in ("host-a", "host-b"):
            port = free_port()
            process, log = start_gunicorn(tmp, mongo_uri, port, name=name, **settings)
            hosts.append(Host(name, f"http://127.0.0.1:{port}", process, log))
        for host in hosts:
            wait_until_healthy(host.url, process=host.process, timeout=90, log=host.log)
        ports = [int(host.url.rsplit(":", 1)[1]) for host in hosts]
        layout = render_nginx(
            SITE_CONF, tmp / "nginx", cert=test_ca.cert, key=test_ca.key, upstream_ports=ports, ipv6=False
        )
        check = subprocess.run(layout.command(nginx, "-t"), capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        nginx_process = subprocess.Popen(layout.command(nginx), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(layout.https_port, process=nginx_process)
        yield Cluster(
            https=f"https://127.0.0.1:{layout.https_port}",
            ca=test_ca.ca_pem,
            hosts=hosts,
            mongo_uri=mongo_uri,
            direct_uri=database.uri,
            db_name=db_name,
            nginx_log=layout.prefix / "logs" / "error.log",
        )
    finally:
        if nginx_process is not None:
            stop_process(nginx_process, signal.SIGTERM)
        for host in hosts:
            stop_process(host.process, signal.SIGTERM, timeout=40)
        stop_process(database.process, signal.SIGTERM)
        shutil.rmtree(storage, ignore_errors=True)


@dataclass
class Secantus:
    process: subprocess.Popen[bytes]
    port: int

    @property
    def uri(self) -> str:
        return f"mongodb://127.0.0.1:{self.port}/?directConnection=true"


def _start_secantus(storage: Path, log: Path) -> Secantus:
    """SecantusDB as its own program (as innova_server.embedded runs it), with
    mongod's `enableTestCommands` on: the failover test needs `configureFailPoint`."""
    port = free_port()
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "secantus", "--host", "127.0.0.1", "--port", str(port),
             "--storage-path", str(storage), "--log-level", "WARNING", "--enable-test-commands"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    database = Secantus(process, port)
    deadline = time.monotonic() + 60
    with contextlib.closing(MongoClient(database.uri, serverSelectionTimeoutMS=500)) as client:
        while True:
            try:
                if client.admin.command("serverStatus").get("pid") in (None, process.pid):
                    return database
            except PyMongoError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                stop_process(process, signal.SIGTERM)
                raise RuntimeError(f"SecantusDB did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)


def register(base_url: str, **kwargs: Any) -> tuple[str, str]:
    """A new user registered on `base_url`; (email, session token)."""
    email = f"u-{uuid.uuid4().hex[:10]}@example.org"
    response = httpx.post(
        f"{base_url}/auth/register", json={"email": email, "password": PASSWORD}, timeout=60, **kwargs
    )
    assert response.status_code == 201, response.text
    return email, response.cookies["innova_session"]


def on(host: Host, token: str) -> httpx.Client:
    """A client of one host (plain HTTP on loopback) holding the session `token`."""
    return httpx.Client(base_url=host.url, headers={"Cookie": f"innova_session={token}"}, timeout=60)


def words(count: int) -> str:
    return " ".join(f"mot{i}" for i in range(count))


# -- one nginx, two hosts ------------------------------------------------------------------


def test_nginx_spreads_requests_over_both_hosts(cluster: Cluster) -> None:
    with cluster.client() as client:
        for _ in range(8):
            assert client.get("/health").status_code == 200, cluster.logs()
    for host in cluster.hosts:
        assert '"GET /health HTTP/1.0"' in host.log_text() or '"GET /health HTTP/1.1"' in host.log_text(), host.name


def test_a_session_made_on_one_host_is_valid_on_the_other(cluster: Cluster) -> None:
    host_a, host_b = cluster.hosts
    email, token = register(host_a.url)
    with on(host_b, token) as client_b:
        me = client_b.get("/auth/me")
        assert me.status_code == 200, me.text
        assert me.json()["user"]["email"] == email if "user" in me.json() else me.json()["email"] == email
        assert client_b.post("/auth/logout").status_code in (200, 204)
    with on(host_a, token) as client_a:
        assert client_a.get("/auth/me").status_code == 401  # logged out on B: gone on A too


def test_rate_limits_are_shared_by_the_hosts(cluster: Cluster) -> None:
    email, _ = register(cluster.hosts[0].url)
    start_of_a_fresh_window(15 * 60)  # the limit's fixed window must hold all the attempts
    statuses = []
    for attempt in range(LOGIN_LIMIT + 1):
        host = cluster.hosts[attempt % 2]
        response = httpx.post(
            f"{host.url}/auth/login", json={"email": email, "password": "wrong password!"}, timeout=60
        )
        statuses.append(response.status_code)
    # LOGIN_LIMIT failures counted across A and B; the next one, on either, is refused.
    assert statuses[:LOGIN_LIMIT] == [401] * LOGIN_LIMIT, statuses
    assert statuses[LOGIN_LIMIT] == 429, statuses
    other = cluster.hosts[(LOGIN_LIMIT + 1) % 2]
    refused = httpx.post(f"{other.url}/auth/login", json={"email": email, "password": PASSWORD}, timeout=60)
    assert refused.status_code == 429 and "retry-after" in refused.headers


def test_a_reply_started_on_one_host_is_resumed_and_stopped_on_the_other(cluster: Cluster) -> None:
    host_a, host_b = cluster.hosts
    _, token = register(host_a.url)
    with on(host_a, token) as client_a, on(host_b, token) as client_b:
        # 1. Cut on A after a few words; B resumes it from the last event id, without gap or repeat.
        content = words(30)
        with connect_sse(client_a, "POST", "/chatlaya/message", json={"content": content}) as source:
            assert source.response.status_code == 200
            first = Stream(200, source.response.headers).read(source, tokens=4)
        message_id = first.data("start")["message_id"]
        rest = resume(client_b, message_id, first.last_id)
        assert rest.status == 200 and rest.names()[-1] == "done", rest.body
        assert first.text() + rest.text() == content

        # 2. Running on A, followed on B, stopped through B: A's stream ends `stopped`.
        with connect_sse(client_a, "POST", "/chatlaya/message", json={"content": words(400)}) as source:
            on_a = Stream(200, source.response.headers).read(source, tokens=3)
            message_id = on_a.data("start")["message_id"]
            followed = resume(client_b, message_id, on_a.last_id, tokens=1)
            assert followed.status == 200
            stop = client_b.post(f"/chatlaya/messages/{message_id}/stop")
            assert stop.status_code == 202, stop.text
            on_a.read(source)
        assert on_a.names()[-1] == "done" and on_a.data("done")["finish_reason"] == "stopped"
    with cluster.db() as mongo:
        doc = mongo[cluster.db_name].messages.find_one({"_id": _object_id(message_id)})
    assert doc is not None and (doc["status"], doc["finish_reason"]) == ("incomplete", "stopped")
    assert doc["content"] == on_a.text()


def test_a_reply_resumed_through_nginx_streams_word_by_word(cluster: Cluster) -> None:
    """The resume endpoint is a stream too: nginx must not buffer it."""
    with cluster.client() as client:
        assert (
            client.post(
                "/auth/register", json={"email": f"r-{uuid.uuid4().hex[:8]}@example.org", "password": PASSWORD}
            ).status_code
            == 201
        )
        with connect_sse(client, "POST", "/chatlaya/message", json={"content": words(40)}) as source:
            first = Stream(200, source.response.headers).read(source, tokens=2)
        message_id = first.data("start")["message_id"]
        arrivals = []
        with connect_sse(
            client, "GET", f"/chatlaya/messages/{message_id}/events", headers={"Last-Event-ID": first.last_id or ""}
        ) as source:
            assert source.response.status_code == 200
            for event in source.iter_sse():
                arrivals.append((event.event, time.monotonic()))
                if event.event == "done":
                    break
    tokens = [at for name, at in arrivals if name == "token"]
    # 38 words 60 ms apart, about 2.3 s (read from another host they come a
    # checkpoint at a time, several words per event): buffered by nginx, they
    # would all arrive within a few ms, at the end.
    assert len(tokens) >= 5, arrivals
    assert tokens[-1] - tokens[0] >= 0.4 * 38 * DELAY_MS / 1000, arrivals


def _object_id(value: str) -> Any:
    from bson import ObjectId

    return ObjectId(value)


# -- a deploy: graceful reload while a reply streams ------------------------------------------


class Poller(threading.Thread):
    """GETs `path` through nginx until stopped; counts the statuses (and connection errors)."""

    def __init__(self, cluster: Cluster, path: str = "/health") -> None:
        super().__init__(daemon=True)
        self.cluster, self.path = cluster, path
        self.statuses: collections.Counter[int | str] = collections.Counter()
        self.halt = threading.Event()

    def run(self) -> None:
        with self.cluster.client(timeout=30) as client:
            while not self.halt.is_set():
                try:
                    self.statuses[client.get(self.path).status_code] += 1
                except httpx.HTTPError as error:
                    self.statuses[type(error).__name__] += 1
                time.sleep(0.02)

    def stop(self) -> collections.Counter[int | str]:
        self.halt.set()
        self.join(30)
        return self.statuses


def _booted(host: Host) -> int:
    return host.log_text().count("Booting worker with pid")


def test_a_reply_streams_to_its_end_through_a_graceful_reload_of_every_host(cluster: Cluster) -> None:
    """What the deploy does on each host (`systemctl reload` = SIGHUP to the master):
    new workers start with the new code, the old ones finish their streams."""
    content = words(50)  # 49 x 60 ms: about 3 s of streaming
    poller = Poller(cluster)
    poller.start()
    before = [_booted(host) for host in cluster.hosts]
    with cluster.client() as client:
        assert (
            client.post(
                "/auth/register", json={"email": f"d-{uuid.uuid4().hex[:8]}@example.org", "password": PASSWORD}
            ).status_code
            == 201
        )
        with connect_sse(client, "POST", "/chatlaya/message", json={"content": content}) as source:
            assert source.response.status_code == 200
            reply = Stream(200, source.response.headers).read(source, tokens=3)
            for host in cluster.hosts:  # the reload, while the reply is mid-stream
                host.process.send_signal(signal.SIGHUP)
            reply.read(source)
        # New requests are served by the new workers meanwhile and after.
        for _ in range(5):
            assert client.get("/health").status_code == 200
    statuses = poller.stop()
    assert reply.names()[-1] == "done", reply.names()
    assert reply.data("done")["finish_reason"] == "stop"
    assert reply.text() == content
    for host, count in zip(cluster.hosts, before, strict=True):
        assert _booted(host) > count, f"{host.name}: no new worker after SIGHUP\n{cluster.logs()}"
    assert set(statuses) == {200}, f"during the reload: {dict(statuses)}\n{cluster.logs()}"
    assert statuses[200] >= 5


# -- the primary steps down mid-traffic --------------------------------------------------------


def _parse_sse(lines: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) of each event; an event whose data is not JSON fails with the whole stream."""
    events, name, data = [], "message", None
    for line in lines:
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data = line[5:].strip()
        elif line == "":
            if data is not None:
                try:
                    events.append((name, json.loads(data)))
                except ValueError as error:
                    raise AssertionError(f"not JSON: {data!r} in {lines!r}") from error
            name, data = "message", None
    return events


WRITES = ["insert", "update", "delete", "findAndModify"]


def _step_down(cluster: Cluster, seconds: int) -> threading.Timer:
    """The primary steps down for `seconds` (then is elected again).

    SecantusDB's `replSetStepDown` makes it a secondary for the window (hello
    without a primary, writes refused with 10107 NotWritablePrimary) but its
    refusal lacks the `RetryableWriteError` label that mongod (4.4+) puts on
    it, and drivers retry a write only on that label: the one write in flight
    at the step-down would fail here where it is retried against mongod. A
    `failCommand` failpoint answering writes with mongod's reply (10107 with
    the label) for the window supplies it; it is switched off just before the
    window ends, while the driver, seeing no primary, sends no write.
    """
    with cluster.db() as mongo:
        mongo.admin.command(
            {
                "configureFailPoint": "failCommand",
                "mode": "alwaysOn",
                "data": {"failCommands": WRITES, "errorCode": 10107, "errorLabels": ["RetryableWriteError"]},
            }
        )
        mongo.admin.command({"replSetStepDown": seconds, "force": True})

    def off() -> None:
        with cluster.db() as mongo:
            mongo.admin.command({"configureFailPoint": "failCommand", "mode": "off"})

    timer = threading.Timer(seconds - 0.3, off)
    timer.start()
    return timer


def test_a_primary_election_mid_traffic_loses_nothing_and_never_500s(cluster: Cluster) -> None:
    window = 3  # seconds without a primary
    outcomes: list[tuple[str, int | str, float, float]] = []  # (what, status, sent at, answered at)
    accepted: list[tuple[str, str]] = []  # (message_id, content) of every reply that started
    lock = threading.Lock()
    halt = threading.Event()
    errors: list[BaseException] = []

    def record(what: str, status: int | str, sent: float) -> None:
        with lock:
            outcomes.append((what, status, sent, time.monotonic()))

    def chatter(index: int) -> None:
        try:
            with cluster.client() as client:
                email = f"f{index}-{uuid.uuid4().hex[:8]}@example.org"
                assert client.post("/auth/register", json={"email": email, "password": PASSWORD}).status_code == 201
                turn = 0
                while not halt.is_set():
                    turn += 1
                    content = f"fil {index} tour {turn} " + words(4)
                    sent = time.monotonic()
                    with client.stream("POST", "/chatlaya/message", json={"content": content}) as response:
                        status = response.status_code
                        if status != 200:
                            response.read()
                            record("chat", status, sent)
                            continue
                        lines = list(response.iter_lines())
                    events = _parse_sse(lines)
                    record("chat", 200, sent)
                    names = [name for name, _ in events]
                    assert names[0] == "start" and names[-1] == "done", lines
                    with lock:
                        accepted.append((events[0][1]["message_id"], content))
                    record("chat-done:" + str(events[-1][1].get("finish_reason")), 200, sent)
        except BaseException as error:
            errors.append(error)

    def newcomer() -> None:
        try:
            with cluster.client() as client:
                while not halt.is_set():
                    email = f"n-{uuid.uuid4().hex[:8]}@example.org"
                    sent = time.monotonic()
                    response = client.post("/auth/register", json={"email": email, "password": PASSWORD})
                    record("register", response.status_code, sent)
                    client.cookies.clear()
        except BaseException as error:
            errors.append(error)

    def health(host: Host) -> None:
        while not halt.is_set():
            sent = time.monotonic()
            try:
                record(f"health:{host.name}", httpx.get(f"{host.url}/health", timeout=10).status_code, sent)
            except httpx.HTTPError as error:
                record(f"health:{host.name}", type(error).__name__, sent)
            time.sleep(0.1)

    threads = [threading.Thread(target=chatter, args=(i,), daemon=True) for i in range(3)]
    threads += [threading.Thread(target=newcomer, daemon=True)]
    threads += [threading.Thread(target=health, args=(host,), daemon=True) for host in cluster.hosts]
    for thread in threads:
        thread.start()
    time.sleep(1.5)  # traffic flowing
    stepped_down_at = time.monotonic()
    failpoint = _step_down(cluster, window)
    time.sleep(window + 3)  # through the election and after
    failpoint.join()
    halt.set()
    for thread in threads:
        thread.join(60)
    assert not errors, f"{[traceback.format_exception(e) for e in errors]!r}\n{cluster.logs()}"

    statuses = collections.Counter(status for _, status, _, _ in outcomes)
    print(f"failover: {len(outcomes)} requests, statuses {dict(statuses)}, {len(accepted)} replies")
    assert 500 not in statuses and 502 not in statuses, f"{dict(statuses)}\n{cluster.logs()}"
    assert set(statuses) <= {200, 201, 503}, dict(statuses)
    ended = stepped_down_at + window
    during = [(what, status) for what, status, sent, done in outcomes if sent <= ended and done >= stepped_down_at]
    # In flight at some point without a primary (one registration may span the whole window).
    waited = [
        done - sent
        for what, _, sent, done in outcomes
        if what == "register" and sent <= ended and done >= stepped_down_at
    ]
    print(
        f"failover: {len(during)} requests in flight without a primary; slowest registration {max(waited or [0]):.2f}s"
    )
    print(f"failover: not 2xx: {[(w, st) for w, st, _, _ in outcomes if st not in (200, 201)]}")
    for host in cluster.hosts:
        for line in host.log_text().splitlines():
            if "database unavailable" in line or "ERROR" in line:
                print(f"failover: {host.name}: {line}")
    assert any(what == "chat" for what, _ in during), "no chat message was in flight while there was no primary"
    assert waited, "no registration was tried while there was no primary"
    # /health kept every host in the pool through the election (a deliberate choice: db.ping).
    health = collections.Counter(s for what, s, _, _ in outcomes if what.startswith("health:"))
    assert set(health) == {200}, dict(health)
    # Every reply that started is stored, complete, with its user message.
    assert len(accepted) >= 6
    with cluster.db() as mongo:
        messages = mongo[cluster.db_name].messages
        for message_id, content in accepted:
            reply_doc = messages.find_one({"_id": _object_id(message_id)})
            assert reply_doc is not None, message_id
            assert (reply_doc["status"], reply_doc["content"]) == ("complete", content), reply_doc
            question = messages.find_one(
                {"conversation_id": reply_doc["conversation_id"], "role": "user", "content": content}
            )
            assert question is not None, content
    # Writes during the election waited for the new primary rather than failing.
    assert statuses[503] <= len(outcomes) // 4, dict(statuses)
    # And it is over: a write through nginx succeeds.
    email, _ = register(cluster.https, verify=ssl.create_default_context(cafile=str(cluster.ca)))
    assert email


def test_behind_a_load_balancer_the_real_client_ip_reaches_the_app(
    cluster: Cluster, test_ca: TLSFiles, tmp_path: Path
) -> None:
    """With deploy/nginx/innovaplus-real-ip.conf (the load balancer's address in
    set_real_ip_from; here loopback stands for it), nginx takes the client from
    the balancer's X-Forwarded-For and passes it on: the session records it."""
    nginx = require_tool("nginx", "Debian package nginx")
    snippet = tmp_path / "innovaplus-real-ip.conf"
    text = (SITE_CONF.parent / "innovaplus-real-ip.conf").read_text()
    assert "set_real_ip_from 10.0.0.0/24;" in text
    snippet.write_text(text.replace("set_real_ip_from 10.0.0.0/24;", "set_real_ip_from 127.0.0.1;"))
    port = int(cluster.hosts[0].url.rsplit(":", 1)[1])
    layout = render_nginx(
        SITE_CONF, tmp_path / "nginx", cert=test_ca.cert, key=test_ca.key, upstream_port=port, includes=(snippet,),
        ipv6=False,
    )  # fmt: skip
    check = subprocess.run(layout.command(nginx, "-t"), capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    process = subprocess.Popen(layout.command(nginx), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(layout.https_port, process=process)
        agent = f"behind-lb-{uuid.uuid4().hex[:8]}"
        # The balancer appended the client it saw (198.51.100.7) to what the client claimed.
        register(
            f"https://127.0.0.1:{layout.https_port}",
            verify=ssl.create_default_context(cafile=str(cluster.ca)),
            headers={"User-Agent": agent, "X-Forwarded-For": "203.0.113.66, 198.51.100.7"},
        )
    finally:
        stop_process(process, signal.SIGTERM)
    with cluster.db() as mongo:
        session = mongo[cluster.db_name].sessions.find_one({"user_agent": agent})
    assert session is not None and session["ip"] == "198.51.100.7"
