"""`gridwarden up`: migrate, then run ingest and the HTTP API under one supervisor."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
from collections.abc import Awaitable, Callable
from contextlib import closing, nullcontext
from typing import TYPE_CHECKING

import asyncpg
import uvicorn
from fastapi import FastAPI

from gridwarden.broker_auth import BrokerFiles, broker_auth_task
from gridwarden.broker_autosave import autosave_task
from gridwarden.config import Settings
from gridwarden.db import create_pool
from gridwarden.migrate import migrate
from gridwarden.mqtt_url import parse_mqtt_url
from gridwarden.retention import apply_policies, retention_task
from gridwarden.supervisor import Supervisor, TaskFn
from gridwarden.web import AppState, WebConfig, create_app

if TYPE_CHECKING:
    from ingest.consumer import IngestService
    from rules.spec import RuleSet

log = logging.getLogger(__name__)

HTTP_DRAIN_S = 5.0
READINESS_TIMEOUT_S = 2.0
GC_GEN0_THRESHOLD = 50_000  # allocations between young collections (default 700)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the supervisor owns SIGTERM."""

    def capture_signals(self):  # type: ignore[no-untyped-def]
        return nullcontext()


def bind_http(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(128)
    sock.setblocking(False)
    return sock


def http_task(app: FastAPI, sock: socket.socket) -> TaskFn:
    async def serve(stop: asyncio.Event) -> None:
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
        server = _Server(config)
        serving = asyncio.create_task(server.serve(sockets=[sock]), name="uvicorn")
        stopping = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True
        stopping.cancel()
        async with asyncio.timeout(HTTP_DRAIN_S + 5):
            await serving
        if serving in done and not stop.is_set():
            raise RuntimeError("HTTP server stopped by itself")

    return serve


def database_check(pool: asyncpg.Pool) -> Callable[[], Awaitable[str | None]]:
    async def check() -> str | None:
        try:
            async with asyncio.timeout(READINESS_TIMEOUT_S):
                await pool.fetchval("SELECT 1")
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            return f"database unreachable: {exc!r}"
        return None

    return check


def broker_check(is_connected: Callable[[], bool]) -> Callable[[], Awaitable[str | None]]:
    async def check() -> str | None:
        return None if is_connected() else "not connected to the MQTT broker"

    return check


class IngestShards:
    """Runs one ingest shard: its consumer, its rules engine (the shard's devices and
    groups only) and their timers, until the shard is stopped."""

    def __init__(
        self, settings: Settings, pool: asyncpg.Pool, mqtt_url: str, ruleset: RuleSet | None
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.mqtt_url = mqtt_url
        self.ruleset = ruleset
        self.running: dict[int, IngestService] = {}
        self.owned: frozenset[int] | None = None  # None: no claim has run yet

    def note_claimed(self, owned: frozenset[int]) -> None:
        self.owned = owned

    def is_connected(self) -> bool:
        """Every shard this process holds is consuming (true for a standby holding none)."""
        if self.owned is None:
            return False
        return all(s in self.running and self.running[s].is_connected() for s in self.owned)

    async def run_shard(self, shard: int, stop: asyncio.Event) -> None:
        from ingest.consumer import IngestService
        from rules.runtime import RulesService

        count = self.settings.ingest_shards
        # One shard keeps the unsharded client ids, so an upgrade resumes the old sessions.
        ingest = IngestService(self.settings, self.pool, self.mqtt_url,
                               shard=None if count == 1 else shard)  # fmt: skip
        await ingest.directory.refresh(self.pool)
        shard_map = ingest.shards
        rules = RulesService(
            self.settings, self.pool, ingest.directory.lookup, devices=ingest.directory.ids,
            devices_version=lambda: ingest.directory.version,
            ruleset=self.ruleset,
            owns=None if shard_map is None else lambda source: shard_map.of_source(source) == shard,
        )  # fmt: skip
        await rules.start()
        ingest.rules = rules
        self.running[shard] = ingest
        try:
            async with asyncio.TaskGroup() as group:
                for name, task in (("ingest", ingest.run), ("maintenance", ingest.maintain),
                                   ("rules-timers", rules.run_timers),
                                   ("rules-refresh", rules.run_refresh)):  # fmt: skip
                    group.create_task(task(stop), name=f"{name}-{shard}")
        finally:
            del self.running[shard]


async def run_service(
    settings: Settings,
    database_url: str,
    mqtt_url: str,
    *,
    ruleset: RuleSet | None = None,
    extra_tasks: dict[str, Callable[[asyncpg.Pool], TaskFn]] | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Run until SIGTERM/SIGINT (clean return) or a task failure (TaskDied)."""
    from alerting.alarms_api import AlarmFeed, attach_alarms
    from alerting.alarms_api import router as alarms_router
    from alerting.cases_api import attach_cases
    from alerting.cases_api import router as cases_router
    from alerting.cells_api import router as cells_router
    from alerting.intake import case_intake_task
    from alerting.outbox import outbox_task
    from alerting.pages import attach_pages
    from alerting.sla import sla_task
    from gridwarden.clock import SystemClock
    from gridwarden.loop_lag import measure_loop_lag
    from ingest.api import router as ingest_router
    from ingest.shards import ShardOwner

    parse_mqtt_url(mqtt_url)
    applied = await migrate(database_url)
    if applied:
        log.info("migrations applied: %s", ", ".join(applied))
    sock = bind_http(settings.http_host, settings.http_port)
    with closing(sock):
        pool = await create_pool(database_url)
        try:
            clock = SystemClock()
            roles = settings.role_set
            readiness = {"database": database_check(pool)}
            supervisor = Supervisor()
            supervisor.install_signal_handlers()
            if "ingest" in roles:
                # Rules are evaluated inside the ingest transaction: one role, run per
                # ingest shard by whichever process holds the shard (ingest/shards.py).
                shards = IngestShards(settings, pool, mqtt_url, ruleset)
                readiness["broker"] = broker_check(shards.is_connected)
                owner = ShardOwner(database_url, settings.ingest_shards, shards.run_shard,
                                   on_claimed=shards.note_claimed)  # fmt: skip
                supervisor.add("ingest", owner.run)
            async with pool.acquire() as conn:
                timescale = await apply_policies(conn, settings)
            if "alerting" in roles and not timescale:
                supervisor.add("retention", retention_task(pool, settings))
            if "alerting" in roles:
                # Raised alarms are queued in the ingest transaction; their cases are
                # opened here, out of it (alerting.intake).
                supervisor.add("case-intake", case_intake_task(pool, settings, clock))
                supervisor.add("outbox", outbox_task(pool, mqtt_url))
                supervisor.add("sla", sla_task(pool, settings, clock))
            if settings.broker_auth_dir is not None:
                files = BrokerFiles(settings.broker_auth_dir, pid_file=settings.broker_pid_file)
                prefix = settings.topic_prefix
                supervisor.add("broker-auth", broker_auth_task(pool, files, prefix, mqtt_url))
            if settings.broker_persistence_file is not None and settings.broker_pid_file:
                supervisor.add(
                    "broker-autosave",
                    autosave_task(settings.broker_persistence_file, settings.broker_pid_file),
                )
            state = AppState(pool, readiness=readiness, web=WebConfig.from_settings(settings))
            if "api" in roles:
                app = create_app(
                    state, routers=[ingest_router, alarms_router, cases_router, cells_router]
                )
                attach_pages(app)
                attach_cases(app, settings=settings, clock=clock)
                feed = AlarmFeed(pool)
                attach_alarms(app, feed=feed, topic_prefix=settings.topic_prefix)
                supervisor.add("alarm-feed", feed.run)
            else:
                app = create_app(state)  # health, readiness and metrics only
            supervisor.add("http", http_task(app, sock))
            supervisor.add("loop-lag", measure_loop_lag)
            for name, make in (extra_tasks or {}).items():
                supervisor.add(name, make(pool))
            # The long-lived state is loaded (device directory, rule plans): keep the
            # collector from scanning it again and again, and let young objects pile up
            # longer between collections (one batch makes tens of thousands).
            gc.collect()
            gc.freeze()
            gc.set_threshold(GC_GEN0_THRESHOLD, 20, 50)
            host, port = sock.getsockname()[:2]
            if on_ready is not None:
                on_ready(f"http://{host}:{port}")
            await supervisor.run()
        finally:
            await pool.close()
