"""Broker accounts: per-device credentials and ACLs for Mosquitto, from the registry.

Each account (table `mqtt_accounts`) is one MQTT user name with a kind that fixes what it
may do (see the migration 007_mqtt_accounts.sql):

    device    dev-0001             publishes only {prefix}/dev/dev-0001/# and
                                   {prefix}/codec/+/dev-0001
    gateway   gateway/{name}       publishes {prefix}/dev/# and {prefix}/codec/#
    worker    worker/{worker id}   reads only {prefix}/workers/{worker id}/#
    operator  operator/{name}      reads {prefix}/alarms/# and {prefix}/workers/#
    service   service/{name}       the platform itself (everything)

A device's user name is its id, which is what device firmware usually sends; the other
kinds carry a `/`, which no device id may contain, so the two never collide. Passwords are
random (144 bits, shown once when issued); only Mosquitto's own hash of them is stored and
written: `$7$` = PBKDF2-SHA512 with a 12-byte salt (mosquitto_passwd's format). Mosquitto's
default of 101 iterations is kept on purpose: the secrets are random, not chosen by people,
so slowing a guesser down buys nothing, while every device (re)connecting after a broker
restart pays the iterations on the broker's CPU.

The broker enforces the ACL on every PUBLISH: a device publishing under another device's
topic gets "not authorized" (MQTT v5 PUBACK 0x87) and the message never reaches ingest.

`sync_broker_files` renders Mosquitto's `password_file` and `acl_file` from the live
accounts plus the service's own account (the user and password of its MQTT URL), writes
them atomically when they changed and sends SIGHUP to the broker, which then reloads both.
The `broker-auth` task does that every `BROKER_AUTH_POLL_S`; the embedded broker's files are
managed so by default (see gridwarden.embedded).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

import asyncpg

from gridwarden import audit
from gridwarden.db import query
from gridwarden.mqtt_url import parse_mqtt_url
from gridwarden.supervisor import TaskFn

log = logging.getLogger(__name__)

Kind = Literal["device", "gateway", "worker", "operator", "service"]
KINDS: Final = ("device", "gateway", "worker", "operator", "service")
SUBJECT_KINDS: Final = ("device", "worker")  # named after a registered device or worker
PASSWORD_BYTES: Final = 18  # 144 bits, 24 URL-safe characters
HASH_ITERATIONS: Final = 101  # mosquitto_passwd's default (see the module docstring)
SALT_BYTES: Final = 12
PASSWORD_FILE: Final = "passwd"
ACL_FILE: Final = "acl"
BROKER_AUTH_POLL_S: Final = 2.0
USERNAME_CHARS: Final = frozenset(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.@/-"
)


class BrokerAuthError(Exception):
    """A request the account registry refuses; the message says why."""


@dataclass(frozen=True)
class BrokerAccount:
    username: str
    kind: Kind
    password_hash: str
    subject: str | None = None


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """Mosquitto's `$7$` hash (what `mosquitto_passwd` writes)."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, HASH_ITERATIONS)
    encoded = (base64.b64encode(part).decode() for part in (salt, digest))
    return f"$7${HASH_ITERATIONS}$" + "$".join(encoded)


def verify_password(password: str, hashed: str) -> bool:
    try:
        _, kind, iterations, salt, digest = hashed.split("$")
        if kind != "7":
            return False
        computed = hashlib.pbkdf2_hmac(
            "sha512", password.encode(), base64.b64decode(salt), int(iterations)
        )
    except ValueError:
        return False
    return hmac.compare_digest(computed, base64.b64decode(digest))


def new_password() -> str:
    return secrets.token_urlsafe(PASSWORD_BYTES)


def username_for(kind: Kind, name: str) -> str:
    """`dev-0001` for a device, `worker/W001`, `gateway/lora-1`, … for the others."""
    if kind not in KINDS:
        raise BrokerAuthError(f"unknown account kind {kind!r}; one of {', '.join(KINDS)}")
    username = name if kind == "device" else f"{kind}/{name}"
    if not name or len(username) > 128 or not set(username) <= USERNAME_CHARS:
        # ':' (allowed in device ids) would split Mosquitto's password file line.
        raise BrokerAuthError(
            f"{name!r} cannot be a broker user name: use 1-128 of A-Z a-z 0-9 _ . @ -"
        )
    if kind != "device" and "/" in name:
        raise BrokerAuthError(f"{name!r}: a {kind} account name may not contain '/'")
    return username


def acl_rules(account: BrokerAccount, prefix: str) -> list[str]:
    """Mosquitto `topic` lines for one account (deny is the default for anything else)."""
    subject = account.subject
    match account.kind:
        case "device":
            return [
                f"topic write {prefix}/dev/{subject}/#",
                f"topic write {prefix}/codec/+/{subject}",
            ]
        case "gateway":
            return [f"topic write {prefix}/dev/#", f"topic write {prefix}/codec/#"]
        case "worker":
            return [f"topic read {prefix}/workers/{subject}/#"]
        case "operator":
            return [f"topic read {prefix}/alarms/#", f"topic read {prefix}/workers/#"]
        case "service":
            return ["topic readwrite #"]
    raise BrokerAuthError(f"unknown account kind {account.kind!r}")


def render_files(accounts: Iterable[BrokerAccount], prefix: str) -> tuple[str, str]:
    """(password file, ACL file) for these accounts, in a stable order."""
    ordered = sorted({a.username: a for a in accounts}.values(), key=lambda a: a.username)
    header = "# Written by gridwarden from its broker accounts (mqtt_accounts): edits are lost.\n"
    passwd = header + "".join(f"{a.username}:{a.password_hash}\n" for a in ordered)
    blocks = [f"user {a.username}\n" + "".join(f"{r}\n" for r in acl_rules(a, prefix))
              for a in ordered]  # fmt: skip
    return passwd, header + "\n" + "\n".join(blocks)


def service_account(mqtt_url: str, password_file: Path | None = None) -> BrokerAccount | None:
    """The service's own account, from the user and password in its MQTT URL. The hash
    already in `password_file` is kept while it matches (a new salt would rewrite the
    file, and reload the broker, on every start)."""
    endpoint = parse_mqtt_url(mqtt_url)
    if endpoint.username is None or endpoint.password is None:
        return None
    hashed = _current_hash(password_file, endpoint.username) if password_file else None
    if hashed is None or not verify_password(endpoint.password, hashed):
        hashed = hash_password(endpoint.password)
    return BrokerAccount(endpoint.username, "service", hashed)


@dataclass
class BrokerFiles:
    """Where the broker reads its password and ACL files, and how to make it reload them."""

    directory: Path
    pid_file: Path | None = None
    owner: Callable[[Path], None] | None = None  # chown to the broker's account

    @property
    def password_file(self) -> Path:
        return self.directory / PASSWORD_FILE

    @property
    def acl_file(self) -> Path:
        return self.directory / ACL_FILE

    def write(self, accounts: Iterable[BrokerAccount], prefix: str) -> bool:
        """Write both files (atomically, mode 0600); True when either changed."""
        passwd, acl = render_files(accounts, prefix)
        changed = False
        for path, text in ((self.password_file, passwd), (self.acl_file, acl)):
            with contextlib.suppress(OSError):
                if path.read_text(encoding="utf-8") == text:
                    continue
            tmp = path.with_name(f".{path.name}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write(text)
            if self.owner is not None:
                self.owner(tmp)
            elif os.geteuid() == 0 and path.exists():  # keep the broker's account as owner
                st = path.stat()
                os.chown(tmp, st.st_uid, st.st_gid)
            tmp.replace(path)
            changed = True
        return changed

    def reload(self) -> bool:
        """SIGHUP the broker (Mosquitto re-reads password and ACL files); False: not running."""
        if self.pid_file is None:
            return False
        try:
            pid = int(self.pid_file.read_text().strip())
            os.kill(pid, signal.SIGHUP)
        except (OSError, ValueError) as exc:
            log.warning("broker auth: cannot signal the broker (%s): %s", self.pid_file, exc)
            return False
        return True


# -- the registry ---------------------------------------------------------------------------


async def issue(
    conn: asyncpg.Connection, kind: Kind, name: str, *, actor: str = audit.CLI_ACTOR
) -> tuple[str, str]:
    """Create the account (or rotate its password), audited; returns (user name, new
    password)."""
    username = username_for(kind, name)
    subject = name if kind in SUBJECT_KINDS else None
    if kind == "device" and await conn.fetchval(query("device_exists"), name) is None:
        raise BrokerAuthError(f"no registered device {name!r}")
    if kind == "worker" and await conn.fetchval(query("worker_exists"), name) is None:
        raise BrokerAuthError(f"no registered worker {name!r}")
    password = new_password()
    async with conn.transaction():
        stored = await conn.fetchval(
            query("upsert_mqtt_account"), username, kind, subject, hash_password(password)
        )
        if stored is None:
            raise BrokerAuthError(f"the user name {username!r} belongs to another kind of account")
        await audit.record(
            conn, actor=actor, action="mqtt_account.issue", target_type="mqtt_account",
            target_id=username, detail={"kind": kind},
        )  # fmt: skip
    return username, password


async def issue_for_devices(
    conn: asyncpg.Connection, device_ids: Iterable[str] | None = None
) -> list[tuple[str, str]]:
    """Accounts for these devices (None: every registered device that has none yet)."""
    ids = list(device_ids) if device_ids is not None else [
        row["id"] for row in await conn.fetch(query("devices_without_mqtt_account"))
    ]  # fmt: skip
    issued = []
    async with conn.transaction():
        for device_id in ids:
            issued.append(await issue(conn, "device", device_id))
    return issued


async def revoke(conn: asyncpg.Connection, username: str, *, actor: str = audit.CLI_ACTOR) -> bool:
    """Revoke a live account, audited; False when there is none of that name."""
    async with conn.transaction():
        if await conn.fetchval(query("revoke_mqtt_account"), username) is None:
            return False
        await audit.record(conn, actor=actor, action="mqtt_account.revoke",
                           target_type="mqtt_account", target_id=username)  # fmt: skip
    return True


async def live_accounts(conn: asyncpg.Connection | asyncpg.Pool) -> list[BrokerAccount]:
    return [
        BrokerAccount(row["username"], row["kind"], row["password_hash"], row["subject"])
        for row in await conn.fetch(query("live_mqtt_accounts"))
    ]


async def sync_broker_files(
    conn: asyncpg.Connection | asyncpg.Pool, files: BrokerFiles, prefix: str, mqtt_url: str
) -> bool:
    """Render the files from the live accounts (+ the service's own); reload on change."""
    accounts = await live_accounts(conn)
    own = service_account(mqtt_url, files.password_file)
    if own is not None:
        accounts.append(own)
    if not files.write(accounts, prefix):
        return False
    log.info("broker auth: %d accounts written to %s", len(accounts), files.directory)
    files.reload()
    return True


def _current_hash(path: Path, username: str) -> str | None:
    with contextlib.suppress(OSError):
        for line in path.read_text(encoding="utf-8").splitlines():
            user, sep, hashed = line.partition(":")
            if sep and user == username:
                return hashed
    return None


def broker_auth_task(pool: asyncpg.Pool, files: BrokerFiles, prefix: str, mqtt_url: str) -> TaskFn:
    """Keep the broker's files in step with the accounts (polling a cheap version stamp)."""

    async def run(stop: asyncio.Event) -> None:
        seen: object = None
        while not stop.is_set():
            try:
                version = tuple(await pool.fetchrow(query("mqtt_accounts_version")) or ())
                if version != seen:
                    await sync_broker_files(pool, files, prefix, mqtt_url)
                    seen = version
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("broker auth: cannot read the accounts: %s", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(BROKER_AUTH_POLL_S):
                    await stop.wait()

    return run
