"""Logging set-up shared by every service: one line per event, to stderr."""

from __future__ import annotations

import logging
import os


class _OneLine(logging.Filter):
    """asyncpg's pool logs a whole traceback each time it cannot reconnect during a Postgres
    outage; the exception's own message says all of it, on the same line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()} ({type(exc).__name__}: {exc})"
            record.args = None
            record.exc_info = record.exc_text = None
        return True


def configure(level: str | None = None) -> None:
    """Plain, greppable log lines; TOLLGATE_LOG_LEVEL overrides the level."""
    logging.basicConfig(
        level=(level or os.environ.get("TOLLGATE_LOG_LEVEL", "INFO")).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # nats-py logs every reconnect attempt at ERROR; our callbacks say it once, clearly.
    logging.getLogger("nats.aio.client").setLevel(logging.CRITICAL)
    pool_log = logging.getLogger("asyncpg.pool")
    if not any(isinstance(f, _OneLine) for f in pool_log.filters):
        pool_log.addFilter(_OneLine())
