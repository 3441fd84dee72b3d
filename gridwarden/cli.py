"""The `gridwarden` command line (CONTRACT §1)."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import click

from gridwarden.config import ConfigError, Settings, load_settings
from gridwarden.supervisor import TaskDied

T = TypeVar("T")
EXIT_BAD_CONFIG = 2
EXIT_FAILED = 1


def _settings_epilog() -> str:
    lines = ["\b", "Settings (environment variables; flags override them):"]
    for name, info in Settings.model_fields.items():
        default = info.get_default(call_default_factory=True)
        lines.append(f"  GRIDWARDEN_{name.upper():<32} default: {default}")
    return "\n".join(lines)


def common_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--config", "config_file", type=click.Path(path_type=Path),
                     help="TOML file with settings (keys as in the list below, lower case)"),
        click.option("--database-url", help="postgresql://…; unset: embedded PostgreSQL"),
        click.option("--mqtt-url", help="mqtt://user:pass@host:port; unset: embedded Mosquitto"),
        click.option("--data-dir", type=click.Path(path_type=Path)),
        click.option("--http-host"),
        click.option("--http-port", type=int),
        click.option("--topic-prefix"),
        click.option("-v", "--verbose", is_flag=True, help="debug logging"),
    ]  # fmt: skip
    for option in reversed(options):
        fn = option(fn)
    return fn


def _settings(ctx_args: dict[str, Any]) -> Settings:
    config_file = ctx_args.pop("config_file", None)
    verbose = ctx_args.pop("verbose", False)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise
    try:
        return load_settings(config_file, **ctx_args)
    except ConfigError as exc:
        click.echo(f"gridwarden: {exc}", err=True)
        sys.exit(EXIT_BAD_CONFIG)


@contextmanager
def _services(settings: Settings, *, broker: bool = True) -> Iterator[tuple[str, str]]:
    """The database and broker URLs, starting the embedded servers for what is unset.

    `broker=False` (migrate, import, token): only the database is needed, so no embedded
    Mosquitto is started (the yielded MQTT URL is then meaningless). A server that cannot be
    started is a one-line message and exit 1, not a traceback.
    """
    from gridwarden.embedded import EmbeddedServiceError, embedded_services

    if not broker and settings.mqtt_url is None:
        settings = settings.model_copy(update={"mqtt_url": "mqtt://unused.invalid"})
    try:
        with embedded_services(settings) as urls:
            yield urls
    except EmbeddedServiceError as exc:
        click.echo(f"gridwarden: {exc}", err=True)
        sys.exit(EXIT_FAILED)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@click.group()
@click.version_option(package_name="gridwarden")
def main() -> None:
    """gridwarden: IoT alarms turned into cases for the responsible grid worker."""


@main.command(epilog=_settings_epilog())
@common_options
@click.option("--only", "roles",
              help="roles of this process, comma-separated: ingest (with the rules), alerting, "
                   "api; `rules` is a synonym of ingest (as GRIDWARDEN_ROLES)")  # fmt: skip
def up(**kwargs: Any) -> None:
    """Run the whole service until SIGTERM/SIGINT."""
    if kwargs.get("roles"):
        # The rules are evaluated inside the ingest transaction: they run where ingest does.
        kwargs["roles"] = ",".join(
            "ingest" if role.strip() == "rules" else role.strip()
            for role in kwargs["roles"].split(",")
        )
    settings = _settings(kwargs)
    _serve(settings, demo=False)


@main.command(epilog=_settings_epilog())
@common_options
@click.option("--speedup", default=30.0, show_default=True, help="simulated time per real second")
def demo(speedup: float, **kwargs: Any) -> None:
    """`up` plus a sample city and the device simulator."""
    settings = _settings(kwargs)
    _serve(settings, demo=True, speedup=speedup)


def _serve(settings: Settings, *, demo: bool, speedup: float = 30.0) -> None:
    from gridwarden.service import run_service
    from rules.spec import RulesError, load_rules

    try:
        ruleset = load_rules([settings.rules_dir] if settings.rules_dir else [])
    except RulesError as exc:
        click.echo(f"gridwarden: {exc}", err=True)
        sys.exit(EXIT_BAD_CONFIG)
    try:
        with _services(settings) as (database_url, mqtt_url):
            if settings.mqtt_url is None:
                from gridwarden.embedded import with_embedded_broker_files

                settings = with_embedded_broker_files(settings)
            extra: dict[str, Any] = {}
            ready: Callable[[str], None] = _print_ready
            if demo:
                from gridwarden.demo import demo_settings, prepare_demo

                settings = demo_settings(settings, speedup)
                extra, ready = _run(prepare_demo(settings, database_url, mqtt_url, speedup))
            _run(
                run_service(
                    settings, database_url, mqtt_url,
                    ruleset=ruleset, extra_tasks=extra, on_ready=ready,
                )
            )  # fmt: skip
    except TaskDied as exc:
        click.echo(f"gridwarden: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    except OSError as exc:
        click.echo(f"gridwarden: {exc}", err=True)
        sys.exit(EXIT_FAILED)


def _print_ready(url: str) -> None:
    click.echo(f"gridwarden is up: {url}  (metrics at {url}/metrics)")


@main.command()
@common_options
def migrate(**kwargs: Any) -> None:
    """Bring the database schema to the current version (idempotent)."""
    from gridwarden.migrate import migrate as run_migrations

    settings = _settings(kwargs)
    with _services(settings, broker=False) as (database_url, _):
        applied = _run(run_migrations(database_url))
    click.echo("applied: " + ", ".join(applied) if applied else "schema is up to date")


@main.group(name="import")
def import_group() -> None:
    """Load the grid, device and worker registries (CONTRACT §4)."""


def _import_command(kind: str) -> None:
    @import_group.command(name=kind, epilog=_settings_epilog())
    @click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
    @common_options
    def command(file: Path, **kwargs: Any) -> None:
        from gridwarden.registry import RegistryError, import_file

        settings = _settings(kwargs)
        with _services(settings, broker=False) as (database_url, _):
            try:
                report = _run(_with_connection(database_url, import_file, kind, file, settings))
            except RegistryError as exc:
                click.echo(f"{file}: rejected, nothing was changed:", err=True)
                for problem in exc.problems:
                    click.echo(f"  - {problem}", err=True)
                sys.exit(EXIT_FAILED)
        click.echo(report.summary())

    command.__doc__ = f"Import the {kind} registry from FILE; a bad file changes nothing."


for _kind in ("grid", "devices", "workers"):
    _import_command(_kind)


async def _with_connection(database_url: str, fn: Callable[..., Any], *args: Any) -> Any:
    from gridwarden.migrate import migrate as run_migrations

    await run_migrations(database_url)
    conn = await asyncpg.connect(database_url)
    try:
        return await fn(conn, *args)
    finally:
        await conn.close()


@main.group()
def token() -> None:
    """API tokens."""


@token.command(name="create")
@click.option("--role", type=click.Choice(["operator", "worker", "admin"]), required=True)
@click.option("--worker", "worker_id", help="the worker's id (worker tokens only)")
@click.option("--label", default="", help="a note on who holds it")
@common_options
def token_create(role: str, worker_id: str | None, label: str, **kwargs: Any) -> None:
    """Print a new API token (shown once; only its hash is kept)."""
    from gridwarden.auth import create_token

    settings = _settings(kwargs)
    with _services(settings, broker=False) as (database_url, _):
        try:
            value = _run(_with_connection(database_url, create_token, role, worker_id, label))
        except ValueError as exc:
            click.echo(f"gridwarden: {exc}", err=True)
            sys.exit(EXIT_FAILED)
        except asyncpg.ForeignKeyViolationError:
            click.echo(
                f"gridwarden: no worker {worker_id!r} in the registry "
                "(import it with `gridwarden import workers FILE` first)",
                err=True,
            )
            sys.exit(EXIT_FAILED)
    click.echo(value)


@main.group()
def credentials() -> None:
    """Broker accounts: per-device MQTT credentials and ACLs (see README, Broker security)."""


@credentials.command(name="issue")
@click.argument("kind", type=click.Choice(["device", "gateway", "worker", "operator"]))
@click.argument("names", nargs=-1)
@click.option("--all-devices", is_flag=True, help="every registered device without an account")
@common_options
def credentials_issue(kind: str, names: tuple[str, ...], all_devices: bool, **kwargs: Any) -> None:
    """Create accounts (or rotate their passwords); prints `username,password` CSV once.

    NAMES are device ids, worker ids, or free names for gateways and operators. The
    running service reloads the broker within seconds.
    """
    from gridwarden import broker_auth

    if all_devices and (kind != "device" or names):
        raise click.UsageError("--all-devices goes with the kind `device` and no names")
    if not names and not all_devices:
        raise click.UsageError("name one or more accounts, or use --all-devices")

    async def issue(conn: asyncpg.Connection) -> list[tuple[str, str]]:
        if kind == "device":
            return await broker_auth.issue_for_devices(conn, None if all_devices else names)
        async with conn.transaction():
            return [await broker_auth.issue(conn, kind, name) for name in names]  # type: ignore[arg-type]

    settings = _settings(kwargs)
    with _services(settings, broker=False) as (database_url, _):
        try:
            issued = _run(_with_connection(database_url, issue))
        except broker_auth.BrokerAuthError as exc:
            click.echo(f"gridwarden: {exc}", err=True)
            sys.exit(EXIT_FAILED)
    click.echo("username,password")
    for username, password in issued:
        click.echo(f"{username},{password}")


@credentials.command(name="revoke")
@click.argument("usernames", nargs=-1, required=True)
@common_options
def credentials_revoke(usernames: tuple[str, ...], **kwargs: Any) -> None:
    """Revoke broker accounts by user name (the broker refuses them after its reload)."""
    from gridwarden import broker_auth

    async def revoke(conn: asyncpg.Connection) -> list[str]:
        return [name for name in usernames if not await broker_auth.revoke(conn, name)]

    settings = _settings(kwargs)
    with _services(settings, broker=False) as (database_url, _):
        unknown = _run(_with_connection(database_url, revoke))
    for name in unknown:
        click.echo(f"gridwarden: no live account {name!r}", err=True)
    sys.exit(EXIT_FAILED if unknown else 0)


@credentials.command(name="list")
@common_options
def credentials_list(**kwargs: Any) -> None:
    """Every broker account (no passwords: only their hashes are kept)."""
    from gridwarden.db import query

    async def fetch(conn: asyncpg.Connection) -> list[asyncpg.Record]:
        return list(await conn.fetch(query("list_mqtt_accounts")))

    settings = _settings(kwargs)
    with _services(settings, broker=False) as (database_url, _):
        rows = _run(_with_connection(database_url, fetch))
    click.echo("username,kind,subject,created_at,revoked_at")
    for row in rows:
        revoked = row["revoked_at"].isoformat() if row["revoked_at"] else ""
        click.echo(f"{row['username']},{row['kind']},{row['subject'] or ''},"
                   f"{row['created_at'].isoformat()},{revoked}")  # fmt: skip


@credentials.command(name="write-broker-files")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@common_options
def credentials_write(directory: Path, **kwargs: Any) -> None:
    """Write Mosquitto's `passwd` and `acl` files into DIRECTORY once (for a broker the
    service does not manage; `GRIDWARDEN_BROKER_AUTH_DIR` keeps them current instead)."""
    from gridwarden import broker_auth

    settings = _settings(kwargs)
    directory.mkdir(parents=True, exist_ok=True)
    files = broker_auth.BrokerFiles(directory)

    async def write(conn: asyncpg.Connection) -> bool:
        mqtt_url = settings.mqtt_url or "mqtt://localhost"
        return await broker_auth.sync_broker_files(conn, files, settings.topic_prefix, mqtt_url)

    with _services(settings, broker=False) as (database_url, _):
        _run(_with_connection(database_url, write))
    click.echo(f"{files.password_file}\n{files.acl_file}")


@main.command()
@click.option("--devices", default=100_000, show_default=True, help="devices registered")
@click.option("--duration", default=20.0, show_default=True, help="seconds per measured phase")
@click.option("--json", "as_json", is_flag=True, help="print only the JSON object on stdout")
@click.option("--qos", type=click.Choice(["0", "1"]), default="1", show_default=True,
              help="QoS of the live load in the latency phases (throughput is QoS 1)")  # fmt: skip
@click.option("--scaling", is_flag=True,
              help="also: ingest and peak RSS at 1k-1M devices, CPU per message at 25/50/100 %"
                   " of the ingest rate (several more minutes)")  # fmt: skip
@click.option("--scaling-devices", default="1000,10000,100000,1000000", show_default=True,
              help="registered-device counts for --scaling, comma-separated")  # fmt: skip
@click.option("--processes", default="",
              help="also ingest throughput with this many processes sharing ingest shards, "
                   "comma-separated (e.g. 1,2,3)")  # fmt: skip
def bench(
    devices: int, duration: float, as_json: bool, qos: str, scaling: bool, scaling_devices: str,
    processes: str,
) -> None:  # fmt: skip
    """Benchmark ingest, alarm and notification latency on private servers (see README)."""
    from gridwarden.bench import main as run_bench

    def integers(text: str, option: str) -> tuple[int, ...]:
        try:
            values = tuple(int(n) for n in text.split(",") if n.strip())
        except ValueError:
            raise click.BadParameter("integers separated by commas", param_hint=option) from None
        if any(value < 1 for value in values):
            raise click.BadParameter("each at least 1", param_hint=option)
        return values

    run_bench(devices, duration, as_json, int(qos), scaling=scaling,
              scaling_devices=integers(scaling_devices, "--scaling-devices"),
              processes=integers(processes, "--processes"))  # fmt: skip


def _mount_sim() -> None:
    from device_sim.cli import sim

    main.add_command(sim)


_mount_sim()
