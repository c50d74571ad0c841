"""Long stretches of work on the policy's event loop, cut into slices so spawn checks get in.

A spawn check is answered on the same event loop that folds usage, evaluates subjects and
writes the journal. Whatever runs without awaiting delays every check that arrives
meanwhile, so the long loops hand the loop back once a slice's time is used up: a check
then waits for at most one slice of each, not for a whole batch.
"""

from __future__ import annotations

import asyncio
import time

SLICE = 0.0005  # seconds of work between two turns of the event loop


class Turns:
    """`await turns.take()` inside a loop: yields once `budget` seconds passed since the last
    yield (a clock read otherwise, so it may be called for every item)."""

    __slots__ = ("budget", "deadline")

    def __init__(self, budget: float = SLICE) -> None:
        self.budget = budget
        self.deadline = time.perf_counter() + budget

    def due(self) -> bool:
        return time.perf_counter() >= self.deadline

    async def take(self) -> bool:
        """Yield if the slice is used up; True when it did (others ran meanwhile)."""
        if time.perf_counter() < self.deadline:
            return False
        await asyncio.sleep(0)
        self.deadline = time.perf_counter() + self.budget
        return True
