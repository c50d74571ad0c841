"""Logging set-up shared by every service: one line per event, to stderr."""

from __future__ import annotations

import logging
import os


def configure(level: str | None = None) -> None:
    """Plain, greppable log lines; TOLLGATE_LOG_LEVEL overrides the level."""
    logging.basicConfig(
        level=(level or os.environ.get("TOLLGATE_LOG_LEVEL", "INFO")).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # nats-py logs every reconnect attempt at ERROR; our callbacks say it once, clearly.
    logging.getLogger("nats.aio.client").setLevel(logging.CRITICAL)
