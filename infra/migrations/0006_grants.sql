-- Grants: extra allowance on one quota for a subject or a group pool, until it expires.
-- Append-only like the ledger: a revocation is a new record, never an UPDATE, and each
-- record is chained by hash to the one before it (verify with `tollgate grant verify`).

CREATE TABLE quota_grants (
    seq          bigint PRIMARY KEY CHECK (seq > 0),
    kind         text NOT NULL CHECK (kind IN ('grant', 'revoke')),
    grant_id     text NOT NULL,
    scope        text NOT NULL CHECK (scope IN ('subject', 'group')),
    target       text NOT NULL,
    quota        text NOT NULL,
    actor        text NOT NULL,
    reason       text NOT NULL,
    recorded_at  timestamptz NOT NULL,
    amount       numeric(38, 6) CHECK (amount > 0),
    amount_text  text,
    expires_at   timestamptz,
    prev_hash    text NOT NULL,
    hash         text NOT NULL UNIQUE,
    CHECK ((kind = 'grant') = (amount IS NOT NULL AND expires_at IS NOT NULL))
);
-- One grant record and at most one revocation per grant id.
CREATE UNIQUE INDEX quota_grants_one_each ON quota_grants (grant_id, kind);
CREATE INDEX quota_grants_target ON quota_grants (scope, target);

CREATE TRIGGER quota_grants_append_only BEFORE UPDATE OR DELETE ON quota_grants
    FOR EACH ROW EXECUTE FUNCTION tollgate_refuse_change();
CREATE TRIGGER quota_grants_no_truncate BEFORE TRUNCATE ON quota_grants
    FOR EACH STATEMENT EXECUTE FUNCTION tollgate_refuse_change();
