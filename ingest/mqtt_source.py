"""The broker side of ingest: our own lean asyncio MQTT v5 subscriber, manual batched acks.

Why our own protocol code and not a library: a message may be acknowledged to the
broker only after its row is committed, and we commit in batches. aiomqtt (2.5) has no
manual acks; paho-mqtt 2 has them, but runs its network loop in a thread of its own and
spends ~90 µs of Python per message there, fighting the asyncio thread for the GIL
(~11k msg/s bare on this machine, before we do any work; this module drains the same
backlog from the same broker at ~150k msg/s, orjson-parsing and acking). No MQTT library
acknowledges a batch after a database commit without a task or a thread hop per
message. So: an `asyncio.BufferedProtocol` on the event loop's thread — no thread, no task per
message — whose `data_received` parses every complete packet of a read in one pass
(`ingest.mqtt_wire`), queues the PUBLISHes and wakes `take()` at most once; `ack()`
writes the PUBACKs of a whole committed batch in ONE transport write.

Only what a QoS-1 subscriber needs: CONNECT (clean start off, Session Expiry 7 days, our
Receive Maximum), SUBSCRIBE, PUBACK, PINGREQ, DISCONNECT. Anything else the broker
sends (QoS 2, malformed bytes, a packet no subscriber expects) is logged and answered by
reconnecting; the persistent session makes the broker redeliver what was not acked.

Backpressure: the session's Receive Maximum caps the messages handed over but not yet
acknowledged, so memory stays bounded while the database is slow or down and the rest
waits in the broker. Mosquitto 2.0.x does not quite honour it: each PUBACK of the oldest
in-flight message releases up to Receive Maximum *more* queued messages, so once acks
flow a large backlog would arrive at full speed. So we also stop reading the socket
while Receive Maximum messages wait to be taken, and read again when half are taken:
TCP then holds the broker back. Memory stays bounded by Receive Maximum messages plus
one socket read (READ_BYTES).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from datetime import UTC, datetime
from typing import cast

from gridwarden.mqtt_url import parse_mqtt_url
from ingest import mqtt_wire
from ingest.decode import RawMessage
from ingest.mqtt_wire import Connack, Disconnect, MalformedPacket, Pingresp, Publish, Suback

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600  # the broker keeps our queue for a week of downtime
KEEPALIVE_S = 30
RECONNECT_MIN_S = 1.0
RECONNECT_MAX_S = 10.0
CONNECT_TIMEOUT_S = 10.0  # TCP (+ TLS) handshake; the CONNACK is the keep-alive watchdog's
# After stop()'s DISCONNECT we wait (without blocking) for the broker to close the connection,
# at most this long: closing first could lose the PUBACKs it has not read yet (see stop()).
STOP_GRACE_S = 2.0
SUBSCRIPTION_OPTIONS = 0x01  # maximum QoS 1; no-local, retain-as-published, retain handling 0
# Bytes read from the socket per event-loop callback (~500 telemetry messages, 2-4 ms to
# parse): asyncio's default of 256 KiB took one callback of 10-90 ms that an alarm event's
# next step waited behind.
READ_BYTES = 64 * 1024


class ProtocolViolation(Exception):
    """The broker sent something a QoS-1 subscriber must not get."""

    def __init__(self, detail: str, reason_code: int) -> None:
        super().__init__(detail)
        self.reason_code = reason_code


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
        self.client_id = client_id
        self.topics = topics
        self.receive_maximum = max(1, min(receive_maximum, 65535))
        self.generation = 0
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self._pending: collections.deque[RawMessage] = collections.deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._connection: _Connection | None = None
        self._stopped_connection: _Connection | None = None  # closing after stop()
        self._packet_id = 0

    # -- lifecycle (called from asyncio) ---------------------------------------------
    def start(self) -> None:
        if self._task is not None and not self._task.done():
            return
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"mqtt-{self.client_id}"
        )

    def stop(self) -> None:
        """DISCONNECT (reason 0: the session stays for its expiry), close, stop reconnecting.

        The close is graceful: DISCONNECT, then our half of the TCP connection is shut and
        the transport closes when the broker closes its half (at most STOP_GRACE_S later).
        Mosquitto reads one packet per socket per loop turn, so the last batch's PUBACKs may
        still be unread when we stop; closing at once could lose them (an RST when data of
        ours is unread too, or a next start() taking the session over first), and the
        broker would redeliver that batch. A start() waits for this close to finish.
        """
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.finish()
            self._stopped_connection = connection
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.connected.clear()
        self.subscribed.clear()

    def is_connected(self) -> bool:
        return self.connected.is_set()

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
        connection = self._connection
        if (
            connection is not None
            and connection.paused
            and len(pending) <= self.receive_maximum // 2
        ):
            connection.resume()
        return batch

    def depth(self) -> int:
        return len(self._pending)

    def ack(self, messages: list[RawMessage]) -> int:
        """Acknowledge the QoS-1 messages of this connection in one write; returns how many.

        Messages from an older connection are skipped (the broker redelivers them on the
        resumed session), and so is everything while no connection is up.
        """
        connection = self._connection
        if connection is None or not connection.is_open():
            return 0
        generation = self.generation
        packet_ids = [m.mid for m in messages if m.qos and m.generation == generation]
        if packet_ids:
            connection.write(mqtt_wire.puback(packet_ids))
        return len(packet_ids)

    # -- connection management -----------------------------------------------------------
    async def _run(self) -> None:
        stopped, self._stopped_connection = self._stopped_connection, None
        if stopped is not None and not stopped.lost.done():
            await asyncio.wait([stopped.lost], timeout=STOP_GRACE_S + 1)
        delay = RECONNECT_MIN_S
        while True:
            try:
                accepted = await self._connect_once()
            except Exception:  # a bug of ours: log it and keep the ingest alive
                log.exception("MQTT session to %s failed unexpectedly", self._where())
                accepted = False
            if accepted:
                delay = RECONNECT_MIN_S
            log.info("MQTT reconnecting to %s in %.1fs", self._where(), delay)
            await asyncio.sleep(delay)
            if not accepted:
                delay = min(delay * 2, RECONNECT_MAX_S)

    async def _connect_once(self) -> bool:
        """One connection, from TCP connect to its loss; whether the broker accepted it."""
        loop = asyncio.get_running_loop()
        endpoint = self.endpoint
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self),
                    endpoint.host,
                    endpoint.port,
                    ssl=endpoint.ssl_context(),
                )
        except (OSError, TimeoutError) as exc:  # refused, DNS, TLS (ssl.SSLError), timeout
            log.warning("MQTT connect to %s failed: %s", self._where(), exc or type(exc).__name__)
            return False
        self._connection = connection
        try:
            # Shielded: stop() cancels this task, but `lost` must stay the close's own
            # signal (a later start() waits on it).
            await asyncio.shield(connection.lost)
        finally:
            connection.close(None)
            if self._connection is connection:
                self._connection = None
                self.connected.clear()
                self.subscribed.clear()
        return connection.connack_received and not connection.refused

    def _where(self) -> str:
        return f"{self.endpoint.host}:{self.endpoint.port}"

    def _next_packet_id(self) -> int:
        self._packet_id = self._packet_id % 0xFFFF + 1
        return self._packet_id

    def _connect_packet(self) -> bytes:
        return mqtt_wire.connect(
            self.client_id,
            keepalive_s=KEEPALIVE_S,
            clean_start=False,
            session_expiry_s=SESSION_EXPIRY_S,
            receive_maximum=self.receive_maximum,
            username=self.endpoint.username,
            password=self.endpoint.password,
        )


class _Connection(asyncio.BufferedProtocol):
    """One TCP (or TLS) connection to the broker, on the event loop's thread."""

    def __init__(self, source: MqttSource) -> None:
        self.source = source
        self.loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[None] = self.loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.connack_received = False
        self.refused = False
        self.keepalive_s = KEEPALIVE_S
        self.subscribe_id = 0
        self._read_into = memoryview(bytearray(READ_BYTES))
        self._buffer = bytearray()
        self._need = 0  # bytes the partial packet in _buffer needs before parsing pays
        self._last_received = self.loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._closing = False
        self.paused = False  # reading stopped: Receive Maximum messages wait to be taken

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (not necessarily a subclass of asyncio.Transport: uvloop's).
        self.transport = cast(asyncio.Transport, transport)
        self._last_received = self.loop.time()
        self.transport.write(self.source._connect_packet())
        self._schedule_tick()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self._clear_events()
        if not self._closing:
            log.warning(
                "MQTT connection to %s lost: %s",
                self.source._where(),
                exc or "closed by the broker",
            )
        self._closing = True
        if not self.lost.done():
            self.lost.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_into

    def buffer_updated(self, nbytes: int) -> None:
        # A copy: the queued messages' payloads outlive the buffer, which the next read reuses.
        self.data_received(bytes(self._read_into[:nbytes]))

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._last_received = self.loop.time()
        buffer = self._buffer
        try:
            if buffer:
                buffer += data
                if len(buffer) < self._need:
                    return  # still inside one large packet: do not re-parse it
                packets, consumed = mqtt_wire.parse_packets(buffer)
                del buffer[:consumed]
            else:
                packets, consumed = mqtt_wire.parse_packets(data)
                if consumed < len(data):
                    buffer += memoryview(data)[consumed:]
            if buffer:
                self._need = mqtt_wire.first_packet_size(buffer) or 0
            if packets:
                self._handle(packets)
        except MalformedPacket as exc:
            log.error(
                "MQTT: malformed packet from %s (%s); reconnecting", self.source._where(), exc
            )
            self.close(mqtt_wire.disconnect(0x81))
        except ProtocolViolation as exc:
            log.error("MQTT: protocol error by %s (%s); reconnecting", self.source._where(), exc)
            self.close(mqtt_wire.disconnect(exc.reason_code))
        except Exception:  # a bug of ours: never into the event loop's exception handler
            log.exception("MQTT: failed to handle data from %s; reconnecting", self.source._where())
            self.close(mqtt_wire.disconnect(0x83))

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost follows

    # -- packets ---------------------------------------------------------------------------
    def _handle(self, packets: list[mqtt_wire.Packet]) -> None:
        source = self.source
        pending = source._pending
        generation = source.generation
        received_at = datetime.now(UTC)
        queued = False
        try:
            for packet in packets:
                if isinstance(packet, Publish):
                    if packet.qos == 2:
                        raise ProtocolViolation("QoS 2 PUBLISH, but we subscribe at QoS 1", 0x9B)
                    if not self.connack_received:
                        raise ProtocolViolation("PUBLISH before CONNACK", 0x82)
                    pending.append(
                        RawMessage(
                            packet.topic,
                            packet.payload,
                            received_at,
                            packet.packet_id,
                            packet.qos,
                            generation,
                        )
                    )
                    queued = True
                elif isinstance(packet, Pingresp):
                    pass
                elif isinstance(packet, Connack):
                    self._on_connack(packet)
                    generation = source.generation
                elif isinstance(packet, Suback):
                    self._on_suback(packet)
                elif isinstance(packet, Disconnect):
                    log.warning(
                        "MQTT: %s disconnected us: %s%s",
                        source._where(),
                        mqtt_wire.reason_name(packet.reason_code),
                        f" ({packet.reason_string})" if packet.reason_string else "",
                    )
                    self.close(None)
                    return
                else:
                    raise ProtocolViolation(f"unexpected {packet.name}", 0x82)
                if self._closing:
                    return
        finally:
            if queued:
                source._wakeup.set()  # one wake-up per chunk, not per message
                if len(pending) >= source.receive_maximum:
                    self.pause()

    def _on_connack(self, connack: Connack) -> None:
        if self.connack_received:
            raise ProtocolViolation("a second CONNACK", 0x82)
        source = self.source
        if connack.failed:
            log.warning(
                "MQTT connect to %s refused: %s%s",
                source._where(),
                mqtt_wire.reason_name(connack.reason_code),
                f" ({connack.reason_string})" if connack.reason_string else "",
            )
            self.refused = True
            self.close(None)
            return
        self.connack_received = True
        if connack.server_keep_alive is not None:
            self.keepalive_s = connack.server_keep_alive
            self._cancel_timer()
            self._schedule_tick()
        source.generation += 1
        source.connected.set()
        log.info(
            "MQTT connected to %s as %s (session present: %s)",
            source._where(),
            source.client_id,
            connack.session_present,
        )
        self.subscribe_id = source._next_packet_id()
        self.write(mqtt_wire.subscribe(self.subscribe_id, source.topics, SUBSCRIPTION_OPTIONS))

    def _on_suback(self, suback: Suback) -> None:
        topics = self.source.topics
        if suback.packet_id != self.subscribe_id or len(suback.reason_codes) != len(topics):
            raise ProtocolViolation(
                f"SUBACK {suback.packet_id} with {len(suback.reason_codes)} codes does not "
                f"answer SUBSCRIBE {self.subscribe_id} of {len(topics)} topics",
                0x82,
            )
        refused = [
            f"{topic} ({mqtt_wire.reason_name(code)})"
            for topic, code in zip(topics, suback.reason_codes, strict=True)
            if code >= 0x80
        ]
        if refused:
            log.error("MQTT subscription refused by %s: %s", self.source._where(), refused)
            return
        self.source.subscribed.set()

    # -- writing and closing ---------------------------------------------------------------
    def is_open(self) -> bool:
        """CONNACK received and not closing: PUBACKs written now reach this session."""
        return self.connack_received and not self._closing

    def _clear_events(self) -> None:
        # Only the current connection speaks for the source: one closed by stop() may
        # report its loss after a start() has already connected again.
        if self.source._connection is self:
            self.source.connected.clear()
            self.source.subscribed.clear()

    def write(self, packet: bytes) -> None:
        if self.transport is not None and not self._closing:
            self.transport.write(packet)

    def finish(self) -> None:
        """DISCONNECT reason 0 and half-close; the broker's close completes it (stop())."""
        if self._closing:
            return
        transport = self.transport
        if transport is None or not transport.can_write_eof():  # TLS cannot half-close
            self.close(mqtt_wire.disconnect(0) if self.connack_received else None)
            return
        self._closing = True
        self._cancel_timer()
        self._clear_events()
        if self.connack_received:
            transport.write(mqtt_wire.disconnect(0))
        transport.write_eof()  # we keep reading (and ignoring) until the broker closes
        self._timer = self.loop.call_later(STOP_GRACE_S, transport.abort)

    def close(self, last_packet: bytes | None) -> None:
        """Send `last_packet` (a DISCONNECT) if still open, then close. Idempotent."""
        if self._closing:
            return
        self._closing = True
        self._cancel_timer()
        self._clear_events()
        if self.transport is not None:
            if last_packet is not None:
                self.transport.write(last_packet)
            self.transport.close()

    # -- flow control ----------------------------------------------------------------------
    def pause(self) -> None:
        if not self.paused and self.transport is not None and not self._closing:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self._closing:
            self.paused = False
            self._last_received = self.loop.time()  # we were not listening
            self.transport.resume_reading()

    # -- keep alive ------------------------------------------------------------------------
    def _schedule_tick(self) -> None:
        if self.keepalive_s > 0:
            self._timer = self.loop.call_later(self.keepalive_s / 2, self._tick)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        self._timer = None
        if self._closing or self.transport is None:
            return
        if self.paused:
            self._last_received = self.loop.time()  # silent because we stopped listening
        silent_s = self.loop.time() - self._last_received
        if silent_s > 1.5 * self.keepalive_s:
            log.warning(
                "MQTT: nothing from %s for %.0fs; reconnecting", self.source._where(), silent_s
            )
            self._closing = True
            self._clear_events()
            self.transport.abort()  # a dead peer would never take a DISCONNECT
            return
        if self.connack_received:
            self.transport.write(mqtt_wire.PINGREQ_PACKET)
        self._schedule_tick()
