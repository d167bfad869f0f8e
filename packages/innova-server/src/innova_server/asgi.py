"""`innova_server.asgi:app` — the object gunicorn and uvicorn serve in production.

A configuration problem prints one line per problem on stderr and exits with
status 3, which gunicorn treats as "worker failed to boot" and stops instead
of respawning forever.
"""

from __future__ import annotations

import sys

from innova_server.app import create_app
from innova_server.logconfig import configure_logging, stream_is_journal
from innova_server.settings import ConfigError

try:
    configure_logging()
    app = create_app()
except ConfigError as error:
    priority = "<3>" if stream_is_journal(sys.stderr) else ""  # journald: priority err
    for line in error.lines:
        print(f"{priority}innova: configuration error: {line}", file=sys.stderr)
    sys.exit(3)
