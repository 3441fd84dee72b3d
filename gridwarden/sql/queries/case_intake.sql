-- The case intake (alerting/intake.py): raised alarms queued for their case.

-- name: case_intake_add
-- The raised alarms of one transaction ($1 alarm ids, $2 sources, $3 buildings, $4 details
-- as JSON text), in order; wakes the intake on commit.
WITH queued AS (
    INSERT INTO case_intake (alarm_id, source, building, details)
    SELECT q.alarm_id, q.source, q.building, q.details::jsonb
    FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[])
         AS q (alarm_id, source, building, details)
    RETURNING 1
)
SELECT pg_notify('gw_case_intake', '') WHERE EXISTS (SELECT FROM queued);

-- name: case_intake_claim
-- The first $1 queued rows (not moved aside), most severe alarm first, then oldest: in an
-- alarm storm a fire is dispatched before a full bin. Locked until the transaction ends;
-- rows another intake holds are skipped. With each, the alarm as it is now (`id` is the
-- alarm's, `intake_id` the row's) and where its device is (NULL: not registered).
SELECT q.id AS intake_id, q.source, q.building, q.details::text AS details, q.queued_at,
       a.id, a.device_id, a.kind, a.rule, a.severity, a.state, a.cell_id, a.case_id,
       d.name AS device_name, d.building AS device_building, d.lat, d.lon
FROM case_intake q
JOIN alarms a ON a.id = q.alarm_id
LEFT JOIN devices d ON d.id = a.device_id
WHERE q.failed_at IS NULL
ORDER BY array_position(ARRAY['critical', 'major', 'minor', 'warning'], a.severity), q.id
LIMIT $1
FOR UPDATE OF q SKIP LOCKED;

-- name: case_intake_done
DELETE FROM case_intake WHERE id = ANY($1::bigint[]);

-- name: case_intake_set_aside
UPDATE case_intake SET failed_at = now(), error = $2 WHERE id = $1;

-- name: case_intake_lag
-- Seconds since the oldest row still queued was queued; 0 when the queue is empty.
SELECT coalesce(extract(epoch FROM clock_timestamp() - min(queued_at)), 0)::float8
FROM (
    SELECT queued_at FROM case_intake WHERE failed_at IS NULL ORDER BY id LIMIT 1
) oldest;

-- name: alarms_link_cases
-- $1 alarm ids (distinct), $2 the case of each. The alarms are locked in id order first,
-- so that two writers locking alarms this way never wait on each other in a cycle; then
-- the links that change are written and told to the live feed (`pg_notify('gw_alarm',
-- <alarm id>)`, as `announce_alarm` does for a repeat; delivered on commit).
WITH wanted AS (
    SELECT w.alarm_id, w.case_id FROM unnest($1::bigint[], $2::bigint[]) AS w (alarm_id, case_id)
), locked AS MATERIALIZED (
    SELECT a.id FROM alarms a WHERE a.id IN (SELECT alarm_id FROM wanted)
    ORDER BY a.id
    FOR NO KEY UPDATE
), linked AS (
    UPDATE alarms a SET case_id = w.case_id, updated_at = now()
    FROM wanted w
    WHERE a.id = w.alarm_id
      AND a.id IN (SELECT id FROM locked)
      AND a.case_id IS DISTINCT FROM w.case_id
    RETURNING a.id
)
SELECT id, pg_notify('gw_alarm', id::text) FROM linked;
