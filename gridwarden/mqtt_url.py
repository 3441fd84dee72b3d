"""Parsing of `mqtt://user:pass@host:port` / `mqtts://…` URLs, shared by every MQTT client."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit, urlunsplit

DEFAULT_MQTT_PORT = 1883
DEFAULT_MQTTS_PORT = 8883


@dataclass(frozen=True)
class MqttEndpoint:
    host: str
    port: int
    username: str | None
    password: str | None
    tls: bool


def parse_mqtt_url(url: str) -> MqttEndpoint:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"MQTT URL {url!r}: scheme must be mqtt:// or mqtts://")
    tls = parts.scheme == "mqtts"
    return MqttEndpoint(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or (DEFAULT_MQTTS_PORT if tls else DEFAULT_MQTT_PORT),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        tls=tls,
    )


def with_user(url: str, username: str, password: str) -> str:
    """The same broker URL logging in as another account."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    user = f"{quote(username, safe='')}:{quote(password, safe='')}"
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc}"))
