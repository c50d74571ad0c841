-- The ledger: append-only usage events chained by hash, series high-water marks,
-- consumer positions and hourly rollups, all written in one transaction per batch.

CREATE TABLE ledger_head (
    id          smallint PRIMARY KEY CHECK (id = 1),
    last_seq    bigint NOT NULL,
    last_batch  bigint NOT NULL,
    last_hash   text   NOT NULL
);
INSERT INTO ledger_head VALUES (1, 0, 0, repeat('0', 64));

CREATE TABLE ledger_batches (
    batch_id      bigint PRIMARY KEY,
    committed_at  timestamptz NOT NULL,
    first_seq     bigint NOT NULL,
    last_seq      bigint NOT NULL,
    event_count   integer NOT NULL CHECK (event_count > 0),
    prev_hash     text NOT NULL,
    hash          text NOT NULL UNIQUE,
    consumer      text NOT NULL
);

CREATE TABLE usage_events (
    seq           bigint PRIMARY KEY,
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
    labels        jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX usage_events_subject ON usage_events (subject, window_end);
CREATE INDEX usage_events_batch ON usage_events (batch_id);

-- Append-only, enforced by the database: no UPDATE, DELETE or TRUNCATE on the record.
CREATE FUNCTION tollgate_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'table % is append-only: % is not allowed', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'usage is corrected by appending, never by rewriting history';
END $$;

CREATE TRIGGER usage_events_append_only BEFORE UPDATE OR DELETE ON usage_events
    FOR EACH ROW EXECUTE FUNCTION tollgate_refuse_change();
CREATE TRIGGER usage_events_no_truncate BEFORE TRUNCATE ON usage_events
    FOR EACH STATEMENT EXECUTE FUNCTION tollgate_refuse_change();
CREATE TRIGGER ledger_batches_append_only BEFORE UPDATE OR DELETE ON ledger_batches
    FOR EACH ROW EXECUTE FUNCTION tollgate_refuse_change();
CREATE TRIGGER ledger_batches_no_truncate BEFORE TRUNCATE ON ledger_batches
    FOR EACH STATEMENT EXECUTE FUNCTION tollgate_refuse_change();

-- Per series (host, epoch, subject, workload, metric): the high-water mark and the
-- newest sample seq folded in, so redeliveries and stale samples add exactly zero.
CREATE TABLE series (
    host             text NOT NULL,
    epoch            text NOT NULL,
    subject          text NOT NULL,
    workload         text NOT NULL,
    metric           text NOT NULL,
    high             numeric(38, 6) NOT NULL,
    last_seq         bigint NOT NULL,
    last_sampled_at  timestamptz NOT NULL,
    final            boolean NOT NULL DEFAULT false,
    updated_at       timestamptz NOT NULL,
    PRIMARY KEY (host, epoch, subject, workload, metric)
);

CREATE TABLE consumer_positions (
    consumer    text PRIMARY KEY,
    stream_seq  bigint NOT NULL,
    updated_at  timestamptz NOT NULL
);

-- Hourly rollup by when the usage happened (the sample's time), kept in the same
-- transaction as the events; every read path uses it instead of scanning events.
CREATE TABLE usage_hourly (
    subject   text NOT NULL,
    metric    text NOT NULL,
    hour      timestamptz NOT NULL,
    workload  text NOT NULL,
    host      text NOT NULL,
    total     numeric(38, 6) NOT NULL,
    events    integer NOT NULL,
    PRIMARY KEY (subject, metric, hour, workload, host)
);
CREATE INDEX usage_hourly_workload ON usage_hourly (workload);
