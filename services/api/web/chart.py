"""Usage over time as an SVG bar chart, drawn on the server (no script, no library)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from html import escape

from services.policy.units import format_number

from ..humanize import display_unit

WIDTH, HEIGHT = 500, 200
LEFT, RIGHT, TOP, BOTTOM = 40, 6, 10, 26
X_LABELS = 6
INTERVALS = 4  # about this many gridline intervals


@dataclass(frozen=True)
class Bucket:
    start: datetime
    total: Decimal


def nice_step(value: Decimal) -> Decimal:
    """The smallest 1, 2, 2.5 or 5 times a power of ten that is >= value (> 0)."""
    if value <= 0:
        return Decimal(1)
    exponent = value.adjusted()
    for m in (1, 2, Decimal("2.5"), 5, 10):
        candidate = Decimal(m).scaleb(exponent)
        if candidate >= value:
            return candidate
    return Decimal(10).scaleb(exponent)  # pragma: no cover - 10 * 10^e always is


def axis(peak: Decimal) -> tuple[Decimal, int]:
    """The axis top and its number of gridline intervals, on round numbers."""
    if peak <= 0:
        return Decimal(1), INTERVALS
    step = nice_step(peak / INTERVALS)
    count = math.ceil(peak / step)
    return step * count, count


def _label(at: datetime, step: timedelta) -> str:
    if step < timedelta(days=1):
        return f"{at:%d %b %H:%M}" if at.hour == 0 or step > timedelta(hours=1) else f"{at:%H:%M}"
    return f"{at:%d %b}"


def bar_chart(metric: str, buckets: Sequence[Bucket], step: timedelta, title: str) -> str:
    """An accessible SVG: bars per bucket; the y axis counts in `display_unit(metric, peak)`."""
    peak = max((b.total for b in buckets), default=Decimal(0))
    unit = display_unit(metric, peak)
    top, intervals = axis(peak / unit.factor)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(title)}" data-metric="{escape(metric)}">'
    ]
    parts += _grid(top, intervals, plot_w, plot_h)
    n = max(len(buckets), 1)
    slot = plot_w / n
    gap = min(2.0, slot * 0.2)
    for i, b in enumerate(buckets):
        value = b.total / unit.factor
        h = float(value / top) * plot_h if top else 0.0
        x = LEFT + i * slot + gap / 2
        y = TOP + plot_h - h
        shown = unit.show(b.total)
        parts.append(
            f'<rect class="bar" x="{x:.2f}" y="{y:.2f}" width="{max(slot - gap, 0.5):.2f}" '
            f'height="{h:.2f}" rx="{min(2.0, (slot - gap) / 3):.2f}" data-total="{b.total}">'
            f"<title>{escape(_label(b.start, step))}: {escape(shown)}</title></rect>"
        )
    every = max(1, round(n / X_LABELS))
    for i in range(0, len(buckets), every):
        x = LEFT + i * slot + slot / 2
        parts.append(
            f'<text class="x" x="{x:.1f}" y="{HEIGHT - 8}" text-anchor="middle">'
            f"{escape(_label(buckets[i].start, step))}</text>"
        )
    if peak == 0:
        parts.append(
            f'<text class="empty" x="{LEFT + plot_w / 2:.1f}" y="{TOP + plot_h / 2:.1f}" '
            'text-anchor="middle">No usage in this period</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _grid(top: Decimal, intervals: int, plot_w: float, plot_h: float) -> list[str]:
    out = []
    for k in range(intervals + 1):
        value = top * k / intervals
        y = TOP + plot_h - plot_h * k / intervals
        out.append(
            f'<line class="grid{" base" if k == 0 else ""}" x1="{LEFT}" x2="{LEFT + plot_w}" '
            f'y1="{y:.1f}" y2="{y:.1f}"/>'
        )
        label = format_number(value) if value >= 100 else format(value.normalize(), "f")
        out.append(
            f'<text class="y" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{escape(label)}</text>"
        )
    return out
