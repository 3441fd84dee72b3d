"""Measure what a telemetry row costs on disk, for retention and compression sizing.

    .venv/bin/python deploy/measure_telemetry_size.py --database-url postgresql://... \
        [--rows 100000] [--devices 300] [--interval SECONDS]

Against a migrated gridwarden database (plain PostgreSQL or TimescaleDB): copies the
`telemetry` and `telemetry_dedup` tables' definitions (columns and indexes) into scratch
tables `gw_sizing_*`, COPYs realistic readings into them in the writer's own column order
(ingest.writer.TELEMETRY_COLUMNS, binary COPY as ingest does), prints bytes per row as JSON and
drops the scratch tables. The fleet mixes the sample city's kinds (half smoke detectors, a
fifth door controllers, the rest manhole covers and bins), each kind with the fields its
firmware sends (device_sim/load.py), values drifting slowly as real readings do. On TimescaleDB the
scratch table is also made a hypertable with the migration's compression settings, its
chunks are compressed, and the compressed size is reported too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from ingest.writer import DEDUP_COLUMNS, TELEMETRY_COLUMNS

KINDS = (("smoke", 0.50, 300), ("door", 0.20, 300), ("manhole", 0.15, 600), ("bin", 0.15, 900))
TABLE = "gw_sizing_telemetry"
DEDUP = "gw_sizing_dedup"


def fleet(devices: int) -> list[tuple[str, str, int]]:
    """(device id, kind, interval_s) in the sample city's proportions."""
    out = []
    for kind, share, interval in KINDS:
        out += [(f"{kind}-{n:05d}", kind, interval) for n in range(max(1, round(devices * share)))]
    return out


class Device:
    """One device's readings: slow random walks around a normal value, as a sensor's are
    (independent random numbers would be the worst case for compression, not the usual)."""

    def __init__(self, kind: str, rng: random.Random) -> None:
        self.kind = kind
        self.rng = rng
        self.battery = float(rng.randint(60, 100))
        self.rssi = float(rng.randint(-105, -55))
        base = {
            "smoke": {"smoke": 0.3, "temperature": 22.0, "co": 1.0},
            "door": {},
            "manhole": {"tilt": 1.0, "water_level": 15.0, "gas_ch4": 0.2, "gas_h2s": 0.1,
                        "temperature": 15.0},
            "bin": {"fill": 10.0, "temperature": 20.0, "tilt": 0.5, "weight": 10.0},
        }[kind]  # fmt: skip
        self.values = {name: value * rng.uniform(0.5, 1.5) for name, value in base.items()}

    def walk(self, name: str, step: float, low: float, high: float, digits: int) -> float:
        value = min(high, max(low, self.values[name] + self.rng.gauss(0, step)))
        self.values[name] = value
        return round(value, digits)

    def reading(self) -> dict[str, Any]:
        rng = self.rng
        if rng.random() < 0.01:
            self.battery = max(0.0, self.battery - 1)
        common = {"battery": self.battery, "rssi": self.rssi + rng.randint(-3, 3)}
        match self.kind:
            case "smoke":
                return common | {
                    "smoke": self.walk("smoke", 0.02, 0, 2, 2),
                    "temperature": self.walk("temperature", 0.1, 10, 35, 1),
                    "co": self.walk("co", 0.1, 0, 10, 1),
                    "alarm": False,
                    "test": False,
                }
            case "door":
                opened = rng.random() < 0.05
                return common | {"door_open": opened, "locked": not opened}
            case "manhole":
                return common | {
                    "tilt": self.walk("tilt", 0.05, 0, 5, 1),
                    "open": False,
                    "water_level": self.walk("water_level", 0.2, 0, 60, 1),
                    "gas_ch4": self.walk("gas_ch4", 0.02, 0, 3, 2),
                    "gas_h2s": self.walk("gas_h2s", 0.01, 0, 2, 2),
                    "temperature": self.walk("temperature", 0.1, 0, 30, 1),
                }
            case _:
                if rng.random() < 0.01:  # emptied
                    self.values["fill"], self.values["weight"] = 0.0, 0.0
                fill = self.walk("fill", 0.3, 0, 100, 1)
                self.values["fill"] += 0.2
                return common | {
                    "fill": fill,
                    "temperature": self.walk("temperature", 0.1, 0, 40, 1),
                    "tilt": self.walk("tilt", 0.02, 0, 3, 1),
                    "fire": False,
                    "weight": round(fill * 1.2, 1),
                }


def records(
    rows: int, devices: int, interval_s: int | None
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Telemetry and dedup records: each device reporting at its interval, oldest first."""
    rng = random.Random(8)
    members = [(device_id, Device(kind, rng), interval_s or interval)
               for device_id, kind, interval in fleet(devices)]  # fmt: skip
    start = datetime(2026, 11, 1, tzinfo=UTC)
    columns = TELEMETRY_COLUMNS[4:-1]  # the reading fields, between received_at and extra
    telemetry: list[tuple[Any, ...]] = []
    dedup: list[tuple[Any, ...]] = []
    step = 0
    while len(telemetry) < rows:
        for device_id, device, interval in members:
            if len(telemetry) == rows:
                break
            time = start + timedelta(seconds=step * interval + rng.uniform(0, 2))
            received = time + timedelta(milliseconds=rng.randint(20, 900))
            values = device.reading()
            telemetry.append(
                (time, device_id, step, received, *(values.get(c) for c in columns), None)
            )
            dedup.append((device_id, step, received))
        step += 1
    return telemetry, dedup


async def size(conn: asyncpg.Connection, table: str) -> dict[str, int]:
    row = await conn.fetchrow(
        "SELECT pg_total_relation_size($1::regclass) AS total,"
        " pg_relation_size($1::regclass) AS heap, pg_indexes_size($1::regclass) AS indexes",
        table,
    )
    assert row is not None
    return dict(row)


async def measure(
    database_url: str, rows: int, devices: int, interval_s: int | None = None
) -> dict[str, Any]:
    telemetry, dedup = records(rows, devices, interval_s)
    conn = await asyncpg.connect(database_url)
    try:
        timescale = bool(
            await conn.fetchval("SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'")
        )
        for scratch, source in ((TABLE, "telemetry"), (DEDUP, "telemetry_dedup")):
            await conn.execute(f"DROP TABLE IF EXISTS {scratch}")
            await conn.execute(f"CREATE TABLE {scratch} (LIKE {source} INCLUDING ALL)")
        if timescale:
            await conn.execute(
                f"SELECT create_hypertable('{TABLE}', 'time', chunk_time_interval => "
                "INTERVAL '1 day')"
            )
        await conn.copy_records_to_table(TABLE, records=telemetry, columns=TELEMETRY_COLUMNS)
        await conn.copy_records_to_table(DEDUP, records=dedup, columns=DEDUP_COLUMNS)
        await conn.execute(f"VACUUM ANALYZE {TABLE}")
        await conn.execute(f"VACUUM ANALYZE {DEDUP}")
        times = [record[0] for record in telemetry]
        span = max(times) - min(times)
        result: dict[str, Any] = {
            "server": await conn.fetchval("SHOW server_version"),
            "timescaledb": timescale,
            "rows": rows,
            "devices": len(fleet(devices)),
            "interval_s": interval_s or "per kind (300-900)",
            "span_days": round(span.total_seconds() / 86400, 2),
        }
        if timescale:
            before = await conn.fetchval(f"SELECT hypertable_size('{TABLE}')")
            await conn.execute(
                f"ALTER TABLE {TABLE} SET (timescaledb.compress, "
                "timescaledb.compress_segmentby = 'device_id', "
                "timescaledb.compress_orderby = 'time DESC')"
            )
            await conn.execute(f"SELECT compress_chunk(c) FROM show_chunks('{TABLE}') c")
            after = await conn.fetchval(f"SELECT hypertable_size('{TABLE}')")
            result |= {
                "telemetry_bytes": before,
                "telemetry_bytes_per_row": round(before / rows, 1),
                "compressed_bytes": after,
                "compressed_bytes_per_row": round(after / rows, 1),
                "compression_ratio": round(before / after, 1),
            }
        else:
            sizes = await size(conn, TABLE)
            result |= {
                "telemetry_bytes": sizes["total"],
                "telemetry_heap_bytes": sizes["heap"],
                "telemetry_index_bytes": sizes["indexes"],
                "telemetry_bytes_per_row": round(sizes["total"] / rows, 1),
            }
        dedup_size = await size(conn, DEDUP)
        result["dedup_bytes_per_row"] = round(dedup_size["total"] / rows, 1)
        return result
    finally:
        for scratch in (TABLE, DEDUP):
            await conn.execute(f"DROP TABLE IF EXISTS {scratch}")
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database-url", default=os.environ.get("GRIDWARDEN_DATABASE_URL"))
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--devices", type=int, default=300)
    parser.add_argument("--interval", type=int, help="seconds, every device (default: per kind)")
    args = parser.parse_args()
    if not args.database_url:
        parser.error("--database-url or GRIDWARDEN_DATABASE_URL is required")
    result = asyncio.run(measure(args.database_url, args.rows, args.devices, args.interval))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
