"""The ingest device directory's incremental refresh, against PostgreSQL."""

from __future__ import annotations

import asyncpg

from ingest.directory import DeviceDirectory
from tests.ingest_helpers import TEST_DEVICES, register_devices


async def test_refresh_loads_only_when_something_changed(database_url: str) -> None:
    # Right after an import the minute of overlap covers every device; reloading them all
    # on each refresh (every 2 s) cost seconds of CPU a minute at 100,000 devices.
    await register_devices(database_url, TEST_DEVICES)
    directory = DeviceDirectory()
    conn = await asyncpg.connect(database_url)
    try:
        assert await directory.refresh(conn) == len(TEST_DEVICES)
        await directory.refresh(conn)  # the watermark moved: one more look
        assert await directory.refresh(conn) == 0
        assert await directory.refresh(conn) == 0
        await conn.execute(
            "INSERT INTO devices (id, kind, lat, lon, interval_s) "
            "VALUES ('late-1', 'smart_bin', 29.08, 120.65, 60)"
        )
        assert await directory.refresh(conn) >= 1
        assert directory.lookup("late-1") is not None
        await conn.execute("UPDATE devices SET interval_s = 120, updated_at = now() "
                           "WHERE id = 'late-1'")  # fmt: skip
        assert await directory.refresh(conn) >= 1
        device = directory.lookup("late-1")
        assert device is not None
        assert device.interval_s == 120
    finally:
        await conn.close()
