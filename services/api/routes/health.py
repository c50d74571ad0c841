"""Liveness and readiness: what orchestrators and `tollgate up` poll."""

from __future__ import annotations

import asyncio

import asyncpg
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from infra.db import pending_migrations

from ..deps import ApiDeps
from ..models import Check, Liveness, Readiness

router = APIRouter(tags=["health"])
PROBE_TIMEOUT = 2.0


@router.get("/healthz", response_model=Liveness)
async def healthz() -> Liveness:
    """The process is alive and serving; says nothing about NATS or Postgres."""
    return Liveness()


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(request: Request) -> JSONResponse:
    """200 when NATS is connected, Postgres answers and the schema is current; else 503."""
    deps: ApiDeps | None = getattr(request.app.state, "deps", None)
    if deps is None:
        starting = Check(ok=False, detail="the API is still starting", fix="retry in a moment")
        checks = {"nats": starting, "postgres": starting, "migrations": starting}
    else:
        checks = {"nats": _nats(deps), **await _postgres(deps.pool)}
    ready = all(c.ok for c in checks.values())
    body = Readiness(status="ready" if ready else "not_ready", checks=checks)
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ready else 503)


def _nats(deps: ApiDeps) -> Check:
    nc = deps.nc
    if nc is None:
        return Check(
            ok=False,
            detail=f"connecting to NATS at {deps.nats_address}",
            fix="check that the NATS server (TOLLGATE_NATS_URL) is running and reachable",
        )
    if nc.is_connected:
        url = nc.connected_url
        where = f" to {url.hostname}:{url.port}" if url is not None else ""
        return Check(ok=True, detail=f"connected{where}")
    if nc.is_closed:
        return Check(
            ok=False,
            detail="the NATS connection is closed",
            fix="restart the API; it reconnects to TOLLGATE_NATS_URL at start",
        )
    return Check(
        ok=False,
        detail="not connected to NATS; reconnecting",
        fix="check that the NATS server at TOLLGATE_NATS_URL is running and reachable",
    )


async def _postgres(pool: asyncpg.Pool) -> dict[str, Check]:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT), pool.acquire() as conn:
            pending = await pending_migrations(conn)
    except (
        OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
        asyncpg.InternalClientError,  # a connection that got the FATAL of a killed server
    ) as exc:  # fmt: skip
        reason = str(exc) or type(exc).__name__
        unknown = Check(ok=False, detail="unknown until Postgres answers", fix=None)
        return {
            "postgres": Check(
                ok=False,
                detail=f"Postgres does not answer within {PROBE_TIMEOUT:g}s: {reason}",
                fix="check that the Postgres server at TOLLGATE_DATABASE_URL is running",
            ),
            "migrations": unknown,
        }
    postgres = Check(ok=True, detail="answers")
    if pending:
        return {
            "postgres": postgres,
            "migrations": Check(
                ok=False,
                detail=f"the database lacks migrations {', '.join(pending)}",
                fix="restart the API or the ledger: services apply missing migrations at start",
            ),
        }
    return {"postgres": postgres, "migrations": Check(ok=True, detail="schema is current")}
