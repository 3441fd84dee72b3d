"""The TimescaleDB flavour of the schema against a real TimescaleDB (2.23, PGlite/WASM).

`gridwarden.migrate` must pick `002_timeseries.timescale.sql`, the DDL must run inside
migrate's per-step transaction, and the ingest hot path's binary COPY
(`copy_records_to_table`) must land in the hypertables and feed the continuous aggregate.
The server takes one connection at a time: each test holds at most one.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from statistics import fmean

import asyncpg
import pytest

from gridwarden.db import query
from gridwarden.migrate import load_migrations, migrate

pytestmark = pytest.mark.timescale

DB_TIMEOUT_S = 60.0
EXPECTED_STEPS = [
    f"{m.version:03d}_{m.name} ({m.flavour})"
    for m in load_migrations()
    if m.flavour in ("any", "timescale")
]

# The column order of ingest/writer.py (TELEMETRY_COLUMNS, EVENT_COLUMNS).
NUMERIC = ("battery", "rssi", "smoke", "temperature", "co", "tilt", "water_level",
           "gas_ch4", "gas_h2s", "fill", "weight")  # fmt: skip
BOOLEAN = ("alarm", "test", "tamper", "open", "door_open", "locked", "fire")
TELEMETRY_COLUMNS = ("time", "device_id", "seq", "received_at", *NUMERIC, *BOOLEAN, "extra")
EVENT_COLUMNS = ("time", "device_id", "seq", "received_at", "event", "credential_hash", "data")

START = datetime(2024, 1, 1, tzinfo=UTC)
DEVICES = ("ts-smoke-1", "ts-smoke-2")
MINUTES = 120  # two hourly buckets per device
AGGREGATES = ("battery", "smoke_avg", "smoke_max", "temperature_avg", "temperature_max")


@asynccontextmanager
async def connection(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    async with asyncio.timeout(DB_TIMEOUT_S):
        conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        async with asyncio.timeout(DB_TIMEOUT_S):
            await conn.close()


@pytest.fixture(scope="session")
async def migrated(timescale_dsn: str) -> list[str]:
    """Run the migrations once for the session; the steps they applied."""
    async with asyncio.timeout(DB_TIMEOUT_S):
        return await migrate(timescale_dsn)


def telemetry_records() -> list[tuple[object, ...]]:
    records = []
    for d, device in enumerate(DEVICES):
        for minute in range(MINUTES):
            at = START + timedelta(minutes=minute)
            values: dict[str, object] = {
                "battery": 90.0 - d * 10 - minute / 60,
                "rssi": -70.0 - minute % 5,
                "smoke": 0.01 * (minute % 7) + d,
                "temperature": 20.0 + minute % 11 + d * 0.5,
            }
            if minute == MINUTES - 1:
                values |= {"alarm": True, "test": False}
            extra = json.dumps({"fw": f"1.{d}", "minute": minute}) if minute % 30 == 0 else None
            records.append(
                (at, device, minute, at + timedelta(seconds=2),
                 *(values.get(name) for name in (*NUMERIC, *BOOLEAN)), extra)
            )  # fmt: skip
    return records


async def test_migrate_applies_timescale_flavour(migrated: list[str], timescale_dsn: str) -> None:
    assert migrated == EXPECTED_STEPS
    async with connection(timescale_dsn) as conn, asyncio.timeout(DB_TIMEOUT_S):
        assert await conn.fetchval(
            "SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'"
        ) == 1  # fmt: skip
        flavours = await conn.fetch("SELECT version, flavour FROM schema_migrations ORDER BY 1")
        assert [tuple(row) for row in flavours] == [
            (m.version, m.flavour) for m in load_migrations() if m.flavour in ("any", "timescale")
        ]

        hypertables = await conn.fetch(
            "SELECT hypertable_name, compression_enabled"
            " FROM timescaledb_information.hypertables WHERE hypertable_schema = 'public'"
        )
        assert {row["hypertable_name"]: row["compression_enabled"] for row in hypertables} == {
            "telemetry": True,
            "device_events": True,
        }
        settings = await conn.fetch(
            "SELECT hypertable_name, attname, segmentby_column_index, orderby_column_index,"
            "       orderby_asc"
            " FROM timescaledb_information.compression_settings"
            " WHERE hypertable_schema = 'public'"
        )
        assert {tuple(row) for row in settings} == {
            (table, column, segment, order, asc)
            for table in ("telemetry", "device_events")
            for column, segment, order, asc in (
                ("device_id", 1, None, None),
                ("time", None, 1, False),
            )
        }
        dimensions = await conn.fetch(
            "SELECT hypertable_name, column_name, time_interval"
            " FROM timescaledb_information.dimensions WHERE hypertable_schema = 'public'"
        )
        assert {tuple(row) for row in dimensions} == {
            ("telemetry", "time", timedelta(days=1)),
            ("device_events", "time", timedelta(days=7)),
        }

        jobs = await conn.fetch(
            "SELECT proc_name, hypertable_name,"
            "       coalesce(config->>'compress_after', config->>'drop_after')::interval AS age"
            " FROM timescaledb_information.jobs"
            " WHERE proc_name IN ('policy_compression', 'policy_retention')"
        )
        assert {tuple(row) for row in jobs} == {
            ("policy_compression", "telemetry", timedelta(days=7)),
            ("policy_retention", "telemetry", timedelta(days=365)),
            ("policy_compression", "device_events", timedelta(days=30)),
            ("policy_retention", "device_events", timedelta(days=730)),
        }

        caggs = await conn.fetch(
            "SELECT view_name, hypertable_name, materialized_only"
            " FROM timescaledb_information.continuous_aggregates"
        )
        assert [tuple(row) for row in caggs] == [("telemetry_hourly", "telemetry", False)]
        refresh = await conn.fetchrow(
            "SELECT (config->>'start_offset')::interval AS start_offset,"
            "       (config->>'end_offset')::interval AS end_offset, schedule_interval"
            " FROM timescaledb_information.jobs"
            " WHERE proc_name = 'policy_refresh_continuous_aggregate'"
        )
        assert refresh is not None
        assert tuple(refresh) == (timedelta(days=3), timedelta(hours=1), timedelta(minutes=30))


async def test_copy_round_trip_and_hourly_aggregate(
    migrated: list[str], timescale_dsn: str
) -> None:
    records = telemetry_records()
    events = [
        (START + timedelta(minutes=5), DEVICES[0], 10_000, START + timedelta(minutes=5, seconds=1),
         "door_open", "sha256:abc", json.dumps({"door": "north"})),
        (START + timedelta(days=9), DEVICES[1], 10_001, START + timedelta(days=9, seconds=1),
         "tamper", None, None),
    ]  # fmt: skip
    select_telemetry = (
        f"SELECT {', '.join(TELEMETRY_COLUMNS)} FROM telemetry"
        " WHERE device_id = ANY($1) ORDER BY device_id, time"
    )
    async with connection(timescale_dsn) as conn, asyncio.timeout(DB_TIMEOUT_S):
        # The ingest writer COPYs inside its batch transaction; so does this.
        async with conn.transaction():
            status = await conn.copy_records_to_table(
                "telemetry", records=records, columns=TELEMETRY_COLUMNS
            )
            assert status == f"COPY {len(records)}"
            status = await conn.copy_records_to_table(
                "device_events", records=events, columns=EVENT_COLUMNS
            )
            assert status == f"COPY {len(events)}"

        rows = await conn.fetch(select_telemetry, list(DEVICES))
        assert len(rows) == len(records)
        for row, record in zip(rows, records, strict=True):
            *fixed, extra = record
            assert tuple(row)[:-1] == tuple(fixed)
            assert (json.loads(row["extra"]) if row["extra"] else None) == (
                json.loads(extra) if isinstance(extra, str) else None
            )
        chunks = await conn.fetchval(
            "SELECT count(*) FROM show_chunks('telemetry', older_than => $1::timestamptz)",
            START + timedelta(days=1),
        )
        assert chunks == 1  # two hours of readings: one 1-day chunk

        got_events = await conn.fetch(
            f"SELECT {', '.join(EVENT_COLUMNS)} FROM device_events"
            " WHERE device_id = ANY($1) ORDER BY time",
            list(DEVICES),
        )
        assert [tuple(row)[:6] for row in got_events] == [event[:6] for event in events]
        assert json.loads(got_events[0]["data"]) == {"door": "north"}
        event_chunks = await conn.fetchval(
            "SELECT count(*) FROM timescaledb_information.chunks"
            " WHERE hypertable_name = 'device_events'"
        )
        assert event_chunks == 2  # 9 days apart with 7-day chunks

        # Continuous aggregate: nothing materialised yet (WITH NO DATA), real-time
        # aggregation still answers; after a refresh the buckets are materialised.
        mat_schema, mat_table = await conn.fetchrow(
            "SELECT materialization_hypertable_schema, materialization_hypertable_name"
            " FROM timescaledb_information.continuous_aggregates"
            " WHERE view_name = 'telemetry_hourly'"
        )
        materialised = f'SELECT count(*) FROM "{mat_schema}"."{mat_table}"'
        assert await conn.fetchval(materialised) == 0
        hourly_sql = (
            "SELECT bucket, device_id, samples, battery, smoke_avg, smoke_max,"
            "       temperature_avg, temperature_max"
            " FROM telemetry_hourly WHERE device_id = ANY($1) ORDER BY device_id, bucket"
        )
        realtime = await conn.fetch(hourly_sql, list(DEVICES))
        await conn.execute(
            "CALL refresh_continuous_aggregate("
            "    'telemetry_hourly', $1::timestamptz, $2::timestamptz)",
            START,
            START + timedelta(days=1),
        )
        assert await conn.fetchval(materialised) == len(DEVICES) * MINUTES // 60
        hourly = await conn.fetch(hourly_sql, list(DEVICES))
        # The API's hourly history query runs on the continuous aggregate.
        device = next(iter(DEVICES))
        served = await conn.fetch(
            query("device_telemetry_hourly"), device, START, START + timedelta(days=1), 100
        )
        assert [row["samples"] for row in served] == [60] * (MINUTES // 60)

        # What the compression policy would do after 7 days, done now: the readings
        # read back the same from the compressed chunk.
        compressed = await conn.fetch("SELECT compress_chunk(c) FROM show_chunks('telemetry') c")
        assert len(compressed) == 1
        assert await conn.fetchval(
            "SELECT bool_and(is_compressed) FROM timescaledb_information.chunks"
            " WHERE hypertable_name = 'telemetry'"
        )
        assert await conn.fetch(select_telemetry, list(DEVICES)) == rows

    expected = _expected_hourly(records)
    for result in (realtime, hourly):
        assert [(row["bucket"], row["device_id"]) for row in result] == list(expected)
        for row in result:
            want = expected[(row["bucket"], row["device_id"])]
            assert row["samples"] == want["samples"] == 60
            for column in AGGREGATES:
                assert row[column] == pytest.approx(want[column], rel=1e-12), column


def _expected_hourly(records: list[tuple[object, ...]]) -> dict[tuple[datetime, str], dict]:
    index = {name: i for i, name in enumerate(TELEMETRY_COLUMNS)}
    groups: dict[tuple[datetime, str], list[tuple[object, ...]]] = defaultdict(list)
    for record in records:
        at = record[index["time"]]
        assert isinstance(at, datetime)
        groups[(at.replace(minute=0, second=0, microsecond=0), str(record[1]))].append(record)

    def values(rows: list[tuple[object, ...]], name: str) -> list[float]:
        return [float(v) for row in rows if isinstance(v := row[index[name]], float)]

    return {
        key: {
            "samples": len(rows),
            "battery": fmean(values(rows, "battery")),
            "smoke_avg": fmean(values(rows, "smoke")),
            "smoke_max": max(values(rows, "smoke")),
            "temperature_avg": fmean(values(rows, "temperature")),
            "temperature_max": max(values(rows, "temperature")),
        }
        for key, rows in sorted(groups.items(), key=lambda item: (item[0][1], item[0][0]))
    }


async def test_migrate_again_applies_nothing(migrated: list[str], timescale_dsn: str) -> None:
    assert migrated == EXPECTED_STEPS
    async with asyncio.timeout(DB_TIMEOUT_S):
        assert await migrate(timescale_dsn) == []
    async with connection(timescale_dsn) as conn, asyncio.timeout(DB_TIMEOUT_S):
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(EXPECTED_STEPS)
        # The server resets the shared PGlite session between connections: migrate's
        # advisory lock is gone and no transaction is left open.
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'") == 0


async def test_retention_and_compression_follow_the_settings(
    migrated: list[str], timescale_dsn: str
) -> None:
    from gridwarden.config import Settings
    from gridwarden.retention import apply_policies

    settings = Settings(telemetry_retention_days=90, telemetry_compress_after_days=3)
    default = Settings()
    async with connection(timescale_dsn) as conn:
        try:
            assert await apply_policies(conn, settings)
            ages = {
                proc: await conn.fetchval(query("telemetry_policy_age"), proc)
                for proc in ("policy_retention", "policy_compression")
            }
            assert ages == {
                "policy_retention": timedelta(days=90),
                "policy_compression": timedelta(days=3),
            }
        finally:
            await apply_policies(conn, default)  # the other tests expect the defaults
        assert await conn.fetchval(query("telemetry_policy_age"), "policy_retention") == (
            timedelta(days=365)
        )
