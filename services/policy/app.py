"""Wiring of the policy service: a FastStream NATS broker answering spawn checks."""

from __future__ import annotations

import logging

from faststream.nats import NatsBroker
from faststream.nats.annotations import NatsMessage

from contracts.spawn import spawn_check_subject

from .handlers import BadRequest, SpawnChecker, error_reply, parse_request


def build_broker(nats_url: str, prefix: str, checker: SpawnChecker) -> NatsBroker:
    """A broker whose one subscriber answers `tollgate.v1.spawn.check` requests."""
    # Per-message access logs at DEBUG: the checker logs each decision with its reasons.
    broker = NatsBroker(
        nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.5, log_level=logging.DEBUG
    )

    # A queue group, so several policy instances share the requests.
    @broker.subscriber(spawn_check_subject(prefix), queue="policy")
    async def spawn_check(msg: NatsMessage) -> bytes:
        try:
            request = parse_request(msg.body)
        except BadRequest as exc:
            return error_reply(str(exc))
        decision = await checker.check(request)
        return decision.to_json()

    return broker


async def start_broker(broker: NatsBroker) -> None:
    """Start, and return only once the server has registered the subscription.

    Without the flush, a request sent right after start can find no responder yet.
    """
    await broker.start()
    await broker.connection.flush()
