"""Several `gridwarden up` processes against one PostgreSQL and one Mosquitto.

Two processes with `GRIDWARDEN_INGEST_SHARDS=2` share ingest (one shard each, after the
rebalance); both also run alerting and the API. Asserted with exact counts: every reading
stored once, one alarm per (device, rule), one fire confirmation per building (the three
detectors of one building are in one shard: correlation still works), one case per
building, one dispatch notification per case; then one process is killed with SIGKILL
mid-stream and the other takes its shard over, with the queued messages.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import asyncpg
import httpx
import pytest

from gridwarden.config import Settings
from gridwarden.registry import import_file
from gridwarden.sample_city import write_sample_city
from tests.ingest_helpers import WAIT_S, fetchval, publish, publisher, wait_for
from tests.test_service_process import service_env, service_process

SHARDS = 2
FIRST_ROUND = 2  # telemetry messages per device before the kill
SECOND_ROUND = 2  # and while one process is dead
BUILDING_ONE = ("smoke-001", "smoke-002", "smoke-003")  # 金鼎花园1幢
BUILDING_TWO = ("smoke-004",)


async def import_city(database_url: str, directory: Path) -> list[str]:
    files = write_sample_city(directory)
    settings = Settings(database_url=database_url, data_dir=directory)
    conn = await asyncpg.connect(database_url)
    try:
        for kind, path in (("grid", files.grid), ("devices", files.devices),
                           ("workers", files.workers)):  # fmt: skip
            await import_file(conn, kind, path, settings)
        return [row["id"] for row in await conn.fetch("SELECT id FROM devices ORDER BY id")]
    finally:
        await conn.close()


async def shards_owned(url: str) -> int:
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        text = (await http.get("/metrics")).text
    match = re.search(r"^gridwarden_ingest_shards_owned (\S+)$", text, re.MULTILINE)
    return int(float(match.group(1))) if match else -1


async def counts(database_url: str) -> dict[str, int]:
    sql = {
        "telemetry": "SELECT count(*) FROM telemetry",
        "distinct": "SELECT count(DISTINCT (device_id, seq)) FROM telemetry",
        "alarms": "SELECT count(*) FROM alarms",
        "cases": "SELECT count(*) FROM cases",
        "dead": "SELECT count(*) FROM dead_letters",
        # Worker notifications published (PUBACKed by the broker) by either process.
        "dispatches": "SELECT count(*) FROM outbox WHERE topic LIKE '%/workers/%'"
        " AND payload->>'reason' = 'dispatched' AND published_at IS NOT NULL",
    }
    return {name: int(await fetchval(database_url, query)) for name, query in sql.items()}


@pytest.mark.slow
async def test_two_processes_share_ingest_and_survive_a_kill(
    database_url: str, mqtt_url: str, topic_prefix: str, tmp_path: Path
) -> None:
    devices = await import_city(database_url, tmp_path / "city")
    env = service_env(database_url, mqtt_url, topic_prefix, tmp_path)
    env["GRIDWARDEN_INGEST_SHARDS"] = str(SHARDS)
    async with service_process(env) as (first, first_url), service_process(env) as (_, url):
        # The first took both shards; it hands one over once it sees the second.
        await wait_for(lambda: shards_owned(url), lambda n: n == 1, within_s=WAIT_S)
        assert await shards_owned(first_url) == 1

        async with publisher(mqtt_url) as client:
            for seq in range(1, FIRST_ROUND + 1):
                for device in devices:
                    await publish(client, f"{topic_prefix}/dev/{device}/telemetry",
                                  {"seq": seq, "battery": 90})  # fmt: skip
            for device in BUILDING_ONE + BUILDING_TWO:
                await publish(client, f"{topic_prefix}/dev/{device}/event",
                              {"seq": 100, "event": "alarm"})  # fmt: skip
        expected_alarms = len(BUILDING_ONE) + len(BUILDING_TWO) + 1  # + fire confirmed
        first_round = len(devices) * FIRST_ROUND
        await wait_for(
            lambda: counts(database_url),
            lambda c: c["telemetry"] >= first_round and c["dispatches"] >= 2,
            within_s=WAIT_S * 2,
        )
        await asyncio.sleep(1.0)  # anything stored twice would show by now
        done = await counts(database_url)
        assert done["telemetry"] == done["distinct"] == first_round
        assert done["alarms"] == expected_alarms
        assert done["cases"] == 2  # one per building
        assert done["dispatches"] == 2
        assert done["dead"] == 0
        rules = await fetchval(
            database_url,
            "SELECT array_agg(rule ORDER BY rule) FROM alarms WHERE device_id = ANY($1)",
            list(BUILDING_ONE),
        )
        assert rules.count("smoke.alarm") == 3

        first.kill()  # SIGKILL: its PostgreSQL sessions die, its shard's lock is freed
        await first.wait()
        async with publisher(mqtt_url) as client:
            for seq in range(FIRST_ROUND + 1, FIRST_ROUND + SECOND_ROUND + 1):
                for device in devices:
                    await publish(client, f"{topic_prefix}/dev/{device}/telemetry",
                                  {"seq": seq, "battery": 89})  # fmt: skip
        await wait_for(lambda: shards_owned(url), lambda n: n == SHARDS, within_s=WAIT_S)
        total = len(devices) * (FIRST_ROUND + SECOND_ROUND)
        await wait_for(
            lambda: counts(database_url), lambda c: c["telemetry"] >= total, within_s=WAIT_S * 2
        )
        await asyncio.sleep(1.0)
        after = await counts(database_url)
        assert after["telemetry"] == after["distinct"] == total
        assert after["alarms"] == expected_alarms
        assert after["cases"] == 2
        assert after["dispatches"] == 2
        assert after["dead"] == 0
