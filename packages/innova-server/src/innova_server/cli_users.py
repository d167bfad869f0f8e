"""`innova users list|show|disable|enable|logout|delete`: the operator's hands on accounts.

Exit status 0 on success, 1 when the account does not exist or the database
cannot be reached (one line saying which, never a traceback or the URI), 2
for a configuration problem. Output is one line per fact, so it greps and
pipes; `list --json` is for scripts. The rules themselves live in
`innova_server.auth.admin`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from innova_server.settings import Settings, load_settings

EXIT_MISSING = 1


def add_users_parser(commands: Any) -> None:
    users = commands.add_parser("users", help="list, inspect, disable, enable, log out or delete accounts")
    actions = users.add_subparsers(dest="users_command", required=True)

    listing = actions.add_parser("list", help="the newest accounts")
    listing.add_argument("--json", action="store_true")
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(handler=cmd_users, action="list")
    for name, text in (
        ("show", "one account's facts"),
        ("disable", "disable an account (its sessions end at once; login 403 account_disabled)"),
        ("enable", "enable a disabled account"),
        ("logout", "end every session of an account"),
        ("delete", "erase an account and all its data (as DELETE /auth/me)"),
    ):
        action = actions.add_parser(name, help=text)
        action.add_argument("email")
        if name == "delete":
            action.add_argument("--yes", action="store_true", help="do not ask to type the address again")
        action.set_defaults(handler=cmd_users, action=name)


def cmd_users(args: argparse.Namespace) -> int:
    from pymongo.errors import PyMongoError

    settings = load_settings()
    uri = settings.mongo_uri_value
    if not uri:
        print("innova: MONGO_URI is not set.", file=sys.stderr)
        return 2
    if args.action == "delete" and not args.yes and not _confirmed(args.email):
        print("innova: not confirmed; nothing deleted", file=sys.stderr)
        return EXIT_MISSING
    try:
        return asyncio.run(_run(args, settings, uri))
    except PyMongoError as exc:
        print(f"innova: the database is unavailable ({type(exc).__name__}); nothing changed", file=sys.stderr)
        return EXIT_MISSING


def _confirmed(email: str) -> bool:
    print(f"Type {email} to erase this account and all its data: ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    return answer.strip().lower() == email.strip().lower()


async def _run(args: argparse.Namespace, settings: Settings, uri: str) -> int:
    from innova_server.auth.admin import UserAdmin
    from innova_server.db import Database

    # Short: an operator waits for an answer, not for MONGO_TIMEOUT_MS.
    db = Database(uri, settings.db_name, timeout_ms=min(settings.mongo_timeout_ms, 5000))
    try:
        admin = UserAdmin(db, settings, mailer=_mailer(settings) if args.action == "delete" else None)
        if args.action == "list":
            accounts = await admin.list(max(1, args.limit))
            if args.json:
                print(json.dumps([_summary(row) for row in accounts], ensure_ascii=False, indent=2))
                return 0
            for row in accounts:
                state = "disabled" if row.disabled_at else "active"
                verified = "verified" if row.email_verified else "unverified"
                print(f"{row.email}\t{row.id}\t{row.created_at.isoformat()}\t{verified}\t{state}")
            return 0
        user = await admin.find(args.email)
        if user is None:
            print(f"innova: no account for {args.email}", file=sys.stderr)
            return EXIT_MISSING
        actions: dict[str, Callable[[], Awaitable[list[str]]]] = {
            "show": lambda: _show(admin, user),
            "disable": lambda: _say(admin.disable(user), lambda n: f"disabled {user.email}; {n} session(s) ended"),
            "enable": lambda: _say(admin.enable(user), lambda _: f"enabled {user.email}"),
            "logout": lambda: _say(admin.logout(user), lambda n: f"{n} session(s) ended for {user.email}"),
            "delete": lambda: _say(
                admin.delete(user),
                lambda mailed: f"deleted {user.email} and all its data"
                + ("; notice mailed" if mailed else "; no notice mailed"),
            ),
        }
        for line in await actions[args.action]():
            print(line)
        return 0
    finally:
        await db.close()


async def _show(admin: Any, user: Any) -> list[str]:
    facts = await admin.facts(user)
    return [f"{name}: {'' if value is None else value}" for name, value in facts.lines()]


async def _say(work: Awaitable[Any], line: Callable[[Any], str]) -> list[str]:
    return [line(await work)]


def _summary(user: Any) -> dict[str, Any]:
    return {
        "id": user.id,
        "email": user.email,
        "name": user.name,
        "created_at": user.created_at.isoformat(),
        "email_verified": user.email_verified,
        "disabled_at": user.disabled_at.isoformat() if user.disabled_at else None,
    }


def _mailer(settings: Settings) -> Any:
    """The deployment's mailer, for the deletion notice; None if it cannot be built here."""
    from innova_server.plugins import PluginRegistry

    try:
        return PluginRegistry.load(settings).build_mailer(settings)
    except Exception:
        return None


__all__ = ["add_users_parser", "cmd_users"]
