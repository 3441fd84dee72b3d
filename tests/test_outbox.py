"""The outbox publisher against a real PostgreSQL and Mosquitto: order, payloads, the
broker going away and coming back, refused messages, two publishers at once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import asyncpg
import orjson
import pytest
from prometheus_client import REGISTRY

from alerting.outbox import OUTBOX_ID_PROPERTY, OutboxPublisher
from gridwarden.db import create_pool
from gridwarden.embedded import find_mosquitto, free_port, service_account, wait_for_port
from gridwarden.mqtt_url import parse_mqtt_url
from tests.ingest_helpers import WAIT_S, wait_for
from tests.tcp_proxy import TcpProxy


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url)
    yield pool
    await pool.close()


async def enqueue(
    pool: asyncpg.Pool, messages: list[tuple[str, dict[str, Any]]], *, notify: bool = True
) -> list[int]:
    """Outbox rows as a writer adds them: in one transaction, with the wake-up."""
    async with pool.acquire() as conn, conn.transaction():
        ids = []
        for topic, payload in messages:
            ids.append(
                await conn.fetchval(
                    "INSERT INTO outbox (topic, payload) VALUES ($1, $2::jsonb) RETURNING id",
                    topic,
                    orjson.dumps(payload).decode(),
                )
            )
        if notify:
            await conn.execute("SELECT pg_notify('gw_outbox', '')")
    return ids


async def rows(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return list(await pool.fetch("SELECT id, published_at, attempts FROM outbox ORDER BY id"))


def outbox_id(message: aiomqtt.Message) -> int:
    assert message.properties is not None
    properties = dict(message.properties.UserProperty)
    return int(properties[OUTBOX_ID_PROPERTY])


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@asynccontextmanager
async def collecting(mqtt_url: str, topic_filter: str) -> AsyncIterator[list[aiomqtt.Message]]:
    """Everything published under `topic_filter` while inside, in arrival order."""
    endpoint = parse_mqtt_url(mqtt_url)
    received: list[aiomqtt.Message] = []
    async with aiomqtt.Client(
        endpoint.host,
        endpoint.port,
        identifier=f"sub-{uuid.uuid4().hex[:8]}",
        protocol=aiomqtt.ProtocolVersion.V5,
    ) as client:
        await client.subscribe(topic_filter, qos=1)

        async def collect() -> None:
            async for message in client.messages:
                received.append(message)

        task = asyncio.create_task(collect())
        try:
            yield received
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@asynccontextmanager
async def running(*publishers: OutboxPublisher) -> AsyncIterator[list[asyncio.Task[None]]]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(p.run(stop)) for p in publishers]
    try:
        yield tasks
    finally:
        stop.set()
        async with asyncio.timeout(WAIT_S):
            await asyncio.gather(*tasks)


async def wait_received(received: list[aiomqtt.Message], count: int) -> None:
    await wait_for(lambda: asyncio.sleep(0, len(received)), lambda n: n >= count)


async def test_publishes_in_order_on_notification_and_marks_rows(
    pool: asyncpg.Pool, mqtt_url: str, topic_prefix: str
) -> None:
    published_before = metric("gridwarden_outbox_published_total")
    messages = [
        (f"{topic_prefix}/alarms/g1", {"id": 1, "state": "active", "change": "raised"}),
        (f"{topic_prefix}/alarms/unassigned", {"id": 2, "name": "第1网格", "change": "raised"}),
        (f"{topic_prefix}/alarms/g1", {"id": 1, "state": "acknowledged", "change": "acknowledged"}),
    ]
    publisher = OutboxPublisher(pool, mqtt_url, poll_s=60)  # only the notification wakes it
    async with collecting(mqtt_url, f"{topic_prefix}/#") as received, running(publisher):
        await asyncio.sleep(0.5)  # the publisher found nothing and waits
        ids = await enqueue(pool, messages)
        await wait_received(received, 3)
        await asyncio.sleep(0.2)
        assert len(received) == 3
    assert [(m.topic.value, orjson.loads(m.payload)) for m in received] == messages  # type: ignore[arg-type]
    assert [outbox_id(m) for m in received] == ids
    assert all(m.qos == 1 for m in received)
    assert [(r["published_at"] is not None, r["attempts"]) for r in await rows(pool)] == [
        (True, 1)
    ] * 3
    assert metric("gridwarden_outbox_published_total") == published_before + 3
    assert metric("gridwarden_outbox_lag_seconds") == 0


async def test_a_batch_is_in_flight_at_once_not_one_message_per_round_trip(
    pool: asyncpg.Pool, mqtt_url: str, topic_prefix: str
) -> None:
    # Every PUBACK takes 0.1 s to come back: one message at a time, 40 would take 4 s.
    slow = TcpProxy(parse_mqtt_url(mqtt_url).port, downstream_delay_s=0.1)
    await slow.start()
    try:
        publisher = OutboxPublisher(pool, slow.url, poll_s=60)
        messages = [(f"{topic_prefix}/alarms/g1", {"n": n}) for n in range(40)]
        async with collecting(mqtt_url, f"{topic_prefix}/#") as received, running(publisher):
            started = asyncio.get_running_loop().time()
            ids = await enqueue(pool, messages)
            await wait_for(lambda: rows(pool), lambda rs: all(r["published_at"] for r in rs))
            elapsed = asyncio.get_running_loop().time() - started
            await wait_received(received, 40)
    finally:
        await slow.stop()
    assert [outbox_id(m) for m in received] == ids  # still in order
    assert elapsed < 2.0, f"40 messages took {elapsed:.1f} s (connecting included): one by one?"


async def test_polls_when_a_notification_is_missed(
    pool: asyncpg.Pool, mqtt_url: str, topic_prefix: str
) -> None:
    publisher = OutboxPublisher(pool, mqtt_url, poll_s=0.2, batch=2)
    async with collecting(mqtt_url, f"{topic_prefix}/#") as received, running(publisher):
        await asyncio.sleep(0.3)
        ids = await enqueue(pool, [(f"{topic_prefix}/x", {"n": n}) for n in range(5)], notify=False)
        await wait_received(received, 5)
    assert [outbox_id(m) for m in received] == ids  # in order across batches


async def test_broker_down_then_back(pool: asyncpg.Pool, mqtt_url: str, topic_prefix: str) -> None:
    proxy = TcpProxy(parse_mqtt_url(mqtt_url).port)  # not listening yet: connection refused
    failures_before = metric("gridwarden_outbox_failures_total", reason="broker")
    publisher = OutboxPublisher(pool, proxy.url, poll_s=0.1, retry_max_s=0.4)
    async with collecting(mqtt_url, f"{topic_prefix}/#") as received, running(publisher):
        first = await enqueue(pool, [(f"{topic_prefix}/a", {"n": n}) for n in range(3)])
        state = await wait_for(
            lambda: rows(pool), lambda rs: all(r["attempts"] >= 2 for r in rs)
        )  # tried, and tried again
        assert all(r["published_at"] is None for r in state)
        assert received == []
        assert metric("gridwarden_outbox_failures_total", reason="broker") >= failures_before + 2
        assert metric("gridwarden_outbox_lag_seconds") > 0
        assert not publisher.is_connected()

        await proxy.start()  # the broker is reachable again
        await wait_received(received, 3)
        state = await wait_for(
            lambda: rows(pool), lambda rs: all(r["published_at"] is not None for r in rs)
        )
        assert all(r["attempts"] >= 3 for r in state)
        assert publisher.is_connected()

        await proxy.stop()  # the broker goes away while connected
        second = await enqueue(pool, [(f"{topic_prefix}/b", {"n": n}) for n in range(2)])
        await wait_for(
            lambda: rows(pool),
            lambda rs: all(r["attempts"] >= 1 and r["published_at"] is None for r in rs[3:]),
        )
        await proxy.start()
        await wait_received(received, 5)
        await wait_for(
            lambda: rows(pool), lambda rs: all(r["published_at"] is not None for r in rs)
        )
        await asyncio.sleep(0.2)
    await proxy.stop()
    assert [outbox_id(m) for m in received] == first + second


async def test_two_publishers_publish_each_row_once(
    pool: asyncpg.Pool, database_url: str, mqtt_url: str, topic_prefix: str
) -> None:
    count = 300
    ids = await enqueue(pool, [(f"{topic_prefix}/n/{n % 7}", {"n": n}) for n in range(count)])
    other_pool = await create_pool(database_url)
    try:
        async with (
            collecting(mqtt_url, f"{topic_prefix}/#") as received,
            running(
                OutboxPublisher(pool, mqtt_url, batch=10),
                OutboxPublisher(other_pool, mqtt_url, batch=10),
            ),
        ):
            await wait_received(received, count)
            await asyncio.sleep(0.5)  # anything extra would arrive now
    finally:
        await other_pool.close()
    assert sorted(outbox_id(m) for m in received) == ids  # each exactly once
    assert {(r["published_at"] is not None, r["attempts"]) for r in await rows(pool)} == {(True, 1)}


# -- a broker that refuses some messages (MQTT 5 PUBACK reason code from its ACL)


@pytest.fixture
def acl_broker(services_root: Path) -> Iterator[str]:
    home = services_root / f"acl-{uuid.uuid4().hex[:8]}"
    home.mkdir()
    home.chmod(0o755)
    account = service_account()
    port = free_port()
    acl = home / "acl"
    acl.write_text("topic write +/ok/#\ntopic read #\n")
    config = home / "mosquitto.conf"
    config.write_text(
        f"user {account.name}\nlistener {port} 127.0.0.1\nallow_anonymous true\n"
        f"acl_file {acl}\npersistence false\n"
    )
    for path in (acl, config):
        path.chmod(0o644)
    process = subprocess.Popen(
        [str(find_mosquitto()), "-c", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        **account.popen_kwargs(),
    )
    try:
        assert wait_for_port(port, WAIT_S, lambda: process.poll() is None), "mosquitto failed"
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, 9)
            process.wait()


async def test_a_refused_message_is_held_back_and_the_rest_go_out(
    pool: asyncpg.Pool, acl_broker: str, topic_prefix: str
) -> None:
    rejected_before = metric("gridwarden_outbox_failures_total", reason="rejected")
    publisher = OutboxPublisher(pool, acl_broker, poll_s=0.1)
    async with collecting(acl_broker, f"{topic_prefix}/#") as received, running(publisher):
        ok1, denied, ok2 = await enqueue(
            pool,
            [
                (f"{topic_prefix}/ok/1", {"n": 1}),
                (f"{topic_prefix}/denied/2", {"n": 2}),  # the ACL does not allow this one
                (f"{topic_prefix}/ok/3", {"n": 3}),
            ],
        )
        await wait_received(received, 2)
        state = await wait_for(
            lambda: rows(pool), lambda rs: rs[0]["published_at"] and rs[2]["published_at"]
        )
        await asyncio.sleep(0.5)  # held back: not retried in a tight loop
        state = await rows(pool)
    assert [outbox_id(m) for m in received] == [ok1, ok2]
    assert state[1]["id"] == denied
    assert state[1]["published_at"] is None
    assert 1 <= state[1]["attempts"] <= 4
    assert metric("gridwarden_outbox_failures_total", reason="rejected") >= rejected_before + 1
    assert metric("gridwarden_outbox_lag_seconds") > 0


async def test_a_lost_listening_connection_is_replaced(
    pool: asyncpg.Pool, mqtt_url: str, topic_prefix: str
) -> None:
    """The publisher's LISTEN connection is killed by the server: the pool takes it back,
    and the publisher keeps going and listens again on another one (it used to die on the
    released connection)."""
    publisher = OutboxPublisher(pool, mqtt_url, poll_s=0.2)
    async with collecting(mqtt_url, f"{topic_prefix}/#") as received, running(publisher) as tasks:
        listener = await wait_for(lambda: asyncio.sleep(0, publisher._listener), bool)
        pid = listener.get_server_pid()
        assert await pool.fetchval("SELECT pg_terminate_backend($1)", pid)
        await wait_for(
            lambda: asyncio.sleep(0, publisher._listening() and publisher._listener),
            lambda conn: bool(conn) and conn.get_server_pid() != pid,
        )
        ids = await enqueue(pool, [(f"{topic_prefix}/x", {"n": 1})])
        await wait_received(received, 1)
        assert not tasks[0].done()
    assert [outbox_id(m) for m in received] == ids
