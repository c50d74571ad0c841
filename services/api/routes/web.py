"""The web page at `/`: sign in with a token, then see your quotas, usage and decisions.

The token is posted once from the sign-in form and kept in an HttpOnly, SameSite=Lax
cookie that only these page routes read (the /v1 API takes bearer headers only, so the
cookie cannot be used to call it from another site). Users see only their own subject;
admins, auditors and integrators may pick any. The page has no scripts; its one inline
stylesheet is allowed by hash in the Content-Security-Policy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import TypeAdapter, ValidationError

from contracts._base import Name

from ..auth import READ_ANY_SUBJECT, AuthFailed, authenticate, throttle
from ..deps import ClockDep, ConfigDep, KeysDep, LimiterDep, MaxSkewDep, PoolDep
from ..records import active_subjects
from ..tokens import Principal
from ..web import page, subject
from ..web.data import SPANS, gather
from ..web.style import CSP

router = APIRouter(include_in_schema=False)
COOKIE = "tollgate_session"
MAX_FORM_BYTES = 16 * 1024
SESSION_MAX = timedelta(days=7)
UNEXPIRING_SESSION = timedelta(hours=12)  # admin and hub tokens carry no expiry
_NAME: TypeAdapter[str] = TypeAdapter(Name)
HEADERS = {
    "Content-Security-Policy": CSP,
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer would make form posts say Origin: null
    "X-Frame-Options": "DENY",
}


def _html(text: str, status: int = 200, headers: Mapping[str, str] | None = None) -> HTMLResponse:
    return HTMLResponse(text, status_code=status, headers={**HEADERS, **(headers or {})})


async def _viewer(request: Request, keys: KeysDep, clock: ClockDep) -> Principal | Response:
    """The signed-in principal, or the page to show instead (sign-in, or why not)."""
    token = request.cookies.get(COOKIE)
    if not token:
        return _html(page.sign_in(hub=keys.hub is not None))
    try:
        return await authenticate(token, keys, clock(), keys.hub)
    except AuthFailed as exc:
        if exc.status != 401:
            return _html(page.message_page(None, "Try again shortly", str(exc)), exc.status)
        response = _html(
            page.sign_in(f"{exc} Sign in again.", hub=keys.hub is not None),
            401,
            {"WWW-Authenticate": 'Bearer realm="tollgate"'},
        )
        response.delete_cookie(COOKIE, path="/")
        return response


@router.get("/", response_class=HTMLResponse)
async def home(
    request: Request,
    keys: KeysDep,
    clock: ClockDep,
    limiter: LimiterDep,
    pool: PoolDep,
    config: ConfigDep,
    max_skew: MaxSkewDep,
) -> Response:
    viewer = await _viewer(request, keys, clock)
    if isinstance(viewer, Response):
        return viewer
    try:
        throttle(limiter, viewer)
    except HTTPException as exc:
        return _html(page.message_page(viewer, "Slow down", str(exc.detail)), 429, exc.headers)
    range_key = request.query_params.get("range", "30d")
    if range_key not in SPANS:
        text = f"range must be one of {', '.join(SPANS)}; got {range_key[:40]!r}."
        return _html(page.message_page(viewer, "Unknown range", text), 422)
    asked = request.query_params.get("subject")
    if viewer.role not in READ_ANY_SUBJECT:
        if asked not in (None, viewer.subject):
            # The same page as for a subject that does not exist.
            return _html(page.message_page(viewer, "Not found", "subject not found"), 404)
        name = viewer.subject
    elif asked is None:
        now = clock()
        return _html(page.lookup(viewer, await active_subjects(pool, now - timedelta(days=30))))
    else:
        try:
            name = _NAME.validate_python(asked)
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
            return _html(page.message_page(viewer, "Bad subject", f"subject: {reason}"), 422)
    assert name is not None
    found = await gather(pool, config, viewer, name, range_key, clock(), max_skew)
    return _html(subject.render(found))


def _same_origin(request: Request) -> bool:
    """Forms are posted from this site only (no signing people in from elsewhere)."""
    origin = request.headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    return urlsplit(origin).netloc == request.headers.get("host")


@router.post("/sign-in")
async def sign_in(
    request: Request, keys: KeysDep, clock: ClockDep, limiter: LimiterDep
) -> Response:
    hub = keys.hub is not None
    if not _same_origin(request):
        return _html(page.sign_in("Sign in from this site's own form.", hub=hub), 403)
    # Attempts count against the address they come from: guessing tokens stays slow, and
    # each attempt that reaches JupyterHub is one the hub has to answer.
    wait = limiter.take(f"sign-in:{request.client.host if request.client else '?'}")
    if wait is not None:
        retry = str(math.ceil(wait))
        text = f"Too many sign-in attempts; try again in {retry} s."
        return _html(page.sign_in(text, hub=hub), 429, {"Retry-After": retry})
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return _html(page.sign_in("That is not a token: it is far too long.", hub=hub), 413)
    token = parse_qs(body.decode("utf-8", "replace")).get("token", [""])[0].strip()
    if not token:
        return _html(page.sign_in("Paste your token first.", hub=hub), 422)
    now = clock()
    try:
        principal = await authenticate(token, keys, now, hub=keys.hub)
    except AuthFailed as exc:
        return _html(page.sign_in(str(exc), hub=hub), exc.status)
    lifetime = UNEXPIRING_SESSION
    if principal.expires_at is not None:
        lifetime = min(principal.expires_at - now, SESSION_MAX)
    response = RedirectResponse("/", status_code=303, headers={"Cache-Control": "no-store"})
    response.set_cookie(
        COOKIE,
        token,
        max_age=max(int(lifetime.total_seconds()), 1),
        path="/",
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/sign-out")
async def sign_out() -> Response:
    response = RedirectResponse("/", status_code=303, headers={"Cache-Control": "no-store"})
    response.delete_cookie(COOKIE, path="/")
    return response
