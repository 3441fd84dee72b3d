"""Ingest shards: several gridwarden processes share ingest without breaking the order of
any device's messages or its rule state.

Shard `i` of `N` (`GRIDWARDEN_INGEST_SHARDS`) is a pair of persistent MQTT sessions with
client ids of its own (`gridwarden-ingest-s{i}`, `…-s{i}-events`) and is run by exactly
one process at a time: the holder of the PostgreSQL advisory lock (SHARD_LOCK_CLASS, i),
taken on a connection of its own. A process that dies (even `kill -9`) loses its
connection and so its locks; another process takes the shard over, connects with the same
client ids and resumes the sessions, with every message the broker queued meanwhile.

Which shard a message belongs to: the shard of its device's *cell* (so all devices of a
building or a cell, which correlation rules look at together, share one engine), or for a
device the registry does not know, of its id. Every shard's sessions subscribe to the same
topics (Mosquitto has no hash-based shared subscriptions; EMQX's `hash_topic` strategy would
spare the copies), so each message reaches every shard; a shard acknowledges the messages of
other shards without storing them. A device moved to another cell is processed by both the
old and the new shard for MOVE_GRACE_S, so two processes whose registry views differ for a
moment never both skip a message (the database stores repeated `(device, seq)` once).

With one shard (the default) this is a hot standby: a second process waits for the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

import asyncpg

from gridwarden.db import query
from gridwarden.readings import DeviceInfo
from ingest import metrics

log = logging.getLogger(__name__)

SHARD_LOCK_CLASS: Final = 0x6777  # advisory lock (class, shard): 'gw'
MEMBER_LOCK_CLASS: Final = 0x6778  # advisory lock (class, backend pid): one per process
MOVE_GRACE_S: Final = 30.0
CLAIM_INTERVAL_S: Final = 1.0  # how often a process looks at members and free shards
REBALANCE_AFTER: Final = 2  # claim rounds over its fair share before a process hands one over
LOCK_CHECK_TIMEOUT_S: Final = 5.0
RETAKE_S: Final = 3.0  # after a reconnect, how long our old session may take to end


def _hash(text: str) -> int:
    return zlib.crc32(text.encode())


@dataclass
class ShardMap:
    """Which of `count` shards a device, a rule-state source or a topic belongs to."""

    count: int
    lookup_device: Callable[[str], DeviceInfo | None]
    prefix: str = "gw"
    # device id -> (shard it belonged to before its last move, when it moved)
    moved: dict[str, tuple[int, float]] = field(default_factory=dict)
    _pruned_at: float = 0.0

    def of_cell(self, cell_id: str) -> int:
        return _hash(cell_id) % self.count

    def of_device(self, device_id: str) -> int:
        device = self.lookup_device(device_id)
        return self._shard_of(device_id, device.cell_id if device is not None else None)

    def of_source(self, source: str) -> int:
        """Rule-state sources: a device id, `building:{cell}/{building}` or `cell:{cell}`."""
        kind, sep, rest = source.partition(":")
        if sep and kind in ("building", "cell"):
            return self.of_cell(rest.split("/", 1)[0])
        return self.of_device(source)

    def device_of_topic(self, topic: str) -> str | None:
        parts = topic.split("/")
        if len(parts) == 4 and parts[0] == self.prefix:
            if parts[1] == "dev":
                return parts[2]
            if parts[1] == "codec":
                return parts[3]
        return None

    def owns_topic(self, shard: int, topic: str) -> bool:
        device_id = self.device_of_topic(topic)
        if device_id is None:
            return _hash(topic) % self.count == shard  # a bad topic: one shard dead-letters it
        if self.of_device(device_id) == shard:
            return True
        before = self.moved.get(device_id)
        return (
            before is not None
            and before[0] == shard
            and time.monotonic() - before[1] < (MOVE_GRACE_S)
        )

    def note_change(self, old: DeviceInfo | None, new: DeviceInfo) -> None:
        """A registry refresh changed a device: remember its old shard if it moved."""
        now = time.monotonic()
        before = self._shard_of(old.id if old else new.id, old.cell_id if old else None)
        if before != self._shard_of(new.id, new.cell_id):
            self.moved[new.id] = (before, now)
        if now - self._pruned_at >= 1.0:  # at most once a second: a refresh may bring many
            self._pruned_at = now
            for device_id, (_, at) in list(self.moved.items()):
                if now - at >= MOVE_GRACE_S:
                    del self.moved[device_id]

    def _shard_of(self, device_id: str, cell_id: str | None) -> int:
        return self.of_cell(cell_id) if cell_id else _hash(device_id) % self.count


RunShard = Callable[[int, asyncio.Event], Coroutine[Any, Any, None]]


class ShardOwner:
    """Takes free shards (advisory locks on a connection of its own) and runs each with
    `run_shard(shard, stop)` until the service stops. A shard's lock is never given up
    while its task runs; if the lock connection is lost, the owner reconnects and takes its
    own shards back first. Processes count each other through a member lock each, and one
    holding more than ceil(shards / processes) hands its highest shard over (stopped,
    then unlocked), so a process that joins gets its share within a few seconds."""

    def __init__(
        self,
        dsn: str,
        count: int,
        run_shard: RunShard,
        on_claimed: Callable[[frozenset[int]], None] = lambda owned: None,
    ) -> None:
        self.dsn = dsn
        self.on_claimed = on_claimed
        self.count = count
        self.run_shard = run_shard
        self.owned: dict[int, tuple[asyncio.Event, asyncio.Task[None]]] = {}
        self._conn: asyncpg.Connection | None = None
        self._over = 0  # claim rounds in a row holding more than the fair share
        self._stale_pid: int | None = None  # the backend of a lock connection we lost

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                await self._claim()
                self.on_claimed(frozenset(self.owned))
                metrics.SHARDS_OWNED.set(len(self.owned))
                for shard, (_, task) in list(self.owned.items()):
                    if task.done():
                        task.result()  # a shard that died: the supervisor stops the service
                        del self.owned[shard]
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CLAIM_INTERVAL_S):
                        await stop.wait()
        finally:
            for shard_stop, _ in self.owned.values():
                shard_stop.set()
            await asyncio.gather(*(task for _, task in self.owned.values()))
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    await self._conn.close()

    async def _claim(self) -> None:
        """Take back our shards after a reconnect, hand one over while holding more than a
        fair share (the shards spread evenly over the processes), take free ones up to it."""
        try:
            conn, fresh = await self._connection()
            if fresh:  # a new session holds no locks: join, and take ours back first
                await conn.fetchval(query("shard_join"), MEMBER_LOCK_CLASS)
                if self._stale_pid is not None:
                    # Our previous session may live on behind a half-open connection,
                    # holding our locks: end it (a role may end its own sessions).
                    await conn.fetchval(query("shard_end_session"), self._stale_pid)
                    self._stale_pid = None
                for shard in sorted(self.owned):
                    if not await self._retake(conn, shard):
                        await self._give_up(shard)
            members = await conn.fetchval(query("shard_members"), MEMBER_LOCK_CLASS)
            fair = -(-self.count // max(int(members), 1))
            self._over = self._over + 1 if len(self.owned) > fair else 0
            if self._over > REBALANCE_AFTER:
                shard = max(self.owned)
                log.info("ingest: handing shard %d over (%d processes share %d shards)",
                         shard, members, self.count)  # fmt: skip
                shard_stop, task = self.owned.pop(shard)
                shard_stop.set()
                await task  # the in-flight batch is committed and acknowledged first
                await conn.fetchval(query("shard_unlock"), SHARD_LOCK_CLASS, shard)
                self._over = 0
            for shard in range(self.count):
                if shard in self.owned or len(self.owned) >= fair:
                    continue
                if await conn.fetchval(query("shard_try_lock"), SHARD_LOCK_CLASS, shard):
                    log.info("ingest: running shard %d of %d", shard, self.count)
                    shard_stop = asyncio.Event()
                    task = asyncio.create_task(
                        self.run_shard(shard, shard_stop), name=f"ingest-shard-{shard}"
                    )
                    self.owned[shard] = (shard_stop, task)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            log.warning("ingest shards: lock connection lost (%r); will retake ours", exc)
            if self._conn is not None:
                self._stale_pid = self._conn.get_server_pid()
                self._conn.terminate()
                self._conn = None

    async def _retake(self, conn: asyncpg.Connection, shard: int) -> bool:
        """Our shard's lock on the new session; a moment's patience while the ended old
        session goes away."""
        deadline = time.monotonic() + RETAKE_S
        while not await conn.fetchval(query("shard_try_lock"), SHARD_LOCK_CLASS, shard):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    async def _give_up(self, shard: int) -> None:
        """Another process took the shard while our lock connection was down: stop ours."""
        log.warning("ingest: shard %d was taken over by another process; stopping it here", shard)
        shard_stop, task = self.owned.pop(shard)
        shard_stop.set()
        await task

    async def _connection(self) -> tuple[asyncpg.Connection, bool]:
        """The lock connection, checked; True when it is a new one."""
        if self._conn is not None and not self._conn.is_closed():
            async with asyncio.timeout(LOCK_CHECK_TIMEOUT_S):
                await self._conn.fetchval("SELECT 1")
            return self._conn, False
        async with asyncio.timeout(LOCK_CHECK_TIMEOUT_S):
            self._conn = await asyncpg.connect(self.dsn)
        return self._conn, True
