"""Embedded default services: a private PostgreSQL cluster and a private Mosquitto broker.

`gridwarden up` with no database / broker URL configured starts its own instances from the
machine's binaries (Debian packages ``postgresql`` and ``mosquitto``), with their data under
the data dir so the next start finds the same data again:

    DATA_DIR/postgres/        the cluster's home, owned by the service account, mode 0700
        data/                 PGDATA (initdb)
        port                  the TCP port chosen on the first start, reused while free
        postgres.log          server log (pg_ctl -l)
        .s.PGSQL.PORT         the unix socket (not /var/run/postgresql)
    DATA_DIR/mosquitto/
        mosquitto.conf        generated on every start
        mosquitto.db          persistence: sessions, subscriptions, queued QoS 1/2 messages
        autosave.lock         held by the process pacing its saves (gridwarden.broker_autosave)
        mosquitto.log, port, pid

Both listen on 127.0.0.1 only, on a free port chosen once and recorded (never the machine's
shared 5432 / 1883). PostgreSQL refuses to run as root, so when gridwarden runs as root both
servers run as an unprivileged account (`postgres` if it exists, else `nobody`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from glob import glob
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import psycopg

from gridwarden.broker_auth import (
    ACL_FILE,
    PASSWORD_FILE,
    BrokerFiles,
    new_password,
)
from gridwarden.broker_auth import service_account as broker_service_account
from gridwarden.broker_autosave import LOCK_FILE, AutosavePacer, read_pid

if TYPE_CHECKING:
    from gridwarden.config import Settings

log = logging.getLogger(__name__)

SETUP_HINT = (
    "run the README's setup first (Debian/Ubuntu: apt-get install postgresql mosquitto), "
    "or configure GRIDWARDEN_DATABASE_URL / GRIDWARDEN_MQTT_URL"
)
LOOPBACK = "127.0.0.1"
# The machine's shared instances and our own HTTP default: never picked for a private server.
RESERVED_PORTS = frozenset({1883, 5432, 8080, 8883})
UNPRIVILEGED_ACCOUNTS = ("postgres", "nobody")
CREATED_DIR_MODE = 0o711  # dirs we create on the way to the data dir: traversable, not listable

POSTGRES_BIN_GLOB = "/usr/lib/postgresql/*/bin"
POSTGRES_SUPERUSER = "gridwarden"
POSTGRES_DATABASE = "gridwarden"
POSTGRES_START_TIMEOUT_S = 60
POSTGRES_STOP_TIMEOUT_S = 60
POSTGRES_INITDB_TIMEOUT_S = 120
POSTGRES_MAX_CONNECTIONS = 200
POSTGRES_SHARED_BUFFERS = "128MB"
UNIX_SOCKET_PATH_MAX = 107  # sun_path is 108 bytes including the terminating NUL

MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto",)
SERVICE_USERNAME = "service/gridwarden"  # the embedded broker's account for the service
MOSQUITTO_START_TIMEOUT_S = 15.0
MOSQUITTO_STOP_TIMEOUT_S = 30.0
# The broker's own save timer: only for while no AutosavePacer runs (gridwarden.broker_autosave).
MOSQUITTO_AUTOSAVE_BACKSTOP_S = 300
MOSQUITTO_MAX_QUEUED_MESSAGES = 1_000_000
MOSQUITTO_MAX_INFLIGHT_MESSAGES = 1000
# Whole packet (header + topic + payload). Bigger than the largest payload the service accepts
# (config caps max_payload_bytes at 1 MiB), so an oversized payload reaches the service and is
# dead-lettered with a reason instead of the broker silently cutting the sender off.
MOSQUITTO_MAX_PACKET_BYTES = 2 * 1024 * 1024
MOSQUITTO_PERSISTENT_CLIENT_EXPIRATION = "30d"
PERSISTENCE_FILE = "mosquitto.db"

PORT_ATTEMPTS = 3
POLL_INTERVAL_S = 0.05


class EmbeddedServiceError(RuntimeError):
    """An embedded server could not be found, prepared, started or stopped."""


# --------------------------------------------------------------------------- account


@dataclass(frozen=True)
class ServiceAccount:
    """The account the private servers run as; `switch` is True when we are root."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    switch: bool

    def popen_kwargs(self) -> dict[str, Any]:
        """Extra `subprocess` arguments that run a child as this account."""
        if not self.switch:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}

    def own(self, path: Path) -> None:
        if self.switch:
            os.chown(path, self.uid, self.gid)

    def can_traverse(self, path: Path) -> bool:
        if not self.switch:
            return os.access(path, os.X_OK)
        st = path.stat()
        if st.st_uid == self.uid:
            return bool(st.st_mode & stat.S_IXUSR)
        if st.st_gid == self.gid or st.st_gid in self.groups:
            return bool(st.st_mode & stat.S_IXGRP)
        return bool(st.st_mode & stat.S_IXOTH)


def service_account() -> ServiceAccount:
    """Ourselves, or when root the first existing unprivileged account."""
    if os.geteuid() != 0:
        entry = pwd.getpwuid(os.geteuid())
        return ServiceAccount(entry.pw_name, entry.pw_uid, entry.pw_gid, (), switch=False)
    for name in UNPRIVILEGED_ACCOUNTS:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        groups = tuple(os.getgrouplist(name, entry.pw_gid))
        return ServiceAccount(name, entry.pw_uid, entry.pw_gid, groups, switch=True)
    raise EmbeddedServiceError(
        "running as root, but none of the accounts "
        f"{', '.join(UNPRIVILEGED_ACCOUNTS)} exists to run the embedded servers; "
        "create one or run gridwarden as an ordinary user"
    )


def prepare_home(data_dir: Path, home: Path, account: ServiceAccount, what: str) -> None:
    """Create `home` (owned by the account, 0700) and check the account can reach it."""
    data_dir = Path(os.path.abspath(data_dir))
    missing = [p for p in (data_dir, *data_dir.parents) if not p.exists()]
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        if account.switch:
            directory.chmod(CREATED_DIR_MODE)
    for directory in reversed((data_dir, *data_dir.parents)):
        if not account.can_traverse(directory):
            raise EmbeddedServiceError(
                f"{what} runs as the account {account.name!r} (root may not run it), "
                f"but {account.name!r} cannot traverse {directory} "
                f"(mode {stat.filemode(directory.stat().st_mode)}): "
                f"chmod o+x {directory}, or set GRIDWARDEN_DATA_DIR to a directory it can reach"
            )
    home.mkdir(exist_ok=True)
    account.own(home)
    home.chmod(0o700)


def _clean_env(home: Path) -> dict[str, str]:
    """A minimal environment: no inherited PG* / locale variables steering the servers."""
    return {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "HOME": str(home), "LANG": "C", "TZ": "UTC"}


def _write_file(path: Path, text: str, account: ServiceAccount, mode: int = 0o600) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(mode)
    account.own(tmp)
    tmp.replace(path)


# --------------------------------------------------------------------------- ports and pids


def port_is_free(port: int) -> bool:
    """Whether 127.0.0.1:port can be bound (SO_REUSEADDR, like the servers: TIME_WAIT is free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port(exclude: Sequence[int] = ()) -> int:
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK, 0))
            port: int = sock.getsockname()[1]
        if port not in RESERVED_PORTS and port not in exclude:
            return port
    raise EmbeddedServiceError("no free TCP port on 127.0.0.1")


def _recorded_port(port_file: Path) -> int | None:
    try:
        port = int(port_file.read_text(encoding="utf-8").strip())
    except (OSError, ValueError):
        return None
    return port if 0 < port < 65536 and port not in RESERVED_PORTS else None


def _choose_port(port_file: Path, account: ServiceAccount, exclude: Sequence[int] = ()) -> int:
    """The recorded port while it is free, else a new free one (recorded for next time)."""
    recorded = _recorded_port(port_file)
    if recorded is not None and recorded not in exclude and port_is_free(recorded):
        port = recorded
    else:
        port = free_port(exclude)
    _write_file(port_file, f"{port}\n", account, mode=0o644)
    return port


def pid_exists(pid: int) -> bool:
    """Any process with this pid, zombies included (what postgres's own lock check sees)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pid_running(pid: int) -> bool:
    """Alive and not a zombie (a container's PID 1 may never reap an orphan we killed)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return True
    return fields[0] not in ("Z", "X")


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_running(pid):
            return True
        time.sleep(POLL_INTERVAL_S)
    return not pid_running(pid)


def wait_for_port(port: int, timeout_s: float, alive: Callable[[], bool] | None = None) -> bool:
    """Poll until 127.0.0.1:port accepts; `alive()` returning False gives up early."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            return False
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            if sock.connect_ex((LOOPBACK, port)) == 0:
                return True
        time.sleep(POLL_INTERVAL_S)
    return False


def _log_since(path: Path, offset: int, limit: int = 4000) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return text[-limit:].strip()


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# --------------------------------------------------------------------------- PostgreSQL


def _version_key(bindir: str) -> tuple[int, ...]:
    version = Path(bindir).parent.name
    return tuple(int(part) for part in re.findall(r"\d+", version)) or (0,)


def _has_server_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres"))


def find_postgres_bindir(pattern: str | None = None, version: str | None = None) -> Path:
    """The newest /usr/lib/postgresql/*/bin with initdb and pg_ctl (or the cluster's version)."""
    pattern = pattern or POSTGRES_BIN_GLOB
    candidates = sorted(
        (Path(d) for d in glob(pattern) if _has_server_binaries(Path(d))),
        key=lambda d: _version_key(str(d)),
        reverse=True,
    )
    if version is not None:
        matching = [d for d in candidates if d.parent.name == version]
        if matching:
            return matching[0]
        if candidates:
            raise EmbeddedServiceError(
                f"the embedded cluster was made by PostgreSQL {version}, but only "
                f"{', '.join(d.parent.name for d in candidates)} is installed: install "
                f"postgresql-{version}, or pg_upgrade the cluster"
            )
    if candidates:
        return candidates[0]
    on_path = shutil.which("pg_ctl")  # e.g. /usr/local/bin/pg_ctl, a link into a bin dir
    if on_path is not None:
        bindir = Path(os.path.realpath(on_path)).parent
        if _has_server_binaries(bindir):
            return bindir
    raise EmbeddedServiceError(
        f"PostgreSQL server binaries (initdb, pg_ctl) not found in {pattern} or on PATH: "
        + SETUP_HINT
    )


class EmbeddedPostgres:
    """A private PostgreSQL cluster under ``data_dir/postgres``, on 127.0.0.1 only."""

    def __init__(self, data_dir: Path, *, account: ServiceAccount | None = None) -> None:
        self.data_dir = Path(os.path.abspath(data_dir))
        self.home = self.data_dir / "postgres"
        self.pgdata = self.home / "data"
        self.log_file = self.home / "postgres.log"
        self.port_file = self.home / "port"
        self.conf_file = self.pgdata / "gridwarden.conf"
        self._account = account
        self.port: int | None = None

    @property
    def account(self) -> ServiceAccount:
        if self._account is None:
            self._account = service_account()
        return self._account

    @property
    def dsn(self) -> str:
        return self.dsn_for(POSTGRES_DATABASE)

    def dsn_for(self, database: str) -> str:
        if self.port is None:
            raise EmbeddedServiceError("the embedded PostgreSQL has not been started")
        return f"postgresql://{POSTGRES_SUPERUSER}@{LOOPBACK}:{self.port}/{database}"

    # -- state

    def running_pid(self) -> int | None:
        """The postmaster's pid when our cluster is up (postmaster.pid alone proves nothing)."""
        pid = read_pid(self.pgdata / "postmaster.pid")
        if pid is None or not pid_running(pid):
            return None
        if not Path("/proc/self/cwd").exists():
            return pid
        try:
            cwd = os.readlink(f"/proc/{pid}/cwd")  # the postmaster chdirs into PGDATA
        except OSError:
            return None  # not ours to inspect, so not ours
        return pid if os.path.realpath(cwd) == os.path.realpath(self.pgdata) else None

    def _initialized(self) -> bool:
        return (self.pgdata / "PG_VERSION").is_file()

    def _bindir(self) -> Path:
        version = None
        if self._initialized():
            version = (self.pgdata / "PG_VERSION").read_text(encoding="utf-8").strip()
        return find_postgres_bindir(version=version)

    def _run(self, argv: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                argv,
                cwd=self.home,
                env=_clean_env(self.home),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
                umask=0o077,
                **self.account.popen_kwargs(),
            )
        except subprocess.TimeoutExpired as exc:
            raise EmbeddedServiceError(f"{' '.join(argv)} did not finish in {timeout_s}s") from exc

    # -- lifecycle

    def start(self) -> str:
        """Start (or reuse the running) cluster; returns the DSN of database `gridwarden`."""
        bindir = self._bindir()
        prepare_home(self.data_dir, self.home, self.account, "the embedded PostgreSQL")
        pid = self.running_pid()
        if pid is not None:
            self.port = self._running_port()
            log.info("reusing the running embedded PostgreSQL (pid %s) on port %s", pid, self.port)
            _write_file(self.port_file, f"{self.port}\n", self.account, mode=0o644)
        else:
            if not self._initialized():
                self._initdb(bindir)
            self._clear_stale_lock()
            self._start_server(bindir)
        self._ensure_database(POSTGRES_DATABASE)
        return self.dsn

    def stop(self) -> None:
        """`pg_ctl stop -m fast`; nothing to do when our cluster is not running."""
        if self.running_pid() is None:
            return
        bindir = self._bindir()
        result = self._run(
            [
                str(bindir / "pg_ctl"),
                "stop",
                "-D",
                str(self.pgdata),
                "-m",
                "fast",
                "-w",
                "-t",
                str(POSTGRES_STOP_TIMEOUT_S),
                "-s",
            ],
            POSTGRES_STOP_TIMEOUT_S + 10,
        )
        if result.returncode != 0 and self.running_pid() is not None:
            raise EmbeddedServiceError(
                f"pg_ctl stop failed: {(result.stdout + result.stderr).strip()}"
            )

    def kill(self) -> None:
        """SIGKILL the postmaster (fault tests): leaves a stale postmaster.pid behind."""
        pid = self.running_pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL)
        if not _wait_gone(pid, 10):
            raise EmbeddedServiceError(f"postmaster {pid} survived SIGKILL")

    # -- internals

    def _running_port(self) -> int:
        lines = (self.pgdata / "postmaster.pid").read_text(encoding="utf-8").splitlines()
        try:
            return int(lines[3])  # line 4 of postmaster.pid is the port
        except (IndexError, ValueError) as exc:
            raise EmbeddedServiceError(f"unreadable {self.pgdata / 'postmaster.pid'}") from exc

    def _initdb(self, bindir: Path) -> None:
        log.info("creating the embedded PostgreSQL cluster in %s", self.pgdata)
        result = self._run(
            [
                str(bindir / "initdb"),
                "-D",
                str(self.pgdata),
                "--username",
                POSTGRES_SUPERUSER,
                # Trust, because this cluster only listens on 127.0.0.1 and on a unix socket in
                # a 0700 directory; it is the zero-configuration default for one machine. A
                # shared or production database is configured with GRIDWARDEN_DATABASE_URL.
                "--auth-local=trust",
                "--auth-host=trust",
                "--encoding=UTF8",
                "--locale=C",
            ],
            POSTGRES_INITDB_TIMEOUT_S,
        )
        if result.returncode != 0:
            raise EmbeddedServiceError(
                f"initdb failed in {self.pgdata}: {(result.stdout + result.stderr).strip()}"
            )
        with (self.pgdata / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write(
                f"\n# gridwarden: settings rewritten on every start\n"
                f"include_if_exists = '{self.conf_file.name}'\n"
            )

    def _clear_stale_lock(self) -> None:
        """A lock file naming a live process that is not our postmaster is stale.

        After a kill -9 (or a reboot) the pid in the lock file may belong to another process;
        postgres itself would then refuse to start ("lock file already exists") if that process
        runs as the same account, e.g. the machine's own cluster, and also while the killed
        postmaster is a zombie nobody has reaped yet. A lock file whose pid is gone is left for
        postgres, which removes it itself. Backends of the dead postmaster that are still
        attached to its shared memory still stop postgres from starting ("shared memory block
        ... still in use"); `_start_server` waits for them to exit.
        """
        if self.running_pid() is not None:
            return
        # The unix socket's lock file holds the same pid and is checked the same way.
        for lock in [self.pgdata / "postmaster.pid", *self.home.glob(".s.PGSQL.*.lock")]:
            pid = read_pid(lock)
            if pid is not None and pid_exists(pid):
                log.warning("removing stale %s (pid %s is not our postmaster)", lock, pid)
                lock.unlink(missing_ok=True)

    def _write_conf(self, port: int) -> None:
        socket_path = self.home / f".s.PGSQL.{port}"
        # No unix socket when its path would be too long; we connect over TCP anyway.
        socket_dir = str(self.home) if len(str(socket_path)) <= UNIX_SOCKET_PATH_MAX else ""
        text = (
            "# Written by gridwarden on every start of the embedded cluster: edits are lost.\n"
            f"listen_addresses = '{LOOPBACK}'\n"
            f"port = {port}\n"
            f"unix_socket_directories = '{_conf_quote(socket_dir)}'\n"
            "unix_socket_permissions = 0700\n"
            f"max_connections = {POSTGRES_MAX_CONNECTIONS}\n"
            f"shared_buffers = '{POSTGRES_SHARED_BUFFERS}'\n"
            "fsync = on\n"
            "synchronous_commit = on\n"
            "full_page_writes = on\n"
            "timezone = 'UTC'\n"
            "log_timezone = 'UTC'\n"
            "logging_collector = off\n"
        )
        _write_file(self.conf_file, text, self.account)

    def _start_server(self, bindir: Path) -> None:
        tried: list[int] = []
        deadline = time.monotonic() + POSTGRES_START_TIMEOUT_S
        while True:
            port = _choose_port(self.port_file, self.account, exclude=tried)
            self._write_conf(port)
            offset = _log_size(self.log_file)
            result = self._run(
                [
                    str(bindir / "pg_ctl"),
                    "start",
                    "-D",
                    str(self.pgdata),
                    "-l",
                    str(self.log_file),
                    "-w",
                    "-t",
                    str(POSTGRES_START_TIMEOUT_S),
                    "-s",
                ],
                POSTGRES_START_TIMEOUT_S + 10,
            )
            if result.returncode == 0:
                self.port = port
                log.info("embedded PostgreSQL listening on %s:%s", LOOPBACK, port)
                return
            server_log = _log_since(self.log_file, offset)
            if "could not bind" in server_log or "could not create any TCP/IP" in server_log:
                tried.append(port)  # someone took the port between our check and the bind
                if len(tried) < PORT_ATTEMPTS:
                    continue
            elif "shared memory block" in server_log and time.monotonic() < deadline:
                # backends of a killed postmaster still attached: they exit on their own
                time.sleep(0.5)
                self._clear_stale_lock()
                continue
            raise EmbeddedServiceError(
                f"the embedded PostgreSQL did not start (pg_ctl: "
                f"{(result.stdout + result.stderr).strip()}); {self.log_file}:\n{server_log}"
            )

    def _ensure_database(self, name: str) -> None:
        deadline = time.monotonic() + POSTGRES_START_TIMEOUT_S
        while True:
            try:
                with psycopg.connect(
                    self.dsn_for("postgres"), autocommit=True, connect_timeout=5
                ) as conn:
                    exists = conn.execute(
                        "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
                    ).fetchone()
                    if exists is None:
                        conn.execute(f'CREATE DATABASE "{name}"')  # a constant, not input
                    return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:  # e.g. still starting up: retry until then
                    raise EmbeddedServiceError(
                        f"cannot connect to the embedded PostgreSQL: {exc}"
                    ) from exc
                time.sleep(0.2)


def _alive(process: subprocess.Popen[bytes]) -> Callable[[], bool]:
    return lambda: process.poll() is None


def _conf_quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "''")


# --------------------------------------------------------------------------- Mosquitto


def find_mosquitto(candidates: Sequence[str] | None = None) -> Path:
    for candidate in MOSQUITTO_CANDIDATES if candidates is None else candidates:
        if os.access(candidate, os.X_OK):
            return Path(candidate)
    on_path = shutil.which("mosquitto")
    if on_path is not None:
        return Path(on_path)
    raise EmbeddedServiceError("the mosquitto broker binary was not found: " + SETUP_HINT)


class EmbeddedMosquitto:
    """A private Mosquitto broker under ``data_dir/mosquitto``, on 127.0.0.1 only.

    With authentication on (the default), anonymous clients are refused: the broker reads
    ``passwd`` and ``acl`` in its home, rendered from the broker accounts by the service
    (gridwarden.broker_auth), and the service itself connects as ``service/gridwarden``
    with the random password kept in ``service.secret``. ``anonymous=True`` is for tests
    and the benchmark only.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        account: ServiceAccount | None = None,
        anonymous: bool = False,
        tls_files: tuple[Path, Path] | None = None,
    ) -> None:
        self.data_dir = Path(os.path.abspath(data_dir))
        self.home = self.data_dir / "mosquitto"
        self.config_file = self.home / "mosquitto.conf"
        self.log_file = self.home / "mosquitto.log"
        self.port_file = self.home / "port"
        self.pid_file = self.home / "pid"
        self.secret_file = self.home / "service.secret"
        self.anonymous = anonymous
        # (certificate chain, private key), PEM: a second listener speaking TLS (mqtts://).
        self.tls_files = tls_files
        self.tls_port: int | None = None
        self._account = account
        self._process: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.autosave = AutosavePacer(
            self.home / PERSISTENCE_FILE, self.pid_file.parent / LOCK_FILE, self.running_pid
        )

    @property
    def account(self) -> ServiceAccount:
        if self._account is None:
            self._account = service_account()
        return self._account

    @property
    def url(self) -> str:
        """The service's URL: with its credentials when authentication is on."""
        if self.port is None:
            raise EmbeddedServiceError("the embedded Mosquitto has not been started")
        if self.anonymous:
            return f"mqtt://{LOOPBACK}:{self.port}"
        user = quote(SERVICE_USERNAME, safe="")
        return f"mqtt://{user}:{quote(self._service_password(), safe='')}@{LOOPBACK}:{self.port}"

    @property
    def anonymous_url(self) -> str:
        """The broker's address without credentials (what devices are configured with)."""
        if self.port is None:
            raise EmbeddedServiceError("the embedded Mosquitto has not been started")
        return f"mqtt://{LOOPBACK}:{self.port}"

    def tls_url(self, ca_file: Path) -> str:
        """The service's URL on the TLS listener, trusting `ca_file`."""
        if self.tls_port is None:
            raise EmbeddedServiceError("the embedded Mosquitto has no TLS listener")
        plain = self.url.rpartition(":")[0].replace("mqtt://", "mqtts://", 1)
        return f"{plain}:{self.tls_port}?ca={quote(str(ca_file))}"

    def broker_files(self) -> BrokerFiles:
        """Where the service keeps this broker's password and ACL files."""
        return BrokerFiles(self.home, pid_file=self.pid_file, owner=self.account.own)

    def _service_password(self) -> str:
        """The service account's password: made once, kept in the data dir (mode 0600)."""
        try:
            return self.secret_file.read_text().strip()
        except FileNotFoundError:
            password = new_password()
            fd = os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(password + "\n")
            return password

    def _prepare_auth(self) -> None:
        """Before the broker starts: files that let the service in. Accounts written by an
        earlier run stay (the service rewrites both files once it reads the registry)."""
        files = self.broker_files()
        own = broker_service_account(self.url, files.password_file)
        assert own is not None
        current = files.password_file.read_text() if files.password_file.exists() else ""
        if f"\n{own.username}:{own.password_hash}\n" not in current or not files.acl_file.exists():
            files.write([own], prefix="gw")  # the service account's rules use no prefix

    def running_pid(self) -> int | None:
        """The pid of our broker (started by us, or left over by an earlier run)."""
        pid = read_pid(self.pid_file)
        if pid is None or not pid_running(pid):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return pid if self._process is not None and self._process.pid == pid else None
        return pid if os.fsencode(self.config_file) in cmdline else None

    def start(self) -> str:
        """Start (or reuse the running) broker; returns ``mqtt://127.0.0.1:PORT``."""
        binary = find_mosquitto()
        prepare_home(self.data_dir, self.home, self.account, "the embedded Mosquitto")
        pid = self.running_pid()
        recorded = _recorded_port(self.port_file)
        if (
            pid is not None
            and recorded is not None
            and wait_for_port(recorded, MOSQUITTO_START_TIMEOUT_S, lambda: pid_running(pid))
        ):
            self.port = recorded
            log.info("reusing the running embedded Mosquitto (pid %s) on %s", pid, recorded)
            self.autosave.start()
            return self.url
        if pid is not None:
            self._terminate(pid)
        tried: list[int] = []
        while True:
            port = _choose_port(self.port_file, self.account, exclude=tried)
            self.port = port
            if not self.anonymous:
                self._prepare_auth()
            if self.tls_files is not None:
                self.tls_port = free_port(exclude=[port, *tried])
            self._write_config(port)
            offset = _log_size(self.log_file)
            process = self._spawn(binary)
            if wait_for_port(port, MOSQUITTO_START_TIMEOUT_S, _alive(process)):
                self._process = process
                self.port = port
                _write_file(self.pid_file, f"{process.pid}\n", self.account, mode=0o644)
                log.info("embedded Mosquitto listening on %s:%s", LOOPBACK, port)
                self.autosave.start()
                return self.url
            if process.poll() is None:
                process.kill()
            process.wait()
            broker_log = _log_since(self.log_file, offset)
            if "Address already in use" in broker_log and len(tried) < PORT_ATTEMPTS - 1:
                tried.append(port)
                continue
            raise EmbeddedServiceError(
                f"the embedded Mosquitto did not start (exit {process.returncode}); "
                f"{self.log_file}:\n{broker_log}"
            )

    def stop(self) -> None:
        """SIGTERM (mosquitto writes its persistence file on the way out) and wait."""
        self.autosave.stop()
        pid = self.running_pid()
        if pid is not None:
            self._terminate(pid)
        self._reap()
        self.pid_file.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL (fault tests): what was not autosaved yet is lost."""
        self.autosave.stop()
        pid = self.running_pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            self._reap()
            _wait_gone(pid, MOSQUITTO_STOP_TIMEOUT_S)
        self.pid_file.unlink(missing_ok=True)

    def restart(self) -> str:
        """Stop and start again: same port (when free), same persistence."""
        self.stop()
        return self.start()

    # -- internals

    def _spawn(self, binary: Path) -> subprocess.Popen[bytes]:
        self.log_file.touch()
        self.account.own(self.log_file)
        with self.log_file.open("ab") as early_errors:  # config errors go to stderr
            return subprocess.Popen(
                [str(binary), "-c", str(self.config_file)],
                cwd=self.home,
                env=_clean_env(self.home),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=early_errors,
                # Its own session: a Ctrl-C meant for `gridwarden up` must not take the broker
                # down while the service is still draining; stop() ends it.
                start_new_session=True,
                umask=0o077,
                **self.account.popen_kwargs(),
            )

    def _terminate(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if self._process is not None and self._process.pid == pid:
            try:
                self._process.wait(MOSQUITTO_STOP_TIMEOUT_S)
                return
            except subprocess.TimeoutExpired:
                pass
        elif _wait_gone(pid, MOSQUITTO_STOP_TIMEOUT_S):
            return
        log.warning("embedded Mosquitto (pid %s) ignored SIGTERM; killing it", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self._reap()
        _wait_gone(pid, MOSQUITTO_STOP_TIMEOUT_S)

    def _reap(self) -> None:
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(MOSQUITTO_STOP_TIMEOUT_S)
            self._process = None

    def _tls_listener(self) -> str:
        """A second listener with TLS; the broker's account gets its own copies of the
        certificate and key (it reads them after dropping root)."""
        if self.tls_files is None or self.tls_port is None:
            return ""
        copies = []
        for source, name in zip(self.tls_files, ("tls-cert.pem", "tls-key.pem"), strict=True):
            target = self.home / name
            _write_file(target, Path(source).read_text(encoding="ascii"), self.account)
            copies.append(target)
        return f"\nlistener {self.tls_port} {LOOPBACK}\ncertfile {copies[0]}\nkeyfile {copies[1]}\n"

    def _write_config(self, port: int) -> None:
        home = str(self.home)
        if self.anonymous:
            auth = (
                "# Tests and the benchmark only: anyone here may connect.\nallow_anonymous true\n"
            )
        else:
            auth = (
                "# Every client logs in; each may publish and read only its own topics. Both\n"
                "# files are rendered from the broker accounts (gridwarden.broker_auth);\n"
                "# SIGHUP reloads them.\n"
                f"allow_anonymous false\npassword_file {home}/{PASSWORD_FILE}\n"
                f"acl_file {home}/{ACL_FILE}\n"
            )
        text = f"""\
# Written by gridwarden on every start of the embedded broker: edits are lost.
# Without `-d`; stopped with SIGTERM, on which it saves its persistence file.

# Only the ignored-when-not-root default: the broker is started as this account already.
user {self.account.name}

listener {port} {LOOPBACK}
{auth}set_tcp_nodelay true
{self._tls_listener()}
# Persistent sessions, subscriptions and queued QoS 1/2 messages survive a restart: written on
# SIGTERM, and whenever gridwarden asks (SIGUSR1: every second while that is cheap, spaced out
# while the file is large; gridwarden/broker_autosave.py). This timer is only a backstop.
persistence true
persistence_location {home}/
persistence_file {PERSISTENCE_FILE}
autosave_interval {MOSQUITTO_AUTOSAVE_BACKSTOP_S}
autosave_on_changes false
persistent_client_expiration {MOSQUITTO_PERSISTENT_CLIENT_EXPIRATION}

# The ingest acknowledges a message only after its batch is committed, so the default window
# of 20 unacknowledged messages per client would throttle batching. This is the window for
# MQTT 3.1.1 clients and for v5 clients sending no Receive Maximum; a v5 client's Receive
# Maximum (CONNECT property) replaces it, above or below (mosquitto 2.0.11, measured).
max_inflight_messages {MOSQUITTO_MAX_INFLIGHT_MESSAGES}
max_queued_messages {MOSQUITTO_MAX_QUEUED_MESSAGES}
max_packet_size {MOSQUITTO_MAX_PACKET_BYTES}

log_dest file {home}/mosquitto.log
log_type error
log_type warning
log_type notice
log_type information
connection_messages true
log_timestamp_format %Y-%m-%dT%H:%M:%S
"""
        _write_file(self.config_file, text, self.account)


# --------------------------------------------------------------------------- for `gridwarden up`


def with_embedded_broker_files(settings: Settings) -> Settings:
    """The settings with the embedded broker's password/ACL files managed by the service."""
    broker = EmbeddedMosquitto(settings.data_dir)
    return settings.model_copy(
        update={"broker_auth_dir": broker.home, "broker_pid_file": broker.pid_file}
    )


@contextmanager
def embedded_services(settings: Settings) -> Iterator[tuple[str, str]]:
    """Start what is not configured; yields ``(database_url, mqtt_url)``; stops them on exit."""
    with ExitStack() as stack:
        database_url = settings.database_url
        # A service already running (another `gridwarden` command on the same data
        # dir, e.g. `migrate` while `up` runs) is reused and left running.
        if database_url is None:
            postgres = EmbeddedPostgres(settings.data_dir)
            if postgres.running_pid() is None:
                stack.callback(postgres.stop)
            database_url = postgres.start()
        mqtt_url = settings.mqtt_url
        if mqtt_url is None:
            mosquitto = EmbeddedMosquitto(settings.data_dir)
            if mosquitto.running_pid() is None:
                stack.callback(mosquitto.stop)
            mqtt_url = mosquitto.start()
        yield database_url, mqtt_url
