"""What the meter sends and what a spawn check may come back with: plain data, light to import
(the JupyterHub hooks import it at the hub's start; the FastStream link comes when used)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NoDecision:
    """A spawn check that got no usable answer, and why."""

    reason: str


@dataclass(frozen=True)
class Message:
    """One JetStream message with the id the stream deduplicates on."""

    subject: str
    payload: bytes
    msg_id: str
