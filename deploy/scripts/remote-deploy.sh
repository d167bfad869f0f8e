#!/usr/bin/env bash
# Runs ON THE SERVER, as the `deploy` user, after CI rsynced the code to
# /opt/innovaplus/backend: bootstrap the virtualenv, install the packages,
# restart the service. Also usable by hand:
#   cd /opt/innovaplus/backend && deploy/scripts/remote-deploy.sh
#
# Which packages: the core with its production extra, plus the plugin
# packages named in /etc/innovaplus/plugins.txt (one per line, `#` comments;
# e.g. innova-mailer, innova-provider-echo, innova-provider-cloud,
# innova-provider-smollm), each installed from packages/<name>.
# Environment: APP_DIR (default: this checkout), PLUGINS_FILE, PYTHON
# (default python3), SKIP_RESTART=1 to only install.
set -euo pipefail

APP_DIR=${APP_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
PLUGINS_FILE=${PLUGINS_FILE:-/etc/innovaplus/plugins.txt}
PYTHON=${PYTHON:-python3}
UNIT=innovaplus-backend.service

cd "$APP_DIR"
log() { echo "remote-deploy: $*"; }

plugins=()
if [[ -r "$PLUGINS_FILE" ]]; then
    while read -r name _; do
        [[ -z "$name" || "$name" == \#* ]] && continue
        plugins+=("$name")
    done <"$PLUGINS_FILE"
else
    log "$PLUGINS_FILE not found: installing innova-provider-echo only"
    plugins=(innova-provider-echo)
fi

requirements=("./packages/innova-server[production]")
for name in "${plugins[@]}"; do
    if [[ ! -f "packages/$name/pyproject.toml" ]]; then
        echo "remote-deploy: plugin package '$name' (from $PLUGINS_FILE) is not in packages/" >&2
        exit 1
    fi
    requirements+=("./packages/$name")
done

if [[ ! -x .venv/bin/python ]]; then
    log "creating $APP_DIR/.venv"
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
log "installing ${requirements[*]}"
# Local directories are always rebuilt and reinstalled, so a new commit with
# the same version number is picked up.
.venv/bin/python -m pip install --quiet --upgrade "${requirements[@]}"
.venv/bin/innova plugins

if [[ "${SKIP_RESTART:-0}" == 1 ]]; then
    log "SKIP_RESTART=1: not restarting $UNIT"
    exit 0
fi
log "restarting $UNIT"
sudo -n /usr/bin/systemctl restart "$UNIT"
sudo -n /usr/bin/systemctl --no-pager --lines=0 status "$UNIT" || true
