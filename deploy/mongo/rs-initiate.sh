#!/usr/bin/env bash
# Once, on ONE of the three members started from compose-replicaset.yaml:
# make them the replica set `innova` and create `appuser` on it. Idempotent
# (an initiated set is left as it is; the user is updated).
#   sudo RS_MEMBERS="db1.internal:27017 db2.internal:27017 db3.internal:27017" deploy/mongo/rs-initiate.sh
# Environment: RS_MEMBERS (3 host:port, as the members and app hosts resolve
# them), MONGO_ENV_FILE (default /etc/innovaplus/mongo.env), MONGO_CONTAINER
# (default innova-mongo), DOCKER (default docker).
set -euo pipefail

MONGO_ENV_FILE=${MONGO_ENV_FILE:-/etc/innovaplus/mongo.env}
MONGO_CONTAINER=${MONGO_CONTAINER:-innova-mongo}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
read -r -a members <<<"${RS_MEMBERS:?set RS_MEMBERS to the three members, host:port each}"
if [[ ${#members[@]} -ne 3 ]]; then
    echo "rs-initiate.sh: RS_MEMBERS must name 3 members (got ${#members[@]}): an even count cannot elect" >&2
    exit 2
fi
if [[ ! -r "$MONGO_ENV_FILE" ]]; then
    echo "rs-initiate.sh: cannot read $MONGO_ENV_FILE (run as root)" >&2
    exit 1
fi
set -a
# shellcheck source=/dev/null
. "$MONGO_ENV_FILE"
set +a
: "${MONGO_ROOT_PASSWORD:?missing in $MONGO_ENV_FILE}" "${APP_PASSWORD:?missing in $MONGO_ENV_FILE}"
export INNOVA_DB_NAME=${DB_NAME:-innova_db} INNOVA_APP_USER=${APP_USER:-appuser}
export INNOVA_APP_PASSWORD=$APP_PASSWORD MONGO_ROOT_USERNAME=${MONGO_ROOT_USERNAME:-root}
export MONGO_ROOT_PASSWORD RS_MEMBERS="${members[*]}"

# No secret on a command line: the passwords travel in the environment
# (`docker exec -e NAME` copies NAME from here), mongosh logs in from the script.
{
    cat <<'JS'
db.getSiblingDB("admin").auth(process.env.MONGO_ROOT_USERNAME, process.env.MONGO_ROOT_PASSWORD);
const hosts = process.env.RS_MEMBERS.split(" ");
let initiated = true;
try { rs.status(); } catch (e) { initiated = false; }
if (!initiated) {
  rs.initiate({ _id: "innova", members: hosts.map((host, i) => ({ _id: i, host: host })) });
  print(`initiated replica set innova: ${hosts.join(", ")}`);
} else {
  print("replica set already initiated: " + rs.conf().members.map((m) => m.host).join(", "));
}
// Wait for a primary before creating the user on it.
for (let i = 0; i < 60 && !db.hello().isWritablePrimary; i++) { sleep(1000); }
if (!db.hello().isWritablePrimary) { throw new Error("this member is not the primary: run the script on the primary"); }
JS
    cat "$here/initdb/01-appuser.js"
} | "${DOCKER:-docker}" exec -i \
    -e INNOVA_DB_NAME -e INNOVA_APP_USER -e INNOVA_APP_PASSWORD -e MONGO_ROOT_USERNAME -e MONGO_ROOT_PASSWORD -e RS_MEMBERS \
    "$MONGO_CONTAINER" \
    mongosh --quiet --host 127.0.0.1 --port 27017 --file /dev/stdin
