"""The HTML around every page, and the small pages: sign-in, messages, the admin's list.

Pure functions from what to show to a string; everything that came from a user, a host
or the quota file is escaped here.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from html import escape as e
from urllib.parse import urlencode

from ..tokens import Principal
from .style import CSS

LOGO = (
    '<svg viewBox="0 0 24 24" aria-hidden="true"><rect x="2" y="2" width="20" height="20" '
    'rx="6" fill="#4f5bd5"/><path d="M7 8h10M12 8v9" stroke="#fff" stroke-width="2.6" '
    'stroke-linecap="round"/></svg>'
)
FAVICON = (
    "data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 24 24'%3E"
    "%3Crect x='2' y='2' width='20' height='20' rx='6' fill='%234f5bd5'/%3E%3Cpath d='M7 8h10M12 "
    "8v9' stroke='white' stroke-width='2.6' stroke-linecap='round'/%3E%3C/svg%3E"
)


def when(t: datetime | None) -> str:
    return "-" if t is None else f"{t:%d %b %H:%M} UTC"


def span(delta: timedelta) -> str:
    """'3 d 4 h', '5 h 12 min', '40 s'."""
    s = int(max(delta.total_seconds(), 0))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d} d {h} h" if h else f"{d} d"
    if h:
        return f"{h} h {m} min" if m else f"{h} h"
    return f"{m} min" if m else f"{s} s"


def layout(title: str, body: str, viewer: Principal | None = None) -> str:
    who = ""
    if viewer is not None:
        name = f"<b>{e(viewer.subject)}</b>" if viewer.subject else ""
        who = (
            f'<div class="who">Signed in as {name}'
            f'<span class="pill">{e(viewer.role.value)}</span>'
            '<form class="inline" method="post" action="/sign-out">'
            "<button>Sign out</button></form></div>"
        )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<link rel="icon" href="{FAVICON}"><title>{e(title)} · Tollgate</title>'
        f"<style>{CSS}</style></head><body>"
        f'<header class="top"><div class="wrap"><a class="brand" href="/">{LOGO}Tollgate</a>'
        f"{who}</div></header>{body}</body></html>"
    )


def sign_in(message: str | None = None, hub: bool = False) -> str:
    alert = f'<div class="alert" role="alert">{e(message)}</div>' if message else ""
    hub_help = (
        " If you use JupyterHub, paste an API token from the hub's <b>Token</b> page."
        if hub
        else ""
    )
    body = (
        '<main class="wrap"><div class="card signin"><h1>Your usage and quotas</h1>'
        '<p class="muted">Sign in with your Tollgate token to see how much of each quota '
        "you have used, and when it returns.</p>"
        f'{alert}<form method="post" action="/sign-in">'
        '<label for="token">Token</label>'
        '<input id="token" name="token" type="password" autocomplete="off" required '
        'placeholder="tg1.…" autofocus>'
        '<div class="actions"><button class="primary" type="submit">Sign in</button></div>'
        "</form>"
        '<p class="help">No token yet? Ask your admin for one '
        f"(<code>tollgate token issue --subject YOU</code>).{hub_help} "
        "The token is kept in a cookie for this site only, until you sign out.</p>"
        "</div></main>"
    )
    return layout("Sign in", body)


def message_page(viewer: Principal | None, title: str, text: str) -> str:
    body = (
        f'<main class="wrap"><section class="hero"><h1>{e(title)}</h1>'
        f'<p class="muted">{e(text)}</p><p><a href="/">Back to your page</a></p>'
        "</section></main>"
    )
    return layout(title, body, viewer)


def lookup(viewer: Principal, subjects: Sequence[str]) -> str:
    items = "".join(
        f'<li><a href="/?{urlencode({"subject": s})}">{e(s)}</a></li>' for s in subjects
    )
    listing = (
        f'<ul class="subjects">{items}</ul>'
        if subjects
        else '<p class="empty-state">No usage recorded in the last 30 days.</p>'
    )
    body = (
        '<main class="wrap"><section class="hero"><h1>Subjects</h1>'
        f'<p class="muted">As {e(viewer.role.value)} you may look at any subject. The usage '
        "report for everyone is at <code>/v1/reports/usage?format=csv</code> and "
        "<code>tollgate report</code>.</p></section>"
        '<section class="card"><form class="lookup" method="get" action="/">'
        '<label for="subject">Subject</label>'
        '<input id="subject" name="subject" required maxlength="200" placeholder="alice">'
        '<button class="primary">Show</button></form></section>'
        f'<section><h2>With usage in the last 30 days</h2><div class="card">{listing}</div>'
        "</section></main>"
    )
    return layout("Subjects", body, viewer)
