"""The same decision repeated in a row reads as one line with a count (pure).

A hub that retries a denied spawn every few seconds fills the record with denials that
differ only in their numbers; the page shows them as one line, with how many and when the last was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

# What makes two decisions "the same": not the message, whose used amount grows.
SAME = ("kind", "allowed", "fail_open", "reason", "quota", "workload")


@dataclass(frozen=True)
class Run:
    """Consecutive decisions that are the same; `latest` is the newest of them."""

    latest: Mapping[str, Any]
    count: int
    first_at: datetime


def runs(decisions: Sequence[Mapping[str, Any]], limit: int) -> list[Run]:
    """Newest-first decisions collapsed into runs of the same one, at most `limit` runs."""
    out: list[Run] = []
    for d in decisions:
        if out and all(out[-1].latest[k] == d[k] for k in SAME):
            prev = out[-1]
            out[-1] = Run(prev.latest, prev.count + 1, d["decided_at"])
        elif len(out) == limit:
            break
        else:
            out.append(Run(d, 1, d["decided_at"]))
    return out
