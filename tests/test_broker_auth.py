"""Broker security: per-device credentials and ACLs rendered for a real Mosquitto.

Every broker here is a private EmbeddedMosquitto with authentication on (the embedded
default); the accounts live in this test's database and reach the broker through
`sync_broker_files` (write + SIGHUP), as in the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiomqtt
import asyncpg
import pytest

from gridwarden import broker_auth
from gridwarden.broker_auth import BrokerAuthError, username_for
from gridwarden.embedded import EmbeddedMosquitto
from gridwarden.mqtt_url import parse_mqtt_url, with_user
from tests.ingest_helpers import (
    WAIT_S,
    fetchval,
    register_devices,
    running_ingest,
    settings_for,
    wait_for,
)

PREFIX = "gw"


@pytest.fixture
def auth_broker(services_root: Path) -> Iterator[EmbeddedMosquitto]:
    broker = EmbeddedMosquitto(services_root / f"auth-{uuid.uuid4().hex[:8]}")
    broker.start()
    yield broker
    broker.stop()


@asynccontextmanager
async def client(url: str, **kwargs: object) -> AsyncIterator[aiomqtt.Client]:
    endpoint = parse_mqtt_url(url)
    async with aiomqtt.Client(
        endpoint.host, endpoint.port, username=endpoint.username, password=endpoint.password,
        identifier=f"c-{uuid.uuid4().hex[:8]}", protocol=aiomqtt.ProtocolVersion.V5,
        **kwargs,  # type: ignore[arg-type]
    ) as connected:  # fmt: skip
        yield connected


async def refused(url: str) -> bool:
    try:
        async with asyncio.timeout(WAIT_S), client(url):
            return False
    except aiomqtt.MqttError as exc:
        return "authori" in str(exc).lower() or "password" in str(exc).lower()


async def sync(database_url: str, broker: EmbeddedMosquitto) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await broker_auth.sync_broker_files(conn, broker.broker_files(), PREFIX, broker.url)
    finally:
        await conn.close()
    await asyncio.sleep(0.3)  # the broker reloads on SIGHUP


async def issue(database_url: str, kind: broker_auth.Kind, name: str) -> tuple[str, str]:
    conn = await asyncpg.connect(database_url)
    try:
        return await broker_auth.issue(conn, kind, name)
    finally:
        await conn.close()


# --------------------------------------------------------------------------- pure parts


def test_hashes_are_mosquitto_passwd_compatible(tmp_path: Path) -> None:
    """A hash of ours checks against one `mosquitto_passwd` made, and the other way round."""
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), "dev-1", "s3cret"], check=True)
    theirs = passwd.read_text().strip().partition(":")[2]
    assert broker_auth.verify_password("s3cret", theirs)
    assert not broker_auth.verify_password("s3cre", theirs)
    ours = broker_auth.hash_password("s3cret")
    assert ours.startswith("$7$101$")
    assert broker_auth.verify_password("s3cret", ours)
    assert not broker_auth.verify_password("s3cret", "not a hash")


@pytest.mark.parametrize(
    ("kind", "name", "username"),
    [
        ("device", "dev-0001", "dev-0001"),  # a device logs in with its own id
        ("worker", "W001", "worker/W001"),  # the '/' keeps workers apart from device ids
        ("gateway", "lora-1", "gateway/lora-1"),
        ("operator", "desk", "operator/desk"),
    ],
)
def test_user_names_by_kind(kind: broker_auth.Kind, name: str, username: str) -> None:
    assert username_for(kind, name) == username


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("device", "a:b"),  # ':' would split the password file's line
        ("device", ""),
        ("gateway", "a/b"),  # would read as another kind's name
        ("worker", "x y"),
        ("root", "x"),  # not a kind
    ],
)
def test_user_names_that_cannot_be(kind: broker_auth.Kind, name: str) -> None:
    with pytest.raises(BrokerAuthError):
        username_for(kind, name)


def test_acl_confines_each_kind() -> None:
    def rules(kind: broker_auth.Kind, subject: str | None = None) -> list[str]:
        return broker_auth.acl_rules(broker_auth.BrokerAccount("u", kind, "h", subject), "gw")

    assert rules("device", "d1") == ["topic write gw/dev/d1/#", "topic write gw/codec/+/d1"]
    assert rules("worker", "W1") == ["topic read gw/workers/W1/#"]
    assert not any("read" in rule for rule in rules("gateway"))
    assert not any("write" in rule for rule in rules("operator"))


# --------------------------------------------------------------------------- a real broker


async def test_anonymous_and_wrong_passwords_are_refused(
    auth_broker: EmbeddedMosquitto, database_url: str
) -> None:
    await register_devices(database_url, [("dev-1", "smoke_detector", None)])
    username, password = await issue(database_url, "device", "dev-1")
    await sync(database_url, auth_broker)
    assert await refused(auth_broker.anonymous_url)
    assert await refused(with_user(auth_broker.url, username, password + "x"))
    assert not await refused(with_user(auth_broker.url, username, password))
    assert not await refused(auth_broker.url)  # the service's own account


async def test_a_device_publishes_only_under_its_own_id_and_that_reaches_ingest(
    auth_broker: EmbeddedMosquitto, database_url: str
) -> None:
    await register_devices(
        database_url, [("dev-1", "smoke_detector", None), ("dev-2", "smoke_detector", None)]
    )
    user, password = await issue(database_url, "device", "dev-1")
    gateway = with_user(auth_broker.url, *await issue(database_url, "gateway", "lora"))
    await sync(database_url, auth_broker)
    settings = settings_for(database_url, auth_broker.url, PREFIX)
    async with running_ingest(settings), client(with_user(auth_broker.url, user, password)) as dev:
        await dev.publish(f"{PREFIX}/dev/dev-1/telemetry", b'{"seq": 1, "smoke": 1.5}', qos=1)
        # Forged: dev-1's credentials, dev-2's topic (and a codec topic for dev-2).
        await dev.publish(f"{PREFIX}/dev/dev-2/telemetry", b'{"seq": 1, "smoke": 90}', qos=1)
        await dev.publish(f"{PREFIX}/codec/zigbee2mqtt/dev-2", b'{"smoke": true}', qos=1)
        await dev.publish(f"{PREFIX}/dev/dev-1/telemetry", b'{"seq": 2, "smoke": 1.6}', qos=1)
        await wait_for(
            lambda: fetchval(database_url, "SELECT count(*) FROM telemetry"), lambda n: n == 2
        )
        # A gateway may publish for dev-2: proof that the forged message above would have
        # been stored had the broker let it through (they were acked before this one).
        async with client(gateway) as lora:
            await lora.publish(f"{PREFIX}/dev/dev-2/telemetry", b'{"seq": 7, "smoke": 2}', qos=1)
        await wait_for(
            lambda: fetchval(database_url, "SELECT count(*) FROM telemetry"), lambda n: n == 3
        )
    rows = await fetchval(
        database_url, "SELECT array_agg(device_id || ':' || seq ORDER BY device_id, seq) "
        "FROM telemetry"
    )  # fmt: skip
    assert rows == ["dev-1:1", "dev-1:2", "dev-2:7"]
    assert await fetchval(database_url, "SELECT count(*) FROM dead_letters") == 0


async def test_a_worker_reads_only_its_own_topic(
    auth_broker: EmbeddedMosquitto, database_url: str
) -> None:
    await register_workers(database_url, ["W1", "W2"])
    user, password = await issue(database_url, "worker", "W1")
    await sync(database_url, auth_broker)
    async with client(with_user(auth_broker.url, user, password)) as worker:
        await worker.subscribe(f"{PREFIX}/workers/W1/cases", qos=1)
        await worker.subscribe(f"{PREFIX}/workers/+/cases", qos=1)  # asks for everyone's
        async with client(auth_broker.url) as service:
            await service.publish(f"{PREFIX}/workers/W2/cases", b"not yours", qos=1)
            await service.publish(f"{PREFIX}/workers/W1/cases", b"yours", qos=1)
        received = await collect(worker, within_s=1.5)
    # Mosquitto grants the '+' subscription but checks the ACL on every delivery: W1 gets
    # its own message (once per matching subscription), never W2's.
    assert received == [b"yours", b"yours"]


async def test_revoked_and_rotated_passwords_stop_working_after_the_reload(
    auth_broker: EmbeddedMosquitto, database_url: str
) -> None:
    await register_devices(
        database_url, [("dev-1", "smoke_detector", None), ("dev-2", "door_access", None)]
    )
    conn = await asyncpg.connect(database_url)
    try:
        issued = dict(await broker_auth.issue_for_devices(conn))  # every device without one
        assert set(issued) == {"dev-1", "dev-2"}
        assert await broker_auth.issue_for_devices(conn) == []  # nobody is left without
        await broker_auth.sync_broker_files(conn, auth_broker.broker_files(), PREFIX,
                                            auth_broker.url)  # fmt: skip
        await asyncio.sleep(0.3)
        assert not await refused(with_user(auth_broker.url, "dev-1", issued["dev-1"]))
        _, rotated = await broker_auth.issue(conn, "device", "dev-1")
        assert await broker_auth.revoke(conn, "dev-2")
        assert not await broker_auth.revoke(conn, "dev-2")  # already revoked
        with pytest.raises(BrokerAuthError, match="no registered device"):
            await broker_auth.issue(conn, "device", "dev-3")
    finally:
        await conn.close()
    await sync(database_url, auth_broker)
    assert await refused(with_user(auth_broker.url, "dev-1", issued["dev-1"]))
    assert not await refused(with_user(auth_broker.url, "dev-1", rotated))
    assert await refused(with_user(auth_broker.url, "dev-2", issued["dev-2"]))


async def test_the_service_task_picks_up_a_new_account_within_seconds(
    auth_broker: EmbeddedMosquitto, database_url: str
) -> None:
    await register_devices(database_url, [("dev-1", "smoke_detector", None)])
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    assert pool is not None
    stop = asyncio.Event()
    task = asyncio.create_task(
        broker_auth.broker_auth_task(pool, auth_broker.broker_files(), PREFIX, auth_broker.url)(
            stop
        )
    )
    try:
        _, password = await issue(database_url, "device", "dev-1")
        url = with_user(auth_broker.url, "dev-1", password)
        await wait_for(lambda: refused(url), lambda no: not no,
                       within_s=broker_auth.BROKER_AUTH_POLL_S * 5)  # fmt: skip
        assert not await refused(auth_broker.url)  # the service's own line survives rewrites
    finally:
        stop.set()
        await task
        await pool.close()


def test_an_unchanged_registry_does_not_rewrite_the_files(
    auth_broker: EmbeddedMosquitto,
) -> None:
    files = auth_broker.broker_files()
    own = broker_auth.service_account(auth_broker.url, files.password_file)
    assert own is not None
    before = files.password_file.read_text()
    assert not files.write([own], PREFIX)  # same hash kept: no rewrite, no reload
    assert files.password_file.read_text() == before


async def collect(subscriber: aiomqtt.Client, within_s: float) -> list[bytes]:
    """Every payload that arrives within `within_s`."""
    received: list[bytes] = []

    async def gather() -> None:
        async for message in subscriber.messages:
            received.append(bytes(message.payload))  # type: ignore[arg-type]

    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(gather(), within_s)
    return received


async def register_workers(database_url: str, ids: list[str]) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.executemany(
            "INSERT INTO workers (id, name, role) VALUES ($1, $1, 'grid_worker')",
            [(worker,) for worker in ids],
        )
    finally:
        await conn.close()


# --------------------------------------------------------------------------- the CLI


async def test_cli_issues_lists_writes_and_revokes_with_an_audit_trail(
    database_url: str, tmp_path: Path
) -> None:
    from tests.test_cli import db_env, gridwarden

    await register_devices(
        database_url, [("dev-1", "smoke_detector", None), ("dev-2", "door_access", None)]
    )
    env = db_env(database_url, tmp_path)
    issued = await gridwarden("credentials", "issue", "device", "--all-devices", env=env)
    assert issued.returncode == 0, issued.stderr
    lines = issued.stdout.splitlines()
    assert lines[0] == "username,password"
    passwords = dict(line.split(",") for line in lines[1:])
    assert set(passwords) == {"dev-1", "dev-2"}

    bad = await gridwarden("credentials", "issue", "device", "nope", env=env)
    assert bad.returncode == 1
    assert "no registered device 'nope'" in bad.stderr

    out = tmp_path / "broker"
    written = await gridwarden("credentials", "write-broker-files", str(out), env=env)
    assert written.returncode == 0, written.stderr
    passwd = (out / "passwd").read_text()
    assert all(password not in passwd for password in passwords.values())  # hashes only
    for user, password in passwords.items():
        line = next(x for x in passwd.splitlines() if x.startswith(f"{user}:"))
        assert broker_auth.verify_password(password, line.partition(":")[2])
    assert "topic write gw/dev/dev-2/#" in (out / "acl").read_text()

    revoked = await gridwarden("credentials", "revoke", "dev-2", "ghost", env=env)
    assert revoked.returncode == 1
    assert "no live account 'ghost'" in revoked.stderr
    listed = await gridwarden("credentials", "list", env=env)
    rows = {line.split(",")[0]: line.split(",") for line in listed.stdout.splitlines()[1:]}
    assert rows["dev-1"][4] == ""
    assert rows["dev-2"][4] != ""  # revoked_at
    actions = await fetchval(
        database_url, "SELECT array_agg(action || ' ' || target_id ORDER BY id) FROM audit_log"
    )
    assert actions == [
        "mqtt_account.issue dev-1", "mqtt_account.issue dev-2", "mqtt_account.revoke dev-2",
    ]  # fmt: skip


# --------------------------------------------------------------------------- TLS


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key)."""
    names = ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem")
    ca_key, ca, key, csr, cert = (directory / name for name in names)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key),
            "-out", str(ca), "-days", "2", "-subj", "/CN=gridwarden test CA")  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
            "-subj", "/CN=127.0.0.1")  # fmt: skip
    ext = directory / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))  # fmt: skip
    return ca, cert, key


async def test_devices_and_the_service_over_tls(
    services_root: Path, database_url: str, tmp_path: Path
) -> None:
    ca, cert, key = make_certificates(tmp_path)
    broker = EmbeddedMosquitto(services_root / f"tls-{uuid.uuid4().hex[:8]}", tls_files=(cert, key))
    broker.start()
    try:
        await register_devices(database_url, [("dev-1", "smoke_detector", None)])
        user, password = await issue(database_url, "device", "dev-1")
        await sync(database_url, broker)
        service_url = broker.tls_url(ca)
        assert service_url.startswith("mqtts://")
        device_url = with_user(service_url, user, password)
        # Without our CA the broker's certificate does not verify: no connection.
        untrusted = parse_mqtt_url(device_url.split("?")[0]).ssl_context()
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.open_connection("127.0.0.1", broker.tls_port, ssl=untrusted)
        settings = settings_for(database_url, service_url, PREFIX)
        async with running_ingest(settings), tls_client(device_url) as dev:
            await dev.publish(f"{PREFIX}/dev/dev-1/telemetry", b'{"seq": 1, "smoke": 1}', qos=1)
            await wait_for(
                lambda: fetchval(database_url, "SELECT count(*) FROM telemetry"), lambda n: n == 1
            )
    finally:
        broker.stop()


@asynccontextmanager
async def tls_client(url: str) -> AsyncIterator[aiomqtt.Client]:
    endpoint = parse_mqtt_url(url)
    async with client(url, tls_context=endpoint.ssl_context()) as connected:
        yield connected
