#!/usr/bin/env bash
# Firewall of the INNOVAPLUS API host: only SSH (22), HTTP (80) and HTTPS (443)
# are reachable, over IPv4 and IPv6. Everything else inbound is refused; the
# backend (127.0.0.1:8000) and MongoDB (127.0.0.1:27017) stay loopback-only.
#
# Idempotent: run it again at any time, it converges to the same rules
# (rules it did not create are removed, after printing them).
#   sudo deploy/firewall/ufw.sh
# Environment: UFW (the ufw command), UFW_DEFAULTS (/etc/default/ufw), for tests.
set -euo pipefail

UFW=${UFW:-ufw}
UFW_DEFAULTS=${UFW_DEFAULTS:-/etc/default/ufw}
ALLOWED_PORTS=(22 80 443)

if ! command -v "$UFW" >/dev/null 2>&1; then
    echo "ufw.sh: ufw is not installed (apt-get install ufw)" >&2
    exit 1
fi

# IPv6 rules too: every `ufw allow` below then applies to v4 and v6.
if [[ -f "$UFW_DEFAULTS" ]] && ! grep -q '^IPV6=yes' "$UFW_DEFAULTS"; then
    if grep -q '^IPV6=' "$UFW_DEFAULTS"; then
        sed -i 's/^IPV6=.*/IPV6=yes/' "$UFW_DEFAULTS"
    else
        echo 'IPV6=yes' >>"$UFW_DEFAULTS"
    fi
    echo "ufw.sh: enabled IPv6 in $UFW_DEFAULTS"
fi

"$UFW" default deny incoming
"$UFW" default allow outgoing
"$UFW" default deny routed

# Allow SSH first, so enabling never cuts the session running this script.
for port in "${ALLOWED_PORTS[@]}"; do
    "$UFW" allow "${port}/tcp"
done

# Remove every other rule. `ufw show added` lists the rules as the commands
# that made them ("ufw allow 8000/tcp"), also while ufw is inactive; one
# command covers IPv4 and IPv6.
keep=()
for port in "${ALLOWED_PORTS[@]}"; do
    keep+=("ufw allow ${port}/tcp")
done
mapfile -t added < <("$UFW" show added | grep '^ufw ' || true)
for rule in "${added[@]}"; do
    wanted=no
    for k in "${keep[@]}"; do
        [[ "$rule" == "$k" ]] && wanted=yes
    done
    if [[ $wanted == no ]]; then
        echo "ufw.sh: removing rule: $rule"
        read -r -a words <<<"${rule#ufw }"
        if [[ ${words[0]} == route ]]; then
            "$UFW" --force route delete "${words[@]:1}"
        else
            "$UFW" --force delete "${words[@]}"
        fi
    fi
done

"$UFW" --force enable
"$UFW" status verbose
