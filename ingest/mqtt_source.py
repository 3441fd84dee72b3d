"""The broker side of ingest: a paho-mqtt 2 client with manual acknowledgements.

Why paho and not aiomqtt here: a message may be acknowledged to the broker only
after its row is committed, and aiomqtt (2.5) has no manual acks. paho runs its
network loop in its own thread; messages cross into asyncio through a deque and
one wake-up per burst rather than one `call_soon_threadsafe` per message.

Backpressure comes from MQTT itself: the session's Receive Maximum caps the
messages handed over but not yet acknowledged, so memory stays bounded while the
database is slow or down and the rest waits in the broker.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import threading
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from gridwarden.mqtt_url import parse_mqtt_url
from ingest.decode import RawMessage

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600  # the broker keeps our queue for a week of downtime
KEEPALIVE_S = 30


class MqttSource:
    """Subscribes with a persistent QoS-1 session; `ack()` only after commit."""

    def __init__(
        self,
        url: str,
        client_id: str,
        topics: list[str],
        receive_maximum: int,
    ) -> None:
        self.endpoint = parse_mqtt_url(url)
        self.topics = topics
        self.receive_maximum = min(receive_maximum, 65535)
        self.generation = 0
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self._pending: collections.deque[RawMessage] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup = asyncio.Event()
        self._wake_scheduled = False
        self._lock = threading.Lock()
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=paho.MQTTv5,
            manual_ack=True,
        )
        if self.endpoint.username:
            client.username_pw_set(self.endpoint.username, self.endpoint.password)
        if self.endpoint.tls:
            client.tls_set_context(ssl.create_default_context())
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.reconnect_delay_set(min_delay=1, max_delay=10)
        self._client = client

    # -- lifecycle (called from asyncio) ---------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = SESSION_EXPIRY_S
        properties.ReceiveMaximum = self.receive_maximum
        self._client.connect_async(
            self.endpoint.host,
            self.endpoint.port,
            keepalive=KEEPALIVE_S,
            clean_start=False,
            properties=properties,
        )
        self._client.loop_start()

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
        # paho closes its internal wake-up socket pair only when the client is garbage
        # collected; close it now so a stopped source holds no sockets.
        self._client._reset_sockets()

    def is_connected(self) -> bool:
        return self._client.is_connected()

    # -- consuming -------------------------------------------------------------------
    async def take(self, max_messages: int, max_delay_s: float) -> list[RawMessage]:
        """Wait for at least one message, then gather more for up to `max_delay_s`."""
        while not self._pending:
            self._wakeup.clear()
            if self._pending:
                break
            await self._wakeup.wait()
        if len(self._pending) < max_messages:
            deadline = asyncio.get_running_loop().time() + max_delay_s
            while len(self._pending) < max_messages:
                remaining = deadline - asyncio.get_running_loop().time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    async with asyncio.timeout(remaining):
                        await self._wakeup.wait()
                except TimeoutError:
                    break
        batch: list[RawMessage] = []
        pending = self._pending
        while pending and len(batch) < max_messages:
            batch.append(pending.popleft())
        return batch

    def depth(self) -> int:
        return len(self._pending)

    def ack(self, messages: list[RawMessage]) -> int:
        """Acknowledge in receive order; messages from an older connection are skipped
        (the broker redelivers them on the resumed session)."""
        acked = 0
        for message in messages:
            if message.qos > 0 and message.generation == self.generation:
                self._client.ack(message.mid, message.qos)
                acked += 1
        return acked

    # -- paho callbacks (network thread) -----------------------------------------------
    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if reason.is_failure:
            log.warning("MQTT connect refused: %s", reason)
            return
        with self._lock:
            self.generation += 1
        options = SubscribeOptions(qos=1)
        client.subscribe([(topic, options) for topic in self.topics])
        self.connected.set()
        log.info("MQTT connected (session present: %s)", flags.session_present)

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: Any, properties: Any
    ) -> None:
        failed = [reason for reason in reasons if reason.is_failure]
        if failed:
            log.error("MQTT subscription refused: %s", failed)
            return
        self.subscribed.set()

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self.connected.clear()
        self.subscribed.clear()
        log.warning("MQTT disconnected: %s", reason)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        self._pending.append(
            RawMessage(
                topic=message.topic,
                payload=bytes(message.payload),
                received_at=datetime.now(UTC),
                mid=message.mid,
                qos=message.qos,
                generation=self.generation,
            )
        )
        if not self._wake_scheduled and self._loop is not None:
            self._wake_scheduled = True
            self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self._wake_scheduled = False
        self._wakeup.set()
