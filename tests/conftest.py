"""Shared fixtures: one private PostgreSQL and one private Mosquitto for the whole session.

Every test gets a fresh database cloned from a migrated template (`CREATE DATABASE ...
TEMPLATE gw_template`) and its own MQTT topic prefix on the shared broker. The machine's own
servers on 5432 / 1883 are never used.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest

from gridwarden.embedded import EmbeddedMosquitto, EmbeddedPostgres
from gridwarden.migrate import migrate

TEMPLATE_DATABASE = "gw_template"


@pytest.fixture(scope="session")
def services_root() -> Iterator[Path]:
    """A directory the servers' account can traverse, removed at the end of the session.

    Not under tmp_path_factory: pytest makes /tmp/pytest-of-USER mode 0700, and as root the
    servers run as an unprivileged account that must reach their data dirs.
    """
    root = Path(tempfile.mkdtemp(prefix="gridwarden-test-"))
    root.chmod(0o711)
    yield root
    if not os.environ.get("GRIDWARDEN_KEEP_TEST_SERVICES"):
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def embedded_postgres(services_root: Path) -> Iterator[EmbeddedPostgres]:
    postgres = EmbeddedPostgres(services_root / "session")
    postgres.start()
    yield postgres
    postgres.stop()


@pytest.fixture(scope="session")
def embedded_mosquitto(services_root: Path) -> Iterator[EmbeddedMosquitto]:
    mosquitto = EmbeddedMosquitto(services_root / "session", anonymous=True)
    mosquitto.start()
    yield mosquitto
    mosquitto.stop()


@pytest.fixture(scope="session")
def mqtt_url(embedded_mosquitto: EmbeddedMosquitto) -> str:
    return embedded_mosquitto.url


@pytest.fixture(scope="session")
async def template_database(embedded_postgres: EmbeddedPostgres) -> str:
    """`gw_template`, migrated once; closed to connections so cloning it never collides."""
    admin = await asyncpg.connect(embedded_postgres.dsn_for("postgres"))
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DATABASE} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {TEMPLATE_DATABASE}")
        await migrate(embedded_postgres.dsn_for(TEMPLATE_DATABASE))
        await admin.execute(
            f"ALTER DATABASE {TEMPLATE_DATABASE} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false"
        )
    finally:
        await admin.close()
    return TEMPLATE_DATABASE


@asynccontextmanager
async def fresh_database(embedded_postgres: EmbeddedPostgres, template: str) -> AsyncIterator[str]:
    """A migrated database cloned from the template, dropped afterwards: its URL."""
    name = f"test_{uuid.uuid4().hex[:16]}"
    admin_dsn = embedded_postgres.dsn_for("postgres")
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    finally:
        await admin.close()
    try:
        yield embedded_postgres.dsn_for(name)
    finally:
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await admin.close()


@pytest.fixture
async def database_url(
    embedded_postgres: EmbeddedPostgres, template_database: str
) -> AsyncIterator[str]:
    """A fresh, migrated database of this test's own, dropped afterwards."""
    async with fresh_database(embedded_postgres, template_database) as url:
        yield url


@pytest.fixture
async def second_database_url(
    embedded_postgres: EmbeddedPostgres, template_database: str
) -> AsyncIterator[str]:
    """Another one, for a test comparing two runs of the same thing."""
    async with fresh_database(embedded_postgres, template_database) as url:
        yield url


@pytest.fixture
def topic_prefix() -> str:
    """This test's own topic prefix (matches Settings.topic_prefix: ^[A-Za-z0-9_-]{1,32}$)."""
    return "t" + uuid.uuid4().hex[:12]
