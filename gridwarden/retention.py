"""Telemetry retention from the settings, on both flavours of the schema.

TimescaleDB: the retention and compression policies of `telemetry` are set to
`telemetry_retention_days` / `telemetry_compress_after_days` at every start (replaced only
when they differ), and TimescaleDB's own jobs do the work. Plain PostgreSQL has neither:
the `retention` task deletes rows older than the retention, in batches, every
`PRUNE_INTERVAL_S` (compression does not exist there).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from typing import Final

import asyncpg

from gridwarden.config import Settings
from gridwarden.db import query
from gridwarden.supervisor import TaskFn

log = logging.getLogger(__name__)

PRUNE_INTERVAL_S: Final = 3600.0
PRUNE_BATCH_ROWS: Final = 50_000


async def apply_policies(conn: asyncpg.Connection, settings: Settings) -> bool:
    """Bring the TimescaleDB policies to the settings; False on plain PostgreSQL."""
    if not await conn.fetchval(query("timescale_installed")):
        return False
    wanted = {
        "policy_retention": ("telemetry_set_retention", settings.telemetry_retention_days),
        "policy_compression": ("telemetry_set_compression", settings.telemetry_compress_after_days),
    }
    for proc, (change, days) in wanted.items():
        if await conn.fetchval(query("telemetry_policy_age"), proc) != timedelta(days=days):
            await conn.execute(query(change), days)
            log.info("telemetry %s set to %d days", proc.removeprefix("policy_"), days)
    return True


async def prune_plain(conn: asyncpg.Connection | asyncpg.Pool, retention_days: int) -> int:
    """Delete telemetry older than the retention (plain PostgreSQL); rows deleted."""
    deleted = 0
    while True:
        status = await conn.execute(query("telemetry_prune_plain"), retention_days,
                                    PRUNE_BATCH_ROWS)  # fmt: skip
        count = int(status.split()[-1])
        deleted += count
        if count < PRUNE_BATCH_ROWS:
            return deleted


def retention_task(pool: asyncpg.Pool, settings: Settings) -> TaskFn:
    async def run(stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                deleted = await prune_plain(pool, settings.telemetry_retention_days)
                if deleted:
                    log.info("retention: %d telemetry rows older than %d days deleted",
                             deleted, settings.telemetry_retention_days)  # fmt: skip
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("retention: will retry: %s", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PRUNE_INTERVAL_S):
                    await stop.wait()

    return run
