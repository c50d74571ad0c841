"""Prices: parsed exactly, applied from their hour on, matched by gpu_model, refused when
they cannot mean anything; cost folded by the policy exactly as an oracle in fractions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.policy.config import ConfigError, parse_config
from services.policy.prices import COST, SCALE, to_money
from services.policy.usage import UsageEvent, UsageState

CHANGE = datetime(2026, 12, 1, 12, tzinfo=UTC)
PRICES = f"""
prices:
  - {{metric: net.tx.wan.bytes, price: 0.09 USD/GB}}
  - {{metric: gpu.alloc.seconds, price: 2.50 USD/GPU*h}}
  - {{metric: gpu.alloc.seconds, price: 4.10 USD/GPU*h, labels: {{gpu_model: H100}}}}
  - {{metric: gpu.alloc.seconds, price: 3.70 USD/GPU*h, labels: {{gpu_model: H100}},
      effective_from: {CHANGE.isoformat()}}}
quotas:
  - {{name: budget, metric: cost, limit: 200 USD, window: {{calendar: month}}}}
"""
# The oracle: USD per base unit, as fractions.
GB, GPU_H = Fraction(10**9), Fraction(3600)


def oracle(metric: str, gpu_model: str, hour: datetime) -> Fraction:
    if metric == "net.tx.wan.bytes":
        return Fraction("0.09") / GB
    if metric != "gpu.alloc.seconds":
        return Fraction(0)
    if gpu_model == "H100":
        return (Fraction("3.70") if hour >= CHANGE else Fraction("4.10")) / GPU_H
    return Fraction("2.50") / GPU_H


def test_a_cost_limit_is_kept_exactly_in_the_prices_currency() -> None:
    config = parse_config(PRICES)
    assert config.pricebook.currency == "USD"
    q = config.quotas[0]
    assert q.amount.base == 200 * SCALE and q.amount.unit == "USD"


def test_a_gpu_model_price_wins_and_a_change_applies_from_its_hour_only() -> None:
    book = parse_config(PRICES).pricebook
    before, after = CHANGE - timedelta(hours=1), CHANGE
    hour = Decimal(3600)
    assert to_money(book.cost("gpu.alloc.seconds", "H100", before, hour)) == Decimal("4.10")
    assert to_money(book.cost("gpu.alloc.seconds", "H100", after, hour)) == Decimal("3.70")
    assert to_money(book.cost("gpu.alloc.seconds", "A10", after, hour)) == Decimal("2.50")
    assert to_money(book.cost("gpu.alloc.seconds", "", after, hour)) == Decimal("2.50")
    assert book.cost("log.bytes", "", after, Decimal(10**9)) == 0


events = st.lists(
    st.tuples(
        st.sampled_from(["net.tx.wan.bytes", "gpu.alloc.seconds", "log.bytes"]),
        st.sampled_from(["", "H100", "A10"]),
        st.integers(min_value=-6, max_value=6),
        st.integers(min_value=0, max_value=10**12),
    ),
    max_size=40,
)


@given(events)
def test_folded_cost_equals_the_fraction_oracle_exactly(
    found: list[tuple[str, str, int, int]],
) -> None:
    config = parse_config(PRICES)
    state = UsageState(pricebook=config.pricebook)
    expected = Fraction(0)
    for seq, (metric, model, hours, amount) in enumerate(found, start=1):
        at = CHANGE + timedelta(hours=hours, minutes=17)
        state.apply(UsageEvent(seq, "ann", "w", "h", metric, Decimal(amount), at, model))
        hour = at.replace(minute=0)
        expected += amount * oracle(metric, model, hour)
    got = state.subject_usage("ann", COST).total()
    assert Fraction(got) / Fraction(SCALE) == expected


@pytest.mark.parametrize(
    ("prices", "says"),
    [
        ("[{metric: net.tx.wan.bytes, price: 0.09 USD/GX}]", "the unit 'GX' does not fit"),
        ("[{metric: net.tx.wan.bytes, price: 0.09 USD/GPU*h}]", "does not fit"),
        (
            "[{metric: net.tx.wan.bytes, price: 0.09 USD/GB},"
            " {metric: log.bytes, price: 1 EUR/GB}]",
            "prices are in EUR and USD; a quota file uses one currency",
        ),
        ("[{metric: net.tx.wan.bytes, price: -0.09 USD/GB}]", "is negative"),
        ("[{metric: net.tx.wan.bytes, price: 9 cents}]", "is not a price"),
        (
            "[{metric: net.tx.wan.bytes, price: 1 USD/GB, effective_from: 2026-12-01T10:30:00Z}]",
            "is not on the hour",
        ),
        (
            "[{metric: gpu.alloc.seconds, price: 1 USD/GPU*h, labels: {team: a}}]",
            "only the label gpu_model",
        ),
    ],
)
def test_bad_prices_are_refused_with_the_field_and_the_reason(prices: str, says: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(f"prices: {prices}")
    assert "  prices" in str(exc.value) and says in str(exc.value)


def test_a_cost_quota_needs_prices_in_its_currency() -> None:
    with pytest.raises(ConfigError, match="has no prices"):
        parse_config("quotas: [{name: b, metric: cost, limit: 5 USD, window: {lifetime: true}}]")
    with pytest.raises(ConfigError, match="is in EUR but the prices are in USD"):
        parse_config(
            "prices: [{metric: log.bytes, price: 1 USD/GB}]\n"
            "quotas: [{name: b, metric: cost, limit: 5 EUR, window: {lifetime: true}}]"
        )
