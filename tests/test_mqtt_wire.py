"""`ingest.mqtt_wire`: MQTT v5 packets to and from bytes, without a broker."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingest import mqtt_wire as wire
from ingest.mqtt_wire import (
    Connack,
    Disconnect,
    MalformedPacket,
    OtherPacket,
    Packet,
    Pingresp,
    Publish,
    Suback,
)

# --------------------------------------------------------------------------- helpers


@dataclass
class ConnectFields:
    protocol: str
    level: int
    flags: int
    keepalive: int
    properties: dict[int, wire.PropertyValue]
    client_id: str
    username: str | None
    password: bytes | None


def decode_connect(packet: bytes) -> ConnectFields:
    """CONNECT back into its fields (a client packet: the wire module never parses it)."""
    assert packet[0] == 0x10
    length, start = wire.decode_varint(packet, 1)
    assert start + length == len(packet), "remaining length covers exactly the packet"
    protocol, pos = wire._read_string(packet, start, len(packet), "protocol name")
    level, flags = packet[pos], packet[pos + 1]
    keepalive = int.from_bytes(packet[pos + 2 : pos + 4], "big")
    properties, pos = wire.read_properties(packet, pos + 4, len(packet))
    client_id, pos = wire._read_string(packet, pos, len(packet), "client id")
    username = password = None
    if flags & 0x80:
        username, pos = wire._read_string(packet, pos, len(packet), "username")
    if flags & 0x40:
        password, pos = wire._read_binary(packet, pos, len(packet), "password")
    assert pos == len(packet)
    return ConnectFields(
        protocol, level, flags, keepalive, properties, client_id, username, password
    )


def feed(chunks: list[bytes]) -> list[Packet]:
    """Parse `chunks` the way the source does: one buffer, consumed prefix deleted once."""
    buffer = bytearray()
    packets: list[Packet] = []
    for chunk in chunks:
        buffer += chunk
        parsed, consumed = wire.parse_packets(buffer)
        del buffer[:consumed]
        packets += parsed
    assert not buffer, f"{len(buffer)} bytes left unparsed"
    return packets


# --------------------------------------------------------------------------- varints


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 1),
        (127, 1),
        (128, 2),
        (16383, 2),
        (16384, 3),
        (2097151, 3),
        (2097152, 4),
        (268435455, 4),
    ],
)
def test_varint_edges(value: int, size: int) -> None:
    encoded = wire.encode_varint(value)
    assert len(encoded) == size
    assert wire.decode_varint(encoded, 0) == (value, size)
    # A prefix of it is "incomplete", never a wrong value.
    for cut in range(size):
        assert wire.decode_varint(encoded[:cut], 0) == (-1, 0)


def test_varint_known_bytes() -> None:
    assert wire.encode_varint(0) == b"\x00"
    assert wire.encode_varint(321) == b"\xc1\x02"  # the spec's example
    assert wire.encode_varint(268435455) == b"\xff\xff\xff\x7f"


@pytest.mark.parametrize("value", [-1, 268435456])
def test_varint_out_of_range_is_refused(value: int) -> None:
    with pytest.raises(ValueError, match="outside"):
        wire.encode_varint(value)


def test_a_five_byte_varint_is_malformed() -> None:
    with pytest.raises(MalformedPacket, match="longer than 4 bytes"):
        wire.decode_varint(b"\xff\xff\xff\xff\x01", 0)


@given(st.integers(0, wire.MAX_VARINT), st.binary(max_size=3))
def test_varint_round_trip(value: int, prefix: bytes) -> None:
    encoded = prefix + wire.encode_varint(value) + b"\x99"
    assert wire.decode_varint(encoded, len(prefix)) == (value, len(encoded) - 1)


# --------------------------------------------------------------------------- properties

_property_values = st.one_of(
    st.tuples(st.just(0x01), st.integers(0, 1)),  # payload format indicator
    st.tuples(st.just(0x02), st.integers(0, 2**32 - 1)),  # message expiry
    st.tuples(st.just(0x03), st.text(max_size=20)),  # content type
    st.tuples(st.just(0x08), st.text(min_size=1, max_size=20)),  # response topic
    st.tuples(st.just(0x09), st.binary(max_size=20)),  # correlation data
    st.tuples(st.just(0x0B), st.integers(1, wire.MAX_VARINT)),  # subscription identifier
    st.tuples(st.just(0x23), st.integers(1, 0xFFFF)),  # topic alias
    st.tuples(st.just(0x26), st.tuples(st.text(max_size=10), st.text(max_size=10))),
)


@given(st.lists(_property_values, max_size=6))
def test_properties_round_trip(properties: list[tuple[int, wire.PropertyValue]]) -> None:
    encoded = wire.encode_properties(properties)
    found, end = wire.read_properties(encoded, 0, len(encoded))
    assert end == len(encoded)
    assert found == dict(properties)  # the last of a repeated identifier wins


def test_properties_match_paho() -> None:
    theirs = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    theirs.MessageExpiryInterval = 3600
    theirs.ContentType = "application/json"
    theirs.UserProperty = ("k", "v")
    ours = wire.encode_properties([(0x02, 3600), (0x03, "application/json"), (0x26, ("k", "v"))])
    assert ours == theirs.pack()  # type: ignore[no-untyped-call]


# --------------------------------------------------------------------------- PUBLISH

_topics = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    min_size=1,
    max_size=40,
)


@given(
    topic=_topics,
    payload=st.binary(max_size=300),
    qos=st.integers(0, 2),
    packet_id=st.integers(1, 0xFFFF),
    dup=st.booleans(),
    retain=st.booleans(),
    properties=st.lists(_property_values, max_size=4),
)
def test_publish_round_trip(
    topic: str,
    payload: bytes,
    qos: int,
    packet_id: int,
    dup: bool,
    retain: bool,
    properties: list[tuple[int, wire.PropertyValue]],
) -> None:
    dup = dup and qos > 0
    packet_id = packet_id if qos else 0
    encoded = wire.publish(
        topic, payload, qos=qos, packet_id=packet_id, dup=dup, retain=retain, properties=properties
    )
    packets, consumed = wire.parse_packets(encoded)
    assert consumed == len(encoded)
    assert packets == [Publish(topic, payload, qos, packet_id, dup, retain)]
    assert type(packets[0].payload) is bytes


def test_publish_known_bytes() -> None:
    # QoS 1, retain, topic "a/b", packet id 10, no properties, payload "hi"
    raw = bytes([0x33, 10, 0, 3]) + b"a/b" + bytes([0, 10, 0]) + b"hi"
    assert wire.publish("a/b", b"hi", qos=1, packet_id=10, retain=True) == raw
    assert wire.parse_packets(raw) == ([Publish("a/b", b"hi", 1, 10, False, True)], len(raw))


def _sample_stream(big_payload: bool = True) -> tuple[bytes, list[Packet]]:
    """Packets of every kind, with one-, two- and (big_payload) three-byte remaining lengths."""
    big = bytes(range(256)) * (80 if big_payload else 1)  # 20 KiB: three-byte remaining length
    parts: list[tuple[bytes, Packet]] = [
        (wire.connack(0, session_present=True, properties=[(0x13, 20), (0x21, 100)]),
         Connack(True, 0, server_keep_alive=20)),
        (wire.suback(1, [1, 1, 0x87]), Suback(1, (1, 1, 0x87))),
        (wire.publish("p/dev/s-1/telemetry", b'{"smoke": 1}', qos=1, packet_id=7),
         Publish("p/dev/s-1/telemetry", b'{"smoke": 1}', 1, 7)),
        (wire.publish("p/ü", b"x" * 200, qos=1, packet_id=8, dup=True,
                      properties=[(0x02, 60), (0x26, ("k", "v")), (0x0B, 300)]),
         Publish("p/ü", b"x" * 200, 1, 8, True, False)),
        (wire.publish("p/big", big, qos=0), Publish("p/big", big, 0, 0)),
        (b"\xd0\x00", Pingresp()),
        (b"\x40\x02\x00\x05", OtherPacket(wire.PUBACK, 0, b"\x00\x05")),
        (wire.disconnect(0x8B), Disconnect(0x8B)),
        (wire.disconnect(0), Disconnect(0)),
    ]  # fmt: skip
    return b"".join(raw for raw, _ in parts), [packet for _, packet in parts]


def test_several_packets_in_one_chunk() -> None:
    stream, expected = _sample_stream()
    packets, consumed = wire.parse_packets(bytearray(stream))
    assert consumed == len(stream)
    assert packets == expected


def test_a_trailing_partial_packet_is_left_for_later() -> None:
    first = wire.publish("a", b"1", qos=1, packet_id=1)
    second = wire.publish("b", b"2" * 300, qos=1, packet_id=2)
    data = first + second[:-1]
    packets, consumed = wire.parse_packets(data)
    assert (packets, consumed) == ([Publish("a", b"1", 1, 1)], len(first))
    assert wire.first_packet_size(data[consumed:]) == len(second)
    assert wire.first_packet_size(second[:2]) is None  # remaining length not complete yet
    assert wire.first_packet_size(b"") is None


def test_a_stream_split_at_every_byte_boundary_parses_identically() -> None:
    stream, expected = _sample_stream()
    for cut in range(len(stream) + 1):
        assert feed([stream[:cut], stream[cut:]]) == expected, f"split at {cut}"


def test_a_publish_split_at_every_pair_of_boundaries_parses_identically() -> None:
    packet = wire.publish(
        "p/dev/a/telemetry", b"y" * 150, qos=1, packet_id=513, properties=[(0x02, 9)]
    )
    expected = [Publish("p/dev/a/telemetry", b"y" * 150, 1, 513)]
    for first in range(len(packet) + 1):
        for second in range(first, len(packet) + 1, 7):
            chunks = [packet[:first], packet[first:second], packet[second:]]
            assert feed(chunks) == expected, (first, second)


def test_byte_by_byte() -> None:
    stream, expected = _sample_stream(big_payload=False)
    assert feed([bytes([b]) for b in stream]) == expected


@given(st.lists(st.integers(0, 400), max_size=8))
def test_random_chunking(cuts: list[int]) -> None:
    stream, expected = _sample_stream(big_payload=False)
    points = sorted({min(c, len(stream)) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert feed(chunks) == expected


def test_parsing_many_small_publishes() -> None:
    """What the hot path sees: thousands of small QoS-1 PUBLISHes in 64 KiB chunks.

    Not timed (the suite runs on loaded machines); on the development machine this loop
    runs at ~750,000 PUBLISH/s (`python -m timeit`-style measurement in the report).
    """
    count = 20_000
    stream = b"".join(
        wire.publish(f"p/dev/s-{i % 50}/telemetry", b'{"seq": %d}' % i, qos=1,
                     packet_id=i % 0xFFFF + 1)
        for i in range(count)
    )  # fmt: skip
    chunks = [stream[i : i + 65536] for i in range(0, len(stream), 65536)]
    packets = feed(chunks)
    assert len(packets) == count
    assert all(isinstance(p, Publish) and p.qos == 1 for p in packets)
    assert packets[12345] == Publish("p/dev/s-45/telemetry", b'{"seq": 12345}', 1, 12346)


# --------------------------------------------------------------------------- other packets


def test_connack_fields() -> None:
    raw = wire.connack(
        0x87, properties=[(0x1F, "go away"), (0x13, 5), (0x12, "assigned"), (0x26, ("a", "b"))]
    )
    (connack,), _ = wire.parse_packets(raw)
    assert connack == Connack(False, 0x87, server_keep_alive=5, reason_string="go away")
    assert isinstance(connack, Connack)
    assert connack.failed
    assert not Connack(True, 0).failed
    # A v3.1.1-shaped CONNACK (no property length) is accepted too.
    assert wire.parse_packets(b"\x20\x02\x01\x00")[0] == [Connack(True, 0)]


def test_suback_and_disconnect_fields() -> None:
    suback = wire.suback(300, [0, 1, 0x80])
    assert wire.parse_packets(suback)[0] == [Suback(300, (0, 1, 0x80))]
    raw = bytes([0xE0]) + bytes([1]) + b"\x9c"  # reason only, no properties
    assert wire.parse_packets(raw)[0] == [Disconnect(0x9C)]
    props = wire.encode_properties([(0x1F, "shutting down"), (0x1C, "other:1883")])
    raw = bytes([0xE0, 1 + len(props), 0x8B]) + props
    assert wire.parse_packets(raw)[0] == [Disconnect(0x8B, "shutting down", "other:1883")]


def test_unexpected_but_valid_packets_come_back_as_other() -> None:
    packets, _ = wire.parse_packets(b"\x62\x02\x00\x01" + b"\xb0\x03\x00\x02\x00")
    assert packets == [
        OtherPacket(wire.PUBREL, 2, b"\x00\x01"),
        OtherPacket(11, 0, b"\x00\x02\x00"),
    ]
    assert isinstance(packets[0], OtherPacket)
    assert packets[0].name == "PUBREL"


# --------------------------------------------------------------------------- client packets


def test_connect_fields() -> None:
    raw = wire.connect(
        "ingest-1",
        keepalive_s=30,
        clean_start=False,
        session_expiry_s=7 * 24 * 3600,
        receive_maximum=2000,
        username="gw",
        password="sécret",
    )
    fields = decode_connect(raw)
    assert fields == ConnectFields(
        protocol="MQTT",
        level=5,
        flags=0xC0,  # username, password; clean start off; no will
        keepalive=30,
        properties={0x11: 604800, 0x21: 2000},
        client_id="ingest-1",
        username="gw",
        password="sécret".encode(),
    )


def test_connect_known_bytes() -> None:
    raw = wire.connect(
        "c", keepalive_s=30, clean_start=True, session_expiry_s=0, receive_maximum=10
    )
    assert raw == (
        b"\x10\x16\x00\x04MQTT\x05\x02\x00\x1e\x08\x11\x00\x00\x00\x00\x21\x00\x0a\x00\x01c"
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"receive_maximum": 0}, "receive maximum"), ({"receive_maximum": 65536}, "receive maximum"),
     ({"keepalive_s": 65536}, "keep alive"), ({"session_expiry_s": 2**32}, "session expiry")],
)  # fmt: skip
def test_connect_refuses_out_of_range_values(kwargs: dict[str, int], match: str) -> None:
    values = {"keepalive_s": 30, "session_expiry_s": 0, "receive_maximum": 10} | kwargs
    with pytest.raises(ValueError, match=match):
        wire.connect("c", clean_start=False, **values)


def test_subscribe_bytes() -> None:
    raw = wire.subscribe(1, ["a/+", "b/#"])
    assert raw == b"\x82\x0f\x00\x01\x00\x00\x03a/+\x01\x00\x03b/#\x01"
    with pytest.raises(ValueError, match="at least one"):
        wire.subscribe(1, [])
    with pytest.raises(ValueError, match="packet identifier"):
        wire.subscribe(0, ["a"])


def test_puback_batch_is_one_buffer_of_four_byte_packets() -> None:
    ids = [1, 2, 255, 256, 65535]
    raw = wire.puback(ids)
    assert len(raw) == 4 * len(ids)
    assert raw[:8] == b"\x40\x02\x00\x01\x40\x02\x00\x02"
    packets, consumed = wire.parse_packets(raw)  # PUBACK parses as "other" on our side
    assert consumed == len(raw)
    assert [int.from_bytes(p.body, "big") for p in packets if isinstance(p, OtherPacket)] == ids
    assert wire.puback([]) == b""


def test_pingreq_and_disconnect() -> None:
    assert wire.pingreq() == b"\xc0\x00"
    assert wire.disconnect() == b"\xe0\x00"
    assert wire.disconnect(0x81) == b"\xe0\x02\x81\x00"
    assert wire.parse_packets(wire.disconnect(0x81))[0] == [Disconnect(0x81)]


def test_reason_names() -> None:
    assert wire.reason_name(0x87) == "0x87 (not authorized)"
    assert wire.reason_name(0x7E) == "0x7E (unknown reason)"


# --------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"\x30\xff\xff\xff\xff\x01", "longer than 4 bytes"),
        (b"\x32\x05\x00\x09abc", "topic length runs past"),
        (b"\x30\x01\x00", "no room for a topic"),
        (b"\x30\x03\x00\x00\x00", "empty topic"),
        (b"\x30\x04\x00\x01a\x05", "property length 5 runs past"),
        (b"\x30\x04\x00\x01a\xff", "truncated variable byte integer"),
        (b"\x30\x03\x00\x01a", "without a property length"),
        (b"\x32\x06\x00\x01a\x00\x00\x00", "without a packet identifier"),
        (b"\x32\x04\x00\x01a\x00", "without a packet identifier"),
        (b"\x36\x06\x00\x01a\x00\x01\x00", "QoS 3"),
        (b"\x38\x04\x00\x01a\x00", "QoS 0 PUBLISH with the DUP flag"),
        (b"\x30\x05\x00\x02\xc3\x28\x00", "not valid UTF-8"),
        (b"\x00\x00", "reserved"),
        (b"\x10\x00", "CONNECT is never sent to a client"),
        (b"\xc0\x00", "PINGREQ is never sent to a client"),
        (b"\xd0\x01\x00", "PINGRESP with a 1-byte body"),
        (b"\xd1\x00", "reserved fixed-header flags"),
        (b"\x20\x01\x00", "CONNACK of 1 bytes"),
        (b"\x20\x03\x02\x00\x00", "reserved acknowledge flags"),
        (b"\x20\x04\x00\x00\x00\x00", "1 bytes after its properties"),
        (b"\x20\x05\x00\x00\x02\x7f\x00", "unknown property identifier 0x7F"),
        (b"\x20\x05\x00\x00\x02\x13\x00", "property 0x13 runs past"),
        (b"\x20\x06\x00\x00\x03\x1f\x00\x05", "5 bytes run past the packet's end"),
        (b"\x20\x07\x00\x00\x04\x1f\x00\x01\xff", "not valid UTF-8"),
        (b"\x90\x03\x00\x01\x00", "SUBACK without reason codes"),
        (b"\x90\x02\x00\x01", "SUBACK of 2 bytes"),
    ],
)
def test_malformed_packets_raise_a_clear_error(raw: bytes, match: str) -> None:
    with pytest.raises(MalformedPacket, match=match):
        wire.parse_packets(raw)


def test_a_malformed_packet_after_good_ones_still_raises() -> None:
    good = wire.publish("a", b"1", qos=1, packet_id=1)
    with pytest.raises(MalformedPacket):
        wire.parse_packets(good + b"\x00\x00")


@given(st.binary(max_size=64))
def test_arbitrary_bytes_parse_or_raise_malformed(data: bytes) -> None:
    try:
        packets, consumed = wire.parse_packets(data)
    except MalformedPacket:
        return
    assert 0 <= consumed <= len(data)
    assert all(isinstance(p, Packet) for p in packets)
