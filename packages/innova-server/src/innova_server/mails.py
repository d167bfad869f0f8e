"""The mails the core sends, written here and only delivered by the mailer plugin.

French by default, each a `multipart/alternative` of plain text and HTML
(same content, no images, no tracking pixels, no redirecting links), with
`From`, `To`, `Subject`, `Date`, `Message-ID` and `Auto-Submitted`
(RFC 3834: automatic replies must not answer it).

The reset link is `{FRONTEND_URL}/reset?token=…&email=…`, its query built
with `urlencode` (so `+` and `@` in an address survive) and HTML-escaped in
the HTML part; the verification link is `{FRONTEND_URL}/verify?token=…`.

Callers pass a `name` only once the address is verified (`UserRecord.mail_name`):
anyone can register someone else's address under any name, and our mails must
not carry a stranger's words to that inbox.
"""

from __future__ import annotations

import html
import re
from datetime import datetime
from email.message import EmailMessage
from email.utils import format_datetime, formataddr, make_msgid, parseaddr
from urllib.parse import urlencode, urlsplit

from innova_server.settings import Settings

BRAND = "INNOVAPLUS"
_SPACES = re.compile(r"\s+")


def reset_link(frontend_url: str, token: str, email: str) -> str:
    return f"{frontend_url.rstrip('/')}/reset?{urlencode({'token': token, 'email': email})}"


def sender_address(settings: Settings) -> tuple[str, str]:
    """(display name, address) of `From`: SMTP_FROM_EMAIL, else SMTP_USER, else no-reply@<front-end host>."""
    configured = settings.smtp_sender
    if configured:
        name, address = parseaddr(configured)
        if address and "@" in address:
            return name or BRAND, address
    host = urlsplit(settings.frontend_url).hostname or "localhost"
    return BRAND, f"no-reply@{host}"


def _clean_name(name: str | None) -> str:
    """One line, bounded: a display name never breaks the layout (or a header)."""
    return _SPACES.sub(" ", name or "").strip()[:100]


def ascii_address(address: str) -> str:
    """`address` with its domain in IDNA 2008 form (`ana@exémple.fr` → `ana@xn--exmple-cva.fr`).

    A header holds only ASCII addresses: a raw non-ASCII domain would be
    RFC 2047-encoded into an address no server accepts. The conversion is
    email-validator's (the one that validated the address), not Python's
    IDNA 2003 codec, which maps `straße.de` to `strasse.de` — another domain,
    where a reset link must never go. No ASCII form: `ValueError` (the mail is
    not sent; the background task logs and counts it).
    """
    if address.isascii():
        return address
    from email_validator import EmailNotValidError, validate_email

    try:
        ascii_form = validate_email(address, check_deliverability=False).ascii_email
    except EmailNotValidError:
        ascii_form = None
    if not ascii_form:
        raise ValueError("this address has no ASCII form to send to")
    return ascii_form


def _base(settings: Settings, to: str, subject: str, now: datetime) -> EmailMessage:
    display, address = sender_address(settings)
    message = EmailMessage()
    message["From"] = formataddr((display, address))
    message["To"] = ascii_address(to)
    message["Subject"] = subject
    message["Date"] = format_datetime(now)
    message["Message-ID"] = make_msgid(domain=address.rsplit("@", 1)[1])
    message["Auto-Submitted"] = "auto-generated"
    return message


def _fill(message: EmailMessage, text: str, page: str) -> EmailMessage:
    message.set_content(text)
    message.add_alternative(page, subtype="html")
    # After the parts: set_content() drops every Content-* header.
    message["Content-Language"] = "fr"
    return message


def _html_page(title: str, paragraphs: list[str]) -> str:
    body = "\n".join(f'<p style="margin:0 0 16px 0">{p}</p>' for p in paragraphs)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="fr">\n<head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title></head>\n"
        '<body style="font-family:Arial,Helvetica,sans-serif;font-size:15px;line-height:1.5;color:#1a1a1a">\n'
        f"{body}\n</body>\n</html>\n"
    )


def reset_mail(settings: Settings, *, to: str, token: str, name: str | None, now: datetime) -> EmailMessage:
    """The "reset your password" mail, holding the single-use link."""
    link = reset_link(settings.frontend_url, token, to)
    minutes = settings.reset_token_ttl_minutes
    who = _clean_name(name)
    greeting = f"Bonjour {who}," if who else "Bonjour,"
    subject = f"Réinitialisation de votre mot de passe {BRAND}"
    text = (
        f"{greeting}\n\n"
        f"Nous avons reçu une demande de réinitialisation du mot de passe de votre compte {BRAND} ({to}).\n\n"
        f"Pour choisir un nouveau mot de passe, ouvrez ce lien (valable {minutes} minutes, une seule fois) :\n\n"
        f"{link}\n\n"
        "Si vous n'êtes pas à l'origine de cette demande, ignorez ce message : "
        "votre mot de passe reste inchangé.\n\n"
        f"— L'équipe {BRAND}\n"
    )
    safe_link = html.escape(link, quote=True)
    page = _html_page(
        subject,
        [
            html.escape(greeting),
            "Nous avons reçu une demande de réinitialisation du mot de passe de votre compte "
            f"{BRAND} ({html.escape(to)}).",
            f"Pour choisir un nouveau mot de passe, ouvrez ce lien (valable {minutes} minutes, une seule fois)&nbsp;:",
            f'<a href="{safe_link}">Choisir un nouveau mot de passe</a>',
            f"Si le lien ne s'ouvre pas, copiez cette adresse dans votre navigateur&nbsp;:<br>"
            f'<span style="word-break:break-all">{safe_link}</span>',
            "Si vous n'êtes pas à l'origine de cette demande, ignorez ce message&nbsp;: "
            "votre mot de passe reste inchangé.",
            f"— L'équipe {BRAND}",
        ],
    )
    return _fill(_base(settings, to, subject, now), text, page)


def password_changed_mail(
    settings: Settings, *, to: str, name: str | None, now: datetime, kept_current: bool = False
) -> EmailMessage:
    """The short notice sent after a reset, or (`kept_current`) a change made while signed in."""
    who = _clean_name(name)
    greeting = f"Bonjour {who}," if who else "Bonjour,"
    subject = f"Votre mot de passe {BRAND} a été modifié"
    when = now.strftime("%d/%m/%Y à %H:%M UTC")
    closed = (
        "Vos autres sessions ont été fermées ; celle où le changement a été fait reste ouverte."
        if kept_current
        else "Toutes vos sessions ont été fermées : reconnectez-vous avec le nouveau mot de passe."
    )
    text = (
        f"{greeting}\n\n"
        f"Le mot de passe de votre compte {BRAND} ({to}) a été modifié le {when}. "
        f"{closed}\n\n"
        "Si vous n'êtes pas à l'origine de ce changement, demandez immédiatement un nouveau lien "
        f"depuis la page « Mot de passe oublié » : {settings.frontend_url}\n\n"
        f"— L'équipe {BRAND}\n"
    )
    page = _html_page(
        subject,
        [
            html.escape(greeting),
            f"Le mot de passe de votre compte {BRAND} ({html.escape(to)}) a été modifié le {html.escape(when)}. "
            + html.escape(closed).replace(" :", "&nbsp;:").replace(" ;", "&nbsp;;"),
            "Si vous n'êtes pas à l'origine de ce changement, demandez immédiatement un nouveau lien "
            f"depuis la page «&nbsp;Mot de passe oublié&nbsp;»&nbsp;: {html.escape(settings.frontend_url)}",
            f"— L'équipe {BRAND}",
        ],
    )
    return _fill(_base(settings, to, subject, now), text, page)


def verify_link(frontend_url: str, token: str) -> str:
    return f"{frontend_url.rstrip('/')}/verify?{urlencode({'token': token})}"


def verify_mail(settings: Settings, *, to: str, token: str, now: datetime) -> EmailMessage:
    """The "confirm your address" mail. Never a name: the address is not verified yet."""
    link = verify_link(settings.frontend_url, token)
    hours = settings.verify_token_ttl_hours
    subject = f"Confirmez votre adresse e-mail {BRAND}"
    text = (
        "Bonjour,\n\n"
        f"Un compte {BRAND} vient d'être créé avec cette adresse ({to}), ou une confirmation a été demandée.\n\n"
        f"Pour confirmer que cette adresse est bien la vôtre, ouvrez ce lien (valable {hours} heures, "
        "une seule fois) :\n\n"
        f"{link}\n\n"
        "Si vous n'êtes pas à l'origine de cette demande, ignorez ce message : "
        "l'adresse restera non confirmée.\n\n"
        f"— L'équipe {BRAND}\n"
    )
    safe_link = html.escape(link, quote=True)
    page = _html_page(
        subject,
        [
            "Bonjour,",
            f"Un compte {BRAND} vient d'être créé avec cette adresse ({html.escape(to)}), "
            "ou une confirmation a été demandée.",
            f"Pour confirmer que cette adresse est bien la vôtre, ouvrez ce lien (valable {hours} heures, "
            "une seule fois)&nbsp;:",
            f'<a href="{safe_link}">Confirmer mon adresse</a>',
            f"Si le lien ne s'ouvre pas, copiez cette adresse dans votre navigateur&nbsp;:<br>"
            f'<span style="word-break:break-all">{safe_link}</span>',
            "Si vous n'êtes pas à l'origine de cette demande, ignorez ce message&nbsp;: "
            "l'adresse restera non confirmée.",
            f"— L'équipe {BRAND}",
        ],
    )
    return _fill(_base(settings, to, subject, now), text, page)


def account_deleted_mail(settings: Settings, *, to: str, name: str | None, now: datetime) -> EmailMessage:
    """The notice that an account and all its data were deleted."""
    who = _clean_name(name)
    greeting = f"Bonjour {who}," if who else "Bonjour,"
    subject = f"Votre compte {BRAND} a été supprimé"
    when = now.strftime("%d/%m/%Y à %H:%M UTC")
    text = (
        f"{greeting}\n\n"
        f"Le compte {BRAND} de cette adresse ({to}) a été supprimé le {when}, à sa demande, "
        "avec toutes ses données : conversations, messages et sessions.\n\n"
        "Si vous n'êtes pas à l'origine de cette suppression, contactez l'équipe "
        f"depuis {settings.frontend_url} : quelqu'un connaissait votre mot de passe.\n\n"
        f"— L'équipe {BRAND}\n"
    )
    page = _html_page(
        subject,
        [
            html.escape(greeting),
            f"Le compte {BRAND} de cette adresse ({html.escape(to)}) a été supprimé le {html.escape(when)}, "
            "à sa demande, avec toutes ses données&nbsp;: conversations, messages et sessions.",
            "Si vous n'êtes pas à l'origine de cette suppression, contactez l'équipe "
            f"depuis {html.escape(settings.frontend_url)}&nbsp;: quelqu'un connaissait votre mot de passe.",
            f"— L'équipe {BRAND}",
        ],
    )
    return _fill(_base(settings, to, subject, now), text, page)


__all__ = [
    "BRAND",
    "account_deleted_mail",
    "password_changed_mail",
    "reset_link",
    "reset_mail",
    "sender_address",
    "verify_link",
    "verify_mail",
]
