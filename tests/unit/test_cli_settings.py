"""A malformed TOLLGATE_* variable is named in one clear line, not a traceback."""

from __future__ import annotations

import sys
from datetime import timedelta

import pytest

from infra.settings import Settings
from tollgate.cli import main


def test_a_malformed_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOLLGATE_API_PORT", "eighty")
    monkeypatch.setattr(sys, "argv", ["tollgate", "token", "issue", "--subject", "alice"])
    with pytest.raises(SystemExit) as exited:
        main()
    message = str(exited.value.code)
    assert "TOLLGATE_API_PORT: Input should be a valid integer" in message
    assert "Fix the variable or unset it" in message


def test_a_partition_outside_the_partitions_says_what_to_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TOLLGATE_PARTITIONS", "2")
    monkeypatch.setenv("TOLLGATE_PARTITION", "5")
    monkeypatch.setattr(sys, "argv", ["tollgate", "ledger"])
    with pytest.raises(SystemExit) as exited:
        main()
    assert "set TOLLGATE_PARTITION to a number from 0 to 1" in str(exited.value.code)


@pytest.mark.parametrize(
    ("text", "seconds"), [("5min", 300), ("90s", 90), ("2h", 7200), ("300", 300), ("1d", 86400)]
)
def test_the_clock_skew_tolerance_is_written_like_the_other_durations(
    monkeypatch: pytest.MonkeyPatch, text: str, seconds: int
) -> None:
    monkeypatch.setenv("TOLLGATE_MAX_CLOCK_SKEW", text)
    assert Settings().max_clock_skew == timedelta(seconds=seconds)


def test_the_clock_skew_tolerance_defaults_to_five_minutes() -> None:
    assert Settings().max_clock_skew == timedelta(minutes=5)


@pytest.mark.parametrize("text", ["soon", "0", "-5min", "20000d"])
def test_a_clock_skew_tolerance_that_means_nothing_is_refused_with_an_example(
    monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    monkeypatch.setenv("TOLLGATE_MAX_CLOCK_SKEW", text)
    monkeypatch.setattr(sys, "argv", ["tollgate", "ledger"])
    with pytest.raises(SystemExit) as exited:
        main()
    message = str(exited.value.code)
    assert "TOLLGATE_MAX_CLOCK_SKEW" in message and "e.g." in message, message
