"""Forecasts and budgets in money through real NATS, ledger, policy and API.

A constant-rate fleet publishes samples a few seconds apart (within the ledger's clock-skew
allowance); the policy and the API run on one fixed clock, so `projected_exhaustion_at` is
checked against the exact instant an oracle in fractions computes, and the forecast event
is counted. Costs combine two priced metrics and a price change on the hour: history older
than the skew allowance is written through the ledger's own write path (as a ledger that ran
then would have), the current hour arrives live; an oracle in fractions prices every hour.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from nats.aio.client import Client

from contracts.spawn import SpawnRequest
from infra.settings import Settings
from services.api.app import create_app
from services.api.deps import ApiDeps
from services.api.options import ApiOptions
from services.ledger.domain import Reading, SeriesKey
from services.ledger.store import apply_readings
from services.policy.config import parse_config
from services.policy.source import ConfigSource
from tests.conftest import unique, wait_until
from tests.integration.test_policy_support import Fleet, Inbox, iso, spawn
from tests.servers import TestServers

pytest_plugins = ["tests.integration.test_policy_support"]
ADMIN, SECRET = "costfc-admin", "costfc-secret"
MB, GB = 10**6, 10**9
NET, GPU = "net.tx.wan.bytes", "gpu.alloc.seconds"


class FixedClock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def api_for(pool: asyncpg.Pool, nc: Client, tmp: Path, text: str, clock: FixedClock) -> Any:
    settings = Settings(data_dir=tmp, admin_token=ADMIN, token_secret=SECRET)
    deps = ApiDeps(pool, nc, ConfigSource.fixed(parse_config(text)), clock=clock)
    app = create_app(settings, deps=deps, options=ApiOptions())
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://t",
        headers={"Authorization": f"Bearer {ADMIN}"},
    )


def oracle_projection(
    now: datetime, lookback_start: datetime, used: int, recent: int, limit: int
) -> datetime:
    """now + remaining / (recent / (now - lookback start)), rounded up to the microsecond."""
    elapsed = (now - lookback_start) // timedelta(microseconds=1)
    wait = Fraction(limit - used) * elapsed / recent
    return now + timedelta(microseconds=-(-wait.numerator // wait.denominator))


FORECAST_QUOTAS = """
quotas:
  - name: egress-30d
    metric: net.tx.wan.bytes
    limit: 50 MB
    window: {rolling: 30d}
    warn_at: [0.5]
"""


async def test_a_constant_rate_fleet_is_forecast_to_the_exact_instant_and_warned_once(
    nc: Client, pool: asyncpg.Pool, prefix: str, ledger: Any, policy_for: Any, inbox: Inbox,
    tmp_path: Path,
) -> None:  # fmt: skip
    ann, host = unique("ann"), unique("node")
    t0 = datetime.now(UTC).replace(microsecond=0)
    clock = FixedClock(t0 + timedelta(seconds=30))
    await policy_for(FORECAST_QUOTAS, clock=clock)
    fleet = Fleet(nc, prefix, host)
    # 1 MB every 5 s (a constant 200 kB/s) for 25 s: the first reading starts the series.
    for i in range(6):
        await fleet.sample(t0 - timedelta(seconds=25 - 5 * i), (ann, "w1", NET, i * MB))
    used = 5 * MB
    api = api_for(pool, nc, tmp_path, FORECAST_QUOTAS, clock)

    async def counted() -> bool:
        r = await api.get(f"/v1/subjects/{ann}/quotas")
        return r.json()["quotas"][0]["used"] == "5"

    await wait_until(counted, 30, "the ledger to count the fleet's 5 MB")
    now = clock.now
    # The rate is measured from the first hour bucket that holds usage: the one the first
    # megabyte (the second reading) fell in.
    lookback = (t0 - timedelta(seconds=20)).replace(minute=0, second=0, microsecond=0)
    expected = oracle_projection(now, lookback, used, used, 50 * MB)
    [status] = (await api.get(f"/v1/subjects/{ann}/quotas")).json()["quotas"]
    assert datetime.fromisoformat(status["projected_exhaustion_at"]) == expected

    async def folded() -> bool:  # the policy folds the feed on its own schedule
        d = await spawn(nc, prefix, SpawnRequest(subject=ann))
        return d.quotas[0].used == 5

    await wait_until(folded, 30, "the policy to fold the fleet's 5 MB")
    decision = await spawn(nc, prefix, SpawnRequest(subject=ann))
    assert decision.quotas[0].projected_exhaustion_at == expected

    def forecasts() -> list[dict[str, Any]]:
        return [e for e in inbox.events if e.get("schema") == "tollgate.quota_forecast.v1"]

    async def forecast_sent() -> bool:
        return len(forecasts()) >= 1

    await wait_until(forecast_sent, 30, "the forecast event")
    [event] = forecasts()
    assert event["subject"] == ann and event["quota"] == "egress-30d"
    # Sent at the first evaluation that found a projection inside the window, with the usage
    # folded by then (the fleet's first few MB): exact for that usage.
    k = int(event["used"])
    assert (event["limit"], event["unit"]) == ("50", "MB") and k in range(1, 6)
    at_k = oracle_projection(now, lookback, k * MB, k * MB, 50 * MB)
    assert datetime.fromisoformat(event["projected_exhaustion_at"]) == at_k
    per_hour = Fraction(k) / Fraction((now - lookback) // timedelta(microseconds=1), 3600 * 10**6)
    assert abs(Fraction(str(event["rate_per_hour"])) - per_hour) <= Fraction(1, 10**6)

    # More usage at the same rate: the projection moves, but the forecast is not repeated.
    # The warning at half the quota shows the policy evaluated the new usage.
    for i in range(6, 26):
        await fleet.sample(t0 + timedelta(seconds=5 * (i - 5)), (ann, "w1", NET, i * MB))

    async def warned() -> bool:
        return any(e.get("schema") == "tollgate.quota_warning.v1" for e in inbox.events)

    await wait_until(warned, 30, "the warning at 50%")
    assert len(forecasts()) == 1
    rows = await pool.fetch(
        "SELECT reason FROM policy_decisions WHERE subject = $1 AND reason = 'forecast'", ann
    )
    assert len(rows) == 1


def money(value: Fraction) -> Decimal:
    """The oracle's cost as the API shows it: 6 places, half-even."""
    exact = Decimal(value.numerator) / Decimal(value.denominator)
    return exact.quantize(Decimal("0.000001"), rounding=ROUND_HALF_EVEN)


async def test_a_cost_quota_prices_two_metrics_and_a_price_change_exactly(
    nc: Client, pool: asyncpg.Pool, prefix: str, ledger: Any, policy_for: Any, tmp_path: Path,
) -> None:  # fmt: skip
    ann, host = unique("ann"), unique("gpu-node")
    now = datetime.now(UTC)
    change = now.replace(minute=0, second=0, microsecond=0)  # the current hour
    config = f"""
prices:
  - {{metric: {NET}, price: 0.09 USD/GB}}
  - {{metric: {GPU}, price: 2.50 USD/GPU*h}}
  - {{metric: {GPU}, price: 4.10 USD/GPU*h, labels: {{gpu_model: H100}}}}
  - {{metric: {GPU}, price: 3.70 USD/GPU*h, labels: {{gpu_model: H100}},
      effective_from: {change.isoformat()}}}
quotas:
  - {{name: budget-1d, metric: cost, limit: 40 USD, window: {{rolling: 24h}},
      enforce: [spawn]}}
"""

    def price(metric: str, model: str, hour: datetime) -> Fraction:
        if metric == NET:
            return Fraction("0.09") / GB
        if model == "H100":
            return (Fraction("3.70") if hour >= change else Fraction("4.10")) / 3600
        return Fraction("2.50") / 3600

    # History: 3 hours before the change, H100 and A10 GPU time and egress.
    spent = Fraction(0)
    by_metric: dict[str, Fraction] = {NET: Fraction(0), GPU: Fraction(0)}
    readings, values = [], {}
    for back in (3, 2, 1):
        at = change - timedelta(hours=back) + timedelta(minutes=20)
        for workload, metric, model, amount in (
            ("train", GPU, "H100", Decimal(7200)),  # 2 GPU·h
            ("infer", GPU, "A10", Decimal("1800.5")),
            ("train", NET, "", Decimal(3 * GB + 17)),
        ):
            key = SeriesKey(host, "hist", ann, workload, metric)
            values[key] = values.get(key, Decimal(0)) + amount
            labels = {"gpu_model": model} if model else {}
            readings.append(Reading(key, back * -1 + 4, values[key], at, labels=labels,
                                    stream_seq=len(readings) + 1))  # fmt: skip
            cost = Fraction(amount) * price(metric, model, at.replace(minute=0))
            spent += cost
            by_metric[metric] += cost
    async with pool.acquire() as conn:
        await apply_readings(conn, "costfc-history", readings, len(readings))
    assert money(spent) < 40

    policy = await policy_for(config)
    clock = FixedClock(now)
    api = api_for(pool, nc, tmp_path, config, clock)

    async def used() -> str:
        r = await api.get(f"/v1/subjects/{ann}/quotas")
        assert r.status_code == 200, r.text
        return str(r.json()["quotas"][0]["used"])

    assert Decimal(await used()) == money(spent)
    decision = await spawn(nc, prefix, SpawnRequest(subject=ann))
    assert decision.allowed and decision.quotas[0].used == money(spent)
    assert decision.quotas[0].unit == "USD"

    # Live, after the change: 1 H100 GPU·h (3.70) and 2 GB of egress (0.18), labelled by the
    # meter as NVML would, in one counter batch through NATS and the ledger.
    fleet = Fleet(nc, prefix, host)
    sampled = now.replace(microsecond=0)
    await fleet_sample_labelled(fleet, sampled, [
        (ann, "train-live", GPU, 0, "H100"), (ann, "train-live", NET, 0, ""),
    ])  # fmt: skip
    live = [(ann, "train-live", GPU, 3600, "H100"), (ann, "train-live", NET, 2 * GB, "")]
    await fleet_sample_labelled(fleet, sampled + timedelta(seconds=1), live)
    for _, _, metric, amount, model in live:
        cost = amount * price(metric, model, sampled.replace(minute=0, second=0))
        spent += cost
        by_metric[metric] += cost

    async def api_counted() -> bool:
        return Decimal(await used()) == money(spent)

    await wait_until(api_counted, 30, "the API to price the live usage")

    async def policy_counted() -> bool:
        d = await spawn(nc, prefix, SpawnRequest(subject=ann))
        return d.quotas[0].used == money(spent)

    await wait_until(policy_counted, 30, "the policy to fold the live usage's cost")
    assert policy.service.live.usage is not None

    # Reports: cost per subject and metric, JSON and CSV, each the oracle's to 6 places.
    span = {"from": (change - timedelta(hours=4)).isoformat(),
            "to": (change + timedelta(hours=1)).isoformat()}  # fmt: skip
    body = (await api.get("/v1/reports/usage", params=span)).json()
    mine = {r["metric"]: r for r in body["rows"] if r["subject"] == ann}
    assert body["currency"] == "USD"
    assert {m: Decimal(str(r["cost"])) for m, r in mine.items()} == {
        m: money(c) for m, c in by_metric.items()
    }
    text = (await api.get("/v1/reports/usage", params={**span, "format": "csv"})).text
    rows = [r for r in csv.DictReader(io.StringIO(text)) if r["subject"] == ann]
    assert {r["metric"]: (Decimal(r["cost"]), r["currency"]) for r in rows} == {
        m: (money(c), "USD") for m, c in by_metric.items()
    }

    # Over budget: spawns are denied in money.
    await fleet_sample_labelled(fleet, sampled + timedelta(seconds=2), [
        (ann, "train-live", GPU, 3600 * 5, "H100"), (ann, "train-live", NET, 4 * GB, ""),
    ])  # fmt: skip

    async def denied() -> bool:
        d = await spawn(nc, prefix, SpawnRequest(subject=ann))
        return not d.allowed

    await wait_until(denied, 30, "the budget to deny spawns")
    d = await spawn(nc, prefix, SpawnRequest(subject=ann))
    assert "USD (budget-1d)" in d.message and d.reason == "quota_exceeded"

    # A grant on a budget is money in the prices' currency: 100 USD lifts the denial.
    r = await api.post(
        f"/v1/subjects/{ann}/grants",
        json={"quota": "budget-1d", "amount": "25 EUR", "expires_in": "7d", "reason": "deadline"},
    )
    assert r.status_code == 422 and "in EUR but the prices are in USD" in r.text, r.text
    r = await api.post(
        f"/v1/subjects/{ann}/grants",
        json={"quota": "budget-1d", "amount": "100 USD", "expires_in": "7d", "reason": "deadline"},
    )
    assert r.status_code == 201, r.text
    assert (r.json()["amount"], r.json()["unit"]) == ("100", "USD")

    async def allowed() -> bool:
        return (await spawn(nc, prefix, SpawnRequest(subject=ann))).allowed

    await wait_until(allowed, 30, "the grant to lift the budget's denial")
    (st,) = (await spawn(nc, prefix, SpawnRequest(subject=ann))).quotas
    assert (st.limit, st.base_limit, st.granted) == (140, 40, 100)
    assert (await api.get(f"/v1/subjects/{ann}/quotas")).json()["quotas"][0]["limit"] == "140"


async def fleet_sample_labelled(
    fleet: Fleet, when: datetime, counters: list[tuple[str, str, str, int, str]]
) -> None:
    """One cumulative batch whose GPU counters carry the gpu_model label."""
    from tests.integration.conftest import batch_json

    fleet.seq += 1
    readings = [
        {"subject": s, "workload": w, "metric": m, "value": v,
         **({"labels": {"gpu_model": model}} if model else {})}
        for s, w, m, v, model in counters
    ]  # fmt: skip
    body = batch_json(fleet.host, "live", fleet.seq, readings, sampled_at=iso(when))
    await fleet.js.publish(
        f"{fleet.prefix}.v1.samples.{fleet.host}", body,
        headers={"Nats-Msg-Id": f"{fleet.host}:live:{fleet.seq}"},
    )  # fmt: skip


def test_a_policy_given_bad_prices_refuses_to_start_and_names_the_field(
    servers: TestServers, tmp_path: Path
) -> None:
    cases = {
        "0.09 USD/GX": "prices.0: '0.09 USD/GX': the unit 'GX' does not fit",
        "-0.09 USD/GB": "prices.0: '-0.09 USD/GB' is negative",
    }
    for price, says in cases.items():
        path = tmp_path / "bad.yaml"
        path.write_text(f"prices: [{{metric: {NET}, price: {price}}}]\n")
        found = _policy(servers, path)
        assert found.returncode == 2 and says in found.stderr, found.stderr
    path.write_text(
        f"prices: [{{metric: {NET}, price: 0.09 USD/GB}}, {{metric: {GPU}, price: 2 EUR/GPU*h}}]"
    )
    found = _policy(servers, path)
    assert found.returncode == 2
    assert "prices: prices are in EUR and USD; a quota file uses one currency" in found.stderr


def _policy(servers: TestServers, config: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TOLLGATE_NATS_URL": servers.nats_url,
           "TOLLGATE_DATABASE_URL": servers.database_url,
           "TOLLGATE_CONFIG": str(config)}  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "tollgate.cli", "policy"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
