-- Alarms API, alarm feed and outbox publisher (alerting/).

-- name: announce_alarms
-- Alarm changes in order: $1 alarm ids; $2 outbox topics and $3 payloads, both NULL for
-- a change that is not published (a count repeat). Notifications are sent on commit.
WITH v AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[]) WITH ORDINALITY
        AS v (id, topic, payload, n)
), queued AS (
    INSERT INTO outbox (topic, payload)
    SELECT topic, payload::jsonb FROM v WHERE payload IS NOT NULL ORDER BY n
    RETURNING id
)
SELECT (SELECT count(pg_notify('gw_alarm', id::text)) FROM (SELECT id FROM v ORDER BY n) o),
       (SELECT count(pg_notify('gw_outbox', '')) FROM (SELECT 1 FROM queued LIMIT 1) q);

-- name: list_alarms
-- $1 states, $2 severities (NULL: any), $3 a cell and everything below it, $4 device,
-- $5 cursor (ids below it), $6 limit. Newest first.
WITH RECURSIVE scope AS (
    SELECT id FROM cells WHERE id = $3::text
    UNION ALL
    SELECT c.id FROM cells c JOIN scope s ON c.parent_id = s.id
)
SELECT id, device_id, kind, rule, severity, state, cell_id, first_seen, last_seen, count,
       cleared_at, case_id
FROM alarms
WHERE ($1::text[] IS NULL OR state = ANY($1::text[]))
  AND ($2::text[] IS NULL OR severity = ANY($2::text[]))
  AND ($3::text IS NULL OR cell_id = $3::text OR cell_id IN (SELECT id FROM scope))
  AND ($4::text IS NULL OR device_id = $4::text)
  AND ($5::bigint IS NULL OR id < $5::bigint)
ORDER BY id DESC
LIMIT $6;

-- name: cell_scope
-- A cell and every cell below it.
WITH RECURSIVE scope AS (
    SELECT id FROM cells WHERE id = $1
    UNION ALL
    SELECT c.id FROM cells c JOIN scope s ON c.parent_id = s.id
)
SELECT id FROM scope;

-- name: alarm_for_update
SELECT id, state FROM alarms WHERE id = $1 FOR UPDATE;

-- name: acknowledge_alarm
UPDATE alarms
SET state = 'acknowledged', acked_at = now(), acked_by = $2, updated_at = now()
WHERE id = $1
RETURNING id, device_id, kind, rule, severity, state, cell_id, first_seen, last_seen, count,
          cleared_at, case_id;

-- name: close_alarm
-- Closing is handling it: an alarm closed without an acknowledgement records one.
UPDATE alarms
SET state = 'closed', closed_at = now(), acked_at = coalesce(acked_at, now()),
    acked_by = coalesce(acked_by, $2), updated_at = now()
WHERE id = $1
RETURNING id, device_id, kind, rule, severity, state, cell_id, first_seen, last_seen, count,
          cleared_at, case_id;

-- name: alarms_by_ids
SELECT id, device_id, kind, rule, severity, state, cell_id, first_seen, last_seen, count,
       cleared_at, case_id, updated_at
FROM alarms
WHERE id = ANY($1::bigint[]);

-- name: alarms_changed_since
-- The most recent $2 alarms changed at or after $1, oldest change first.
SELECT * FROM (
    SELECT id, device_id, kind, rule, severity, state, cell_id, first_seen, last_seen, count,
           cleared_at, case_id, updated_at
    FROM alarms
    WHERE updated_at >= $1
    ORDER BY updated_at DESC, id DESC
    LIMIT $2
) recent
ORDER BY updated_at, id;

-- name: outbox_claim
-- The next unpublished rows of channel $3 ('mqtt' or 'webhook') in id order, locked until
-- the transaction ends; rows another publisher holds are skipped, as are the ones in $2
-- (waiting for a retry).
SELECT id, topic, payload::text AS payload, attempts
FROM outbox
WHERE published_at IS NULL AND channel = $3 AND NOT (id = ANY($2::bigint[]))
ORDER BY id
LIMIT $1
FOR UPDATE SKIP LOCKED;

-- name: outbox_mark_published
UPDATE outbox SET published_at = now(), attempts = attempts + 1 WHERE id = ANY($1::bigint[]);

-- name: outbox_mark_failed
UPDATE outbox SET attempts = attempts + 1 WHERE id = ANY($1::bigint[]);

-- name: outbox_lag
-- Seconds since the oldest unpublished row was written; 0 when everything is out.
SELECT coalesce(extract(epoch FROM clock_timestamp() - min(created_at)), 0)::float8
FROM (
    SELECT created_at FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT 1
) oldest;

-- name: outbox_prune
-- Published rows past the retention, a bounded number at a time.
DELETE FROM outbox
WHERE id IN (
    SELECT id FROM outbox
    WHERE published_at IS NOT NULL AND published_at < now() - make_interval(secs => $1::float8)
    LIMIT $2
);
