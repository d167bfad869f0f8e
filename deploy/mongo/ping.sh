#!/usr/bin/env bash
# The check from the operations notes: does MongoDB answer as the app user?
#   sudo deploy/mongo/ping.sh           (reads MONGO_URI from the env file)
# Equivalent by hand (but that puts the password in ps's output):
#   mongosh "mongodb://appuser:***@127.0.0.1:27017/innova_db?authSource=innova_db" \
#       --eval 'db.runCommand({ ping: 1 })'
# Uses the host's mongosh if installed, else the one in the container.
# Environment: ENV_FILE (default /etc/innovaplus/backend.env), MONGO_URI
# (overrides the file), MONGO_CONTAINER (default innova-mongo), DOCKER (default docker).
set -euo pipefail

ENV_FILE=${ENV_FILE:-/etc/innovaplus/backend.env}
MONGO_CONTAINER=${MONGO_CONTAINER:-innova-mongo}

if [[ -z "${MONGO_URI:-}" ]]; then
    if [[ ! -r "$ENV_FILE" ]]; then
        echo "ping.sh: set MONGO_URI or make $ENV_FILE readable (run with sudo)" >&2
        exit 1
    fi
    MONGO_URI=$(sed -n 's/^MONGO_URI=//p' "$ENV_FILE" | tail -n 1)
fi
if [[ -z "$MONGO_URI" ]]; then
    echo "ping.sh: MONGO_URI is empty" >&2
    exit 1
fi

# The URI holds the password: it never goes on a command line (ps shows
# argv to every user). mongosh starts without a connection (--nodb) and
# connects from the script, reading the URI from its environment;
# `docker exec -e MONGO_URI` (no value) copies it from this environment.
export MONGO_URI
eval_js='const r = connect(process.env.MONGO_URI).runCommand({ ping: 1 }); printjson(r); if (r.ok !== 1) { quit(1); }'
if command -v mongosh >/dev/null 2>&1; then
    exec mongosh --nodb --quiet --eval "$eval_js"
fi
exec "${DOCKER:-docker}" exec -e MONGO_URI "$MONGO_CONTAINER" mongosh --nodb --quiet --eval "$eval_js"
