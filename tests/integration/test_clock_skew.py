"""Hosts with wrong clocks: raw samples from 1970, 2099 and just past the tolerance.

A real ledger (with the default tolerance), the real policy answering over NATS, and the
real API: usage is counted in full at the clamped time, flagged, counted in the metric and
logged once per host and epoch; and the spawn check (NATS and HTTP), the quotas endpoint,
the usage endpoint, the report and the page all give the same numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from nats.aio.client import Client
from prometheus_client import REGISTRY

from contracts.durations import DEFAULT_MAX_CLOCK_SKEW
from contracts.samples import samples_subject
from contracts.spawn import SpawnDecision, SpawnRequest
from contracts.usage import UsageBatch, usage_subject
from infra.settings import Settings
from services.api.app import create_app
from services.api.deps import ApiDeps
from services.api.options import ApiOptions
from services.api.tokens import Principal, Role
from services.api.web.data import gather
from services.ledger.app import LedgerService
from services.ledger.feed import UsageFeed
from services.ledger.replay import rebuild_rollups
from services.policy.source import ConfigSource
from services.policy.windows import floor_hour
from tests.conftest import unique, wait_until
from tests.integration.conftest import MAX_PAYLOAD, batch_json
from tests.integration.test_api_support import ADMIN, SECRET
from tests.integration.test_policy_support import GIB_HOUR, RunningPolicy, spawn

pytest_plugins = ["tests.integration.test_policy_support"]
SKEW = DEFAULT_MAX_CLOCK_SKEW
MEM = "mem.alloc.byte_seconds"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
# The demo's quota: 2 GiB·h of memory in 30 days for group regular.
QUOTAS = """
groups:
  regular: [{subjects}]
quotas:
  - name: memory-30d
    metric: mem.alloc.byte_seconds
    limit: 2 GiB*h
    window: {{rolling: 30d}}
    applies_to: {{groups: [regular]}}
    enforce: [spawn, terminate]
failure_mode: closed
max_staleness: 60s
"""


def skewed_metric() -> float:
    return REGISTRY.get_sample_value("tollgate_ledger_clock_skewed_samples_total") or 0.0


@pytest.fixture
async def strict_ledger(
    nc: Client, pool: asyncpg.Pool, prefix: str, streams: None
) -> AsyncIterator[LedgerService]:
    """A ledger with the default clock-skew tolerance (the shared fixture trusts clocks)."""
    service = LedgerService(
        nc, pool, prefix=prefix, batch=500, fetch_timeout=0.2, max_payload=MAX_PAYLOAD
    )
    assert service.max_clock_skew == SKEW
    feed = UsageFeed(nc.jetstream(), pool, prefix)
    service.on_commit = feed.on_commit
    await service.subscribe()
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(service.run(stop)),
        asyncio.create_task(feed.run(stop)),
    ]
    try:
        yield service
    finally:
        stop.set()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 10)


@dataclass
class Stack:
    nc: Client
    pool: asyncpg.Pool
    prefix: str
    policy: RunningPolicy
    api: httpx.AsyncClient
    config: ConfigSource

    async def publish(self, host: str, epoch: str, seq: int, subject: str, value: Decimal,
                      sampled_at: str) -> None:  # fmt: skip
        """A raw counter batch, as any integrator would publish it."""
        body = batch_json(
            host, epoch, seq,
            [{"subject": subject, "workload": f"{subject}-nb", "metric": MEM,
              "value": str(value)}],
            sampled_at=sampled_at,
        )  # fmt: skip
        await self.nc.jetstream().publish(
            samples_subject(host, self.prefix), body,
            headers={"Nats-Msg-Id": f"{host}:{epoch}:{seq}"},
        )  # fmt: skip

    async def events(self, subject: str) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            """SELECT delta, window_start, window_end, received_at, sampled_at,
                      clock_skew_seconds, host, epoch
               FROM usage_events WHERE subject = $1 ORDER BY seq""",
            subject,
        )

    async def policy_total(self, subject: str) -> Decimal:
        usage = self.policy.service.live.usage
        assert usage is not None
        return usage.subject_usage(subject, MEM).total()

    async def readings(self, subject: str) -> dict[str, Any]:
        """What every read path says about `subject` right now (in GiB·h)."""
        ask = SpawnRequest(subject=subject, groups=["regular"])
        over_nats = await spawn(self.nc, self.prefix, ask)
        r = await self.api.post("/v1/spawn-checks", json=json.loads(ask.to_json()),
                                headers=AS_ADMIN)  # fmt: skip
        assert r.status_code == 200, r.text
        over_http = SpawnDecision.model_validate(r.json())
        quotas = (await self.api.get(f"/v1/subjects/{subject}/quotas", headers=AS_ADMIN)).json()
        usage = (await self.api.get(f"/v1/subjects/{subject}/usage", headers=AS_ADMIN)).json()
        report = (await self.api.get("/v1/reports/usage", headers=AS_ADMIN)).json()
        viewer = Principal(Role.ADMIN, None)
        page = await gather(self.pool, self.config.current(), viewer, subject, "30d",
                            datetime.now(UTC), SKEW)  # fmt: skip
        self.api.cookies.set("tollgate_session", ADMIN)
        html = (await self.api.get("/", params={"subject": subject})).text

        def gib_h(byte_seconds: str | Decimal) -> Decimal:
            return (Decimal(byte_seconds) / GIB_HOUR).normalize()

        (usage_row,) = [row for row in usage["rows"] if row["metric"] == MEM] or [{"total": 0}]
        report_rows = [row for row in report["rows"] if row["subject"] == subject]
        (q,) = quotas["quotas"]
        (page_quota,) = page.quotas
        (nats_status,) = over_nats.quotas
        (http_status,) = over_http.quotas
        chart = [c for c in page.charts if c.metric == MEM]
        return {
            "spawn_nats": (over_nats.allowed, nats_status.used, over_nats.retry_at),
            "spawn_http": (over_http.allowed, http_status.used, over_http.retry_at),
            "quotas": (q["state"] != "exceeded", Decimal(q["used"]), _time(q["retry_at"])),
            "usage": gib_h(usage_row["total"]),
            "report": gib_h(sum((Decimal(row["total"]) for row in report_rows), Decimal(0))),
            "page": (page_quota.used, page_quota.retry_at),
            "page_chart": chart[0].total if chart else None,
            "page_html": f'<span class="used">{page_quota.used.normalize():f}' in html,
            "policy_memory": gib_h(await self.policy_total(subject)),
        }


@pytest.fixture
async def stack(
    nc: Client, pool: asyncpg.Pool, prefix: str, policy_for: Any, tmp_path: Path
) -> AsyncIterator[Stack]:
    subjects = [unique(n) for n in ("erin", "dave", "carol", "frank")]
    text = QUOTAS.format(subjects=", ".join(subjects))
    policy = await policy_for(text)
    config = ConfigSource.load(policy.config_path)
    settings = Settings(data_dir=tmp_path / "api", admin_token=ADMIN, token_secret=SECRET)
    deps = ApiDeps(pool, nc, config, prefix=prefix)
    app = create_app(
        settings, deps=deps, options=ApiOptions(api_rate_per_second=0, spawn_check_timeout=5)
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        s = Stack(nc, pool, prefix, policy, c, config)
        s.subjects = subjects  # type: ignore[attr-defined]
        yield s


async def _feed_events(stack: Stack, subject: str, count: int) -> list[dict[str, Any]]:
    """The usage feed's events for `subject`, as an integrator reads them (envelopes expanded)."""
    got: list[dict[str, Any]] = []

    async def on(msg: Any) -> None:
        got.extend(
            json.loads(r.to_json()) for r in UsageBatch.model_validate_json(msg.data).records()
        )

    sub = await stack.nc.jetstream().subscribe(
        usage_subject(subject, stack.prefix), ordered_consumer=True, cb=on
    )
    try:

        async def arrived() -> bool:
            return len(got) >= count

        await wait_until(arrived, 20, f"{count} usage feed events of {subject}")
    finally:
        await sub.unsubscribe()
    return got


def _time(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def _skew_lines(caplog: pytest.LogCaptureFixture, host: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if f"clock skew: host={host} " in r.getMessage()]


async def _committed(stack: Stack, subject: str, count: int) -> list[asyncpg.Record]:
    async def done() -> bool:
        return len(await stack.events(subject)) >= count

    await wait_until(done, 20, f"{count} events of {subject} committed")
    return await stack.events(subject)


async def _policy_has(stack: Stack, subject: str, gib_hours: Decimal) -> None:
    async def seen() -> bool:
        return await stack.policy_total(subject) == gib_hours * GIB_HOUR

    await wait_until(seen, 20, f"the policy to see {gib_hours} GiB·h of {subject}")


def _assert_agree(seen: dict[str, Any], used: Decimal, allowed: bool) -> None:
    """Every read path: the same amount, the same verdict, the same return time."""
    retry = seen["spawn_nats"][2]
    assert seen["spawn_nats"] == (allowed, used, retry), seen
    assert seen["spawn_http"] == (allowed, used, retry), seen
    assert seen["quotas"] == (allowed, used, retry), seen
    assert seen["page"] == (used, retry), seen
    assert seen["usage"] == used and seen["report"] == used, seen
    if "policy_memory" in seen:
        assert seen["policy_memory"] == used, seen
    assert seen["page_html"], seen
    if used:
        assert seen["page_chart"] is not None and seen["page_chart"].startswith(f"{used} GiB"), seen


async def test_samples_from_1970_are_counted_in_full_near_their_arrival_and_every_path_agrees(
    stack: Stack, strict_ledger: LedgerService, caplog: pytest.LogCaptureFixture
) -> None:
    erin = stack.subjects[0]  # type: ignore[attr-defined]
    host = unique("h2")
    before = skewed_metric()
    caplog.set_level(logging.WARNING, logger="tollgate.ledger")
    await stack.publish(host, "e1", 1, erin, GIB_HOUR, "1970-01-01T00:00:00Z")
    await stack.publish(host, "e1", 2, erin, 6 * GIB_HOUR, "1970-01-01T00:10:00Z")
    events = await _committed(stack, erin, 2)

    # Counted exactly (the first reading of an epoch counts from zero): 1 + 5 GiB·h.
    assert sum(e["delta"] for e in events) == 6 * GIB_HOUR
    for e in events:
        received = e["received_at"]
        assert e["window_end"] == received - SKEW  # the earliest edge of its window
        assert e["sampled_at"].year == 1970
        assert e["clock_skew_seconds"] < -1.7e9  # flagged: about 56 years behind
        assert abs(received - datetime.now(UTC)) < timedelta(minutes=5)  # JetStream's clock
    assert events[1]["window_start"] <= events[1]["window_end"]
    assert skewed_metric() - before == 2
    lines = _skew_lines(caplog, host)
    assert len(lines) == 1 and "epoch=e1" in lines[0] and "behind" in lines[0], lines

    await _policy_has(stack, erin, Decimal(6))
    seen = await stack.readings(erin)
    _assert_agree(seen, Decimal(6), allowed=False)
    # The usage leaves the 30-day window 30 days after it arrived, not 56 years ago.
    placed = events[1]["window_end"]
    assert seen["spawn_nats"][2] == floor_hour(placed) + timedelta(hours=1, days=30)

    # A new epoch of the same bad clock is a new life of the host: logged once more.
    await stack.publish(host, "e2", 1, erin, GIB_HOUR, "1970-01-02T00:00:00Z")
    await _committed(stack, erin, 3)
    await _policy_has(stack, erin, Decimal(7))
    lines = _skew_lines(caplog, host)
    assert [("epoch=e1" in x, "epoch=e2" in x) for x in lines] == [(True, False), (False, True)]
    assert skewed_metric() - before == 3


async def test_samples_from_2099_lock_no_one_out_for_decades_and_every_path_agrees(
    stack: Stack, strict_ledger: LedgerService, caplog: pytest.LogCaptureFixture
) -> None:
    dave = stack.subjects[1]  # type: ignore[attr-defined]
    host = unique("h2")
    before = skewed_metric()
    caplog.set_level(logging.WARNING, logger="tollgate.ledger")
    await stack.publish(host, "e1", 1, dave, GIB_HOUR, "2099-01-01T00:00:00Z")
    await stack.publish(host, "e1", 2, dave, 6 * GIB_HOUR, "2099-01-01T00:10:00Z")
    events = await _committed(stack, dave, 2)

    assert sum(e["delta"] for e in events) == 6 * GIB_HOUR
    for e in events:
        assert e["window_end"] == e["received_at"] + SKEW  # the latest edge of its window
        assert e["clock_skew_seconds"] > 2e9  # flagged: about 72 years ahead
    assert skewed_metric() - before == 2
    lines = _skew_lines(caplog, host)
    assert len(lines) == 1 and "ahead of" in lines[0], lines

    await _policy_has(stack, dave, Decimal(6))
    seen = await stack.readings(dave)
    _assert_agree(seen, Decimal(6), allowed=False)
    retry = seen["spawn_nats"][2]
    assert retry is not None and retry < datetime.now(UTC) + timedelta(days=31)

    # The usage feed carries the flag; auditors' recomputations still hold.
    feed = await _feed_events(stack, dave, 2)
    assert [Decimal(f["clock_skew_seconds"]) for f in feed] == [
        e["clock_skew_seconds"] for e in events
    ]
    assert [f["window_end"] for f in feed] == [
        e["window_end"].isoformat().replace("+00:00", "Z") for e in events
    ]
    verdict = (await stack.api.get("/v1/audit/verify", headers=AS_ADMIN)).json()
    assert verdict["ok"] is True, verdict
    async with stack.pool.acquire() as conn:
        assert (await rebuild_rollups(conn, apply=False)).identical


async def test_a_clock_just_past_the_tolerance_is_clamped_and_one_just_inside_is_trusted(
    stack: Stack, strict_ledger: LedgerService
) -> None:
    carol = stack.subjects[2]  # type: ignore[attr-defined]
    host = unique("h3")
    before = skewed_metric()
    now = datetime.now(UTC)
    inside = now - SKEW + timedelta(seconds=40)  # within 5 minutes of arrival
    past = now - SKEW - timedelta(seconds=40)  # 40 s too far behind
    iso = lambda t: t.isoformat().replace("+00:00", "Z")  # noqa: E731
    await stack.publish(host, "e1", 1, carol, GIB_HOUR / 4, iso(past))
    await stack.publish(host, "e1", 2, carol, GIB_HOUR, iso(inside))
    first, second = await _committed(stack, carol, 2)

    assert first["clock_skew_seconds"] is not None and first["clock_skew_seconds"] < -300
    assert first["window_end"] == first["received_at"] - SKEW
    assert first["sampled_at"] == past
    assert second["clock_skew_seconds"] is None  # trusted as reported
    assert second["window_end"] == inside == second["sampled_at"]
    assert second["window_start"] == first["window_end"] <= second["window_end"]
    assert skewed_metric() - before == 1

    await _policy_has(stack, carol, Decimal(1))
    _assert_agree(await stack.readings(carol), Decimal(1), allowed=True)


async def test_usage_a_ledger_placed_decades_ahead_before_the_clamp_counts_in_no_path_at_all(
    stack: Stack, ledger: LedgerService
) -> None:
    """Rows written by a ledger that still trusted clocks (the shared fixture trusts them for
    ten years): no read path counts usage beyond the horizon, so none can disagree."""
    frank = stack.subjects[3]  # type: ignore[attr-defined]
    host = unique("h4")
    now = datetime.now(UTC)
    iso = lambda t: t.isoformat().replace("+00:00", "Z")  # noqa: E731
    await stack.publish(host, "e1", 1, frank, GIB_HOUR, iso(now - timedelta(hours=2)))
    await stack.publish(host, "e1", 2, frank, 9 * GIB_HOUR, iso(now + timedelta(days=3000)))
    events = await _committed(stack, frank, 2)
    assert events[1]["window_end"] > now + timedelta(days=2999)  # trusted: placed far ahead

    await _policy_has(stack, frank, Decimal(9))  # in the policy's memory, but beyond every window
    seen = await stack.readings(frank)
    assert seen.pop("policy_memory") == Decimal(9)  # all of it is held, one GiB·h is in a window
    _assert_agree(seen, Decimal(1), allowed=True)
