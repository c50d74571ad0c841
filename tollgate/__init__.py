"""Tollgate: meter usage on shared compute, keep an auditable ledger, enforce quotas."""

__version__ = "0.1.0"
