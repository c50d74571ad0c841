"""A service that starts while NATS is connected but not answering waits; it does not crash."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nats
import psutil
import pytest
from nats.aio.client import Client

from contracts.samples import samples_stream
from infra.settings import Settings
from tests.conftest import wait_until
from tollgate.bootstrap import streams_in_place
from tollgate.embedded import EmbeddedNats, free_port, nats_server_binary


@dataclass
class Frozen:
    """A NATS of this test's own, connected to, then suspended: nothing answers."""

    url: str
    nc: Client
    process: psutil.Process


@pytest.fixture
async def frozen(tmp_path: Path) -> AsyncIterator[Frozen]:
    server = EmbeddedNats(tmp_path / "nats").start()
    assert server.proc is not None
    process = psutil.Process(server.proc.pid)
    nc = await nats.connect(server.url, max_reconnect_attempts=-1)
    process.suspend()
    try:
        yield Frozen(server.url, nc, process)
    finally:
        if process.status() == psutil.STATUS_STOPPED:
            process.resume()
        await nc.close()
        server.stop()


async def test_streams_are_put_in_place_once_a_frozen_nats_answers_again(
    frozen: Frozen, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(nats_url=frozen.url, prefix=prefix)
    caplog.set_level(logging.WARNING, logger="tollgate")
    task = asyncio.create_task(streams_in_place(frozen.nc.jetstream(), settings, asyncio.Event()))

    async def waiting() -> bool:
        return "waiting for NATS JetStream" in caplog.text

    await wait_until(waiting, timeout=30, what="the wait for JetStream logged")
    assert not task.done()  # it waits: a timeout is not an error that ends the service
    frozen.process.resume()
    await asyncio.wait_for(task, 30)
    info = await frozen.nc.jetstream().stream_info(samples_stream(prefix))
    assert info.config.name == samples_stream(prefix)
    assert "Traceback" not in caplog.text


async def test_a_stop_cuts_the_wait_for_a_frozen_nats_short(
    frozen: Frozen, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    stop = asyncio.Event()
    caplog.set_level(logging.WARNING, logger="tollgate")
    settings = Settings(nats_url=frozen.url, prefix=prefix)
    task = asyncio.create_task(streams_in_place(frozen.nc.jetstream(), settings, stop))
    await asyncio.sleep(0.5)  # inside its first request, which would wait 5 s for an answer
    stop.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 30)  # (a guard against a hang, not a speed goal)
    # Cut short inside that request: had the stop waited for it, its timeout would have been
    # logged as a wait and retried.
    assert "waiting for NATS JetStream" not in caplog.text
    assert frozen.process.status() == psutil.STATUS_STOPPED  # it never answered meanwhile


async def test_a_nats_without_jetstream_is_waited_for_with_what_to_do(
    tmp_path: Path, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    server = subprocess.Popen(  # no -js
        [str(nats_server_binary()), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        nc = await nats.connect(url, max_reconnect_attempts=-1, connect_timeout=10)
        stop = asyncio.Event()
        caplog.set_level(logging.WARNING, logger="tollgate")
        task = asyncio.create_task(
            streams_in_place(nc.jetstream(), Settings(nats_url=url, prefix=prefix), stop)
        )

        async def told() -> bool:
            return "start nats-server with -js" in caplog.text

        await wait_until(told, timeout=30, what="the missing JetStream explained")
        assert not task.done()
        stop.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
        await nc.close()
    finally:
        server.terminate()
        server.wait(10)
