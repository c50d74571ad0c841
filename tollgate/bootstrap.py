"""Composition root: builds each service from Settings and runs it until told to stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

from infra.broker import TollgateBroker, broker_for, running
from infra.bus import close_quietly, connect, ensure_streams
from infra.db import close_pool, connect_and_migrate, create_pool, migrate
from infra.settings import Settings
from infra.tasks import cancel_and_wait, unless_stopped
from services.ledger.app import LedgerService
from services.ledger.feed import Connections, UsageFeed, run_in_thread
from services.policy.app import PolicyChannels
from services.policy.partitions import Ownership
from services.policy.service import PolicyService
from services.policy.source import ConfigSource

log = logging.getLogger("tollgate")
# After a stop, how long services may take to finish their batch before they are cut short
# (what they held is redelivered): Ctrl-C is answered in seconds whatever the servers do.
STOP_GRACE = 3.0


class JetStreamSilent(ConnectionError):
    """Connected to NATS, and nothing answers its JetStream requests (an OSError: retried)."""


async def _retry(
    what: str, attempt: Callable[[], Awaitable[object]], stop: asyncio.Event
) -> object:
    """Keep trying to reach a server that is not up yet: services may start in any order."""
    delay = 0.2
    while True:
        try:
            return await attempt()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            log.warning("waiting for %s (%s); retrying in %.1fs", what, exc, delay)
        if stop.is_set():
            raise asyncio.CancelledError
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        delay = min(delay * 2, 5.0)


async def open_pool(settings: Settings, stop: asyncio.Event, max_size: int = 10) -> asyncpg.Pool:
    """A pool on an up-to-date schema (whoever starts first applies the migrations)."""
    assert settings.database_url
    url = settings.database_url
    pool = await _retry("Postgres", lambda: connect_and_migrate(url, max_size=max_size), stop)
    assert isinstance(pool, asyncpg.Pool)
    return pool


async def streams_in_place(js: JetStreamContext, settings: Settings, stop: asyncio.Event) -> None:
    """The contract's streams created or updated, waiting (until `stop`) for a JetStream that
    is connected but not answering yet: a server still starting, or one frozen meanwhile."""

    async def ensure() -> None:
        try:
            await ensure_streams(
                js, settings.prefix, settings.duplicate_window_seconds,
                replicas=settings.stream_replicas, partitions=settings.partitions,
            )  # fmt: skip
        except (nats.errors.NoRespondersError, nats.js.errors.ServiceUnavailableError):
            raise JetStreamSilent(
                "connected, but nothing answers JetStream requests: the server is still "
                "starting, or it runs without JetStream (start nats-server with -js, or set "
                "TOLLGATE_NATS_URL to a server that has it)"
            ) from None

    # Each attempt waits out its request timeout: Ctrl-C need not wait for it.
    await unless_stopped(_retry("NATS JetStream", ensure, stop), stop)


async def open_nats(settings: Settings, name: str, stop: asyncio.Event) -> Client:
    """A NATS connection, with the contract's streams in place."""
    assert settings.nats_url
    url = settings.nats_url
    seed = settings.nats_nkey_seed_file
    # nats-py retries inside connect while the server is away: only `stop` ends the wait.
    nc = await unless_stopped(_retry("NATS", lambda: connect(url, name, seed), stop), stop)
    assert isinstance(nc, Client)
    await streams_in_place(nc.jetstream(), settings, stop)
    return nc


@contextlib.asynccontextmanager
async def serving(
    broker: TollgateBroker, settings: Settings, stop: asyncio.Event
) -> AsyncIterator[TollgateBroker]:
    """A service's FastStream broker for the life of the block: connected (waiting for NATS
    until `stop`), the contract's streams in place, its subscribers started; stopped after
    (subscribers get 2 s, then the connection is closed, not drained)."""

    async def streams(b: TollgateBroker) -> None:
        await streams_in_place(b.js, settings, stop)

    async with running(broker, stop, before_start=streams):
        yield broker


async def run_ledger(settings: Settings, stop: asyncio.Event) -> None:
    """The ledger: samples in, exact usage events out.

    Its samples consumer is a FastStream batch pull subscriber (`LedgerService.declare`)
    whose fetch loop is `fetch_ready`: FastStream's own loop held a lone sample for the
    whole fetch timeout (measured: 451 ms against 15 ms at batch 100; at batch 1000 it
    was not handed over within 30 s), which would cost P4. The usage feed publishes each
    committed batch from memory, on an event loop of its own (`run_in_thread`).
    """
    pool = await open_pool(settings, stop)
    try:
        broker = broker_for(settings, "tollgate-ledger")
        feed = UsageFeed(None, None, settings.prefix)
        service: LedgerService | None = None

        async def declared(b: TollgateBroker) -> None:
            nonlocal service
            await streams_in_place(b.js, settings, stop)
            service = LedgerService(
                b.nc, pool, prefix=settings.prefix, batch=settings.ledger_batch,
                fetch_timeout=settings.ledger_fetch_timeout,
                max_payload=settings.max_payload_bytes, ack_wait=settings.ledger_ack_wait,
                partition=settings.partition if settings.partitions > 1 else None,
                max_clock_skew=settings.max_clock_skew, on_commit=feed.on_commit,
            )  # fmt: skip
            service.declare(b, stop)

        # Stopped after (subscribers first, then the connection closed, not drained):
        # anything fetched but not committed is simply redelivered.
        async with running(broker, stop, before_start=declared):
            assert service is not None
            log.info("ledger consuming %s samples as consumer %s", settings.prefix,
                     service.consumer)  # fmt: skip
            await asyncio.gather(
                service.serve(stop), run_in_thread(feed, _feed_connections(settings), stop)
            )
    finally:
        await close_pool(pool)


def _feed_connections(settings: Settings) -> Connections:
    """The usage feed publisher's own NATS connection and pool (on its own event loop)."""

    @contextlib.asynccontextmanager
    async def connect(stop: asyncio.Event) -> AsyncIterator[tuple[JetStreamContext, asyncpg.Pool]]:
        nc = await open_nats(settings, "tollgate-ledger-feed", stop)
        try:
            pool = await open_pool(settings, stop, max_size=2)
            try:
                yield nc.jetstream(), pool
            finally:
                await close_pool(pool)
        finally:
            await close_quietly(nc)

    return connect


async def run_policy(settings: Settings, stop: asyncio.Event) -> None:
    """The policy: spawn checks, terminations, blocks and warnings from live usage."""
    assert settings.nats_url and settings.database_url
    config = ConfigSource.load(settings.config)
    broker = broker_for(settings, "tollgate-policy")
    owns = Ownership(settings.partition, settings.partitions)
    channels = PolicyChannels(broker, settings.prefix, owns)
    # Connects lazily: spawn checks are answered (by failure_mode) even while Postgres is away.
    pool = await create_pool(settings.database_url, min_size=0)
    services: list[PolicyService] = []

    async def wired(connected: TollgateBroker) -> None:
        # Connected, subscriptions not started yet: the checker is there before any check.
        await streams_in_place(connected.js, settings, stop)
        service = PolicyService(
            connected.nc, pool, config, settings.prefix,
            partition=settings.partition, partitions=settings.partitions,
            max_clock_skew=settings.max_clock_skew, grant_cues=False,
        )  # fmt: skip
        channels.serve(service.checker, service.grants.cue)
        services.append(service)

    async def migrated() -> None:
        async with pool.acquire() as conn:
            await migrate(conn)

    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, config.reload)
    try:
        async with running(broker, stop, before_start=wired):
            await _retry("Postgres", migrated, stop)
            log.info(
                "policy enforcing %d quotas (version %s%s)",
                len(config.current().quotas), config.version,
                f", from {settings.config}" if settings.config else ", no quota file configured",
            )  # fmt: skip
            await services[0].run(stop)
    finally:
        await close_pool(pool)


async def run_api(settings: Settings, stop: asyncio.Event) -> None:
    """The HTTP API."""
    from services.api.bootstrap import serve

    await serve(settings, stop)


SERVICES: dict[str, Callable[[Settings, asyncio.Event], Awaitable[None]]] = {
    "ledger": run_ledger,
    "policy": run_policy,
    "api": run_api,
}


def install_stop_signals(stop: asyncio.Event) -> None:
    """Ctrl-C and SIGTERM set `stop`; services finish their batch and close cleanly."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)


async def run_together(
    settings: Settings, names: list[str], stop: asyncio.Event,
    extra: list[Callable[[asyncio.Event], Awaitable[None]]] | None = None,
) -> None:  # fmt: skip
    """Run several services in one process; if one fails, stop the others and re-raise.

    Once stopped, a service gets STOP_GRACE seconds to finish, then it is cancelled: a
    request or publish waiting on a server that is gone must not hold up Ctrl-C.
    """
    tasks = [asyncio.create_task(SERVICES[n](settings, stop), name=n) for n in names]
    tasks += [asyncio.create_task(fn(stop), name="extra") for fn in extra or []]
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.set()
        stopper.cancel()
        _, late = await asyncio.wait(tasks, timeout=STOP_GRACE)
        for task in late:
            log.info("%s is still stopping after %.0f s; cutting it short", task.get_name(),
                     STOP_GRACE)  # fmt: skip
        await cancel_and_wait(late)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for task, result in zip(tasks, results, strict=True):
        if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
            log.error("%s stopped with an error: %s", task.get_name(), result)
            raise result
