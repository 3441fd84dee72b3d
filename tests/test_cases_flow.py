"""Alarms into cases under concurrency (the raises, then the case intakes that open the
cases, several at once), and a case notification that survives kill -9 between the commit
that wrote it and the broker's PUBACK."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import asyncpg
import orjson

from alerting.intake import CaseIntake
from alerting.outbox import OUTBOX_ID_PROPERTY
from gridwarden.clock import ManualClock
from gridwarden.config import Settings
from gridwarden.db import create_pool
from gridwarden.mqtt_url import parse_mqtt_url
from rules.engine import AlarmOp
from rules.store import apply_op
from tests.ingest_helpers import WAIT_S, fetch, publish, publisher, wait_for
from tests.test_rules_integration import register
from tests.test_service_process import service_env, service_process

T0 = datetime(2030, 3, 1, 8, 0, tzinfo=UTC)


async def add_worker(database_url: str, worker_id: str, role: str = "grid_worker") -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO workers (id, name, role) VALUES ($1, $2, $3)", worker_id, "李娜", role
        )
        await conn.execute(
            "INSERT INTO worker_cells (worker_id, cell_id) VALUES ($1, 'g1')", worker_id
        )
    finally:
        await conn.close()


def smoke(device_id: str, building: str) -> AlarmOp:
    return AlarmOp("raise", device_id, "smoke.alarm", device_id, "smoke_detector", "critical",
                   "g1", building, T0)  # fmt: skip


INTAKES = 8


async def raise_concurrently(database_url: str, prefix: str, ops: list[AlarmOp]) -> None:
    """Each op in its own transaction, all at once; then the queued alarms get their cases
    from several case intakes at once, one alarm per batch (as several instances would)."""
    settings = Settings(topic_prefix=prefix, data_dir=Path("/tmp/gridwarden-tests-unused"))
    pool = await create_pool(database_url, min_size=20, max_size=25)

    async def one(op: AlarmOp) -> None:
        conn: asyncpg.Connection
        async with pool.acquire() as conn, conn.transaction():
            await apply_op(conn, op, prefix)

    intakes = [CaseIntake(pool, settings, ManualClock(T0), batch=1) for _ in range(INTAKES)]
    try:
        async with asyncio.timeout(WAIT_S * 2):
            cases = await pool.fetchval("SELECT count(*) FROM cases")
            await asyncio.gather(*(one(op) for op in ops))
            assert await pool.fetchval("SELECT count(*) FROM cases") == cases  # none inline
            await asyncio.gather(*(intake.drain() for intake in intakes))
        assert await pool.fetchval("SELECT count(*) FROM case_intake") == 0
    finally:
        await pool.close()


async def worker_messages(database_url: str, prefix: str) -> list[asyncpg.Record]:
    return await fetch(
        database_url,
        "SELECT topic, payload::text AS payload, published_at, attempts FROM outbox"
        " WHERE topic LIKE $1"
        " ORDER BY id",
        f"{prefix}/workers/%",
    )


# -- duplicates under concurrency ----------------------------------------------------------
async def test_50_concurrent_duplicates_of_an_alarm_make_one_case(
    database_url: str, topic_prefix: str
) -> None:
    await register(database_url, [("smoke-7", "smoke_detector", 300, "5号楼")])
    await add_worker(database_url, "w-li")
    await raise_concurrently(database_url, topic_prefix, [smoke("smoke-7", "5号楼")] * 50)

    alarms = await fetch(database_url, "SELECT id, count, state, case_id FROM alarms")
    assert [(a["count"], a["state"]) for a in alarms] == [(50, "active")]
    cases = await fetch(database_url, "SELECT * FROM cases")
    assert len(cases) == 1
    (case,) = cases
    assert (case["incident_key"], case["state"], case["assignee"]) == (
        "building:g1/5号楼", "dispatched", "w-li")  # fmt: skip
    assert alarms[0]["case_id"] == case["id"]
    sent = await worker_messages(database_url, topic_prefix)
    assert [(m["topic"], orjson.loads(m["payload"])["reason"]) for m in sent] == [
        (f"{topic_prefix}/workers/w-li/cases", "dispatched")
    ]
    actions = await fetch(database_url, "SELECT action FROM case_events ORDER BY id")
    assert [e["action"] for e in actions] == ["reported", "dispatched"]


async def test_smoke_in_one_building_from_two_detectors_is_one_case(
    database_url: str, topic_prefix: str
) -> None:
    await register(database_url, [
        ("smoke-7", "smoke_detector", 300, "5号楼"),
        ("smoke-8", "smoke_detector", 300, "5号楼"),
        ("smoke-9", "smoke_detector", 300, "6号楼"),
    ])  # fmt: skip
    await add_worker(database_url, "w-li")
    ops = [smoke("smoke-7", "5号楼"), smoke("smoke-8", "5号楼")] * 10
    await raise_concurrently(database_url, topic_prefix, ops)

    alarms = await fetch(database_url, "SELECT device_id, count, case_id FROM alarms ORDER BY 1")
    assert [(a["device_id"], a["count"]) for a in alarms] == [("smoke-7", 10), ("smoke-8", 10)]
    cases = await fetch(database_url, "SELECT id, incident_key FROM cases")
    assert [c["incident_key"] for c in cases] == ["building:g1/5号楼"]
    assert {a["case_id"] for a in alarms} == {cases[0]["id"]}
    assert len(await worker_messages(database_url, topic_prefix)) == 1  # dispatched once
    actions = await fetch(database_url, "SELECT action FROM case_events ORDER BY id")
    assert [e["action"] for e in actions] == ["reported", "dispatched", "alarm_joined"]

    # Another building is another incident.
    await raise_concurrently(database_url, topic_prefix, [smoke("smoke-9", "6号楼")] * 5)
    keys = await fetch(database_url, "SELECT incident_key FROM cases ORDER BY id")
    assert [k["incident_key"] for k in keys] == ["building:g1/5号楼", "building:g1/6号楼"]


# -- kill -9 between commit and publish ------------------------------------------------------
async def _read_packet(reader: asyncio.StreamReader) -> bytes:
    """One whole MQTT control packet: fixed header, remaining length, the rest."""
    header = await reader.readexactly(1)
    length, shift, encoded = 0, 0, b""
    while True:
        byte = await reader.readexactly(1)
        encoded += byte
        length |= (byte[0] & 0x7F) << shift
        shift += 7
        if not byte[0] & 0x80:
            break
    return header + encoded + await reader.readexactly(length)


def _body(packet: bytes) -> bytes:
    index = 1
    while packet[index] & 0x80:
        index += 1
    return packet[index + 1 :]


def _connect_client_id(packet: bytes) -> str:
    body = _body(packet)
    name_length = int.from_bytes(body[0:2], "big")
    index = 2 + name_length
    level = body[index]
    index += 1 + 1 + 2  # level, flags, keep-alive
    if level == 5:  # MQTT 5: properties before the payload
        length, shift = 0, 0
        while True:
            byte = body[index]
            index += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        index += length
    id_length = int.from_bytes(body[index : index + 2], "big")
    return body[index + 2 : index + 2 + id_length].decode()


def _publish_topic(packet: bytes) -> str:
    body = _body(packet)
    return body[2 : 2 + int.from_bytes(body[0:2], "big")].decode()


class BlackholeProxy:
    """A TCP proxy in front of the broker. While `closed`, a client whose MQTT client id
    starts with `victim` gets its CONNECT through (the broker answers, the client believes
    it is connected) and then nothing more: its PUBLISH packets vanish here, so no PUBACK
    ever comes. Everyone else, and everyone once it is opened, passes untouched."""

    def __init__(self, host: str, port: int, victim: str) -> None:
        self.host, self.port, self.victim = host, port, victim
        self.closed = True
        self.swallowed: list[str] = []  # topics of the PUBLISH packets that vanished
        self.swallowed_publish = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            connect = await _read_packet(reader)
            up_reader, upstream = await asyncio.open_connection(self.host, self.port)
            self._writers.add(upstream)
            upstream.write(connect)
            await upstream.drain()
            gated = self.closed and _connect_client_id(connect).startswith(self.victim)
            client_to_broker = self._swallow(reader) if gated else self._pipe(reader, upstream)
            pumps = [
                asyncio.create_task(client_to_broker),
                asyncio.create_task(self._pipe(up_reader, writer)),
            ]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for one in (writer, upstream):
                if one is not None:
                    one.close()
                    self._writers.discard(one)
                    with contextlib.suppress(OSError):
                        await one.wait_closed()
            self._tasks.discard(task)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                packet = await _read_packet(reader)
                if packet[0] >> 4 == 3:  # PUBLISH
                    self.swallowed.append(_publish_topic(packet))
                    self.swallowed_publish.set()


@asynccontextmanager
async def blackhole_proxy(mqtt_url: str, victim: str) -> AsyncIterator[tuple[BlackholeProxy, str]]:
    endpoint = parse_mqtt_url(mqtt_url)
    proxy = BlackholeProxy(endpoint.host, endpoint.port, victim)
    port = await proxy.start()
    try:
        yield proxy, f"mqtt://127.0.0.1:{port}"
    finally:
        async with asyncio.timeout(WAIT_S):
            await proxy.stop()


async def test_a_case_notification_survives_kill_9_between_commit_and_puback(
    database_url: str, mqtt_url: str, topic_prefix: str, tmp_path: Path
) -> None:
    """The service runs behind a proxy that lets ingest through but black-holes the outbox
    publisher's packets after its CONNECT. A smoke alarm opens a case; the worker's
    notification is committed, claimed and sent, and the PUBLISH vanishes on its way: the
    service is killed with SIGKILL while it waits for the PUBACK. Restarted with the proxy
    open, it delivers the notification: a crash between commit and publish loses nothing."""
    await register(database_url, [("smoke-9", "smoke_detector", 300, "5号楼")])
    await add_worker(database_url, "w-li")
    endpoint = parse_mqtt_url(mqtt_url)
    received: list[aiomqtt.Message] = []

    async def collect(client: aiomqtt.Client) -> None:
        async for message in client.messages:
            received.append(message)

    async with (
        blackhole_proxy(mqtt_url, victim="gridwarden-outbox-") as (proxy, proxied_url),
        aiomqtt.Client(
            endpoint.host, endpoint.port, identifier=f"phone-{uuid.uuid4().hex[:8]}",
            protocol=aiomqtt.ProtocolVersion.V5,
        ) as phone,  # the worker's app, straight on the broker
        publisher(mqtt_url) as device,
    ):  # fmt: skip
        await phone.subscribe(f"{topic_prefix}/workers/+/cases", qos=1)
        collector = asyncio.create_task(collect(phone))
        env = service_env(database_url, proxied_url, topic_prefix, tmp_path)
        try:
            async with service_process(env) as (process, _):
                await publish(
                    device, f"{topic_prefix}/dev/smoke-9/telemetry", {"seq": 1, "alarm": True}
                )
                # The case and its notification are committed (with the alarm) ...
                (row,) = await wait_for(lambda: worker_messages(database_url, topic_prefix), bool)
                # ... and the publisher has sent a PUBLISH that will never be acknowledged.
                async with asyncio.timeout(WAIT_S):
                    await proxy.swallowed_publish.wait()
                process.kill()
                await process.wait()
            assert proxy.swallowed[0].startswith(f"{topic_prefix}/")
            assert row["topic"] == f"{topic_prefix}/workers/w-li/cases"
            notification = orjson.loads(row["payload"])
            assert (notification["reason"], notification["state"]) == ("dispatched", "dispatched")

            # After the crash: committed (seen from a new connection), not published (the
            # publisher's claim died with it: not even counted as an attempt), and nothing
            # reached the worker.
            (after_crash,) = await worker_messages(database_url, topic_prefix)
            assert (after_crash["payload"], after_crash["published_at"]) == (row["payload"], None)
            assert after_crash["attempts"] == 0
            await asyncio.sleep(0.5)
            assert received == []

            proxy.closed = False
            async with service_process(env):
                await wait_for(lambda: asyncio.sleep(0, received), bool)
                published = await wait_for(
                    lambda: worker_messages(database_url, topic_prefix),
                    lambda rows: rows[0]["published_at"] is not None,
                )
                await asyncio.sleep(0.5)  # a duplicate would arrive now
        finally:
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector

    (message,) = received
    assert message.topic.value == f"{topic_prefix}/workers/w-li/cases"
    assert orjson.loads(message.payload) == notification
    properties: Any = message.properties  # paho's Properties sets its attributes dynamically
    outbox_id = dict(properties.UserProperty)[OUTBOX_ID_PROPERTY]
    row_id = await fetch(
        database_url, "SELECT id FROM outbox WHERE topic = $1", message.topic.value
    )
    assert outbox_id == str(row_id[0]["id"])
    assert len(published) == 1
    case = await fetch(database_url, "SELECT id, state, assignee FROM cases")
    assert [(c["id"], c["state"], c["assignee"]) for c in case] == [
        (notification["case_id"], "dispatched", "w-li")
    ]
