"""Unit-aware quota amounts: "50 MB", "60 GiB*h", "100 core*h", "160 GPU*h"."""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from enum import StrEnum

SIZES = {
    "B": 1,
    "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "PiB": 2**50,
}  # fmt: skip
TIMES = {"s": 1, "min": 60, "h": 3600, "d": 86400}
RESOURCES = {"core": "core", "cpu": "core", "GPU": "GPU", "gpu": "GPU"}
_AMOUNT = re.compile(
    r"^\s*(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[A-Za-z]+)?\s*(?:[*·x]\s*(?P<time>[a-z]+))?\s*$"
)


class Dimension(StrEnum):
    """What a metric measures, and so which units its quota may be written in."""

    BYTES = "bytes"
    BYTE_SECONDS = "byte_seconds"
    SECONDS = "seconds"
    COUNT = "count"


def dimension_of(metric: str) -> Dimension:
    """The dimension of a metric from its name's last part."""
    if metric.endswith(".bytes"):
        return Dimension.BYTES
    if metric.endswith(".byte_seconds"):
        return Dimension.BYTE_SECONDS
    if metric.endswith(".seconds"):
        return Dimension.SECONDS
    return Dimension.COUNT


class UnitError(ValueError):
    """An amount whose unit is unknown or does not fit the metric."""


@dataclass(frozen=True)
class Amount:
    """An amount in the metric's base unit, with the unit a person wrote it in."""

    base: Decimal
    unit: str
    factor: Decimal

    def show(self, base_value: Decimal) -> str:
        """Format a base-unit value in this amount's unit, e.g. '61.2 GiB·h'."""
        return f"{self.number(base_value)} {self.unit}"

    def number(self, base_value: Decimal) -> str:
        """The number alone, as `show` writes it: '61.2'."""
        return format_number(base_value / self.factor)

    def in_unit(self, base_value: Decimal) -> Decimal:
        return base_value / self.factor


def format_number(value: Decimal) -> str:
    """Short human number: at most one decimal below 100, none above."""
    if value >= 100:
        return f"{value:,.0f}"
    text = f"{value:,.1f}"
    return text[:-2] if text.endswith(".0") else text


def _allowed(dim: Dimension) -> str:
    return {
        Dimension.BYTES: "a size such as '50 MB', '10 GB' or '2 GiB'",
        Dimension.BYTE_SECONDS: "size times time such as '60 GiB*h' or '500 MB*s'",
        Dimension.SECONDS: "resource times time such as '100 core*h' or '160 GPU*h', or '10 h'",
        Dimension.COUNT: "a plain number",
    }[dim]


def parse_amount(text: str | int | float, metric: str) -> Amount:
    """Parse a limit for `metric`; the error says which units that metric takes."""
    dim = dimension_of(metric)
    raw = str(text)
    m = _AMOUNT.match(raw)
    if not m:
        raise UnitError(f"{raw!r} is not an amount; {metric} takes {_allowed(dim)}")
    try:
        number = Decimal(m["num"])
    except InvalidOperation:  # pragma: no cover - the regex admits only digits
        raise UnitError(f"{raw!r} is not a number") from None
    unit, time = m["unit"], m["time"]
    factor: Decimal
    shown: str
    if dim is Dimension.BYTES and unit in SIZES and time is None:
        factor, shown = Decimal(SIZES[unit]), unit
    elif dim is Dimension.BYTE_SECONDS and unit in SIZES and time in TIMES:
        factor, shown = Decimal(SIZES[unit] * TIMES[time]), f"{unit}·{time}"
    elif dim is Dimension.SECONDS and unit in RESOURCES and time in TIMES:
        factor, shown = Decimal(TIMES[time]), f"{RESOURCES[unit]}·{time}"
    elif dim is Dimension.SECONDS and unit in TIMES and time is None:
        factor, shown = Decimal(TIMES[unit]), unit
    elif dim is Dimension.COUNT and unit is None and time is None:
        factor, shown = Decimal(1), ""
    elif unit is None and time is None:
        raise UnitError(f"{raw!r} has no unit; {metric} takes {_allowed(dim)}")
    else:
        raise UnitError(f"{raw!r} does not fit {metric}, which takes {_allowed(dim)}")
    return Amount(number * factor, shown, factor)
