-- The policy's records: every decision with its inputs, the commands and events it sent
-- (a transactional outbox keyed by command id, so nothing is sent twice), open episodes
-- (warnings, exceeded, spawn blocks), workloads it saw start and stop, integrator-reported
-- groups, and every quota configuration version it ran with.

CREATE TABLE policy_configs (
    version     text PRIMARY KEY,
    source      text NOT NULL,
    body        text NOT NULL,
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE policy_decisions (
    decision_id     text PRIMARY KEY,
    kind            text NOT NULL CHECK (kind IN
                        ('spawn', 'terminate', 'block', 'unblock', 'warning', 'exceeded')),
    decided_at      timestamptz NOT NULL,
    subject         text NOT NULL,
    workload        text,
    allowed         boolean,
    reason          text NOT NULL,
    message         text NOT NULL,
    quota           text,
    policy_version  text NOT NULL,
    as_of_seq       bigint NOT NULL,
    groups          text[] NOT NULL DEFAULT '{}',
    fail_open       boolean NOT NULL DEFAULT false,
    reservation     jsonb,
    inputs          jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX policy_decisions_subject ON policy_decisions (subject, decided_at DESC);
-- Reservations still held are reloaded at start.
CREATE INDEX policy_decisions_held ON policy_decisions (decided_at)
    WHERE kind = 'spawn' AND reservation IS NOT NULL;

-- Commands and events, written in the same transaction as the decision that made them,
-- published afterwards with msg_id as Nats-Msg-Id.
CREATE TABLE policy_outbox (
    msg_id        text PRIMARY KEY,
    decision_id   text NOT NULL REFERENCES policy_decisions (decision_id),
    nats_subject  text NOT NULL,
    payload       bytea NOT NULL,
    created_at    timestamptz NOT NULL,
    published_at  timestamptz
);
CREATE INDEX policy_outbox_pending ON policy_outbox (created_at) WHERE published_at IS NULL;

CREATE TABLE policy_marks (
    subject    text NOT NULL,
    quota      text NOT NULL,
    workload   text NOT NULL DEFAULT '',
    kind       text NOT NULL,
    period     text NOT NULL,
    until      timestamptz,
    opened_at  timestamptz NOT NULL,
    PRIMARY KEY (subject, quota, workload, kind)
);

CREATE TABLE policy_workloads (
    workload     text PRIMARY KEY,
    subject      text NOT NULL,
    host         text NOT NULL,
    groups       text[] NOT NULL DEFAULT '{}',
    resources    jsonb NOT NULL DEFAULT '{}'::jsonb,
    started_at   timestamptz,
    stopped_at   timestamptz,
    exit_status  integer,
    stop_reason  text
);
CREATE INDEX policy_workloads_running ON policy_workloads (subject) WHERE stopped_at IS NULL;

CREATE TABLE policy_subject_groups (
    subject     text PRIMARY KEY,
    groups      text[] NOT NULL,
    source      text NOT NULL,
    updated_at  timestamptz NOT NULL
);

-- Stream positions of the policy's own consumers (workload events), written with their effects.
CREATE TABLE policy_positions (
    consumer    text PRIMARY KEY,
    stream_seq  bigint NOT NULL,
    updated_at  timestamptz NOT NULL
);
