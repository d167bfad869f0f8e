"""`innova_server.asgi:app` — the object gunicorn and uvicorn serve in production.

A configuration problem prints one line per problem on stderr and exits with
status 3, which gunicorn treats as "worker failed to boot" and stops instead
of respawning forever.

`ENV` must be set in the process's real environment: unset means development,
whose console mailer logs every password-reset link — a production server
started without it would hand any account to whoever reads its logs. So this
entry point refuses to guess (`innova serve` is the development entry point).

It is also the one place the worker's garbage collector is tuned for serving
(`gctuning`): a test process, which builds many apps, keeps CPython's defaults.
"""

from __future__ import annotations

import os
import sys

from innova_server.app import create_app
from innova_server.gctuning import tune_for_serving
from innova_server.logconfig import configure_logging, stream_is_journal
from innova_server.settings import ConfigError

try:
    if not os.environ.get("ENV", "").strip():
        raise ConfigError(
            [
                "ENV is not set: set ENV=production in the service's environment "
                "(/etc/innovaplus/backend.env), or ENV=development / ENV=test explicitly."
            ]
        )
    configure_logging()
    app = create_app()
    tune_for_serving()  # after the app is built: see gctuning.py
except ConfigError as error:
    priority = "<3>" if stream_is_journal(sys.stderr) else ""  # journald: priority err
    for line in error.lines:
        print(f"{priority}innova: configuration error: {line}", file=sys.stderr)
    sys.exit(3)
