-- name: case_open_or_join
-- One open case per incident: a new alarm of the same device or building joins it.
INSERT INTO cases AS c (incident_key, origin, category, title, description, cell_id, device_id,
                        lat, lon, priority, policy, created_at, updated_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12, $12)
ON CONFLICT (incident_key) WHERE state IN ('reported', 'dispatched', 'accepted', 'on_site')
DO UPDATE SET
    priority = CASE
        WHEN array_position(ARRAY['warning', 'minor', 'major', 'critical'], EXCLUDED.priority)
           > array_position(ARRAY['warning', 'minor', 'major', 'critical'], c.priority)
        THEN EXCLUDED.priority ELSE c.priority END,
    updated_at = EXCLUDED.updated_at
RETURNING c.*, (c.xmax = 0) AS inserted;

-- name: case_candidate
-- The on-duty worker of one of `roles` covering the cell or a cell above it: role
-- order first (grid workers before part-timers, even one covering the micro-grid
-- itself), then the nearest cell, fewest open cases, longest since given one (round
-- robin), id.
WITH RECURSIVE chain AS (
    SELECT id, parent_id, 0 AS depth FROM cells WHERE id = $1
    UNION ALL
    SELECT c.id, c.parent_id, chain.depth + 1
    FROM cells c JOIN chain ON c.id = chain.parent_id
    WHERE chain.depth < 16
)
SELECT w.id, w.name, w.role, min(chain.depth) AS depth,
       (SELECT count(*) FROM cases k
        WHERE k.assignee = w.id AND k.state IN ('dispatched', 'accepted', 'on_site')) AS open_cases
FROM workers w
JOIN worker_cells wc ON wc.worker_id = w.id
JOIN chain ON chain.id = wc.cell_id
WHERE w.on_duty AND w.role = ANY($2::text[]) AND NOT (w.id = ANY($3::text[]))
GROUP BY w.id
ORDER BY array_position($2::text[], w.role), min(chain.depth), open_cases,
         w.last_assigned_at NULLS FIRST, w.id
LIMIT 1;

-- name: case_assign
-- Assign the case, and note when the worker was last given one (the next assignment goes
-- to whoever waited longest), in one round trip.
WITH touched AS (
    UPDATE workers SET last_assigned_at = $4 WHERE id = $2 RETURNING id
)
UPDATE cases SET assignee = $2, level = $3, state = 'dispatched',
       dispatched_at = COALESCE(dispatched_at, $4), due_at = $5, due_step = $6, updated_at = $4
WHERE id = $1
RETURNING *;

-- name: case_get
SELECT * FROM cases WHERE id = $1;

-- name: case_lock
SELECT * FROM cases WHERE id = $1 FOR UPDATE;

-- name: case_event_add
-- One timeline entry, and `pg_notify('gw_case', <case id>)` for the operators' live feed
-- (delivered on commit; several entries of one transaction make one notification).
WITH added AS (
    INSERT INTO case_events (case_id, at, actor, action, from_state, to_state, detail)
    VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)
    RETURNING case_id
)
SELECT pg_notify('gw_case', case_id::text) FROM added;

-- name: case_timeline
SELECT at, actor, action, from_state, to_state, detail FROM case_events
WHERE case_id = $1 ORDER BY id;

-- name: case_alarm_ids
SELECT id FROM alarms WHERE case_id = $1 ORDER BY id;

-- name: case_close_alarms
UPDATE alarms SET state = 'closed', closed_at = $2, updated_at = now()
WHERE case_id = $1 AND state <> 'closed'
RETURNING id, device_id, kind, rule, severity, state, cell_id, first_seen, last_seen, count,
          cleared_at, case_id;

-- name: case_worker
SELECT id, name, role, on_duty FROM workers WHERE id = $1;

-- name: cases_due
-- Cases past their next deadline, for the SLA timer; SKIP LOCKED so two instances
-- never escalate the same case.
SELECT * FROM cases WHERE due_at <= $1 ORDER BY due_at LIMIT $2 FOR UPDATE SKIP LOCKED;

-- name: case_device_location
SELECT d.lat, d.lon, d.name, d.building, d.floor, d.kind FROM devices d WHERE d.id = $1;

-- name: case_step
-- One step of the loop. A step column keeps its first value (a second acceptance after
-- an escalation does not rewrite when the case was first accepted, nor whether that
-- met its deadline); `case_reopen_reset` is the one place that clears them.
UPDATE cases SET
    state = $2, due_at = $3, due_step = $4, updated_at = $5,
    accepted_at = COALESCE(accepted_at, $6),
    arrived_at = COALESCE(arrived_at, $7),
    resolved_at = COALESCE(resolved_at, $8),
    resolved_by = COALESCE(resolved_by, $9),
    resolution = COALESCE(resolution, $10),
    verified_at = COALESCE(verified_at, $11),
    verified_by = COALESCE(verified_by, $12),
    archived_at = COALESCE(archived_at, $13),
    rating = COALESCE(rating, $14),
    rating_comment = COALESCE(rating_comment, $15),
    accept_met = COALESCE(accept_met, $16),
    arrive_met = COALESCE(arrive_met, $17),
    resolve_met = COALESCE(resolve_met, $18)
WHERE id = $1
RETURNING *;

-- name: case_reopen_reset
UPDATE cases SET resolved_at = NULL, resolved_by = NULL, resolution = NULL, verified_at = NULL,
       verified_by = NULL, resolve_met = NULL
WHERE id = $1;

-- name: case_set_rejected
UPDATE cases SET rejected_by = $2 WHERE id = $1;

-- name: case_escalated
-- A missed deadline: mark the step missed (it stays missed whatever happens later).
UPDATE cases SET escalations = escalations + 1,
    accept_met = CASE WHEN $2 = 'accept' THEN false ELSE accept_met END,
    arrive_met = CASE WHEN $2 = 'arrive' THEN false ELSE arrive_met END,
    resolve_met = CASE WHEN $2 = 'resolve' THEN false ELSE resolve_met END
WHERE id = $1;

-- name: case_postpone
UPDATE cases SET due_at = $2 WHERE id = $1;

-- name: outbox_add_notification
-- A worker's notification in one round trip: the MQTT row ($1 topic, $2 payload), the
-- webhook row when $3 (the URL) is set ($4 the body), and the publisher's wake-up
-- (delivered on commit).
WITH mqtt AS (
    INSERT INTO outbox (topic, payload) VALUES ($1, $2::jsonb) RETURNING id
), hook AS (
    INSERT INTO outbox (channel, topic, payload)
    SELECT 'webhook', $3::text, $4::jsonb WHERE $3::text IS NOT NULL
    RETURNING id
)
SELECT pg_notify('gw_outbox', ''), (SELECT count(*) FROM mqtt) + (SELECT count(*) FROM hook);

-- name: cases_feed_by_ids
-- Changed cases for the live feed, with the latest timeline action as `change`.
SELECT c.*, e.action AS change
FROM cases c
LEFT JOIN LATERAL (
    SELECT action FROM case_events WHERE case_id = c.id ORDER BY id DESC LIMIT 1
) e ON true
WHERE c.id = ANY($1::bigint[]);

-- name: worker_covers_cell
-- Does the worker cover the cell or a cell above it (a supervisor's area)?
WITH RECURSIVE chain AS (
    SELECT id, parent_id, 0 AS depth FROM cells WHERE id = $2
    UNION ALL
    SELECT c.id, c.parent_id, chain.depth + 1
    FROM cells c JOIN chain ON c.id = chain.parent_id
    WHERE chain.depth < 16
)
SELECT EXISTS (
    SELECT 1 FROM worker_cells wc JOIN chain ON chain.id = wc.cell_id WHERE wc.worker_id = $1
);

-- name: case_unassign
-- Nobody left to take it: back to `reported`, keeping its deadline for the SLA timer.
UPDATE cases SET assignee = NULL, state = 'reported', updated_at = $2 WHERE id = $1
RETURNING *;
