"""Pure bookkeeping of `tollgate run`: sizes, exit codes, exact amounts, batches."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts._base import parse_json
from contracts.samples import CounterBatch, CounterSample
from contracts.workloads import Resources
from services.meter.domain import (
    Integral,
    LogQuota,
    Reading,
    UsageAccount,
    allocations,
    exact,
    exit_status,
    new_epoch,
    new_workload_id,
    parse_size,
)

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1048576", 1_048_576),
        ("0", 0),
        ("512B", 512),
        ("4GiB", 4 * 2**30),
        ("4 gib", 4 * 2**30),
        ("1.5Gi", 3 * 2**29),
        ("512MB", 512_000_000),
        ("2kb", 2000),
        ("1TiB", 2**40),
        ("0.5KiB", 512),
    ],
)
def test_sizes_are_read_with_their_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("4G", "ambiguous"),
        ("four", "not a size"),
        ("-1GiB", "not a size"),
        ("3 parsecs", "unknown unit"),
        ("0.3B", "whole number"),
        ("", "not a size"),
    ],
)
def test_bad_sizes_are_refused_with_what_to_write(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_size(text)


@pytest.mark.parametrize(("returncode", "status"), [(0, 0), (7, 7), (-9, 137), (-15, 143)])
def test_exit_status_follows_the_shell_convention(returncode: int, status: int) -> None:
    assert exit_status(returncode) == status


def test_epochs_and_workload_ids_are_fresh_each_time() -> None:
    assert new_epoch() != new_epoch()
    assert new_workload_id().startswith("run-")
    assert new_workload_id() != new_workload_id()


@pytest.mark.parametrize(
    ("value", "amount"),
    [(1.5, "1.5"), (0.1 + 0.2, "0.300000"), (2.9999999, "2.999999"), (12, "12"), (1e-7, "0")],
)
def test_readings_become_amounts_rounded_down_to_micro_units(value: float, amount: str) -> None:
    assert exact(value) == Decimal(amount)


def test_cumulative_counters_never_go_backwards() -> None:
    account = UsageAccount()
    first = account.update(Reading(at=1.0, log_bytes=100, cpu_seconds=Decimal("2.5")))
    second = account.update(Reading(at=2.0, log_bytes=100, cpu_seconds=Decimal("2.4")))
    assert first == {"log.bytes": 100, "cpu.used.seconds": Decimal("2.5")}
    assert second["cpu.used.seconds"] == Decimal("2.5")


def test_a_metric_that_stops_reporting_keeps_its_last_value() -> None:
    account = UsageAccount()
    account.update(Reading(at=1.0, log_bytes=1, cpu_seconds=Decimal(3)))
    assert account.update(Reading(at=2.0, log_bytes=2))["cpu.used.seconds"] == 3


def test_memory_is_integrated_over_time_into_byte_seconds() -> None:
    account = UsageAccount()
    account.update(Reading(at=0.0, log_bytes=0, mem_bytes=1000))
    account.update(Reading(at=2.0, log_bytes=0, mem_bytes=3000))  # 2 s averaging 2000 B
    last = account.update(Reading(at=2.5, log_bytes=0, mem_bytes=0))  # 0.5 s averaging 1500 B
    assert last["mem.used.byte_seconds"] == Decimal(4000 + 750)


def test_allocations_accrue_with_wall_time_only_when_requested() -> None:
    account = UsageAccount(Resources(cpus=Decimal("1.5"), mem_bytes=2**30, gpus=0))
    values = account.update(Reading(at=10.25, log_bytes=0))
    assert values["cpu.alloc.seconds"] == Decimal("15.375")
    assert values["mem.alloc.byte_seconds"] == Decimal(2**30) * Decimal("10.25")
    assert "gpu.alloc.seconds" not in values
    assert "cpu.alloc.seconds" not in UsageAccount().update(Reading(at=10.0, log_bytes=0))


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0, 1e6, allow_nan=False),
            st.integers(0, 2**40),
            st.floats(0, 1e6, allow_nan=False),
        ),
        max_size=20,
    )
)
def test_every_published_value_is_monotonic_and_valid_on_the_wire(
    readings: list[tuple[float, int, float]],
) -> None:
    account = UsageAccount(Resources(cpus=Decimal(2), mem_bytes=10**9, gpus=1))
    previous: dict[str, Decimal] = {}
    for seq, (at, log_bytes, cpu) in enumerate(sorted(readings), start=1):
        values = account.update(Reading(at, log_bytes, exact(cpu), mem_bytes=log_bytes))
        batch = CounterBatch(
            host="node-7", epoch="e", seq=seq, sampled_at=NOW,
            counters=[
                CounterSample(subject="alice", workload="w", metric=m, value=v)
                for m, v in values.items()
            ],
        )  # fmt: skip
        assert CounterBatch.model_validate(parse_json(batch.to_json())) == batch
        for metric, value in values.items():
            assert value >= previous.get(metric, Decimal(0))
        previous = values


def test_the_log_quota_counts_hours_from_the_start_of_the_workload() -> None:
    quota = LogQuota(limit=1000)
    assert not quota.over(10.0, 0, 600)
    assert not quota.over(3599.0, 600, 1000)  # exactly the limit is allowed
    assert quota.over(3599.5, 1000, 1001) and quota.used == 1001
    # Hour 2 starts from what had been written when it began.
    assert not quota.over(3600.0, 1001, 1900)
    assert (quota.hour, quota.used) == (1, 899)
    assert quota.over(7000.0, 1900, 2002)


def test_a_log_quota_of_zero_is_off() -> None:
    assert not LogQuota(limit=0).over(1.0, 0, 10**12)


def test_integrals_take_trapezoids_and_resume_from_their_saved_form() -> None:
    mem = Integral()
    assert mem.add(100.0, Decimal(0)) == 0
    assert mem.add(102.0, Decimal(1000)) == 1000  # (0 + 1000) / 2 * 2 s
    again = Integral.from_json(mem.to_json())
    assert again.add(112.0, Decimal(1000)) == 11000  # a 10 s gap while the agent was down
    assert again.add(111.0, Decimal(5)) == 11000  # a clock that went back adds nothing


def test_allocations_are_what_was_given_times_how_long() -> None:
    given = Resources(cpus=Decimal("1.5"), mem_bytes=2**30, gpus=0)
    assert allocations(given, Decimal("2")) == {
        "cpu.alloc.seconds": Decimal("3"),
        "mem.alloc.byte_seconds": Decimal(2**31),
    }
    assert allocations(given, Decimal("-1"))["cpu.alloc.seconds"] == 0
