"""Log format: one line per event on stderr, which journald collects."""

from __future__ import annotations

import logging
import os


def configure_logging(level: str | None = None) -> None:
    level_name = (level or os.environ.get("LOG_LEVEL", "info")).upper()
    root = logging.getLogger()
    if not any(getattr(handler, "_innova", False) for handler in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler._innova = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    logging.getLogger("innova").setLevel(level_name)
    if root.level > logging.INFO:
        root.setLevel(logging.INFO)
