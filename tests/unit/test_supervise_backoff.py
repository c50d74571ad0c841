"""The restart schedule of `tollgate up`'s supervisor, and how it names an exit."""

from __future__ import annotations

import signal

from tollgate.supervise import Backoff, describe_exit


def test_backoff_restarts_at_once_then_doubles_up_to_its_cap() -> None:
    delays = [Backoff(first=0.5, cap=10).delay(n) for n in range(8)]
    assert delays == [0, 0.5, 1, 2, 4, 8, 10, 10]


def test_an_exit_is_named_by_its_signal_or_its_status() -> None:
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"
    assert describe_exit(3) == "exited with status 3"
