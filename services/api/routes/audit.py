"""The auditor's view: ledger events in order (NDJSON) and a verdict on the hash chain."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from services.ledger.replay import event_line, events_after, verify_chain

from ..auth import CurrentUser
from ..deps import PoolDep
from ..tokens import Principal, Role

router = APIRouter(tags=["audit"])
AUDIT_ROLES = frozenset({Role.ADMIN, Role.AUDITOR})


async def _auditor(principal: CurrentUser) -> Principal:
    if principal.role not in AUDIT_ROLES:
        raise HTTPException(
            403,
            "Reading the ledger's events takes an admin or auditor token; ask an admin for "
            "`tollgate token issue --subject NAME --role auditor`.",
        )
    return principal


Auditor = Annotated[Principal, Depends(_auditor)]


class ChainVerdictPublic(BaseModel):
    """Whether the hash chain holds, over how much, and where it breaks if it does not."""

    ok: bool
    batches: int
    events: int
    head_hash: str
    first_bad_batch: int | None
    problem: str | None


@router.get(
    "/v1/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {}}}, 401: {}, 403: {}, 422: {}},
)
async def get_events(
    _: Auditor,
    pool: PoolDep,
    after: Annotated[int, Query(ge=0, le=2**62, description="ledger sequence to start after")] = 0,
    limit: Annotated[int, Query(ge=1, le=100_000, description="at most this many")] = 1000,
) -> StreamingResponse:
    """Ledger events with seq > `after`, in order, one JSON object per line, with batch hashes."""

    async def lines() -> AsyncIterator[str]:
        async with pool.acquire() as conn:
            async for event in events_after(conn, after, limit):
                yield event_line(event)

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.get("/v1/audit/verify", response_model=ChainVerdictPublic, responses={401: {}, 403: {}})
async def get_verify(_: Auditor, pool: PoolDep) -> ChainVerdictPublic:
    """Recompute the hash chain over every batch; name the first batch that does not hold."""
    async with pool.acquire() as conn:
        v = await verify_chain(conn)
    return ChainVerdictPublic(
        ok=v.ok, batches=v.batches, events=v.events, head_hash=v.head_hash,
        first_bad_batch=v.first_bad_batch, problem=v.problem,
    )  # fmt: skip
