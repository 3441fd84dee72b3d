-- name: raise_alarm
-- One open alarm per (source, rule), whatever the concurrency: a repeat folds into
-- `count`, may raise the severity (never lowers it) and re-activates a cleared alarm.
-- `previous` is the open row as this transaction first saw it (for the change type).
WITH previous AS (
    SELECT state, severity FROM alarms
    WHERE source = $1 AND rule = $4 AND state <> 'closed'
)
INSERT INTO alarms AS a (source, device_id, kind, rule, severity, cell_id, building,
                         first_seen, last_seen, count, details)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9, $10)
ON CONFLICT (source, rule) WHERE state <> 'closed' DO UPDATE SET
    count = a.count + EXCLUDED.count,
    last_seen = GREATEST(a.last_seen, EXCLUDED.last_seen),
    severity = CASE
        WHEN array_position(ARRAY['warning', 'minor', 'major', 'critical'], EXCLUDED.severity)
           > array_position(ARRAY['warning', 'minor', 'major', 'critical'], a.severity)
        THEN EXCLUDED.severity ELSE a.severity END,
    state = CASE WHEN a.state = 'cleared' THEN 'active' ELSE a.state END,
    cleared_at = CASE WHEN a.state = 'cleared' THEN NULL ELSE a.cleared_at END,
    flaps = a.flaps + CASE WHEN a.state = 'cleared' THEN 1 ELSE 0 END,
    details = a.details || EXCLUDED.details,
    updated_at = now()
RETURNING a.id, a.device_id, a.kind, a.rule, a.severity, a.state, a.cell_id, a.first_seen,
          a.last_seen, a.count, a.cleared_at, a.case_id,
          (a.xmax = 0) AS inserted,
          (SELECT state FROM previous) AS previous_state,
          (SELECT severity FROM previous) AS previous_severity;

-- name: clear_alarm
-- An alarm already acknowledged has nothing left to wait for once it clears: closed.
UPDATE alarms
SET state = CASE WHEN state = 'acknowledged' THEN 'closed' ELSE 'cleared' END,
    closed_at = CASE WHEN state = 'acknowledged' THEN $3 ELSE closed_at END,
    cleared_at = $3, details = details || $4, updated_at = now()
WHERE source = $1 AND rule = $2 AND state IN ('active', 'acknowledged')
RETURNING id, device_id, kind, rule, severity, state, cell_id, first_seen, last_seen, count,
          cleared_at, case_id;

-- name: save_rule_states
INSERT INTO rule_state AS r (source, rule, state, due_at, updated_at)
SELECT s.source, s.rule, s.state::jsonb, s.due_at, now()
FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[]) AS s (source, rule, state, due_at)
ON CONFLICT (source, rule) DO UPDATE SET
    state = EXCLUDED.state, due_at = EXCLUDED.due_at, updated_at = now();

-- name: delete_rule_states
DELETE FROM rule_state r
USING unnest($1::text[], $2::text[]) AS d (source, rule)
WHERE r.source = d.source AND r.rule = d.rule;

-- name: load_rule_states
SELECT source, rule, state FROM rule_state;

-- name: load_last_heard
SELECT d.id, s.last_seen FROM devices d LEFT JOIN device_last_seen s ON s.device_id = d.id
WHERE d.interval_s IS NOT NULL;

-- name: active_maintenance
SELECT device_id, cell_id, starts_at, ends_at FROM maintenance_windows
WHERE ends_at > now() AND starts_at < now() + INTERVAL '10 minutes';
