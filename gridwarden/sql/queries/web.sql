-- Web consoles: browser sessions (gridwarden/web.py) and the grid map (alerting/cells_api.py).

-- name: web_session_create
-- $1 SHA-256 of the session id, $2 token id, $3 lifetime in seconds.
INSERT INTO web_sessions (id_hash, token_id, expires_at)
VALUES ($1, $2, now() + make_interval(secs => $3::float8))
RETURNING expires_at;

-- name: web_session_principal
-- The live session with this id hash, on a token that is not revoked. `last_seen` is
-- written at most once a minute per session, not on every request.
WITH live AS (
    SELECT s.id_hash, s.expires_at, t.id, t.role, t.worker_id
    FROM web_sessions s JOIN api_tokens t ON t.id = s.token_id
    WHERE s.id_hash = $1 AND s.expires_at > now() AND t.revoked_at IS NULL
), touched AS (
    UPDATE web_sessions w SET last_seen = now()
    FROM live
    WHERE w.id_hash = live.id_hash AND w.last_seen < now() - interval '1 minute'
)
SELECT id, role, worker_id, expires_at FROM live;

-- name: web_session_delete
DELETE FROM web_sessions WHERE id_hash = $1;

-- name: web_sessions_prune
DELETE FROM web_sessions WHERE expires_at <= now();

-- name: web_me
-- $1 token id: the token's label and, for a worker token, the worker and their cells.
SELECT t.label, w.id AS worker_id, w.name AS worker_name, w.role AS worker_role, w.on_duty,
       COALESCE((SELECT array_agg(wc.cell_id ORDER BY wc.cell_id)
                 FROM worker_cells wc WHERE wc.worker_id = w.id), '{}') AS cells
FROM api_tokens t LEFT JOIN workers w ON w.id = t.worker_id
WHERE t.id = $1;

-- name: web_cells
-- The grid as one GeoJSON FeatureCollection (json text), $1 a level or NULL for all.
-- Each cell's counts cover the cell and every cell below it, as the `cell=` filters of
-- the API do: a community shows the alarms of its grids' devices. Open alarms: not
-- closed; open cases: not yet resolved (the states of `cases_one_open_idx`); overdue:
-- open and past their current deadline.
WITH RECURSIVE tree AS (           -- (top, cell): every cell paired with itself and below
    SELECT id AS top, id AS cell FROM cells
    UNION                          -- not ALL: a cycle, were one ever stored, still ends
    SELECT tree.top, c.id FROM tree JOIN cells c ON c.parent_id = tree.cell
), alarm_counts AS (
    SELECT cell_id,
           count(*) AS total,
           count(*) FILTER (WHERE severity = 'critical') AS critical,
           count(*) FILTER (WHERE severity = 'major') AS major,
           count(*) FILTER (WHERE severity = 'minor') AS minor,
           count(*) FILTER (WHERE severity = 'warning') AS warning
    FROM alarms
    WHERE state <> 'closed' AND cell_id IS NOT NULL
    GROUP BY cell_id
), case_counts AS (
    SELECT cell_id,
           count(*) AS total,
           count(*) FILTER (WHERE due_at < now()) AS overdue
    FROM cases
    WHERE state IN ('reported', 'dispatched', 'accepted', 'on_site')
    GROUP BY cell_id
), device_counts AS (
    SELECT cell_id, count(*) AS total FROM devices WHERE cell_id IS NOT NULL GROUP BY cell_id
), rolled AS (
    SELECT tree.top AS id,
           COALESCE(sum(a.total), 0)::int AS open_alarms,
           COALESCE(sum(a.critical), 0)::int AS critical,
           COALESCE(sum(a.major), 0)::int AS major,
           COALESCE(sum(a.minor), 0)::int AS minor,
           COALESCE(sum(a.warning), 0)::int AS warning,
           COALESCE(sum(k.total), 0)::int AS open_cases,
           COALESCE(sum(k.overdue), 0)::int AS overdue_cases,
           COALESCE(sum(d.total), 0)::int AS devices
    FROM tree
    LEFT JOIN alarm_counts a ON a.cell_id = tree.cell
    LEFT JOIN case_counts k ON k.cell_id = tree.cell
    LEFT JOIN device_counts d ON d.cell_id = tree.cell
    GROUP BY tree.top
)
SELECT json_build_object(
    'type', 'FeatureCollection',
    'features', COALESCE(json_agg(json_build_object(
        'type', 'Feature',
        'id', c.id,
        'geometry', c.geometry,
        'bbox', json_build_array(c.min_lon, c.min_lat, c.max_lon, c.max_lat),
        'properties', json_build_object(
            'id', c.id,
            'name', c.name,
            'level', c.level,
            'parent', c.parent_id,
            'open_alarms', r.open_alarms,
            'open_alarms_by_severity', json_build_object(
                'critical', r.critical, 'major', r.major, 'minor', r.minor,
                'warning', r.warning),
            'open_cases', r.open_cases,
            'overdue_cases', r.overdue_cases,
            'devices', r.devices)
    ) ORDER BY array_position(ARRAY['street', 'community', 'grid', 'micro'], c.level), c.id),
    '[]'::json)
)::text
FROM cells c JOIN rolled r ON r.id = c.id
WHERE $1::text IS NULL OR c.level = $1::text;
