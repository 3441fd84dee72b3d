"""The rules engine inside the service: state loaded at start, evaluation inside
the ingest transaction, timers (durations, quiet periods, silences), maintenance
windows and the cell hierarchy kept fresh."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import orjson

from gridwarden.clock import Clock, SystemClock
from gridwarden.config import Settings
from gridwarden.db import query
from gridwarden.readings import DeviceInfo, Reading
from gridwarden.registry import CellLocator
from rules.engine import Engine, Evaluation
from rules.lock import RulesLock
from rules.spec import RuleSet, load_rules
from rules.store import OnRaised, apply_evaluation

log = logging.getLogger(__name__)

REFRESH_S = 5.0
EVALUATE_SLICE = 200  # readings evaluated between two turns of the event loop (~4 ms)


@dataclass(frozen=True)
class MaintenanceWindow:
    device_id: str | None
    cell_id: str | None
    starts_at: datetime
    ends_at: datetime


class MaintenanceWindows:
    """The maintenance windows, indexed by device and by cell: asked of every reading
    (`Engine.muted`). Walking every window and building the cell's ancestors for each
    reading took 2.9 µs a reading with 30 open windows, 0.3 indexed. A cell's windows, its
    ancestors' included, are gathered once per cell; build a new instance when the windows
    or the grid change."""

    def __init__(
        self,
        windows: list[MaintenanceWindow],
        cells_of: Callable[[str | None], tuple[str, ...]],
    ) -> None:
        self._by_device: dict[str, list[MaintenanceWindow]] = {}
        self._by_cell: dict[str, list[MaintenanceWindow]] = {}
        for window in windows:
            if window.device_id is not None:
                self._by_device.setdefault(window.device_id, []).append(window)
            if window.cell_id is not None:
                self._by_cell.setdefault(window.cell_id, []).append(window)
        self._cells_of = cells_of
        self._over_cell: dict[str | None, tuple[MaintenanceWindow, ...]] = {}

    def cover(self, device: DeviceInfo, at: datetime) -> bool:
        """Whether a window on the device, its cell or an ancestor of its cell is open."""
        for window in self._by_device.get(device.id, ()):
            if window.starts_at <= at < window.ends_at:
                return True
        if not self._by_cell:
            return False
        over = self._over_cell.get(device.cell_id)
        if over is None:
            over = self._over_cell[device.cell_id] = tuple(
                window
                for cell in self._cells_of(device.cell_id)
                for window in self._by_cell.get(cell, ())
            )
        return any(window.starts_at <= at < window.ends_at for window in over)


class RulesService:
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        lookup_device: Callable[[str], DeviceInfo | None],
        *,
        on_raised: OnRaised | None = None,
        devices: Callable[[], list[str]] = list,
        devices_version: Callable[[], int] | None = None,
        clock: Clock | None = None,
        ruleset: RuleSet | None = None,
        owns: Callable[[str], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.clock = clock or SystemClock()
        self.ruleset = ruleset or load_rules([settings.rules_dir] if settings.rules_dir else [])
        self.engine = Engine(self.ruleset, lookup_device, self.cells_of, self.muted)
        self.devices = devices
        # Changes whenever `devices` may have (ingest.directory.DeviceDirectory.version):
        # the refresh then looks for devices to start watching. Unset: every refresh.
        self.devices_version = devices_version
        self._devices_version_seen: int | None = None
        # Which rule-state sources (device ids, building:/cell: groups) this engine keeps:
        # with ingest shards (ingest/shards.py), only its shard's; unset: all.
        self.owns = owns or (lambda source: True)
        self.on_raised = on_raised
        # One writer of engine state at a time: the ingest batch (evaluate → commit)
        # and the timers must not interleave on the same keys. Alarm events go first.
        self.lock = RulesLock()
        self._locator: CellLocator | None = None
        self._hierarchy: dict[str, str | None] = {}
        self._windows = MaintenanceWindows([], self.cells_of)
        self._cells_version: str | None = None

    # -- cells and maintenance --------------------------------------------------------
    def cells_of(self, cell_id: str | None) -> tuple[str, ...]:
        if cell_id is None:
            return ()
        if self._locator is None or self._locator.get(cell_id) is None:
            return (cell_id,)
        return tuple(self._locator.ancestors(cell_id))

    def muted(self, device: DeviceInfo, at: datetime) -> bool:
        return self._windows.cover(device, at)

    async def refresh(self, conn: asyncpg.Connection | asyncpg.Pool) -> None:
        rows = await conn.fetch(query("active_maintenance"))
        windows = [MaintenanceWindow(**dict(row)) for row in rows]
        # The grid is re-read only when it changed: rebuilding it every refresh took one
        # callback of 20-60 ms with a city's cells, and an alarm arriving waited for it.
        cells_version = await conn.fetchval(query("registry_cells_version"))
        if cells_version != self._cells_version or self._locator is None:
            if isinstance(conn, asyncpg.Pool):
                async with conn.acquire() as one:
                    self._locator = await CellLocator.from_db(one)
            else:
                self._locator = await CellLocator.from_db(conn)
            self._cells_version = cells_version
            hierarchy = {cell.id: cell.parent_id for cell in self._locator.cells}
            if hierarchy != self._hierarchy:
                # Cell overrides follow the hierarchy. A device that moved cell gets a new
                # plan by itself (the plan is keyed by its cell); re-resolving every
                # device every few seconds would cost seconds of CPU at 100,000 devices.
                self._hierarchy = hierarchy
                self.engine.forget_device_rules()
        self._windows = MaintenanceWindows(windows, self.cells_of)  # after the grid
        # Going through 100,000 devices took 8-16 ms of one callback: only after a change.
        version = None if self.devices_version is None else self.devices_version()
        if version is None or version != self._devices_version_seen:
            now = self.clock.now().timestamp()
            for device_id in self.devices():
                if device_id not in self.engine.heard and self.owns(device_id):
                    self.engine.expect(device_id, now)
            self._devices_version_seen = version

    # -- start -----------------------------------------------------------------------
    async def start(self) -> None:
        """Load durable state: rule state, and when each device was last heard."""
        async with self.pool.acquire() as conn:
            await self.refresh(conn)
            states = [
                (row["source"], row["rule"], orjson.loads(row["state"]))
                for row in await conn.fetch(query("load_rule_states"))
                if self.owns(row["source"])
            ]
            now = self.clock.now().timestamp()
            heard = {
                row["id"]: row["last_seen"].timestamp() if row["last_seen"] else now
                for row in await conn.fetch(query("load_last_heard"))
                if self.owns(row["id"])
            }
        self.engine.load(states, heard)
        log.info("rules: %d rules, %d states restored", len(self.ruleset.rules), len(states))
        await self._restore_samples()

    async def _restore_samples(self) -> None:
        window_s, kinds = self.ruleset.rate_of_rise_scope()
        if not window_s:
            return
        rows = await self.pool.fetch(query("recent_readings"), window_s, kinds)
        readings = [
            Reading("telemetry", row["device_id"], row["time"], row["received_at"], row["seq"],
                    {k: v for k, v in orjson.loads(row["row_json"]).items() if v is not None})
            for row in rows
            if self.owns(row["device_id"])
        ]  # fmt: skip
        rebuilt = self.engine.restore_samples(readings)
        log.info("rules: rate-of-rise samples of %d states rebuilt from %d readings",
                 rebuilt, len(readings))  # fmt: skip

    # -- the ingest hook (called inside the batch transaction) ------------------------
    async def in_transaction(
        self,
        conn: asyncpg.Connection,
        readings: list[Reading],
        hurry: Callable[[], bool],
    ) -> Evaluation:
        # In slices, letting the event loop run in between: a bulk batch's rules (~40 ms
        # for 2,000 readings) must not hold up the case intake's and the outbox's round trips.
        # Not while an alarm event waits for the lock, or is on its way to it (`hurry`):
        # then every turn given away makes it wait longer.
        evaluation = Evaluation()
        for start in range(0, len(readings), EVALUATE_SLICE):
            if start and not hurry() and not self.lock.waiting(urgent=True):
                await asyncio.sleep(0)
            self.engine.evaluate_part(evaluation, readings[start : start + EVALUATE_SLICE])
        self.engine.finish(evaluation)
        if not evaluation.empty:
            await apply_evaluation(conn, evaluation, self.settings.topic_prefix, self.on_raised)
        return evaluation

    def committed(self, evaluation: Evaluation) -> None:
        self.engine.commit(evaluation)

    def urgent_devices(self, readings: list[Reading]) -> set[str]:
        return self.engine.urgent_devices(readings)

    # -- tasks -----------------------------------------------------------------------
    async def tick_once(self) -> Evaluation:
        async with self.lock:
            evaluation = self.engine.tick(self.clock.now())
            if not evaluation.empty:
                async with self.pool.acquire() as conn, conn.transaction():
                    await apply_evaluation(
                        conn, evaluation, self.settings.topic_prefix, self.on_raised
                    )
                self.engine.commit(evaluation)
            return evaluation

    async def run_timers(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.tick_once()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("rule timers: database unavailable (%s); retrying", exc)
            try:
                async with asyncio.timeout(self.settings.rules_tick_s):
                    await stop.wait()
            except TimeoutError:
                pass

    async def run_refresh(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                async with asyncio.timeout(REFRESH_S):
                    await stop.wait()
            except TimeoutError:
                pass
            try:
                await self.refresh(self.pool)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("rules refresh failed, will retry: %s", exc)
