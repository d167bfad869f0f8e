"""`python -m innova_mailer --to you@example.com`: check the SMTP settings by sending one mail.

Reads the same environment as the server (e.g. `set -a; . /etc/innovaplus/backend.env; set +a`),
prints the connection it uses (never the password), sends a short test mail
and exits 0, or prints the `MailerError` and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid

from innova_mailer import make_smtp_mailer
from innova_server.mail import MailerError
from innova_server.mails import sender_address
from innova_server.settings import ConfigError, load_settings


def check_message(sender: tuple[str, str], to: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = f"{sender[0]} <{sender[1]}>"
    message["To"] = to
    message["Subject"] = "Test de configuration SMTP — INNOVAPLUS"
    message["Date"] = format_datetime(datetime.now(UTC))
    message["Message-ID"] = make_msgid(domain=sender[1].rsplit("@", 1)[1])
    message["Auto-Submitted"] = "auto-generated"
    text = "Ce message confirme que le serveur INNOVAPLUS peut envoyer des e-mails.\n"
    message.set_content(text)
    message.add_alternative(f'<!DOCTYPE html><html lang="fr"><body><p>{text.strip()}</p></body></html>', subtype="html")
    return message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m innova_mailer", description=__doc__.splitlines()[0])
    parser.add_argument("--to", required=True, help="recipient of the test mail")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        mailer = make_smtp_mailer(settings)
    except ConfigError as exc:
        for line in exc.lines:
            print(f"config: {line}", file=sys.stderr)
        return 2
    config = mailer.config
    print(
        f"SMTP {config.host}:{config.port} security={config.security} user={config.username or '-'} "
        f"envelope-from={config.sender or '(From header)'} timeout={config.timeout}s"
    )
    try:
        asyncio.run(mailer.send(check_message(sender_address(settings), args.to)))
    except MailerError as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    print(f"sent to {args.to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
