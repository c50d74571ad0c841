"""Repeated decisions collapse into runs; a different one in between breaks the run."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.api.web.runs import runs

T = datetime(2026, 12, 2, 10, 42, tzinfo=UTC)


def decision(minutes: int, kind: str = "spawn", quota: str = "memory-30d") -> dict[str, object]:
    return {"kind": kind, "allowed": False, "fail_open": False, "reason": "quota_exceeded",
            "quota": quota, "workload": None, "decided_at": T - timedelta(minutes=minutes),
            "message": f"You have used {100 + minutes} of 2 GiB·h"}  # fmt: skip


def test_eight_denials_in_a_row_are_one_run_with_the_newest_message() -> None:
    found = runs([decision(i) for i in range(8)], limit=8)
    assert len(found) == 1
    assert found[0].count == 8
    assert found[0].latest["decided_at"] == T
    assert found[0].first_at == T - timedelta(minutes=7)
    assert found[0].latest["message"] == "You have used 100 of 2 GiB·h"


def test_a_different_decision_between_denials_keeps_them_apart() -> None:
    rows = [decision(0), decision(1), decision(2, kind="block"), decision(3)]
    rows.append(decision(4, quota="x"))
    assert [r.count for r in runs(rows, limit=8)] == [2, 1, 1, 1]


def test_at_most_limit_runs_are_returned_each_counted_in_full() -> None:
    rows = [decision(i, quota=f"q{i // 3}") for i in range(12)]
    found = runs(rows, limit=2)
    assert [(r.latest["quota"], r.count) for r in found] == [("q0", 3), ("q1", 3)]
