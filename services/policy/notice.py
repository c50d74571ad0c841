"""Notice before termination, pure: when a workload is told, stopped, or let go.

A quota with `termination: {notice_seconds: N}` (N > 0) does not kill at the crossing. The
rules (also in the README, "Notice before termination"):

- at the crossing of a workload over a terminate-enforced quota, a notice is scheduled for
  it: `terminate_at = decided_at + N` (one per crossing; the crossing's terminate command id
  names it);
- while `now < terminate_at`, nothing else happens to that workload;
- at `terminate_at`, if the workload is still over (and still running), the terminate
  command of the crossing is decided, exactly as without a notice (and re-issued the same
  way if ignored);
- when the workload is no longer over before then (a grant, a configuration raising the
  limit, a rolling window freeing usage) or no longer runs, the notice is cancelled; a
  later crossing gets a new notice.

A notice is a decision (kind `termination_scheduled`, and `termination_cancelled` for its
end), so it survives a restart of the policy: pending notices are reloaded and fire on time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from .domain import Standing
from .workloads import Workload

SCHEDULED = "termination_scheduled"
CANCELLED = "termination_cancelled"


@dataclass(frozen=True)
class Notice:
    """A pending notice: the crossing's workload stops at `terminate_at` if still over."""

    notice_id: str
    crossing: str  # the terminate command id it defers
    subject: str
    workload: str
    host: str
    quota: str
    base_limit: Decimal  # the configured limit then (base unit): tells "the limit was raised"
    terminate_at: datetime
    decided_at: datetime


@dataclass(frozen=True)
class Schedule:
    """Tell a workload it will be stopped at `terminate_at`."""

    notice_id: str
    crossing: str
    workload: Workload
    standing: Standing
    terminate_at: datetime


@dataclass(frozen=True)
class Cancel:
    """A pending notice ends without a termination."""

    notice: Notice
    why: str
    standing: Standing | None = None


def notice_id(crossing: str, decided_at: datetime) -> str:
    """A notice's id: its crossing and when (a crossing may be noticed again after a cancel)."""
    digest = hashlib.sha256(f"{crossing}\x1f{decided_at.isoformat()}".encode()).hexdigest()
    return f"notice-{digest[:32]}"


def terminate_at(s: Standing, now: datetime) -> datetime:
    return now + timedelta(seconds=float(s.quota.notice_seconds))


def hhmm(t: datetime) -> str:
    """'10:42 UTC' (with seconds when the notice is short, so the time is never ambiguous)."""
    t = t.astimezone(UTC)
    return t.strftime("%H:%M:%S UTC" if t.second else "%H:%M UTC")


def scheduled_sentence(quota: str, at: datetime) -> str:
    """What `tollgate run` prints on the workload's stderr (without the 'Tollgate: ')."""
    return (
        f"{quota} exceeded; this job will be stopped at {hhmm(at)} unless usage falls "
        "or a grant arrives"
    )


def cancelled_sentence(quota: str, at: datetime, why: str) -> str:
    return f"the stop planned for {hhmm(at)} is cancelled: {why}"


def why_cancelled(notice: Notice, s: Standing | None, running: bool) -> str:
    """Why a pending notice ends: said to the workload, stored in the decision."""
    if not running:
        return "the workload stopped"
    if s is None:
        return f"the quota {notice.quota} no longer applies"
    q = s.quota
    if not q.hard:
        return f"{q.name} is soft now"
    if "terminate" not in q.enforce:
        return f"{q.name} no longer terminates workloads"
    if q.grants and s.used >= q.base_limit * (1 + q.grace):
        return f"a grant raised {q.name}"
    if q.base_limit > notice.base_limit:
        return f"the limit of {q.name} was raised"
    return f"usage of {q.name} fell back under its limit"
