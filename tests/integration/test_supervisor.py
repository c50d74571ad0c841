"""The supervisor of `tollgate up` against real child processes and real embedded servers."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.conftest import wait_until
from tollgate.embedded import CannotRestart, EmbeddedNats, EmbeddedPostgres, EmbeddedServerError
from tollgate.serverprocs import Abort, never
from tollgate.supervise import Backoff, ServerLost, Supervisor, stop_servers

FAST = Backoff(first=0.01, cap=0.05, attempts=4, stable_after=60)


@dataclass
class SleepServer:
    """A hand-written fake server: a real child process, with failures on demand."""

    data_dir: Path
    name: str = "sleeper"
    stop_signal: signal.Signals = signal.SIGTERM
    port: int = 1
    proc: subprocess.Popen[bytes] | None = None
    fail_next: list[EmbeddedServerError] = field(default_factory=list)
    starts: int = 0

    def start(self, *, restart: bool = False, abort: Abort = never) -> SleepServer:
        self.starts += 1
        if self.fail_next:
            raise self.fail_next.pop(0)
        self.proc = subprocess.Popen(["sleep", "600"])
        return self


async def started_again(server: SleepServer, starts: int) -> bool:
    return server.starts >= starts and server.proc is not None and server.proc.poll() is None


async def test_a_killed_server_is_reaped_and_started_again(tmp_path: Path) -> None:
    server = SleepServer(tmp_path).start()
    assert server.proc is not None
    first = server.proc.pid
    stop = asyncio.Event()
    supervisor = Supervisor([server], FAST)
    running = asyncio.create_task(supervisor.run(stop))
    try:
        os.kill(first, signal.SIGKILL)
        await wait_until(lambda: started_again(server, 2), timeout=30, what="a restart")
        assert not psutil.pid_exists(first)  # reaped: not even a zombie left
        assert server.proc.pid != first and supervisor.restarts == 1
    finally:
        stop.set()
        await running
        await stop_servers([server], grace=5)
    assert server.proc.poll() is not None


async def test_transient_start_failures_are_retried_with_backoff(tmp_path: Path) -> None:
    server = SleepServer(tmp_path).start()
    assert server.proc is not None
    server.fail_next = [EmbeddedServerError("port not open yet")] * 2
    stop = asyncio.Event()
    running = asyncio.create_task(Supervisor([server], FAST).run(stop))
    try:
        server.proc.kill()
        await wait_until(lambda: started_again(server, 4), timeout=30, what="the third attempt")
    finally:
        stop.set()
        await running
        await stop_servers([server], grace=5)


async def test_a_server_that_cannot_come_back_ends_supervision_with_the_reason(
    tmp_path: Path,
) -> None:
    server = SleepServer(tmp_path).start()
    assert server.proc is not None
    server.fail_next = [CannotRestart("its data directory is gone; restore it")]
    server.proc.kill()
    with pytest.raises(ServerLost, match="sleeper died and cannot be restarted: its data"):
        await asyncio.wait_for(Supervisor([server], FAST).run(asyncio.Event()), 30)


async def test_a_server_that_keeps_failing_to_start_is_given_up_after_its_attempts(
    tmp_path: Path,
) -> None:
    server = SleepServer(tmp_path).start()
    assert server.proc is not None
    server.fail_next = [EmbeddedServerError("exited with status 1")] * 10
    server.proc.kill()
    with pytest.raises(ServerLost, match="could not be restarted 4 times in a row"):
        await asyncio.wait_for(Supervisor([server], FAST).run(asyncio.Event()), 30)
    assert server.starts == 1 + FAST.attempts


async def test_nats_restarted_on_a_port_now_taken_says_by_whom_and_what_to_do(
    tmp_path: Path,
) -> None:
    nats = EmbeddedNats(tmp_path / "nats").start()
    nats.stop()
    squatter = socket.create_server(("127.0.0.1", nats.port))
    try:
        with pytest.raises(CannotRestart) as caught:
            nats.start(restart=True)
    finally:
        squatter.close()
    message = str(caught.value)
    assert f"port {nats.port}" in message and f"pid {os.getpid()}" in message
    assert "Stop that process, or stop `tollgate up` and start it again" in message
    nats.start(restart=True)  # the port is free again: the same server, same data
    try:
        assert nats.proc is not None and nats.proc.poll() is None
    finally:
        nats.stop()


async def test_postgres_restarted_without_its_data_directory_is_not_initialised_anew(
    tmp_path: Path,
) -> None:
    postgres = EmbeddedPostgres(tmp_path / "pg").start()
    postgres.stop()
    shutil.rmtree(postgres.pgdata)
    with pytest.raises(CannotRestart, match="a new empty database would lose the ledger"):
        postgres.start(restart=True)
    assert not postgres.pgdata.exists()
