"""Errors mapped at the edge: bad input is a 4xx that says what to fix, outages are 503."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

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


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("%s %s: storage unavailable: %r", request.method, request.url.path, exc)
    return JSONResponse(
        {"detail": "usage storage (Postgres) is unavailable right now; retry in a few seconds"},
        status_code=503,
        headers={"Retry-After": "5"},
    )


def install(app: FastAPI) -> None:
    """Register the handlers on `app`."""
    app.add_exception_handler(RequestValidationError, _invalid_request)
    for exc_type in UNAVAILABLE:
        app.add_exception_handler(exc_type, _unavailable)
