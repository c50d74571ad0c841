"""A malformed TOLLGATE_* variable is named in one clear line, not a traceback."""

from __future__ import annotations

import sys

import pytest

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
