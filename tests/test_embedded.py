"""The embedded PostgreSQL and Mosquitto: private, persistent, and able to come back from faults.

Tests that stop, restart or kill a server use instances of their own, never the session ones.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiomqtt
import asyncpg
import psycopg
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import gridwarden.embedded as embedded
from gridwarden import broker_autosave
from gridwarden.broker_autosave import AutosavePacer, autosave_task, next_delay
from gridwarden.config import Settings
from gridwarden.embedded import (
    EmbeddedMosquitto,
    EmbeddedPostgres,
    EmbeddedServiceError,
    embedded_services,
    service_account,
)

SHARED_PORTS = {5432, 1883}
WAIT_S = 10


def _fresh_dir(services_root: Path) -> Path:
    return services_root / f"own-{uuid.uuid4().hex[:8]}"


def _accepts(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _query(dsn: str, sql: str) -> object:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(sql).fetchone()
        return None if row is None else row[0]


def _execute(dsn: str, sql: str) -> None:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql)


# --------------------------------------------------------------------------- the session servers


async def test_the_session_servers_are_private_and_configured(
    embedded_postgres: EmbeddedPostgres,
    embedded_mosquitto: EmbeddedMosquitto,
    database_url: str,
) -> None:
    assert embedded_postgres.port not in SHARED_PORTS
    assert embedded_mosquitto.port not in SHARED_PORTS
    assert database_url.startswith(f"postgresql://gridwarden@127.0.0.1:{embedded_postgres.port}/")
    conn = await asyncpg.connect(database_url)
    try:
        settings = {
            name: await conn.fetchval(f"SHOW {name}")
            for name in ("port", "listen_addresses", "data_directory", "max_connections", "fsync")
        }
        migrated = await conn.fetchval("SELECT count(*) FROM schema_migrations")
    finally:
        await conn.close()
    assert settings == {
        "port": str(embedded_postgres.port),
        "listen_addresses": "127.0.0.1",
        "data_directory": str(embedded_postgres.pgdata),
        "max_connections": "200",
        "fsync": "on",
    }
    assert migrated > 0, "each test's database is a clone of the migrated template"


async def test_each_test_gets_its_own_database(
    embedded_postgres: EmbeddedPostgres, database_url: str
) -> None:
    assert database_url.rsplit("/", 1)[1].startswith("test_")
    conn = await asyncpg.connect(embedded_postgres.dsn_for("postgres"))
    try:
        template = await conn.fetchrow(
            "SELECT datistemplate, datallowconn FROM pg_database WHERE datname = 'gw_template'"
        )
    finally:
        await conn.close()
    assert template is not None
    assert tuple(template) == (True, False)


async def test_the_session_broker_carries_messages(mqtt_url: str, topic_prefix: str) -> None:
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,32}", topic_prefix)
    port = int(mqtt_url.rsplit(":", 1)[1])
    assert mqtt_url == f"mqtt://127.0.0.1:{port}"
    topic = f"{topic_prefix}/ping"
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.subscribe(topic, qos=1)
        await client.publish(topic, b"pong", qos=1)
        async with asyncio.timeout(WAIT_S):
            message = await anext(client.messages)
    assert message.payload == b"pong"


# --------------------------------------------------------------------------- PostgreSQL


def test_a_second_start_reuses_the_cluster_and_its_data(services_root: Path) -> None:
    data_dir = _fresh_dir(services_root)
    postgres = EmbeddedPostgres(data_dir)
    dsn = postgres.start()
    port = postgres.port
    try:
        assert port is not None
        assert port not in SHARED_PORTS
        _execute(dsn, "CREATE TABLE kept (note text); INSERT INTO kept VALUES ('still here')")

        # Started again while running (a left-over server): the same one is reused.
        assert EmbeddedPostgres(data_dir).start() == dsn

        postgres.stop()
        assert postgres.running_pid() is None
        assert not _accepts(port)

        again = EmbeddedPostgres(data_dir)
        assert again.start() == dsn, "same cluster, same recorded port while it is free"
        assert _query(dsn, "SELECT note FROM kept") == "still here"
    finally:
        postgres.stop()


def test_a_taken_port_moves_the_cluster_to_a_free_one(services_root: Path) -> None:
    data_dir = _fresh_dir(services_root)
    postgres = EmbeddedPostgres(data_dir)
    dsn = postgres.start()
    try:
        _execute(dsn, "CREATE TABLE kept (note text); INSERT INTO kept VALUES ('moved')")
        postgres.stop()
        old_port = postgres.port
        assert old_port is not None
        with socket.socket() as squatter:
            # SO_REUSEADDR: the old server's connections may linger in TIME_WAIT.
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            squatter.bind(("127.0.0.1", old_port))
            squatter.listen()
            new_dsn = postgres.start()
        assert postgres.port != old_port
        assert postgres.port not in SHARED_PORTS
        assert _query(new_dsn, "SELECT note FROM kept") == "moved"
    finally:
        postgres.stop()


@pytest.mark.slow
def test_postgres_comes_back_after_sigkill_and_a_stale_pid(services_root: Path) -> None:
    data_dir = _fresh_dir(services_root)
    postgres = EmbeddedPostgres(data_dir)
    dsn = postgres.start()
    lock = postgres.pgdata / "postmaster.pid"
    try:
        _execute(dsn, "CREATE TABLE kept (note text); INSERT INTO kept VALUES ('committed')")

        postgres.kill()
        assert lock.exists(), "kill -9 leaves postmaster.pid behind"
        assert postgres.start() == dsn
        assert _query(dsn, "SELECT note FROM kept") == "committed"

        # Worse: the dead postmaster's pid now belongs to another process of the same account
        # (after a reboot, or the machine's own cluster); postgres alone would refuse to start.
        postgres.kill()
        impostor = subprocess.Popen(["sleep", "120"], **service_account().popen_kwargs())
        try:
            lines = lock.read_text().splitlines()
            lock.write_text("\n".join([str(impostor.pid), *lines[1:]]) + "\n")
            assert postgres.start() == dsn
            assert _query(dsn, "SELECT note FROM kept") == "committed"
            assert impostor.poll() is None, "the unrelated process was left alone"
        finally:
            impostor.kill()
            impostor.wait()
    finally:
        postgres.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the servers to another account")
def test_a_directory_the_account_cannot_traverse_is_named(services_root: Path) -> None:
    locked = services_root / f"locked-{uuid.uuid4().hex[:8]}"
    locked.mkdir(mode=0o700)
    locked.chmod(0o700)
    with pytest.raises(EmbeddedServiceError, match=re.escape(f"cannot traverse {locked} ")):
        EmbeddedPostgres(locked / "data").start()


def test_missing_binaries_point_to_the_setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(embedded, "POSTGRES_BIN_GLOB", str(tmp_path / "postgresql/*/bin"))
    monkeypatch.setattr(embedded, "MOSQUITTO_CANDIDATES", (str(tmp_path / "mosquitto"),))
    hint = re.escape("apt-get install postgresql mosquitto")
    with pytest.raises(EmbeddedServiceError, match=hint):
        EmbeddedPostgres(tmp_path / "data").start()
    with pytest.raises(EmbeddedServiceError, match=hint):
        EmbeddedMosquitto(tmp_path / "data").start()
    assert not (tmp_path / "data").exists()


# --------------------------------------------------------------------------- Mosquitto


@asynccontextmanager
async def _persistent_subscriber(
    port: int, identifier: str, protocol: aiomqtt.ProtocolVersion
) -> AsyncIterator[aiomqtt.Client]:
    if protocol is aiomqtt.ProtocolVersion.V5:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 3600
        client = aiomqtt.Client(
            "127.0.0.1",
            port,
            identifier=identifier,
            protocol=protocol,
            clean_start=False,
            properties=properties,
        )
    else:
        client = aiomqtt.Client(
            "127.0.0.1", port, identifier=identifier, protocol=protocol, clean_session=False
        )
    async with client:
        yield client


async def _publish_while_offline(port: int, topic: str, payload: bytes) -> None:
    async with aiomqtt.Client("127.0.0.1", port) as publisher:
        await publisher.publish(topic, payload, qos=1)  # returns once the broker has PUBACKed


@pytest.mark.parametrize("protocol", [aiomqtt.ProtocolVersion.V311, aiomqtt.ProtocolVersion.V5])
async def test_a_queued_qos1_message_survives_a_broker_restart(
    services_root: Path, protocol: aiomqtt.ProtocolVersion
) -> None:
    broker = EmbeddedMosquitto(_fresh_dir(services_root), anonymous=True)
    broker.start()
    try:
        port = broker.port
        assert port is not None
        assert port not in SHARED_PORTS
        topic = f"t{uuid.uuid4().hex[:12]}/alarm"
        identifier = f"sub-{uuid.uuid4().hex[:8]}"
        async with asyncio.timeout(WAIT_S):
            async with _persistent_subscriber(port, identifier, protocol) as subscriber:
                await subscriber.subscribe(topic, qos=1)
            await _publish_while_offline(port, topic, b"queued while offline")

        broker.restart()  # SIGTERM: mosquitto saves its persistence file on the way out
        assert broker.port == port

        async with _persistent_subscriber(port, identifier, protocol) as subscriber:
            async with asyncio.timeout(WAIT_S):
                message = await anext(subscriber.messages)
        assert message.payload == b"queued while offline"
        assert message.qos == 1
    finally:
        broker.stop()


@pytest.mark.slow
async def test_a_message_autosaved_before_a_broker_sigkill_survives(services_root: Path) -> None:
    broker = EmbeddedMosquitto(_fresh_dir(services_root), anonymous=True)
    broker.start()
    try:
        port = broker.port
        assert port is not None
        topic = f"t{uuid.uuid4().hex[:12]}/alarm"
        identifier = f"sub-{uuid.uuid4().hex[:8]}"
        v311 = aiomqtt.ProtocolVersion.V311
        async with asyncio.timeout(WAIT_S):
            async with _persistent_subscriber(port, identifier, v311) as subscriber:
                await subscriber.subscribe(topic, qos=1)
            await _publish_while_offline(port, topic, b"autosaved")
        # The broker's own timer is 300 s away: this save is the pacer's.
        await asyncio.sleep(broker_autosave.MIN_INTERVAL_S * 2.5)

        broker.kill()
        assert broker.running_pid() is None
        assert broker.start() == f"mqtt://127.0.0.1:{port}"

        async with _persistent_subscriber(port, identifier, v311) as subscriber:
            async with asyncio.timeout(WAIT_S):
                message = await anext(subscriber.messages)
        assert message.payload == b"autosaved"
    finally:
        broker.stop()


def test_saves_are_spaced_by_what_they_cost() -> None:
    pace = {"min_s": 1.0, "max_s": 60.0, "busy_share": 0.02}
    assert next_delay(0.004, **pace) == 1.0  # cheap: every second
    assert next_delay(0.5, **pace) == pytest.approx(24.5)  # 2 % of the broker's time
    assert next_delay(5.0, **pace) == 60.0  # never further apart than this
    # A backlog building up: saves 0.09 s longer per second (measured: 26, 145, 1,056 ms)
    # make the next one later than its own cost says; draining, sooner.
    assert next_delay(0.145, growth=0.09, **pace) == 60.0
    assert next_delay(0.145, growth=0.01, **pace) == pytest.approx(49 * 0.145 / (1 - 0.49))
    assert next_delay(0.5, growth=-0.05, **pace) == pytest.approx(49 * 0.5 / (1 + 2.45))


def test_only_a_steady_rise_of_save_times_reads_as_growth(tmp_path: Path) -> None:
    pacer = AutosavePacer(tmp_path / "db", tmp_path / "lock", lambda: None)
    saves = pacer.stats.recent
    saves.extend([(0.0, 0.002), (1.0, 0.012), (2.0, 0.030)])  # a backlog building up
    assert pacer._growth() == pytest.approx(0.010)
    saves.extend([(3.3, 0.002), (4.3, 0.002), (5.3, 0.040)])  # one slow save among cheap ones
    assert pacer._growth() == 0.0
    saves.append((6.3, 0.003))
    assert pacer._growth() < 0


def test_one_rise_to_a_save_long_enough_to_be_felt_reads_as_growth(tmp_path: Path) -> None:
    pacer = AutosavePacer(tmp_path / "db", tmp_path / "lock", lambda: None)
    saves = pacer.stats.recent
    saves.extend([(0.0, 0.002), (1.0, 0.002), (2.0, 0.069)])  # the saturated bench phase
    assert pacer._growth() == pytest.approx(0.067)
    pace = {"min_s": 1.0, "max_s": 60.0, "busy_share": 0.02}
    assert next_delay(0.069, growth=pacer._growth(), **pace) == 60.0  # not 3.4 s: 0.5 s then
    saves.append((62.0, 0.030))  # shorter again: no growth
    assert pacer._growth() < 0


def _own_pacer(broker: EmbeddedMosquitto, **pace: float) -> AutosavePacer:
    return AutosavePacer(
        broker.home / embedded.PERSISTENCE_FILE, broker.pid_file.parent / broker_autosave.LOCK_FILE,
        broker.running_pid, **pace,
    )  # fmt: skip


def test_a_save_is_asked_for_and_timed_on_the_real_broker(services_root: Path) -> None:
    broker = EmbeddedMosquitto(_fresh_dir(services_root), anonymous=True)
    broker.start()
    try:
        broker.autosave.stop()
        pacer = _own_pacer(broker)
        saved = broker.home / embedded.PERSISTENCE_FILE
        for _ in range(2):
            before = saved.stat().st_ino if saved.exists() else None
            took = pacer.save_once()
            assert took is not None
            assert 0 < took < 5
            assert saved.stat().st_ino != before  # a new file renamed into place
    finally:
        broker.stop()


def test_the_next_save_waits_in_proportion_to_the_last(services_root: Path) -> None:
    broker = EmbeddedMosquitto(_fresh_dir(services_root), anonymous=True)
    broker.start()
    try:
        broker.autosave.stop()
        # A save of a few milliseconds, as if it may use only 0.5 % of the broker's time.
        pacer = _own_pacer(broker, min_interval_s=0.02, max_interval_s=30, max_busy_share=0.005)
        pacer.start()
        deadline = time.monotonic() + WAIT_S
        while pacer.stats.saves == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        stats = pacer.stats
        assert stats.saves == 1
        expected = next_delay(stats.last_took_s, min_s=0.02, max_s=30, busy_share=0.005)
        assert stats.last_delay_s == pytest.approx(expected)
        assert stats.last_delay_s >= 0.39  # 199 × at least one 2 ms poll
        time.sleep(0.2)  # a fixed 20 ms interval would have saved about ten times by now
        assert pacer.stats.saves == 1
        pacer.stop()
    finally:
        broker.stop()


def test_one_pacer_per_broker_and_the_next_takes_over(services_root: Path) -> None:
    data_dir = _fresh_dir(services_root)
    first = EmbeddedMosquitto(data_dir, anonymous=True)
    first.start()
    second = EmbeddedMosquitto(data_dir, anonymous=True)
    try:
        deadline = time.monotonic() + WAIT_S
        while not first.autosave.pacing and time.monotonic() < deadline:
            time.sleep(0.01)  # its thread takes the lock first
        second.start()  # reuses the running broker (e.g. `gridwarden migrate` while `up` runs)
        time.sleep(broker_autosave.MIN_INTERVAL_S * 2.5)
        assert first.autosave.pacing
        assert first.autosave.stats.saves >= 1
        assert not second.autosave.pacing
        assert second.autosave.stats.saves == 0
        first.autosave.stop()  # e.g. the process that started the broker is gone
        deadline = time.monotonic() + WAIT_S
        while second.autosave.stats.saves == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert second.autosave.pacing
        assert second.autosave.stats.saves >= 1
    finally:
        second.stop()
        first.stop()


async def test_the_service_task_paces_a_broker_it_did_not_start(services_root: Path) -> None:
    broker = EmbeddedMosquitto(_fresh_dir(services_root), anonymous=True)
    broker.start()
    try:
        broker.autosave.stop()  # as if it were a broker of its own (deploy/: another container)
        saved = broker.home / embedded.PERSISTENCE_FILE
        seen: set[tuple[int, int]] = set()
        stop = asyncio.Event()
        task = asyncio.create_task(autosave_task(saved, broker.pid_file)(stop))
        try:
            deadline = time.monotonic() + broker_autosave.MIN_INTERVAL_S * 2.5
            while time.monotonic() < deadline:
                if saved.exists():
                    st = saved.stat()
                    seen.add((st.st_ino, st.st_mtime_ns))
                await asyncio.sleep(0.02)
        finally:
            stop.set()
            await task
        assert len(seen) >= 2  # saved about every second
    finally:
        broker.stop()


def test_a_running_broker_is_reused_not_doubled(services_root: Path) -> None:
    data_dir = _fresh_dir(services_root)
    first = EmbeddedMosquitto(data_dir)
    url = first.start()
    try:
        pid = first.running_pid()
        second = EmbeddedMosquitto(data_dir)  # e.g. a restarted `gridwarden up`
        assert second.start() == url
        assert second.running_pid() == pid
        second.stop()
        assert first.running_pid() is None
    finally:
        first.stop()


# --------------------------------------------------------------------------- embedded_services


def test_embedded_services_start_what_is_not_configured(services_root: Path) -> None:
    data_dir = _fresh_dir(services_root)
    settings = Settings(data_dir=data_dir, database_url=None, mqtt_url=None)
    with embedded_services(settings) as (database_url, mqtt_url):
        assert _query(database_url, "SELECT current_database()") == "gridwarden"
        port = int(mqtt_url.rsplit(":", 1)[1])
        assert port not in SHARED_PORTS
        assert _accepts(port)
    assert EmbeddedPostgres(data_dir).running_pid() is None
    assert EmbeddedMosquitto(data_dir).running_pid() is None
    assert not _accepts(port)


def test_embedded_services_leave_configured_urls_alone(services_root: Path) -> None:
    data_dir = _fresh_dir(services_root)
    configured = ("postgresql://someone@db.example:5432/gw", "mqtt://broker.example:1883")
    settings = Settings(data_dir=data_dir, database_url=configured[0], mqtt_url=configured[1])
    with embedded_services(settings) as urls:
        assert urls == configured
    assert not data_dir.exists()
