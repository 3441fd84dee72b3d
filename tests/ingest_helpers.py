"""Shared helpers for the ingest tests: a running IngestService and a publisher."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import asyncpg
import orjson

from gridwarden.config import Settings
from gridwarden.db import create_pool
from gridwarden.mqtt_url import parse_mqtt_url
from ingest.consumer import IngestService
from ingest.writer import RulesHook

WAIT_S = 15.0

TEST_DEVICES = [
    ("smoke-1", "smoke_detector", None),
    ("smoke-2", "smoke_detector", None),
    ("cover-1", "manhole_cover", 200.0),
    ("door-1", "door_access", None),
    ("bin-1", "smart_bin", 120.0),
]


def settings_for(database_url: str, mqtt_url: str, prefix: str, **extra: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "mqtt_url": mqtt_url,
        "topic_prefix": prefix,
        "mqtt_client_id": f"ingest-{prefix}",
        "http_port": 0,
        "data_dir": Path("/tmp/gridwarden-tests-unused"),
        "batch_max_delay_ms": 20,
        "last_seen_flush_s": 0.2,
        "device_rate_per_s": 0.0,  # the tests send hundreds of messages per device at once
    }
    values.update(extra)
    return Settings(**values)


async def register_devices(database_url: str, devices: list[tuple[str, str, float | None]]) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.executemany(
            "INSERT INTO devices (id, kind, lat, lon, height_cm, interval_s) "
            "VALUES ($1, $2, 29.08, 120.65, $3, 60)",
            devices,
        )
    finally:
        await conn.close()


@asynccontextmanager
async def running_ingest(
    settings: Settings, rules: RulesHook | None = None
) -> AsyncIterator[IngestService]:
    assert settings.database_url
    assert settings.mqtt_url
    pool = await create_pool(settings.database_url)
    service = IngestService(settings, pool, settings.mqtt_url, rules=rules)
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(service.run(stop), name="ingest"),
        asyncio.create_task(service.maintain(stop), name="maintain"),
    ]
    try:
        async with asyncio.timeout(WAIT_S):
            while not service.subscribed():
                for task in tasks:
                    if task.done():
                        task.result()
                await asyncio.sleep(0.02)
        yield service
    finally:
        stop.set()
        async with asyncio.timeout(WAIT_S):
            await asyncio.gather(*tasks)
        await pool.close()


@asynccontextmanager
async def publisher(mqtt_url: str) -> AsyncIterator[aiomqtt.Client]:
    endpoint = parse_mqtt_url(mqtt_url)
    async with aiomqtt.Client(
        endpoint.host, endpoint.port, identifier=f"pub-{uuid.uuid4().hex[:8]}"
    ) as client:
        yield client


async def publish(client: aiomqtt.Client, topic: str, payload: object, qos: int = 1) -> None:
    if not isinstance(payload, bytes | str):
        payload = orjson.dumps(payload)
    await client.publish(topic, payload, qos=qos)


async def wait_for(
    probe: Callable[[], Awaitable[Any]], done: Callable[[Any], bool], within_s: float = WAIT_S
) -> Any:
    """Poll `probe` until `done(value)`; every wait in the suite is bounded."""
    value = None
    async with asyncio.timeout(within_s):
        while True:
            value = await probe()
            if done(value):
                return value
            await asyncio.sleep(0.05)


async def fetchval(database_url: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def fetch(database_url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def fetchrow(database_url: str, sql: str, *args: Any) -> asyncpg.Record | None:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchrow(sql, *args)
    finally:
        await conn.close()
