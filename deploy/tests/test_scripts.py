"""The operations scripts, run for real against stand-ins for the system
commands they drive (ufw, mongodump, mongorestore, docker, mongosh, the
python3 that makes the venv): never against this machine's firewall,
database or package index."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest

from .conftest import DEPLOY, free_port

# A tiny ufw: keeps its rules, defaults and state in files, answers
# `show added` like the real one (`ufw allow 22/tcp comment 'x'`), and logs every call.
FAKE_UFW = r"""#!/usr/bin/env bash
set -euo pipefail
state=${FAKE_UFW_STATE:?}
mkdir -p "$state"; touch "$state/rules" "$state/calls"
echo "$*" >> "$state/calls"
args=("$@")
[[ ${args[0]} == --force ]] && args=("${args[@]:1}")
same() { grep -- "^ufw $1 $2\( comment .*\)\?$" "$state/rules" || true; }
case ${args[0]} in
  default) echo "${args[2]} ${args[1]}" >> "$state/defaults" ;;
  allow|deny|limit)
    rule="ufw ${args[0]} ${args[1]}"
    [[ ${args[2]:-} == comment ]] && rule="$rule comment '${args[3]}'"
    existing=$(same "${args[0]}" "${args[1]}")
    if [[ $existing == "$rule" ]]; then echo "Skipping adding existing rule"
    elif [[ -n $existing ]]; then  # real ufw: same rule, another comment -> the comment is updated
      grep -vxF -- "$existing" "$state/rules" > "$state/rules.new" || true
      echo "$rule" >> "$state/rules.new"; mv "$state/rules.new" "$state/rules"; echo "Rule updated"
    else echo "$rule" >> "$state/rules"; echo "Rule added"; fi ;;
  delete)  # matches the rule whatever its comment, as real ufw does
    existing=$(same "${args[1]}" "${args[2]}")
    grep -vxF -- "$existing" "$state/rules" > "$state/rules.new" || true
    mv "$state/rules.new" "$state/rules"; echo "Rule deleted" ;;
  show) echo "Added user rules (see 'ufw status' for running firewall):"; cat "$state/rules" ;;
  enable) echo active > "$state/status" ;;
  status) cat "$state/status" 2>/dev/null || echo inactive ;;
  *) echo "fake ufw: unexpected: $*" >&2; exit 2 ;;
esac
"""

# `sshd -T` prints the effective configuration, one `keyword value` per line.
FAKE_SSHD = r"""#!/usr/bin/env bash
[[ $1 == -T ]] || exit 2
[[ -n ${FAKE_SSHD_FAIL:-} ]] && { echo "sshd: no hostkeys available -- exiting." >&2; exit 1; }
echo "port ${FAKE_SSHD_PORT:-22}"
echo "addressfamily any"
echo "listenaddress [::]:${FAKE_SSHD_PORT:-22}"
echo "listenaddress 0.0.0.0:${FAKE_SSHD_PORT:-22}"
echo "permitrootlogin without-password"
"""

# `ss -H -tlnp` as it prints on Debian 12.
FAKE_SS = r"""#!/usr/bin/env bash
p=${FAKE_SS_PORT:-22}
echo 'LISTEN 0      511          0.0.0.0:80         0.0.0.0:*    users:(("nginx",pid=700,fd=6))'
echo "LISTEN 0      128          0.0.0.0:$p       0.0.0.0:*    users:((\"sshd\",pid=612,fd=3))"
echo 'LISTEN 0      4096       127.0.0.1:8000       0.0.0.0:*    users:(("gunicorn",pid=801,fd=5))'
echo "LISTEN 0      128             [::]:$p          [::]:*    users:((\"sshd\",pid=612,fd=4))"
"""

OURS = "comment 'innovaplus'"


def run_ufw(
    fake_bin: Callable[[str, str], Path], tmp_path: Path, defaults: Path, **extra: str
) -> subprocess.CompletedProcess[str]:
    ufw = fake_bin("ufw", FAKE_UFW)
    sshd = fake_bin("sshd", FAKE_SSHD)
    ss = fake_bin("ss", FAKE_SS)
    env = {
        **{k: v for k, v in os.environ.items() if k != "SSH_PORTS"},
        "UFW": str(ufw),
        "SSHD": str(sshd),
        "SS": str(ss),
        "UFW_DEFAULTS": str(defaults),
        "FAKE_UFW_STATE": str(tmp_path / "ufw"),
        **extra,
    }
    return subprocess.run(
        ["bash", str(DEPLOY / "firewall" / "ufw.sh")], capture_output=True, text=True, env=env, timeout=60
    )


def _ufw_state(tmp_path: Path, rules: str = "") -> tuple[Path, Path]:
    defaults = tmp_path / "default-ufw"
    defaults.write_text('IPV6=no\nDEFAULT_INPUT_POLICY="DROP"\n')
    state = tmp_path / "ufw"
    state.mkdir()
    (state / "rules").write_text(rules)
    return defaults, state


def test_ufw_opens_ssh_80_443_keeps_foreign_rules_and_converges(
    fake_bin: Callable[[str, str], Path], tmp_path: Path
) -> None:
    # Leftovers from before: a backend port opened by hand, a monitoring rule: not ours, kept.
    defaults, state = _ufw_state(tmp_path, "ufw allow 8000/tcp\nufw allow from 10.0.0.5 to any port 9100 proto tcp\n")

    first = run_ufw(fake_bin, tmp_path, defaults)
    assert first.returncode == 0, first.stderr
    rules = (state / "rules").read_text().splitlines()
    assert rules == [
        "ufw allow 8000/tcp",
        "ufw allow from 10.0.0.5 to any port 9100 proto tcp",
        f"ufw allow 22/tcp {OURS}",
        f"ufw allow 80/tcp {OURS}",
        f"ufw allow 443/tcp {OURS}",
    ]
    assert "SSH listens on 22 (from sshd -T)" in first.stdout
    assert "not made by this script (kept" in first.stdout and "8000/tcp" in first.stdout
    assert "IPV6=yes" in defaults.read_text()  # rules apply to IPv4 and IPv6
    assert "incoming deny" in (state / "defaults").read_text()
    assert (state / "status").read_text().strip() == "active"
    calls = (state / "calls").read_text().splitlines()
    assert calls.index("allow 22/tcp comment innovaplus") < calls.index("--force enable")  # SSH before enabling
    assert not [c for c in calls if "delete" in c]  # never another's rule

    # Idempotent: a second run changes nothing and deletes nothing.
    (state / "calls").write_text("")
    second = run_ufw(fake_bin, tmp_path, defaults)
    assert second.returncode == 0, second.stderr
    assert (state / "rules").read_text().splitlines() == rules
    assert not [c for c in (state / "calls").read_text().splitlines() if "delete" in c]
    assert defaults.read_text().count("IPV6=") == 1


def test_ufw_keeps_ssh_on_the_port_sshd_really_uses(fake_bin: Callable[[str, str], Path], tmp_path: Path) -> None:
    """SSH on 2222: 2222 is opened before enabling, 22 is not opened at all."""
    defaults, state = _ufw_state(tmp_path)
    result = run_ufw(fake_bin, tmp_path, defaults, FAKE_SSHD_PORT="2222")
    assert result.returncode == 0, result.stderr
    rules = (state / "rules").read_text().splitlines()
    assert rules == [f"ufw allow 2222/tcp {OURS}", f"ufw allow 80/tcp {OURS}", f"ufw allow 443/tcp {OURS}"]
    calls = (state / "calls").read_text().splitlines()
    assert calls.index("allow 2222/tcp comment innovaplus") < calls.index("--force enable")


def test_ufw_moves_its_own_ssh_rule_after_sshd_moves(fake_bin: Callable[[str, str], Path], tmp_path: Path) -> None:
    """Our old 22 rule goes once 2222 is allowed; rules of someone else's stay."""
    defaults, state = _ufw_state(tmp_path, f"ufw allow 22/tcp {OURS}\nufw allow 5432/tcp comment 'db'\n")
    result = run_ufw(fake_bin, tmp_path, defaults, FAKE_SSHD_PORT="2222")
    assert result.returncode == 0, result.stderr
    rules = (state / "rules").read_text().splitlines()
    assert f"ufw allow 22/tcp {OURS}" not in rules
    assert "ufw allow 5432/tcp comment 'db'" in rules
    assert f"ufw allow 2222/tcp {OURS}" in rules
    calls = (state / "calls").read_text().splitlines()
    assert calls.index("allow 2222/tcp comment innovaplus") < calls.index("--force delete allow 22/tcp")


def test_ufw_falls_back_to_sshds_listening_socket(fake_bin: Callable[[str, str], Path], tmp_path: Path) -> None:
    defaults, state = _ufw_state(tmp_path)
    result = run_ufw(fake_bin, tmp_path, defaults, FAKE_SSHD_FAIL="1", FAKE_SS_PORT="2200")
    assert result.returncode == 0, result.stderr
    assert "SSH listens on 2200 (from ss" in result.stdout
    assert f"ufw allow 2200/tcp {OURS}" in (state / "rules").read_text().splitlines()


def test_ufw_changes_nothing_when_it_cannot_find_the_ssh_port(
    fake_bin: Callable[[str, str], Path], tmp_path: Path
) -> None:
    defaults, state = _ufw_state(tmp_path)
    no_ss = fake_bin("ss-none", "#!/usr/bin/env bash\nexit 0\n")
    result = run_ufw(fake_bin, tmp_path, defaults, FAKE_SSHD_FAIL="1", SS=str(no_ss))
    assert result.returncode == 1
    assert "SSH_PORTS=22" in result.stderr and "Nothing was changed" in result.stderr
    assert (state / "rules").read_text() == ""
    assert not (state / "calls").exists()
    # ...and the operator's explicit answer is used.
    given = run_ufw(fake_bin, tmp_path, defaults, FAKE_SSHD_FAIL="1", SS=str(no_ss), SSH_PORTS="2022")
    assert given.returncode == 0, given.stderr
    assert f"ufw allow 2022/tcp {OURS}" in (state / "rules").read_text().splitlines()


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
    # The password is handed over in a config file, never on the command line;
    # the database only by --db (none in the URI path, whose authSource stays).
    assert "s3cret" not in args
    assert (tmp_path / "mongodump.args.config").read_text().strip() == (
        'uri: "mongodb://appuser:s3cret@127.0.0.1:27017/?authSource=innova_db"'
    )


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


FAKE_MONGORESTORE = r"""#!/usr/bin/env bash
# Records its arguments, one per line, and the URI of its --config file.
set -euo pipefail
printf '%s\n' "$@" > "$FAKE_LOG"
while [[ $# -gt 0 ]]; do
  case $1 in
    --config) cp "$2" "$FAKE_LOG.config"; shift 2 ;;
    *) shift ;;
  esac
done
"""

URI_WITH_DB = "mongodb://appuser:s3cret@127.0.0.1:27017/innova_db?authSource=innova_db"


def run_restore(
    fake_bin: Callable[[str, str], Path], tmp_path: Path, dump: Path, *args: str, **extra: str
) -> subprocess.CompletedProcess[str]:
    mongorestore = fake_bin("mongorestore", FAKE_MONGORESTORE)
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("MONGO_URI", "DB_NAME", "FROM_DB")},
        "MONGO_URI": URI_WITH_DB,
        "DB_NAME": "innova_db",
        "MONGORESTORE": str(mongorestore),
        "FAKE_LOG": str(tmp_path / "mongorestore.args"),
        **extra,
    }
    return subprocess.run(
        ["bash", str(DEPLOY / "backup" / "mongo-restore.sh"), str(dump), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def a_dump(tmp_path: Path, db: str = "innova_db") -> Path:
    """A directory as mongo-backup.sh leaves it: DUMP/DB/*.bson."""
    dump = tmp_path / "innova-2026-11-24"
    (dump / db).mkdir(parents=True)
    (dump / db / "users.bson").write_bytes(b"")
    (dump / db / "users.metadata.json").write_text("{}")
    return dump


def test_restore_reads_the_whole_dump_filtered_to_the_database(
    fake_bin: Callable[[str, str], Path], tmp_path: Path
) -> None:
    """mongorestore treats a database in the URI path as --db, and then reads
    --dir as that database's own folder: DUMP/innova_db/ would be skipped and
    nothing restored (exit 0). So: the dump directory, --nsInclude, and a URI
    without the database (its authSource kept)."""
    dump = a_dump(tmp_path)
    result = run_restore(fake_bin, tmp_path, dump, "--drop")
    assert result.returncode == 0, result.stdout + result.stderr
    args = (tmp_path / "mongorestore.args").read_text().splitlines()
    assert args[args.index("--dir") + 1] == str(dump)
    assert args[args.index("--nsInclude") + 1] == "innova_db.*"
    assert "--drop" in args
    assert "--db" not in args and "--nsFrom" not in args
    assert not any("s3cret" in arg for arg in args)  # the password only in the config file
    config = (tmp_path / "mongorestore.args.config").read_text()
    assert config.strip() == 'uri: "mongodb://appuser:s3cret@127.0.0.1:27017/?authSource=innova_db"'


def test_restore_keeps_the_path_database_as_auth_source(fake_bin: Callable[[str, str], Path], tmp_path: Path) -> None:
    result = run_restore(
        fake_bin, tmp_path, a_dump(tmp_path), MONGO_URI="mongodb://appuser:pw@db.local/innova_db?tls=true"
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "mongorestore.args.config").read_text().strip() == (
        'uri: "mongodb://appuser:pw@db.local/?tls=true&authSource=innova_db"'
    )


def test_restore_into_another_database_renames_the_namespaces(
    fake_bin: Callable[[str, str], Path], tmp_path: Path
) -> None:
    result = run_restore(fake_bin, tmp_path, a_dump(tmp_path), DB_NAME="innova_restore_test", FROM_DB="innova_db")
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "mongorestore.args").read_text().splitlines()
    assert args[args.index("--nsInclude") + 1] == "innova_db.*"
    assert args[args.index("--nsFrom") + 1] == "innova_db.*"
    assert args[args.index("--nsTo") + 1] == "innova_restore_test.*"


def test_restore_refuses_a_directory_that_is_not_a_dump(fake_bin: Callable[[str, str], Path], tmp_path: Path) -> None:
    # The database's own folder given instead of the dump (DUMP/innova_db): no innova_db/ inside.
    inner = a_dump(tmp_path) / "innova_db"
    result = run_restore(fake_bin, tmp_path, inner)
    assert result.returncode == 1 and "not a dump of innova_db" in result.stderr
    assert not (tmp_path / "mongorestore.args").exists()


def test_restore_refuses_a_dump_without_collections(fake_bin: Callable[[str, str], Path], tmp_path: Path) -> None:
    dump = tmp_path / "innova-2026-11-24"
    (dump / "innova_db").mkdir(parents=True)
    result = run_restore(fake_bin, tmp_path, dump)
    assert result.returncode == 1 and "no .bson file" in result.stderr
    assert not (tmp_path / "mongorestore.args").exists()


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


# A python3 whose `-m venv DIR` makes a venv of recorders: DIR/bin/python logs
# each call (pip's arguments) and DIR/bin/innova answers `plugins`. It stands
# for the interpreter only so that the test sees what remote-deploy.sh asks
# pip to do without downloading anything.
FAKE_PYTHON = r"""#!/usr/bin/env bash
set -euo pipefail
[[ $1 == -m && $2 == venv ]] || { echo "fake python3: unexpected: $*" >&2; exit 2; }
mkdir -p "$3/bin"
printf '#!/usr/bin/env bash\nprintf "%%s\\n" "$*" >> "%s"\n' "$FAKE_LOG" > "$3/bin/python"
printf '#!/usr/bin/env bash\necho "fake innova $*"\n' > "$3/bin/innova"
chmod +x "$3/bin/python" "$3/bin/innova"
"""


def deploy_tree(tmp_path: Path) -> Path:
    """An APP_DIR like the server's: packages/ and deploy/ of this checkout."""
    app = tmp_path / "backend"
    (app / "packages").mkdir(parents=True)
    for package in ("innova-server", "innova-provider-echo", "innova-mailer"):
        (app / "packages" / package).symlink_to(DEPLOY.parent / "packages" / package)
    (app / "deploy").symlink_to(DEPLOY)
    return app


def run_remote_deploy(app: Path, plugins: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(DEPLOY / "scripts" / "remote-deploy.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "APP_DIR": str(app), "PLUGINS_FILE": str(plugins), "SKIP_RESTART": "1", **extra},
    )


def test_remote_deploy_refuses_an_unknown_plugin_before_touching_anything(tmp_path: Path) -> None:
    app = deploy_tree(tmp_path)
    plugins = tmp_path / "plugins.txt"
    plugins.write_text("# chosen for PROVIDER=echo\ninnova-provider-echo\n\ninnova-provider-nope  # typo\n")
    result = run_remote_deploy(app, plugins)
    assert result.returncode == 1
    assert "'innova-provider-nope'" in result.stderr and "not in packages/" in result.stderr
    assert not (app / ".venv").exists()


def test_remote_deploy_without_a_plugin_list_is_an_error_not_a_fallback(tmp_path: Path) -> None:
    """Installing a default set instead would drop innova-mailer: MAILER=smtp then exits 3 at start."""
    app = deploy_tree(tmp_path)
    result = run_remote_deploy(app, tmp_path / "etc" / "plugins.txt")
    assert result.returncode == 1
    assert "plugins.txt does not exist" in result.stderr and "nothing was installed" in result.stderr
    assert not (app / ".venv").exists()


def test_remote_deploy_with_an_empty_plugin_list_is_an_error(tmp_path: Path) -> None:
    app = deploy_tree(tmp_path)
    plugins = tmp_path / "plugins.txt"
    plugins.write_text("# nothing chosen yet\n\n")
    result = run_remote_deploy(app, plugins)
    assert result.returncode == 1 and "lists no package" in result.stderr
    assert not (app / ".venv").exists()


def test_remote_deploy_says_when_the_plugin_list_cannot_be_read(tmp_path: Path) -> None:
    """The layout the audit found: /etc/innovaplus 750 root:innova and `deploy`
    not in the group. As root the script runs as `nobody` in that layout; as
    another user, modes without the owner's bits give the same denials."""
    app = deploy_tree(tmp_path)
    etc = tmp_path / "etc-innovaplus"
    etc.mkdir()
    plugins = etc / "plugins.txt"
    plugins.write_text("innova-provider-echo\n")
    if os.geteuid() == 0:
        runner = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        locked_dir, open_dir, locked_file = 0o750, 0o751, 0o600
        base = Path(tempfile.gettempdir()).resolve()
        for path in (tmp_path, *tmp_path.parents):  # let `nobody` reach the tree (pytest makes them 0700)
            if base not in path.parents:
                break
            path.chmod(path.stat().st_mode | 0o005)
    else:
        runner, locked_dir, open_dir, locked_file = [], 0o640, 0o751, 0o200

    def deploy() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*runner, "bash", str(DEPLOY / "scripts" / "remote-deploy.sh")],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "APP_DIR": str(app), "PLUGINS_FILE": str(plugins), "SKIP_RESTART": "1"},
        )

    try:
        etc.chmod(locked_dir)
        result = deploy()
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"cannot enter {etc}" in result.stderr and "chmod 751" in result.stderr
        assert not (app / ".venv").exists()

        etc.chmod(open_dir)  # the runbook's mode: the file can be opened by name, not listed
        plugins.chmod(locked_file)
        result = deploy()
        assert result.returncode == 1, result.stdout + result.stderr
        assert "is not readable by" in result.stderr and "chmod 644" in result.stderr
        assert not (app / ".venv").exists()
    finally:
        etc.chmod(0o755)
        plugins.chmod(0o644)


def test_remote_deploy_installs_the_listed_plugins_pinned_by_the_constraints(
    fake_bin: Callable[[str, str], Path], tmp_path: Path
) -> None:
    app = deploy_tree(tmp_path)
    plugins = tmp_path / "plugins.txt"
    # The last line has no newline (as an editor may leave it): still read.
    plugins.write_text("innova-mailer\ninnova-provider-echo   # PROVIDER=echo")
    log = tmp_path / "pip.calls"
    python = fake_bin("python3", FAKE_PYTHON)
    result = run_remote_deploy(app, plugins, PYTHON=str(python), FAKE_LOG=str(log))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "fake innova plugins" in result.stdout
    calls = [line.split() for line in log.read_text().splitlines()]
    constraints = str(app / "deploy" / "constraints.txt")
    assert len(calls) == 2  # pip itself, then the packages
    for call in calls:
        assert call[:3] == ["-m", "pip", "install"]
        flag = "-c" if "-c" in call else "--constraint"
        assert call[call.index(flag) + 1] == constraints, call
    assert calls[-1][-3:] == [
        "./packages/innova-server[production]",
        "./packages/innova-mailer",
        "./packages/innova-provider-echo",
    ]


def test_remote_deploy_refuses_to_run_without_the_constraints(tmp_path: Path) -> None:
    app = deploy_tree(tmp_path)
    plugins = tmp_path / "plugins.txt"
    plugins.write_text("innova-provider-echo\n")
    result = run_remote_deploy(app, plugins, CONSTRAINTS=str(tmp_path / "none.txt"))
    assert result.returncode == 1 and "none.txt is missing" in result.stderr
    assert not (app / ".venv").exists()


def test_the_constraints_pin_every_package_a_production_install_pulls_in() -> None:
    """A new dependency (or a plugin's) without a refreshed deploy/constraints.txt
    would be installed at whatever version is newest on deployment day."""
    fresh = subprocess.run(
        [sys.executable, str(DEPLOY / "scripts" / "freeze-constraints.py")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    needed = {line.split("==")[0] for line in fresh.stdout.splitlines() if line and not line.startswith("#")}
    assert {"fastapi", "gunicorn", "uvicorn-worker", "pymongo", "aiosmtplib"} <= needed
    committed = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            committed[name] = version
    assert not [name for name in committed if name.startswith("innova-")]  # workspace packages are not pinned
    missing = sorted(needed - committed.keys())
    assert not missing, f"not pinned in deploy/constraints.txt (refresh it, README 'Dependency pins'): {missing}"


# A docker (or mongosh) that records its argv, the environment it was told to
# pass on with `-e NAME`, and its standard input.
FAKE_RECORDER = r"""#!/usr/bin/env bash
set -euo pipefail
printf '%s\n' "$@" > "$FAKE_LOG"
: > "$FAKE_LOG.env"
for name in MONGO_URI MONGO_ROOT_USERNAME MONGO_ROOT_PASSWORD INNOVA_APP_USER INNOVA_APP_PASSWORD INNOVA_DB_NAME \
    RS_MEMBERS; do
  if [[ -n "${!name:-}" ]]; then echo "$name=${!name}" >> "$FAKE_LOG.env"; fi
done
if [[ ! -t 0 ]]; then cat > "$FAKE_LOG.stdin"; fi
"""


def run_with_fakes(script: Path, fake_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MONGO", "APP_", "INNOVA_", "DB_NAME"))}
    return subprocess.run(
        ["bash", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        env={**clean, "PATH": f"{fake_dir}:{os.environ['PATH']}", **env},
    )


def test_create_appuser_puts_no_password_on_a_command_line(
    fake_bin: Callable[[str, str], Path], tmp_path: Path
) -> None:
    docker = fake_bin("docker", FAKE_RECORDER)
    mongo_env = tmp_path / "mongo.env"
    mongo_env.write_text("MONGO_ROOT_USERNAME=root\nMONGO_ROOT_PASSWORD=r00t-s3cret\nAPP_PASSWORD=app-s3cret\n")
    log = tmp_path / "docker.args"
    result = run_with_fakes(
        DEPLOY / "mongo" / "create-appuser.sh",
        docker.parent,
        {"MONGO_ENV_FILE": str(mongo_env), "FAKE_LOG": str(log)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    argv = log.read_text()
    assert "s3cret" not in argv  # ps shows argv to everyone: docker's, and mongosh's in the container
    assert argv.splitlines()[:2] == ["exec", "-i"] and "mongosh" in argv.splitlines()
    assert "-p" not in argv.splitlines() and "--password" not in argv
    passed = dict(line.split("=", 1) for line in (tmp_path / "docker.args.env").read_text().splitlines())
    assert passed["MONGO_ROOT_PASSWORD"] == "r00t-s3cret" and passed["INNOVA_APP_PASSWORD"] == "app-s3cret"
    assert passed["INNOVA_DB_NAME"] == "innova_db" and passed["INNOVA_APP_USER"] == "appuser"
    script = (tmp_path / "docker.args.stdin").read_text()
    login = 'db.getSiblingDB("admin").auth(process.env.MONGO_ROOT_USERNAME, process.env.MONGO_ROOT_PASSWORD)'
    assert script.startswith(login)  # mongosh logs in from the script, not from -p
    assert (DEPLOY / "mongo" / "initdb" / "01-appuser.js").read_text() in script


def test_rs_initiate_makes_a_three_member_set_without_a_password_on_a_command_line(
    fake_bin: Callable[[str, str], Path], tmp_path: Path
) -> None:
    docker = fake_bin("docker", FAKE_RECORDER)
    mongo_env = tmp_path / "mongo.env"
    mongo_env.write_text("MONGO_ROOT_PASSWORD=r00t-s3cret\nAPP_PASSWORD=app-s3cret\nMEMBER_ADDRESS=10.0.0.21\n")
    log = tmp_path / "docker.args"
    members = "db1.internal:27017 db2.internal:27017 db3.internal:27017"
    env = {"MONGO_ENV_FILE": str(mongo_env), "FAKE_LOG": str(log), "RS_MEMBERS": members}
    result = run_with_fakes(DEPLOY / "mongo" / "rs-initiate.sh", docker.parent, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "s3cret" not in log.read_text()
    passed = dict(line.split("=", 1) for line in (tmp_path / "docker.args.env").read_text().splitlines())
    assert passed["RS_MEMBERS"] == members and passed["INNOVA_APP_PASSWORD"] == "app-s3cret"
    script = (tmp_path / "docker.args.stdin").read_text()
    assert 'rs.initiate({ _id: "innova"' in script
    assert (DEPLOY / "mongo" / "initdb" / "01-appuser.js").read_text() in script
    # Two members cannot elect a primary when one is down: refused.
    two = run_with_fakes(DEPLOY / "mongo" / "rs-initiate.sh", docker.parent, {**env, "RS_MEMBERS": "a:1 b:1"})
    assert two.returncode == 2 and "must name 3 members" in two.stderr


def test_the_replica_set_compose_file_uses_a_keyfile_and_a_private_address() -> None:
    text = (DEPLOY / "mongo" / "compose-replicaset.yaml").read_text()
    assert '"--replSet", "innova", "--keyFile", "/etc/mongo-keyfile", "--auth"' in text
    assert "/etc/innovaplus/mongo-keyfile:/etc/mongo-keyfile:ro" in text
    assert '"${MEMBER_ADDRESS:?' in text and "0.0.0.0:27017" not in text
    assert "replicaSet=innova" in text
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        env = {**os.environ, "MONGO_ROOT_PASSWORD": "x", "APP_PASSWORD": "y", "MEMBER_ADDRESS": "10.0.0.21"}
        result = subprocess.run(
            ["docker", "compose", "-f", str(DEPLOY / "mongo" / "compose-replicaset.yaml"), "config", "--quiet"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr


URI = "mongodb://appuser:app-s3cret@127.0.0.1:27017/innova_db?authSource=innova_db"


def test_ping_with_the_hosts_mongosh_keeps_the_uri_off_the_command_line(
    fake_bin: Callable[[str, str], Path], tmp_path: Path
) -> None:
    mongosh = fake_bin("mongosh", FAKE_RECORDER)
    log = tmp_path / "mongosh.args"
    result = run_with_fakes(DEPLOY / "mongo" / "ping.sh", mongosh.parent, {"MONGO_URI": URI, "FAKE_LOG": str(log)})
    assert result.returncode == 0, result.stdout + result.stderr
    argv = log.read_text().splitlines()
    assert "--nodb" in argv and not any("s3cret" in arg for arg in argv)
    assert "connect(process.env.MONGO_URI)" in argv[argv.index("--eval") + 1]
    assert f"MONGO_URI={URI}" in (tmp_path / "mongosh.args.env").read_text().splitlines()


def test_ping_through_the_container_keeps_the_uri_off_the_command_line(
    fake_bin: Callable[[str, str], Path], tmp_path: Path
) -> None:
    if shutil.which("mongosh"):
        pytest.skip("mongosh is installed here: ping.sh would use it, not the container's")
    docker = fake_bin("docker", FAKE_RECORDER)
    log = tmp_path / "docker.args"
    result = run_with_fakes(DEPLOY / "mongo" / "ping.sh", docker.parent, {"MONGO_URI": URI, "FAKE_LOG": str(log)})
    assert result.returncode == 0, result.stdout + result.stderr
    argv = log.read_text().splitlines()
    assert argv[:4] == ["exec", "-e", "MONGO_URI", "innova-mongo"]  # -e NAME: the value from the environment
    assert "--nodb" in argv and not any("s3cret" in arg for arg in argv)
    assert f"MONGO_URI={URI}" in (tmp_path / "docker.args.env").read_text().splitlines()


FAKE_SYSTEMCTL = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_SYSTEMCTL_LOG"
[[ $1 == is-active ]] && exit "${FAKE_INACTIVE:-0}"
exit 0
"""


@pytest.mark.parametrize(
    ("extra", "action"),
    [
        ({}, "reload"),  # the deploy: graceful, nothing dropped
        ({"FAKE_INACTIVE": "3"}, "restart"),  # not running: start it
        ({"RESTART": "1"}, "restart"),  # asked for (a changed unit or env file)
    ],
    ids=["running", "stopped", "asked"],
)
def test_remote_deploy_reloads_the_service_unless_a_restart_is_needed(
    fake_bin: Callable[[str, str], Path], tmp_path: Path, extra: dict[str, str], action: str
) -> None:
    app = deploy_tree(tmp_path)
    plugins = tmp_path / "plugins.txt"
    plugins.write_text("innova-provider-echo\n")
    calls = tmp_path / "systemctl.calls"
    python = fake_bin("python3", FAKE_PYTHON)
    systemctl = fake_bin("systemctl", FAKE_SYSTEMCTL)
    # An existing virtualenv (a new one is a new Python: that restarts).
    subprocess.run(
        [str(python), "-m", "venv", str(app / ".venv")], check=True, env={**os.environ, "FAKE_LOG": "/dev/null"}
    )
    result = run_remote_deploy(
        app,
        plugins,
        PYTHON=str(python),
        FAKE_LOG=str(tmp_path / "pip.calls"),
        SKIP_RESTART="0",
        SYSTEMCTL=str(systemctl),
        FAKE_SYSTEMCTL_LOG=str(calls),
        **extra,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    done = [line for line in calls.read_text().splitlines() if line.split()[0] in ("reload", "restart")]
    assert done == [f"{action} innovaplus-backend.service"], calls.read_text()
    assert f"{action}ing innovaplus-backend.service" in result.stdout


def test_remote_deploy_restarts_when_the_masters_own_packages_change(
    fake_bin: Callable[[str, str], Path], tmp_path: Path
) -> None:
    """A new gunicorn/uvicorn: workers forked from the old master would keep its copy, so restart."""
    app = deploy_tree(tmp_path)
    plugins = tmp_path / "plugins.txt"
    plugins.write_text("innova-provider-echo\n")
    site = app / ".venv" / "lib" / "python3.11" / "site-packages"
    site.mkdir(parents=True)
    (site / "gunicorn-23.0.0.dist-info").mkdir()
    (app / ".venv" / "bin").mkdir()
    # pip "upgrades" gunicorn: the recorder also swaps the dist-info.
    upgrade = f'mv "{site}/gunicorn-23.0.0.dist-info" "{site}/gunicorn-27.0.1.dist-info" 2>/dev/null || true\n'
    (app / ".venv" / "bin" / "python").write_text(f"#!/usr/bin/env bash\n{upgrade}")
    (app / ".venv" / "bin" / "innova").write_text("#!/usr/bin/env bash\necho fake innova\n")
    for name in ("python", "innova"):
        (app / ".venv" / "bin" / name).chmod(0o755)
    calls = tmp_path / "systemctl.calls"
    systemctl = fake_bin("systemctl", FAKE_SYSTEMCTL)
    result = run_remote_deploy(app, plugins, SKIP_RESTART="0", SYSTEMCTL=str(systemctl), FAKE_SYSTEMCTL_LOG=str(calls))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "restart innovaplus-backend.service" in calls.read_text().splitlines()
    assert "gunicorn, uvicorn or the Python changed" in result.stdout


# -- backups off the host, alerts, the restore check -------------------------------------------


def test_backup_copies_the_new_dump_off_the_host_with_rsync(
    fake_bin: Callable[[str, str], Path], tmp_path: Path
) -> None:
    """A second directory stands in for the remote: real rsync, the same command as over SSH."""
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed (Debian package rsync)")
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "innova-2020-01-01").mkdir()  # an old copy there: the remote keeps it
    first = run_backup(fake_bin, tmp_path, BACKUP_REMOTE=str(remote), BACKUP_SSH="false")
    assert first.returncode == 0, first.stdout + first.stderr
    today = dt.date.today().isoformat()
    assert (remote / f"innova-{today}" / "innova_db" / "users.bson").read_text() == "dump\n"
    assert (remote / "innova-2020-01-01").is_dir()
    assert f"copied to {remote}/innova-{today}" in first.stdout
    # Without a destination the dump is kept, with a warning.
    alone = run_backup(fake_bin, tmp_path)
    assert alone.returncode == 0 and "BACKUP_REMOTE is not set" in alone.stderr


def test_backup_fails_when_the_off_host_copy_fails(fake_bin: Callable[[str, str], Path], tmp_path: Path) -> None:
    rsync = fake_bin(
        "rsync", "#!/usr/bin/env bash\necho 'ssh: connect to host backup port 22: timed out' >&2\nexit 12\n"
    )
    result = run_backup(fake_bin, tmp_path, BACKUP_REMOTE="innova@backup.example:/srv/innova", RSYNC=str(rsync))
    assert result.returncode == 12  # the unit fails: OnFailure= alerts
    assert (tmp_path / "backups" / f"innova-{dt.date.today().isoformat()}").is_dir()  # the local dump stays


class _Hook(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append({"type": self.headers["Content-Type"], "body": json.loads(body)})
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_alert_posts_the_failed_unit_and_its_journal_to_the_webhook(
    fake_bin: Callable[[str, str], Path], tmp_path: Path
) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    server = http.server.HTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    journal = fake_bin("journalctl", '#!/usr/bin/env bash\necho "journal of $2: mongodump: connection refused"\n')
    env_file = tmp_path / "alert.env"
    env_file.write_text(f"ALERT_WEBHOOK_URL=http://127.0.0.1:{server.server_port}/hook\n")
    try:
        _Hook.received.clear()
        result = subprocess.run(
            ["bash", str(DEPLOY / "scripts" / "alert.sh"), "innovaplus-backup.service"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "ALERT_ENV_FILE": str(env_file), "JOURNALCTL": str(journal)},
        )
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(_Hook.received) == 1 and _Hook.received[0]["type"] == "application/json"
    text = _Hook.received[0]["body"]["text"]
    assert text.startswith("INNOVAPLUS: innovaplus-backup.service failed on ")
    assert "journal of innovaplus-backup.service: mongodump: connection refused" in text


def test_alert_without_a_destination_fails_loudly(tmp_path: Path) -> None:
    result = subprocess.run(
        ["bash", str(DEPLOY / "scripts" / "alert.sh"), "innovaplus-backup.service"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "ALERT_ENV_FILE": str(tmp_path / "none.env")},
    )
    assert result.returncode == 1 and "neither ALERT_WEBHOOK_URL nor ALERT_EMAIL" in result.stderr


def test_the_units_alert_on_failure() -> None:
    for unit in ("systemd/innovaplus-backend.service", "backup/innovaplus-backup.service",
                 "backup/innovaplus-restore-check.service"):  # fmt: skip
        assert "OnFailure=innovaplus-alert@%n.service" in (DEPLOY / unit).read_text(), unit


# A mongorestore that does what the real one does with the script's arguments,
# with pymongo (the test's Python): --config (uri), --nsInclude/--nsFrom/--nsTo, --drop, --dir.
FAKE_MONGORESTORE_PY = r"""#!{python}
import os, re, sys
from pathlib import Path
import bson
from pymongo import MongoClient
args = sys.argv[1:]
def value(name):
    return args[args.index(name) + 1] if name in args else None
uri = re.search(r'uri: "(.*)"', Path(value("--config")).read_text())[1]
source = value("--nsInclude").split(".")[0]
target = (value("--nsTo") or value("--nsInclude")).split(".")[0]
skip = os.environ.get("FAKE_SKIP_COLLECTION")
client = MongoClient(uri)
for path in sorted((Path(value("--dir")) / source).glob("*.bson")):
    if path.stem == skip:
        continue
    collection = client[target][path.stem]
    if "--drop" in args:
        collection.drop()
    docs = list(bson.decode_file_iter(path.open("rb")))
    if docs:
        collection.insert_many(docs)
"""


def _write_dump(root: Path, day: dt.date, counts: dict[str, int]) -> Path:
    from bson import encode

    dump = root / f"innova-{day.isoformat()}" / "innova_db"
    dump.mkdir(parents=True)
    for name, count in counts.items():
        with (dump / f"{name}.bson").open("wb") as out:
            for i in range(count):
                out.write(encode({"_id": i, "name": f"{name}-{i}"}))
    return dump.parent


def run_restore_check(
    fake_bin: Callable[[str, str], Path], tmp_path: Path, mongo_uri: str, scratch: str, **extra: str
) -> subprocess.CompletedProcess[str]:
    restore = fake_bin("mongorestore", FAKE_MONGORESTORE_PY.replace("{python}", sys.executable))
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("MONGO_URI", "DB_NAME")},
        "ENV_FILE": str(tmp_path / "none.env"),
        "MONGO_URI": mongo_uri,
        "DB_NAME": "innova_db",
        "BACKUP_ROOT": str(tmp_path / "backups"),
        "RESTORE_CHECK_DB": scratch,
        "MONGORESTORE": str(restore),
        **extra,
    }
    return subprocess.run(
        [sys.executable, str(DEPLOY / "backup" / "restore-check.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_restore_check_restores_the_newest_dump_into_a_scratch_database(
    fake_bin: Callable[[str, str], Path], tmp_path: Path, mongo_uri: str
) -> None:
    from pymongo import MongoClient

    scratch = f"innova_restore_check_{uuid.uuid4().hex[:6]}"
    today = dt.date.today()
    _write_dump(tmp_path / "backups", today - dt.timedelta(days=5), {"users": 1})  # older: not this one
    _write_dump(tmp_path / "backups", today, {"users": 3, "messages": 7, "sessions": 0})
    result = run_restore_check(fake_bin, tmp_path, mongo_uri, scratch)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"OK: innova-{today.isoformat()}, 3 collections, 10 documents restored" in result.stdout
    assert "messages: 7 in the dump, 7 restored" in result.stdout
    with MongoClient(mongo_uri) as client:
        assert scratch not in client.list_database_names()  # dropped after the check
    # A restore that loses a collection fails the check (and the unit: OnFailure alerts).
    broken = run_restore_check(fake_bin, tmp_path, mongo_uri, scratch, FAKE_SKIP_COLLECTION="messages")
    assert broken.returncode == 1
    assert "FAILED: restored counts differ: messages (0 of 7)" in broken.stdout


def test_restore_check_fails_when_the_backups_stopped(
    fake_bin: Callable[[str, str], Path], tmp_path: Path, mongo_uri: str
) -> None:
    _write_dump(tmp_path / "backups", dt.date.today() - dt.timedelta(days=9), {"users": 2})
    result = run_restore_check(fake_bin, tmp_path, mongo_uri, "innova_restore_check_x")
    assert result.returncode == 1 and "is 9 days old" in result.stdout
    refused = run_restore_check(fake_bin, tmp_path, mongo_uri, "innova_db")
    assert refused.returncode == 1 and "must not be the live database" in refused.stdout
