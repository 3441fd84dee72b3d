-- name: case_open_or_join
-- One open case per incident: a new alarm of the same device or building joins it (the
-- case takes the higher priority). One row per element of the arrays ($1 incident keys,
-- distinct: one statement may not touch a case twice; $2 origins, $3 categories, $4 titles,
-- $5 descriptions, $6 cells, $7 devices, $8 lat, $9 lon, $10 priorities, $11 policies as
-- JSON text), all at $12. Each case comes back with its `incident_key` and `inserted`.
INSERT INTO cases AS c (incident_key, origin, category, title, description, cell_id, device_id,
                        lat, lon, priority, policy, created_at, updated_at)
SELECT n.incident_key, n.origin, n.category, n.title, n.description, n.cell_id, n.device_id,
       n.lat, n.lon, n.priority, n.policy::jsonb, $12, $12
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::text[], $8::float8[], $9::float8[], $10::text[], $11::text[])
     WITH ORDINALITY AS n (incident_key, origin, category, title, description, cell_id,
                           device_id, lat, lon, priority, policy, ord)
ORDER BY n.ord
ON CONFLICT (incident_key) WHERE state IN ('reported', 'dispatched', 'accepted', 'on_site')
DO UPDATE SET
    priority = CASE
        WHEN array_position(ARRAY['warning', 'minor', 'major', 'critical'], EXCLUDED.priority)
           > array_position(ARRAY['warning', 'minor', 'major', 'critical'], c.priority)
        THEN EXCLUDED.priority ELSE c.priority END,
    updated_at = EXCLUDED.updated_at
RETURNING c.*, (c.xmax = 0) AS inserted;

-- name: case_candidates
-- Everyone on duty who could take a case in each of the cells $1: the workers of one of
-- the roles $2 covering the cell or a cell above it, with what the choice goes by
-- (`alerting.cases.Candidates.best`: role, the nearest cell, fewest open cases, longest
-- since given one, id), ordered by id (the last tie-break, in the database's collation).
WITH RECURSIVE chain AS (
    SELECT id AS origin, id, parent_id, 0 AS depth FROM cells WHERE id = ANY($1::text[])
    UNION ALL
    SELECT chain.origin, c.id, c.parent_id, chain.depth + 1
    FROM cells c JOIN chain ON c.id = chain.parent_id
    WHERE chain.depth < 16
)
SELECT chain.origin AS cell_id, w.id, w.role, min(chain.depth) AS depth, w.last_assigned_at,
       (SELECT count(*) FROM cases k
        WHERE k.assignee = w.id AND k.state IN ('dispatched', 'accepted', 'on_site')) AS open_cases
FROM workers w
JOIN worker_cells wc ON wc.worker_id = w.id
JOIN chain ON chain.id = wc.cell_id
WHERE w.on_duty AND w.role = ANY($2::text[])
GROUP BY chain.origin, w.id
ORDER BY w.id, chain.origin;

-- name: case_assign
-- Assign cases ($1 case ids, $2 workers, $3 levels, $5 deadlines, $6 their steps; at $4),
-- and note when each worker was last given one (the next assignment goes to whoever
-- waited longest), in one round trip.
WITH wanted AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $5::timestamptz[], $6::text[])
        AS w (case_id, worker_id, level, due_at, due_step)
), touched AS (
    UPDATE workers SET last_assigned_at = $4 WHERE id IN (SELECT worker_id FROM wanted)
)
UPDATE cases c SET assignee = w.worker_id, level = w.level, state = 'dispatched',
       dispatched_at = COALESCE(c.dispatched_at, $4), due_at = w.due_at,
       due_step = w.due_step, updated_at = $4
FROM wanted w
WHERE c.id = w.case_id
RETURNING c.*;

-- name: case_get
SELECT * FROM cases WHERE id = $1;

-- name: case_lock
SELECT * FROM cases WHERE id = $1 FOR UPDATE;

-- name: case_events_add
-- Timeline entries, in the order given ($1 cases, $2 times, $3 actors, $4 actions, $5 from
-- and $6 to states, $7 details as JSON text), and `pg_notify('gw_case', <case id>)` for
-- the operators' live feed (delivered on commit; one notification per case).
WITH added AS (
    INSERT INTO case_events (case_id, at, actor, action, from_state, to_state, detail)
    SELECT e.case_id, e.at, e.actor, e.action, e.from_state, e.to_state, e.detail::jsonb
    FROM unnest($1::bigint[], $2::timestamptz[], $3::text[], $4::text[], $5::text[],
                $6::text[], $7::text[])
         WITH ORDINALITY AS e (case_id, at, actor, action, from_state, to_state, detail, ord)
    ORDER BY e.ord
    RETURNING case_id
)
SELECT pg_notify('gw_case', case_id::text) FROM (SELECT DISTINCT case_id FROM added) changed;

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

-- name: outbox_add_notifications
-- Workers' notifications in one round trip: the MQTT rows ($1 topics, $2 payloads), the
-- webhook rows when $3 (the URL) is set ($4 their bodies), and the publisher's wake-up
-- (delivered on commit).
WITH mqtt AS (
    INSERT INTO outbox (topic, payload)
    SELECT n.topic, n.payload::jsonb
    FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS n (topic, payload, ord)
    ORDER BY n.ord
), hook AS (
    INSERT INTO outbox (channel, topic, payload)
    SELECT 'webhook', $3::text, n.body::jsonb
    FROM unnest($4::text[]) WITH ORDINALITY AS n (body, ord)
    WHERE $3::text IS NOT NULL
    ORDER BY n.ord
)
SELECT pg_notify('gw_outbox', '');  -- the inserts above run whether read or not

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
