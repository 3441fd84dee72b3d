"""The ingest HTTP endpoints: auth, dead letters, devices, telemetry history."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest

from gridwarden.auth import create_token
from gridwarden.db import create_pool
from gridwarden.web import AppState, create_app
from ingest.api import router
from tests.ingest_helpers import TEST_DEVICES, register_devices

T0 = datetime(2026, 11, 22, 0, 0, tzinfo=UTC)


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, asyncpg.Pool]]:
    pool = await create_pool(database_url)
    app = create_app(AppState(pool), routers=[router])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client, pool
    await pool.close()


async def _bearer(pool: asyncpg.Pool, role: str, worker: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {await create_token(pool, role, worker)}"}  # type: ignore[arg-type]


async def test_no_or_bad_token_is_401_and_workers_cannot_read_dead_letters(api):
    client, pool = api
    assert (await client.get("/api/dead-letters")).status_code == 401
    bad = {"Authorization": "Bearer gw_not-a-real-token"}
    response = await client.get("/api/dead-letters", headers=bad)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid or revoked token"
    await pool.execute("INSERT INTO workers (id, name, role) VALUES ('w1', '王', 'grid_worker')")
    worker = await _bearer(pool, "worker", "w1")
    assert (await client.get("/api/dead-letters", headers=worker)).status_code == 403
    assert (await client.get("/api/devices", headers=worker)).status_code == 200


async def test_dead_letters_are_listed_newest_first_with_cursor(api):
    client, pool = api
    for n in range(5):
        await pool.execute(
            "INSERT INTO dead_letters (topic, device_id, reason, detail, payload) "
            "VALUES ($1, 'd', $2, 'why', $3)",
            f"gw/dev/d/telemetry{n}", "not_json" if n % 2 else "oversized", b"\xff" * n,
        )  # fmt: skip
    headers = await _bearer(pool, "operator")
    page1 = (await client.get("/api/dead-letters?limit=2", headers=headers)).json()
    assert [i["topic"][-1] for i in page1["items"]] == ["4", "3"]
    page2 = (
        await client.get(
            f"/api/dead-letters?limit=2&cursor={page1['next_cursor']}", headers=headers
        )
    ).json()
    assert [i["topic"][-1] for i in page2["items"]] == ["2", "1"]
    assert page2["items"][0]["payload_text"] is None  # not UTF-8: base64 only
    assert page2["items"][0]["payload_base64"] == "//8="
    only = (await client.get("/api/dead-letters?reason=not_json", headers=headers)).json()
    assert {i["reason"] for i in only["items"]} == {"not_json"}
    assert (await client.get("/api/dead-letters?limit=0", headers=headers)).status_code == 422


async def test_device_history_raw_and_bucketed(api, database_url):
    client, pool = api
    await register_devices(database_url, TEST_DEVICES)
    rows = [
        (T0 + timedelta(minutes=10 * i), "bin-1", i, T0, 10.0 + i) for i in range(12)
    ]  # two hours, 10-minute readings, fill rising by 1 %
    await pool.copy_records_to_table(
        "telemetry", records=rows, columns=("time", "device_id", "seq", "received_at", "fill")
    )
    headers = await _bearer(pool, "operator")
    since, until = T0.isoformat(), (T0 + timedelta(hours=2)).isoformat()
    raw = await client.get(
        "/api/devices/bin-1/telemetry", params={"since": since, "until": until}, headers=headers
    )
    assert raw.status_code == 200
    points = raw.json()["points"]
    assert len(points) == 12
    assert points[0] == {"time": "2026-11-22T01:50:00Z", "seq": 11, "fill": 21.0}
    hourly = await client.get(
        "/api/devices/bin-1/telemetry",
        params={"since": since, "until": until, "bucket": 3600},
        headers=headers,
    )
    buckets = hourly.json()["points"]
    assert [(b["bucket"], b["samples"], b["fill"], b["fill_max"]) for b in buckets] == [
        ("2026-11-22T01:00:00Z", 6, 18.5, 21.0),
        ("2026-11-22T00:00:00Z", 6, 12.5, 15.0),
    ]
    # Any other bucket is computed from the readings (the hour comes from the aggregate).
    half_hours = await client.get(
        "/api/devices/bin-1/telemetry",
        params={"since": since, "until": until, "bucket": 1800},
        headers=headers,
    )
    assert [(b["samples"], b["fill_max"]) for b in half_hours.json()["points"]] == [
        (3, 21.0), (3, 18.0), (3, 15.0), (3, 12.0)
    ]  # fmt: skip
    missing = await client.get("/api/devices/nope/telemetry", headers=headers)
    assert missing.status_code == 404
    backwards = await client.get(
        "/api/devices/bin-1/telemetry", params={"since": until, "until": since}, headers=headers
    )
    assert backwards.status_code == 422


async def test_devices_list_and_one(api, database_url):
    client, pool = api
    await register_devices(database_url, TEST_DEVICES)
    headers = await _bearer(pool, "operator")
    page = (await client.get("/api/devices?limit=2", headers=headers)).json()
    assert [d["id"] for d in page["items"]] == ["bin-1", "cover-1"]
    page2 = (
        await client.get(f"/api/devices?limit=10&cursor={page['next_cursor']}", headers=headers)
    ).json()
    assert [d["id"] for d in page2["items"]] == ["door-1", "smoke-1", "smoke-2"]
    one = (await client.get("/api/devices/cover-1", headers=headers)).json()
    assert (one["kind"], one["height_cm"], one["last_seen"]) == ("manhole_cover", 200.0, None)
    assert (await client.get("/api/devices/ghost", headers=headers)).status_code == 404
