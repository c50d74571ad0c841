"""GET /v1/workloads/{workload}: one workload's owner, host, lifecycle and usage.

Usage and hosts come from the hourly rollups; lifecycle (started, stopped, exit status,
termination reason) from what the policy recorded of the hosts' `workload_started` and
`workload_stopped` events, and the explanation from its termination decision. A workload
the policy never saw announced has state `unknown` and its usage hours instead, until the
policy terminates it (then `running`, known from its usage). A workload whose usage comes
after its stop is `running` again, and one that outlives terminate commands says so.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Annotated

import asyncpg
from fastapi import APIRouter, HTTPException, Path, Query

from ..auth import READ_ANY_SUBJECT, CurrentUser
from ..deps import PoolDep
from ..humanize import disobeying, unit_of
from ..models import (
    MetricTotal,
    ResourcesPublic,
    ScheduledTerminationPublic,
    TerminationPublic,
    WorkloadPublic,
)
from ..ranges import HOUR, check_name
from ..records import WorkloadFacts, pending_notice, workload_facts

router = APIRouter(tags=["workloads"])
WORKLOAD_NOT_FOUND = "workload not found"
# A workload known only from usage is taken as gone once its usage stops this long (the
# hour buckets say only which hour usage came in, hence the extra hour).
QUIET = timedelta(minutes=10)


@router.get(
    "/v1/workloads/{workload:path}",
    response_model=WorkloadPublic,
    responses={401: {}, 404: {}, 409: {}, 422: {}},
)
async def get_workload(
    principal: CurrentUser,
    pool: PoolDep,
    workload: Annotated[str, Path(min_length=1, max_length=200, description="workload id")],
    subject: Annotated[
        str | None,
        Query(max_length=200, description="whose workload, when several subjects used the name"),
    ] = None,
) -> WorkloadPublic:
    """Subject, host, state, times, termination reason and usage per metric of a workload."""
    workload = check_name("workload", workload)
    if subject is not None:
        subject = check_name("subject", subject)
    if principal.role not in READ_ANY_SUBJECT:
        if subject not in (None, principal.subject):
            raise HTTPException(404, WORKLOAD_NOT_FOUND)
        subject = principal.subject
    facts = await workload_facts(pool, workload)
    owners = facts.subjects
    if subject is None and len(owners) > 1:
        raise HTTPException(
            409,
            f"several subjects used the workload name {workload!r}: {', '.join(sorted(owners))}; "
            "add ?subject=NAME",
        )
    owner = subject if subject is not None else next(iter(owners), None)
    if owner is None or owner not in owners:
        # Other users' workloads look exactly like workloads that do not exist.
        raise HTTPException(404, WORKLOAD_NOT_FOUND)
    scheduled = await _scheduled(pool, workload, owner)
    return _public(workload, owner, facts).model_copy(update={"scheduled_termination": scheduled})


async def _scheduled(
    pool: asyncpg.Pool, workload: str, owner: str
) -> ScheduledTerminationPublic | None:
    notice = await pending_notice(pool, workload, owner)
    if notice is None:
        return None
    return ScheduledTerminationPublic(
        notice_id=notice.notice_id,
        decided_at=notice.decided_at,
        terminate_at=notice.terminate_at,
        quota=notice.quota,
        message=notice.message,
    )


def _public(workload: str, owner: str, facts: WorkloadFacts) -> WorkloadPublic:
    usage = [u for u in facts.usage if u.subject == owner]
    life = facts.lifecycle if facts.lifecycle and facts.lifecycle["subject"] == owner else None
    hosts = sorted({u.host for u in usage})
    totals: dict[str, MetricTotal] = {}
    for u in usage:
        seen = totals.get(u.metric)
        totals[u.metric] = MetricTotal(
            metric=u.metric,
            unit=unit_of(u.metric),
            total=u.total + (seen.total if seen else 0),
            events=u.events + (seen.events if seen else 0),
        )
    first = min((u.first_hour for u in usage), default=None)
    last = max((u.last_hour for u in usage), default=None)
    state, detail = _state(life, first, last)
    terminations = [t for t in facts.terminations if t["subject"] == owner]
    term = terminations[0] if terminations else None
    resources = None
    if life is not None and life["started_at"] is not None:
        given = {"cpus": 0, "mem_bytes": 0, "gpus": 0, "gpu_model": None}
        resources = ResourcesPublic.model_validate({**given, **json.loads(life["resources"])})
    return WorkloadPublic(
        workload=workload,
        subject=owner,
        host=(life["host"] or None) if life else (hosts[0] if len(hosts) == 1 else None),
        hosts=hosts,
        state=state,
        state_detail=detail,
        groups=list(life["groups"]) if life else [],
        resources=resources,
        started_at=life["started_at"] if life else None,
        stopped_at=life["stopped_at"] if life else None,
        exit_status=life["exit_status"] if life else None,
        termination_reason=(life["stop_reason"] if life else None)
        or (term["reason"] if term else None),
        termination=None
        if term is None
        else TerminationPublic(
            decision_id=term["decision_id"],
            decided_at=term["decided_at"],
            reason=term["reason"],
            quota=term["quota"],
            message=term["message"],
        ),
        terminate_commands=life["terminate_commands"] if life else 0,
        ignored_commands=life["ignored_commands"] if life else 0,
        usage_from=first,
        usage_to=None if last is None else last + HOUR,
        usage=[totals[m] for m in sorted(totals)],
        as_of_seq=facts.as_of_seq,
        as_of=facts.as_of,
    )


def _state(
    life: asyncpg.Record | None, first: datetime | None, last: datetime | None
) -> tuple[str, str]:
    if life is None:
        if first is None or last is None:
            return "unknown", "no usage and no lifecycle events recorded"
        return "unknown", (
            "no start or stop event reached the policy; usage was recorded between "
            f"{first:%Y-%m-%d %H:00} and {last + HOUR:%Y-%m-%d %H:00} UTC"
        )
    if (
        life["stopped_at"] is None
        and not life["announced"]
        and (last is None or last + HOUR < datetime.now(UTC) - QUIET)
    ):
        return "unknown", (
            f"no stop was reported and no usage came since {_hour_end(last)}; it was sent "
            f"{life['terminate_commands']} terminate command(s) on host {life['host']}"
        )
    if life["stopped_at"] is None:
        return "running", _running(life)
    when = f"{life['stopped_at']:%Y-%m-%d %H:%M:%S} UTC"
    if life["stop_reason"]:
        return "terminated", f"terminated at {when}: {life['stop_reason']}"
    status = "" if life["exit_status"] is None else f" with exit status {life['exit_status']}"
    return "stopped", f"stopped at {when}{status}"


def _running(life: asyncpg.Record) -> str:
    since = f"{life['started_at']:%Y-%m-%d %H:%M:%S} UTC"
    if life["resumed_from"] is not None:
        text = (
            f"running again since {since}: usage came after it stopped at "
            f"{life['resumed_from']:%Y-%m-%d %H:%M:%S} UTC"
        )
    elif not life["announced"]:
        text = f"running since {since} (known from its usage; no workload_started)"
    else:
        text = f"running since {since}"
    if life["ignored_commands"]:
        text += "; " + disobeying(
            life["ignored_commands"], life["host"], life["usage_after_command"]
        )
    return text


def _hour_end(last: datetime | None) -> str:
    return "-" if last is None else f"{last + HOUR:%Y-%m-%d %H:00} UTC"
