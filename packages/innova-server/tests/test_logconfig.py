"""Log lines carry their syslog priority when (and only when) stderr is journald's stream."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from innova_server.logconfig import JournalFormatter, formatter_for, stream_is_journal, syslog_priority


def test_levels_map_to_syslog_priorities() -> None:
    assert [syslog_priority(level) for level in (50, 40, 30, 20, 10, 5)] == [2, 3, 4, 6, 7, 7]
    assert syslog_priority(logging.ERROR + 5) == 3


def test_every_line_of_a_record_carries_the_prefix() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("innova.x", logging.ERROR, __file__, 1, "failed %s", ("here",), sys.exc_info())
    lines = JournalFormatter("%(levelname)s %(name)s: %(message)s").format(record).splitlines()
    assert lines[0] == "<3>ERROR innova.x: failed here"
    assert len(lines) > 2 and all(line.startswith("<3>") for line in lines)  # the traceback too
    assert lines[-1] == "<3>ValueError: boom"


def test_the_journal_is_recognised_by_device_and_inode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "stderr"
    with path.open("w") as stream, (tmp_path / "other").open("w") as other:
        info = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{info.st_dev}:{info.st_ino}")
        assert stream_is_journal(stream)
        assert not stream_is_journal(other)
        assert isinstance(formatter_for(stream), JournalFormatter)
        assert not isinstance(formatter_for(other), JournalFormatter)
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not stream_is_journal(stream)
        assert not stream_is_journal(None)


def test_the_app_logs_with_priorities_under_journald(tmp_path: Path) -> None:
    """A child process whose stderr is 'the journal': an error is `<3>`, a warning `<4>`, info `<6>`."""
    err = tmp_path / "err"
    code = (
        "import logging, os\n"
        "st = os.fstat(2); os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}'\n"
        "from innova_server.logconfig import configure_logging\n"
        "configure_logging('info')\n"
        "log = logging.getLogger('innova.test')\n"
        "log.error('an error'); log.warning('a warning'); log.info('some info'); log.debug('hidden')\n"
    )
    with err.open("w") as stderr:
        subprocess.run([sys.executable, "-c", code], stderr=stderr, check=True, timeout=60)
    lines = err.read_text().splitlines()
    assert [line[:3] for line in lines] == ["<3>", "<4>", "<6>"], lines
    assert lines[0].endswith("ERROR innova.test: an error")
    # Not the journal: no prefix.
    plain = subprocess.run(
        [sys.executable, "-c", code.replace("os.environ['JOURNAL_STREAM'] = ", "_ = ")],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert plain.stderr.splitlines()[0].split(" ", 2)[2] == "ERROR innova.test: an error"
