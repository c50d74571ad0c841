"""GET /metrics: Prometheus text for this process and what Postgres and JetStream report."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from ..deps import ApiDeps
from ..gauges import scrape

router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
async def metrics(request: Request) -> PlainTextResponse:
    """This process's counters (under `tollgate up`, every service's): ingest, decisions,
    fail-opens, dead letters, API requests; plus ledger lag, backlog and recorded decisions
    read from Postgres and JetStream at scrape time."""
    text = generate_latest(REGISTRY)
    deps: ApiDeps | None = getattr(request.app.state, "deps", None)
    if deps is not None:
        text += await scrape(deps.pool, deps.nc, deps.prefix, deps.clock())
    return PlainTextResponse(text, media_type=CONTENT_TYPE_LATEST)
