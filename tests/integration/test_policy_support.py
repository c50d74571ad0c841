"""Shared fixtures and helpers of the policy tests (no tests of its own).

A policy runs in-process against the session's NATS and this test's database and prefix;
usage goes through the real ledger as counter batches; commands are read back from the
COMMANDS stream, which is what hosts consume (so a JetStream-deduplicated repeat does not
count, exactly as for a host).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from contracts.commands import commands_wildcard
from contracts.quota_events import quota_events_subject
from contracts.samples import samples_subject
from contracts.spawn import SpawnDecision, SpawnRequest, spawn_check_subject
from contracts.workloads import Resources, WorkloadStarted, WorkloadStopped, workloads_subject
from services.policy.app import SpawnCheckResponder
from services.policy.live import Clock, utc_now
from services.policy.service import PolicyService
from services.policy.source import ConfigSource
from tests.conftest import wait_until
from tests.integration.conftest import batch_json

GIB = 2**30
GIB_HOUR = Decimal(GIB * 3600)


def iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass
class RunningPolicy:
    service: PolicyService
    config_path: Path
    stop: asyncio.Event
    task: asyncio.Task[None]
    responder: SpawnCheckResponder

    async def halt(self) -> None:
        self.stop.set()
        await self.responder.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self.task, 10)


@pytest.fixture
async def policy_for(
    servers: Any, nc: Client, pool: asyncpg.Pool, prefix: str, streams: None, tmp_path: Path
) -> AsyncIterator[Callable[..., Awaitable[RunningPolicy]]]:
    started: list[RunningPolicy] = []

    async def start(
        config_text: str, *, clock: Clock = utc_now, sweep_every: float = 10.0,
        path: Path | None = None,
    ) -> RunningPolicy:  # fmt: skip
        config_path = path or tmp_path / "quotas.yaml"
        if path is None:
            config_path.write_text(config_text)
        source = ConfigSource.load(config_path)
        service = PolicyService(nc, pool, source, prefix, clock=clock, sweep_every=sweep_every)
        responder = SpawnCheckResponder(nc, prefix, service.checker)
        await responder.start()
        stop = asyncio.Event()
        task = asyncio.create_task(service.run(stop))
        await wait_until(_ready(service), 20, "the policy to load its state")
        running = RunningPolicy(service, config_path, stop, task, responder)
        started.append(running)
        return running

    yield start
    for p in started:
        await p.halt()


def _ready(service: PolicyService) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return service.ready.is_set()

    return check


def _json(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else str(value)
    return value


class Fleet:
    """A host as the tests drive it: counter batches, workload events."""

    def __init__(self, nc: Client, prefix: str, host: str) -> None:
        self.js = nc.jetstream()
        self.prefix = prefix
        self.host = host
        self.seq = 0

    async def sample(self, when: datetime, *counters: tuple[str, str, str, Any]) -> None:
        """One cumulative batch: (subject, workload, metric, value) per counter."""
        self.seq += 1
        readings = [
            {"subject": s, "workload": w, "metric": m, "value": _json(v)} for s, w, m, v in counters
        ]
        body = batch_json(self.host, "e1", self.seq, readings, sampled_at=iso(when))
        await self.js.publish(
            samples_subject(self.host, self.prefix), body,
            headers={"Nats-Msg-Id": f"{self.host}:e1:{self.seq}"},
        )  # fmt: skip

    async def started(
        self, subject: str, workload: str, at: datetime, groups: list[str] | None = None,
        mem_bytes: int = 0,
    ) -> None:  # fmt: skip
        event = WorkloadStarted(
            workload=workload, subject=subject, groups=groups or [], host=self.host,
            resources=Resources(mem_bytes=mem_bytes), started_at=at,
        )  # fmt: skip
        await self.js.publish(workloads_subject(self.host, self.prefix), event.to_json())

    async def stopped(self, subject: str, workload: str, at: datetime) -> None:
        event = WorkloadStopped(workload=workload, subject=subject, host=self.host, stopped_at=at)
        await self.js.publish(workloads_subject(self.host, self.prefix), event.to_json())


@dataclass
class Inbox:
    """Every message the COMMANDS stream stored (ordered consumer) and every quota event."""

    commands: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [body for subject, body in self.commands if f".commands.{kind}." in subject]

    def terminations(self, workload: str | None = None) -> list[dict[str, Any]]:
        return [c for c in self.of("terminate") if workload in (None, c["workload"])]


@pytest.fixture
async def inbox(nc: Client, prefix: str, streams: None) -> AsyncIterator[Inbox]:
    box = Inbox()

    async def on_command(msg: Msg) -> None:
        box.commands.append((msg.subject, json.loads(msg.data)))

    async def on_event(msg: Msg) -> None:
        box.events.append(json.loads(msg.data))

    sub = await nc.jetstream().subscribe(
        commands_wildcard(prefix), ordered_consumer=True, cb=on_command
    )
    every_subject = quota_events_subject("x", prefix).rsplit(".", 1)[0] + ".*"
    events = await nc.subscribe(every_subject, cb=on_event)
    await nc.flush()
    try:
        yield box
    finally:
        await sub.unsubscribe()
        await events.unsubscribe()


async def spawn(nc: Client, prefix: str, request: SpawnRequest) -> SpawnDecision:
    reply = await nc.request(spawn_check_subject(prefix), request.to_json(), timeout=10)
    return SpawnDecision.model_validate_json(reply.data)


async def decision_row(pool: asyncpg.Pool, decision_id: str) -> asyncpg.Record | None:
    return await pool.fetchrow("SELECT * FROM policy_decisions WHERE decision_id = $1", decision_id)
