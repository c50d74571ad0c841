"""`tollgate up` as a supervisor: an embedded server that dies is reaped, logged, restarted.

The services never learn of it beyond an outage: the server comes back on the same port with
the same data directory, NATS clients reconnect by themselves (endless reconnects), and
asyncpg pools replace the connections they lost on the next acquire. What cannot come back
(its data gone, its port taken, or it keeps dying) ends `tollgate up` with a message saying
what to do, rather than a stack that half works.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tollgate.serverprocs import Abort, CannotRestart, EmbeddedServerError, StartAborted

log = logging.getLogger("tollgate.up")


class Server(Protocol):
    """What the supervisor needs of an embedded server (EmbeddedNats, EmbeddedPostgres)."""

    name: str
    stop_signal: signal.Signals
    port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None

    def start(self, *, restart: bool = ..., abort: Abort = ...) -> object: ...


class ServerLost(Exception):
    """An embedded server died and could not be brought back; the message says what to do."""


@dataclass(frozen=True)
class Backoff:
    """Restart at once, then wait first, 2*first, 4*first... up to cap between attempts.

    `attempts` restarts in a row without the server staying up for `stable_after` seconds
    and the supervisor gives up: a server that cannot stay up needs a person.
    """

    first: float = 0.5
    cap: float = 10.0
    attempts: int = 8
    stable_after: float = 30.0

    def delay(self, streak: int) -> float:
        """The wait before restart number `streak` (0: the first since a stable run)."""
        return 0.0 if streak == 0 else min(self.first * 2 ** (streak - 1), self.cap)


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return f"exited with status {code}"


async def wait_exit(proc: subprocess.Popen[bytes]) -> int:
    """Wait for a child to end without blocking the loop, and reap it (no zombie)."""
    if proc.poll() is not None:
        return proc.returncode
    try:
        # Not reaped yet, so the pid cannot have been reused: the pidfd is this child's.
        fd = os.pidfd_open(proc.pid)
    except OSError:  # no pidfd (old kernel, seccomp): nothing to wait on but the clock
        while proc.poll() is None:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        return proc.returncode
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not ended.done():
            ended.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await ended
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return proc.wait()  # readable pidfd: the child has exited, this returns at once


class Supervisor:
    """Watches embedded servers until `stop`; restarts the ones that die."""

    def __init__(self, servers: Sequence[Server], backoff: Backoff | None = None) -> None:
        self.servers = list(servers)
        self.backoff = backoff or Backoff()
        self.restarts = 0
        # Read by start() in its thread: a restart in progress gives up when we stop.
        self._aborting = threading.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Supervise until `stop` is set; raise ServerLost if a server cannot come back."""
        watchers = [asyncio.create_task(self._watch(s, stop), name=s.name) for s in self.servers]
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait([*watchers, stopping], return_when=asyncio.FIRST_COMPLETED)
            for task in watchers:
                if task.done():
                    task.result()  # raises ServerLost
        finally:
            self._aborting.set()
            stopping.cancel()
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, stopping, return_exceptions=True)

    async def _watch(self, server: Server, stop: asyncio.Event) -> None:
        streak = 0
        up_since = time.monotonic()
        while True:
            assert server.proc is not None
            pid = server.proc.pid
            code = await wait_exit(server.proc)
            if stop.is_set():
                return
            died = time.monotonic()
            if died - up_since >= self.backoff.stable_after:
                streak = 0
            log.warning(
                "%s (pid %d) %s; restarting it on port %d with its data in %s",
                server.name, pid, describe_exit(code), server.port, server.data_dir,
            )  # fmt: skip
            streak = await self._restart(server, stop, streak)
            if stop.is_set():
                return
            up_since = time.monotonic()
            self.restarts += 1
            assert server.proc is not None
            log.info(
                "%s is back on port %d (pid %d), %.1f s after it went down",
                server.name, server.port, server.proc.pid, up_since - died,
            )  # fmt: skip

    async def _restart(self, server: Server, stop: asyncio.Event, streak: int) -> int:
        """Start the server again with backoff; the new streak, or ServerLost."""
        last: EmbeddedServerError | None = None
        while True:
            if streak >= self.backoff.attempts:
                raise ServerLost(
                    f"{server.name} died and could not be restarted {streak} times in a row "
                    f"(last: {last or 'it kept dying right after starting'}). Fix the cause, "
                    "then run `tollgate up` again; the data is kept."
                )
            delay = self.backoff.delay(streak)
            streak += 1
            if delay:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    return streak
            try:
                await self._start_in_thread(server)
                return streak
            except StartAborted:
                return streak
            except CannotRestart as exc:
                raise ServerLost(f"{server.name} died and cannot be restarted: {exc}") from None
            except EmbeddedServerError as exc:
                last = exc
                log.warning(
                    "%s did not come back (%s); trying again in %.1f s",
                    server.name, exc, self.backoff.delay(streak),
                )  # fmt: skip

    async def _start_in_thread(self, server: Server) -> None:
        # start() blocks (it waits for the port); a thread keeps Ctrl-C and the services going.
        call = functools.partial(server.start, restart=True, abort=self._aborting.is_set)
        started = asyncio.get_running_loop().run_in_executor(None, call)
        try:
            await asyncio.shield(started)
        except asyncio.CancelledError:
            self._aborting.set()  # start() kills what it began and returns within ~0.1 s
            with contextlib.suppress(EmbeddedServerError):
                await started
            raise


async def stop_servers(servers: Sequence[Server], grace: float = 10.0) -> None:
    """Stop servers together: their own clean shutdown signal, SIGKILL after `grace`."""
    await asyncio.gather(*(_stop_one(s, grace) for s in servers))


async def _stop_one(server: Server, grace: float) -> None:
    proc = server.proc
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(server.stop_signal)
        os.kill(proc.pid, signal.SIGCONT)  # a frozen (SIGSTOPped) server can act on it too
    try:
        await asyncio.wait_for(wait_exit(proc), grace)
    except TimeoutError:
        log.warning("%s did not stop within %.0f s; killing it", server.name, grace)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await wait_exit(proc)


def force_stop(servers: Sequence[Server]) -> None:
    """Second Ctrl-C: tell the servers to go now and do not wait for them.

    Nothing acked is lost: NATS fsyncs every write, and Postgres's immediate shutdown
    (SIGQUIT) is recovered from its WAL at the next start.
    """
    for server in servers:
        proc = server.proc
        if proc is None or proc.poll() is not None:
            continue
        now = signal.SIGQUIT if server.name == "postgres" else signal.SIGKILL
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(now)
            os.kill(proc.pid, signal.SIGCONT)
