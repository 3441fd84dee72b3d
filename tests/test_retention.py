"""Telemetry retention on plain PostgreSQL (TimescaleDB's policies: tests/timescale)."""

from __future__ import annotations

import asyncpg

from gridwarden import retention
from gridwarden.config import Settings
from tests.ingest_helpers import fetchval, register_devices


async def test_plain_postgresql_deletes_only_rows_older_than_the_retention(
    database_url: str, monkeypatch
) -> None:
    await register_devices(database_url, [("smoke-1", "smoke_detector", None)])
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO telemetry (time, device_id, seq, received_at, smoke)"
            " SELECT now() - make_interval(days => d), 'smoke-1', d, now(), 1"
            " FROM generate_series(0, 99) AS d"
        )  # one row a day for 100 days
        assert not await retention.apply_policies(conn, Settings())  # no TimescaleDB here
        monkeypatch.setattr(retention, "PRUNE_BATCH_ROWS", 7)  # several batches
        deleted = await retention.prune_plain(conn, retention_days=30)
    finally:
        await conn.close()
    assert deleted == 70  # days 30..99 (day 30 was exactly 30 days old when inserted)
    oldest = await fetchval(database_url, "SELECT max(seq) FROM telemetry")
    assert oldest == 29
    assert await fetchval(database_url, "SELECT count(*) FROM telemetry") == 30
