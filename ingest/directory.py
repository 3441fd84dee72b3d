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
from typing import TypeVar

import asyncpg

from gridwarden.db import query
from ingest.decode import DeviceInfo

REFRESH_MIN_INTERVAL_S = 2.0
PAGE_ROWS = 10_000  # devices read per statement


_Text = TypeVar("_Text", str, None)


def _one_copy(strings: dict[str, str], value: _Text) -> _Text:
    return value if value is None else strings.setdefault(value, value)


class DeviceDirectory:
    def __init__(
        self,
        refresh_min_interval_s: float = REFRESH_MIN_INTERVAL_S,
        on_change: Callable[[DeviceInfo | None, DeviceInfo], None] | None = None,
        page_rows: int = PAGE_ROWS,
    ) -> None:
        self.devices: dict[str, DeviceInfo] = {}
        self.page_rows = page_rows
        self._shared_strings: dict[str, str] = {}
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
        initial = self._watermark is None
        # Kinds, cells and buildings repeat across devices: one string each, not one per
        # device (~120 bytes a device, 120 MB at a million).
        strings = self._shared_strings
        loaded = 0
        after: tuple[datetime | None, str | None] = (None, None)
        while True:
            # In pages: one statement for a million devices outlasted the command timeout
            # on a slow machine (the service then failed to start), and built all of them
            # in one callback.
            rows = await conn.fetch(query("devices_changed_since"), since, *after, self.page_rows)
            for row in rows:
                device = DeviceInfo(
                    id=row["id"],
                    kind=_one_copy(strings, row["kind"]),
                    cell_id=_one_copy(strings, row["cell_id"]),
                    height_cm=row["height_cm"],
                    interval_s=row["interval_s"],
                    building=_one_copy(strings, row["building"]),
                )
                if self.on_change is not None and not initial:  # changes, not the first load
                    self.on_change(self.devices.get(device.id), device)
                self.devices[device.id] = device
            loaded += len(rows)
            if rows:
                after = (rows[-1]["updated_at"], rows[-1]["id"])
                self._watermark = after[0]  # the pages come in updated_at order
            if len(rows) < self.page_rows:
                break
        self._summary = summary  # taken before the fetch: a later change differs from it
        if loaded:
            self.version += 1
        self._last_refresh = time.monotonic()
        self.unknown_seen = False
        return loaded
