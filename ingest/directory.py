"""In-memory view of the device registry for the hot path.

Loaded at start, then refreshed incrementally (`updated_at`) every few seconds and,
rate-limited, when an unknown device shows up, so a freshly imported device is
accepted without a restart and a flood of unknown ids costs at most one query per
`refresh_min_interval_s`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime

import asyncpg

from gridwarden.db import query
from ingest.decode import DeviceInfo

REFRESH_MIN_INTERVAL_S = 2.0


class DeviceDirectory:
    def __init__(
        self,
        refresh_min_interval_s: float = REFRESH_MIN_INTERVAL_S,
        on_change: Callable[[DeviceInfo | None, DeviceInfo], None] | None = None,
    ) -> None:
        self.devices: dict[str, DeviceInfo] = {}
        self.on_change = on_change  # (before, after) of each device a refresh changed
        self._watermark: datetime | None = None
        self._summary: tuple[object, ...] = ()
        self._last_refresh = 0.0
        self._refresh_min_interval_s = refresh_min_interval_s
        self.unknown_seen = False
        self.version = 0  # bumped by every refresh that loaded a change

    def lookup(self, device_id: str) -> DeviceInfo | None:
        device = self.devices.get(device_id)
        if device is None:
            self.unknown_seen = True
        return device

    def ids(self) -> list[str]:
        return list(self.devices)

    def refresh_due(self) -> bool:
        return time.monotonic() - self._last_refresh >= self._refresh_min_interval_s

    async def refresh(self, conn: asyncpg.Connection | asyncpg.Pool) -> int:
        since = self._watermark or datetime.fromtimestamp(0).astimezone()
        row = await conn.fetchrow(query("devices_changed_summary"), since)
        summary = (since, *(row or ()))
        if summary == self._summary:
            self._last_refresh = time.monotonic()
            self.unknown_seen = False
            return 0
        rows = await conn.fetch(query("devices_changed_since"), since)
        initial = self._watermark is None
        for row in rows:
            device = DeviceInfo(
                id=row["id"],
                kind=row["kind"],
                cell_id=row["cell_id"],
                height_cm=row["height_cm"],
                interval_s=row["interval_s"],
                building=row["building"],
            )
            if self.on_change is not None and not initial:  # changes, not the first load
                self.on_change(self.devices.get(device.id), device)
            self.devices[device.id] = device
            self._watermark = row["updated_at"]
        self._summary = summary  # taken before the fetch: a later change differs from it
        if rows:
            self.version += 1
        self._last_refresh = time.monotonic()
        self.unknown_seen = False
        return len(rows)
