"""Durations as the quota file and the settings write them: '30d', '12h', '90min', '60s'."""

from __future__ import annotations

import re
from datetime import timedelta

_DURATION = re.compile(r"^\s*(\d+)\s*(s|m|min|h|d|w)\s*$")
_SECONDS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}

# How far a host's clock may be off before the ledger clamps where its usage is placed:
# long enough for hosts without NTP and for a meter's own batching; short enough that no
# window a quota can have (an hour, a day) is moved by a clock (README: clock skew).
DEFAULT_MAX_CLOCK_SKEW = timedelta(minutes=5)


def parse_duration(value: str | int | timedelta) -> timedelta:
    """'30d', '12h', '90min', '60s' or a number of seconds."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int):
        return timedelta(seconds=value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a duration; write e.g. '30d', '12h', '90min' or '60s'")
    return timedelta(seconds=int(m[1]) * _SECONDS[m[2]])
