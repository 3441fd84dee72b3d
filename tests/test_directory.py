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


async def test_changes_are_reported_but_not_the_first_load(database_url: str) -> None:
    # The ingest shards note each device that changed cell; on the first load (100,000
    # devices) that would be every device, each time pruning the list: quadratic.
    await register_devices(database_url, TEST_DEVICES)
    changes: list[tuple[str | None, str]] = []
    directory = DeviceDirectory(
        on_change=lambda old, new: changes.append((old.id if old else None, new.id))
    )
    conn = await asyncpg.connect(database_url)
    try:
        await directory.refresh(conn)
        assert changes == []
        await conn.execute(
            "INSERT INTO devices (id, kind, lat, lon, interval_s) "
            "VALUES ('late-2', 'smart_bin', 29.08, 120.65, 60)"
        )
        directory._last_refresh = 0.0
        await directory.refresh(conn)
        assert (None, "late-2") in changes  # a new device: no previous view
        assert all(new == "late-2" or old == new for old, new in changes)
    finally:
        await conn.close()


async def test_a_refresh_reads_in_pages_through_devices_changed_together(
    database_url: str,
) -> None:
    # An import writes its devices in one transaction, all with the same updated_at: the
    # pages go by (updated_at, id), or a page boundary among them would skip or repeat some.
    ids = [f"paged-{i:03}" for i in range(25)]
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.executemany(
                "INSERT INTO devices (id, kind, lat, lon, cell_id, interval_s) "
                "VALUES ($1, 'smart_bin', 29.08, 120.65, NULL, 60)",
                [(device_id,) for device_id in ids],
            )
        directory = DeviceDirectory(page_rows=4)
        assert await directory.refresh(conn) == len(ids)
        assert sorted(directory.devices) == ids
        first, second = directory.devices["paged-000"], directory.devices["paged-001"]
        assert first.kind is second.kind  # one string for every device of a kind
        await conn.execute("UPDATE devices SET interval_s = 90, updated_at = now() "
                           "WHERE id = 'paged-007'")  # fmt: skip
        assert await directory.refresh(conn) >= 1
        assert directory.devices["paged-007"].interval_s == 90
    finally:
        await conn.close()
