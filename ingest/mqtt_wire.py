"""MQTT v5 packets as bytes, for `ingest.mqtt_source`. Pure: no I/O, no state.

Only what a QoS-1 subscriber needs: the packets it sends (CONNECT, SUBSCRIBE, PUBACK,
PINGREQ, DISCONNECT) and an incremental parser for the packets a broker sends it
(CONNACK, PUBLISH, SUBACK, PINGRESP, DISCONNECT; the rest come back as `OtherPacket`
for the caller to refuse). The server-side encoders (`publish`, `connack`, `suback`)
exist for tests and fake brokers.

`parse_packets` is the hot path: one call parses every complete packet in a chunk by
moving an offset and returns how many bytes it consumed, so the caller deletes the
consumed prefix of its buffer once. A PUBLISH costs a few attribute-free integer reads,
two slices and one UTF-8 decode; its properties are skipped by their length.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Control packet types (the high nibble of the first byte).
CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14
AUTH = 15

PACKET_NAMES = {
    0: "reserved(0)", CONNECT: "CONNECT", CONNACK: "CONNACK", PUBLISH: "PUBLISH",
    PUBACK: "PUBACK", PUBREC: "PUBREC", PUBREL: "PUBREL", PUBCOMP: "PUBCOMP",
    SUBSCRIBE: "SUBSCRIBE", SUBACK: "SUBACK", UNSUBSCRIBE: "UNSUBSCRIBE",
    UNSUBACK: "UNSUBACK", PINGREQ: "PINGREQ", PINGRESP: "PINGRESP",
    DISCONNECT: "DISCONNECT", AUTH: "AUTH",
}  # fmt: skip

MAX_VARINT = 268_435_455  # 4 bytes of 7 bits: the largest Remaining Length there is
PROTOCOL_LEVEL_V5 = 5

# Property identifiers used here (MQTT v5 §2.2.2.2).
SESSION_EXPIRY_INTERVAL = 0x11
SERVER_KEEP_ALIVE = 0x13
REASON_STRING = 0x1F
RECEIVE_MAXIMUM = 0x21
USER_PROPERTY = 0x26

# Every property's value type, to walk a property list we do not skip wholesale.
_BYTE, _TWO, _FOUR, _VARINT, _UTF8, _BINARY, _PAIR = range(7)
_PROPERTY_TYPES = {
    0x01: _BYTE, 0x02: _FOUR, 0x03: _UTF8, 0x08: _UTF8, 0x09: _BINARY, 0x0B: _VARINT,
    0x11: _FOUR, 0x12: _UTF8, 0x13: _TWO, 0x15: _UTF8, 0x16: _BINARY, 0x17: _BYTE,
    0x18: _FOUR, 0x19: _BYTE, 0x1A: _UTF8, 0x1C: _UTF8, 0x1F: _UTF8, 0x21: _TWO,
    0x22: _TWO, 0x23: _TWO, 0x24: _BYTE, 0x25: _BYTE, 0x26: _PAIR, 0x27: _FOUR,
    0x28: _BYTE, 0x29: _BYTE, 0x2A: _BYTE,
}  # fmt: skip

REASON_NAMES = {
    0x00: "success", 0x04: "disconnect with will message", 0x80: "unspecified error",
    0x81: "malformed packet", 0x82: "protocol error", 0x83: "implementation specific error",
    0x84: "unsupported protocol version", 0x85: "client identifier not valid",
    0x86: "bad user name or password", 0x87: "not authorized", 0x88: "server unavailable",
    0x89: "server busy", 0x8A: "banned", 0x8B: "server shutting down",
    0x8C: "bad authentication method", 0x8D: "keep alive timeout", 0x8E: "session taken over",
    0x8F: "topic filter invalid", 0x90: "topic name invalid", 0x93: "receive maximum exceeded",
    0x94: "topic alias invalid", 0x95: "packet too large", 0x96: "message rate too high",
    0x97: "quota exceeded", 0x98: "administrative action", 0x99: "payload format invalid",
    0x9A: "retain not supported", 0x9B: "QoS not supported", 0x9C: "use another server",
    0x9D: "server moved", 0x9E: "shared subscriptions not supported",
    0x9F: "connection rate exceeded", 0xA0: "maximum connect time",
    0xA1: "subscription identifiers not supported", 0xA2: "wildcard subscriptions not supported",
}  # fmt: skip


def reason_name(code: int) -> str:
    """`0x87 (not authorized)`: a reason code as logs should show it."""
    return f"0x{code:02X} ({REASON_NAMES.get(code, 'unknown reason')})"


class MalformedPacket(ValueError):
    """The bytes are not a valid MQTT v5 packet a server may send to a client."""


# --------------------------------------------------------------------------- packets


@dataclass(slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int
    packet_id: int  # 0 for QoS 0
    dup: bool = False
    retain: bool = False


@dataclass(slots=True)
class Connack:
    session_present: bool
    reason_code: int
    server_keep_alive: int | None = None  # the server's keep alive overrides ours
    reason_string: str | None = None

    @property
    def failed(self) -> bool:
        return self.reason_code >= 0x80


@dataclass(slots=True)
class Suback:
    packet_id: int
    reason_codes: tuple[int, ...]  # one per topic filter: the granted QoS, or >= 0x80
    reason_string: str | None = None


@dataclass(slots=True)
class Disconnect:
    reason_code: int = 0
    reason_string: str | None = None
    server_reference: str | None = None


@dataclass(slots=True)
class Pingresp:
    pass


@dataclass(slots=True)
class OtherPacket:
    """A packet a server may send but a subscriber never expects (PUBACK, PUBREL, AUTH…)."""

    kind: int
    flags: int
    body: bytes

    @property
    def name(self) -> str:
        return PACKET_NAMES[self.kind]


Packet = Publish | Connack | Suback | Disconnect | Pingresp | OtherPacket

_PINGRESP = Pingresp()


# --------------------------------------------------------------------------- primitives


def encode_varint(value: int) -> bytes:
    """MQTT's Variable Byte Integer: 7 bits a byte, least significant first."""
    if not 0 <= value <= MAX_VARINT:
        raise ValueError(f"variable byte integer {value} is outside 0..{MAX_VARINT}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_varint(data: bytes | bytearray, pos: int, end: int | None = None) -> tuple[int, int]:
    """(value, position after it) of the Variable Byte Integer at `pos`.

    Returns (-1, pos) when `data` ends (at `end`) before the integer does; raises
    `MalformedPacket` for a fifth byte, which no valid integer has.
    """
    if end is None:
        end = len(data)
    value = 0
    shift = 0
    for index in range(pos, pos + 4):
        if index >= end:
            return -1, pos
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, index + 1
        shift += 7
    raise MalformedPacket(f"variable byte integer at offset {pos} is longer than 4 bytes")


def _varint_within(data: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    value, after = decode_varint(data, pos, end)
    if value < 0:
        raise MalformedPacket(f"{what}: truncated variable byte integer")
    return value, after


def _utf8(value: str) -> bytes:
    raw = value.encode()
    if len(raw) > 0xFFFF:
        raise ValueError(f"string of {len(raw)} bytes is longer than MQTT's 65535")
    return len(raw).to_bytes(2, "big") + raw


def _binary(value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"binary data of {len(value)} bytes is longer than MQTT's 65535")
    return len(value).to_bytes(2, "big") + value


def _packet(first_byte: int, body: bytes) -> bytes:
    return bytes((first_byte,)) + encode_varint(len(body)) + body


PropertyValue = int | str | bytes | tuple[str, str]


def encode_property(identifier: int, value: PropertyValue) -> bytes:
    """One property (identifier + value) in the encoding its identifier prescribes."""
    kind = _PROPERTY_TYPES.get(identifier)
    if kind is None:
        raise ValueError(f"unknown MQTT v5 property 0x{identifier:02X}")
    head = encode_varint(identifier)
    if kind == _PAIR:
        if not isinstance(value, tuple):
            raise TypeError(f"property 0x{identifier:02X} is a string pair")
        return head + _utf8(value[0]) + _utf8(value[1])
    if kind == _UTF8:
        if not isinstance(value, str):
            raise TypeError(f"property 0x{identifier:02X} is a UTF-8 string")
        return head + _utf8(value)
    if kind == _BINARY:
        if not isinstance(value, bytes):
            raise TypeError(f"property 0x{identifier:02X} is binary data")
        return head + _binary(value)
    if not isinstance(value, int):
        raise TypeError(f"property 0x{identifier:02X} is an integer")
    if kind == _VARINT:
        return head + encode_varint(value)
    size = {_BYTE: 1, _TWO: 2, _FOUR: 4}[kind]
    return head + value.to_bytes(size, "big")


def encode_properties(properties: Iterable[tuple[int, PropertyValue]] = ()) -> bytes:
    """A property list with its length prefix (`b"\\x00"` for none)."""
    body = b"".join(encode_property(identifier, value) for identifier, value in properties)
    return encode_varint(len(body)) + body


def read_properties(data: bytes, pos: int, end: int) -> tuple[dict[int, PropertyValue], int]:
    """The property list at `pos` (length prefix included) → ({id: value}, position after).

    A repeated property keeps its last value (User Property may repeat; we keep none of
    them meaningfully). Every value is checked against the packet's bounds.
    """
    length, pos = _varint_within(data, pos, end, "property length")
    stop = pos + length
    if stop > end:
        raise MalformedPacket(f"property length {length} runs past the packet's end")
    found: dict[int, PropertyValue] = {}
    while pos < stop:
        identifier, pos = _varint_within(data, pos, stop, "property identifier")
        kind = _PROPERTY_TYPES.get(identifier)
        if kind is None:
            raise MalformedPacket(f"unknown property identifier 0x{identifier:02X}")
        value: PropertyValue
        if kind == _VARINT:
            value, pos = _varint_within(data, pos, stop, f"property 0x{identifier:02X}")
        elif kind in (_BYTE, _TWO, _FOUR):
            size = 1 if kind == _BYTE else 2 if kind == _TWO else 4
            if pos + size > stop:
                raise MalformedPacket(f"property 0x{identifier:02X} runs past its list")
            value = int.from_bytes(data[pos : pos + size], "big")
            pos += size
        elif kind == _PAIR:
            key, pos = _read_string(data, pos, stop, "user property name")
            text, pos = _read_string(data, pos, stop, "user property value")
            value = (key, text)
        else:
            raw, pos = _read_binary(data, pos, stop, f"property 0x{identifier:02X}")
            value = raw if kind == _BINARY else _decode_utf8(raw, f"property 0x{identifier:02X}")
        found[identifier] = value
    return found, stop


def _read_binary(data: bytes, pos: int, end: int, what: str) -> tuple[bytes, int]:
    if pos + 2 > end:
        raise MalformedPacket(f"{what}: length runs past the packet's end")
    size = (data[pos] << 8) | data[pos + 1]
    start = pos + 2
    if start + size > end:
        raise MalformedPacket(f"{what}: {size} bytes run past the packet's end")
    return data[start : start + size], start + size


def _read_string(data: bytes, pos: int, end: int, what: str) -> tuple[str, int]:
    raw, pos = _read_binary(data, pos, end, what)
    return _decode_utf8(raw, what), pos


def _decode_utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise MalformedPacket(f"{what} is not valid UTF-8: {exc}") from None


def _optional_str(properties: dict[int, PropertyValue], identifier: int) -> str | None:
    value = properties.get(identifier)
    return value if isinstance(value, str) else None


# --------------------------------------------------------------------------- client → server

PINGREQ_PACKET = b"\xc0\x00"
_PUBACK = struct.Struct(">HH")
_PUBACK_HEAD = (PUBACK << 12) | 2  # first byte 0x40, remaining length 2


def connect(
    client_id: str,
    *,
    keepalive_s: int,
    clean_start: bool,
    session_expiry_s: int,
    receive_maximum: int,
    username: str | None = None,
    password: str | None = None,
) -> bytes:
    """CONNECT (v5, no will): Session Expiry Interval and Receive Maximum properties."""
    if not 0 <= keepalive_s <= 0xFFFF:
        raise ValueError(f"keep alive {keepalive_s} is outside 0..65535")
    if not 1 <= receive_maximum <= 0xFFFF:
        raise ValueError(f"receive maximum {receive_maximum} is outside 1..65535")
    if not 0 <= session_expiry_s <= 0xFFFFFFFF:
        raise ValueError(f"session expiry {session_expiry_s} is outside 0..2^32-1")
    flags = 0x02 if clean_start else 0x00
    if username is not None:
        flags |= 0x80
    if password is not None:
        flags |= 0x40
    properties = encode_properties(
        [(SESSION_EXPIRY_INTERVAL, session_expiry_s), (RECEIVE_MAXIMUM, receive_maximum)]
    )
    body = (
        _utf8("MQTT")
        + bytes((PROTOCOL_LEVEL_V5, flags))
        + keepalive_s.to_bytes(2, "big")
        + properties
        + _utf8(client_id)
    )
    if username is not None:
        body += _utf8(username)
    if password is not None:
        body += _binary(password.encode())
    return _packet(CONNECT << 4, body)


def subscribe(packet_id: int, topics: Sequence[str], options: int = 0x01) -> bytes:
    """SUBSCRIBE to every topic filter with the same subscription options (0x01: QoS 1)."""
    if not topics:
        raise ValueError("SUBSCRIBE needs at least one topic filter")
    if not 1 <= packet_id <= 0xFFFF:
        raise ValueError(f"packet identifier {packet_id} is outside 1..65535")
    body = packet_id.to_bytes(2, "big") + b"\x00"
    body += b"".join(_utf8(topic) + bytes((options,)) for topic in topics)
    return _packet((SUBSCRIBE << 4) | 0x02, body)


def puback(packet_ids: Iterable[int]) -> bytes:
    """One PUBACK (reason 0, no properties: 4 bytes) per packet id, concatenated."""
    pack = _PUBACK.pack
    return b"".join([pack(_PUBACK_HEAD, packet_id) for packet_id in packet_ids])


def pingreq() -> bytes:
    return PINGREQ_PACKET


def disconnect(reason_code: int = 0) -> bytes:
    """DISCONNECT; reason 0 keeps the session (its expiry is CONNECT's) and drops no will."""
    if reason_code == 0:
        return b"\xe0\x00"
    return bytes((DISCONNECT << 4, 2, reason_code, 0))


# --------------------------------------------------------------------------- server → client


def publish(
    topic: str,
    payload: bytes,
    *,
    qos: int = 0,
    packet_id: int = 0,
    dup: bool = False,
    retain: bool = False,
    properties: Iterable[tuple[int, PropertyValue]] = (),
) -> bytes:
    """PUBLISH as a broker sends it (for tests and fakes)."""
    flags = (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    body = _utf8(topic)
    if qos:
        body += packet_id.to_bytes(2, "big")
    body += encode_properties(properties) + payload
    return _packet((PUBLISH << 4) | flags, body)


def connack(
    reason_code: int = 0,
    *,
    session_present: bool = False,
    properties: Iterable[tuple[int, PropertyValue]] = (),
) -> bytes:
    return _packet(
        CONNACK << 4,
        bytes((int(session_present), reason_code)) + encode_properties(properties),
    )


def suback(packet_id: int, reason_codes: Sequence[int]) -> bytes:
    return _packet(SUBACK << 4, packet_id.to_bytes(2, "big") + b"\x00" + bytes(reason_codes))


# --------------------------------------------------------------------------- parsing


def first_packet_size(data: bytes | bytearray) -> int | None:
    """Bytes the first packet in `data` occupies, or None while its fixed header is incomplete.

    Lets a caller holding a partial packet skip parsing until enough has arrived.
    """
    if len(data) < 2:
        return None
    length, after = decode_varint(data, 1)
    if length < 0:
        return None
    return after + length


def parse_packets(data: bytes | bytearray) -> tuple[list[Packet], int]:
    """Every complete packet in `data`, in order, and the number of bytes they occupy.

    A trailing partial packet is left for the next call (the caller keeps
    `data[consumed:]`). Raises `MalformedPacket` for bytes no server may send.
    """
    if type(data) is not bytes:
        data = bytes(data)  # one copy, so every slice below is `bytes` already
    packets: list[Packet] = []
    append = packets.append
    end = len(data)
    pos = 0
    while pos + 2 <= end:
        first = data[pos]
        length = data[pos + 1]
        start = pos + 2
        if length & 0x80:
            length, start = decode_varint(data, pos + 1, end)
            if length < 0:
                break
        stop = start + length
        if stop > end:
            break
        if first >> 4 == PUBLISH:
            # The hot path, inline: topic, packet id, properties (skipped), payload.
            qos = (first >> 1) & 0x03
            if length < 2:
                raise MalformedPacket(f"PUBLISH of {length} bytes has no room for a topic")
            cursor = start + 2 + ((data[start] << 8) | data[start + 1])
            if cursor > stop:
                raise MalformedPacket("PUBLISH topic length runs past the packet's end")
            if cursor == start + 2:
                # We never allow topic aliases (Topic Alias Maximum stays 0).
                raise MalformedPacket("PUBLISH with an empty topic name")
            topic_bytes = data[start + 2 : cursor]
            if qos:
                if qos == 3:
                    raise MalformedPacket("PUBLISH with QoS 3")
                packet_id = (data[cursor] << 8) | data[cursor + 1] if cursor + 2 <= stop else 0
                if not packet_id:
                    raise MalformedPacket("QoS>0 PUBLISH without a packet identifier")
                cursor += 2
            else:
                if first & 0x08:
                    raise MalformedPacket("QoS 0 PUBLISH with the DUP flag set")
                packet_id = 0
            if cursor >= stop:
                raise MalformedPacket("PUBLISH without a property length")
            skip = data[cursor]
            if skip & 0x80:
                skip, cursor = _varint_within(data, cursor, stop, "PUBLISH property length")
            else:
                cursor += 1
            cursor += skip
            if cursor > stop:
                raise MalformedPacket(f"PUBLISH property length {skip} runs past the packet")
            try:
                topic = topic_bytes.decode()
            except UnicodeDecodeError as exc:
                raise MalformedPacket(f"PUBLISH topic is not valid UTF-8: {exc}") from None
            append(
                Publish(
                    topic, data[cursor:stop], qos, packet_id, bool(first & 0x08), bool(first & 1)
                )
            )
        else:
            append(_parse_other(first, data, start, stop))
        pos = stop
    return packets, pos


def _expect_end(cursor: int, stop: int, name: str) -> None:
    if cursor != stop:
        raise MalformedPacket(f"{name} has {stop - cursor} bytes after its properties")


def _parse_other(first: int, data: bytes, start: int, stop: int) -> Packet:
    kind = first >> 4
    flags = first & 0x0F
    name = PACKET_NAMES[kind]
    if kind in (0, CONNECT, SUBSCRIBE, UNSUBSCRIBE, PINGREQ):
        raise MalformedPacket(f"{name} is never sent to a client")
    if flags != (0x02 if kind == PUBREL else 0):
        raise MalformedPacket(f"{name} with reserved fixed-header flags 0x{flags:X}")
    length = stop - start
    if kind == PINGRESP:
        if length:
            raise MalformedPacket(f"PINGRESP with a {length}-byte body")
        return _PINGRESP
    if kind == CONNACK:
        if length < 2:
            raise MalformedPacket(f"CONNACK of {length} bytes")
        ack_flags = data[start]
        if ack_flags & 0xFE:
            raise MalformedPacket(f"CONNACK with reserved acknowledge flags 0x{ack_flags:02X}")
        properties: dict[int, PropertyValue] = {}
        if length > 2:
            properties, cursor = read_properties(data, start + 2, stop)
            _expect_end(cursor, stop, "CONNACK")
        keep_alive = properties.get(SERVER_KEEP_ALIVE)
        return Connack(
            session_present=bool(ack_flags & 1),
            reason_code=data[start + 1],
            server_keep_alive=keep_alive if isinstance(keep_alive, int) else None,
            reason_string=_optional_str(properties, REASON_STRING),
        )
    if kind == SUBACK:
        if length < 3:
            raise MalformedPacket(f"SUBACK of {length} bytes")
        properties, cursor = read_properties(data, start + 2, stop)
        if cursor >= stop:
            raise MalformedPacket("SUBACK without reason codes")
        return Suback(
            packet_id=(data[start] << 8) | data[start + 1],
            reason_codes=tuple(data[cursor:stop]),
            reason_string=_optional_str(properties, REASON_STRING),
        )
    if kind == DISCONNECT:
        if length == 0:
            return Disconnect(0)
        properties = {}
        if length > 1:
            properties, cursor = read_properties(data, start + 1, stop)
            _expect_end(cursor, stop, "DISCONNECT")
        return Disconnect(
            reason_code=data[start],
            reason_string=_optional_str(properties, REASON_STRING),
            server_reference=_optional_str(properties, 0x1C),
        )
    return OtherPacket(kind, flags, data[start:stop])
