-- Prices may depend on the GPU model (a sample's `gpu_model` label), and every read of
-- usage goes through the hourly rollup, so the rollup keeps that label apart.
-- Rows written before this migration carry no model ('').
ALTER TABLE usage_hourly ADD COLUMN gpu_model text NOT NULL DEFAULT '';
ALTER TABLE usage_hourly DROP CONSTRAINT usage_hourly_pkey;
ALTER TABLE usage_hourly ADD PRIMARY KEY (subject, metric, hour, workload, host, gpu_model);
