"""The operations scripts, run for real against stand-ins for the system
commands they drive (ufw, mongodump): never against this machine's firewall."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from .conftest import DEPLOY, free_port

# A tiny ufw: keeps its rules, defaults and state in files, answers
# `show added` like the real one, and logs every call.
FAKE_UFW = r"""#!/usr/bin/env bash
set -euo pipefail
state=${FAKE_UFW_STATE:?}
mkdir -p "$state"; touch "$state/rules" "$state/calls"
echo "$*" >> "$state/calls"
args=("$@")
[[ ${args[0]} == --force ]] && args=("${args[@]:1}")
case ${args[0]} in
  default) echo "${args[2]} ${args[1]}" >> "$state/defaults" ;;
  allow|deny|limit)
    rule="ufw ${args[*]}"
    if grep -qxF "$rule" "$state/rules"; then echo "Skipping adding existing rule"
    else echo "$rule" >> "$state/rules"; echo "Rule added"; fi ;;
  delete)
    rule="ufw ${args[*]:1}"
    grep -vxF "$rule" "$state/rules" > "$state/rules.new" || true
    mv "$state/rules.new" "$state/rules"; echo "Rule deleted" ;;
  show) echo "Added user rules (see 'ufw status' for running firewall):"; cat "$state/rules" ;;
  enable) echo active > "$state/status" ;;
  status) cat "$state/status" 2>/dev/null || echo inactive ;;
  *) echo "fake ufw: unexpected: $*" >&2; exit 2 ;;
esac
"""


def run_ufw(fake_bin: Callable[[str, str], Path], tmp_path: Path, defaults: Path) -> subprocess.CompletedProcess[str]:
    ufw = fake_bin("ufw", FAKE_UFW)
    env = {**os.environ, "UFW": str(ufw), "UFW_DEFAULTS": str(defaults), "FAKE_UFW_STATE": str(tmp_path / "ufw")}
    return subprocess.run(
        ["bash", str(DEPLOY / "firewall" / "ufw.sh")], capture_output=True, text=True, env=env, timeout=60
    )


def test_ufw_opens_only_22_80_443_and_converges(fake_bin: Callable[[str, str], Path], tmp_path: Path) -> None:
    defaults = tmp_path / "default-ufw"
    defaults.write_text('IPV6=no\nDEFAULT_INPUT_POLICY="DROP"\n')
    state = tmp_path / "ufw"
    state.mkdir()
    # Leftovers from before: a backend port opened by hand, and SSH already there.
    (state / "rules").write_text("ufw allow 8000/tcp\nufw allow 22/tcp\nufw allow 27017\n")

    first = run_ufw(fake_bin, tmp_path, defaults)
    assert first.returncode == 0, first.stderr
    assert (state / "rules").read_text().splitlines() == ["ufw allow 22/tcp", "ufw allow 80/tcp", "ufw allow 443/tcp"]
    assert "IPV6=yes" in defaults.read_text()  # rules apply to IPv4 and IPv6
    assert "incoming deny" in (state / "defaults").read_text()
    assert (state / "status").read_text().strip() == "active"
    calls = (state / "calls").read_text().splitlines()
    assert calls.index("allow 22/tcp") < calls.index("--force enable")  # SSH before enabling

    # Idempotent: a second run changes nothing and deletes nothing.
    (state / "calls").write_text("")
    second = run_ufw(fake_bin, tmp_path, defaults)
    assert second.returncode == 0, second.stderr
    assert (state / "rules").read_text().splitlines() == ["ufw allow 22/tcp", "ufw allow 80/tcp", "ufw allow 443/tcp"]
    assert not [c for c in (state / "calls").read_text().splitlines() if "delete" in c]
    assert defaults.read_text().count("IPV6=") == 1


FAKE_MONGODUMP = r"""#!/usr/bin/env bash
# Records its arguments and config, writes OUT/DB/x.bson like mongodump --out.
set -euo pipefail
echo "$*" > "$FAKE_LOG"
while [[ $# -gt 0 ]]; do
  case $1 in
    --config) cp "$2" "$FAKE_LOG.config"; shift 2 ;;
    --db) db=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) shift ;;
  esac
done
[[ ${FAKE_FAIL:-0} == 1 ]] && { echo "fake mongodump: failure" >&2; exit 1; }
mkdir -p "$out/$db"; echo dump > "$out/$db/users.bson"
"""


def run_backup(fake_bin: Callable[[str, str], Path], tmp_path: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    mongodump = fake_bin("mongodump", FAKE_MONGODUMP)
    env_file = tmp_path / "backend.env"
    env_file.write_text(
        "ENV=production\nMONGO_URI=mongodb://appuser:s3cret@127.0.0.1:27017/innova_db?authSource=innova_db\nDB_NAME=innova_db\n"
    )
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("MONGO_URI", "DB_NAME")},
        "ENV_FILE": str(env_file),
        "BACKUP_ROOT": str(tmp_path / "backups"),
        "RETENTION_DAYS": "7",
        "MONGODUMP": str(mongodump),
        "FAKE_LOG": str(tmp_path / "mongodump.args"),
        **extra,
    }
    return subprocess.run(
        ["bash", str(DEPLOY / "backup" / "mongo-backup.sh")], capture_output=True, text=True, env=env, timeout=60
    )


def test_backup_writes_todays_dump_and_applies_retention(fake_bin: Callable[[str, str], Path], tmp_path: Path) -> None:
    root = tmp_path / "backups"
    today = dt.date.today()
    old = root / f"innova-{today - dt.timedelta(days=30):%Y-%m-%d}"
    recent = root / f"innova-{today - dt.timedelta(days=3):%Y-%m-%d}"
    unrelated = root / "innova-notes"
    for directory in (old, recent, unrelated):
        directory.mkdir(parents=True)

    result = run_backup(fake_bin, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    target = root / f"innova-{today:%Y-%m-%d}"
    assert (target / "innova_db" / "users.bson").exists()
    assert not old.exists() and recent.exists() and unrelated.exists()
    args = (tmp_path / "mongodump.args").read_text()
    assert "--db innova_db" in args and f"--out {target}.partial" in args
    # The password is handed over in a config file, never on the command line.
    assert "s3cret" not in args
    assert "s3cret" in (tmp_path / "mongodump.args.config").read_text()


def test_backup_failure_keeps_the_previous_dump(fake_bin: Callable[[str, str], Path], tmp_path: Path) -> None:
    target = tmp_path / "backups" / f"innova-{dt.date.today():%Y-%m-%d}"
    (target / "innova_db").mkdir(parents=True)
    (target / "innova_db" / "users.bson").write_text("earlier today")
    result = run_backup(fake_bin, tmp_path, FAKE_FAIL="1")
    assert result.returncode != 0
    assert (target / "innova_db" / "users.bson").read_text() == "earlier today"
    assert not Path(f"{target}.partial").exists()


def test_backup_refuses_a_bad_retention(fake_bin: Callable[[str, str], Path], tmp_path: Path) -> None:
    result = run_backup(fake_bin, tmp_path, RETENTION_DAYS="0")
    assert result.returncode == 2 and "RETENTION_DAYS" in result.stderr


def test_restore_refuses_a_directory_that_is_not_a_dump(tmp_path: Path) -> None:
    env = {**os.environ, "MONGO_URI": "mongodb://127.0.0.1:1/innova_db", "DB_NAME": "innova_db"}
    result = subprocess.run(
        ["bash", str(DEPLOY / "backup" / "mongo-restore.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 1 and "not a dump of innova_db" in result.stderr


def test_wait_healthy_gives_up_after_the_bounded_retries() -> None:
    port = free_port()  # nothing listens there
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(DEPLOY / "scripts" / "wait-healthy.sh"), f"http://127.0.0.1:{port}/health", "3", "0.2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stdout.count("not healthy yet") == 3
    assert time.monotonic() - started < 30


def test_remote_deploy_refuses_an_unknown_plugin_before_touching_anything(tmp_path: Path) -> None:
    app = tmp_path / "backend"
    (app / "packages").mkdir(parents=True)
    for package in ("innova-server", "innova-provider-echo"):
        (app / "packages" / package).symlink_to(DEPLOY.parent / "packages" / package)
    plugins = tmp_path / "plugins.txt"
    plugins.write_text("# chosen for PROVIDER=echo\ninnova-provider-echo\n\ninnova-provider-nope  # typo\n")
    result = subprocess.run(
        ["bash", str(DEPLOY / "scripts" / "remote-deploy.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "APP_DIR": str(app), "PLUGINS_FILE": str(plugins), "SKIP_RESTART": "1"},
    )
    assert result.returncode == 1
    assert "'innova-provider-nope'" in result.stderr and "not in packages/" in result.stderr
    assert not (app / ".venv").exists()
