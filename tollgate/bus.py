"""NATS connection and the JetStream streams of the contract, created idempotently."""

from __future__ import annotations

import logging

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError

from contracts.commands import commands_stream, commands_wildcard
from contracts.dlq import dlq_stream, dlq_wildcard
from contracts.quota_events import events_stream, events_wildcard
from contracts.samples import samples_stream, samples_wildcard
from contracts.usage import usage_stream, usage_wildcard
from contracts.workloads import workloads_stream, workloads_wildcard

log = logging.getLogger("tollgate.bus")
DAY = 86_400


async def connect(url: str, name: str) -> Client:
    """Connect with endless reconnects: a NATS restart is an outage, not a crash.

    An outage is logged once when it starts and once when it ends, not at every retry.
    """
    nc = Client()
    down = False

    async def _disconnected() -> None:
        nonlocal down
        if not (nc.is_closed or nc.is_draining or down):  # our own close is not an outage
            down = True
            log.warning("%s: lost NATS at %s; reconnecting in the background", name, url)

    async def _reconnected() -> None:
        nonlocal down
        down = False
        log.info("%s: reconnected to NATS", name)

    async def _error(exc: Exception) -> None:
        log.log(logging.DEBUG if down else logging.WARNING, "%s: NATS error: %s", name, exc)

    await nc.connect(
        url,
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        disconnected_cb=_disconnected,
        reconnected_cb=_reconnected,
        error_cb=_error,
    )
    return nc


def stream_configs(prefix: str, duplicate_window: float) -> list[StreamConfig]:
    """The streams of the contract, all on file storage."""
    common = {"storage": StorageType.FILE, "retention": RetentionPolicy.LIMITS}
    return [
        StreamConfig(
            name=samples_stream(prefix),
            subjects=[samples_wildcard(prefix)],
            duplicate_window=duplicate_window,
            max_age=14 * DAY,
            discard=DiscardPolicy.OLD,
            **common,
        ),
        StreamConfig(
            name=usage_stream(prefix),
            subjects=[usage_wildcard(prefix)],
            duplicate_window=duplicate_window,
            **common,
        ),
        StreamConfig(
            name=workloads_stream(prefix),
            subjects=[workloads_wildcard(prefix)],
            duplicate_window=duplicate_window,
            max_age=90 * DAY,
            **common,
        ),
        StreamConfig(
            name=commands_stream(prefix),
            subjects=[commands_wildcard(prefix)],
            duplicate_window=duplicate_window,
            max_age=30 * DAY,
            **common,
        ),
        StreamConfig(
            name=events_stream(prefix),
            subjects=[events_wildcard(prefix)],
            duplicate_window=duplicate_window,
            max_age=90 * DAY,
            **common,
        ),
        StreamConfig(
            name=dlq_stream(prefix),
            subjects=[dlq_wildcard(prefix)],
            duplicate_window=duplicate_window,
            max_age=30 * DAY,
            **common,
        ),
    ]


async def ensure_streams(js: JetStreamContext, prefix: str, duplicate_window: float) -> None:
    """Create the streams, or bring an existing stream's config up to date."""
    for config in stream_configs(prefix, duplicate_window):
        try:
            await js.add_stream(config)
        except BadRequestError as exc:
            # Exists with a different config (e.g. a changed duplicate window): update it.
            if exc.err_code != 10058:
                raise
            await js.update_stream(config)


async def durable_pull(
    js: JetStreamContext,
    *,
    stream: str,
    subject: str,
    durable: str,
    ack_wait: float,
    deliver_policy: DeliverPolicy = DeliverPolicy.ALL,
    max_ack_pending: int = 1000,
) -> JetStreamContext.PullSubscription:
    """Create or update a durable pull consumer, then bind to it.

    Create-or-update rather than plain subscribe, so a changed ack_wait or backlog limit
    takes effect on a consumer that already exists.
    """
    await js.add_consumer(
        stream,
        ConsumerConfig(
            durable_name=durable,
            filter_subject=subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=deliver_policy,
            ack_wait=ack_wait,
            max_deliver=-1,
            max_ack_pending=max_ack_pending,
        ),
    )
    return await js.pull_subscribe_bind(durable=durable, stream=stream)
