"""`gridwarden demo`: the sample city imported through the real import path, an
operator token, and the device simulator publishing to the service's broker."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import asyncpg
import click

from gridwarden.auth import create_token
from gridwarden.config import Settings
from gridwarden.migrate import migrate
from gridwarden.registry import import_file
from gridwarden.sample_city import write_sample_city
from gridwarden.supervisor import TaskFn

DEMO_SCENARIOS = ("fire", "cover_opened", "door_forced", "bin_full", "faulty", "hostile")

TaskFactory = Callable[[asyncpg.Pool], TaskFn]


async def prepare_demo(
    settings: Settings, database_url: str, mqtt_url: str, speedup: float
) -> tuple[dict[str, TaskFactory], Callable[[str], None]]:
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
    finally:
        await conn.close()
    devices = load_devices_from_csv(Path(files.devices))

    def simulator(pool: asyncpg.Pool) -> TaskFn:
        async def run(stop: asyncio.Event) -> None:
            await run_fleet(
                mqtt_url,
                devices,
                prefix=settings.topic_prefix,
                speedup=speedup,
                scenarios=DEMO_SCENARIOS,
                stop=stop,
            )
            await stop.wait()  # a finished simulation is no reason to stop the service

        return run

    def ready(url: str) -> None:
        for report in reports:
            click.echo(report.summary())
        click.echo(f"\ngridwarden demo is up: {url}")
        click.echo(f"  sample city: {len(devices)} devices simulated at {speedup:g}x speed")
        click.echo(f"  operator token: {token}")
        auth = f"-H 'Authorization: Bearer {token}'"
        click.echo(f"  alarms: curl {auth} {url}/api/alarms")
        click.echo(f"  live:   curl -N {auth} {url}/api/alarms/stream")
        click.echo(f"  devices: curl {auth} '{url}/api/devices?limit=5'")
        click.echo(f"       curl {url}/metrics | grep gridwarden_ingest_stored")
        click.echo("  stop with Ctrl-C")

    return {"device-sim": simulator}, ready
