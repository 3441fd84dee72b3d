-- name: raise_alarms
-- Raise a batch of alarms in one statement, each (source, rule) at most once (the caller
-- splits repeats into rounds). One open alarm per (source, rule), whatever the
-- concurrency: a repeat folds into `count`, may raise the severity (never lowers it) and
-- re-activates a cleared alarm. `previous` is the open row as this statement first saw it
-- (for the change type). Rows come back in the order given ($11: each op's position).
WITH v AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                         $6::text[], $7::text[], $8::timestamptz[], $9::int[], $10::text[],
                         $11::int[])
        AS v (source, device_id, kind, rule, severity, cell_id, building, at, count, details, n)
), previous AS (
    SELECT a.source, a.rule, a.state, a.severity
    FROM alarms a JOIN v ON a.source = v.source AND a.rule = v.rule
    WHERE a.state <> 'closed'
), upserted AS (
    INSERT INTO alarms AS a (source, device_id, kind, rule, severity, cell_id, building,
                             first_seen, last_seen, count, details)
    SELECT source, device_id, kind, rule, severity, cell_id, building, at, at, count,
           details::jsonb
    FROM v ORDER BY n
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
    RETURNING a.id, a.source, a.device_id, a.kind, a.rule, a.severity, a.state, a.cell_id,
              a.first_seen, a.last_seen, a.count, a.cleared_at, a.case_id,
              (a.xmax = 0) AS inserted
)
SELECT v.n, u.id, u.device_id, u.kind, u.rule, u.severity, u.state, u.cell_id, u.first_seen,
       u.last_seen, u.count, u.cleared_at, u.case_id, u.inserted,
       p.state AS previous_state, p.severity AS previous_severity
FROM upserted u
JOIN v ON v.source = u.source AND v.rule = u.rule
LEFT JOIN previous p ON p.source = u.source AND p.rule = u.rule
ORDER BY v.n;

-- name: clear_alarms
-- Clear a batch of alarms, each (source, rule) at most once ($5: each op's position). An
-- alarm already acknowledged has nothing left to wait for once it clears: closed. An op
-- with nothing open (closed by an operator meanwhile) returns no row.
UPDATE alarms a
SET state = CASE WHEN a.state = 'acknowledged' THEN 'closed' ELSE 'cleared' END,
    closed_at = CASE WHEN a.state = 'acknowledged' THEN v.at ELSE a.closed_at END,
    cleared_at = v.at, details = a.details || v.details::jsonb, updated_at = now()
FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[], $5::int[])
    AS v (source, rule, at, details, n)
WHERE a.source = v.source AND a.rule = v.rule AND a.state IN ('active', 'acknowledged')
RETURNING v.n, a.id, a.device_id, a.kind, a.rule, a.severity, a.state, a.cell_id,
          a.first_seen, a.last_seen, a.count, a.cleared_at, a.case_id;

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

-- name: recent_readings
-- The telemetry of the last $1 seconds, oldest first, for the rate-of-rise samples that
-- are not written with every reading (rules.engine `Engine.restore_samples`); $2 the
-- device kinds that have such rules. The row as JSON: whatever fields a rule looks at.
SELECT t.device_id, t.time, t.received_at, t.seq,
       to_jsonb(t) - ARRAY['device_id', 'time', 'received_at', 'seq', 'extra'] AS row_json
FROM telemetry t JOIN devices d ON d.id = t.device_id
WHERE t.received_at > now() - make_interval(secs => $1::float8)
  AND t.time > now() - make_interval(secs => $1::float8) - INTERVAL '1 day'
  AND d.kind = ANY($2::text[])
ORDER BY LEAST(t.time, t.received_at), t.received_at;

-- name: load_last_heard
SELECT d.id, s.last_seen FROM devices d LEFT JOIN device_last_seen s ON s.device_id = d.id
WHERE d.interval_s IS NOT NULL;

-- name: active_maintenance
SELECT device_id, cell_id, starts_at, ends_at FROM maintenance_windows
WHERE ends_at > now() AND starts_at < now() + INTERVAL '10 minutes';
