-- name: create_token
INSERT INTO api_tokens (token_hash, role, worker_id, label) VALUES ($1, $2, $3, $4) RETURNING id;

-- name: token_by_hash
SELECT id, role, worker_id FROM api_tokens WHERE token_hash = $1 AND revoked_at IS NULL;

-- name: list_devices
SELECT d.id, d.kind, d.name, d.lat, d.lon, d.cell_id, d.building, d.floor, d.interval_s,
       d.height_cm, s.last_seen, s.last_seq, s.status, s.status_at
FROM devices d LEFT JOIN device_last_seen s ON s.device_id = d.id
WHERE ($1::text IS NULL OR d.cell_id = $1) AND ($2::text IS NULL OR d.kind = $2)
  AND ($3::text IS NULL OR d.id > $3)
ORDER BY d.id
LIMIT $4;

-- name: get_device
SELECT d.id, d.kind, d.name, d.lat, d.lon, d.cell_id, d.building, d.floor, d.interval_s,
       d.height_cm, s.last_seen, s.last_seq, s.status, s.status_at
FROM devices d LEFT JOIN device_last_seen s ON s.device_id = d.id
WHERE d.id = $1;

-- name: device_telemetry_raw
SELECT time, seq, battery, rssi, smoke, temperature, co, tilt, water_level, gas_ch4, gas_h2s,
       fill, weight, alarm, test, tamper, open, door_open, locked, fire, extra
FROM telemetry
WHERE device_id = $1 AND time >= $2 AND time < $3
ORDER BY time DESC
LIMIT $4;

-- name: device_telemetry_bucketed
SELECT date_bin(make_interval(secs => $4::float8), time, TIMESTAMPTZ '2000-01-01') AS bucket,
       count(*) AS samples,
       avg(battery) AS battery, avg(smoke) AS smoke, max(smoke) AS smoke_max,
       avg(temperature) AS temperature, max(temperature) AS temperature_max, max(co) AS co_max,
       max(tilt) AS tilt_max, avg(water_level) AS water_level, max(gas_ch4) AS gas_ch4_max,
       max(gas_h2s) AS gas_h2s_max, avg(fill) AS fill, max(fill) AS fill_max, avg(weight) AS weight
FROM telemetry
WHERE device_id = $1 AND time >= $2 AND time < $3
GROUP BY bucket
ORDER BY bucket DESC
LIMIT $5;

-- name: device_telemetry_hourly
-- Hourly history from `telemetry_hourly`: the continuous aggregate on TimescaleDB
-- (real-time, so the current hour is included), a plain view elsewhere.
SELECT bucket, samples, battery, smoke_avg AS smoke, smoke_max,
       temperature_avg AS temperature, temperature_max, co_max, tilt_max,
       water_level_avg AS water_level, gas_ch4_max, gas_h2s_max, fill_avg AS fill, fill_max,
       weight_avg AS weight
FROM telemetry_hourly
WHERE device_id = $1 AND bucket >= $2 AND bucket < $3
ORDER BY bucket DESC
LIMIT $4;
