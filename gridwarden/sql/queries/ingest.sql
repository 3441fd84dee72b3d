-- name: claim_sequences
-- Claim (device_id, seq) pairs; returns the ones that are new, or whose previous
-- sighting is older than the dedup window (counters wrap). Duplicates return nothing.
INSERT INTO telemetry_dedup AS d (device_id, seq, received_at)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::timestamptz[])
ON CONFLICT (device_id, seq) DO UPDATE SET received_at = EXCLUDED.received_at
    WHERE d.received_at < EXCLUDED.received_at - make_interval(secs => $4::float8)
RETURNING device_id, seq;

-- name: insert_events
-- A small batch's events in one statement (two round trips fewer than COPY).
INSERT INTO device_events (time, device_id, seq, received_at, event, credential_hash, data)
SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::bigint[], $4::timestamptz[],
                     $5::text[], $6::text[], $7::jsonb[]);

-- name: flush_last_seen
-- Devices are never deleted by gridwarden itself, so the usual flush skips the join on
-- devices (with stale statistics right after an import the planner hashed all 100,000
-- devices for every chunk: two thirds of the statement's time). A device deleted
-- by hand since it was heard fails the foreign key; then the chunk is written again
-- without it (registered_of).
INSERT INTO device_last_seen AS s (device_id, last_seen, last_seq, status, status_at)
SELECT * FROM unnest($1::text[], $2::timestamptz[], $3::bigint[], $4::text[], $5::timestamptz[])
ON CONFLICT (device_id) DO UPDATE SET
    last_seen = GREATEST(s.last_seen, EXCLUDED.last_seen),
    last_seq = CASE WHEN EXCLUDED.last_seen >= s.last_seen THEN COALESCE(EXCLUDED.last_seq, s.last_seq)
                    ELSE s.last_seq END,
    status = CASE WHEN EXCLUDED.status_at IS NOT NULL
                   AND (s.status_at IS NULL OR EXCLUDED.status_at >= s.status_at)
                  THEN EXCLUDED.status ELSE s.status END,
    status_at = GREATEST(s.status_at, EXCLUDED.status_at);

-- name: registered_of
-- Which of the device ids $1 are registered.
SELECT id FROM devices WHERE id = ANY($1::text[]);

-- name: prune_dedup
DELETE FROM telemetry_dedup WHERE received_at < now() - make_interval(secs => $1::float8);

-- name: devices_changed_summary
-- What devices_changed_since would return, in one row: unchanged means nothing to load
-- (right after an import of 100,000 devices the minute of overlap would otherwise
-- reload all of them every refresh).
SELECT count(*) AS n, max(updated_at) AS latest
FROM devices WHERE updated_at > $1::timestamptz - INTERVAL '1 minute';

-- name: devices_changed_since
-- One page of them, after the page that ended at ($2, $3) (NULL: the first page), in
-- (updated_at, id) order: a device changed again meanwhile moves to a later page. The
-- minute of overlap catches rows of an import transaction that started before the
-- previous refresh but committed after it.
SELECT id, kind, cell_id, height_cm, interval_s, building, updated_at
FROM devices
WHERE updated_at > $1::timestamptz - INTERVAL '1 minute'
  AND ($2::timestamptz IS NULL OR (updated_at, id) > ($2::timestamptz, $3::text))
ORDER BY updated_at, id
LIMIT $4;

-- name: list_dead_letters
SELECT id, received_at, topic, device_id, reason, detail, payload
FROM dead_letters
WHERE ($1::text IS NULL OR reason = $1) AND ($2::text IS NULL OR device_id = $2)
  AND ($3::bigint IS NULL OR id < $3)
ORDER BY id DESC
LIMIT $4;
