"""`gridwarden up` as a real process: readiness, metrics, SIGTERM drain, kill -9."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import httpx

from tests.ingest_helpers import (
    TEST_DEVICES,
    WAIT_S,
    fetchval,
    publish,
    publisher,
    register_devices,
    wait_for,
)

GRIDWARDEN = [sys.executable, "-m", "gridwarden"]


def service_env(database_url: str, mqtt_url: str, prefix: str, tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "GRIDWARDEN_DATABASE_URL": database_url,
        "GRIDWARDEN_MQTT_URL": mqtt_url,
        "GRIDWARDEN_TOPIC_PREFIX": prefix,
        "GRIDWARDEN_MQTT_CLIENT_ID": f"svc-{prefix}",
        "GRIDWARDEN_HTTP_PORT": "0",
        "GRIDWARDEN_DATA_DIR": str(tmp_path),
        "GRIDWARDEN_BATCH_MAX_DELAY_MS": "20",
        "GRIDWARDEN_DEVICE_RATE_PER_S": "0",  # the tests stream 1,000 messages from one device
    })  # fmt: skip
    return env


@asynccontextmanager
async def service_process(
    env: dict[str, str], *args: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    process = await asyncio.create_subprocess_exec(
        *GRIDWARDEN, "up", *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert process.stdout is not None
    url = ""
    async with asyncio.timeout(WAIT_S * 2):
        while not url:
            line = (await process.stdout.readline()).decode()
            if not line:
                raise AssertionError(f"service exited early with {await process.wait()}")
            if "gridwarden is up:" in line:
                url = line.split("gridwarden is up:")[1].split()[0]
    drain = asyncio.create_task(_drain(process.stdout))
    try:
        async with httpx.AsyncClient(base_url=url) as http:
            await wait_for(lambda: http.get("/readyz"), lambda r: r.status_code == 200)
        yield process, url
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        drain.cancel()


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


async def test_up_serves_health_metrics_and_stops_cleanly_on_sigterm(
    database_url, mqtt_url, topic_prefix, tmp_path
):
    await register_devices(database_url, TEST_DEVICES)
    env = service_env(database_url, mqtt_url, topic_prefix, tmp_path)
    async with service_process(env) as (process, url), publisher(mqtt_url) as client:
        for seq in range(10):
            await publish(client, f"{topic_prefix}/dev/smoke-1/telemetry", {"seq": seq, "smoke": 1})
        await publish(client, f"{topic_prefix}/dev/smoke-1/telemetry", b"garbage")
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.get("/healthz")).json() == {"status": "ok"}
            metrics = await wait_for(
                lambda: http.get("/metrics"),
                lambda r: 'gridwarden_ingest_stored_total{table="telemetry"} 10.0' in r.text,
            )
            assert 'gridwarden_ingest_dead_letters_total{reason="not_json"} 1.0' in metrics.text
            assert "gridwarden_ingest_commit_seconds_bucket" in metrics.text
            assert (await http.get("/api/dead-letters")).status_code == 401
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT_S):
            assert await process.wait() == 0


def test_bad_configuration_exits_2_naming_the_key(tmp_path):
    env = dict(os.environ, GRIDWARDEN_HTTP_PORT="eighty", GRIDWARDEN_DATA_DIR=str(tmp_path))
    result = subprocess.run(
        [*GRIDWARDEN, "up"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert "GRIDWARDEN_HTTP_PORT" in result.stderr
    assert "eighty" in result.stderr


def test_invalid_rule_files_exit_2_naming_file_rule_and_key(tmp_path):
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "city.toml").write_text(
        'kind = "smart_bin"\n[[rules]]\nid = "bin.overfull"\nseverity = "urgent"\n'
        'when = { field = "fill", above = 90 }\n'
    )
    env = dict(os.environ, GRIDWARDEN_RULES_DIR=str(rules_dir), GRIDWARDEN_DATA_DIR=str(tmp_path))
    result = subprocess.run(
        [*GRIDWARDEN, "up"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert "city.toml: rule bin.overfull, key severity" in result.stderr


async def test_an_alarm_reaches_the_api_and_its_cell_topic(
    database_url, mqtt_url, topic_prefix, tmp_path
):
    import aiomqtt
    import orjson

    from gridwarden.auth import create_token
    from gridwarden.mqtt_url import parse_mqtt_url
    from tests.test_rules_integration import register

    await register(database_url, [("smoke-9", "smoke_detector", 300, "5号楼")])
    conn = await asyncpg.connect(database_url)
    try:
        token = await create_token(conn, "operator")
    finally:
        await conn.close()
    headers = {"Authorization": f"Bearer {token}"}
    env = service_env(database_url, mqtt_url, topic_prefix, tmp_path)
    endpoint = parse_mqtt_url(mqtt_url)
    async with (
        service_process(env) as (_, url),
        aiomqtt.Client(
            endpoint.host, endpoint.port, identifier=f"console-{topic_prefix}"
        ) as console,
        publisher(mqtt_url) as device,
        httpx.AsyncClient(base_url=url, headers=headers) as http,
    ):
        await console.subscribe(f"{topic_prefix}/alarms/#", qos=1)
        await publish(device, f"{topic_prefix}/dev/smoke-9/telemetry", {"seq": 1, "alarm": True})
        async with asyncio.timeout(WAIT_S):
            message = await anext(aiter(console.messages))
        assert message.topic.value == f"{topic_prefix}/alarms/g1"
        raised = orjson.loads(message.payload)
        assert (raised["change"], raised["rule"], raised["severity"], raised["device_id"]) == (
            "raised", "smoke.alarm", "critical", "smoke-9")  # fmt: skip
        listed = (await http.get("/api/alarms", params={"device": "smoke-9"})).json()
        assert [a["id"] for a in listed["items"]] == [raised["id"]]
        assert (await http.post(f"/api/alarms/{raised['id']}/ack")).status_code == 200
        async with asyncio.timeout(WAIT_S):
            acked = orjson.loads((await anext(aiter(console.messages))).payload)
        assert (acked["id"], acked["change"], acked["state"]) == (
            raised["id"], "acknowledged", "acknowledged")  # fmt: skip


async def test_roles_split_over_two_processes(database_url, mqtt_url, topic_prefix, tmp_path):
    # One process ingests (with the rules), another runs alerting and the API; they meet
    # only in PostgreSQL: the alarm the first one raises is announced by the second's
    # outbox and listed by its API, and the first one serves no API at all.
    import aiomqtt
    import orjson

    from gridwarden.auth import create_token
    from gridwarden.mqtt_url import parse_mqtt_url
    from tests.test_rules_integration import register

    await register(database_url, [("smoke-8", "smoke_detector", 300, "6号楼")])
    conn = await asyncpg.connect(database_url)
    try:
        token = await create_token(conn, "operator")
    finally:
        await conn.close()
    base = service_env(database_url, mqtt_url, topic_prefix, tmp_path)
    rest_env = dict(base, GRIDWARDEN_ROLES="alerting,api", GRIDWARDEN_DATA_DIR=str(tmp_path / "b"))
    endpoint = parse_mqtt_url(mqtt_url)
    async with (
        service_process(base, "--only", "rules") as (_, ingest_url),  # = ingest (with the rules)
        service_process(rest_env) as (_, api_url),
        aiomqtt.Client(endpoint.host, endpoint.port, identifier=f"c-{topic_prefix}") as console,
        publisher(mqtt_url) as device,
        httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}) as http,
    ):
        await console.subscribe(f"{topic_prefix}/alarms/#", qos=1)
        await publish(device, f"{topic_prefix}/dev/smoke-8/event", {"seq": 1, "event": "alarm"})
        async with asyncio.timeout(WAIT_S):
            raised = orjson.loads((await anext(aiter(console.messages))).payload)
        assert (raised["rule"], raised["device_id"]) == ("smoke.alarm", "smoke-8")
        listed = (await http.get(f"{api_url}/api/alarms", params={"device": "smoke-8"})).json()
        assert [a["id"] for a in listed["items"]] == [raised["id"]]
        assert (await http.get(f"{ingest_url}/api/alarms")).status_code == 404
        assert (await http.get(f"{ingest_url}/metrics")).status_code == 200
        stored = await fetchval(database_url, "SELECT count(*) FROM device_events")
        assert stored == 1


def test_an_unknown_role_exits_2(tmp_path):
    env = dict(os.environ, GRIDWARDEN_ROLES="ingest,billing", GRIDWARDEN_DATA_DIR=str(tmp_path))
    result = subprocess.run(
        [*GRIDWARDEN, "up"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert "GRIDWARDEN_ROLES" in result.stderr
    flag = subprocess.run(
        [*GRIDWARDEN, "up", "--only", "rules,billing"], env=dict(os.environ,
        GRIDWARDEN_DATA_DIR=str(tmp_path)), capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert flag.returncode == 2
    assert "billing" in flag.stderr
