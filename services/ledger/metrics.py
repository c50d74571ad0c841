"""The ledger's Prometheus metrics: what it took in, appended, reset and refused."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MESSAGES = Counter("tollgate_ledger_messages", "Sample messages fetched from JetStream")
EVENTS = Counter("tollgate_ledger_events", "Usage events appended to the ledger")
POINTS = Counter("tollgate_ledger_points", "Counter readings (series points) folded")
RESETS = Counter(
    "tollgate_ledger_resets", "Counters that went backwards within an epoch (counted from zero)"
)
DEAD_LETTERS = Counter(
    "tollgate_ledger_dead_letters", "Messages sent to the dead-letter stream", ["reason"]
)
COMMIT_RETRIES = Counter(
    "tollgate_ledger_commit_retries", "Batch commits retried after a transient fault"
)
COMMIT_SECONDS = Histogram(
    "tollgate_ledger_commit_seconds",
    "Time to fold and commit one fetched batch",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
FEED_PUBLISHED = Counter("tollgate_feed_published", "Usage events published to the usage feed")
LAST_COMMIT = Gauge("tollgate_ledger_last_commit_timestamp", "Unix time of the last commit")
CLOCK_SKEWED = Counter(
    "tollgate_ledger_clock_skewed_samples",
    "Sample messages whose sampled_at lay beyond TOLLGATE_MAX_CLOCK_SKEW of when JetStream "
    "stored them (their usage is counted at the clamped time)",
)
CLOCK_SKEW_MAX = Gauge(
    "tollgate_ledger_clock_skew_max_seconds",
    "Largest |sampled_at - received_at| of a skewed sample since the ledger started",
)
PLANNED_AHEAD = Counter(
    "tollgate_ledger_planned_ahead_commits",
    "Commits by whether the batch was planned ahead from remembered series states (yes) or "
    "had to be folded again under the ledger head lock (no: another writer committed)",
    ["as_planned"],
)
