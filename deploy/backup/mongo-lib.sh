# shellcheck shell=bash
# Sourced by mongo-backup.sh and mongo-restore.sh (not run on its own).

# read_env NAME: the last NAME=value line of $ENV_FILE (empty if unreadable).
read_env() {
    sed -n "s/^$1=//p" "$ENV_FILE" 2>/dev/null | tail -n 1
}

# uri_without_db URI: the same URI with the database removed from its path.
# The database tools treat a database in the URI path as --db, and
# mongorestore with a --db reads the --dir as the folder of that one
# database: a dump written with --out (DIR/DB/*.bson) is then skipped and
# nothing is restored, with exit status 0. So the scripts always pass the
# database explicitly and strip it from the URI. The path database is also
# the default authentication database: it is kept as authSource when the URI
# has credentials and no authSource of its own.
uri_without_db() {
    local uri=$1 scheme rest authority path="" db query=""
    scheme=${uri%%://*}
    rest=${uri#*://}
    authority=${rest%%/*}
    [[ "$rest" == */* ]] && path=${rest#*/}
    db=${path%%\?*}
    [[ "$path" == *\?* ]] && query=${path#*\?}
    if [[ -n "$db" && "$authority" == *@* ]] && ! [[ "&${query,,}" == *"&authsource="* ]]; then
        query=${query:+$query&}authSource=$db
    fi
    printf '%s://%s/%s\n' "$scheme" "$authority" "${query:+?$query}"
}

# uri_config URI: a temporary file (mode 600) holding `uri: "..."` for the
# tools' --config, so the password never appears on a command line. Prints its path.
uri_config() {
    local file
    file=$(mktemp)
    chmod 600 "$file"
    printf 'uri: "%s"\n' "$1" >"$file"
    printf '%s\n' "$file"
}
