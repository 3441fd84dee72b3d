"""`ingest.mqtt_source.MqttSource` against the suite's real Mosquitto, a private one that is
restarted, and fake TCP peers that misbehave. paho-mqtt publishes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gridwarden.embedded import EmbeddedMosquitto, free_port
from gridwarden.mqtt_url import parse_mqtt_url
from ingest import mqtt_source
from ingest import mqtt_wire as wire
from ingest.decode import RawMessage
from ingest.mqtt_source import MqttSource
from tests.test_mqtt_wire import decode_connect

WAIT_S = 15.0
Message = tuple[str, bytes, int]  # topic, payload, qos


# --------------------------------------------------------------------------- helpers


def _publish_sync(mqtt_url: str, messages: Sequence[Message]) -> None:
    endpoint = parse_mqtt_url(mqtt_url)
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"pub-{uuid.uuid4().hex[:8]}",
        protocol=paho.MQTTv5,
    )
    client.connect(endpoint.host, endpoint.port)
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=qos) for topic, payload, qos in messages]
        for info in infos:
            info.wait_for_publish(WAIT_S)
            assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


async def publish(mqtt_url: str, messages: Sequence[Message]) -> None:
    """Publish in order from a paho client (in a thread); returns once the broker has them."""
    await asyncio.to_thread(_publish_sync, mqtt_url, messages)


async def started(source: MqttSource) -> MqttSource:
    source.start()
    assert await asyncio.to_thread(source.subscribed.wait, WAIT_S), "never subscribed"
    return source


async def take_n(source: MqttSource, count: int) -> list[RawMessage]:
    got: list[RawMessage] = []
    async with asyncio.timeout(WAIT_S):
        while len(got) < count:
            got += await source.take(count - len(got), 0.05)
    return got


async def nothing_more(source: MqttSource, settle_s: float = 0.5) -> None:
    await asyncio.sleep(settle_s)
    assert source.depth() == 0


async def until(condition: Callable[[], bool], within_s: float = WAIT_S) -> None:
    async with asyncio.timeout(within_s):
        while not condition():  # noqa: ASYNC110 - the conditions are other objects' state
            await asyncio.sleep(0.02)


@pytest.fixture
async def make_source(mqtt_url: str, topic_prefix: str) -> AsyncIterator[Callable[..., MqttSource]]:
    made: list[MqttSource] = []

    def make(receive_maximum: int = 100, **kwargs: Any) -> MqttSource:
        kwargs.setdefault("url", mqtt_url)
        kwargs.setdefault("client_id", f"sub-{topic_prefix}")
        kwargs.setdefault("topics", [f"{topic_prefix}/#"])
        source = MqttSource(receive_maximum=receive_maximum, **kwargs)
        made.append(source)
        return source

    yield make
    for source in made:
        source.stop()
    await closed(*made)


async def closed(*sources: MqttSource) -> None:
    """Wait until stop()'s graceful close has finished: no transport left open."""
    lost = [s._stopped_connection.lost for s in sources if s._stopped_connection is not None]
    async with asyncio.timeout(mqtt_source.STOP_GRACE_S + 1):
        await asyncio.gather(*lost)


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What reaches the event loop's exception handler during the test (must stay empty)."""
    loop = asyncio.get_running_loop()  # the tests' loop (not whatever get_event_loop finds)
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    loop.set_exception_handler(previous)


@pytest.fixture
def fast_reconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mqtt_source, "RECONNECT_MIN_S", 0.05)
    monkeypatch.setattr(mqtt_source, "RECONNECT_MAX_S", 0.2)


# --------------------------------------------------------------------------- the real broker


class _RecordingTransport:
    """Notes every write, then passes it on (uvloop's transport attributes are read-only)."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        self.transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


async def test_messages_arrive_in_order_and_acked_ones_are_not_redelivered(
    make_source: Callable[..., MqttSource],
    mqtt_url: str,
    topic_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = await started(make_source())
    assert source.is_connected()
    assert source.generation == 1
    sent = [(f"{topic_prefix}/dev/d{i % 3}/telemetry", b'{"seq": %d}' % i, 1) for i in range(30)]
    sent.append((f"{topic_prefix}/dev/d0/status", b"online", 0))
    await publish(mqtt_url, sent)

    got = await take_n(source, len(sent))
    # In order within a QoS (MQTT orders nothing across QoS levels).
    assert [(m.topic, m.payload, m.qos) for m in got if m.qos] == sent[:-1]
    assert [(m.topic, m.payload, m.qos) for m in got if not m.qos] == sent[-1:]
    assert {m.generation for m in got} == {1}
    assert all(m.received_at.tzinfo is UTC for m in got)
    assert len({m.mid for m in got if m.qos}) == 30

    connection = source._connection
    assert connection is not None
    assert connection.transport is not None
    recorder = _RecordingTransport(connection.transport)
    monkeypatch.setattr(connection, "transport", recorder)
    assert source.ack(got) == 30  # the QoS 0 one needs none
    # ONE write for the batch
    assert recorder.writes == [wire.puback([m.mid for m in got if m.qos])]

    source.stop()
    assert not source.is_connected()
    await started(source)
    assert source.generation == 2
    await publish(mqtt_url, [(f"{topic_prefix}/marker", b"marker", 1)])
    first = await take_n(source, 1)
    assert [(m.topic, m.payload) for m in first] == [(f"{topic_prefix}/marker", b"marker")]
    await nothing_more(source)


async def test_the_socket_is_read_a_bounded_chunk_at_a_time_packets_spanning_reads(
    make_source: Callable[..., MqttSource],
    mqtt_url: str,
    topic_prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each event-loop callback parses at most READ_BYTES (one of 256 KiB, asyncio's
    default, held the loop 10-90 ms), and a packet split between reads arrives whole."""
    monkeypatch.setattr(mqtt_source, "READ_BYTES", 100)
    source = make_source(receive_maximum=200)
    reads: list[int] = []
    original = mqtt_source._Connection.buffer_updated

    def buffer_updated(self: Any, nbytes: int) -> None:
        reads.append(nbytes)
        original(self, nbytes)

    monkeypatch.setattr(mqtt_source._Connection, "buffer_updated", buffer_updated)
    await started(source)
    sent = [
        (f"{topic_prefix}/dev/d{i % 3}/telemetry", b'{"seq": %d, "pad": "%s"}' % (i, b"x" * i), 1)
        for i in range(60)
    ]
    await publish(mqtt_url, sent)
    got = await take_n(source, len(sent))
    assert [(m.topic, m.payload) for m in got] == [(t, p) for t, p, _ in sent]
    assert max(reads) <= 100
    assert len(reads) > sum(len(p) for _, p, _ in sent) // 100


async def test_unacked_messages_come_again_on_the_next_connection_and_old_acks_are_skipped(
    make_source: Callable[..., MqttSource], mqtt_url: str, topic_prefix: str
) -> None:
    source = await started(make_source())
    sent = [(f"{topic_prefix}/dev/d1/event", b"%d" % i, 1) for i in range(5)]
    await publish(mqtt_url, sent)
    first = await take_n(source, 5)
    assert {m.generation for m in first} == {1}

    source.stop()  # not acked: the session keeps them in flight
    await started(source)
    again = await take_n(source, 5)
    assert [m.payload for m in again] == [m.payload for m in first]
    assert {m.generation for m in again} == {2}
    assert source.ack(first) == 0  # the older connection's: skipped, never misattributed
    assert source.ack(again) == 5

    source.stop()
    await started(source)
    await publish(mqtt_url, [(f"{topic_prefix}/marker", b"marker", 1)])
    assert [m.payload for m in await take_n(source, 1)] == [b"marker"]
    await nothing_more(source)


async def test_receive_maximum_bounds_what_is_held_unacknowledged(
    make_source: Callable[..., MqttSource], mqtt_url: str, topic_prefix: str
) -> None:
    source = await started(make_source(receive_maximum=10))
    sent = [(f"{topic_prefix}/dev/d2/telemetry", b"%d" % i, 1) for i in range(50)]
    await publish(mqtt_url, sent)
    await until(lambda: source.depth() == 10)
    await asyncio.sleep(0.5)
    assert source.depth() == 10  # the other 40 wait in the broker

    received: list[RawMessage] = []
    async with asyncio.timeout(WAIT_S):
        while len(received) < 50:
            batch = await source.take(7, 0.05)
            received += batch
            source.ack(batch)
    assert [m.payload for m in received] == [payload for _, payload, _ in sent]
    await nothing_more(source)


async def test_held_messages_stay_bounded_after_acks(
    make_source: Callable[..., MqttSource], mqtt_url: str, topic_prefix: str
) -> None:
    # Mosquitto 2.0.x releases up to Receive Maximum *more* messages on each PUBACK of the
    # oldest in flight (here ~60 more per round of 7 acks, round after round: 73, 136,
    # 199...), so what is held would grow with the backlog; we stop reading the socket
    # while Receive Maximum messages wait, so it stays bounded: by that, plus one socket
    # read of at most 256 KiB (~260 of these 1 KiB messages).
    source = await started(make_source(receive_maximum=10))
    body = b"x" * 1000
    sent = [(f"{topic_prefix}/dev/d2/telemetry", b"%d" % i + body, 1) for i in range(3000)]
    await publish(mqtt_url, sent)
    await until(lambda: source.depth() == 10)
    for _ in range(10):
        source.ack(await source.take(7, 0))
        await asyncio.sleep(0.2)
        assert source.depth() <= 10 + 262
    received: list[RawMessage] = []
    async with asyncio.timeout(WAIT_S * 3):
        while len(received) < 3000 - 70:
            batch = await source.take(500, 0.05)
            received += batch
            source.ack(batch)
            assert source.depth() <= 10 + 262
    assert len({m.payload for m in received}) == len(received)


async def test_stop_before_the_broker_answers_and_restart_are_clean(
    make_source: Callable[..., MqttSource],
) -> None:
    source = make_source()
    source.start()
    source.stop()  # the connect is still in progress: cancelled, nothing leaks
    source.stop()  # idempotent
    await started(source)
    assert source.generation == 1


# --------------------------------------------------------------------------- a broker restart


async def test_a_broker_restart_is_survived_and_the_session_resumes(
    services_root: Path, topic_prefix: str, fast_reconnect: None, caplog: pytest.LogCaptureFixture
) -> None:
    broker = EmbeddedMosquitto(services_root / f"own-{uuid.uuid4().hex[:8]}", anonymous=True)
    await asyncio.to_thread(broker.start)
    source = MqttSource(broker.url, f"sub-{topic_prefix}", [f"{topic_prefix}/#"], 100)
    try:
        await started(source)
        await publish(broker.url, [(f"{topic_prefix}/a", b"%d" % i, 1) for i in range(3)])
        before = await take_n(source, 3)  # in flight, not acked

        await asyncio.to_thread(broker.restart)  # SIGTERM: persistence saved on the way out
        await until(lambda: source.generation == 2 and source.subscribed.is_set())
        assert source.is_connected()

        again = await take_n(source, 3)  # the resumed session redelivers them
        assert [m.payload for m in again] == [m.payload for m in before]
        assert source.ack(before) == 0
        assert source.ack(again) == 3
        await publish(broker.url, [(f"{topic_prefix}/a", b"after", 1)])
        after = await take_n(source, 1)
        assert [(m.payload, m.generation) for m in after] == [(b"after", 2)]
        assert source.ack(after) == 1
    finally:
        source.stop()
        await asyncio.to_thread(broker.stop)
    assert "MQTT connection to" in caplog.text  # the loss was logged, not raised


async def test_no_broker_at_all_is_retried_with_a_warning_per_attempt(
    make_source: Callable[..., MqttSource],
    fast_reconnect: None,
    caplog: pytest.LogCaptureFixture,
    loop_errors: list[dict[str, Any]],
) -> None:
    source = make_source(url=f"mqtt://127.0.0.1:{free_port()}")
    source.start()
    await until(lambda: caplog.text.count("failed: ") >= 3)
    assert not source.is_connected()
    assert all(r.levelno == logging.WARNING for r in caplog.records if "failed: " in r.message)
    source.stop()
    assert not loop_errors


# --------------------------------------------------------------------------- fake peers


class FakePeer:
    """A TCP server that answers the first bytes a client sends with `reply`, records
    everything received per connection, and hangs up at once when `reply` is None."""

    def __init__(self, reply: bytes | None) -> None:
        self.reply = reply
        self.received: list[bytearray] = []
        self._handlers: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def connections(self) -> int:
        return len(self.received)

    def url(self, scheme: str = "mqtt", userinfo: str = "") -> str:
        return f"{scheme}://{userinfo}127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        data = bytearray()
        self.received.append(data)
        try:
            if self.reply is not None:
                data += await reader.read(65536)
                writer.write(self.reply)
                while chunk := await reader.read(65536):
                    data += chunk
        except OSError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


@contextlib.asynccontextmanager
async def fake_peer(reply: bytes | None) -> AsyncIterator[FakePeer]:
    peer = FakePeer(reply)
    await peer.start()
    try:
        yield peer
    finally:
        await peer.stop()


def first_packet(data: bytes | bytearray) -> bytes:
    size = wire.first_packet_size(data)
    assert size is not None
    return bytes(data[:size])


ACCEPT = wire.connack(0) + wire.suback(1, [1])


@pytest.mark.parametrize(
    ("reply", "logged", "last_sent"),
    [
        pytest.param(b"\x00\x00\xff\xff", "malformed packet", wire.disconnect(0x81), id="garbage"),
        pytest.param(
            b"\x20\xff\xff\xff\xff\xff", "longer than 4 bytes", wire.disconnect(0x81), id="varint"
        ),
        pytest.param(
            ACCEPT + wire.publish("t/x", b"p", qos=2, packet_id=1),
            "QoS 2 PUBLISH",
            wire.disconnect(0x9B),
            id="qos2",
        ),
        pytest.param(
            ACCEPT + b"\x32\x05\x00\x09abc",  # the topic length runs past the packet
            "topic length runs past",
            wire.disconnect(0x81),
            id="lying-length",
        ),
        pytest.param(
            wire.publish("t/x", b"p", qos=1, packet_id=1), "before CONNACK", None, id="no-connack"
        ),
        pytest.param(
            wire.connack(0x87, properties=[(0x1F, "who are you")]),
            "refused: 0x87 (not authorized) (who are you)",
            None,
            id="refused",
        ),
        pytest.param(
            ACCEPT + wire.disconnect(0x8B),
            "disconnected us: 0x8B (server shutting down)",
            None,
            id="server-disconnect",
        ),
        pytest.param(ACCEPT + b"\x40\x02\x00\x01", "unexpected PUBACK", None, id="puback"),
        pytest.param(None, " lost: ", None, id="hangs-up"),
    ],
)
async def test_a_misbehaving_peer_is_logged_and_reconnected_to(
    make_source: Callable[..., MqttSource],
    fast_reconnect: None,
    caplog: pytest.LogCaptureFixture,
    loop_errors: list[dict[str, Any]],
    reply: bytes | None,
    logged: str,
    last_sent: bytes | None,
) -> None:
    caplog.set_level(logging.INFO, logger="ingest.mqtt_source")
    async with fake_peer(reply) as peer:
        source = make_source(url=peer.url(), topics=["t/#"])
        source.start()
        await until(lambda: peer.connections >= 3 and logged in caplog.text)
        task = source._task
        assert task is not None
        assert not task.done()  # still trying, never crashed
        source.stop()
        await asyncio.sleep(0.05)
        if last_sent is not None:
            assert bytes(peer.received[0]).endswith(last_sent)
    assert not loop_errors
    assert not [r for r in caplog.records if r.exc_info], "no traceback for a peer's fault"


async def test_connect_carries_the_session_settings_and_a_refused_topic_is_named(
    make_source: Callable[..., MqttSource], caplog: pytest.LogCaptureFixture
) -> None:
    topics = ["t/dev/+/telemetry", "t/dev/+/secret"]
    async with fake_peer(wire.connack(0, session_present=True) + wire.suback(1, [1, 0x87])) as peer:
        source = make_source(
            url=peer.url(userinfo="gw:p%40ss@"),
            client_id="ingest-x",
            topics=topics,
            receive_maximum=100_000,
        )
        source.start()
        await until(lambda: "subscription refused" in caplog.text)
        assert source.is_connected()
        assert not source.subscribed.is_set()
        assert "t/dev/+/secret (0x87 (not authorized))" in caplog.text
        assert "telemetry" not in caplog.text.split("subscription refused")[1]
        source.stop()
        await until(lambda: bytes(peer.received[0]).endswith(wire.disconnect(0)))

    sent = bytes(peer.received[0])
    connect = decode_connect(first_packet(sent))
    assert (connect.protocol, connect.level, connect.keepalive) == ("MQTT", 5, 30)
    assert connect.flags == 0xC0  # username, password, clean start OFF, no will
    assert connect.properties == {0x11: 7 * 24 * 3600, 0x21: 65535}
    assert (connect.client_id, connect.username, connect.password) == ("ingest-x", "gw", b"p@ss")
    rest = sent[len(first_packet(sent)) :]
    assert rest == wire.subscribe(1, topics, 0x01) + wire.disconnect(0)


async def test_pings_follow_the_server_keep_alive_and_a_silent_peer_is_dropped(
    make_source: Callable[..., MqttSource],
    fast_reconnect: None,
    caplog: pytest.LogCaptureFixture,
    loop_errors: list[dict[str, Any]],
) -> None:
    # CONNACK sets Server Keep Alive = 1 s: PINGREQ every 0.5 s; the peer never answers
    # them, so after 1.5 s of silence the source drops the connection and reconnects.
    reply = wire.connack(0, properties=[(wire.SERVER_KEEP_ALIVE, 1)]) + wire.suback(1, [1])
    async with fake_peer(reply) as peer:
        source = make_source(url=peer.url(), topics=["t/#"])
        source.start()
        await until(lambda: peer.connections >= 2, within_s=6)
        source.stop()
    first = bytes(peer.received[0])
    after_connect = first[len(first_packet(first)) :]
    assert after_connect.startswith(wire.subscribe(1, ["t/#"]) + wire.pingreq() + wire.pingreq())
    assert "nothing from 127.0.0.1" in caplog.text
    assert not loop_errors


async def test_a_tls_url_speaks_tls(
    make_source: Callable[..., MqttSource],
    fast_reconnect: None,
    caplog: pytest.LogCaptureFixture,
    loop_errors: list[dict[str, Any]],
) -> None:
    async with fake_peer(b"not a TLS server\r\n") as peer:
        source = make_source(url=peer.url("mqtts"), topics=["t/#"])
        source.start()
        await until(lambda: peer.connections >= 2)
        source.stop()
    assert peer.received[0][:1] == b"\x16"  # a TLS handshake record: ClientHello
    assert "failed: " in caplog.text
    assert not loop_errors
