-- A quota query reads one subject's hourly rows per metric over its window (the API's
-- GET /v1/subjects/{s}/quotas, spawn checks, the policy's totals). The rows of one subject
-- and metric are spread over the table (rows are written hour by hour for every series),
-- so fetching `total` from the heap cost a page per row: 30 days are 720 pages per metric
-- and workload. With `total` and `events` carried in the primary key's index, the same
-- read is an index-only scan over a few adjacent leaf pages (pages autovacuum has marked
-- all-visible; the current hour's, still being updated, are read from the heap).
-- It costs the writer nothing in index entries: the ledger's upserts change `total`, and
-- they were already not HOT updates (rollup pages are full), so each one already wrote a
-- new primary-key entry; the entries are only wider. ON CONFLICT on the key columns still
-- infers this index (INCLUDE columns are not part of the key).
ALTER TABLE usage_hourly DROP CONSTRAINT usage_hourly_pkey;
ALTER TABLE usage_hourly ADD PRIMARY KEY (subject, metric, hour, workload, host, gpu_model)
    INCLUDE (total, events);
