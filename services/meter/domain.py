"""Pure bookkeeping of `tollgate run`: sizes, exit codes, exact amounts, cumulative batches."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from typing import Final

from contracts.workloads import Resources

# Exit codes of `tollgate run` itself; any other status is the command's own.
EXIT_NO_SERVERS: Final = 2  # no NATS URL known: nothing was run
EXIT_DENIED: Final = 3  # the spawn check said no: nothing was run
EXIT_UNCHECKED: Final = 4  # --fail-closed and no spawn decision arrived: nothing was run
EXIT_NO_NETNS: Final = 5  # --netns and the namespace could not be made: nothing was run

MICRO: Final = Decimal("0.000001")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")
_UNITS: Final = {
    "": 1,
    "b": 1,
    **{f"{p}b": 1000 ** (i + 1) for i, p in enumerate("kmgtp")},
    **{f"{p}ib": 1024 ** (i + 1) for i, p in enumerate("kmgtp")},
    **{f"{p}i": 1024 ** (i + 1) for i, p in enumerate("kmgtp")},
}


def parse_size(text: str) -> int:
    """Bytes in "4GiB", "512MB", "1.5 Gi" or "1048576"; KB/MB/GB are 1000s, KiB/MiB/GiB 1024s."""
    found = _SIZE.match(text)
    if found is None:
        raise ValueError(f"{text!r} is not a size: write a number and a unit, like 4GiB or 512MB")
    number, unit = Decimal(found[1]), found[2].lower()
    if unit in ("k", "m", "g", "t", "p"):
        raise ValueError(
            f"{text!r} is ambiguous: write {found[1]}{unit.upper()}iB (powers of 1024) "
            f"or {found[1]}{unit.upper()}B (powers of 1000)"
        )
    if unit not in _UNITS:
        raise ValueError(f"{text!r} has an unknown unit {found[2]!r}: use B, KB, MB, GB, KiB...")
    size = number * _UNITS[unit]
    if size != size.to_integral_value():
        raise ValueError(f"{text!r} is not a whole number of bytes ({size})")
    return int(size)


def exit_status(returncode: int) -> int:
    """The shell's convention: a command killed by signal N exits with 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def new_epoch() -> str:
    """A fresh epoch: this run's counters start from zero."""
    return uuid.uuid4().hex[:12]


def new_workload_id() -> str:
    """A workload id for a run that was not given one."""
    return f"run-{uuid.uuid4().hex[:12]}"


def exact(value: float | int | Decimal) -> Decimal:
    """A reading as an amount the ledger takes: six fractional digits, rounded down.

    Rounding down keeps cumulative values monotonic and never bills a fraction not used.
    """
    number = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    return number.quantize(MICRO, rounding=ROUND_DOWN)


@dataclass(frozen=True)
class Reading:
    """What the meter saw at one instant, `at` seconds after the workload started."""

    at: float
    log_bytes: int
    cpu_seconds: Decimal | None = None
    mem_bytes: int | None = None


@dataclass
class UsageAccount:
    """Turns readings into the cumulative counters of one workload, never decreasing.

    A cumulative value that dropped would read as a counter reset in the ledger and be
    counted again from zero, so every metric is held at its high-water mark here.
    """

    resources: Resources = field(default_factory=Resources)
    _high: dict[str, Decimal] = field(default_factory=dict)
    _mem_integral: Decimal = Decimal(0)
    _last_mem: tuple[float, int] | None = None

    def update(self, reading: Reading) -> dict[str, Decimal]:
        """The counters as of `reading`, by metric name."""
        elapsed = Decimal(repr(max(reading.at, 0.0)))
        values: dict[str, Decimal] = {"log.bytes": Decimal(reading.log_bytes)}
        if reading.cpu_seconds is not None:
            values["cpu.used.seconds"] = exact(reading.cpu_seconds)
        if reading.mem_bytes is not None:
            values["mem.used.byte_seconds"] = exact(self._integrate(reading.at, reading.mem_bytes))
        values.update(allocations(self.resources, elapsed))
        for metric, value in values.items():
            self._high[metric] = max(value, self._high.get(metric, value))
        return dict(self._high)

    def _integrate(self, at: float, mem_bytes: int) -> Decimal:
        # Trapezoids between readings: memory is sampled, so this is the best estimate.
        if self._last_mem is not None and at > self._last_mem[0]:
            then, before = self._last_mem
            self._mem_integral += Decimal(before + mem_bytes) / 2 * Decimal(repr(at - then))
        self._last_mem = (at, mem_bytes)
        return self._mem_integral


def allocations(resources: Resources, elapsed: Decimal) -> dict[str, Decimal]:
    """What was allocated for `elapsed` seconds, by metric (only what was allocated at all)."""
    per_second = {
        "cpu.alloc.seconds": resources.cpus,
        "mem.alloc.byte_seconds": Decimal(resources.mem_bytes),
        "gpu.alloc.seconds": Decimal(resources.gpus),
    }
    return {m: exact(n * max(elapsed, Decimal(0))) for m, n in per_second.items() if n > 0}


@dataclass
class Integral:
    """A sampled level (bytes, busy GPUs) integrated over time by trapezoids; resumable.

    A gap between two samples (the meter was down) is bridged by the straight line between
    them: the best estimate there is, and never a reason to lose the rest.
    """

    total: Decimal = Decimal(0)
    last: tuple[float, Decimal] | None = None

    def add(self, at: float, level: Decimal) -> Decimal:
        """Take a sample of `level` at time `at` (seconds); return the integral so far."""
        if self.last is not None and at > self.last[0]:
            then, before = self.last
            self.total += (before + level) / 2 * Decimal(repr(at - then))
        if self.last is None or at >= self.last[0]:
            self.last = (at, level)
        return exact(self.total)

    def to_json(self) -> list[str]:
        if self.last is None:
            return [str(self.total)]
        return [str(self.total), repr(self.last[0]), str(self.last[1])]

    @classmethod
    def from_json(cls, data: list[str] | None) -> Integral:
        if not data:
            return cls()
        last = (float(data[1]), Decimal(data[2])) if len(data) == 3 else None
        return cls(Decimal(data[0]), last)


@dataclass
class LogQuota:
    """dstack's per-workload hourly log quota, enforced where the log is made.

    At most `limit` visible bytes in each hour counted from the workload's start (hour 0 is
    its first hour); 0 disables it.
    """

    limit: int
    hour: int = 0
    used: int = 0
    _start: int = 0

    def over(self, elapsed: float, before: int, after: int) -> bool:
        """Log output went from `before` to `after` bytes at `elapsed` s: is this hour over?"""
        if self.limit <= 0:
            return False
        hour = int(elapsed // 3600)
        if hour != self.hour:
            self.hour, self._start = hour, before
        self.used = after - self._start
        return self.used > self.limit
