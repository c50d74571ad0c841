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

from contracts.errors import printable

log = logging.getLogger("tollgate.api")

# Faults of the storage path that pass by themselves: the client should retry, not report a bug.
UNAVAILABLE = (
    ConnectionError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,
    asyncpg.InterfaceError,
    # A pooled connection that got the FATAL of a Postgres killed under it (kill -9).
    asyncpg.InternalClientError,
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


# What FastAPI answers a body it could not read as JSON for a reason other than syntax.
_UNPARSED = "There was an error parsing the body"


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's answers, made to say what is wrong: unreadable bodies, unknown paths,
    and a 405 that lists the methods of every route on the path."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 405:
        return await _method_not_allowed(request, exc)
    if exc.status_code == 400 and exc.detail == _UNPARSED:
        # A body that is not UTF-8 or is nested beyond the parser's depth: bad JSON, like
        # any other, and a 422 that says so (FastAPI's own 400 names no cause).
        cause = exc.__cause__
        why = (
            "nested too deeply"
            if isinstance(cause, RecursionError)
            else "not UTF-8 text"
            if isinstance(cause, UnicodeDecodeError)
            else "unreadable"
        )
        return JSONResponse(
            {"detail": f"body: not valid JSON ({why}); send a JSON object"}, status_code=422
        )
    if exc.status_code == 404 and exc.detail == "Not Found":
        # No route matched (a path with a newline matches none): say so, not just "Not Found".
        path = printable(request.url.path, 120)
        return JSONResponse(
            {"detail": f"no endpoint {request.method} {path}; the API's paths are at /docs"},
            status_code=404,
        )
    return await http_exception_handler(request, exc)


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("%s %s: storage unavailable: %r", request.method, request.url.path, exc)
    return JSONResponse(
        {"detail": "usage storage (Postgres) is unavailable right now; retry in a few seconds"},
        status_code=503,
        headers={"Retry-After": "5"},
    )


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


async def _method_not_allowed(request: Request, exc: StarletteHTTPException) -> Response:
    # Starlette lists only the methods of the first route that matched (POST but not GET).
    headers = dict(exc.headers or {})
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
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for exc_type in UNAVAILABLE:
        app.add_exception_handler(exc_type, _unavailable)
