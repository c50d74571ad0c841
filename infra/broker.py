"""FastStream wiring shared by the services: a NatsBroker that connects the way `infra.bus` does.

`TollgateBroker` is FastStream's `NatsBroker` with three things changed, so nothing the
services relied on is lost by declaring their subscribers and publishers on it:

- it connects with `infra.bus.connect`: endless reconnects every 0.5 s, the nkey seed file
  with the identity's own reply-inbox prefix, an outage logged once when it starts and once
  when it ends, and the same clear credential and permission messages;
- pull subscribers get the identity's inbox prefix (FastStream passes nats-py `_INBOX.`
  explicitly, which `tollgate nats-config` permissions refuse), and durable pull consumers
  are created or updated at start (a changed `ack_wait` takes effect, like `durable_pull`);
- `stop` closes the connection with a timeout instead of draining it (draining a pull
  subscription waits out nats-py's 30 s; what was fetched but not acked is redelivered).

Streams stay with `infra.bus.ensure_streams` (its update and repartition rules); subscribers
name them with `jstream()`, which never declares. Payloads are decoded with
`contracts._base.parse_json`, so numbers stay exact decimals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from types import MethodType
from typing import TYPE_CHECKING, Any

import nats.errors
from faststream._internal.broker import BrokerUsecase
from faststream.message import StreamMessage
from faststream.middlewares import ExceptionMiddleware
from faststream.nats import JStream, NatsBroker
from faststream.nats.prometheus.provider import (
    BatchNatsMetricsSettingsProvider,
    NatsMetricsSettingsProvider,
)
from faststream.nats.subscriber.usecases.stream_pull_subscriber import (
    BatchPullStreamSubscriber,
    PullStreamSubscriber,
)
from faststream.prometheus import PrometheusMiddleware
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import INBOX_PREFIX
from nats.js.errors import ServiceUnavailableError
from prometheus_client import REGISTRY, CollectorRegistry
from pydantic import ValidationError

from contracts._base import PayloadError, parse_json
from contracts.errors import INTERNAL_ERROR, INVALID_REQUEST, ErrorReply, FieldError, describe

from .bus import close_quietly, connect, fetch_ready, inbox_prefix_for, seed_public_key
from .settings import Settings
from .tasks import unless_stopped

if TYPE_CHECKING:
    from types import TracebackType

log = logging.getLogger("infra.broker")
# A subscriber still handling a message at stop gets this long (then it is cut; the
# message is redelivered). Below bootstrap's STOP_GRACE, so Ctrl-C stays within seconds.
GRACEFUL_TIMEOUT = 2.0
# FastStream's own lines (subscriber started, task callbacks) are debug news for us; its
# errors (a handler that raised, a subscriber task that failed) still show.
FASTSTREAM_LOG = logging.getLogger("tollgate.faststream")
if FASTSTREAM_LOG.level == logging.NOTSET:
    FASTSTREAM_LOG.setLevel(logging.WARNING)


def jstream(name: str) -> JStream:
    """A stream a subscriber reads from; created and updated by `ensure_streams`, never here."""
    return JStream(name, declare=False)


async def exact_json(msg: StreamMessage[Any], original: Callable[..., Awaitable[Any]]) -> Any:
    """The broker's decoder: JSON bodies with exact decimals (never binary floats).

    A body that is not a JSON object is handed over as its bytes, so a typed handler
    refuses it with a pydantic error and a raw handler can still file it as a dead letter.
    """
    body = msg.body
    if isinstance(body, list):  # a batch: each body decoded by itself
        return [_decoded(b) for b in body]
    return _decoded(body)


def _decoded(body: bytes) -> Any:
    try:
        return parse_json(body)
    except PayloadError:
        return body


class TollgateBroker(NatsBroker):
    """FastStream's NatsBroker, connected by `infra.bus.connect` (see the module docstring)."""

    def __init__(
        self,
        url: str = "nats://127.0.0.1:4222",
        *,
        name: str,
        seed_file: Path | None = None,
        description: str | None = None,
        middlewares: Sequence[Any] = (),
        **kwargs: Any,
    ) -> None:
        servers = [u.strip() for u in url.split(",") if u.strip()]
        kwargs.setdefault("logger", FASTSTREAM_LOG)
        kwargs.setdefault("log_level", logging.DEBUG)  # "Received", "Processed": per message
        kwargs.setdefault("graceful_timeout", GRACEFUL_TIMEOUT)
        kwargs.setdefault("decoder", exact_json)
        super().__init__(
            servers,
            name=name,
            description=description,
            middlewares=middlewares,
            **kwargs,
        )
        self.url_text = url
        self.client_name = name
        self.seed_file = seed_file

    @property
    def nc(self) -> Client:
        """The raw nats-py client (after `connect`): for a hand path that must be faster."""
        return self.connection

    @property
    def js(self) -> JetStreamContext:
        """The JetStream context of the raw client (after `connect`)."""
        return self.config.broker_config.connection_state.stream

    @property
    def inbox(self) -> bytes:
        """The prefix of this identity's reply inboxes, with the trailing dot nats-py wants."""
        if self.seed_file is None:
            return INBOX_PREFIX
        return inbox_prefix_for(seed_public_key(self.seed_file)).encode() + b"."

    def adopt(self, nc: Client) -> TollgateBroker:
        """Publish and request over a connection someone else owns (and closes), e.g. a
        test's. Subscribers are not started; `stop` leaves the connection open."""
        self._connection = nc
        self._adopted = True
        self.config.connect(nc)
        return self

    async def _connect(self) -> Client:
        nc = await connect(self.url_text, self.client_name, self.seed_file)
        self.config.connect(nc)
        return nc

    async def start(self) -> None:
        await self.connect()
        for sub in self.subscribers:
            await self.prepare(sub)
        await super().start()

    async def prepare(self, sub: Any) -> None:
        """Fit a pull subscriber for us before it starts: our inbox, its durable up to date.

        `start` does it for every subscriber; a service that starts a subscriber of its own
        later (`await sub.start()`, e.g. the meter's command consumers) calls it first.
        """
        if not isinstance(sub, PullStreamSubscriber | BatchPullStreamSubscriber):
            return
        options = sub.extra_options
        if options.get("inbox_prefix") in (None, INBOX_PREFIX):
            options["inbox_prefix"] = self.inbox
        durable = options.get("durable")
        if durable:
            # Create or update: FastStream only binds to a durable that exists.
            config = sub.config
            config.durable_name = durable
            if not config.filter_subjects:
                config.filter_subject = sub.subject.broker_address
            await self.js.add_consumer(sub.stream.name, config)

    async def stop(
        self,
        exc_type: type[BaseException] | None = None,
        exc_val: BaseException | None = None,
        exc_tb: TracebackType | None = None,
    ) -> None:
        """Stop the subscribers, then close (not drain) the connection, in a few seconds."""
        if getattr(self, "_adopted", False):
            return
        try:
            await asyncio.wait_for(
                BrokerUsecase.stop(self, exc_type, exc_val, exc_tb), GRACEFUL_TIMEOUT + 1
            )
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            log.debug("%s: stopping subscribers: %s", self.client_name, exc)
        finally:
            nc, self._connection = self._connection, None
            await close_quietly(nc)
            if nc is not None:
                self.config.disconnect()


Consume = Callable[[Any], Awaitable[Any]]
Fetch = Callable[[JetStreamContext.PullSubscription, Consume], Awaitable[None]]


def consume_with(subscriber: Any, loop: Fetch) -> Any:
    """Replace a pull subscriber's fetch loop with `loop(subscription, consume)`.

    `consume(msg_or_list)` is FastStream's: parser, decoder, middlewares, the typed handler,
    acks by the subscriber's AckPolicy. `loop` runs while the subscriber runs; when it
    returns, consuming ends until the subscriber is started again (FastStream restarts it
    only if it raises). `fetch_when_ready` is one such loop.
    """

    async def _consume(self: Any, cb: Consume | None = None) -> None:
        assert self.subscription is not None
        await loop(self.subscription, cb or self.consume)

    subscriber._consume_pull = MethodType(_consume, subscriber)
    return subscriber


def serve_by_hand(
    broker: TollgateBroker,
    subscriber: Any,
    callback: Callable[[Msg], Awaitable[None]],
    queue: str = "",
) -> Any:
    """Serve a declared core subscriber with a plain nats-py callback instead of FastStream.

    For a hot request/reply path where FastStream's per-message work (~0.2 ms here) costs a
    goal: the declaration stays (AsyncAPI documents the channel; TestNatsBroker still runs
    its typed handler in unit tests), but `broker.start()` subscribes `callback` on the raw
    connection, in `queue`, and `stop` unsubscribes it. Keep the callback and the typed
    handler one decision function apart, so they cannot drift.
    """
    held: list[Any] = []

    async def start(self: Any) -> None:
        held.append(await broker.nc.subscribe(self.subject.broker_address, queue=queue,
                                              cb=callback))  # fmt: skip
        await broker.nc.flush()  # registered on the server before start returns

    async def stop(self: Any) -> None:
        while held:
            with contextlib.suppress(nats.errors.Error, OSError):
                await held.pop().unsubscribe()

    subscriber.start = MethodType(start, subscriber)
    subscriber.stop = MethodType(stop, subscriber)
    return subscriber


def fetch_when_ready(subscriber: BatchPullStreamSubscriber) -> BatchPullStreamSubscriber:
    """Make a batch pull subscriber hand over what is there as soon as one message is.

    FastStream's batch loop waits until `batch_size` messages or `PullSub.timeout`, so one
    sample at an idle consumer waits the whole timeout (the ledger's P4 went 253 ms -> 16 ms
    with `infra.bus.fetch_ready`). This replaces the subscriber's fetch loop with one built
    on `fetch_ready`; handlers, acks, middlewares and the AsyncAPI entry are FastStream's.
    """
    size, timeout = subscriber.pull_sub.batch_size, subscriber.pull_sub.timeout or 5.0

    async def ready(sub: JetStreamContext.PullSubscription, consume: Consume) -> None:
        while subscriber.running:
            try:
                messages = await fetch_ready(sub, size, timeout)
            except TimeoutError:
                continue
            except (nats.errors.ConnectionClosedError, ServiceUnavailableError):
                await asyncio.sleep(0.1)  # reconnecting: unacked messages are redelivered
                continue
            if messages and subscriber.running:
                await consume(messages)

    consume_with(subscriber, ready)
    return subscriber


def broker_for(
    settings: Settings, name: str, middlewares: Sequence[Any] = (), **kwargs: Any
) -> TollgateBroker:
    """The broker of service `name`, on the settings' NATS URL and nkey seed file, with
    its `tollgate_bus_*` metrics (`bus_metrics`) in the process's Prometheus registry."""
    assert settings.nats_url, "no NATS URL: start with `tollgate up` or set TOLLGATE_NATS_URL"
    return TollgateBroker(
        settings.nats_url,
        name=name,
        seed_file=settings.nats_nkey_seed_file,
        middlewares=[bus_metrics(name), *middlewares],
        **kwargs,
    )


async def _connect_retrying(broker: TollgateBroker, stop: asyncio.Event) -> None:
    delay = 0.2
    while True:
        try:
            # nats-py retries inside connect while the server is away; this catches the rest.
            await unless_stopped(broker.connect(), stop)
            return
        except (OSError, TimeoutError, nats.errors.NoServersError) as exc:
            log.warning("%s: waiting for NATS (%s); retrying in %.1fs", broker.client_name,
                        exc, delay)  # fmt: skip
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        if stop.is_set():
            raise asyncio.CancelledError
        delay = min(delay * 2, 5.0)


@contextlib.asynccontextmanager
async def running(
    broker: TollgateBroker,
    stop: asyncio.Event,
    before_start: Callable[[TollgateBroker], Awaitable[None]] | None = None,
) -> AsyncIterator[TollgateBroker]:
    """Connect (waiting for NATS until `stop`), run `before_start`, start; stop at the end.

    The lifecycle of a broker inside a Tollgate service: `tollgate up` supervises the
    process and `stop` is its Ctrl-C; the broker never installs signal handlers itself
    (FastStream's `FastStream(broker).run()` would, so services do not use it).
    """
    try:
        await _connect_retrying(broker, stop)
        if before_start is not None:
            await before_start(broker)
        await broker.start()
        yield broker
    finally:
        await broker.stop()


def error_replies() -> ExceptionMiddleware:
    """Request/reply handlers answer every request: a bad one with a `tollgate.error.v1`.

    For a router of request/reply subscribers only (`NatsRouter(middlewares=[...])`): the
    error is published to the request's reply subject, which on a JetStream message would
    be its ack subject. A typed handler's validation error names the bad fields (paths
    inside the payload); anything else is logged and answered as `internal_error`.
    """
    middleware = ExceptionMiddleware()

    @middleware.add_handler(ValidationError, publish=True)
    async def invalid(exc: ValidationError) -> ErrorReply:
        errors = _payload_errors(exc)
        if not errors:
            return ErrorReply(error=INVALID_REQUEST, message="the body is not a JSON object")
        return ErrorReply(
            error=INVALID_REQUEST,
            message=describe(errors, exc.error_count() - len(errors)),
            field=errors[0].field,
            errors=errors,
        )

    @middleware.add_handler(Exception, publish=True)
    async def failed(exc: Exception) -> ErrorReply:
        log.error("a request handler failed", exc_info=exc)
        return ErrorReply(
            error=INTERNAL_ERROR,
            message="the service could not answer this request; retry, and see its log",
        )

    return middleware


def _payload_errors(exc: ValidationError, limit: int = 5) -> list[FieldError]:
    # FastDepends puts the handler's argument name first in every location: drop it.
    found = []
    for err in exc.errors()[:limit]:
        loc = err.get("loc", ())[1:]
        if not loc:
            return []  # the argument itself is wrong: not an object at all
        found.append(
            FieldError(
                field=".".join(str(p) for p in loc),
                message=str(err.get("msg", "invalid")).removeprefix("Value error, "),
            )
        )
    return found


# Tokens of a subject kept as they are in a metric label; the rest (hosts, subjects,
# targets) become `*`, so a label has as many values as the contract has subjects, not as
# many as there are hosts and users.
_FIXED_TOKENS = {"commands": 4, "spawn": 4}  # commands.terminate.<host>, spawn.check
METRICS_PREFIX = "tollgate_bus"


def subject_pattern(subject: str) -> str:
    """`tollgate.v1.samples.h1` -> `tollgate.v1.samples.*`; reply inboxes -> `_INBOX`."""
    if subject.startswith(("_INBOX.", "$JS.")):
        return subject.split(".", 1)[0]
    tokens = subject.split(".")
    kind = tokens[2] if len(tokens) > 2 else ""
    keep = _FIXED_TOKENS.get(kind, 3)
    return ".".join(tokens[:keep] + ["*"] * (len(tokens) - keep))


class _Patterned(NatsMetricsSettingsProvider):
    __slots__ = ()

    def get_consume_attrs_from_message(self, msg: Any) -> Any:
        attrs = super().get_consume_attrs_from_message(msg)
        attrs["destination_name"] = subject_pattern(attrs["destination_name"])
        return attrs

    def get_publish_destination_name_from_cmd(self, cmd: Any) -> str:
        return subject_pattern(cmd.destination)


class _BatchPatterned(BatchNatsMetricsSettingsProvider):
    __slots__ = ()

    def get_consume_attrs_from_message(self, msg: Any) -> Any:
        attrs = super().get_consume_attrs_from_message(msg)
        attrs["destination_name"] = subject_pattern(attrs["destination_name"])
        return attrs

    def get_publish_destination_name_from_cmd(self, cmd: Any) -> str:
        return subject_pattern(cmd.destination)


def _providers(msg: Any) -> Any:
    if isinstance(msg, list | tuple):
        return _BatchPatterned()
    if msg is None or isinstance(msg, Msg):
        return _Patterned()
    return None


def bus_metrics(app_name: str, registry: CollectorRegistry = REGISTRY) -> PrometheusMiddleware:
    """FastStream's Prometheus middleware as Tollgate exports it: `tollgate_bus_*` metrics
    (received, processed with duration and exceptions, in process, published), labelled
    by service (`app_name`) and subject pattern (`handler`, never a host or user name)."""
    return PrometheusMiddleware(
        settings_provider_factory=_providers,
        registry=registry,
        app_name=app_name,
        metrics_prefix=METRICS_PREFIX,
    )
