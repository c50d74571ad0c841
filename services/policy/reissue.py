"""Enforcement that does not give up, pure: when a terminated workload is commanded again.

A terminate command is a request to a host; nothing proves it was obeyed except that the
workload's usage stops. So while usage keeps arriving for a workload over a
terminate-enforced quota, the policy terminates it again, with backoff, like Slurm keeps
signalling a job past its time limit. The rule (also in the README):

- attempt n+1 is due when the workload has usage sampled after attempt n's
  `decided_at + grace_seconds + settle` (so the final samples of a workload that obeyed,
  and a spool of samples taken before the command, never count), and at least
  `backoff(n)` has passed since attempt n;
- backoff(n) = min(after * 2**(n-1), max): 30 s, 60 s, 120 s, 240 s, 300 s, 300 s ... by default;
- a workload that (re)started after attempt n (a `workload_started` after its stop, or usage
  sampled after its stop: resumed) is a new run: its first usage brings attempt n+1 at once;
- attempt n's command id is the crossing's id with `-n` appended (attempt 1 keeps the
  crossing's id), so each attempt passes JetStream's duplicate window and a policy that
  restarts mid-attempt re-decides the same id, which the outbox and JetStream drop.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from .config import Reissue


@dataclass(frozen=True)
class Attempt:
    """The latest terminate command of one crossing (quota, subject, window, workload)."""

    crossing: str  # the first attempt's command id
    number: int
    command_id: str
    decided_at: datetime
    grace_seconds: Decimal
    host: str
    workload: str


def attempt_id(crossing: str, number: int) -> str:
    """The command id of attempt `number` of a crossing (deterministic, so restarts agree)."""
    return crossing if number == 1 else f"{crossing}-{number}"


def backoff(policy: Reissue, number: int) -> timedelta:
    """How long after attempt `number` the next one may follow."""
    # Past 2**20 the cap has long applied; the bound keeps the multiplication small.
    grown: timedelta = policy.after * 2 ** min(number - 1, 20)
    return min(grown, policy.max)


def cutoff(policy: Reissue, last: Attempt) -> datetime:
    """Usage sampled after this instant shows the workload outlived attempt `last`."""
    return last.decided_at + timedelta(seconds=float(last.grace_seconds)) + policy.settle


def ignored(policy: Reissue, last: Attempt, usage_until: datetime | None) -> bool:
    """True when usage sampled after the command (and its grace) came from the workload."""
    return usage_until is not None and usage_until > cutoff(policy, last)


def next_at(policy: Reissue, last: Attempt) -> datetime:
    """The earliest instant attempt `last.number + 1` may be decided."""
    return last.decided_at + backoff(policy, last.number)


def schedule(policy: Reissue, attempts: int = 6) -> list[float]:
    """The delays in seconds between successive attempts (for docs and the log)."""
    return [backoff(policy, n).total_seconds() for n in range(1, attempts + 1)]


def due(
    policy: Reissue, last: Attempt, started_at: datetime, usage_until: datetime | None
) -> datetime | None:
    """When attempt `last.number + 1` is due for a workload (None: it obeyed, so far)."""
    if started_at > last.decided_at:  # started again since: nothing of it was commanded yet
        ran = usage_until is not None and usage_until >= started_at
        return started_at if ran else None
    return next_at(policy, last) if ignored(policy, last, usage_until) else None
