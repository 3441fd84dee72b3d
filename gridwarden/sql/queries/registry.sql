-- Registries (grid cells, devices, workers): reads for diffing, set-based upserts.
-- Imports diff in Python and write only created or changed rows, so an unchanged
-- row keeps its updated_at.

-- name: registry_lock
-- Serialises registry imports with each other (readers and ingest are not blocked).
SELECT pg_advisory_xact_lock(hashtext('gridwarden.registry'));

-- name: registry_cells_select
SELECT id, name, level, parent_id, geometry::text AS geometry
FROM cells ORDER BY id;

-- name: registry_cells_version
-- Changes whenever a cell is added or imported again (the upsert sets updated_at; cells
-- are never deleted): the rules service re-reads the grid only then.
SELECT count(*) || ':' || coalesce(md5(string_agg(id || '@' || updated_at::text, ',' ORDER BY id)), '')
FROM cells;

-- name: registry_cell_levels
SELECT id, level FROM cells;

-- name: registry_cells_upsert
INSERT INTO cells AS c (id, name, level, parent_id, geometry, min_lon, min_lat, max_lon, max_lat)
SELECT u.id, u.name, u.level, u.parent_id, u.geometry::jsonb,
       u.min_lon, u.min_lat, u.max_lon, u.max_lat
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
            $6::float8[], $7::float8[], $8::float8[], $9::float8[])
     AS u (id, name, level, parent_id, geometry, min_lon, min_lat, max_lon, max_lat)
ON CONFLICT (id) DO UPDATE SET
    name = EXCLUDED.name,
    level = EXCLUDED.level,
    parent_id = EXCLUDED.parent_id,
    geometry = EXCLUDED.geometry,
    min_lon = EXCLUDED.min_lon,
    min_lat = EXCLUDED.min_lat,
    max_lon = EXCLUDED.max_lon,
    max_lat = EXCLUDED.max_lat,
    updated_at = now();

-- name: registry_device_points
SELECT id, lat, lon, cell_id FROM devices ORDER BY id;

-- name: registry_devices_set_cell
UPDATE devices AS d SET cell_id = u.cell_id, updated_at = now()
FROM unnest($1::text[], $2::text[]) AS u (id, cell_id)
WHERE d.id = u.id;

-- name: registry_devices_select
SELECT id, kind, lat, lon, cell_id, name, building, floor, interval_s, height_cm
FROM devices ORDER BY id;

-- name: registry_devices_upsert
INSERT INTO devices AS d (id, kind, lat, lon, cell_id, name, building, floor, interval_s,
                          height_cm)
SELECT * FROM unnest($1::text[], $2::text[], $3::float8[], $4::float8[], $5::text[],
                     $6::text[], $7::text[], $8::int[], $9::int[], $10::float8[])
ON CONFLICT (id) DO UPDATE SET
    kind = EXCLUDED.kind,
    lat = EXCLUDED.lat,
    lon = EXCLUDED.lon,
    cell_id = EXCLUDED.cell_id,
    name = EXCLUDED.name,
    building = EXCLUDED.building,
    floor = EXCLUDED.floor,
    interval_s = EXCLUDED.interval_s,
    height_cm = EXCLUDED.height_cm,
    updated_at = now();

-- name: registry_workers_select
SELECT w.id, w.name, w.role, w.phone_hash, w.phone_masked, w.on_duty,
       coalesce(array_agg(wc.cell_id ORDER BY wc.cell_id)
                FILTER (WHERE wc.cell_id IS NOT NULL), '{}') AS cells
FROM workers w LEFT JOIN worker_cells wc ON wc.worker_id = w.id
GROUP BY w.id ORDER BY w.id;

-- name: registry_workers_upsert
INSERT INTO workers AS w (id, name, role, phone_hash, phone_masked, on_duty)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bool[])
ON CONFLICT (id) DO UPDATE SET
    name = EXCLUDED.name,
    role = EXCLUDED.role,
    phone_hash = EXCLUDED.phone_hash,
    phone_masked = EXCLUDED.phone_masked,
    on_duty = EXCLUDED.on_duty,
    updated_at = now();

-- name: registry_worker_cells_clear
DELETE FROM worker_cells WHERE worker_id = ANY($1::text[]);

-- name: registry_worker_cells_insert
INSERT INTO worker_cells (worker_id, cell_id)
SELECT * FROM unnest($1::text[], $2::text[]);
