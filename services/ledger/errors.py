"""Typed errors of the ledger."""

from __future__ import annotations

from contracts.dlq import DeadLetter

__all__ = ["DeadLetter"]
