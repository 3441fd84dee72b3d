-- Plain PostgreSQL flavour: the same tables, a BRIN index on time instead of
-- chunks, and the hourly aggregate as an ordinary view over date_bin.
CREATE INDEX telemetry_time_brin ON telemetry USING brin (time);
CREATE INDEX device_events_time_brin ON device_events USING brin (time);

CREATE VIEW telemetry_hourly AS
SELECT date_bin(INTERVAL '1 hour', time, TIMESTAMPTZ '2000-01-01') AS bucket,
       device_id,
       count(*)           AS samples,
       avg(battery)       AS battery,
       avg(smoke)         AS smoke_avg,      max(smoke)       AS smoke_max,
       avg(temperature)   AS temperature_avg, max(temperature) AS temperature_max,
       max(co)            AS co_max,
       max(tilt)          AS tilt_max,
       avg(water_level)   AS water_level_avg, max(water_level) AS water_level_max,
       max(gas_ch4)       AS gas_ch4_max,
       max(gas_h2s)       AS gas_h2s_max,
       avg(fill)          AS fill_avg,        max(fill)        AS fill_max,
       avg(weight)        AS weight_avg
FROM telemetry
GROUP BY bucket, device_id;
