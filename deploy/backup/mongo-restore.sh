#!/usr/bin/env bash
# Restore a dump written by mongo-backup.sh into the INNOVAPLUS database.
#   sudo deploy/backup/mongo-restore.sh /var/backups/innova-2026-11-24 [--drop]
# --drop replaces the collections that the dump holds (the usual case after
# data loss); without it documents are inserted next to what exists.
# Stop the backend first (deploy/README.md "Restore"). Same environment as
# mongo-backup.sh (ENV_FILE, MONGO_URI, DB_NAME), MONGORESTORE (default mongorestore).
set -euo pipefail

ENV_FILE=${ENV_FILE:-/etc/innovaplus/backend.env}
MONGORESTORE=${MONGORESTORE:-mongorestore}

if [[ $# -lt 1 || $# -gt 2 || ( $# -eq 2 && $2 != --drop ) ]]; then
    echo "usage: $0 /var/backups/innova-YYYY-MM-DD [--drop]" >&2
    exit 2
fi
dump=$1
drop=()
[[ $# -eq 2 ]] && drop=(--drop)

read_env() { sed -n "s/^$1=//p" "$ENV_FILE" 2>/dev/null | tail -n 1; }
if [[ -z "${MONGO_URI:-}" ]]; then
    MONGO_URI=$(read_env MONGO_URI)
    DB_NAME=${DB_NAME:-$(read_env DB_NAME)}
fi
DB_NAME=${DB_NAME:-innova_db}
if [[ -z "$MONGO_URI" ]]; then
    echo "mongo-restore: MONGO_URI is empty (set it, or run as root to read $ENV_FILE)" >&2
    exit 1
fi
# mongodump --out DIR --db NAME writes DIR/NAME/*.bson
if [[ ! -d "$dump/$DB_NAME" ]]; then
    echo "mongo-restore: $dump/$DB_NAME does not exist: not a dump of $DB_NAME" >&2
    exit 1
fi

config=$(mktemp)
trap 'rm -f "$config"' EXIT
printf 'uri: "%s"\n' "$MONGO_URI" >"$config"
echo "mongo-restore: restoring $dump/$DB_NAME into $DB_NAME ${drop[*]}"
"$MONGORESTORE" --config "$config" --nsInclude "$DB_NAME.*" "${drop[@]}" --dir "$dump"
echo "mongo-restore: done; now run: innova db init (indexes), then start the backend"
