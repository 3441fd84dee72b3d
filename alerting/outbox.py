"""The outbox publisher: rows of `outbox` → MQTT messages at QoS 1 (CONTRACT §6).

Whoever changes something people must hear about inserts an outbox row in the same
transaction (see `alerting.alarm_json.announce_alarm`) and runs
`pg_notify('gw_outbox', '')`. This task wakes on that notification, and polls every
second in case one was missed (e.g. while its listening connection was down).

Guarantees:

- **In order, at least once.** Rows are claimed in id order with `FOR UPDATE SKIP LOCKED`
  (so several publishers never publish one row at the same time), published in that order
  (a batch in flight at once), and marked `published_at` only after the broker's PUBACK.
  A crash after the PUBACK and before the commit publishes those rows again on restart:
  consumers may see a message twice. Each message carries the MQTT 5 user property
  `gw-outbox-id` (the row id, increasing) so they can drop repeats. With several
  publishers running, messages of different batches may interleave.
- **Failures are retried, with backoff.** Broker unreachable or gone mid-batch: the rows
  not acknowledged get `attempts + 1`, the connection is dropped and the batch is tried
  again after 0.2 s, 0.4 s, ... up to 30 s. A message the broker refuses (an MQTT 5 PUBACK
  with an error code, e.g. 0x87 "not authorized" from Mosquitto's ACL) is held back with its
  own backoff (up to 5 min) while the rows after it go out. `attempts` counts every try,
  the successful one included.
- Published rows are deleted after `retention_s` (7 days).

Webhook rows (`channel = 'webhook'`, written by `alerting.cases.notify_worker` when
`webhook_url` is set; `topic` is the URL) are POSTed as JSON with the header
`X-Gridwarden-Outbox-Id` (the row id, for dropping repeats: at least once, as above), with
a 10 s timeout. Any 2xx marks the row published; an error or another status counts an
attempt and holds the row back for 0.2 s, 0.4 s, ... up to `retry_max_s` (30 s) while the
rows after it go on. They have their own loop, claim and backoff (see `run`).

aiomqtt 2.5's `publish(qos=1)` returns once paho has seen the PUBACK (`on_publish` is
called from paho's PUBACK handler) and raises after `timeout` without one; it ignores the
PUBACK's reason code, which `_OutboxClient` captures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import aiomqtt
import asyncpg
import httpx
import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from prometheus_client import Counter, Gauge

from alerting.alarm_json import OUTBOX_CHANNEL
from gridwarden.db import DB_UNAVAILABLE, query
from gridwarden.mqtt_url import parse_mqtt_url
from gridwarden.supervisor import TaskFn

log = logging.getLogger(__name__)

DEFAULT_BATCH = 100
POLL_S = 1.0  # fallback when a notification is missed
PUBLISH_TIMEOUT_S = 10.0  # no PUBACK within this: the connection is considered broken
RETRY_MIN_S = 0.2
RETRY_MAX_S = 30.0
REJECTED_RETRY_MAX_S = 300.0
RETENTION_S = 7 * 86400.0
PRUNE_EVERY_S = 600.0
PRUNE_BATCH = 10_000
OUTBOX_ID_PROPERTY = "gw-outbox-id"
OUTBOX_ID_HEADER = "X-Gridwarden-Outbox-Id"
WEBHOOK_TIMEOUT_S = 10.0

PUBLISHED = Counter("gridwarden_outbox_published_total", "Outbox messages the broker acknowledged")
FAILURES = Counter(
    "gridwarden_outbox_failures_total",
    "Outbox publish failures (broker: unreachable or no PUBACK; rejected: refused by it; "
    "webhook: a webhook POST failed or was not answered with a 2xx)",
    ["reason"],
)
WEBHOOKS_POSTED = Counter(
    "gridwarden_outbox_webhooks_posted_total", "Outbox rows a webhook answered with a 2xx"
)
LAG = Gauge("gridwarden_outbox_lag_seconds", "Age of the oldest unpublished outbox row")

_DB_ERRORS = DB_UNAVAILABLE


class _BrokerDown(Exception):
    pass


class _Rejected(Exception):
    pass


class _WebhookFailed(Exception):
    def __init__(self, message: str, *, unreachable: bool) -> None:
        super().__init__(message)
        self.unreachable = unreachable  # no answer at all: the rows after it wait too


class _OutboxClient(aiomqtt.Client):
    """aiomqtt with each PUBACK's reason code kept and the connection state visible.
    Touches aiomqtt 2.x internals (pinned < 3)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rejections: dict[int, ReasonCode] = {}  # packet id → the broker's refusal

    def _on_publish(
        self,
        client: Any,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties,
    ) -> None:
        if reason_code.is_failure:
            self.rejections[mid] = reason_code
        super()._on_publish(client, userdata, mid, reason_code, properties)

    async def publish_acked(
        self, topic: str, payload: bytes, properties: Properties, timeout_s: float
    ) -> ReasonCode | None:
        """aiomqtt's `publish` at QoS 1 (returns once the PUBACK came), returning the
        broker's refusal of this message, if any: several may be in flight at once."""
        info = self._client.publish(topic, payload, 1, False, properties)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
        if not info.is_published():
            confirmation = asyncio.Event()
            with self._pending_call(info.mid, confirmation, self._pending_publishes):
                await self._wait_for(confirmation.wait(), timeout=timeout_s)
        return self.rejections.pop(info.mid, None)

    def is_connected(self) -> bool:
        connected = self._connected
        return (
            connected.done()
            and not connected.cancelled()
            and connected.exception() is None
            and not self._disconnected.done()
        )

    def forget_disconnection(self) -> None:
        """Retrieve an unexpected-disconnection error nobody else will await."""
        if self._disconnected.done() and not self._disconnected.cancelled():
            self._disconnected.exception()


class OutboxPublisher:
    def __init__(
        self,
        pool: asyncpg.Pool,
        mqtt_url: str,
        *,
        batch: int = DEFAULT_BATCH,
        poll_s: float = POLL_S,
        publish_timeout_s: float = PUBLISH_TIMEOUT_S,
        retry_max_s: float = RETRY_MAX_S,
        retention_s: float | None = RETENTION_S,
        webhook_timeout_s: float = WEBHOOK_TIMEOUT_S,
    ) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self.pool = pool
        self.endpoint = parse_mqtt_url(mqtt_url)
        self.batch = batch
        self.poll_s = poll_s
        self.publish_timeout_s = publish_timeout_s
        self.retry_max_s = retry_max_s
        self.retention_s = retention_s
        self.webhook_timeout_s = webhook_timeout_s
        self._client: _OutboxClient | None = None
        self._listener: Any = None  # a pooled connection LISTENing on gw_outbox
        self._wake = asyncio.Event()
        self._held: dict[int, float] = {}  # refused row id → monotonic time of its next try
        self._webhook_wake = asyncio.Event()
        self._webhook_held: dict[int, float] = {}  # failed webhook row id → its next try
        self._http: httpx.AsyncClient | None = None

    def is_connected(self) -> bool:
        """Connected to the broker (it connects when there is something to publish)."""
        return self._client is not None and self._client.is_connected()

    async def run(self, stop: asyncio.Event) -> None:
        """MQTT rows and webhook rows in two loops, each with its own claim (by channel) and
        backoff: a webhook that is down or slow (up to 10 s a POST) never holds back the
        workers' MQTT messages, nor a broker outage the webhooks. One task group, so a
        failure of either loop stops the publisher (and the supervisor hears of it)."""

        async def wake_on_stop() -> None:
            await stop.wait()
            self._wake.set()
            self._webhook_wake.set()

        watcher = asyncio.create_task(wake_on_stop(), name="outbox-stop")
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._run_mqtt(stop), name="outbox-mqtt")
                group.create_task(self._run_webhooks(stop), name="outbox-webhooks")
        finally:
            watcher.cancel()

    async def _run_mqtt(self, stop: asyncio.Event) -> None:
        delay = RETRY_MIN_S
        next_prune = time.monotonic()
        try:
            while not stop.is_set():
                self._wake.clear()
                await self._ensure_listener()
                try:
                    ok = await self._drain(stop)
                except _DB_ERRORS as exc:
                    log.warning("outbox: database unavailable: %r", exc)
                    ok = False
                await self._measure_lag()
                if ok:
                    delay = RETRY_MIN_S
                    if self.retention_s is not None and time.monotonic() >= next_prune:
                        next_prune = time.monotonic() + PRUNE_EVERY_S
                        await self._prune(self.retention_s)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.poll_s):
                            await self._wake.wait()
                else:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await stop.wait()
                    delay = min(delay * 2, self.retry_max_s)
        finally:
            await self._release_listener()
            await self._disconnect()

    # -- publishing

    async def _drain(self, stop: asyncio.Event) -> bool:
        """Publish until nothing is left; False after a broker failure."""
        while True:
            claimed, failed = await self._round()
            if failed:
                return False
            if claimed < self.batch or stop.is_set():
                return True

    async def _round(self) -> tuple[int, bool]:
        """One batch in one transaction: (rows claimed, whether the broker failed)."""
        now = time.monotonic()
        self._held = {i: t for i, t in self._held.items() if t > now}
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(query("outbox_claim"), self.batch, list(self._held), "mqtt")
            if not rows:
                return 0, False
            done: list[int] = []
            unsent: list[int] = []
            broker_failed = False
            try:
                client = await self._connect()
                # All of the batch in flight at once, sent in id order: one round trip
                # per batch, not per message (under load, each costs a turn of a busy loop).
                outcomes = await asyncio.gather(
                    *(self._publish(client, row) for row in rows), return_exceptions=True
                )
            except _BrokerDown as exc:
                outcomes = [exc] * len(rows)
            for row, outcome in zip(rows, outcomes, strict=True):
                if outcome is None:
                    done.append(row["id"])
                elif isinstance(outcome, _Rejected):
                    FAILURES.labels("rejected").inc()
                    wait = min(RETRY_MIN_S * 2 ** row["attempts"], REJECTED_RETRY_MAX_S)
                    log.warning(
                        "outbox row %s (%s) refused by the broker: %s; retrying in %.0fs",
                        row["id"], row["topic"], outcome, wait,
                    )  # fmt: skip
                    self._held[row["id"]] = time.monotonic() + wait
                    unsent.append(row["id"])
                elif isinstance(outcome, _BrokerDown):
                    if not broker_failed:
                        FAILURES.labels("broker").inc()
                        log.warning("outbox: broker unavailable: %s", outcome)
                    unsent.append(row["id"])
                    broker_failed = True
                else:
                    raise outcome  # a bug of ours
            if broker_failed:
                await self._disconnect()
            if done:
                await conn.execute(query("outbox_mark_published"), done)
            if unsent:
                await conn.execute(query("outbox_mark_failed"), unsent)
        PUBLISHED.inc(len(done))
        return len(rows), broker_failed

    async def _publish(self, client: _OutboxClient, row: Any) -> None:
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.UserProperty = [(OUTBOX_ID_PROPERTY, str(row["id"]))]
        properties.ContentType = "application/json"
        properties.PayloadFormatIndicator = 1
        payload = orjson.dumps(orjson.loads(row["payload"]))
        try:
            rejection = await client.publish_acked(
                row["topic"], payload, properties, self.publish_timeout_s
            )
        except ValueError as exc:  # paho: a topic no message may have (wildcards, empty)
            raise _Rejected(f"bad topic: {exc}") from exc
        except aiomqtt.MqttError as exc:
            raise _BrokerDown(str(exc) or repr(exc)) from exc
        if rejection is not None:
            raise _Rejected(str(rejection))

    async def _connect(self) -> _OutboxClient:
        if self._client is not None:
            if self._client.is_connected():
                return self._client
            await self._disconnect()
        endpoint = self.endpoint
        client = _OutboxClient(
            endpoint.host,
            endpoint.port,
            username=endpoint.username,
            password=endpoint.password,
            identifier=f"gridwarden-outbox-{uuid.uuid4().hex[:12]}",
            protocol=aiomqtt.ProtocolVersion.V5,
            timeout=self.publish_timeout_s,
            tls_context=endpoint.ssl_context(),
            max_inflight_messages=self.batch,  # a whole batch in flight (see `_round`)
        )
        client.pending_calls_threshold = self.batch  # ... without a warning for it
        try:
            await client.__aenter__()
        except aiomqtt.MqttError as exc:
            raise _BrokerDown(f"cannot connect to {endpoint.host}:{endpoint.port}: {exc}") from exc
        log.info("outbox: connected to the broker at %s:%s", endpoint.host, endpoint.port)
        self._client = client
        return client

    async def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            await client.__aexit__(None, None, None)
        except aiomqtt.MqttError as exc:
            log.debug("outbox: unclean disconnect: %s", exc)
        client.forget_disconnection()

    # -- webhooks

    async def _run_webhooks(self, stop: asyncio.Event) -> None:
        delay = RETRY_MIN_S
        try:
            while not stop.is_set():
                self._webhook_wake.clear()
                try:
                    while await self._webhook_round() and not stop.is_set():
                        pass
                except _DB_ERRORS as exc:
                    log.warning("outbox: database unavailable for webhooks: %r", exc)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await stop.wait()
                    delay = min(delay * 2, self.retry_max_s)
                    continue
                delay = RETRY_MIN_S
                # Held rows are retried by the first round after their time (poll_s grain).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_s):
                        await self._webhook_wake.wait()
        finally:
            http, self._http = self._http, None
            if http is not None:
                await http.aclose()

    async def _webhook_round(self) -> bool:
        """POST one batch of webhook rows in one transaction; True if there may be more."""
        now = time.monotonic()
        self._webhook_held = {i: t for i, t in self._webhook_held.items() if t > now}
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(
                query("outbox_claim"), self.batch, list(self._webhook_held), "webhook"
            )
            done: list[int] = []
            failed: list[int] = []
            unreachable = False
            for row in rows:
                try:
                    await self._post(row)
                except _WebhookFailed as exc:
                    FAILURES.labels("webhook").inc()
                    wait = min(RETRY_MIN_S * 2 ** row["attempts"], self.retry_max_s)
                    log.warning(
                        "outbox row %s: webhook %s failed: %s; retrying in %.1fs",
                        row["id"], row["topic"], exc, wait,
                    )  # fmt: skip
                    self._webhook_held[row["id"]] = time.monotonic() + wait
                    failed.append(row["id"])
                    if exc.unreachable:  # no answer: not worth a timeout per row now
                        unreachable = True
                        break
                else:
                    done.append(row["id"])
            if done:
                await conn.execute(query("outbox_mark_published"), done)
            if failed:
                await conn.execute(query("outbox_mark_failed"), failed)
        WEBHOOKS_POSTED.inc(len(done))
        return len(rows) == self.batch and not unreachable

    async def _post(self, row: Any) -> None:
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.webhook_timeout_s)
        headers = {"Content-Type": "application/json", OUTBOX_ID_HEADER: str(row["id"])}
        body = orjson.dumps(orjson.loads(row["payload"]))
        try:
            response = await self._http.post(row["topic"], content=body, headers=headers)
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:  # this row's URL
            raise _WebhookFailed(f"bad URL: {exc}", unreachable=False) from exc
        except httpx.HTTPError as exc:  # connection refused, timeout, broken response
            raise _WebhookFailed(str(exc) or repr(exc), unreachable=True) from exc
        if not response.is_success:
            raise _WebhookFailed(f"answered HTTP {response.status_code}", unreachable=False)

    # -- database side

    def _listening(self) -> bool:
        conn = self._listener
        if conn is None:
            return False
        try:
            return not conn.is_closed()
        except asyncpg.InterfaceError:  # the pool took it back: its connection was lost
            return False

    async def _ensure_listener(self) -> None:
        if self._listening():
            return
        await self._release_listener()
        try:
            conn = await self.pool.acquire()
        except _DB_ERRORS as exc:
            log.debug("outbox: no listening connection (%r); polling", exc)
            return
        try:
            await conn.add_listener(OUTBOX_CHANNEL, self._on_notify)
        except _DB_ERRORS as exc:
            log.debug("outbox: LISTEN failed (%r); polling", exc)
            await self.pool.release(conn)
            return
        self._listener = conn

    async def _release_listener(self) -> None:
        conn, self._listener = self._listener, None
        if conn is None:
            return
        with contextlib.suppress(*_DB_ERRORS):
            if not conn.is_closed():
                await conn.remove_listener(OUTBOX_CHANNEL, self._on_notify)
        with contextlib.suppress(*_DB_ERRORS):
            await self.pool.release(conn)

    def _on_notify(self, *_: Any) -> None:
        self._wake.set()
        self._webhook_wake.set()

    async def _measure_lag(self) -> None:
        with contextlib.suppress(*_DB_ERRORS):
            LAG.set(await self.pool.fetchval(query("outbox_lag")))

    async def _prune(self, retention_s: float) -> None:
        try:
            status = await self.pool.execute(query("outbox_prune"), retention_s, PRUNE_BATCH)
        except _DB_ERRORS as exc:
            log.warning("outbox: pruning failed: %r", exc)
            return
        log.debug("outbox: pruned published rows (%s)", status)


def outbox_task(pool: asyncpg.Pool, mqtt_url: str, *, batch: int = DEFAULT_BATCH) -> TaskFn:
    """The supervised task publishing the outbox: `supervisor.add("outbox", outbox_task(...))`."""
    return OutboxPublisher(pool, mqtt_url, batch=batch).run
