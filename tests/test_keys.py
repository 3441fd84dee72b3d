"""The card and phone hash key: configured, or random, made once and kept in the database
(gridwarden/keys.py), the same for every process; a database holding hashes made with the
old public default keeps that one (migration 010)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from pathlib import Path

import asyncpg

from gridwarden.config import Settings
from gridwarden.db import create_pool
from gridwarden.keys import PUBLIC_DEFAULT_KEY, credential_hash_key
from gridwarden.migrate import load_migrations
from gridwarden.registry import import_file
from gridwarden.sample_city import build_sample_city, write_sample_city
from tests.ingest_helpers import (
    TEST_DEVICES,
    fetchval,
    publish,
    publisher,
    register_devices,
    running_ingest,
    settings_for,
    wait_for,
)

UNSET = Settings(credential_hash_key=None)


async def test_an_unset_key_is_made_once_at_random_and_shared(database_url):
    pool = await create_pool(database_url, min_size=10, max_size=10)
    try:
        # Ten processes starting at once: one key, which all of them get.
        keys = await asyncio.gather(*(credential_hash_key(pool, UNSET) for _ in range(10)))
        again = await credential_hash_key(pool, UNSET)
        rows = await pool.fetchval("SELECT count(*) FROM service_keys")
    finally:
        await pool.close()
    assert len(set(keys)) == 1
    assert again == keys[0]
    assert len(again) == 64
    assert again != PUBLIC_DEFAULT_KEY
    assert rows == 1


async def test_a_configured_key_is_used_and_none_is_made(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        key = await credential_hash_key(conn, Settings(credential_hash_key="configured"))
        rows = await conn.fetchval("SELECT count(*) FROM service_keys")
    finally:
        await conn.close()
    assert (key, rows) == ("configured", 0)


async def test_events_and_workers_are_hashed_with_the_database_key(
    database_url, mqtt_url, topic_prefix, tmp_path: Path
):
    files = write_sample_city(tmp_path)
    conn = await asyncpg.connect(database_url)
    try:
        for kind, path in (("grid", files.grid), ("devices", files.devices),
                           ("workers", files.workers)):  # fmt: skip
            await import_file(conn, kind, path, UNSET)
        key = await conn.fetchval("SELECT value FROM service_keys WHERE name = 'credential_hash'")
        phone_hashes = {
            row["phone_hash"] for row in await conn.fetch("SELECT phone_hash FROM workers")
        }
    finally:
        await conn.close()
    phone = build_sample_city().workers[0]["phone"]
    assert hmac.new(key.encode(), phone.encode(), hashlib.sha256).hexdigest() in phone_hashes

    await register_devices(database_url, TEST_DEVICES)
    settings = settings_for(database_url, mqtt_url, topic_prefix, credential_hash_key=None)
    async with running_ingest(settings), publisher(mqtt_url) as client:
        await publish(client, f"{topic_prefix}/dev/door-1/event",
                      {"seq": 1, "event": "access_denied", "credential": "CARD-1234"})  # fmt: skip
        stored = await wait_for(
            lambda: fetchval(database_url, "SELECT credential_hash FROM device_events"),
            lambda value: value is not None,
        )
    assert stored == hmac.new(key.encode(), b"CARD-1234", hashlib.sha256).hexdigest()
    public = hmac.new(PUBLIC_DEFAULT_KEY.encode(), b"CARD-1234", hashlib.sha256).hexdigest()
    assert stored != public


async def test_a_database_with_hashes_made_with_the_public_default_keeps_it(database_url):
    """Migration 010 on a database that already stored a hash (made, before, with the public
    default): the key stays, so stored hashes still match; with none stored, no key is kept."""
    (migration,) = [m for m in load_migrations() if m.name == "service_keys"]
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("DROP TABLE service_keys")
        await conn.execute(migration.sql)
        assert await conn.fetchval("SELECT count(*) FROM service_keys") == 0
        await conn.execute("DROP TABLE service_keys")
        await conn.execute(
            "INSERT INTO workers (id, name, role, phone_hash)"
            " VALUES ('w-old', 'old', 'grid_worker', 'abc')"
        )
        await conn.execute(migration.sql)
        kept = await credential_hash_key(conn, UNSET)
    finally:
        await conn.close()
    assert kept == PUBLIC_DEFAULT_KEY
