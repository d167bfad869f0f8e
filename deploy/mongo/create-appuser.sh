#!/usr/bin/env bash
# Create or update `appuser` (dbOwner on innova_db) in the running MongoDB
# container, with the passwords of /etc/innovaplus/mongo.env. Idempotent.
#   sudo deploy/mongo/create-appuser.sh
# Environment: MONGO_ENV_FILE (default /etc/innovaplus/mongo.env),
# MONGO_CONTAINER (default innova-mongo), DOCKER (default docker).
set -euo pipefail

MONGO_ENV_FILE=${MONGO_ENV_FILE:-/etc/innovaplus/mongo.env}
MONGO_CONTAINER=${MONGO_CONTAINER:-innova-mongo}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if [[ ! -r "$MONGO_ENV_FILE" ]]; then
    echo "create-appuser.sh: cannot read $MONGO_ENV_FILE (run as root; see deploy/README.md)" >&2
    exit 1
fi
set -a
# shellcheck source=/dev/null
. "$MONGO_ENV_FILE"
set +a
: "${MONGO_ROOT_PASSWORD:?missing in $MONGO_ENV_FILE}" "${APP_PASSWORD:?missing in $MONGO_ENV_FILE}"

# No secret on any command line (ps shows every process's argv, the
# container's too): `docker exec -e NAME` without a value copies NAME from
# this environment, and mongosh starts unauthenticated and logs in from the
# script, with the password read from its environment.
export INNOVA_DB_NAME=${DB_NAME:-innova_db} INNOVA_APP_USER=${APP_USER:-appuser}
export INNOVA_APP_PASSWORD=$APP_PASSWORD MONGO_ROOT_USERNAME=${MONGO_ROOT_USERNAME:-root}
export MONGO_ROOT_PASSWORD
login='db.getSiblingDB("admin").auth(process.env.MONGO_ROOT_USERNAME, process.env.MONGO_ROOT_PASSWORD);'
{ printf '%s\n' "$login"; cat "$here/initdb/01-appuser.js"; } |
    "${DOCKER:-docker}" exec -i \
        -e INNOVA_DB_NAME -e INNOVA_APP_USER -e INNOVA_APP_PASSWORD -e MONGO_ROOT_USERNAME -e MONGO_ROOT_PASSWORD \
        "$MONGO_CONTAINER" \
        mongosh --quiet --host 127.0.0.1 --port 27017 --file /dev/stdin
