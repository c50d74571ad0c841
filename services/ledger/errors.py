"""Typed errors of the ledger."""

from __future__ import annotations

from contracts.dlq import DeadLetterReason


class DeadLetter(Exception):
    """A message that can never be folded; it goes to the DLQ with this reason."""

    def __init__(self, reason: DeadLetterReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
