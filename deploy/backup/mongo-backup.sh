#!/usr/bin/env bash
# Dump the INNOVAPLUS database to $BACKUP_ROOT/innova-YYYY-MM-DD (the command
# of the operations notes), then delete dumps older than $RETENTION_DAYS days.
# Run nightly by innovaplus-backup.timer; by hand: sudo deploy/backup/mongo-backup.sh
#
# Environment:
#   ENV_FILE        where MONGO_URI and DB_NAME are read (default /etc/innovaplus/backend.env)
#   MONGO_URI       overrides the file
#   DB_NAME         default innova_db
#   BACKUP_ROOT     default /var/backups
#   RETENTION_DAYS  default 14; dumps innova-YYYY-MM-DD older than that are removed
#   MONGODUMP       the mongodump command (default: mongodump on PATH, from
#                   MongoDB's mongodb-database-tools package)
#   BACKUP_REMOTE   where each new dump is copied off the host, with rsync: a
#                   destination directory `user@host:/path` (over SSH) or a
#                   local path (a mounted disk). Empty: no copy (a warning).
#                   The remote side keeps every dump it receives (no --delete):
#                   its own retention is its business, and a compromised API
#                   host cannot erase it through this script.
#   BACKUP_SSH      the ssh command rsync runs (default: the key and known_hosts
#                   of /etc/innovaplus/backup_ssh, see deploy/README.md 1.10)
#   RSYNC           the rsync command (default rsync)
# A failure exits non-zero: the unit then fails and OnFailure= alerts.
set -euo pipefail

ENV_FILE=${ENV_FILE:-/etc/innovaplus/backend.env}
BACKUP_ROOT=${BACKUP_ROOT:-/var/backups}
RETENTION_DAYS=${RETENTION_DAYS:-14}
MONGODUMP=${MONGODUMP:-mongodump}
BACKUP_REMOTE=${BACKUP_REMOTE:-}
BACKUP_SSH=${BACKUP_SSH:-ssh -i /etc/innovaplus/backup_ssh/id_ed25519 -o UserKnownHostsFile=/etc/innovaplus/backup_ssh/known_hosts -o BatchMode=yes -o StrictHostKeyChecking=yes}
RSYNC=${RSYNC:-rsync}
# shellcheck source=deploy/backup/mongo-lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/mongo-lib.sh"

log() { echo "mongo-backup: $*"; }

if ! [[ "$RETENTION_DAYS" =~ ^[0-9]+$ ]] || ((RETENTION_DAYS < 1)); then
    echo "mongo-backup: RETENTION_DAYS must be a whole number >= 1 (got '$RETENTION_DAYS')" >&2
    exit 2
fi
if [[ -z "${MONGO_URI:-}" ]]; then
    if [[ ! -r "$ENV_FILE" ]]; then
        echo "mongo-backup: set MONGO_URI or make $ENV_FILE readable (run as root)" >&2
        exit 1
    fi
    MONGO_URI=$(read_env MONGO_URI)
    DB_NAME=${DB_NAME:-$(read_env DB_NAME)}
fi
DB_NAME=${DB_NAME:-innova_db}
if [[ -z "$MONGO_URI" ]]; then
    echo "mongo-backup: MONGO_URI is empty" >&2
    exit 1
fi
if ! command -v "$MONGODUMP" >/dev/null 2>&1; then
    echo "mongo-backup: $MONGODUMP not found (install mongodb-database-tools, see deploy/README.md)" >&2
    exit 1
fi

today=$(date +%F)
target="$BACKUP_ROOT/innova-$today"
partial="$target.partial"
mkdir -p "$BACKUP_ROOT"
rm -rf "$partial"
umask 077
log "dumping $DB_NAME to $target"
# The URI (with its password) goes in a config file, not on the command line;
# the database is given by --db only (mongo-lib.sh says why).
config=$(uri_config "$(uri_without_db "$MONGO_URI")")
trap 'rm -f "$config"; rm -rf "$partial"' EXIT
"$MONGODUMP" --config "$config" --db "$DB_NAME" --out "$partial" --quiet
# Replace today's dump only once the new one is complete.
rm -rf "$target"
mv "$partial" "$target"
log "done: $(du -sh "$target" | cut -f1) in $target"

# Off the host: a backup on the same disk does not survive the disk.
if [[ -n "$BACKUP_REMOTE" ]]; then
    log "copying $target to $BACKUP_REMOTE"
    # -a: a directory innova-DATE/ under the destination; re-sent whole if an
    # earlier copy of the same day was interrupted.
    "$RSYNC" -a --partial -e "$BACKUP_SSH" "$target" "${BACKUP_REMOTE%/}/"
    log "copied to ${BACKUP_REMOTE%/}/innova-$today"
else
    log "WARNING: BACKUP_REMOTE is not set: this dump exists on this disk only" >&2
fi

# Retention: by the date in the name, so touching a file changes nothing.
cutoff=$(date -d "-$RETENTION_DAYS days" +%F)
for dir in "$BACKUP_ROOT"/innova-[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]; do
    [[ -d "$dir" ]] || continue
    day=${dir##*/innova-}
    if [[ "$day" < "$cutoff" ]]; then
        log "removing $dir (older than $RETENTION_DAYS days)"
        rm -rf "$dir"
    fi
done
