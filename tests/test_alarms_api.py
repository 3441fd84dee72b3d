"""The alarm endpoints: list and filters, acknowledge / close, and the SSE live feed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from prometheus_client import REGISTRY

from alerting.alarm_json import ALARM_CHANNEL, OUTBOX_CHANNEL
from alerting.alarms_api import AlarmFeed, attach_alarms, router
from gridwarden.auth import create_token
from gridwarden.db import create_pool
from gridwarden.service import bind_http, http_task
from gridwarden.web import AppState, create_app
from tests.ingest_helpers import WAIT_S, wait_for

T0 = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
PREFIX = "gwt"
ALARM_KEYS = {
    "id", "device_id", "kind", "rule", "severity", "state", "cell_id", "first_seen",
    "last_seen", "count", "cleared_at", "case_id",
}  # fmt: skip
# street s1 > community c1 > grids g1, g2; community c2 > grid g3
CELLS = [
    ("s1", "street", None),
    ("c1", "community", "s1"),
    ("c2", "community", "s1"),
    ("g1", "grid", "c1"),
    ("g2", "grid", "c1"),
    ("g3", "grid", "c2"),
]


@dataclass
class Api:
    client: httpx.AsyncClient
    pool: asyncpg.Pool
    feed: AlarmFeed
    operator: dict[str, str]
    worker: dict[str, str]


async def _bearer(pool: asyncpg.Pool, role: str, worker: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {await create_token(pool, role, worker)}"}  # type: ignore[arg-type]


def _app(pool: asyncpg.Pool, feed: AlarmFeed) -> Any:
    app = create_app(AppState(pool), routers=[router])
    attach_alarms(app, feed=feed, topic_prefix=PREFIX)
    return app


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[Api]:
    pool = await create_pool(database_url)
    await pool.executemany(
        "INSERT INTO cells (id, name, level, parent_id, geometry, min_lon, min_lat, max_lon, "
        "max_lat) VALUES ($1, $1, $2, $3, '{}'::jsonb, 0, 0, 0, 0)",
        CELLS,
    )
    await pool.execute("INSERT INTO workers (id, name, role) VALUES ('w1', '王', 'grid_worker')")
    feed = AlarmFeed(pool, heartbeat_s=0.3)
    transport = httpx.ASGITransport(app=_app(pool, feed))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield Api(
            client, pool, feed, await _bearer(pool, "operator"), await _bearer(pool, "worker", "w1")
        )
    await pool.close()


async def insert_alarm(
    pool: asyncpg.Pool,
    *,
    device: str = "smoke-1",
    rule: str = "smoke_high",
    severity: str = "critical",
    state: str = "active",
    cell: str | None = "g1",
    at: datetime = T0,
) -> int:
    cleared = at + timedelta(minutes=5) if state in ("cleared", "closed") else None
    alarm_id: int = await pool.fetchval(
        "INSERT INTO alarms (source, device_id, kind, rule, severity, state, cell_id, first_seen, "
        "last_seen, count, cleared_at) "
        "VALUES ($1, $2, 'smoke_detector', $3, $4, $5, $6, $7, "
        "        $7::timestamptz + interval '1 minute', 3, $8) "
        "RETURNING id",
        f"{device}/{uuid.uuid4().hex[:6]}", device, rule, severity, state, cell, at, cleared,
    )  # fmt: skip
    return alarm_id


async def test_tokens_and_roles(api: Api) -> None:
    alarm = await insert_alarm(api.pool)
    assert (await api.client.get("/api/alarms")).status_code == 401
    assert (await api.client.post(f"/api/alarms/{alarm}/ack")).status_code == 401
    assert (await api.client.get("/api/alarms/stream")).status_code == 401
    bad = {"Authorization": "Bearer gw_nope"}
    assert (await api.client.get("/api/alarms", headers=bad)).status_code == 401
    # A worker sees alarms of their own cases only; there are no cases yet: an empty list.
    listed = await api.client.get("/api/alarms", headers=api.worker)
    assert listed.status_code == 200
    assert listed.json() == {"items": [], "next_cursor": None}
    refused = await api.client.post(f"/api/alarms/{alarm}/ack", headers=api.worker)
    assert refused.status_code == 403
    assert "operator" in refused.json()["error"]
    assert (
        await api.client.post(f"/api/alarms/{alarm}/close", headers=api.worker)
    ).status_code == 403
    assert (await api.client.get("/api/alarms/stream", headers=api.worker)).status_code == 403
    state = await api.pool.fetchval("SELECT state FROM alarms WHERE id = $1", alarm)
    assert state == "active"


async def test_list_shape_filters_and_cursor(api: Api) -> None:
    ids = {}
    for name, severity, state, cell, device in [
        ("a", "critical", "active", "g1", "smoke-1"),
        ("b", "minor", "acknowledged", "g2", "smoke-2"),
        ("c", "major", "cleared", "g3", "cover-1"),
        ("d", "warning", "closed", None, "bin-1"),
        ("e", "critical", "active", "g3", "door-1"),
    ]:
        ids[name] = await insert_alarm(
            api.pool, severity=severity, state=state, cell=cell, device=device
        )

    async def listed(query: str) -> list[str]:
        response = await api.client.get(f"/api/alarms{query}", headers=api.operator)
        assert response.status_code == 200, response.text
        by_id = {v: k for k, v in ids.items()}
        return [by_id[item["id"]] for item in response.json()["items"]]

    assert await listed("") == ["e", "d", "c", "b", "a"]  # newest first
    assert await listed("?state=active") == ["e", "a"]
    assert await listed("?state=active,acknowledged") == ["e", "b", "a"]
    assert await listed("?severity=critical") == ["e", "a"]
    assert await listed("?severity=minor,major&state=cleared") == ["c"]
    assert await listed("?cell=g1") == ["a"]
    assert await listed("?cell=c1") == ["b", "a"]  # a community: its grids' alarms
    assert await listed("?cell=s1") == ["e", "c", "b", "a"]
    assert await listed("?cell=nowhere") == []
    assert await listed("?device=cover-1") == ["c"]

    one = (await api.client.get("/api/alarms?device=smoke-1", headers=api.operator)).json()
    item = one["items"][0]
    assert set(item) == ALARM_KEYS
    assert item == {
        "id": ids["a"],
        "device_id": "smoke-1",
        "kind": "smoke_detector",
        "rule": "smoke_high",
        "severity": "critical",
        "state": "active",
        "cell_id": "g1",
        "first_seen": "2026-11-22T08:00:00Z",
        "last_seen": "2026-11-22T08:01:00Z",
        "count": 3,
        "cleared_at": None,
        "case_id": None,
    }
    got = await api.client.get(f"/api/alarms/{ids['c']}", headers=api.operator)
    assert got.json()["cleared_at"] == "2026-11-22T08:05:00Z"
    assert (await api.client.get("/api/alarms/999999", headers=api.operator)).status_code == 404

    page1 = (await api.client.get("/api/alarms?limit=2", headers=api.operator)).json()
    assert [i["id"] for i in page1["items"]] == [ids["e"], ids["d"]]
    assert page1["next_cursor"] == str(ids["d"])
    page2 = (
        await api.client.get(
            f"/api/alarms?limit=2&cursor={page1['next_cursor']}", headers=api.operator
        )
    ).json()
    assert [i["id"] for i in page2["items"]] == [ids["c"], ids["b"]]
    page3 = (
        await api.client.get(
            f"/api/alarms?limit=2&cursor={page2['next_cursor']}", headers=api.operator
        )
    ).json()
    assert [i["id"] for i in page3["items"]] == [ids["a"]]
    assert page3["next_cursor"] is None


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("state=open", "state: unknown value 'open'; expected one or more (comma-separated) of "
                       "active, acknowledged, cleared, closed"),
        ("severity=critical,high", "severity: unknown value 'high'"),
        ("limit=0", None),
        ("limit=1001", None),
        ("cursor=abc", None),
    ],
)  # fmt: skip
async def test_bad_filters_are_422(api: Api, query: str, message: str | None) -> None:
    response = await api.client.get(f"/api/alarms?{query}", headers=api.operator)
    assert response.status_code == 422
    if message is not None:
        assert response.json()["error"].startswith(message)


async def _outbox(pool: asyncpg.Pool) -> list[tuple[str, dict[str, Any]]]:
    rows = await pool.fetch("SELECT topic, payload::text AS payload FROM outbox ORDER BY id")
    return [(r["topic"], orjson.loads(r["payload"])) for r in rows]


async def test_acknowledge_and_close_transitions(api: Api) -> None:
    active = await insert_alarm(api.pool, cell="g2")
    cleared = await insert_alarm(api.pool, state="cleared", cell=None, device="smoke-2")
    closed = await insert_alarm(api.pool, state="closed", device="smoke-3")
    operator_token = await api.pool.fetchval(
        "SELECT max(id) FROM api_tokens WHERE role = 'operator'"
    )

    acked = await api.client.post(f"/api/alarms/{active}/ack", headers=api.operator)
    assert acked.status_code == 200
    assert acked.json()["state"] == "acknowledged"
    assert set(acked.json()) == ALARM_KEYS
    row = await api.pool.fetchrow("SELECT acked_at, acked_by FROM alarms WHERE id = $1", active)
    assert row["acked_at"] is not None
    assert row["acked_by"] == f"operator:{operator_token}"

    again = await api.client.post(f"/api/alarms/{active}/ack", headers=api.operator)
    assert again.status_code == 409
    assert again.json() == {"error": f"alarm {active} is already acknowledged"}

    # Acknowledging a cleared alarm closes it.
    done = await api.client.post(f"/api/alarms/{cleared}/ack", headers=api.operator)
    assert done.status_code == 200
    assert done.json()["state"] == "closed"
    row = await api.pool.fetchrow("SELECT closed_at, acked_by FROM alarms WHERE id = $1", cleared)
    assert row["closed_at"] is not None
    assert row["acked_by"] == f"operator:{operator_token}"

    shut = await api.client.post(f"/api/alarms/{closed}/ack", headers=api.operator)
    assert shut.status_code == 409
    assert shut.json() == {"error": f"alarm {closed} is already closed"}
    missing = await api.client.post("/api/alarms/424242/ack", headers=api.operator)
    assert missing.status_code == 404
    assert missing.json() == {"error": "no alarm 424242"}

    # Close: any state but closed.
    closing = await api.client.post(f"/api/alarms/{active}/close", headers=api.operator)
    assert closing.status_code == 200
    assert closing.json()["state"] == "closed"
    assert (
        await api.client.post(f"/api/alarms/{active}/close", headers=api.operator)
    ).status_code == 409
    assert (
        await api.client.post("/api/alarms/424242/close", headers=api.operator)
    ).status_code == 404

    # Each change queued one MQTT message; the refused ones none.
    outbox = await _outbox(api.pool)
    assert [(topic, p["id"], p["state"], p["change"]) for topic, p in outbox] == [
        (f"{PREFIX}/alarms/g2", active, "acknowledged", "acknowledged"),
        (f"{PREFIX}/alarms/unassigned", cleared, "closed", "closed"),
        (f"{PREFIX}/alarms/g2", active, "closed", "closed"),
    ]
    assert set(outbox[0][1]) == ALARM_KEYS | {"change"}


async def test_a_change_notifies_on_commit(api: Api, database_url: str) -> None:
    alarm = await insert_alarm(api.pool)
    listener = await asyncpg.connect(database_url)
    heard: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    try:
        for channel in (ALARM_CHANNEL, OUTBOX_CHANNEL):
            await listener.add_listener(
                channel, lambda _c, _p, ch, payload: heard.put_nowait((ch, payload))
            )
        await api.client.post(f"/api/alarms/{alarm}/ack", headers=api.operator)
        async with asyncio.timeout(WAIT_S):
            got = {await heard.get(), await heard.get()}
        assert got == {(ALARM_CHANNEL, str(alarm)), (OUTBOX_CHANNEL, "")}
        # A refused transition changes nothing and notifies nobody.
        await api.client.post(f"/api/alarms/{alarm}/ack", headers=api.operator)
        await asyncio.sleep(0.2)
        assert heard.empty()
    finally:
        await listener.close()


async def test_endpoints_need_the_wiring(database_url: str) -> None:
    pool = await create_pool(database_url)
    try:
        app = create_app(AppState(pool), routers=[router])  # attach_alarms forgotten
        headers = await _bearer(pool, "operator")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/api/alarms/1/ack", headers=headers)
        assert response.status_code == 503
        assert "attach_alarms" in response.json()["error"]
    finally:
        await pool.close()


# -- the SSE feed, against a real HTTP server (httpx.ASGITransport buffers whole responses)


@dataclass
class Served:
    api: Api
    base_url: str
    http: httpx.AsyncClient
    stop: asyncio.Event
    tasks: list[asyncio.Task[None]]


@asynccontextmanager
async def serving(api: Api) -> AsyncIterator[Served]:
    sock = bind_http("127.0.0.1", 0)
    host, port = sock.getsockname()[:2]
    stop = asyncio.Event()
    app = _app(api.pool, api.feed)
    tasks = [
        asyncio.create_task(api.feed.run(stop), name="alarm-feed"),
        asyncio.create_task(http_task(app, sock)(stop), name="http"),
    ]
    try:
        async with asyncio.timeout(WAIT_S):
            await api.feed.listening.wait()
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=WAIT_S) as http:
            yield Served(api, f"http://{host}:{port}", http, stop, tasks)
    finally:
        stop.set()
        async with asyncio.timeout(WAIT_S):
            await asyncio.gather(*tasks)
        sock.close()


class EventReader:
    """Reads SSE blocks (`field: value` lines up to a blank line) off a streaming response."""

    def __init__(self, response: httpx.Response) -> None:
        self._lines = response.aiter_lines()

    async def next_block(self, within_s: float = WAIT_S) -> list[str]:
        block: list[str] = []
        async with asyncio.timeout(within_s):
            async for line in self._lines:
                if line == "":
                    if block:
                        return block
                    continue
                block.append(line)
        raise EOFError(f"stream ended; partial block {block!r}")

    async def rest(self) -> list[list[str]]:
        """Every block until the server ends the stream."""
        blocks = []
        while True:
            try:
                blocks.append(await self.next_block())
            except EOFError:
                return blocks

    async def next_alarm(self, within_s: float = WAIT_S) -> tuple[str, dict[str, Any]]:
        """The next `alarm` event (skipping comments): its id and its data."""
        while True:
            block = await self.next_block(within_s)
            if block[0].startswith(":"):
                continue
            fields = dict(line.split(": ", 1) for line in block)
            assert fields["event"] == "alarm"
            return fields["id"], orjson.loads(fields["data"])


async def test_stream_sends_each_change(api: Api) -> None:
    minor = await insert_alarm(api.pool, severity="minor", device="smoke-2")
    critical = await insert_alarm(api.pool, severity="critical", cell="g3")
    streams_before = REGISTRY.get_sample_value("gridwarden_alarm_streams") or 0.0
    async with serving(api) as served:
        async with served.http.stream(
            "GET", "/api/alarms/stream?severity=critical,major", headers=api.operator
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = EventReader(response)
            assert await events.next_block() == [": connected"]
            # A minor alarm's change is filtered out; the critical one's arrives.
            for alarm_id in (minor, critical):
                acked = await served.http.post(f"/api/alarms/{alarm_id}/ack", headers=api.operator)
                assert acked.status_code == 200
            event_id, alarm = await events.next_alarm()
            assert (alarm["id"], alarm["state"], alarm["cell_id"]) == (
                critical, "acknowledged", "g3"
            )  # fmt: skip
            assert set(alarm) == ALARM_KEYS
            assert datetime.fromisoformat(event_id).tzinfo is not None
            # A change by another writer (the rules engine) in its own transaction.
            async with api.pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "UPDATE alarms SET count = count + 1, updated_at = now() WHERE id = $1",
                    critical,
                )
                await conn.execute("SELECT pg_notify('gw_alarm', $1)", str(critical))
            _, alarm = await events.next_alarm()
            assert (alarm["id"], alarm["count"]) == (critical, 4)
            # Idle: heartbeats keep the connection alive.
            assert await events.next_block(within_s=2) == [": keepalive"]
            assert REGISTRY.get_sample_value("gridwarden_alarm_streams") == streams_before + 1
        # The client went away: the server lets go of its stream.
        await wait_for(
            lambda: asyncio.sleep(0, REGISTRY.get_sample_value("gridwarden_alarm_streams")),
            lambda open_streams: open_streams == streams_before,
        )


async def test_stream_filters_by_cell_and_ends_on_stop(api: Api) -> None:
    inside = await insert_alarm(api.pool, cell="g2")  # under c1
    outside = await insert_alarm(api.pool, cell="g3", device="smoke-2")
    async with serving(api) as served:
        async with served.http.stream(
            "GET", "/api/alarms/stream?cell=c1", headers=api.operator
        ) as response:
            events = EventReader(response)
            assert await events.next_block() == [": connected"]
            await served.http.post(f"/api/alarms/{outside}/ack", headers=api.operator)
            await served.http.post(f"/api/alarms/{inside}/close", headers=api.operator)
            _, alarm = await events.next_alarm()
            assert (alarm["id"], alarm["state"]) == (inside, "closed")
            # The service stops: the stream ends, so the HTTP server can drain.
            served.stop.set()
            assert set(map(tuple, await events.rest())) <= {(": keepalive",)}
        async with asyncio.timeout(WAIT_S):
            await asyncio.gather(*served.tasks)


async def test_stream_refuses_bad_filters_before_streaming(api: Api) -> None:
    bad = await api.client.get("/api/alarms/stream?severity=loud", headers=api.operator)
    assert bad.status_code == 422
    assert bad.json()["error"].startswith("severity: unknown value 'loud'")


async def test_stream_replays_changes_since_the_last_event(api: Api) -> None:
    old = await insert_alarm(api.pool, device="smoke-1")
    await api.pool.execute(
        "UPDATE alarms SET updated_at = now() - interval '1 hour' WHERE id = $1", old
    )
    recent = await insert_alarm(api.pool, device="smoke-2")
    async with serving(api) as served:
        since = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
        async with served.http.stream(
            "GET", "/api/alarms/stream", params={"since": since}, headers=api.operator
        ) as response:
            events = EventReader(response)
            assert await events.next_block() == [": connected"]
            last_id, alarm = await events.next_alarm()
            assert alarm["id"] == recent  # the alarm changed an hour ago is not resent

        # A client reconnecting with Last-Event-ID gets what changed meanwhile.
        await served.http.post(f"/api/alarms/{old}/ack", headers=api.operator)
        headers = {**api.operator, "Last-Event-ID": last_id}
        async with served.http.stream("GET", "/api/alarms/stream", headers=headers) as response:
            events = EventReader(response)
            assert await events.next_block() == [": connected"]
            seen = {}
            while old not in seen:
                _, alarm = await events.next_alarm()
                seen[alarm["id"]] = alarm["state"]
            assert seen[old] == "acknowledged"

        bad = await served.http.get(
            "/api/alarms/stream", params={"since": "2026-11-22T08:00:00"}, headers=api.operator
        )
        assert bad.status_code == 422
        assert bad.json()["error"] == "since needs a UTC offset (RFC 3339)"


async def test_feed_survives_losing_its_database_connection(api: Api) -> None:
    alarm = await insert_alarm(api.pool)
    async with (
        serving(api) as served,
        served.http.stream("GET", "/api/alarms/stream", headers=api.operator) as response,
    ):
        events = EventReader(response)
        assert await events.next_block() == [": connected"]
        killed = await api.pool.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        assert killed >= 1
        # A change while nobody listens is resent once the feed is back.
        await wait_for(lambda: asyncio.sleep(0, api.feed.listening.is_set()), lambda v: not v)
        await api.pool.execute(
            "UPDATE alarms SET state = 'cleared', cleared_at = now(), updated_at = now() "
            "WHERE id = $1",
            alarm,
        )
        _, got = await events.next_alarm()
        assert (got["id"], got["state"]) == (alarm, "cleared")
        await wait_for(lambda: asyncio.sleep(0, api.feed.listening.is_set()), lambda v: v)
        assert (
            await served.http.post(f"/api/alarms/{alarm}/ack", headers=api.operator)
        ).status_code == 200
        _, got = await events.next_alarm()
        assert (got["id"], got["state"]) == (alarm, "closed")
