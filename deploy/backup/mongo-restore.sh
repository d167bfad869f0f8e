#!/usr/bin/env bash
# Restore a dump written by mongo-backup.sh into the INNOVAPLUS database.
#   sudo deploy/backup/mongo-restore.sh /var/backups/innova-2026-11-24 [--drop]
# --drop replaces the collections that the dump holds (the usual case after
# data loss); without it documents are inserted next to what exists.
# Stop the backend first (deploy/README.md "Restore"). Same environment as
# mongo-backup.sh (ENV_FILE, MONGO_URI, DB_NAME), plus FROM_DB (the database
# the dump holds, default DB_NAME: set it to restore into another database)
# and MONGORESTORE (default mongorestore).
set -euo pipefail

ENV_FILE=${ENV_FILE:-/etc/innovaplus/backend.env}
MONGORESTORE=${MONGORESTORE:-mongorestore}
# shellcheck source=deploy/backup/mongo-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/mongo-lib.sh"

if [[ $# -lt 1 || $# -gt 2 || ( $# -eq 2 && $2 != --drop ) ]]; then
    echo "usage: $0 /var/backups/innova-YYYY-MM-DD [--drop]" >&2
    exit 2
fi
dump=${1%/}
drop=()
[[ $# -eq 2 ]] && drop=(--drop)

if [[ -z "${MONGO_URI:-}" ]]; then
    MONGO_URI=$(read_env MONGO_URI)
    DB_NAME=${DB_NAME:-$(read_env DB_NAME)}
fi
DB_NAME=${DB_NAME:-innova_db}
FROM_DB=${FROM_DB:-$DB_NAME}
if [[ -z "$MONGO_URI" ]]; then
    echo "mongo-restore: MONGO_URI is empty (set it, or run as root to read $ENV_FILE)" >&2
    exit 1
fi
# mongodump --out DIR --db NAME writes DIR/NAME/*.bson: refuse anything else
# (an empty folder, the database folder itself, a dump of another database)
# rather than "restore" nothing and exit 0.
if [[ ! -d "$dump/$FROM_DB" ]]; then
    echo "mongo-restore: $dump/$FROM_DB does not exist: not a dump of $FROM_DB" \
        "(give the innova-YYYY-MM-DD directory written by mongo-backup.sh)" >&2
    exit 1
fi
if ! compgen -G "$dump/$FROM_DB/*.bson" >/dev/null && ! compgen -G "$dump/$FROM_DB/*.bson.gz" >/dev/null; then
    echo "mongo-restore: $dump/$FROM_DB holds no .bson file: nothing to restore" >&2
    exit 1
fi

# The whole dump directory, filtered to one database, with the database
# removed from the URI (mongo-lib.sh says why); renamed when FROM_DB differs.
ns=(--nsInclude "$FROM_DB.*")
[[ "$FROM_DB" != "$DB_NAME" ]] && ns+=(--nsFrom "$FROM_DB.*" --nsTo "$DB_NAME.*")
config=$(uri_config "$(uri_without_db "$MONGO_URI")")
trap 'rm -f "$config"' EXIT
echo "mongo-restore: restoring $dump/$FROM_DB into $DB_NAME ${drop[*]}"
"$MONGORESTORE" --config "$config" "${ns[@]}" "${drop[@]}" --dir "$dump"
echo "mongo-restore: done; now run: innova db init (indexes), then start the backend"
