"""The FastStream pattern (infra.broker) on FastStream's in-memory broker: typed handlers,
error replies, exact decimals. The same code runs against real NATS in
tests/integration/test_broker.py."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from faststream.nats import NatsRouter, TestNatsBroker
from prometheus_client import CollectorRegistry

from contracts.errors import ErrorReply
from contracts.spawn import SpawnDecision, SpawnRequest
from infra.broker import TollgateBroker, bus_metrics, error_replies, subject_pattern


def _decider(broker: TollgateBroker, subject: str) -> list[SpawnRequest]:
    """A request/reply handler declared the way a service declares its own."""
    seen: list[SpawnRequest] = []
    router = NatsRouter(middlewares=[error_replies()])

    @router.subscriber(subject, queue="policy")
    async def decide(request: SpawnRequest) -> SpawnDecision:
        seen.append(request)
        if request.subject == "boom":
            raise RuntimeError("the store is gone")
        allowed = request.subject != "bob"
        return SpawnDecision(
            decision_id="d1", allowed=allowed, reason="ok" if allowed else "quota", message="m"
        )

    broker.include_router(router)
    return seen


async def test_a_typed_request_handler_replies_with_the_contract() -> None:
    broker = TollgateBroker(name="unit")
    seen = _decider(broker, "t.spawn.check")
    async with TestNatsBroker(broker) as test:
        reply = await test.request(SpawnRequest(subject="alice", host="h1"), "t.spawn.check")
        decision = SpawnDecision.model_validate(await reply.decode())
        denied = await test.request(SpawnRequest(subject="bob"), "t.spawn.check")
    assert decision.allowed and decision.decision_id == "d1"
    assert SpawnDecision.model_validate(await denied.decode()).allowed is False
    assert [r.subject for r in seen] == ["alice", "bob"] and seen[0].host == "h1"


async def test_a_bad_request_is_answered_with_the_field_to_fix() -> None:
    broker = TollgateBroker(name="unit")
    seen = _decider(broker, "t.spawn.check")
    async with TestNatsBroker(broker) as test:
        bad = await test.request({"subject": "alice", "expected_seconds": "soon"}, "t.spawn.check")
        wrong = await test.request({"schema": "tollgate.other.v1", "subject": "a"}, "t.spawn.check")
        junk = await test.request(b"not json", "t.spawn.check")
        failed = await test.request(SpawnRequest(subject="boom"), "t.spawn.check")
    error = ErrorReply.model_validate(await bad.decode())
    assert error.error == "invalid_request" and error.field == "expected_seconds"
    assert ErrorReply.model_validate(await wrong.decode()).field == "schema"
    not_object = ErrorReply.model_validate(await junk.decode())
    assert not_object.field is None and "not a JSON object" in not_object.message
    internal = ErrorReply.model_validate(await failed.decode())
    assert internal.error == "internal_error" and "store" not in internal.message
    assert [r.subject for r in seen] == ["boom"]  # invalid ones never reached the handler


async def test_payloads_are_decoded_with_exact_decimals() -> None:
    broker = TollgateBroker(name="unit")
    got: list[Any] = []

    @broker.subscriber("t.numbers")
    async def take(body: dict[str, Any]) -> None:
        got.append(body)

    async with TestNatsBroker(broker) as test:
        await test.publish(b'{"v": 0.1000000000000000000001}', "t.numbers")
    assert got == [{"v": Decimal("0.1000000000000000000001")}]


async def test_bus_metrics_are_labelled_by_subject_pattern_not_by_host() -> None:
    registry = CollectorRegistry()
    broker = TollgateBroker(name="unit", middlewares=[bus_metrics("tollgate-unit", registry)])
    got: list[Any] = []

    @broker.subscriber("t.v1.samples.{host}")
    async def take(body: dict[str, Any]) -> None:
        got.append(body)

    async with TestNatsBroker(broker) as test:
        for host in ("h1", "h2", "h3"):
            await test.publish({"n": 1}, f"t.v1.samples.{host}")
    received = registry.get_sample_value(
        "tollgate_bus_received_messages_total",
        {"app_name": "tollgate-unit", "broker": "nats", "handler": "t.v1.samples.*"},
    )
    assert received == 3 and len(got) == 3
    handlers = {
        s.labels.get("handler")
        for metric in registry.collect()
        for s in metric.samples
        if "handler" in s.labels
    }
    assert handlers == {"t.v1.samples.*"}


def test_subject_patterns_keep_the_contracts_subjects_and_drop_names() -> None:
    assert subject_pattern("tollgate.v1.usage.alice") == "tollgate.v1.usage.*"
    assert subject_pattern("tollgate.v1.commands.notice.h1") == "tollgate.v1.commands.notice.*"
    assert subject_pattern("tollgate.v1.spawn.check") == "tollgate.v1.spawn.check"
    assert subject_pattern("tollgate.v1.grants.subject.bob") == "tollgate.v1.grants.*.*"
    assert subject_pattern("_INBOX.UKEY.nuid") == "_INBOX"
