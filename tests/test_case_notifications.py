"""Case notifications: every case change reaches the operators' live stream as an
`event: case` (cell filter included), and with `webhook_url` every worker notification is
also POSTed to a webhook through the outbox (retried until a 2xx, MQTT never held back)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from pydantic import ValidationError

from alerting import cases
from alerting.alarms_api import AlarmFeed, attach_alarms
from alerting.alarms_api import router as alarms_router
from alerting.cases import SYSTEM, Actor, open_case_for_report
from alerting.cases_api import attach_cases
from alerting.cases_api import router as cases_router
from alerting.intake import CaseIntake
from alerting.outbox import OUTBOX_ID_HEADER, OutboxPublisher
from alerting.sla import SlaTimers
from gridwarden.auth import create_token
from gridwarden.clock import ManualClock
from gridwarden.config import ConfigError, Settings, load_settings
from gridwarden.db import create_pool
from gridwarden.embedded import free_port
from gridwarden.service import bind_http, http_task
from gridwarden.web import AppState, create_app
from rules.engine import AlarmOp
from rules.store import apply_op
from tests.ingest_helpers import WAIT_S, wait_for

T0 = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
CASE_KEYS = {
    "id", "alarm_ids", "cell_id", "state", "assignee", "level", "priority", "created_at",
    "due_at", "due_step", "title", "category", "origin", "device_id", "location", "escalations",
    "rating",
}  # fmt: skip


def _box(min_lon: float, min_lat: float, max_lon: float, max_lat: float) -> dict[str, Any]:
    ring = [[min_lon, min_lat], [max_lon, min_lat], [max_lon, max_lat], [min_lon, max_lat],
            [min_lon, min_lat]]  # fmt: skip
    return {"type": "Polygon", "coordinates": [ring]}


# street s1 > community c1 > grids g1, g2; community c2 > grid g3
CELLS = [
    ("s1", "street", None, (116.0, 39.8, 116.4, 40.0)),
    ("c1", "community", "s1", (116.0, 39.8, 116.2, 40.0)),
    ("c2", "community", "s1", (116.2, 39.8, 116.4, 40.0)),
    ("g1", "grid", "c1", (116.0, 39.8, 116.1, 40.0)),
    ("g2", "grid", "c1", (116.1, 39.8, 116.2, 40.0)),
    ("g3", "grid", "c2", (116.2, 39.8, 116.4, 40.0)),
]
IN_G2 = {"lat": 39.9, "lon": 116.15}
# (id, role, the cell they cover)
WORKERS = [
    ("w-c1", "grid_worker", "c1"),  # grids g1 and g2
    ("w-c1b", "grid_worker", "c1"),
    ("w-g3", "grid_worker", "g3"),
    ("lead", "grid_leader", "s1"),
]


def settings(prefix: str, webhook_url: str | None = None) -> Settings:
    return Settings(topic_prefix=prefix, webhook_url=webhook_url, sla_minor_accept_s=60)


@dataclass
class City:
    pool: asyncpg.Pool
    prefix: str
    clock: ManualClock
    tokens: dict[str, dict[str, str]] = field(default_factory=dict)


@pytest.fixture
async def city(database_url: str, topic_prefix: str) -> AsyncIterator[City]:
    pool = await create_pool(database_url)
    try:
        for cell_id, level, parent, box in CELLS:
            await pool.execute(
                "INSERT INTO cells (id, name, level, parent_id, geometry, min_lon, min_lat, "
                "max_lon, max_lat) VALUES ($1, $1, $2, $3, $4::jsonb, $5, $6, $7, $8)",
                cell_id, level, parent, orjson.dumps(_box(*box)).decode(), *box,
            )  # fmt: skip
        for worker_id, role, cell_id in WORKERS:
            await pool.execute(
                "INSERT INTO workers (id, name, role) VALUES ($1, $1, $2)", worker_id, role
            )
            await pool.execute(
                "INSERT INTO worker_cells (worker_id, cell_id) VALUES ($1, $2)", worker_id, cell_id
            )
        opened = City(pool, topic_prefix, ManualClock(T0))
        opened.tokens["operator"] = await _bearer(pool, "operator")
        for worker_id, *_ in WORKERS:
            opened.tokens[worker_id] = await _bearer(pool, "worker", worker_id)
        yield opened
    finally:
        await pool.close()


async def _bearer(pool: asyncpg.Pool, role: str, worker: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {await create_token(pool, role, worker)}"}  # type: ignore[arg-type]


async def open_report(
    city: City, cell_id: str, *, webhook_url: str | None = None, report_id: str = "r1"
) -> int:
    """A person's report in `cell_id`, opened and dispatched in one transaction."""
    async with city.pool.acquire() as conn, conn.transaction():
        case = await open_case_for_report(
            conn, report_id=report_id, cell_id=cell_id, lat=39.9, lon=116.15, category="占道经营",
            description="路口有流动摊贩", priority="minor",
            policy=settings(city.prefix).sla_policy("minor"), reporter=SYSTEM,
            topic_prefix=city.prefix, now=city.clock.now(), webhook_url=webhook_url,
        )  # fmt: skip
    return int(case["id"])


async def outbox(pool: asyncpg.Pool, channel: str) -> list[asyncpg.Record]:
    return list(
        await pool.fetch(
            "SELECT id, topic, payload::text AS payload, published_at, attempts FROM outbox "
            "WHERE channel = $1 ORDER BY id",
            channel,
        )
    )


# -- the live stream


@dataclass
class Served:
    http: httpx.AsyncClient
    stop: asyncio.Event


@asynccontextmanager
async def serving(city: City, config: Settings) -> AsyncIterator[Served]:
    """The alarm and case endpoints on a real HTTP server (SSE needs one), with the feed."""
    feed = AlarmFeed(city.pool, heartbeat_s=0.3)
    app = create_app(AppState(city.pool), routers=[alarms_router, cases_router])
    attach_alarms(app, feed=feed, topic_prefix=city.prefix)
    attach_cases(app, settings=config, clock=city.clock)
    sock = bind_http("127.0.0.1", 0)
    host, port = sock.getsockname()[:2]
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(feed.run(stop), name="alarm-feed"),
        asyncio.create_task(http_task(app, sock)(stop), name="http"),
    ]
    try:
        async with asyncio.timeout(WAIT_S):
            await feed.listening.wait()
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=WAIT_S) as http:
            yield Served(http, stop)
    finally:
        stop.set()
        async with asyncio.timeout(WAIT_S):
            await asyncio.gather(*tasks)
        sock.close()


class Events:
    """The SSE events of a streaming response, as field dicts (comments skipped)."""

    def __init__(self, response: httpx.Response) -> None:
        self._lines = response.aiter_lines()

    async def next(self, within_s: float = WAIT_S) -> dict[str, str]:
        block: list[str] = []
        async with asyncio.timeout(within_s):
            async for line in self._lines:
                if line:
                    block.append(line)
                elif block and not block[0].startswith(":"):
                    return dict(item.split(": ", 1) for item in block)
                else:
                    block = []
        raise EOFError("stream ended")

    async def next_case(self) -> dict[str, Any]:
        fields = await self.next()
        assert fields["event"] == "case", fields
        assert "id" not in fields  # not replayed: the client's Last-Event-ID stays an alarm's
        data: dict[str, Any] = orjson.loads(fields["data"])
        return data


async def test_case_changes_reach_the_stream_with_the_cell_filter(city: City) -> None:
    op = city.tokens["operator"]
    async with (
        serving(city, settings(city.prefix)) as served,
        served.http.stream("GET", "/api/alarms/stream?cell=c1", headers=op) as in_c1,
        served.http.stream("GET", "/api/alarms/stream", headers=op) as everywhere,
    ):
        c1_events, all_events = Events(in_c1), Events(everywhere)
        # Opened and dispatched in one transaction: one event, the latest action.
        outside = await open_report(city, "g3", report_id="outside")
        inside = await open_report(city, "g2", report_id="inside")
        case = await all_events.next_case()
        assert (case["id"], case["cell_id"], case["state"], case["change"]) == (
            outside, "g3", "dispatched", "dispatched")  # fmt: skip
        for events in (c1_events, all_events):  # g3 is not below c1: skipped there
            case = await events.next_case()
            assert set(case) == CASE_KEYS | {"change"}  # no timeline
            assert (case["id"], case["cell_id"], case["state"], case["assignee"]) == (
                inside, "g2", "dispatched", "w-c1")  # fmt: skip
            assert case["change"] == "dispatched"

        # An action through the cases API.
        accepted = await served.http.post(
            f"/api/cases/{inside}/accept", headers=city.tokens["w-c1"]
        )
        assert accepted.status_code == 200, accepted.text
        for events in (c1_events, all_events):
            case = await events.next_case()
            assert (case["id"], case["state"], case["change"]) == (inside, "accepted", "accept")

        # A refused action rolls back: nothing is announced. Then `alerting.cases` functions
        # in a transaction of their own.
        again = await served.http.post(f"/api/cases/{inside}/accept", headers=city.tokens["w-c1"])
        assert again.status_code == 409
        worker = Actor("w-c1", "worker", "w-c1", "grid_worker")
        async with city.pool.acquire() as conn, conn.transaction():
            await cases.act(conn, inside, "arrive", worker, {}, now=city.clock.now(),
                            topic_prefix=city.prefix)  # fmt: skip
        for events in (c1_events, all_events):
            case = await events.next_case()
            assert (case["id"], case["state"], case["change"]) == (inside, "on_site", "arrive")

        # Alarm events are as they were: `id:` (for Last-Event-ID), `event: alarm`.
        alarm_id = await city.pool.fetchval(
            "INSERT INTO alarms (source, device_id, kind, rule, severity, cell_id, first_seen, "
            "last_seen) VALUES ('smoke-1', 'smoke-1', 'smoke_detector', 'smoke.alarm', 'major', "
            "'g1', now(), now()) RETURNING id"
        )
        acked = await served.http.post(f"/api/alarms/{alarm_id}/ack", headers=op)
        assert acked.status_code == 200
        for events in (c1_events, all_events):
            fields = await events.next()
            assert (fields["event"], orjson.loads(fields["data"])["id"]) == ("alarm", alarm_id)
            assert datetime.fromisoformat(fields["id"]).tzinfo is not None
    assert await outbox(city.pool, "webhook") == []  # no webhook_url: no webhook rows


# -- the webhook


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@asynccontextmanager
async def receiver(answers: list[int], port: int = 0) -> AsyncIterator[tuple[str, list[Received]]]:
    """A tiny HTTP server: records each request and answers the next status of `answers`
    (200 once they run out). Yields its URL and the requests so far."""
    got: list[Received] = []
    pending = list(answers)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            method, path, _ = head[0].split(" ", 2)
            headers = {
                name.strip().lower(): value.strip()
                for name, value in (line.split(":", 1) for line in head[1:] if line)
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            got.append(Received(method, path, headers, body))
            status = pending.pop(0) if pending else 200
            writer.write(
                f"HTTP/1.1 {status} Whatever\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                .encode()
            )  # fmt: skip
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    bound = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{bound}/hooks/gridwarden", got


@asynccontextmanager
async def publishing(pool: asyncpg.Pool, mqtt_url: str) -> AsyncIterator[OutboxPublisher]:
    publisher = OutboxPublisher(pool, mqtt_url, poll_s=0.1, retry_max_s=1.0)
    stop = asyncio.Event()
    task = asyncio.create_task(publisher.run(stop), name="outbox")
    try:
        yield publisher
    finally:
        stop.set()
        async with asyncio.timeout(WAIT_S):
            await task


async def test_a_dispatch_is_posted_to_the_webhook_retried_until_2xx(
    city: City, mqtt_url: str
) -> None:
    async with receiver([500]) as (url, got), publishing(city.pool, mqtt_url):
        case_id = await open_report(city, "g2", webhook_url=url)
        (hook,) = await wait_for(
            lambda: outbox(city.pool, "webhook"), lambda rows: rows[0]["published_at"] is not None
        )
        await asyncio.sleep(0.5)  # time enough for a repeat, were there one
        assert len(got) == 2  # 500, then 200: published once, then left alone
    (mqtt,) = await outbox(city.pool, "mqtt")
    assert mqtt["topic"] == f"{city.prefix}/workers/w-c1/cases"
    assert mqtt["published_at"] is not None
    assert hook["topic"] == url
    assert hook["attempts"] == 2
    sent = orjson.loads(mqtt["payload"])
    assert (sent["case_id"], sent["reason"]) == (case_id, "dispatched")
    for request in got:
        assert (request.method, request.path) == ("POST", "/hooks/gridwarden")
        assert request.headers["content-type"] == "application/json"
        assert request.headers[OUTBOX_ID_HEADER.lower()] == str(hook["id"])
        assert orjson.loads(request.body) == {"worker_id": "w-c1", **sent}


async def test_an_unreachable_webhook_does_not_hold_back_mqtt(city: City, mqtt_url: str) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    async with publishing(city.pool, mqtt_url):
        await open_report(city, "g2", webhook_url=url)
        await wait_for(
            lambda: outbox(city.pool, "mqtt"), lambda rows: rows[0]["published_at"] is not None
        )
        (hook,) = await wait_for(
            lambda: outbox(city.pool, "webhook"), lambda rows: rows[0]["attempts"] >= 2
        )
        assert hook["published_at"] is None  # still trying, with backoff
        async with receiver([], port=port) as (_, got):  # the endpoint comes back
            (hook,) = await wait_for(
                lambda: outbox(city.pool, "webhook"),
                lambda rows: rows[0]["published_at"] is not None,
            )
        assert len(got) == 1
        assert orjson.loads(got[0].body)["worker_id"] == "w-c1"


async def test_every_notification_path_queues_the_webhook(city: City) -> None:
    """The setting reaches notify_worker from the cases API (reports and actions), the SLA
    timer and the case intake (a raised alarm's case)."""
    url = "https://hooks.example.org/gw"
    config = settings(city.prefix, url)
    app = create_app(AppState(city.pool), routers=[cases_router])
    attach_cases(app, settings=config, clock=city.clock)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        body = {**IN_G2, "category": "占道经营", "description": "路口有流动摊贩"}
        reported = await client.post("/api/reports", json=body, headers=city.tokens["operator"])
        assert reported.status_code == 201, reported.text
        case_id = reported.json()["id"]
        moved = await client.post(
            f"/api/cases/{case_id}/reassign", json={"worker_id": "w-c1b"},
            headers=city.tokens["operator"],
        )  # fmt: skip
        assert moved.status_code == 200, moved.text
    city.clock.advance(61)  # w-c1b misses the accept deadline: up to the leader
    assert await SlaTimers(city.pool, config, city.clock).tick_once() == 1

    async with city.pool.acquire() as conn, conn.transaction():
        op = AlarmOp("raise", "cover-1", "manhole.open", "cover-1", "manhole_cover", "major",
                     "g3", None, city.clock.now())  # fmt: skip
        await apply_op(conn, op, city.prefix)
    assert await CaseIntake(city.pool, config, city.clock).drain() == 1

    hooks = [(r["topic"], orjson.loads(r["payload"])) for r in await outbox(city.pool, "webhook")]
    mqtt = [orjson.loads(r["payload"]) for r in await outbox(city.pool, "mqtt")]
    mqtt = [p for p in mqtt if "reason" in p]  # worker messages, not alarm changes
    assert [(topic, p["worker_id"], p["reason"]) for topic, p in hooks] == [
        (url, "w-c1", "dispatched"),
        (url, "w-c1b", "reassigned"),
        (url, "lead", "escalated"),
        (url, "w-g3", "dispatched"),
    ]
    # The same messages as on MQTT, plus whom they are for.
    assert [{k: v for k, v in p.items() if k != "worker_id"} for _, p in hooks] == mqtt


@pytest.mark.parametrize(
    "value", ["ftp://example.org/hook", "example.org/hook", "http://", "https:///path", ""]
)
def test_webhook_url_must_be_http(value: str) -> None:
    with pytest.raises(ValidationError, match="http:// or https://"):
        Settings(webhook_url=value)
    with pytest.raises(ConfigError, match="GRIDWARDEN_WEBHOOK_URL"):
        load_settings(webhook_url=value)


def test_webhook_url_defaults_to_none() -> None:
    assert Settings().webhook_url is None
    assert Settings(webhook_url="https://h.example/x?a=1").webhook_url == "https://h.example/x?a=1"
    assert Settings(webhook_url="http://127.0.0.1:9000/").webhook_url == "http://127.0.0.1:9000/"
