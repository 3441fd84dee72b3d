-- TimescaleDB flavour: hypertables, compression, retention and an hourly
-- continuous aggregate for the history charts.
CREATE EXTENSION IF NOT EXISTS timescaledb;

SELECT create_hypertable('telemetry', 'time', chunk_time_interval => INTERVAL '1 day');
SELECT create_hypertable('device_events', 'time', chunk_time_interval => INTERVAL '7 days');

ALTER TABLE telemetry SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'device_id',
    timescaledb.compress_orderby = 'time DESC'
);
SELECT add_compression_policy('telemetry', INTERVAL '7 days');
SELECT add_retention_policy('telemetry', INTERVAL '365 days');

ALTER TABLE device_events SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'device_id',
    timescaledb.compress_orderby = 'time DESC'
);
SELECT add_compression_policy('device_events', INTERVAL '30 days');
SELECT add_retention_policy('device_events', INTERVAL '730 days');

CREATE MATERIALIZED VIEW telemetry_hourly
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(INTERVAL '1 hour', time) AS bucket,
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
GROUP BY bucket, device_id
WITH NO DATA;

SELECT add_continuous_aggregate_policy('telemetry_hourly',
    start_offset => INTERVAL '3 days',
    end_offset => INTERVAL '1 hour',
    schedule_interval => INTERVAL '30 minutes');
