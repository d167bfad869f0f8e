#!/usr/bin/env bash
# Poll a /health URL until it answers {"status": "ok", "mongo": "ok"}.
#   deploy/scripts/wait-healthy.sh [URL] [ATTEMPTS] [DELAY_SECONDS]
# Defaults: https://api.innovaplus.africa/health, 30 attempts, 5 s apart.
# Exit 0 once healthy; 1 after the last failed attempt (printing the last answer).
# curl honours CURL_CA_BUNDLE (the tests use a private CA).
set -euo pipefail

url=${1:-https://api.innovaplus.africa/health}
attempts=${2:-30}
delay=${3:-5}

last=""
for ((i = 1; i <= attempts; i++)); do
    if body=$(curl --silent --show-error --max-time 10 "$url" 2>&1); then
        last=$body
        if printf '%s' "$body" | python3 -c '
import json, sys
try:
    health = json.load(sys.stdin)
except ValueError:
    sys.exit(1)
sys.exit(0 if isinstance(health, dict) and health.get("status") == "ok" and health.get("mongo") == "ok" else 1)
'; then
            echo "healthy after $i attempt(s): $body"
            exit 0
        fi
    else
        last=$body
    fi
    echo "attempt $i/$attempts: not healthy yet: ${last:0:300}"
    if ((i < attempts)); then
        sleep "$delay"
    fi
done
echo "::error::$url not healthy after $attempts attempts; last answer: ${last:0:500}"
exit 1
