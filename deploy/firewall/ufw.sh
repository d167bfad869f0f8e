#!/usr/bin/env bash
# Firewall of the INNOVAPLUS API host: SSH (on the port(s) sshd really
# listens on), HTTP (80) and HTTPS (443) are reachable, over IPv4 and IPv6.
# Everything else inbound is refused; the backend (127.0.0.1:8000) and MongoDB
# (127.0.0.1:27017) stay loopback-only.
#
#   sudo deploy/firewall/ufw.sh
#
# - SSH: the ports come from `sshd -T` (the effective configuration, drop-ins
#   included), else from the listening sockets of sshd (`ss`), else the
#   script stops: it never guesses 22 on a server whose SSH is elsewhere.
#   SSH_PORTS="2222" (space- or comma-separated) overrides the detection.
# - Every rule it adds carries the comment `innovaplus`; rules without that
#   comment (made by hand, by another tool) are never touched. Rules of ours
#   that are no longer wanted (e.g. the old SSH port after a move) are removed,
#   but only after the new ones are in place.
# - Idempotent: run it again at any time, it converges to the same rules and
#   deletes nothing the second time.
# Environment, for tests: UFW (the ufw command), UFW_DEFAULTS (/etc/default/ufw),
# SSHD (the sshd command), SS (the ss command).
set -euo pipefail

UFW=${UFW:-ufw}
UFW_DEFAULTS=${UFW_DEFAULTS:-/etc/default/ufw}
SSHD=${SSHD:-sshd}
SS=${SS:-ss}
TAG=innovaplus
WEB_PORTS=(80 443)

die() { echo "ufw.sh: $*" >&2; exit 1; }

if ! command -v "$UFW" >/dev/null 2>&1; then
    die "ufw is not installed (apt-get install ufw)"
fi

valid_port() { [[ $1 =~ ^[0-9]+$ ]] && ((10#$1 >= 1 && 10#$1 <= 65535)); }

# -- which port(s) SSH uses --------------------------------------------------
ssh_ports=()
if [[ -n ${SSH_PORTS:-} ]]; then
    read -r -a ssh_ports <<<"${SSH_PORTS//,/ }"
    source_of_ports="SSH_PORTS"
else
    sshd_cmd=$(command -v "$SSHD" 2>/dev/null || command -v /usr/sbin/sshd 2>/dev/null || true)
    if [[ -n $sshd_cmd ]] && config=$("$sshd_cmd" -T 2>/dev/null); then
        # `port N` lines, and the ports of `listenaddress host:N` lines.
        mapfile -t ssh_ports < <(printf '%s\n' "$config" | awk '
            tolower($1) == "port" { print $2 }
            tolower($1) == "listenaddress" { n = split($2, a, ":"); if (n > 1) print a[n] }' | sort -un)
        source_of_ports="sshd -T"
    fi
    if [[ ${#ssh_ports[@]} -eq 0 ]] && command -v "$SS" >/dev/null 2>&1; then
        # Listening TCP sockets of a process named sshd: "... 0.0.0.0:2222 ... users:(("sshd",pid=1,fd=3))"
        mapfile -t ssh_ports < <("$SS" -H -tlnp 2>/dev/null | awk '/"sshd"/ { n = split($4, a, ":"); print a[n] }' | sort -un)
        source_of_ports="ss -tlnp (sshd's listening sockets)"
    fi
fi
if [[ ${#ssh_ports[@]} -eq 0 ]]; then
    die "cannot tell which port SSH listens on (no 'sshd -T', no sshd socket in 'ss -tlnp');" \
        "run it as root, or give the port: SSH_PORTS=22 $0. Nothing was changed."
fi
for port in "${ssh_ports[@]}"; do
    valid_port "$port" || die "'$port' (from $source_of_ports) is not a TCP port; nothing was changed"
done
echo "ufw.sh: SSH listens on ${ssh_ports[*]} (from $source_of_ports)"

# -- IPv6 rules too: every `ufw allow` below then applies to v4 and v6 -------
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

# -- our rules: SSH first, so enabling never cuts the session running this ---
wanted=()
for port in "${ssh_ports[@]}" "${WEB_PORTS[@]}"; do
    rule="allow ${port}/tcp comment '$TAG'"
    wanted+=("ufw $rule")
    "$UFW" allow "${port}/tcp" comment "$TAG"
done

# -- remove the rules WE added earlier that are no longer wanted --------------
# `ufw show added` lists the rules as the commands that made them, also while
# ufw is inactive; one command covers IPv4 and IPv6. Only lines ending in our
# comment are considered: everything else belongs to someone else.
mapfile -t added < <("$UFW" show added | grep "^ufw .* comment '$TAG'\$" || true)
for rule in "${added[@]}"; do
    keep=no
    for w in "${wanted[@]}"; do
        [[ "$rule" == "$w" ]] && keep=yes
    done
    if [[ $keep == no ]]; then
        echo "ufw.sh: removing our old rule: $rule"
        spec=${rule#ufw }
        spec=${spec% comment \'"$TAG"\'}
        read -r -a words <<<"$spec"
        if [[ ${words[0]} == route ]]; then
            "$UFW" --force route delete "${words[@]:1}"
        else
            "$UFW" --force delete "${words[@]}"
        fi
    fi
done

others=$("$UFW" show added | grep '^ufw ' | grep -v " comment '$TAG'\$" || true)
if [[ -n $others ]]; then
    echo "ufw.sh: rules not made by this script (kept; remove them yourself if unwanted):"
    while IFS= read -r line; do echo "  $line"; done <<<"$others"
fi

"$UFW" --force enable
"$UFW" status verbose
