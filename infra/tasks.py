"""Stopping asyncio work for sure: what `tollgate up` needs to answer Ctrl-C in seconds."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection, Coroutine
from typing import Any, TypeVar

log = logging.getLogger("tollgate")
T = TypeVar("T")


async def cancel_and_wait(tasks: Collection[asyncio.Future[Any]], rounds: int = 25) -> None:
    """Cancel tasks and wait for them, cancelling again while they are not done.

    Once is not always enough on Python 3.11: `asyncio.wait_for` swallows a cancel that
    lands just as its inner future completes (CPython gh-86296, fixed in 3.12), and the
    task then goes on, e.g. into a publish that waits out its timeout.
    """
    pending = {t for t in tasks if not t.done()}
    for _ in range(rounds):
        if not pending:
            return
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.2)
    for task in pending:
        name = task.get_name() if isinstance(task, asyncio.Task) else repr(task)
        log.warning("%s does not stop when cancelled; leaving it", name)


async def unless_stopped(work: Coroutine[Any, Any, T], stop: asyncio.Event) -> T:
    """The result of `work`, or CancelledError as soon as `stop` is set (work is cancelled).

    For waits that do not look at `stop` themselves, e.g. nats-py's connect, which retries
    inside the call for as long as the server is away.
    """
    task = asyncio.ensure_future(work)
    stopping = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([task, stopping], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not task.done():
            await cancel_and_wait([task])
    if task.cancelled():
        raise asyncio.CancelledError
    return task.result()
