"""Errors mapped at the edge: bad input is a 4xx that says what to fix, outages are 503."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger("tollgate.api")

# Faults of the storage path that pass by themselves: the client should retry, not report a bug.
UNAVAILABLE = (
    ConnectionError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
    asyncpg.InterfaceError,
    asyncpg.TooManyConnectionsError,
)


class ApiStartupError(RuntimeError):
    """The API cannot start; the message names the part and what to do."""


async def _invalid_request(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"loc": [str(p) for p in err.get("loc", ())], "msg": _msg(err)} for err in exc.errors()
    ]
    # `loc` is ("query", "group_by"): name the parameter the way the user wrote it.
    detail = "; ".join(
        f"{'.'.join(e['loc'][1:]) or (e['loc'] or ['request'])[0]}: {e['msg']}" for e in errors
    )
    return JSONResponse({"detail": detail, "errors": errors}, status_code=422)


def _msg(err: Any) -> str:
    if err.get("type") == "json_invalid":
        where = (err.get("ctx") or {}).get("error", "")
        return f"not valid JSON ({where}); send a JSON object" if where else "not valid JSON"
    return str(err.get("msg", "invalid")).removeprefix("Value error, ")


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("%s %s: storage unavailable: %r", request.method, request.url.path, exc)
    return JSONResponse(
        {"detail": "usage storage (Postgres) is unavailable right now; retry in a few seconds"},
        status_code=503,
        headers={"Retry-After": "5"},
    )


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's answer, except that a 405 lists the methods of every route on the path
    (it lists only those of the first route that matched, e.g. POST but not GET)."""
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        methods = [
            m
            for m in _METHODS
            if any(
                r.matches({**request.scope, "method": m})[0] is Match.FULL
                for r in request.app.router.routes
            )
        ]
        if methods:
            headers["Allow"] = ", ".join(methods)
    return await http_exception_handler(request, StarletteHTTPException(
        exc.status_code, exc.detail, headers
    ))  # fmt: skip


def install(app: FastAPI) -> None:
    """Register the handlers on `app`."""
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    for exc_type in UNAVAILABLE:
        app.add_exception_handler(exc_type, _unavailable)
