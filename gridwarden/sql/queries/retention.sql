-- Telemetry retention and compression (gridwarden/retention.py), from the settings
-- GRIDWARDEN_TELEMETRY_RETENTION_DAYS / _COMPRESS_AFTER_DAYS.

-- name: timescale_installed
SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb');

-- name: telemetry_policy_age
-- $1 'policy_retention' or 'policy_compression': its age for telemetry, NULL when none.
SELECT coalesce(config->>'drop_after', config->>'compress_after')::interval
FROM timescaledb_information.jobs
WHERE proc_name = $1 AND hypertable_name = 'telemetry';

-- name: telemetry_set_retention
-- $1 days. Replaces the policy (TimescaleDB has no "alter" for its age).
SELECT remove_retention_policy('telemetry', if_exists => true),
       add_retention_policy('telemetry', make_interval(days => $1::int));

-- name: telemetry_set_compression
SELECT remove_compression_policy('telemetry', if_exists => true),
       add_compression_policy('telemetry', make_interval(days => $1::int));

-- name: telemetry_prune_plain
-- Plain PostgreSQL has no retention policy: delete what is older than $1 days, at most
-- $2 rows per call (short transactions; the task calls again while it deletes a full batch).
WITH old AS (
    SELECT ctid FROM telemetry WHERE time < now() - make_interval(days => $1::int) LIMIT $2
)
DELETE FROM telemetry t USING old WHERE t.ctid = old.ctid;
