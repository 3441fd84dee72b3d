"""Configuration: validated once at start into a frozen, typed object.

Sources, later ones winning: defaults < TOML file (``--config``) < environment
(``GRIDWARDEN_*``) < command-line flags. Every duration carries its unit in its name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_HTTP_PORT = 8080
DEFAULT_MAX_PAYLOAD_BYTES = 16 * 1024
DEFAULT_BATCH_MAX_MESSAGES = 2000
DEFAULT_BATCH_MAX_DELAY_MS = 50
DEFAULT_DEDUP_WINDOW_S = 24 * 3600
DEFAULT_LAST_SEEN_FLUSH_S = 5.0
DEFAULT_INGEST_QUEUE_MAX = 20_000
DEFAULT_DEVICE_RATE_PER_S = 5.0
DEFAULT_DEVICE_RATE_BURST = 60
DEFAULT_HTTP_MAX_BODY_BYTES = 64 * 1024


def default_data_dir() -> Path:
    """Root cannot hand a directory under /root to the unprivileged database account."""
    if os.geteuid() == 0:
        return Path("/var/lib/gridwarden")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "gridwarden"


class ConfigError(Exception):
    """Bad configuration; the message names the key and the bad value (exit code 2)."""


# The parts of the service one process can run (`GRIDWARDEN_ROLES`); they talk only
# through PostgreSQL (case intake, outbox, LISTEN/NOTIFY), so they may run apart.
ROLES = ("ingest", "alerting", "api")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GRIDWARDEN_", frozen=True, extra="forbid")

    database_url: str | None = Field(
        default=None, description="postgresql://…; unset: a private embedded PostgreSQL"
    )
    mqtt_url: str | None = Field(
        default=None, description="mqtt://user:pass@host:port (mqtts:// for TLS); unset: embedded"
    )
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=DEFAULT_HTTP_PORT, ge=0, le=65535)
    data_dir: Path = Field(default_factory=default_data_dir)
    topic_prefix: str = Field(default="gw", pattern=r"^[A-Za-z0-9_-]{1,32}$")
    mqtt_client_id: str = Field(default="gridwarden-ingest", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    max_payload_bytes: int = Field(default=DEFAULT_MAX_PAYLOAD_BYTES, ge=256, le=1024 * 1024)
    # Per-device token bucket of ingest (a device over it: dead letter `rate_limited`).
    # Devices report every 60 s or more and a buffer flush is one message (an array), so
    # 5 msg/s is 300 times a normal device and only a broken or hostile one reaches it.
    # The burst is what a device may send at once: 60 is an hour of one-minute readings
    # queued by a device (or by the broker for us) and sent on reconnect. A broker backlog
    # is drained interleaved across devices, ~6,000/N msg/s each: past ~1,200 devices
    # that is below the rate, and no backlog ever trips the limit.
    device_rate_per_s: float = Field(
        default=DEFAULT_DEVICE_RATE_PER_S, ge=0, le=100_000, description="0: no limit"
    )
    device_rate_burst: int = Field(default=DEFAULT_DEVICE_RATE_BURST, ge=1, le=1_000_000)
    batch_max_messages: int = Field(default=DEFAULT_BATCH_MAX_MESSAGES, ge=1, le=100_000)
    batch_max_delay_ms: int = Field(default=DEFAULT_BATCH_MAX_DELAY_MS, ge=1, le=10_000)
    ingest_queue_max: int = Field(default=DEFAULT_INGEST_QUEUE_MAX, ge=100)
    dedup_window_s: int = Field(default=DEFAULT_DEDUP_WINDOW_S, ge=60)
    last_seen_flush_s: float = Field(default=DEFAULT_LAST_SEEN_FLUSH_S, gt=0)
    telemetry_retention_days: int = Field(default=365, ge=1)
    telemetry_compress_after_days: int = Field(default=7, ge=1)
    rules_dir: Path | None = Field(
        default=None, description="extra rule files (*.toml): new rules, replacements, overrides"
    )
    rules_tick_s: float = Field(default=0.2, gt=0, le=5, description="timer resolution")
    ingest_shards: int = Field(
        default=1, ge=1, le=64,
        description="ingest shards shared by the processes with the ingest role (each run by "
        "one of them at a time; 1: one runs ingest, the others stand by)",
    )  # fmt: skip
    roles: str = Field(
        default=",".join(ROLES),
        description="what this process runs, comma-separated: ingest (with the rules), "
        "alerting (case intake, outbox, SLA timers), api (HTTP API, consoles, live feed)",
    )
    # SLA targets per priority, seconds from the case's report time (the seeds: on site
    # within 10 minutes, feedback within 30; critical tighter). `escalate_s` is the new
    # deadline given to the next level after a missed one.
    sla_critical_accept_s: int = Field(default=60, gt=0)
    sla_critical_arrive_s: int = Field(default=300, gt=0)
    sla_critical_resolve_s: int = Field(default=1200, gt=0)
    sla_critical_escalate_s: int = Field(default=300, gt=0)
    sla_major_accept_s: int = Field(default=180, gt=0)
    sla_major_arrive_s: int = Field(default=600, gt=0)
    sla_major_resolve_s: int = Field(default=1800, gt=0)
    sla_major_escalate_s: int = Field(default=600, gt=0)
    sla_minor_accept_s: int = Field(default=900, gt=0)
    sla_minor_arrive_s: int = Field(default=3600, gt=0)
    sla_minor_resolve_s: int = Field(default=4 * 3600, gt=0)
    sla_minor_escalate_s: int = Field(default=1800, gt=0)
    sla_warning_accept_s: int = Field(default=3600, gt=0)
    sla_warning_arrive_s: int = Field(default=24 * 3600, gt=0)
    sla_warning_resolve_s: int = Field(default=72 * 3600, gt=0)
    sla_warning_escalate_s: int = Field(default=4 * 3600, gt=0)
    sla_tick_s: float = Field(default=1.0, gt=0, le=5, description="SLA timer resolution")
    webhook_url: str | None = Field(
        default=None,
        description="http(s):// URL each worker notification is also POSTed to; unset: none",
    )
    broker_auth_dir: Path | None = Field(
        default=None,
        description="write Mosquitto's password_file (passwd) and acl_file (acl) here from "
        "the broker accounts; unset: not managed (the embedded broker's are, always)",
    )
    broker_pid_file: Path | None = Field(
        default=None, description="the broker's pid file: SIGHUP after the files change"
    )
    broker_persistence_file: Path | None = Field(
        default=None,
        description="Mosquitto's persistence file: with broker_pid_file, ask for its saves "
        "(SIGUSR1) as often as they are cheap (gridwarden/broker_autosave.py); unset: the "
        "broker's own autosave_interval (the embedded broker's are paced, always)",
    )
    credential_hash_key: str | None = Field(
        default=None,
        description="key for hashing card and phone numbers; unset: a random one, made once "
        "and kept in the database (gridwarden/keys.py)",
    )
    # Web consoles: the city's time zone for display (times in the API stay UTC), the
    # lifetime of a browser session, and the limit on failed logins per client address.
    timezone: str = Field(
        default="Asia/Shanghai", description="IANA time zone the pages display times in"
    )
    session_ttl_s: int = Field(default=12 * 3600, ge=60, le=30 * 86400)
    login_max_failures: int = Field(
        default=10, ge=1, le=10_000, description="failed logins and bearer tokens per window"
    )
    login_window_s: int = Field(default=300, ge=1, le=86400)
    # Request bodies of the HTTP API: the largest legitimate one is a case action or a
    # report (a 2,000-character description is at most 8 KB as UTF-8); larger gets 413.
    http_max_body_bytes: int = Field(default=DEFAULT_HTTP_MAX_BODY_BYTES, ge=1024, le=64 << 20)

    def sla_policy(self, priority: str) -> dict[str, int]:
        """The SLA targets for one priority, as stored in each case's policy snapshot."""
        return {
            step: getattr(self, f"sla_{priority}_{step}_s")
            for step in ("accept", "arrive", "resolve", "escalate")
        }

    @property
    def role_set(self) -> frozenset[str]:
        return frozenset(self.roles.split(","))

    @field_validator("roles")
    @classmethod
    def _known_roles(cls, value: str) -> str:
        parts = [part.strip() for part in value.split(",") if part.strip()]
        unknown = [part for part in parts if part not in ROLES]
        if unknown or not parts:
            raise ValueError(f"must name one or more of {', '.join(ROLES)}")
        return ",".join(role for role in ROLES if role in parts)

    @field_validator("database_url")
    @classmethod
    def _postgres_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must start with postgresql://")
        return value

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("mqtt://", "mqtts://")):
            raise ValueError("must start with mqtt:// or mqtts://")
        return value

    @field_validator("webhook_url")
    @classmethod
    def _webhook_scheme(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        return value

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("must be an IANA time zone such as Asia/Shanghai") from None
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = os.environ.get("GRIDWARDEN_CONFIG_FILE")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings, turning validation errors into one ConfigError naming key and value."""
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(f"config file {config_file}: not found")
        os.environ["GRIDWARDEN_CONFIG_FILE"] = str(config_file)
    flags = {key: value for key, value in overrides.items() if value is not None}
    try:
        return Settings(**flags)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"]) or "?"
            env_key = f"GRIDWARDEN_{key.upper()}"
            problems.append(f"{env_key}={error.get('input')!r}: {error['msg']}")
        raise ConfigError("bad configuration: " + "; ".join(problems)) from exc
