"""Schema migrations: numbered `.sql` files applied in order on one connection.

A migration `NNN_name.sql` always applies; `NNN_name.timescale.sql` and
`NNN_name.plain.sql` are the two flavours of one step, chosen by whether the
`timescaledb` extension is available. `schema_migrations` records each applied
step, so running again applies nothing (idempotent). An advisory lock keeps two
starting instances from migrating at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

MIGRATION_LOCK_KEY = 0x6757_6D69  # "gWmi": any constant shared by all instances
_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+?)(?:\.(timescale|plain))?\.sql$")

BOOKKEEPING_SQL = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    flavour     text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    flavour: str  # "any", "timescale" or "plain"
    sql: str


def load_migrations() -> list[Migration]:
    folder = resources.files("gridwarden") / "sql" / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match is None:
            continue
        version, name, flavour = match.groups()
        found.append(Migration(int(version), name, flavour or "any", entry.read_text("utf-8")))
    return sorted(found, key=lambda m: (m.version, m.flavour))


async def timescale_available(conn: asyncpg.Connection) -> bool:
    row = await conn.fetchval(
        "SELECT count(*) FROM pg_available_extensions WHERE name = 'timescaledb'"
    )
    return bool(row)


async def migrate(dsn: str) -> list[str]:
    """Bring the database at `dsn` to the current schema; returns the steps applied."""
    conn = await asyncpg.connect(dsn)
    try:
        return await migrate_connection(conn)
    finally:
        await conn.close()


async def migrate_connection(conn: asyncpg.Connection) -> list[str]:
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(BOOKKEEPING_SQL)
        done = {row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        flavour = "timescale" if await timescale_available(conn) else "plain"
        applied: list[str] = []
        for migration in load_migrations():
            if migration.version in done or migration.flavour not in ("any", flavour):
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, flavour) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.flavour,
                )
            done.add(migration.version)
            applied.append(f"{migration.version:03d}_{migration.name} ({migration.flavour})")
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
