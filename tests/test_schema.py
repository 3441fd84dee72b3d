"""Migrating from empty gives exactly the schema in gridwarden/sql/schema.sql, and
migrating again changes nothing."""

from __future__ import annotations

import uuid
from importlib import resources

import asyncpg

from gridwarden.migrate import load_migrations, migrate

CATALOG_QUERIES = {
    "columns": """
        SELECT table_name, column_name, data_type, is_nullable, column_default
        FROM information_schema.columns WHERE table_schema = 'public'
        ORDER BY table_name, column_name""",
    "constraints": """
        SELECT conrelid::regclass::text AS tbl, conname, pg_get_constraintdef(oid) AS def
        FROM pg_constraint WHERE connamespace = 'public'::regnamespace
        ORDER BY tbl, conname""",
    "indexes": """
        SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'
        ORDER BY tablename, indexname""",
    "views": """
        SELECT viewname, pg_get_viewdef(viewname::regclass) AS def FROM pg_views
        WHERE schemaname = 'public' ORDER BY viewname""",
    "table_options": """
        SELECT relname, reloptions FROM pg_class
        WHERE relnamespace = 'public'::regnamespace AND relkind = 'r' ORDER BY relname""",
}


async def describe(conn: asyncpg.Connection) -> dict[str, list[tuple[object, ...]]]:
    return {
        name: [tuple(row) for row in await conn.fetch(sql)] for name, sql in CATALOG_QUERIES.items()
    }


async def _fresh_database(admin_url: str) -> tuple[str, str]:
    name = f"schema_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name, admin_url.rsplit("/", 1)[0] + f"/{name}"


async def test_migrating_from_empty_equals_the_schema_file(embedded_postgres):
    admin_url = embedded_postgres.dsn_for("postgres")
    _, migrated_url = await _fresh_database(admin_url)
    _, schema_url = await _fresh_database(admin_url)

    expected = [
        f"{m.version:03d}_{m.name} ({m.flavour})"
        for m in load_migrations()
        if m.flavour in ("any", "plain")
    ]
    assert await migrate(migrated_url) == expected
    assert await migrate(migrated_url) == []  # idempotent

    schema_sql = (resources.files("gridwarden") / "sql" / "schema.sql").read_text("utf-8")
    migrated = await asyncpg.connect(migrated_url)
    from_file = await asyncpg.connect(schema_url)
    try:
        await from_file.execute(schema_sql)
        assert await describe(migrated) == await describe(from_file)
    finally:
        await migrated.close()
        await from_file.close()
