"""The harness's pure parts: percentiles, figures with ratios and goals, JSON and markdown."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.table import Table


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks; needs one sample or more."""
    if not samples:
        raise ValueError("no samples to take a percentile of; the measurement produced nothing")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Goal:
    """A goal on a line's value or on its ratio: at least or at most a threshold."""

    on: Literal["value", "ratio"]
    at_least: float | None = None
    at_most: float | None = None
    text: str = ""

    def met(self, line: Line) -> bool | None:
        """Whether the line meets the goal; None when the figure it needs is missing."""
        x = line.value if self.on == "value" else line.ratio
        if x is None or math.isnan(x):
            return None
        if self.at_least is not None and x < self.at_least:
            return False
        return not (self.at_most is not None and x > self.at_most)


@dataclass
class Line:
    """One reported figure: absolute value, optional ratio to a baseline, optional goal."""

    key: str
    what: str
    value: float
    unit: str
    ratio_to: str | None = None
    ratio: float | None = None
    goal: Goal | None = None
    note: str = ""

    @property
    def met(self) -> bool | None:
        return None if self.goal is None else self.goal.met(self)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["met"] = self.met
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Line:
        data = {k: v for k, v in data.items() if k != "met"}
        goal = data.pop("goal", None)
        return cls(**data, goal=Goal(**goal) if goal else None)


def ratio(value: float, baseline: float) -> float:
    """value / baseline; NaN when the baseline is zero (nothing to compare with)."""
    return value / baseline if baseline else float("nan")


@dataclass
class Report:
    """Everything one run measured, and where it ran."""

    machine: dict[str, Any]
    mode: str
    lines: list[Line] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, line: Line) -> Line:
        if any(existing.key == line.key for existing in self.lines):
            raise ValueError(f"figure {line.key!r} is reported twice")
        self.lines.append(line)
        return line

    def get(self, key: str) -> Line:
        for line in self.lines:
            if line.key == key:
                return line
        raise KeyError(f"no figure {key!r} in this report (measured: {self.keys()})")

    def keys(self) -> str:
        return ", ".join(line.key for line in self.lines) or "nothing"

    def to_json(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "mode": self.mode,
            "lines": [line.to_json() for line in self.lines],
            "notes": self.notes,
        }

    def write(self, path: Path) -> None:
        """Write the JSON atomically, so a reader never sees half a report."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n")
        tmp.replace(path)

    @classmethod
    def read(cls, path: Path) -> Report:
        try:
            data = json.loads(path.read_text())
            return cls(
                machine=data["machine"],
                mode=data["mode"],
                lines=[Line.from_json(x) for x in data["lines"]],
                notes=list(data.get("notes", [])),
            )
        except OSError as exc:
            raise SystemExit(
                f"cannot read {path}: {exc.strerror}; run `make bench` first"
            ) from None
        except (ValueError, KeyError, TypeError) as exc:
            raise SystemExit(
                f"{path} is not a bench report ({type(exc).__name__}: {exc}); "
                "run `make bench` to write a fresh one"
            ) from None


def fmt(x: float | None, unit: str = "") -> str:
    """A number the way a person reads it: thousands separated, 3 significant digits below 100."""
    if x is None or math.isnan(x):
        return "-"
    if abs(x) >= 100:
        text = f"{x:,.0f}"
    elif abs(x) >= 10:
        text = f"{x:.1f}"
    else:
        text = f"{x:.3g}" if x else "0"
    return f"{text} {unit}".strip()


def _cells(line: Line) -> list[str]:
    ratio_text = f"{fmt(line.ratio)} x {line.ratio_to}" if line.ratio_to else ""
    verdict = {True: "met", False: "NOT met", None: ""}[line.met]
    goal = line.goal.text if line.goal else ""
    return [line.key, line.what, fmt(line.value, line.unit), ratio_text, goal, verdict, line.note]


HEADERS = ("", "measurement", "value", "ratio", "goal", "", "note")


def rich_table(report: Report) -> Table:
    table = Table(*HEADERS, title=f"Tollgate bench ({report.mode} mode)")
    colours = {True: "green", False: "red", None: ""}
    for line in report.lines:
        cells = _cells(line)
        style = colours[line.met]
        if style:
            cells[5] = f"[{style}]{cells[5]}[/]"
        table.add_row(*cells)
    return table


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(report: Report) -> str:
    """The README's table: machine line, the figures, and the run's notes."""
    m = report.machine
    head = (
        f"Measured {m.get('date', '?')} on {m.get('cpu', '?')} ({m.get('cores', '?')} cores, "
        f"{m.get('ram_gib', '?')} GiB RAM), {m.get('kernel', '?')}, Python {m.get('python', '?')}, "
        f"{m.get('nats_server', 'nats-server ?')}, {m.get('postgres', '?')}, "
        f"commit {m.get('commit', '?')}, {report.mode} mode."
    )
    rows = [
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
        *("| " + " | ".join(_escape(c) for c in _cells(line)) + " |" for line in report.lines),
    ]
    notes = [f"- {_escape(n)}" for n in report.notes]
    return "\n".join([head, "", *rows, *(["", *notes] if notes else [])]) + "\n"


def latency_lines(
    key: str, what: str, seconds: Iterable[float], goal_p99_ms: float | None = None, note: str = ""
) -> tuple[Line, Line]:
    """p50 and p99 lines, in milliseconds, from latencies in seconds."""
    ms = [s * 1000 for s in seconds]
    goal = None
    if goal_p99_ms is not None:
        goal = Goal("value", at_most=goal_p99_ms, text=f"p99 <= {goal_p99_ms:g} ms")
    n = f"{len(ms):,} samples" + (f"; {note}" if note else "")
    return (
        Line(f"{key} p50", f"{what} p50", percentile(ms, 50), "ms", note=n),
        Line(f"{key} p99", f"{what} p99", percentile(ms, 99), "ms", goal=goal, note=n),
    )
