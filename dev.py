#!/usr/bin/env python3
"""Run nox on a machine that has only Python 3.11+: `python3 dev.py -s tests`.

Creates .venv-nox/ with nox on first use, then passes every argument to it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv-nox"
NOX = VENV / "bin" / "nox"


def main() -> int:
    if sys.version_info < (3, 11):
        print("Innova needs Python 3.11 or newer.", file=sys.stderr)
        return 1
    if not NOX.exists():
        print("dev.py: installing nox into .venv-nox/ (once)", file=sys.stderr)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
        subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", "nox>=2024.4"], check=True)
    os.chdir(ROOT)
    return subprocess.call([str(NOX), *sys.argv[1:]])


if __name__ == "__main__":
    raise SystemExit(main())
