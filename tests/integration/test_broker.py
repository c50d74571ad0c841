"""The FastStream pattern (infra.broker) on a real nats-server with `tollgate nats-config`
permissions: each identity's own reply inboxes, batch pull with manual acks and dead letters,
request/reply, durable consumers brought up to date, a quick stop."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import pytest
from faststream import AckPolicy, Context
from faststream.nats import NatsRouter, PullSub
from faststream.nats.message import NatsBatchMessage
from nats.js.api import ConsumerConfig

from contracts.dlq import DeadLetterReason, dlq_stream
from contracts.errors import ErrorReply
from contracts.samples import samples_stream, samples_subject, samples_wildcard
from contracts.spawn import SpawnDecision, SpawnRequest, spawn_check_subject
from infra.broker import (
    TollgateBroker,
    broker_for,
    error_replies,
    fetch_when_ready,
    jstream,
    running,
)
from infra.deadletters import file_dead_letter
from tests.conftest import unique, wait_until
from tests.integration.test_nats_auth import Secured, batch, secured, stored

__all__ = ["secured"]  # the fixture, imported for this module's tests

Batch = Annotated[NatsBatchMessage, Context("message")]


def _samples(
    broker: TollgateBroker, prefix: str, durable: str, taken: list[Any], ack_wait: float = 30
) -> None:
    """A batch pull subscriber with manual acks, declared the way the ledger declares its own."""
    subscriber = broker.subscriber(
        samples_wildcard(prefix),
        stream=jstream(samples_stream(prefix)),
        durable=durable,
        config=ConsumerConfig(ack_wait=ack_wait, max_deliver=-1, max_ack_pending=1000),
        pull_sub=PullSub(batch_size=100, timeout=1.0, batch=True),
        ack_policy=AckPolicy.MANUAL,
    )
    fetch_when_ready(subscriber)  # a lone message goes at once (not after timeout)

    @subscriber
    async def fold(bodies: list[Any], message: Batch) -> None:
        for body, raw in zip(bodies, message.raw_message, strict=True):
            if isinstance(body, bytes):  # not a JSON object: the decoder left its bytes
                await file_dead_letter(
                    broker.js, raw, DeadLetterReason.INVALID_JSON, "not JSON",
                    prefix=prefix, consumer=durable,
                )  # fmt: skip
                continue
            taken.append(body)
            await raw.ack()


async def test_a_batch_pull_subscriber_acks_and_dead_letters_as_its_own_identity(
    secured: Secured,
) -> None:
    s, taken, stop = secured, [], asyncio.Event()
    broker = TollgateBroker(s.url, name="ledger", seed_file=s.seed("ledger"))
    _samples(broker, s.prefix, "ledger-test", taken)
    meter = TollgateBroker(s.url, name="meter", seed_file=s.seed(s.a))
    async with running(broker, stop), running(meter, stop):
        subject = samples_subject(s.a, s.prefix)
        started = time.monotonic()
        await meter.publish(batch(s.a, 1, 5), subject, stream=samples_stream(s.prefix))
        await wait_until(lambda: _true(len(taken) == 1), 10, "the first sample")
        # A lone message is handed over at once, not after the 1 s batch timeout.
        lone = time.monotonic() - started
        await meter.publish(b"{not json", subject, stream=samples_stream(s.prefix))
        await meter.publish(batch(s.a, 2, 7), subject, stream=samples_stream(s.prefix))
        await wait_until(lambda: _true(len(taken) == 2), 10, "the second sample")
        await wait_until(lambda: _dead(s, DeadLetterReason.INVALID_JSON), 10, "the dead letter")
        info = await broker.js.consumer_info(samples_stream(s.prefix), "ledger-test")
        await wait_until(lambda: _settled(broker, s.prefix), 10, "nothing pending")
    assert [b["seq"] for b in taken] == [1, 2]
    assert info.config.ack_wait == 30
    print(f"lone sample handed over after {lone * 1000:.1f} ms")


async def _dead(s: Secured, reason: DeadLetterReason) -> bool:
    held = await stored(s, dlq_stream(s.prefix))
    return any(subject.endswith(reason.value) for subject in held)


async def _settled(broker: TollgateBroker, prefix: str) -> bool:
    info = await broker.js.consumer_info(samples_stream(prefix), "ledger-test")
    return info.num_ack_pending == 0 and info.num_pending == 0


async def _true(value: bool) -> bool:
    return value


async def test_a_changed_durable_config_takes_effect_at_start(secured: Secured) -> None:
    s, stop = secured, asyncio.Event()
    for ack_wait in (30.0, 45.0):
        broker = TollgateBroker(s.url, name="ledger", seed_file=s.seed("ledger"))
        _samples(broker, s.prefix, "ledger-acks", [], ack_wait=ack_wait)
        async with running(broker, stop):
            info = await broker.js.consumer_info(samples_stream(s.prefix), "ledger-acks")
        assert info.config.ack_wait == ack_wait


async def test_request_reply_between_the_policy_and_an_integrator(secured: Secured) -> None:
    s, stop = secured, asyncio.Event()
    policy = TollgateBroker(s.url, name="policy", seed_file=s.seed("policy"))
    router = NatsRouter(middlewares=[error_replies()])

    @router.subscriber(spawn_check_subject(s.prefix), queue="policy")
    async def decide(request: SpawnRequest) -> SpawnDecision:
        return SpawnDecision(decision_id=unique("d"), allowed=True, reason="ok", message="go")

    policy.include_router(router)
    hub = TollgateBroker(s.url, name="hub", seed_file=s.seed(s.hub))
    async with running(policy, stop), running(hub, stop):
        reply = await hub.request(SpawnRequest(subject="alice"), spawn_check_subject(s.prefix))
        decision = SpawnDecision.model_validate(await reply.decode())
        # The hand path: the raw nats-py client of the same broker, same inbox prefix.
        raw = await hub.nc.request(spawn_check_subject(s.prefix), b'{"subject": ""}', timeout=5)
    assert decision.allowed
    assert ErrorReply.model_validate_json(raw.data).field == "subject"


async def test_stop_is_quick_while_a_pull_is_waiting(secured: Secured) -> None:
    s, stop = secured, asyncio.Event()
    broker = TollgateBroker(s.url, name="ledger", seed_file=s.seed("ledger"))
    _samples(broker, s.prefix, "ledger-stop", [])
    async with running(broker, stop):
        await asyncio.sleep(0.1)  # the fetch loop is inside its long pull now
        started = time.monotonic()
    assert broker._connection is None
    assert time.monotonic() - started < 5  # close, not nats-py's 30 s drain


@pytest.mark.parametrize("with_seed", [True, False])
async def test_a_bad_seed_fails_with_the_clear_message(
    secured: Secured, tmp_path: Any, with_seed: bool
) -> None:
    seed = tmp_path / "missing.nk"
    if with_seed:
        seed.write_text("not a seed\n")
    broker = TollgateBroker(secured.url, name="ledger", seed_file=seed)
    with pytest.raises(Exception, match="TOLLGATE_NATS_NKEY_SEED_FILE"):
        await broker.connect()


async def test_a_service_broker_serves_within_the_bootstrap_lifecycle(secured: Secured) -> None:
    """tollgate.bootstrap.serving: streams made, subscribers started, and stopped on `stop`."""
    from infra.settings import Settings
    from tollgate.bootstrap import serving

    s, taken, stop = secured, [], asyncio.Event()
    settings = Settings(
        nats_url=s.url, nats_nkey_seed_file=s.seed("ledger"), prefix=s.prefix,
        token_secret="x",
    )  # fmt: skip
    broker = broker_for(settings, "tollgate-ledger")
    _samples(broker, s.prefix, "ledger-serving", taken)

    async def service() -> None:
        async with serving(broker, settings, stop):
            await stop.wait()

    task = asyncio.create_task(service())
    meter = TollgateBroker(s.url, name="meter", seed_file=s.seed(s.a))
    async with running(meter, asyncio.Event()):
        await wait_until(lambda: _true(broker.running), 10, "the broker started")
        await meter.publish(batch(s.a, 1, 5), samples_subject(s.a, s.prefix))
        await wait_until(lambda: _true(len(taken) == 1), 10, "the sample")
    stop.set()
    await asyncio.wait_for(task, 5)
    assert broker._connection is None
