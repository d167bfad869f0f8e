"""Helpers for the deploy/ checks: where the tools are, and nginx on test ports.

The deployment files are checked by the real tools (actionlint, shellcheck,
nginx, systemd-analyze, visudo) and run end to end on loopback. A tool that
cannot be found makes its test skip with the reason; `nox -s tests` installs
them (pip for actionlint/shellcheck, apt-get for nginx and sudo when root).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from innova_server.embedded import free_port

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SITE_CONF = DEPLOY / "nginx" / "innovaplus-api.conf"
BOOTSTRAP_CONF = DEPLOY / "nginx" / "innovaplus-api-bootstrap.conf"
CERT_DIR = "/etc/letsencrypt/live/api.innovaplus.africa"
PUBLIC_NAME = "api.innovaplus.africa"
ECHO_DELAY_MS = 300
WORKERS = 2


def find_tool(name: str) -> str | None:
    """`name` next to this Python (the venv's wheels), on PATH, or in the sbin dirs."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")


def require_tool(name: str, how: str) -> str:
    path = find_tool(name)
    if path is None:
        pytest.skip(f"{name} is not installed ({how})")
    return path


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def wait_for_port(
    port: int, host: str = "127.0.0.1", timeout: float = 30.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with status {process.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


def _substitute(text: str, old: str, new: str) -> str:
    """Replace `old`, insisting that it is there: a renamed path must fail the test, not be skipped over."""
    assert old in text, f"expected {old!r} in the nginx site (did the file change?)"
    return text.replace(old, new)


@dataclass
class NginxLayout:
    prefix: Path
    conf: Path
    error_log: Path
    webroot: Path
    http_port: int
    https_port: int

    def command(self, nginx: str, *args: str) -> list[str]:
        return [nginx, "-p", str(self.prefix), "-c", str(self.conf), "-e", str(self.error_log), *args]


def render_nginx(
    site: Path,
    prefix: Path,
    *,
    cert: Path,
    key: Path,
    upstream_port: int = 8000,
    upstream_ports: list[int] | None = None,
    includes: tuple[Path, ...] = (),
    ipv6: bool = True,
) -> NginxLayout:
    """A runnable copy of `site`: test certificate, free loopback ports, temp prefix.

    Only addresses, ports, the certificate and the ACME webroot change; every
    other directive is the production file's.
    """
    prefix.mkdir(parents=True, exist_ok=True)
    for name in ("logs", "tmp", "webroot/.well-known/acme-challenge"):
        (prefix / name).mkdir(parents=True, exist_ok=True)
    http_port, https_port = free_port(), free_port()
    text = site.read_text()
    text = _substitute(text, "listen 80;", f"listen 127.0.0.1:{http_port};")
    text = _substitute(text, "listen [::]:80;", f"listen [::1]:{http_port};" if ipv6 else "")
    if "listen 443" in text:
        text = _substitute(text, "listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;")
        text = _substitute(text, "listen [::]:443 ssl http2;", f"listen [::1]:{https_port} ssl http2;" if ipv6 else "")
        text = _substitute(text, f"{CERT_DIR}/fullchain.pem", str(cert))
        text = _substitute(text, f"{CERT_DIR}/privkey.pem", str(key))
        ports = upstream_ports or [upstream_port]
        line = re.search(r"^( *)server 127\.0\.0\.1:8000( [^;]*)?;$", text, re.MULTILINE)
        assert line, "expected `server 127.0.0.1:8000 ...;` in the site's upstream (did the file change?)"
        servers = "\n".join(f"{line[1]}server 127.0.0.1:{port}{line[2] or ''};" for port in ports)
        text = text[: line.start()] + servers + text[line.end() :]
        for snippet in includes:  # http-level files (e.g. the real-IP one) included before the site
            text = f"include {snippet};\n" + text
    text = _substitute(text, "root /var/www/certbot;", f"root {prefix / 'webroot'};")
    assert not re.search(r"listen\s+(80|443)\b", text), "a listen directive was not moved to a test port"
    (prefix / "site.conf").write_text(text)

    tmp = prefix / "tmp"
    user = "user root root;\n" if os.geteuid() == 0 else ""  # workers read files under pytest's 0700 tmp
    mime = "include /etc/nginx/mime.types;" if Path("/etc/nginx/mime.types").exists() else ""
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"""{user}daemon off;
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "logs" / "error.log"} info;
events {{ worker_connections 256; }}
http {{
    {mime}
    default_type application/octet-stream;
    access_log {prefix / "logs" / "access.log"};
    client_body_temp_path {tmp / "body"};
    proxy_temp_path {tmp / "proxy"};
    fastcgi_temp_path {tmp / "fastcgi"};
    uwsgi_temp_path {tmp / "uwsgi"};
    scgi_temp_path {tmp / "scgi"};
    # As in Debian's nginx.conf: compression on (it must not delay the chat stream).
    gzip on;
    include {prefix / "site.conf"};
}}
"""
    )
    return NginxLayout(prefix, conf, prefix / "logs" / "error.log", prefix / "webroot", http_port, https_port)


@dataclass
class TLSFiles:
    ca_pem: Path
    cert: Path
    key: Path


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A private CA and a server certificate for the public name and loopback."""
    trustme = pytest.importorskip("trustme")
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    server = ca.issue_cert(PUBLIC_NAME, "127.0.0.1", "::1", "localhost")
    cert, key, ca_pem = directory / "fullchain.pem", directory / "privkey.pem", directory / "ca.pem"
    server.private_key_pem.write_to_path(str(key))
    with cert.open("wb") as out:
        for blob in server.cert_chain_pems:
            out.write(blob.bytes())
    ca.cert_pem.write_to_path(str(ca_pem))
    return TLSFiles(ca_pem, cert, key)


@pytest.fixture
def nginx_binary() -> str:
    return require_tool("nginx", "Debian package nginx; `nox -s tests` installs it with apt-get when run as root")


@pytest.fixture
def run_nginx_test(
    nginx_binary: str, test_ca: TLSFiles, tmp_path: Path
) -> Callable[[Path], subprocess.CompletedProcess[str]]:
    """`nginx -t` on a site file rendered with the test certificate."""

    def run(site: Path) -> subprocess.CompletedProcess[str]:
        layout = render_nginx(site, tmp_path / site.stem, cert=test_ca.cert, key=test_ca.key, ipv6=ipv6_loopback())
        return subprocess.run(layout.command(nginx_binary, "-t"), capture_output=True, text=True, timeout=30)

    return run


def stop_process(process: subprocess.Popen[bytes], sig: int, timeout: float = 20.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def fake_bin(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """Write an executable stand-in for a system command into a PATH directory."""
    directory = tmp_path / "fake-bin"
    directory.mkdir()

    def write(name: str, script: str) -> Path:
        path = directory / name
        path.write_text(script)
        path.chmod(0o755)
        return path

    yield write


def start_gunicorn(
    tmp: Path, mongo_uri: str, port: int, *, name: str = "gunicorn", journal: bool = False, **extra_env: str
) -> tuple[subprocess.Popen[bytes], Path]:
    """gunicorn from deploy/gunicorn.conf.py, as the unit starts it, on 127.0.0.1:`port`; its log file.

    `journal`: the log file stands in for journald's stream (JOURNAL_STREAM names it, as systemd does).
    """
    gunicorn = find_tool("gunicorn")
    if gunicorn is None:
        pytest.skip("gunicorn is not installed (pip install 'innova-server[production]')")
    log = tmp / f"{name}.log"
    work = tmp / f"{name}-cwd"  # no stray .env from the repository
    work.mkdir()
    keep = ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "HOME", "TMPDIR", "SYSTEMROOT", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env.update(
        ENV="development",
        HOST="127.0.0.1",
        PORT=str(port),  # gunicorn.conf.py builds its bind from HOST/PORT
        WEB_CONCURRENCY=str(WORKERS),
        MONGO_URI=mongo_uri,
        DB_NAME=f"innova_e2e_{uuid.uuid4().hex[:10]}",
        INNOVA_DATA_DIR=str(tmp / f"{name}-data"),
        PROVIDER="echo",
        ECHO_DELAY_MS=str(ECHO_DELAY_MS),
        MAILER="console",
        ARGON2_TIME_COST="1",
        ARGON2_MEMORY_COST="1024",
        ARGON2_PARALLELISM="1",
        LOG_LEVEL="info",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra_env)
    log.touch()
    if journal:
        info = log.stat()
        env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [gunicorn, "--config", str(DEPLOY / "gunicorn.conf.py")],
            cwd=work,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return process, log
