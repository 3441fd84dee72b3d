"""Parsing of `mqtt://user:pass@host:port` / `mqtts://…` URLs, shared by every MQTT client.

Query options: `ca=/path/ca.pem` (trust this CA for mqtts:// instead of the system's),
`insecure=1` (no certificate check: tests against a self-signed broker only),
`client_id=…` (the simulator's MQTT client id).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, unquote, urlsplit, urlunsplit

DEFAULT_MQTT_PORT = 1883
DEFAULT_MQTTS_PORT = 8883
URL_OPTIONS = ("ca", "insecure", "client_id")


@dataclass(frozen=True, slots=True)
class MqttEndpoint:
    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    tls_insecure: bool = False
    client_id: str | None = None

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for mqtts:// (None for mqtt://): the system's CAs, or `ca`."""
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=self.ca_file)
        if self.tls_insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


def parse_mqtt_url(url: str) -> MqttEndpoint:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"MQTT URL {url!r}: the scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ValueError(f"MQTT URL {url!r}: no host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"MQTT URL {url!r}: bad port") from None
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    unknown = sorted(set(query) - set(URL_OPTIONS))
    if unknown:
        raise ValueError(f"MQTT URL {url!r}: unknown option(s) {', '.join(unknown)}")
    tls = parts.scheme == "mqtts"
    return MqttEndpoint(
        host=parts.hostname,
        port=port or (DEFAULT_MQTTS_PORT if tls else DEFAULT_MQTT_PORT),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        tls=tls,
        ca_file=query.get("ca"),
        tls_insecure=query.get("insecure", "0").lower() in ("1", "true", "yes"),
        client_id=query.get("client_id"),
    )


def with_user(url: str, username: str, password: str) -> str:
    """The same broker URL logging in as another account."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    user = f"{quote(username, safe='')}:{quote(password, safe='')}"
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc}"))
