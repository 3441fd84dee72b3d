"""The `gridwarden` command line (CONTRACT §1) end to end, each command a real process."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiomqtt
import asyncpg
import httpx
import pytest

from gridwarden.config import Settings
from gridwarden.embedded import EmbeddedMosquitto, EmbeddedPostgres, pid_running
from gridwarden.sample_city import SampleCityFiles, write_sample_city
from tests.ingest_helpers import fetchval, wait_for
from tests.test_service_process import GRIDWARDEN, service_env, service_process

CLI_TIMEOUT_S = 120.0
DEMO_START_TIMEOUT_S = 180.0  # the first start runs initdb
DEMO_TRAFFIC_TIMEOUT_S = 60.0
DEMO_STOP_TIMEOUT_S = 90.0
SAMPLE_COUNTS = {"grid": 40, "devices": 300, "workers": 37}
TABLE_OF = {"grid": "cells", "devices": "devices", "workers": "workers"}
SUMMARY = re.compile(r"^(grid|devices|workers): (\d+) created, (\d+) updated, (\d+) unchanged")


# --------------------------------------------------------------------------- helpers


def clean_env(**settings: str) -> dict[str, str]:
    """The test's environment without any inherited GRIDWARDEN_* setting, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRIDWARDEN_")}
    env.update(settings)
    return env


def db_env(database_url: str, data_dir: Path) -> dict[str, str]:
    """Only the database configured: the registry commands need no broker."""
    return clean_env(GRIDWARDEN_DATABASE_URL=database_url, GRIDWARDEN_DATA_DIR=str(data_dir))


async def gridwarden(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run `python -m gridwarden ARGS` to completion (bounded) without blocking the loop."""
    return await asyncio.to_thread(
        subprocess.run,
        [*GRIDWARDEN, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def summaries(stdout: str) -> dict[str, tuple[int, int, int]]:
    """`{registry: (created, updated, unchanged)}` from import summaries in `stdout`."""
    found = {}
    for line in stdout.splitlines():
        match = SUMMARY.match(line.strip())
        if match:
            found[match[1]] = (int(match[2]), int(match[3]), int(match[4]))
    return found


def database_dsn(database_url: str, name: str) -> str:
    """The same server and user, another database."""
    parts = urlsplit(database_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def count(database_url: str, table: str) -> int:
    return int(await fetchval(database_url, f"SELECT count(*) FROM {table}"))


def registry_files(files: SampleCityFiles) -> list[tuple[str, Path]]:
    """The sample city's files in import order (devices and workers need the grid)."""
    return [("grid", files.grid), ("devices", files.devices), ("workers", files.workers)]


async def import_sample_city(database_url: str, data_dir: Path) -> SampleCityFiles:
    files = write_sample_city(data_dir / "city")
    env = db_env(database_url, data_dir)
    for kind, path in registry_files(files):
        result = await gridwarden("import", kind, str(path), env=env)
        assert result.returncode == 0, result.stderr
    return files


def port_accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def first_int(path: Path) -> int:
    return int(path.read_text(encoding="utf-8").split()[0])


# --------------------------------------------------------------------------- migrate


async def test_migrate_applies_on_an_empty_database_and_is_idempotent(database_url, tmp_path):
    already = await gridwarden("migrate", env=db_env(database_url, tmp_path))
    assert already.returncode == 0, already.stderr
    assert "schema is up to date" in already.stdout

    admin_dsn = database_dsn(database_url, "postgres")
    empty = f"cli_empty_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {empty}")
        empty_url = database_dsn(database_url, empty)
        env = db_env(empty_url, tmp_path)

        first = await gridwarden("migrate", env=env)
        assert first.returncode == 0, first.stderr
        assert first.stdout.startswith("applied: "), first.stdout
        assert "001_core" in first.stdout
        assert await count(empty_url, "devices") == 0  # the schema exists now
        versions = await count(empty_url, "schema_migrations")
        assert versions > 0

        second = await gridwarden("migrate", env=env)
        assert second.returncode == 0, second.stderr
        assert "schema is up to date" in second.stdout
        assert await count(empty_url, "schema_migrations") == versions
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {empty} WITH (FORCE)")
        await admin.close()
    # Only the database was needed: no embedded broker or cluster under the data dir.
    assert not (tmp_path / "mosquitto").exists()
    assert not (tmp_path / "postgres").exists()


# --------------------------------------------------------------------------- import


async def test_import_sample_city_then_reimport_changes_nothing(database_url, tmp_path):
    files = write_sample_city(tmp_path / "city")
    env = db_env(database_url, tmp_path)
    order = registry_files(files)

    for kind, path in order:
        result = await gridwarden("import", kind, str(path), env=env)
        assert result.returncode == 0, result.stderr
        assert summaries(result.stdout) == {kind: (SAMPLE_COUNTS[kind], 0, 0)}, result.stdout
        assert await count(database_url, TABLE_OF[kind]) == SAMPLE_COUNTS[kind]

    for kind, path in order:
        result = await gridwarden("import", kind, str(path), env=env)
        assert result.returncode == 0, result.stderr
        assert summaries(result.stdout) == {kind: (0, 0, SAMPLE_COUNTS[kind])}, result.stdout
        assert await count(database_url, TABLE_OF[kind]) == SAMPLE_COUNTS[kind]


async def test_bad_devices_csv_is_rejected_whole_with_every_line_listed(database_url, tmp_path):
    files = await import_sample_city(database_url, tmp_path)
    with files.devices.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    # Line 1 is the header; body[i] is line i + 2. Good lines would create and update.
    body = [
        {**rows[0], "id": "smoke-new-1"},  # line 2: new, would be created
        {**rows[1], "name": "renamed, would be updated"},  # line 3
        {**rows[2], "id": "bad-kind", "kind": "toaster"},  # line 4
        rows[7],  # line 5: unchanged
        {**rows[3], "id": "bad-lat", "lat": "north"},  # line 6
        {**rows[4], "id": "far-away", "lat": "10.0", "lon": "10.0"},  # line 7: in no cell
        {**rows[5], "id": "smoke-new-1"},  # line 8: duplicate of line 2
        rows[8],  # line 9
        {**rows[6], "id": "bad/id"},  # line 10
    ]
    bad_lines = {4: "toaster", 6: "north", 7: "far-away", 8: "duplicate", 10: "bad/id"}
    bad = tmp_path / "bad-devices.csv"
    with bad.open("w", encoding="utf-8", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(body)
    before = await count(database_url, "devices")
    name_sql = "SELECT name FROM devices WHERE id = $1"
    name_before = await fetchval(database_url, name_sql, rows[1]["id"])

    result = await gridwarden("import", "devices", str(bad), env=db_env(database_url, tmp_path))

    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "nothing was changed" in result.stderr
    problems = [line.strip() for line in result.stderr.splitlines() if line.strip()[:2] == "- "]
    listed = {int(m[1]) for p in problems if (m := re.match(r"- line (\d+)\b", p))}
    assert listed == set(bad_lines), result.stderr
    for number, hint in bad_lines.items():
        assert any(p.startswith(f"- line {number}") and hint in p for p in problems), (
            number,
            result.stderr,
        )
    assert await count(database_url, "devices") == before
    assert await fetchval(database_url, name_sql, "smoke-new-1") is None
    assert await fetchval(database_url, name_sql, rows[1]["id"]) == name_before


async def test_bad_grid_file_is_rejected_listing_feature_numbers(database_url, tmp_path):
    files = write_sample_city(tmp_path / "city")
    grid = json.loads(files.grid.read_text(encoding="utf-8"))
    features = grid["features"]
    del features[3]["properties"]["name"]
    features[5]["properties"]["level"] = "county"
    features[7]["geometry"] = {"type": "Point", "coordinates": [120.6, 29.1]}
    bad = tmp_path / "bad-grid.geojson"
    bad.write_text(json.dumps(grid, ensure_ascii=False), encoding="utf-8")

    result = await gridwarden("import", "grid", str(bad), env=db_env(database_url, tmp_path))

    assert result.returncode != 0
    assert "nothing was changed" in result.stderr
    for index in (3, 5, 7):
        assert f"feature [{index}]" in result.stderr, (index, result.stderr)
    assert await count(database_url, "cells") == 0


# --------------------------------------------------------------------------- tokens


async def test_tokens_authorize_against_a_running_service(
    database_url, mqtt_url, topic_prefix, tmp_path
):
    files = await import_sample_city(database_url, tmp_path)
    worker_id = json.loads(files.workers.read_text(encoding="utf-8"))[0]["id"]
    env = db_env(database_url, tmp_path)

    operator = await gridwarden("token", "create", "--role", "operator", env=env)
    assert operator.returncode == 0, operator.stderr
    operator_token = operator.stdout.strip()
    assert re.fullmatch(r"gw_\S+", operator_token), operator.stdout
    worker = await gridwarden("token", "create", "--role", "worker", "--worker", worker_id, env=env)
    assert worker.returncode == 0, worker.stderr
    worker_token = worker.stdout.strip()
    assert worker_token != operator_token

    no_worker = await gridwarden("token", "create", "--role", "worker", env=env)
    assert no_worker.returncode != 0
    assert "--worker" in no_worker.stderr
    assert "Traceback" not in no_worker.stderr
    unknown = await gridwarden(
        "token", "create", "--role", "worker", "--worker", "w-nobody", env=env
    )
    assert unknown.returncode != 0
    assert "w-nobody" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    stray = await gridwarden(
        "token", "create", "--role", "operator", "--worker", worker_id, env=env
    )
    assert stray.returncode != 0
    assert "--worker" in stray.stderr
    assert not (no_worker.stdout + unknown.stdout + stray.stdout).strip()  # no token printed
    assert await count(database_url, "api_tokens") == 2

    service = service_env(database_url, mqtt_url, topic_prefix, tmp_path)
    async with service_process(service) as (_, url), httpx.AsyncClient(base_url=url) as http:

        def bearer(token: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {token}"}

        assert (await http.get("/api/devices")).status_code == 401
        bogus = await http.get("/api/devices", headers=bearer("gw_not-a-real-token"))
        assert bogus.status_code == 401
        devices = await http.get(
            "/api/devices", params={"limit": 1000}, headers=bearer(operator_token)
        )
        assert devices.status_code == 200, devices.text
        assert len(devices.json()["items"]) == SAMPLE_COUNTS["devices"]
        letters = await http.get("/api/dead-letters", headers=bearer(operator_token))
        assert letters.status_code == 200
        as_worker = bearer(worker_token)
        assert (await http.get("/api/dead-letters", headers=as_worker)).status_code == 403
        assert (await http.get("/api/devices", headers=as_worker)).status_code == 200


# --------------------------------------------------------------------------- demo


@dataclass
class DemoRun:
    process: asyncio.subprocess.Process
    url: str = ""
    token: str = ""
    stdout: list[str] = field(default_factory=list)
    drain: asyncio.Task[None] | None = None


@pytest.fixture
def demo_data_dir() -> Iterator[Path]:
    """A fresh data dir the embedded servers' account can reach; whatever the test leaves
    running in it (a failed test) is stopped, then it is removed."""
    root = Path(tempfile.mkdtemp(prefix="gridwarden-demo-"))
    root.chmod(0o711)
    yield root
    with contextlib.suppress(Exception):
        EmbeddedPostgres(root).stop()
    with contextlib.suppress(Exception):
        EmbeddedMosquitto(root).stop()
    shutil.rmtree(root, ignore_errors=True)


@contextlib.asynccontextmanager
async def demo_process(data_dir: Path, log: Path) -> AsyncIterator[DemoRun]:
    env = clean_env(GRIDWARDEN_DATA_DIR=str(data_dir), GRIDWARDEN_HTTP_PORT="0")
    with log.open("ab") as stderr:
        process = await asyncio.create_subprocess_exec(
            *GRIDWARDEN, "demo", env=env, stdout=subprocess.PIPE, stderr=stderr
        )
    assert process.stdout is not None
    run = DemoRun(process)
    try:
        async with asyncio.timeout(DEMO_START_TIMEOUT_S):
            while not (run.url and run.token):
                line = (await process.stdout.readline()).decode()
                if not line:
                    code = await process.wait()
                    raise AssertionError(
                        f"demo exited early with {code}:\n{''.join(run.stdout)}\n(its log: {log})"
                    )
                run.stdout.append(line)
                if "gridwarden demo is up:" in line:
                    run.url = line.split("gridwarden demo is up:")[1].split()[0]
                if "operator token:" in line:
                    run.token = line.split("operator token:")[1].strip()
        run.drain = asyncio.create_task(_collect(process.stdout, run.stdout))
        yield run
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if run.drain is not None:
            run.drain.cancel()


async def _collect(stream: asyncio.StreamReader, into: list[str]) -> None:
    while line := await stream.readline():
        into.append(line.decode())


def stored_telemetry(metrics: str) -> float:
    match = re.search(r'^gridwarden_ingest_stored_total\{table="telemetry"\} (\S+)$', metrics, re.M)
    return float(match[1]) if match else 0.0


async def stop_demo(run: DemoRun) -> None:
    run.process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(DEMO_STOP_TIMEOUT_S):
        assert await run.process.wait() == 0


@pytest.mark.slow
async def test_demo_on_embedded_services_end_to_end_and_restart(demo_data_dir, tmp_path):
    postmaster_pid_file = demo_data_dir / "postgres" / "data" / "postmaster.pid"
    mosquitto_pid_file = demo_data_dir / "mosquitto" / "pid"

    async with demo_process(demo_data_dir, tmp_path / "demo-1.log") as run:
        assert summaries("".join(run.stdout)) == {
            kind: (n, 0, 0) for kind, n in SAMPLE_COUNTS.items()
        }, run.stdout
        headers = {"Authorization": f"Bearer {run.token}"}
        async with httpx.AsyncClient(base_url=run.url, timeout=10) as http:
            await wait_for(
                lambda: http.get("/metrics"),
                lambda r: r.status_code == 200 and stored_telemetry(r.text) > 0,
                within_s=DEMO_TRAFFIC_TIMEOUT_S,
            )
            devices = await http.get("/api/devices", params={"limit": 1000}, headers=headers)
            assert devices.status_code == 200, devices.text
            items = devices.json()["items"]
            assert len(items) == SAMPLE_COUNTS["devices"]
            assert devices.json()["next_cursor"] is None
            assert (await http.get("/api/devices")).status_code == 401

        postgres_pid = first_int(postmaster_pid_file)
        postgres_port = first_int(demo_data_dir / "postgres" / "port")
        mosquitto_pid = first_int(mosquitto_pid_file)
        mosquitto_port = first_int(demo_data_dir / "mosquitto" / "port")
        assert pid_running(postgres_pid)
        assert pid_running(mosquitto_pid)
        assert port_accepts(postgres_port)
        assert port_accepts(mosquitto_port)
        # The embedded default runs with authentication on: no anonymous client gets in
        # (the simulator above published as its gateway account).
        with pytest.raises(aiomqtt.MqttError, match=r"(?i)authori"):
            async with aiomqtt.Client("127.0.0.1", mosquitto_port, identifier="anonymous"):
                pass

        await stop_demo(run)

    assert not pid_running(postgres_pid)
    assert not pid_running(mosquitto_pid)
    assert not postmaster_pid_file.exists()
    assert not mosquitto_pid_file.exists()
    assert not port_accepts(postgres_port)
    assert not port_accepts(mosquitto_port)

    # Again on the same data dir: the same cluster, the sample city already there.
    async with demo_process(demo_data_dir, tmp_path / "demo-2.log") as run:
        assert summaries("".join(run.stdout)) == {
            kind: (0, 0, n) for kind, n in SAMPLE_COUNTS.items()
        }, run.stdout
        async with httpx.AsyncClient(base_url=run.url, timeout=10) as http:
            response = await http.get(
                "/api/devices",
                params={"limit": 1},
                headers={"Authorization": f"Bearer {run.token}"},
            )
            assert response.status_code == 200, response.text
        await stop_demo(run)
    second_log = (tmp_path / "demo-2.log").read_text(encoding="utf-8", errors="replace")
    assert "creating the embedded PostgreSQL cluster" not in second_log
    assert not postmaster_pid_file.exists()
    assert not mosquitto_pid_file.exists()


# --------------------------------------------------------------------------- help


def test_up_help_lists_every_setting():
    result = subprocess.run(
        [*GRIDWARDEN, "up", "--help"],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    listed = set(re.findall(r"\bGRIDWARDEN_[A-Z0-9_]+", result.stdout))
    expected = {f"GRIDWARDEN_{name.upper()}" for name in Settings.model_fields}
    assert expected <= listed, sorted(expected - listed)
