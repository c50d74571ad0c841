"""Amounts as people read them: a unit that suits the size, and a name for each metric."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from services.policy.units import Dimension, dimension_of, format_number

BASE_UNITS = {Dimension.BYTES: "B", Dimension.BYTE_SECONDS: "byte·s", Dimension.SECONDS: "s"}
_SIZES = (("PB", 10**15), ("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3))
_BINARY = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
_TIMES = (("h", 3600), ("min", 60))
TITLES = {
    "net.tx.wan.bytes": "Network out (internet)",
    "net.rx.wan.bytes": "Network in (internet)",
    "net.tx.lan.bytes": "Network out (local)",
    "net.rx.lan.bytes": "Network in (local)",
    "log.bytes": "Log output",
    "cpu.used.seconds": "CPU used",
    "cpu.alloc.seconds": "CPU allocated",
    "mem.used.byte_seconds": "Memory used",
    "mem.alloc.byte_seconds": "Memory allocated",
    "gpu.used.seconds": "GPU used",
    "gpu.alloc.seconds": "GPU allocated",
}


@dataclass(frozen=True)
class DisplayUnit:
    """A unit to show a metric in: base-unit values are divided by `factor`."""

    name: str
    factor: Decimal

    def show(self, base_value: Decimal) -> str:
        text = format_number(base_value / self.factor)
        return f"{text} {self.name}" if self.name else text


def unit_of(metric: str) -> str:
    """The base unit the ledger counts `metric` in: B, byte·s, s, or '' for counts."""
    return BASE_UNITS.get(dimension_of(metric), "")


def title_of(metric: str) -> str:
    return TITLES.get(metric, metric)


def _pick(options: tuple[tuple[str, int], ...], largest: Decimal, fallback: str) -> tuple[str, int]:
    for name, factor in options:
        if largest >= factor:
            return name, factor
    return fallback, 1


def display_unit(metric: str, largest: Decimal) -> DisplayUnit:
    """The unit in which `largest` (a base-unit value of `metric`) reads best."""
    largest = abs(largest)
    dim = dimension_of(metric)
    if dim is Dimension.BYTES:
        name, factor = _pick(_SIZES, largest, "B")
        return DisplayUnit(name, Decimal(factor))
    if dim is Dimension.SECONDS:
        resource = {"cpu": "core", "gpu": "GPU"}.get(metric.split(".", 1)[0])
        name, factor = _pick(_TIMES, largest, "s")
        return DisplayUnit(f"{resource}·{name}" if resource else name, Decimal(factor))
    if dim is Dimension.BYTE_SECONDS:
        hours = largest / 3600
        name, factor = _pick(_BINARY, hours, "B")
        return DisplayUnit(f"{name}·h", Decimal(factor * 3600))
    return DisplayUnit("", Decimal(1))


def human(metric: str, value: Decimal) -> str:
    """One amount of `metric` in the unit that suits it: '12.3 GB', '4.5 GiB·h'."""
    return display_unit(metric, value).show(value)


def disobeying(ignored: int, host: str, until: datetime | None) -> str:
    """The sentence for a workload that outlives its terminate commands (API and page)."""
    plural = "s" if ignored != 1 else ""
    text = f"still running after {ignored} terminate command{plural} on host {host}"
    if until is not None:
        text += f" (usage sampled up to {until:%Y-%m-%d %H:%M:%S} UTC)"
    return text
