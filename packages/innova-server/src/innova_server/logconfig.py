"""Log format: one line per event on stderr, which journald collects.

Under systemd (stderr connected to the journal, `JOURNAL_STREAM`), every line
starts with its syslog priority as sd-daemon(3) prefixes (`<3>` for ERROR,
`<4>` WARNING, `<6>` INFO, ...): journald strips the prefix and stores the
priority (the unit's `SyslogLevelPrefix=yes`, systemd's default), so
`journalctl -p warning` shows the warnings and errors. Elsewhere (a
terminal, a file, the tests) lines are plain. deploy/gunicorn.conf.py puts the
same formatter on gunicorn's own logs.
"""

from __future__ import annotations

import logging
import os
from typing import IO, Any

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# syslog priorities (sd-daemon(3)): 2 crit, 3 err, 4 warning, 5 notice, 6 info, 7 debug.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a Python log level (anything below INFO is debug, 7)."""
    for threshold, priority in _PRIORITIES:
        if levelno >= threshold:
            return priority
    return 7


def stream_is_journal(stream: IO[Any] | None) -> bool:
    """True when `stream` is the journald socket systemd connected (its `JOURNAL_STREAM`, "dev:inode")."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if stream is None or ":" not in expected:
        return False
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"


class JournalFormatter(logging.Formatter):
    """Prefixes each line of a record (a traceback's too) with `<priority>`."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines() or [""])


def formatter_for(stream: IO[Any] | None, fmt: str | None = FORMAT, datefmt: str | None = None) -> logging.Formatter:
    """`JournalFormatter` when `stream` goes to journald, else a plain `logging.Formatter`."""
    cls = JournalFormatter if stream_is_journal(stream) else logging.Formatter
    return cls(fmt, datefmt)


def configure_logging(level: str | None = None) -> None:
    level_name = (level or os.environ.get("LOG_LEVEL", "info")).upper()
    root = logging.getLogger()
    if not any(getattr(handler, "_innova", False) for handler in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(formatter_for(handler.stream))
        handler._innova = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    logging.getLogger("innova").setLevel(level_name)
    if root.level > logging.INFO:
        root.setLevel(logging.INFO)
