"""GET /v1/subjects/{subject}/quotas: where a subject stands against each of its quotas."""

from __future__ import annotations

from fastapi import APIRouter

from ..auth import CurrentUser, ReadableSubject
from ..deps import ClockDep, ConfigDep, MaxSkewDep, PoolDep
from ..models import QuotaPublic, QuotasPublic, limit_detail
from ..subjects import quotas_of

router = APIRouter(tags=["quotas"])


@router.get(
    "/v1/subjects/{subject:path}/quotas",
    response_model=QuotasPublic,
    responses={401: {}, 404: {}, 422: {}},
)
async def get_quotas(
    subject: ReadableSubject,
    principal: CurrentUser,
    pool: PoolDep,
    config: ConfigDep,
    clock: ClockDep,
    max_skew: MaxSkewDep,
) -> QuotasPublic:
    """Used, limit, remaining and state of every quota that applies, with retry_at and lag."""
    now = clock()
    found = await quotas_of(pool, config, subject, principal, now, max_skew)
    # Clock skew between this host and Postgres is not lag: never report it as negative.
    lag = None if found.as_of is None else max(0.0, (now - found.as_of).total_seconds())
    return QuotasPublic(
        subject=subject,
        groups=found.groups,
        policy_version=config.version,
        quotas=[
            QuotaPublic(
                name=st.name,
                metric=st.metric,
                unit=st.unit,
                used=st.used,
                limit=st.limit,
                remaining=st.remaining,
                window=st.window,
                window_text=q.window.describe(),
                state=st.state,
                retry_at=st.retry_at,
                enforce=st.enforce,
                warn_at=list(q.warn_at),
                projected_exhaustion_at=st.projected_exhaustion_at,
                **limit_detail(st),
            )
            for q, st in zip(found.quotas, found.statuses, strict=True)
        ],
        as_of_seq=found.as_of_seq,
        as_of=found.as_of,
        lag_seconds=lag,
    )
