"""What the benchmark scripts share: a server process, its metrics, the results file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

RESULTS = Path(__file__).parent / "results"
PASSWORD = "correct horse battery"


def start_server(
    mongo_uri: str, port: int, db_name: str, *, uvicorn_args: tuple[str, ...] = (), **env: str
) -> subprocess.Popen[bytes]:
    """One uvicorn worker serving `innova_server.asgi:app`, with limits out of the way.

    uvicorn picks uvloop and httptools when they are installed (the
    `production` extra), as gunicorn's uvicorn workers do; `uvicorn_args`
    (e.g. `--loop asyncio --http h11`) override that."""
    environment = {
        **os.environ,
        "ENV": "development",
        "MONGO_URI": mongo_uri,
        "DB_NAME": db_name,
        "COOKIE_SECURE": "false",
        "RATE_LIMIT_LOGIN_EMAIL": "1000000/1m",
        "RATE_LIMIT_LOGIN_IP": "1000000/1m",
        "RATE_LIMIT_REGISTER_IP": "1000000/1m",
        "RATE_LIMIT_CHAT_USER": "1000000/1m",
        "CHAT_MAX_CONCURRENT_STREAMS": "100000",
        "LOG_LEVEL": "warning",
        **env,
    }
    command = [
        sys.executable, "-m", "uvicorn", "innova_server.asgi:app",
        "--host", "127.0.0.1", "--port", str(port),
        "--no-access-log", "--log-level", "warning", "--backlog", "2048", *uvicorn_args,
    ]
    return subprocess.Popen(command, env=environment)


def metric_sum(url: str, name: str) -> float:
    """Sum of a metric's samples; `name` may include a full label set to pick one sample."""
    text = httpx.get(f"{url}/metrics").text
    if "{" in name:
        return sum(float(v) for v in re.findall(rf"^{re.escape(name)} (\S+)$", text, re.M))
    return sum(float(v) for v in re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.M))


def mongo_commands(url: str) -> float:
    """MongoDB round trips the server has made so far (PyMongo command monitoring)."""
    return metric_sum(url, "innova_mongo_commands_total")


def write_results(name: str, results: dict[str, Any], **meta: Any) -> Path:
    results["meta"] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": sys.version.split()[0],
        "cores": os.cpu_count(),
        "database": "SecantusDB (Python server) on loopback",
        **meta,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"written {path}")
    return path
