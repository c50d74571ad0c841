-- usage_events partitioned by month of recorded_at (the ledger's commit time, which grows
-- with seq), append-only on the parent and on every partition; and the usage feed's
-- position, so the feed is published from the events table as a transactional outbox.

ALTER TABLE usage_events RENAME TO usage_events_unpartitioned;
ALTER INDEX usage_events_subject RENAME TO usage_events_unpartitioned_subject;
ALTER INDEX usage_events_batch RENAME TO usage_events_unpartitioned_batch;

CREATE TABLE usage_events (
    seq           bigint NOT NULL,
    batch_id      bigint NOT NULL REFERENCES ledger_batches (batch_id),
    recorded_at   timestamptz NOT NULL,
    host          text NOT NULL,
    epoch         text NOT NULL,
    subject       text NOT NULL,
    workload      text NOT NULL,
    metric        text NOT NULL,
    delta         numeric(38, 6) NOT NULL CHECK (delta >= 0),
    window_start  timestamptz,
    window_end    timestamptz NOT NULL,
    sample_seq    bigint NOT NULL,
    stream_seq    bigint NOT NULL,
    reset         boolean NOT NULL DEFAULT false,
    labels        jsonb NOT NULL DEFAULT '{}'::jsonb,
    PRIMARY KEY (seq, recorded_at)
) PARTITION BY RANGE (recorded_at);
CREATE INDEX usage_events_subject ON usage_events (subject, window_end);
CREATE INDEX usage_events_batch ON usage_events (batch_id);

-- Row triggers on the parent are cloned onto every partition; TRUNCATE triggers are not,
-- so each partition gets its own (tollgate_usage_partition below).
CREATE TRIGGER usage_events_append_only BEFORE UPDATE OR DELETE ON usage_events
    FOR EACH ROW EXECUTE FUNCTION tollgate_refuse_change();
CREATE TRIGGER usage_events_no_truncate BEFORE TRUNCATE ON usage_events
    FOR EACH STATEMENT EXECUTE FUNCTION tollgate_refuse_change();

CREATE FUNCTION tollgate_usage_partition(at timestamptz) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    first timestamptz := date_trunc('month', at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    name text := 'usage_events_' || to_char(first AT TIME ZONE 'UTC', 'YYYY_MM');
BEGIN
    IF to_regclass(name) IS NULL THEN
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF usage_events FOR VALUES FROM (%L) TO (%L)',
            name, first, first + interval '1 month');
        EXECUTE format(
            'CREATE TRIGGER %I BEFORE TRUNCATE ON %I FOR EACH STATEMENT '
            'EXECUTE FUNCTION tollgate_refuse_change()', name || '_no_truncate', name);
    END IF;
    RETURN name;
END $$;

-- A last resort so an insert never fails for want of a partition; the ledger creates
-- this month's and next month's partitions ahead of time.
CREATE TABLE usage_events_default PARTITION OF usage_events DEFAULT;
CREATE TRIGGER usage_events_default_no_truncate BEFORE TRUNCATE ON usage_events_default
    FOR EACH STATEMENT EXECUTE FUNCTION tollgate_refuse_change();

SELECT tollgate_usage_partition(m)
FROM (SELECT DISTINCT date_trunc('month', recorded_at) AS m FROM usage_events_unpartitioned
      UNION SELECT now() UNION SELECT now() + interval '1 month') months;
INSERT INTO usage_events SELECT * FROM usage_events_unpartitioned;
DROP TABLE usage_events_unpartitioned;

CREATE TABLE feed_positions (
    feed        text PRIMARY KEY,
    seq         bigint NOT NULL,
    updated_at  timestamptz NOT NULL
);

-- Privileges: a role that may read and append to the record but never change it.
-- Deployments log the services in as a member of it (GRANT tollgate_writer TO ledger_login);
-- owners and superusers are still stopped by the triggers above.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'tollgate_writer') THEN
        CREATE ROLE tollgate_writer NOLOGIN;
    END IF;
EXCEPTION
    WHEN duplicate_object OR unique_violation THEN NULL;  -- created concurrently
    WHEN insufficient_privilege THEN
        RAISE NOTICE 'no CREATEROLE: skipping role tollgate_writer; the triggers still hold';
END $$;
REVOKE UPDATE, DELETE, TRUNCATE ON usage_events, ledger_batches FROM PUBLIC;
DO $$
BEGIN
    IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'tollgate_writer') THEN
        GRANT SELECT, INSERT ON usage_events, ledger_batches TO tollgate_writer;
        GRANT SELECT, INSERT, UPDATE ON ledger_head, series, consumer_positions,
            usage_hourly, feed_positions TO tollgate_writer;
    END IF;
END $$;
