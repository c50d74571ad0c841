"""Prices of metered usage, pure: what an hour of usage costs, exactly, in one currency.

Cost is kept in exact units of 1/27 of the currency. Every unit a price can be written per
(seconds, minutes, hours, days; decimal and binary sizes) divides 27 * 2^a * 5^b, so
`price * 27 / unit` is a finite decimal, and every sum of costs is exact: no rounding
happens until a number is shown. A price applies to the hour buckets that start at or
after its `effective_from`, which must be on the hour (the rollups' grain), so a change
is never retroactive and never splits an hour.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, localcontext

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from contracts._base import METRIC_RE

from .units import Amount, UnitError, parse_amount

COST = "cost"
SCALE = Decimal(27)  # cost units per currency unit (see the module docstring)
PRICE_LABELS = frozenset({"gpu_model"})
_PRICE = re.compile(r"^\s*(?P<num>-?\d+(?:\.\d+)?)\s*(?P<cur>[A-Za-z]{3})\s*/\s*(?P<unit>.+?)\s*$")
_MONEY = re.compile(r"^\s*(?P<num>-?\d+(?:\.\d+)?)\s*(?P<cur>[A-Za-z]{3})\s*$")
_COUNT_UNITS = ("1", "each", "unit")


def _exact(value: Decimal) -> Decimal:
    with localcontext() as ctx:
        ctx.prec = 80
        return value * SCALE


def parse_price(text: str, metric: str) -> tuple[Decimal, str, Decimal]:
    """'0.09 USD/GB' for `metric` -> (price, currency, cost units per base unit)."""
    m = _PRICE.match(str(text))
    if not m:
        raise ValueError(
            f"{text!r} is not a price; write an amount, a currency and a unit of {metric}, "
            "e.g. '0.09 USD/GB' or '2.50 USD/GPU*h'"
        )
    price = Decimal(m["num"])
    if price < 0:
        raise ValueError(f"{text!r} is negative; a price is zero or more")
    unit = m["unit"]
    if unit in _COUNT_UNITS and not metric.endswith(("bytes", "seconds")):
        factor = Decimal(1)
    else:
        try:
            factor = parse_amount(f"1 {unit}", metric).factor
        except UnitError as exc:
            raise ValueError(f"{text!r}: the unit {unit!r} does not fit: {exc}") from None
    with localcontext() as ctx:
        ctx.prec = 80
        per_base = price * SCALE / factor
    return price, m["cur"].upper(), per_base


def parse_money(text: str | int, currency: str | None) -> Amount:
    """A cost limit such as '200 USD', in cost units; the currency must be the prices' one."""
    m = _MONEY.match(str(text))
    if not m:
        raise UnitError(f"{text!r} is not an amount of money; write e.g. '200 USD'")
    value, cur = Decimal(m["num"]), m["cur"].upper()
    if value < 0:
        raise UnitError(f"{text!r} is negative; a cost limit is zero or more")
    if currency is None:
        raise UnitError(
            "a metric: cost quota adds up priced usage, but the file has no prices; "
            "add prices: [{metric: ..., price: '0.09 USD/GB'}]"
        )
    if cur != currency:
        raise UnitError(f"{text!r} is in {cur} but the prices are in {currency}; use one currency")
    return Money(_exact(value), currency, SCALE)


class Money(Amount):
    """A cost limit: shown to the cent (rounded half-even), kept exactly in cost units."""

    def number(self, base_value: Decimal) -> str:
        return f"{to_money(base_value).quantize(Decimal('0.01')):,}"


class PriceRule(BaseModel):
    """One price: per metric and unit, optionally for one gpu_model, from an hour on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: str
    price: str
    labels: dict[str, str] = Field(default_factory=dict)
    effective_from: datetime | None = None
    _parsed: tuple[Decimal, str, Decimal] = PrivateAttr()

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if not METRIC_RE.match(v):
            raise ValueError(f"{v!r} is not a metric name like 'net.tx.wan.bytes'")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(v) - PRICE_LABELS)
        if unknown:
            raise ValueError(
                f"prices match only the label gpu_model (the one the rollups keep); "
                f"got {', '.join(unknown)}"
            )
        return v

    @field_validator("effective_from")
    @classmethod
    def _on_the_hour(cls, v: datetime | None) -> datetime | None:
        if v is None:
            return None
        if v.tzinfo is None:
            raise ValueError("effective_from needs a time zone, e.g. 2026-12-01T00:00:00Z")
        v = v.astimezone(UTC)
        if (v.minute, v.second, v.microsecond) != (0, 0, 0):
            raise ValueError(
                f"effective_from {v.isoformat()} is not on the hour; usage is priced per hour "
                "bucket, so a price starts at a whole hour (UTC), e.g. 2026-12-01T09:00:00Z"
            )
        return v

    @model_validator(mode="after")
    def _parse(self) -> PriceRule:
        self._parsed = parse_price(self.price, self.metric)
        return self

    @property
    def currency(self) -> str:
        return self._parsed[1]

    @property
    def per_base(self) -> Decimal:
        """Cost units per base unit of the metric."""
        return self._parsed[2]


@dataclass(frozen=True)
class Pricebook:
    """Every price, looked up per (metric, gpu_model, hour)."""

    currency: str | None
    rules: tuple[PriceRule, ...] = ()

    @classmethod
    def of(cls, rules: Sequence[PriceRule]) -> Pricebook:
        currencies = sorted({r.currency for r in rules})
        if len(currencies) > 1:
            raise ValueError(
                f"prices are in {' and '.join(currencies)}; a quota file uses one currency"
            )
        seen: dict[tuple[str, tuple[tuple[str, str], ...], datetime | None], int] = {}
        for i, r in enumerate(rules):
            key = (r.metric, tuple(sorted(r.labels.items())), r.effective_from)
            if key in seen:
                raise ValueError(
                    f"prices {seen[key]} and {i} both price {r.metric} "
                    f"{dict(key[1]) or ''} from the same time; keep one"
                )
            seen[key] = i
        return cls(currencies[0] if currencies else None, tuple(rules))

    @property
    def metrics(self) -> frozenset[str]:
        return frozenset(r.metric for r in self.rules)

    def rate(self, metric: str, labels: Mapping[str, str], hour: datetime) -> Decimal:
        """Cost units per base unit for usage of `metric` in the hour bucket `hour`.

        A price with a matching gpu_model wins over one without; among those, the latest
        whose effective_from is at or before the hour. Unpriced usage costs nothing.
        """
        best: tuple[int, datetime, Decimal] | None = None
        for r in self.rules:
            if r.metric != metric or any(labels.get(k) != v for k, v in r.labels.items()):
                continue
            since = r.effective_from or datetime.min.replace(tzinfo=UTC)
            if since > hour:
                continue
            key = (len(r.labels), since, r.per_base)
            if best is None or key[:2] > best[:2]:
                best = key
        return Decimal(0) if best is None else best[2]

    def cost(self, metric: str, gpu_model: str, hour: datetime, amount: Decimal) -> Decimal:
        """The cost of `amount` base units in cost units (exact)."""
        per = self.rate(metric, {"gpu_model": gpu_model} if gpu_model else {}, hour)
        if not per:
            return Decimal(0)
        with localcontext() as ctx:
            ctx.prec = 80
            return amount * per


def to_money(cost_units: Decimal) -> Decimal:
    """Cost units in the currency, to 6 decimal places (rounded half-even: display only)."""
    with localcontext() as ctx:
        ctx.prec = 80
        return (cost_units / SCALE).quantize(Decimal("0.000001"))
