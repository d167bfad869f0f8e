#!/usr/bin/env python3
"""Monthly restore check: the newest dump, restored into a scratch database, holds what it should.

Run by innovaplus-restore-check.timer (deploy/README.md "Backups"), as root,
with the app's virtualenv (for pymongo):

    /opt/innovaplus/backend/.venv/bin/python deploy/backup/restore-check.py

1. takes the newest complete dump $BACKUP_ROOT/innova-YYYY-MM-DD, and fails
   if it is older than MAX_AGE_DAYS (a backup that silently stopped);
2. restores it with deploy/backup/mongo-restore.sh --drop into the scratch
   database RESTORE_CHECK_DB (default innova_restore_check; appuser owns it,
   deploy/mongo/initdb/01-appuser.js), never into the live one;
3. compares, collection by collection, the documents in the dump's .bson
   files with the documents restored, then drops the scratch database.
Exit status 0 when every count matches; 1 otherwise (the unit fails, and its
OnFailure= sends the alert). Environment: ENV_FILE, MONGO_URI, DB_NAME,
BACKUP_ROOT, RESTORE_CHECK_DB, MAX_AGE_DAYS, RESTORE_SCRIPT, MONGORESTORE.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
from pathlib import Path

import bson
from pymongo import MongoClient

HERE = Path(__file__).resolve().parent
DUMP_NAME = re.compile(r"^innova-(\d{4}-\d{2}-\d{2})$")


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                name, _, value = line.partition("=")
                values[name.strip()] = value.strip()
    return values


def say(message: str) -> None:
    print(f"restore-check: {message}", flush=True)


def newest_dump(root: Path) -> tuple[Path, dt.date] | None:
    dumps = sorted(
        (dt.date.fromisoformat(match[1]), path)
        for path in root.glob("innova-*")
        if path.is_dir() and (match := DUMP_NAME.match(path.name))
    )
    return (dumps[-1][1], dumps[-1][0]) if dumps else None


def count_dump(directory: Path) -> dict[str, int]:
    counts = {}
    for path in sorted(directory.glob("*.bson")):
        with path.open("rb") as handle:
            counts[path.stem] = sum(1 for _ in bson.decode_file_iter(handle))
    return counts


def main() -> int:
    env_file = read_env_file(Path(os.environ.get("ENV_FILE", "/etc/innovaplus/backend.env")))
    uri = os.environ.get("MONGO_URI") or env_file.get("MONGO_URI", "")
    live_db = os.environ.get("DB_NAME") or env_file.get("DB_NAME") or "innova_db"
    scratch = os.environ.get("RESTORE_CHECK_DB", "innova_restore_check")
    root = Path(os.environ.get("BACKUP_ROOT", "/var/backups"))
    max_age = int(os.environ.get("MAX_AGE_DAYS", "2"))
    if not uri:
        say("MONGO_URI is empty (set it, or run as root to read the env file)")
        return 1
    if scratch == live_db:
        say(f"RESTORE_CHECK_DB must not be the live database {live_db}")
        return 1
    found = newest_dump(root)
    if found is None:
        say(f"FAILED: no dump innova-YYYY-MM-DD in {root}")
        return 1
    dump, day = found
    age = (dt.date.today() - day).days
    if age > max_age:
        say(f"FAILED: the newest dump, {dump}, is {age} days old (more than MAX_AGE_DAYS={max_age}): backups stopped?")
        return 1
    expected = count_dump(dump / live_db)
    if not expected:
        say(f"FAILED: {dump / live_db} holds no collection")
        return 1

    say(f"restoring {dump} into the scratch database {scratch}")
    restore = os.environ.get("RESTORE_SCRIPT", str(HERE / "mongo-restore.sh"))
    env = {**os.environ, "MONGO_URI": uri, "DB_NAME": scratch, "FROM_DB": live_db}
    client: MongoClient[dict[str, object]] = MongoClient(uri, serverSelectionTimeoutMS=30_000)
    try:
        result = subprocess.run([restore, str(dump), "--drop"], env=env, check=False)
        if result.returncode != 0:
            say(f"FAILED: {restore} exited with status {result.returncode}")
            return 1
        database = client[scratch]
        problems = []
        for collection, count in expected.items():
            restored = database[collection].count_documents({})
            say(f"{collection}: {count} in the dump, {restored} restored")
            if restored != count:
                problems.append(f"{collection} ({restored} of {count})")
        if problems:
            say("FAILED: restored counts differ: " + ", ".join(problems))
            return 1
        say(f"OK: {dump.name}, {len(expected)} collections, {sum(expected.values())} documents restored")
        return 0
    finally:
        client.drop_database(scratch)
        client.close()


if __name__ == "__main__":
    sys.exit(main())
