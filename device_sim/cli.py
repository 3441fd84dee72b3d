"""`gridwarden sim …`: the device simulator from the command line.

A standalone click group named `sim`; the main CLI mounts it. Examples::

    gridwarden sim run --mqtt-url mqtt://localhost:1883 --devices devices.csv \\
        --speedup 60 --duration 30 --scenario fire --scenario faulty
    gridwarden sim run --count 200 --scenario hostile --codec-share 0.3
    gridwarden sim scenarios
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final, Literal

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from device_sim.engine import DEFAULT_BUFFER_SHARE, DEFAULT_SCENARIO_DELAY_S
from device_sim.fleet import FleetStats, parse_mqtt_url, run_fleet, synthetic_fleet
from device_sim.scenarios import SCENARIOS
from device_sim.spec import DeviceFileError, DeviceSpec, load_devices

REFRESH_S: Final = 0.25
EXIT_NOTHING_SENT: Final = 1


@click.group(name="sim")
def sim() -> None:
    """Device simulator: a fleet publishing readings and scenarios over MQTT."""


@sim.command(name="scenarios")
def list_scenarios() -> None:
    """List the scenarios `sim run --scenario` accepts."""
    for name, factory in SCENARIOS.items():
        click.echo(f"{name:14} {factory().description}")


def _share(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise click.BadParameter(f"must be within 0..1, got {value}")
    return value


@sim.command(name="run")
@click.option(
    "--mqtt-url",
    envvar="GRIDWARDEN_MQTT_URL",
    required=True,
    show_envvar=True,
    help="mqtt://user:pass@host:port (mqtts:// for TLS; ?ca=FILE&insecure=1)",
)
@click.option(
    "--devices",
    "devices_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="devices CSV or JSON (CONTRACT §4)",
)
@click.option(
    "--count",
    type=click.IntRange(1, 1_000_000),
    default=None,
    help="without --devices: a made-up fleet of this many devices [default: 100]",
)
@click.option(
    "--speedup",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="simulated seconds per real second",
)
@click.option(
    "--duration",
    type=click.FloatRange(min=0),
    default=None,
    help="stop after this many real seconds [default: run until Ctrl-C]",
)
@click.option(
    "--scenario",
    "scenarios",
    multiple=True,
    type=click.Choice(list(SCENARIOS)),
    help="inject a scenario (repeatable)",
)
@click.option(
    "--scenario-delay",
    type=click.FloatRange(min=0),
    default=DEFAULT_SCENARIO_DELAY_S,
    show_default=True,
    help="simulated seconds before the first scenario starts",
)
@click.option(
    "--scenario-every",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="repeat every scenario this often (simulated seconds) [default: once]",
)
@click.option(
    "--prefix",
    envvar="GRIDWARDEN_TOPIC_PREFIX",
    default="gw",
    show_default=True,
    help="topic prefix",
)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--qos", type=click.IntRange(0, 2), default=1, show_default=True)
@click.option(
    "--codec-share",
    type=float,
    default=0.0,
    show_default=True,
    callback=_share,
    help="share of devices speaking a vendor format (zigbee2mqtt/chirpstack/hikvision)",
)
@click.option(
    "--buffer-share",
    type=float,
    default=DEFAULT_BUFFER_SHARE,
    show_default=True,
    callback=_share,
    help="share of devices flushing buffered readings as an array",
)
@click.option(
    "--ts-clock",
    type=click.Choice(["wall", "sim"]),
    default="wall",
    show_default=True,
    help="`ts` from the wall clock or the (sped-up) simulated clock",
)
@click.option(
    "--status/--no-status",
    default=True,
    show_default=True,
    help="publish retained online/offline status",
)
@click.option("--quiet", is_flag=True, help="no live status line")
def run(
    mqtt_url: str,
    devices_file: Path | None,
    count: int | None,
    speedup: float,
    duration: float | None,
    scenarios: Sequence[str],
    scenario_delay: float,
    scenario_every: float | None,
    prefix: str,
    seed: int,
    qos: int,
    codec_share: float,
    buffer_share: float,
    ts_clock: Literal["wall", "sim"],
    status: bool,
    quiet: bool,
) -> None:
    """Run a simulated fleet against an MQTT broker."""
    try:
        parse_mqtt_url(mqtt_url)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--mqtt-url") from None
    if devices_file is not None and count is not None:
        raise click.UsageError("give --devices or --count, not both")
    try:
        devices = (
            load_devices(devices_file)
            if devices_file is not None
            else synthetic_fleet(count or 100, seed=seed)
        )
    except (DeviceFileError, OSError) as exc:
        raise click.BadParameter(str(exc), param_hint="--devices") from None
    if not devices:
        raise click.BadParameter("the devices file lists no device", param_hint="--devices")
    console = Console(stderr=True)
    stats = FleetStats()
    asyncio.run(_run(
        console, stats, mqtt_url, devices, prefix=prefix, speedup=speedup, duration=duration,
        scenarios=scenarios, qos=qos, seed=seed, status=status, codec_share=codec_share,
        buffer_share=buffer_share, scenario_delay=scenario_delay, scenario_every=scenario_every,
        ts_clock=ts_clock, live=not quiet and console.is_terminal,
    ))  # fmt: skip
    console.print(_summary(stats))
    if stats.published == 0:
        console.print(f"[red]nothing was published[/red]: {stats.last_error or 'no messages'}")
        sys.exit(EXIT_NOTHING_SENT)


async def _run(
    console: Console,
    stats: FleetStats,
    mqtt_url: str,
    devices: Sequence[DeviceSpec],
    *,
    prefix: str,
    speedup: float,
    duration: float | None,
    scenarios: Sequence[str],
    qos: int,
    seed: int,
    status: bool,
    codec_share: float,
    buffer_share: float,
    scenario_delay: float,
    scenario_every: float | None,
    ts_clock: Literal["wall", "sim"],
    live: bool,
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop.set)
            handled.append(signum)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not on Unix
            pass
    fleet = asyncio.create_task(run_fleet(
        mqtt_url, devices, prefix=prefix, speedup=speedup, duration_s=duration,
        scenarios=scenarios, qos=qos, seed=seed, status=status, stop=stop,
        codec_share=codec_share, buffer_share=buffer_share, scenario_delay_s=scenario_delay,
        scenario_every_s=scenario_every, ts_clock=ts_clock, stats=stats,
    ), name="device_sim.fleet")  # fmt: skip
    try:
        if live:
            with Live(_line(stats, speedup), console=console, refresh_per_second=4) as display:
                while not fleet.done():
                    await asyncio.wait({fleet}, timeout=REFRESH_S)
                    display.update(_line(stats, speedup))
        await fleet
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)


def _line(stats: FleetStats, speedup: float) -> Text:
    elapsed = max(time.time() - stats.started_at, 0.0) if stats.started_at else 0.0
    rate = stats.published / elapsed if elapsed > 0 else 0.0
    sim_clock = (
        datetime.fromtimestamp(stats.sim_time, UTC).astimezone().strftime("%m-%d %H:%M:%S")
        if stats.sim_time
        else "--"
    )
    line = Text()
    line.append("● " if stats.connected else "○ ", style="green" if stats.connected else "red")
    line.append(f"sim {sim_clock} (×{speedup:g})  ", style="cyan")
    line.append(f"{stats.devices} devices  {stats.published} sent ({rate:.0f}/s)  ")
    channels = " ".join(f"{k}:{v}" for k, v in sorted(stats.by_channel.items()))
    line.append(channels + "  ", style="dim")
    if stats.by_scenario:
        scen = " ".join(f"{k}:{v}" for k, v in sorted(stats.by_scenario.items()))
        line.append(f"scenarios {scen}  ", style="yellow")
    if stats.bad:
        line.append(f"bad {stats.bad}  ", style="magenta")
    if stats.backlog:
        line.append(f"backlog {stats.backlog}  ", style="red")
    if stats.reconnects:
        line.append(f"reconnects {stats.reconnects} ({stats.last_error})", style="red")
    return line


def _summary(stats: FleetStats) -> Table:
    table = Table(title="device simulator", show_header=True)
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("published", str(stats.published))
    table.add_row("bytes", str(stats.bytes))
    for kind, value in sorted(stats.by_kind.items()):
        table.add_row(f"  kind {kind}", str(value))
    for channel, value in sorted(stats.by_channel.items()):
        table.add_row(f"  channel {channel}", str(value))
    for scenario, value in sorted(stats.by_scenario.items()):
        table.add_row(f"  scenario {scenario}", str(value))
    table.add_row("bad (deliberate)", str(stats.bad))
    table.add_row("failed attempts", str(stats.failed))
    table.add_row("dropped", str(stats.dropped))
    table.add_row("reconnects", str(stats.reconnects))
    return table
