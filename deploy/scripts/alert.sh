#!/usr/bin/env bash
# Tell a human that a unit failed: run by innovaplus-alert@UNIT.service, which
# the units name in OnFailure= (the backend, the backup, the restore check).
#   deploy/scripts/alert.sh innovaplus-backup.service
#
# Where the alert goes, from /etc/innovaplus/alert.env (root:root 600):
#   ALERT_WEBHOOK_URL  an HTTPS URL that accepts a JSON POST {"text": "..."}
#                      (Slack/Mattermost/Rocket.Chat incoming webhooks, ntfy,
#                      a Matrix hookshot, ...); the text names the unit, the
#                      host and the last journal lines of the unit
#   ALERT_EMAIL        an address; needs a working `mail` (e.g. Debian's
#                      bsd-mailx with a relay) on the host
# At least one must be set; each one that fails makes this script fail (its
# own failure is then in the journal: `journalctl -u 'innovaplus-alert@*'`).
# Environment, for tests: ALERT_ENV_FILE, JOURNALCTL, CURL, MAIL, HOSTNAME_CMD.
set -euo pipefail

unit=${1:?usage: $0 UNIT}
ALERT_ENV_FILE=${ALERT_ENV_FILE:-/etc/innovaplus/alert.env}
if [[ -r "$ALERT_ENV_FILE" ]]; then
    set -a
    # shellcheck source=/dev/null
    . "$ALERT_ENV_FILE"
    set +a
fi
ALERT_WEBHOOK_URL=${ALERT_WEBHOOK_URL:-}
ALERT_EMAIL=${ALERT_EMAIL:-}
if [[ -z "$ALERT_WEBHOOK_URL" && -z "$ALERT_EMAIL" ]]; then
    echo "alert.sh: $unit failed, but neither ALERT_WEBHOOK_URL nor ALERT_EMAIL is set in $ALERT_ENV_FILE" >&2
    exit 1
fi

host=$(${HOSTNAME_CMD:-hostname -f} 2>/dev/null || hostname)
journal=$(${JOURNALCTL:-journalctl} -u "$unit" -n 30 --no-pager -o short-iso 2>&1 || true)
text=$(printf 'INNOVAPLUS: %s failed on %s at %s\n\n%s\n' "$unit" "$host" "$(date -u +%FT%TZ)" "$journal")
status=0

if [[ -n "$ALERT_WEBHOOK_URL" ]]; then
    body=$(python3 -c 'import json, sys; print(json.dumps({"text": sys.stdin.read()}))' <<<"$text")
    if ${CURL:-curl} --silent --show-error --fail --max-time 20 --retry 3 \
        -H 'Content-Type: application/json' --data-binary @- "$ALERT_WEBHOOK_URL" <<<"$body" >/dev/null; then
        echo "alert.sh: $unit: webhook notified"
    else
        echo "alert.sh: $unit: the webhook could not be reached" >&2
        status=1
    fi
fi
if [[ -n "$ALERT_EMAIL" ]]; then
    if ${MAIL:-mail} -s "INNOVAPLUS: $unit failed on $host" "$ALERT_EMAIL" <<<"$text"; then
        echo "alert.sh: $unit: mail sent to $ALERT_EMAIL"
    else
        echo "alert.sh: $unit: could not send the mail" >&2
        status=1
    fi
fi
exit "$status"
