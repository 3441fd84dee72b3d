"""What the fault tests share: a small city, `gridwarden up` as a restartable process, a
worker's phone that counts notifications by outbox id, and exact counts from the database.

Every service is started with explicit GRIDWARDEN_DATABASE_URL and GRIDWARDEN_MQTT_URL (the
fixtures' servers, a private one, or a TcpProxy in front of them), never the embedded default.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import re
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import asyncpg
import httpx
import orjson
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from alerting.outbox import OUTBOX_ID_PROPERTY
from gridwarden.embedded import EmbeddedMosquitto
from gridwarden.mqtt_url import parse_mqtt_url
from tests.ingest_helpers import WAIT_S, fetch, fetchval, publish, wait_for
from tests.test_rules_integration import register
from tests.test_service_process import GRIDWARDEN, service_env

START_WAIT_S = 90.0

# (id, kind, interval_s, building): two detectors in different buildings are two incidents.
DEVICES = [
    ("smoke-1", "smoke_detector", 3600, "1号楼"),
    ("smoke-2", "smoke_detector", 3600, "2号楼"),
    ("cover-1", "manhole_cover", 3600, None),
    ("door-1", "door_access", 3600, None),
    ("bin-1", "smart_bin", 3600, None),
]
# One grid worker gets every first dispatch; an escalation goes to the grid leader.
WORKERS = [("w-li", "李娜", "grid_worker"), ("lead-1", "陈队长", "grid_leader")]
# Every dead-letter reason of the README (ingest guarantees), plus rate_limited.
KNOWN_REASONS = {
    "bad_topic", "bad_device_id", "oversized", "unknown_device", "rate_limited", "not_utf8",
    "not_json", "not_object", "wrong_type", "out_of_range", "missing_field", "unknown_event",
    "bad_timestamp", "bad_status", "device_mismatch", "unknown_codec", "codec_error",
    "storage_rejected",
}  # fmt: skip
# A padding field (unknown fields are kept in `extra`): big messages make memory visible.
PAD = "x" * 12_000


async def setup_city(database_url: str) -> None:
    await register(database_url, DEVICES)
    conn = await asyncpg.connect(database_url)
    try:
        for worker_id, name, role in WORKERS:
            await conn.execute(
                "INSERT INTO workers (id, name, role) VALUES ($1, $2, $3)", worker_id, name, role
            )
            await conn.execute(
                "INSERT INTO worker_cells (worker_id, cell_id) VALUES ($1, 'g1')", worker_id
            )
    finally:
        await conn.close()


def fault_env(
    database_url: str, mqtt_url: str, prefix: str, tmp_path: Path, **extra: str
) -> dict[str, str]:
    """service_env with long SLA deadlines (a test shortens the one it watches) and the
    SLA timer ticking every 0.5 s."""
    env = service_env(database_url, mqtt_url, prefix, tmp_path)
    for priority in ("critical", "major", "minor", "warning"):
        for step in ("accept", "arrive", "resolve", "escalate"):
            env[f"GRIDWARDEN_SLA_{priority.upper()}_{step.upper()}_S"] = "3600"
    env["GRIDWARDEN_SLA_TICK_S"] = "0.5"
    env.update(extra)
    return env


def anonymous_broker(data_dir: Path) -> EmbeddedMosquitto:
    """A private Mosquitto that devices and the service reach without credentials."""
    if "anonymous" in inspect.signature(EmbeddedMosquitto).parameters:
        return EmbeddedMosquitto(data_dir, anonymous=True)  # type: ignore[call-arg]
    return EmbeddedMosquitto(data_dir)


class Service:
    """`gridwarden up` as a subprocess that a test starts, kills and starts again; its
    output is kept in `log_file` for the failure message."""

    def __init__(self, env: dict[str, str], log_file: Path) -> None:
        self.env = env
        self.log_file = log_file
        self.process: asyncio.subprocess.Process | None = None
        self.url = ""
        self._drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            *GRIDWARDEN, "up", env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        up = asyncio.get_running_loop().create_future()
        self._drain = asyncio.create_task(self._copy_output(up))
        # A bound, not an expectation: on a machine busy with other work the service has
        # been seen to take over 30 s to print its first line.
        async with asyncio.timeout(START_WAIT_S):
            self.url = await up
        async with httpx.AsyncClient(base_url=self.url) as http:

            async def ready() -> int:
                assert self.alive(), f"the service exited; see {self.log_file}"
                try:
                    return (await http.get("/readyz")).status_code
                except httpx.TransportError:  # listening, not answering yet
                    return 0

            await wait_for(ready, lambda status: status == 200, within_s=START_WAIT_S)

    async def _copy_output(self, up: asyncio.Future[str]) -> None:
        assert self.process is not None
        assert self.process.stdout is not None
        with self.log_file.open("ab") as log:
            while line := await self.process.stdout.readline():
                log.write(line)
                log.flush()
                text = line.decode(errors="replace")
                if not up.done() and "gridwarden is up:" in text:
                    up.set_result(text.split("gridwarden is up:")[1].split()[0])
        if not up.done():
            up.set_exception(AssertionError(f"service exited early; see {self.log_file}"))

    async def kill(self) -> None:
        """SIGKILL: no drain, no flush, no clean disconnect."""
        if self.alive():
            assert self.process is not None
            self.process.kill()
            await self.process.wait()
        if self._drain is not None:
            await self._drain

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    async def metric(self, name: str) -> float:
        """The sum of a metric's samples (0 when it has none yet) from /metrics."""
        async with httpx.AsyncClient(base_url=self.url) as http:
            text = (await http.get("/metrics")).text
        pattern = re.compile(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", re.MULTILINE)
        return sum(float(value) for value in pattern.findall(text))

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)[1]) / 1024  # type: ignore[index]


@contextlib.asynccontextmanager
async def running_service(env: dict[str, str], log_file: Path) -> AsyncIterator[Service]:
    service = Service(env, log_file)
    try:
        await service.start()
        yield service
    except BaseException:
        print(f"--- the service's last lines ({log_file}):\n{service.log_tail()}")
        raise
    finally:
        await service.kill()


@dataclass(frozen=True)
class Note:
    topic: str
    outbox_id: int
    payload: dict[str, Any]


@dataclass
class Phone:
    """Subscribes to every worker's case topic and every alarm topic with a persistent
    session, reconnecting after a broker restart; keeps every message with its outbox id."""

    mqtt_url: str
    prefix: str
    notes: list[Note] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    client_id: str = field(default_factory=lambda: f"phone-{uuid.uuid4().hex[:10]}")

    async def run(self) -> None:
        endpoint = parse_mqtt_url(self.mqtt_url)
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 3600
        while True:
            try:
                async with aiomqtt.Client(
                    endpoint.host, endpoint.port, identifier=self.client_id,
                    protocol=aiomqtt.ProtocolVersion.V5, clean_start=False, properties=properties,
                ) as client:  # fmt: skip
                    await client.subscribe(f"{self.prefix}/workers/+/cases", qos=1)
                    await client.subscribe(f"{self.prefix}/alarms/#", qos=1)
                    self.ready.set()
                    async for message in client.messages:
                        ids = dict(message.properties.UserProperty)  # type: ignore[union-attr]
                        payload = orjson.loads(message.payload)  # type: ignore[arg-type]
                        note = Note(message.topic.value, int(ids[OUTBOX_ID_PROPERTY]), payload)
                        self.notes.append(note)
            except aiomqtt.MqttError:
                await asyncio.sleep(0.3)

    def cases(self, worker: str) -> dict[int, Note]:
        """The case notifications `worker` got, one per outbox id (repeats dropped)."""
        topic = f"{self.prefix}/workers/{worker}/cases"
        return {n.outbox_id: n for n in self.notes if n.topic == topic}

    def outbox_ids(self) -> set[int]:
        return {n.outbox_id for n in self.notes}


@contextlib.asynccontextmanager
async def phone(mqtt_url: str, prefix: str) -> AsyncIterator[Phone]:
    listener = Phone(mqtt_url, prefix)
    task = asyncio.create_task(listener.run())
    try:
        async with asyncio.timeout(WAIT_S):
            await listener.ready.wait()
        yield listener
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def publish_readings(
    client: aiomqtt.Client, prefix: str, device: str, seqs: range, **values: Any
) -> None:
    for seq in seqs:
        await publish(client, f"{prefix}/dev/{device}/telemetry", {"seq": seq, **values})


@dataclass(frozen=True)
class Tally:
    """What the database holds, in the terms the faults are asserted in."""

    telemetry: int
    distinct_readings: int  # distinct (device_id, seq) among them
    events: int
    alarms: dict[tuple[str, str], int]  # (device, rule) → count
    cases: dict[str, dict[str, Any]]  # device → its case (one per device in these tests)
    case_rows: int
    outbox_unpublished: int
    intake_queued: int
    worker_outbox_ids: dict[str, set[int]]  # worker → ids of the rows on their topic
    alarm_outbox_ids: set[int]


async def tally(database_url: str, prefix: str) -> Tally:
    conn = await asyncpg.connect(database_url)
    try:
        telemetry, distinct = await conn.fetchrow(
            "SELECT count(*), count(DISTINCT (device_id, seq)) FROM telemetry"
        )
        events = await conn.fetchval("SELECT count(*) FROM device_events")
        alarms = {
            (r["device_id"], r["rule"]): r["count"]
            for r in await conn.fetch("SELECT device_id, rule, count FROM alarms")
        }
        rows = await conn.fetch(
            "SELECT c.*, (SELECT array_agg(a.id ORDER BY a.id) FROM alarms a"
            " WHERE a.case_id = c.id) AS alarm_ids FROM cases c ORDER BY id"
        )
        unpublished = await conn.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        queued = await conn.fetchval("SELECT count(*) FROM case_intake")
        outbox = await conn.fetch("SELECT id, topic FROM outbox")
    finally:
        await conn.close()
    workers: dict[str, set[int]] = {}
    alarm_ids: set[int] = set()
    for row in outbox:
        parts = row["topic"].split("/")
        if parts[:2] == [prefix, "workers"]:
            workers.setdefault(parts[2], set()).add(row["id"])
        elif parts[:2] == [prefix, "alarms"]:
            alarm_ids.add(row["id"])
    return Tally(
        telemetry, distinct, events, alarms, {r["device_id"]: dict(r) for r in rows}, len(rows),
        unpublished, queued, workers, alarm_ids,
    )  # fmt: skip


async def settled(
    database_url: str, prefix: str, listener: Phone, *, telemetry: int, cases: int,
    within_s: float = 60, escalations: int = 0,
) -> Tally:  # fmt: skip
    """Wait until every reading is stored, every case opened (and escalated as expected),
    every outbox row published and heard by `listener`; returns the tally."""

    async def probe() -> Tally:
        return await tally(database_url, prefix)

    def done(t: Tally) -> bool:
        heard = listener.outbox_ids()
        everything = set().union(t.alarm_outbox_ids, *t.worker_outbox_ids.values())
        return (
            t.telemetry >= telemetry
            and t.case_rows >= cases
            and sum(c["escalations"] for c in t.cases.values()) >= escalations
            and t.intake_queued == 0
            and t.outbox_unpublished == 0
            and everything <= heard
        )

    return await wait_for(probe, done, within_s=within_s)


def assert_one_notification_per_dispatch(t: Tally, listener: Phone, expected: dict[str, int]):
    """Every worker got exactly `expected[worker]` distinct notifications: the outbox rows on
    their topic, each heard at least once (at-least-once, repeats share an outbox id), and
    no message that is not one of those rows."""
    for worker, count in expected.items():
        heard = listener.cases(worker)
        assert set(heard) == t.worker_outbox_ids.get(worker, set()), worker
        assert len(heard) == count, (worker, [n.payload["reason"] for n in heard.values()])
    assert set(t.worker_outbox_ids) <= set(expected)


async def case_events(database_url: str, case_id: int) -> list[str]:
    rows = await fetch(
        database_url, "SELECT action FROM case_events WHERE case_id = $1 ORDER BY id", case_id
    )
    return [r["action"] for r in rows]


async def wait_until_past(database_url: str, case_id: int) -> None:
    """Until the case's next deadline has passed by a second (database clock)."""
    sql = "SELECT due_at + interval '1 second' < now() FROM cases WHERE id = $1"
    await wait_for(lambda: fetchval(database_url, sql, case_id), bool, within_s=WAIT_S * 4)


async def wait_heard(listener: Phone, worker: str, count: int = 1) -> dict[int, Note]:
    """Until `worker` has `count` distinct case notifications."""

    async def probe() -> dict[int, Note]:
        return listener.cases(worker)

    return await wait_for(probe, lambda heard: len(heard) >= count)
