"""The policy's Prometheus metrics (served by the API under `tollgate up`, or on
TOLLGATE_METRICS_PORT when the policy runs alone)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SPAWN_CHECKS = Counter(
    "tollgate_policy_spawn_checks", "Spawn checks answered, by outcome", ["outcome"]
)
FAIL_OPEN = Counter(
    "tollgate_policy_fail_open",
    "Spawn checks answered by failure_mode while usage was unavailable or stale",
    ["mode"],
)
SPAWN_SECONDS = Histogram(
    "tollgate_policy_spawn_check_seconds",
    "Time from a spawn check's arrival to its reply being sent",
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
SENT = Counter("tollgate_policy_sent", "Commands and events published, by kind", ["kind"])
USAGE_EVENTS = Counter("tollgate_policy_usage_events", "Usage events folded into the live state")
CATCHUP_EVENTS = Counter(
    "tollgate_policy_catchup_events", "Usage events read from the ledger because the feed lagged"
)
FEED_GAPS = Counter(
    "tollgate_policy_feed_gaps", "Gaps found in the usage feed (filled from the ledger)"
)
DECISIONS_STORED = Counter(
    "tollgate_policy_decisions_stored", "Spawn decisions written to Postgres"
)
STORE_FAILURES = Counter(
    "tollgate_policy_decision_store_failures", "Attempts to store spawn decisions that failed"
)
LAG = Gauge("tollgate_policy_usage_lag_events", "Ledger events not yet in the policy's state")
STALENESS = Gauge(
    "tollgate_policy_usage_staleness_seconds",
    "Seconds since the state was last known to hold everything the ledger had",
)
REISSUED = Counter(
    "tollgate_policy_terminate_reissued",
    "Terminate commands sent again because the workload's usage kept coming, by host",
    ["host"],
)
DISOBEYING = Gauge(
    "tollgate_policy_disobeying_workloads",
    "Workloads still sending usage after their last terminate command (and its grace)",
)
