"""The FastStream pattern (infra.broker) on a real nats-server with `tollgate nats-config`
permissions: each identity's own reply inboxes, batch pull with manual acks and dead letters,
request/reply, durable consumers brought up to date, a quick stop."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import nats.errors
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


async def _published(js: Any, subject: str, body: bytes) -> bool:
    """Publish once; False while JetStream is not back yet (the same id: never twice)."""
    try:
        await js.publish(subject, body, timeout=1, headers={"Nats-Msg-Id": "c2"})
    except (nats.errors.Error, OSError, TimeoutError):
        return False
    return True


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


async def test_the_meters_command_consumer_is_made_again_after_nats_restarts(
    tmp_path: Any,
) -> None:
    """A NATS restart drops the in-memory ephemeral consumer: the listener's own fetch loop
    notices, and the consumer is made again from the next sequence (FastStream's loop would
    retry the lost consumer forever)."""
    import subprocess
    from decimal import Decimal

    from contracts._base import utcnow
    from contracts.commands import TerminateWorkload, commands_stream, terminate_subject
    from infra.bus import connect, ensure_streams
    from services.meter.commands import CommandListener
    from services.meter.publisher import MeterLink
    from tollgate.embedded import free_port, nats_server_binary

    port, prefix, host = free_port(), unique("t"), "h1"
    url = f"nats://127.0.0.1:{port}"
    args = [str(nats_server_binary()), "-a", "127.0.0.1", "-p", str(port), "-js",
            "-sd", str(tmp_path / "js")]  # fmt: skip

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def command(command_id: str) -> bytes:
        return TerminateWorkload(
            command_id=command_id, workload="w1", subject="alice", reason="r", quota="q",
            metric="log.bytes", used=Decimal(2), limit=Decimal(1), grace_seconds=Decimal(0),
            decided_at=utcnow(),
        ).to_json()  # fmt: skip

    server = start()
    got: list[str] = []

    async def handle(c: TerminateWorkload) -> None:
        got.append(c.command_id)

    link = MeterLink(url, "meter")
    try:
        admin = await connect(url, "admin")
        await ensure_streams(admin.jetstream(), prefix, duplicate_window=120)
        link.start()
        listener = CommandListener(link, prefix, host, handle, next_seq=1)
        task = asyncio.create_task(listener.run())
        js = admin.jetstream()
        await js.publish(terminate_subject(host, prefix), command("c1"))
        await wait_until(lambda: _true(got == ["c1"]), 15, "the first command")
        server.kill()
        server.wait()
        server = start()
        # Published once NATS is back: the new consumer starts after c1, so c1 stays done.
        await wait_until(lambda: _published(js, terminate_subject(host, prefix), command("c2")),
                         20, "JetStream back to take c2")  # fmt: skip
        await wait_until(lambda: _true(got == ["c1", "c2"]), 20, "the command after the restart")
        info = await js.stream_info(commands_stream(prefix))
        assert info.state.messages == 2
        await listener.stop(task)
        await admin.close()
    finally:
        await link.close()
        server.kill()
        server.wait()


async def test_a_declared_responder_served_by_hand(secured: Secured) -> None:
    """serve_by_hand: the raw nats-py callback answers in production, the declaration stays
    for the document (and for TestNatsBroker)."""
    from faststream.specification import AsyncAPI

    from infra.broker import serve_by_hand

    s, stop, raw_calls = secured, asyncio.Event(), []
    policy = TollgateBroker(s.url, name="policy", seed_file=s.seed("policy"))
    subject = spawn_check_subject(s.prefix)
    subscriber = policy.subscriber(subject, queue="policy", title="spawn-check")

    def decide(request: SpawnRequest) -> SpawnDecision:
        return SpawnDecision(decision_id="d", allowed=request.subject != "bob", reason="ok",
                             message="m")  # fmt: skip

    @subscriber
    async def typed(request: SpawnRequest) -> SpawnDecision:
        return decide(request)

    async def raw(msg: Any) -> None:
        raw_calls.append(msg.subject)
        await msg.respond(decide(SpawnRequest.model_validate_json(msg.data)).to_json())

    serve_by_hand(policy, subscriber, raw, queue="policy")
    hub = TollgateBroker(s.url, name="hub", seed_file=s.seed(s.hub))
    async with running(policy, stop), running(hub, stop):
        reply = await hub.request(SpawnRequest(subject="bob"), subject, timeout=5)
    assert SpawnDecision.model_validate(await reply.decode()).allowed is False
    assert raw_calls == [subject]
    doc = AsyncAPI(policy, schema_version="3.0.0").to_specification().to_jsonable()
    assert doc["operations"]["spawn-check"]["action"] == "receive"
