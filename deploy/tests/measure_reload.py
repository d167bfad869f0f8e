"""Measure how each way of replacing the app's code treats traffic (not a test: run it by hand).

    .nox/tests/bin/python -m deploy.tests.measure_reload [hup restart usr2]

For each way: nginx (the production site, test certificate) in front of one
gunicorn from deploy/gunicorn.conf.py (2 workers) on SecantusDB; three chat
replies streaming (about 4 s each) and a client polling /health through nginx
every 20 ms; then the code is replaced:

- hup:     SIGHUP to the master (`systemctl reload`, the unit's ExecReload):
           new workers, the old ones finish their requests and streams;
- restart: SIGTERM to the master, then a new gunicorn (`systemctl restart`);
- usr2:    SIGUSR2 (a new master re-executed beside the old), then SIGTERM
           to the old master once the new one serves.

Prints, per way: the /health answers during the swap by status (or error),
and how each reply ended. deploy/README.md quotes the figures.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import trustme
from httpx_sse import connect_sse

from innova_server.embedded import EmbeddedMongo
from innova_server.testing.chat_client import PASSWORD, Stream
from innova_server.testing.server import wait_until_healthy

from .conftest import PUBLIC_NAME, SITE_CONF, find_tool, free_port, render_nginx, start_gunicorn, stop_process

WORDS = 60  # x ECHO_DELAY_MS 70 ms: about 4 s per reply


def measure(way: str, root: Path, mongo_uri: str, cert: Path, key: Path, ca: Path) -> dict[str, Any]:
    tmp = root / way
    tmp.mkdir()
    port = free_port()
    env = {
        "ECHO_DELAY_MS": "70",
        "DB_NAME": f"measure_{uuid.uuid4().hex[:6]}",
        "CHAT_MAX_CONCURRENT_STREAMS": "10",
        "GUNICORN_CMD_ARGS": f"--pid {tmp / 'gunicorn.pid'}",
    }
    gunicorn, log = start_gunicorn(tmp, mongo_uri, port, name="g1", **env)
    wait_until_healthy(f"http://127.0.0.1:{port}", process=gunicorn, timeout=90, log=log)
    nginx_bin = find_tool("nginx")
    assert nginx_bin
    layout = render_nginx(SITE_CONF, tmp / "nginx", cert=cert, key=key, upstream_port=port, ipv6=False)
    nginx = subprocess.Popen(layout.command(nginx_bin), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"https://127.0.0.1:{layout.https_port}"
    verify = ssl.create_default_context(cafile=str(ca))
    time.sleep(0.5)
    statuses: collections.Counter[str] = collections.Counter()
    halt = threading.Event()
    endings: list[str] = []

    def poll() -> None:
        with httpx.Client(base_url=base, verify=verify, timeout=30) as client:
            while not halt.is_set():
                try:
                    statuses[str(client.get("/health").status_code)] += 1
                except httpx.HTTPError as error:
                    statuses[type(error).__name__] += 1
                time.sleep(0.02)

    def chat(started: threading.Event) -> None:
        with httpx.Client(base_url=base, verify=verify, timeout=60) as client:
            email = f"m-{uuid.uuid4().hex[:8]}@example.org"
            client.post("/auth/register", json={"email": email, "password": PASSWORD})
            content = " ".join(f"w{i}" for i in range(WORDS))
            try:
                with connect_sse(client, "POST", "/chatlaya/message", json={"content": content}) as source:
                    if source.response.status_code != 200:
                        endings.append(f"HTTP {source.response.status_code}")
                        started.set()
                        return
                    reply = Stream(200, source.response.headers).read(source, tokens=2)
                    started.set()
                    reply.read(source)
                done = reply.data("done") if "done" in reply.names() else None
                whole = reply.text() == content
                endings.append(f"done {done['finish_reason']} {'whole' if whole else 'CUT'}" if done else "no done")
            except httpx.HTTPError as error:
                endings.append(f"cut: {type(error).__name__}")
                started.set()

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    starts = [threading.Event() for _ in range(3)]
    chats = [threading.Thread(target=chat, args=(s,), daemon=True) for s in starts]
    for thread in chats:
        thread.start()
    for event in starts:
        event.wait(30)
    processes = [gunicorn]
    swapped = time.monotonic()
    if way == "hup":
        gunicorn.send_signal(signal.SIGHUP)
    elif way == "restart":
        stop_process(gunicorn, signal.SIGTERM, timeout=45)
        new, _ = start_gunicorn(tmp, mongo_uri, port, name="g2", **env)
        processes.append(new)
    elif way == "usr2":
        before = log.read_text().count("Booting worker")
        gunicorn.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 60
        while log.read_text().count("Booting worker") < before + 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)  # the new workers import the app
        gunicorn.send_signal(signal.SIGTERM)
    for thread in chats:
        thread.join(90)
    time.sleep(1)
    halt.set()
    poller.join(30)
    elapsed = time.monotonic() - swapped
    stop_process(nginx, signal.SIGTERM)
    for process in processes:
        stop_process(process, signal.SIGTERM, timeout=45)
    if way == "usr2":  # the re-executed master is no child of ours: found by its own pid file path
        marker = f"--pid {tmp / 'gunicorn.pid'}".encode()
        for proc in Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError):
                if marker in (proc / "environ").read_bytes() and int(proc.name) != os.getpid():
                    os.kill(int(proc.name), signal.SIGTERM)
    return {"way": way, "health": dict(statuses), "replies": endings, "seconds": round(elapsed, 1)}


def main() -> int:
    ways = sys.argv[1:] or ["hup", "restart", "usr2"]
    root = Path(tempfile.mkdtemp(prefix="innova-measure-"))
    ca = trustme.CA()
    server = ca.issue_cert(PUBLIC_NAME, "127.0.0.1")
    cert, key, ca_pem = root / "cert.pem", root / "key.pem", root / "ca.pem"
    server.private_key_pem.write_to_path(str(key))
    with cert.open("wb") as out:
        for blob in server.cert_chain_pems:
            out.write(blob.bytes())
    ca.cert_pem.write_to_path(str(ca_pem))
    try:
        with EmbeddedMongo(root / "db") as mongo:
            for way in ways:
                print(measure(way, root, mongo.uri, cert, key, ca_pem), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
