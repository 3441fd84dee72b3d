"""`gridwarden demo`: the sample city imported through the real import path, an
operator token, and the device simulator publishing to the service's broker."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import asyncpg
import click

from gridwarden import broker_auth
from gridwarden.auth import create_token
from gridwarden.broker_auth import BrokerFiles
from gridwarden.config import Settings
from gridwarden.migrate import migrate
from gridwarden.mqtt_url import with_user
from gridwarden.registry import import_file
from gridwarden.sample_city import write_sample_city
from gridwarden.supervisor import TaskFn

DEMO_SCENARIOS = ("fire", "cover_opened", "door_forced", "bin_full", "faulty", "hostile")

TaskFactory = Callable[[asyncpg.Pool], TaskFn]


def demo_settings(settings: Settings, speedup: float) -> Settings:
    """SLA deadlines run as fast as the simulated city, so escalations show within a
    minute or two (the defaults are the seeds' 10 and 30 minutes)."""
    scaled = {
        name: max(1, round(getattr(settings, name) / speedup))
        for name in type(settings).model_fields
        if name.startswith("sla_") and name.endswith("_s") and name != "sla_tick_s"
    }
    return settings.model_copy(update=scaled)


async def prepare_demo(
    settings: Settings, database_url: str, mqtt_url: str, speedup: float
) -> tuple[dict[str, TaskFactory], Callable[[str], None]]:
    from device_sim.crew import run_crew
    from device_sim.fleet import load_devices_from_csv, run_fleet

    city_dir = settings.data_dir / "sample_city"
    files = write_sample_city(city_dir)
    await migrate(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        reports = [
            await import_file(conn, "grid", files.grid, settings),
            await import_file(conn, "devices", files.devices, settings),
            await import_file(conn, "workers", files.workers, settings),
        ]
        token = await create_token(conn, "operator", label="demo")
        crew_token = await create_token(conn, "operator", label="demo crew")
        worker_tokens = {
            row["id"]: await create_token(conn, "worker", row["id"], label="demo crew")
            for row in await conn.fetch("SELECT id FROM workers WHERE on_duty")
        }
        sim_url, crew_url = mqtt_url, mqtt_url
        if settings.broker_auth_dir is not None:
            # The embedded broker lets nobody in anonymously: the simulator publishes as a
            # gateway (for all its devices), the crew reads the workers' topics as an operator.
            sim_url = with_user(mqtt_url, *await broker_auth.issue(conn, "gateway", "demo-sim"))
            crew_url = with_user(mqtt_url, *await broker_auth.issue(conn, "operator", "demo-crew"))
            broker = BrokerFiles(settings.broker_auth_dir, pid_file=settings.broker_pid_file)
            await broker_auth.sync_broker_files(conn, broker, settings.topic_prefix, mqtt_url)
    finally:
        await conn.close()
    devices = load_devices_from_csv(Path(files.devices))

    def simulator(pool: asyncpg.Pool) -> TaskFn:
        async def run(stop: asyncio.Event) -> None:
            await run_fleet(
                sim_url,
                devices,
                prefix=settings.topic_prefix,
                speedup=speedup,
                scenarios=DEMO_SCENARIOS,
                stop=stop,
            )
            await stop.wait()  # a finished simulation is no reason to stop the service

        return run

    api: dict[str, str] = {}

    def crew(pool: asyncpg.Pool) -> TaskFn:
        async def run(stop: asyncio.Event) -> None:
            await run_crew(crew_url, api["url"], worker_tokens, crew_token,
                           prefix=settings.topic_prefix, speedup=speedup, stop=stop)  # fmt: skip

        return run

    def ready(url: str) -> None:
        api["url"] = url
        for report in reports:
            click.echo(report.summary())
        click.echo(f"\ngridwarden demo is up: {url}")
        click.echo(f"  console: open {url}/login in a browser and sign in with the token below")
        click.echo(f"  sample city: {len(devices)} devices simulated at {speedup:g}x speed")
        click.echo(f"  operator token: {token}")
        auth = f"-H 'Authorization: Bearer {token}'"
        click.echo(f"  alarms: curl {auth} {url}/api/alarms")
        click.echo(f"  live:   curl -N {auth} {url}/api/alarms/stream")
        click.echo(f"  cases:  curl {auth} {url}/api/cases   (simulated workers work them)")
        click.echo(f"  stats:  curl {auth} '{url}/api/stats?by=worker'")
        click.echo(f"  devices: curl {auth} '{url}/api/devices?limit=5'")
        click.echo(f"       curl {url}/metrics | grep gridwarden_ingest_stored")
        click.echo("  stop with Ctrl-C")

    return {"device-sim": simulator, "worker-crew": crew}, ready
