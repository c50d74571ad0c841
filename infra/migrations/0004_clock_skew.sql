-- Clock skew: when JetStream stored each sample (received_at), the time its host reported
-- (sampled_at), and, when the two were further apart than TOLLGATE_MAX_CLOCK_SKEW, the
-- skew in seconds (sampled_at - received_at): the flag of a host whose clock is wrong.
-- window_end is where the ledger placed the usage (sampled_at clamped to the window
-- around received_at), so the rollups and every read path use the clamped time.
-- Events committed before this migration keep NULL in all three columns.
--
-- Adding nullable columns without a default rewrites no rows and fires no row trigger,
-- so the append-only record is untouched; the columns reach every partition.

ALTER TABLE usage_events
    ADD COLUMN received_at timestamptz,
    ADD COLUMN sampled_at timestamptz,
    ADD COLUMN clock_skew_seconds numeric(20, 6);

-- Operators look for skewed hosts: keep that cheap however long the ledger grows.
CREATE INDEX usage_events_clock_skewed ON usage_events (host, epoch)
    WHERE clock_skew_seconds IS NOT NULL;

COMMENT ON COLUMN series.last_sampled_at IS
    'where the ledger placed the last reading (sampled_at clamped, never earlier than before)';
