#!/usr/bin/env bash
# Runs ON THE SERVER, as the `deploy` user, after CI rsynced the code to
# /opt/innovaplus/backend: bootstrap the virtualenv, install the packages,
# reload the service without dropping a request or a stream. Also usable by hand:
#   cd /opt/innovaplus/backend && deploy/scripts/remote-deploy.sh
#
# Which packages: the core with its production extra, plus the plugin
# packages named in /etc/innovaplus/plugins.txt (one per line, `#` comments;
# e.g. innova-mailer, innova-provider-echo, innova-provider-cloud,
# innova-provider-smollm), each installed from packages/<name>.
# Every third-party package is pinned by deploy/constraints.txt (pip -c), so
# a deployment installs what the tests ran with (README "Dependency pins").
# Then `systemctl reload` (gunicorn's graceful reload, SIGHUP): new workers
# with the new code, the old ones finish their requests and streams; nothing
# is refused meanwhile (measured: deploy/README.md "Deploys without downtime").
# A restart instead (running streams get graceful_timeout to finish, new
# connections are refused meanwhile) only when a reload cannot apply the
# change: the service is not running, RESTART=1 is given (a changed unit or
# env file), or the packages the gunicorn master itself runs (gunicorn,
# uvicorn, uvicorn-worker, the Python) changed: workers are forked from the
# master and would keep its old copies.
# Environment: APP_DIR (default: this checkout), PLUGINS_FILE, CONSTRAINTS
# (default deploy/constraints.txt), PYTHON (default python3), SKIP_RESTART=1
# to only install, RESTART=1 to restart instead of reloading, SYSTEMCTL
# (default `sudo -n /usr/bin/systemctl`, for tests).
set -euo pipefail

APP_DIR=${APP_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
PLUGINS_FILE=${PLUGINS_FILE:-/etc/innovaplus/plugins.txt}
CONSTRAINTS=${CONSTRAINTS:-$APP_DIR/deploy/constraints.txt}
PYTHON=${PYTHON:-python3}
UNIT=innovaplus-backend.service

cd "$APP_DIR"
log() { echo "remote-deploy: $*"; }

# The plugin list is required: without it the service could start without
# innova-mailer (a production MAILER=smtp then exits 3) or without its
# provider. Never guess a default: stop and say what to fix.
die() { echo "remote-deploy: $*; nothing was installed" >&2; exit 1; }
if [[ ! -r "$PLUGINS_FILE" ]]; then
    plugins_dir=$(dirname "$PLUGINS_FILE")
    if [[ -d "$plugins_dir" && ! -x "$plugins_dir" ]]; then
        die "$(id -un) cannot enter $plugins_dir to read $PLUGINS_FILE" \
            "(it must be mode 751: sudo chmod 751 $plugins_dir; deploy/README.md 1.2)"
    elif [[ -e "$PLUGINS_FILE" ]]; then
        die "$PLUGINS_FILE is not readable by $(id -un) (it must be mode 644: sudo chmod 644 $PLUGINS_FILE)"
    else
        die "$PLUGINS_FILE does not exist: create it, one plugin package per line (deploy/README.md 1.4)"
    fi
fi
plugins=()
while read -r name _ || [[ -n ${name:-} ]]; do  # also a last line without its newline
    [[ -z "$name" || "$name" == \#* ]] && continue
    plugins+=("$name")
done <"$PLUGINS_FILE"
if [[ ${#plugins[@]} -eq 0 ]]; then
    die "$PLUGINS_FILE lists no package (it needs the provider's and, in production," \
        "innova-mailer; deploy/README.md 1.4)"
fi

if [[ ! -r "$CONSTRAINTS" ]]; then
    die "$CONSTRAINTS is missing: it pins the versions to install (deploy/README.md \"Dependency pins\")"
fi

requirements=("./packages/innova-server[production]")
for name in "${plugins[@]}"; do
    if [[ ! -f "packages/$name/pyproject.toml" ]]; then
        die "plugin package '$name' (from $PLUGINS_FILE) is not in packages/"
    fi
    requirements+=("./packages/$name")
done

# What the master runs: a change there needs a restart, not a reload.
master_stack() {
    readlink -f .venv/bin/python 2>/dev/null || true
    compgen -G '.venv/lib/python*/site-packages/gunicorn-*.dist-info' || true
    compgen -G '.venv/lib/python*/site-packages/uvicorn-*.dist-info' || true
    compgen -G '.venv/lib/python*/site-packages/uvicorn_worker-*.dist-info' || true
}
stack_before=$(master_stack)

if [[ ! -x .venv/bin/python ]]; then
    log "creating $APP_DIR/.venv"
    "$PYTHON" -m venv .venv
fi
pip=(.venv/bin/python -m pip install --quiet --constraint "$CONSTRAINTS")
"${pip[@]}" --upgrade pip
log "installing ${requirements[*]} (pinned by $CONSTRAINTS)"
# Local directories are always rebuilt and reinstalled, so a new commit with
# the same version number is picked up; --upgrade moves every other package
# to its pinned version, never past it.
"${pip[@]}" --upgrade "${requirements[@]}"
.venv/bin/innova plugins

if [[ "${SKIP_RESTART:-0}" == 1 ]]; then
    log "SKIP_RESTART=1: not reloading $UNIT"
    exit 0
fi
read -r -a systemctl <<<"${SYSTEMCTL:-sudo -n /usr/bin/systemctl}"
if [[ "${RESTART:-0}" == 1 ]]; then
    action=restart why="RESTART=1"
elif ! "${systemctl[@]}" is-active --quiet "$UNIT"; then
    action=restart why="$UNIT is not running"
elif [[ "$(master_stack)" != "$stack_before" ]]; then
    action=restart why="gunicorn, uvicorn or the Python changed (the master runs them)"
else
    action=reload why="graceful: new workers; running requests and streams finish"
fi
log "${action}ing $UNIT ($why)"
"${systemctl[@]}" "$action" "$UNIT"
"${systemctl[@]}" --no-pager --lines=0 status "$UNIT" || true
