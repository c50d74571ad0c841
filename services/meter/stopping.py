"""Stopping a workload as SPEC 2.5 orders: SIGTERM, `grace_seconds` to finish, then SIGKILL."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("tollgate.meter")
POLL = 0.05
KILL_WAIT = 10.0


@dataclass(frozen=True)
class Stopped:
    """How a workload was made to stop: the last signal it needed, and why it was stopped."""

    signal: int
    reason: str
    detail: str

    @property
    def status(self) -> int:
        """What the shell reports for a command ended by this signal."""
        return 128 + self.signal

    def sentence(self) -> str:
        name = signal.Signals(self.signal).name
        return f"terminated ({self.reason}) with {name}: {self.detail}"


async def terminate(send: Callable[[int], object], alive: Callable[[], bool], grace: float) -> int:
    """SIGTERM, wait up to `grace` seconds, SIGKILL what is left; the last signal sent."""
    send(signal.SIGTERM)
    deadline = time.monotonic() + grace
    # Polled: processes that are not our children (and cgroups) give no event to wait on.
    while alive() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(POLL)
    if not alive():
        return signal.SIGTERM
    log.info("the workload outlived its %g s of grace; sending SIGKILL", grace)
    return await kill(send, alive)


async def kill(send: Callable[[int], object], alive: Callable[[], bool]) -> int:
    """SIGKILL now, and wait (a little) until nothing is left."""
    send(signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT
    while alive() and time.monotonic() < deadline:
        await asyncio.sleep(POLL)
        send(signal.SIGKILL)  # anything forked meanwhile
    return signal.SIGKILL
