"""Decoding, one line per case: what a device sends → what is stored or why not."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.decode import Decoded, Decoder, DeviceInfo, RateLimiter, RawMessage, parse_ts

NOW = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
DEVICES = {
    "smoke-1": DeviceInfo("smoke-1", "smoke_detector", "g1"),
    "cover-1": DeviceInfo("cover-1", "manhole_cover", "g1", height_cm=200),
    "door-1": DeviceInfo("door-1", "door_access", "g1"),
    "bin-1": DeviceInfo("bin-1", "smart_bin", "g1", height_cm=120),
}


def decoder(max_payload_bytes: int = 16 * 1024) -> Decoder:
    return Decoder(
        prefix="gw",
        max_payload_bytes=max_payload_bytes,
        credential_key=b"test-key",
        lookup_device=DEVICES.get,
    )


def decode(topic: str, payload: bytes | str | object) -> Decoded:
    if isinstance(payload, str):
        payload = payload.encode()
    elif not isinstance(payload, bytes):
        payload = orjson.dumps(payload)
    out = Decoded()
    decoder().decode(RawMessage(topic, payload, NOW), out)
    return out


BAD_INPUT = [
    # (topic, payload, reason) — why it is refused
    ("gw/dev/smoke-1/telemetry", b"{not json", "not_json"),  # broken JSON
    ("gw/dev/smoke-1/telemetry", b"\xff\xfe{}", "not_utf8"),  # not UTF-8 at all
    ("gw/dev/smoke-1/telemetry", "42", "not_object"),  # a bare number is not a reading
    ("gw/dev/smoke-1/telemetry", "[]", "not_object"),  # an empty buffer flush
    ("gw/dev/smoke-1/telemetry", {"smoke": "12"}, "wrong_type"),  # number sent as string
    ("gw/dev/smoke-1/telemetry", {"alarm": 1}, "wrong_type"),  # 1 is not a boolean
    ("gw/dev/smoke-1/telemetry", {"smoke": 150}, "out_of_range"),  # obscuration above 100 %
    ("gw/dev/smoke-1/telemetry", {"battery": -1}, "out_of_range"),  # battery below 0 %
    ("gw/dev/cover-1/telemetry", {"tilt": 181}, "out_of_range"),  # tilt beyond 180°
    ("gw/dev/bin-1/telemetry", {"fill": 100.5}, "out_of_range"),  # fuller than full
    ("gw/dev/smoke-1/telemetry", {"temperature": -80}, "out_of_range"),  # colder than any site
    ("gw/dev/smoke-1/telemetry", {"seq": -1}, "out_of_range"),  # counters are not negative
    ("gw/dev/smoke-1/telemetry", {"ts": "yesterday"}, "bad_timestamp"),  # not RFC 3339
    ("gw/dev/smoke-1/telemetry", {"ts": "2026-11-22T08:00:00"}, "bad_timestamp"),  # no offset
    ("gw/dev/smoke-1/telemetry", {"ts": 1e20}, "bad_timestamp"),  # far future
    ("gw/dev/smoke-1/telemetry", {"ts": 5}, "bad_timestamp"),  # 1970
    ("gw/dev/ghost-9/telemetry", {"smoke": 1}, "unknown_device"),  # not in the registry
    ("gw/dev/smoke-1/telemetry", {"device_id": "door-1"}, "device_mismatch"),  # names another
    ("gw/dev/smoke-1/event", {"event": "opened"}, "unknown_event"),  # a manhole's event
    ("gw/dev/smoke-1/event", {"smoke": 1}, "missing_field"),  # an event needs `event`
    ("gw/dev/smoke-1/status", b"sleeping", "bad_status"),  # only online/offline
    ("gw/dev/bad$id/telemetry", {"smoke": 1}, "bad_device_id"),  # id outside the alphabet
    ("gw/dev/smoke-1/config", {"smoke": 1}, "bad_topic"),  # unknown channel
    ("gw/other/smoke-1/telemetry", {"smoke": 1}, "bad_topic"),  # unknown family
    ("gw/codec/nosuch/smoke-1", {"smoke": 1}, "unknown_codec"),  # no such vendor codec
    ("gw/dev/smoke-1/telemetry", '{"x": "a\\u0000b"}', "wrong_type"),  # NUL cannot be stored
    ("gw/dev/door-1/event", {"event": "access_denied", "credential": "x" * 300}, "out_of_range"),
    (
        "gw/dev/smoke-1/telemetry",
        '{"seq": 1' + "0" * 40 + "}",
        "wrong_type",
    ),  # beyond 64 bits: a float
    # An extra field nested deeper than the 254 levels orjson writes back: refused here, not
    # by the writer (which would write its whole batch again, message by message).
    ("gw/dev/bin-1/telemetry", '{"fill": 5, "x": ' + "[" * 300 + "]" * 300 + "}",
     "storage_rejected"),
    ("gw/dev/door-1/event", '{"event": "door_opened", "x": ' + "[" * 300 + "]" * 300 + "}",
     "storage_rejected"),
]  # fmt: skip


@pytest.mark.parametrize(("topic", "payload", "reason"), BAD_INPUT)
def test_bad_input_is_dead_lettered_with_its_reason(topic: str, payload: object, reason: str):
    out = decode(topic, payload)
    assert out.readings == []
    assert [d.reason for d in out.dead_letters] == [reason]
    letter = out.dead_letters[0]
    assert letter.detail
    assert letter.topic == topic
    assert letter.payload  # the raw bytes are kept


def test_an_extra_field_nested_as_deep_as_can_be_written_is_kept():
    out = decode("gw/dev/bin-1/telemetry", '{"fill": 5, "x": ' + "[" * 250 + "]" * 250 + "}")
    assert [d.reason for d in out.dead_letters] == []
    (reading,) = out.readings
    assert reading.extra is not None
    assert orjson.dumps(reading.extra).count(b"[") == 250


def test_oversized_payload_is_refused_before_parsing():
    out = Decoded()
    big = orjson.dumps({"pad": "x" * 20_000})
    decoder().decode(RawMessage("gw/dev/smoke-1/telemetry", big, NOW), out)
    assert [d.reason for d in out.dead_letters] == ["oversized"]
    assert out.dead_letters[0].payload == big


@pytest.mark.parametrize(
    ("topic", "reason", "device_id"),
    [
        ("gw/dev/bad$id/telemetry", "bad_device_id", None),  # not an id: none recorded
        ("gw/dev/" + "x" * 65 + "/telemetry", "bad_device_id", None),  # too long an id
        ("gw/codec/chirpstack/bad$id", "bad_device_id", None),
        ("gw/dev/ghost-9/telemetry", "oversized", "ghost-9"),  # well formed, unknown
        ("gw/dev/smoke-1/telemetry", "oversized", "smoke-1"),
    ],
)
def test_a_message_bad_in_several_ways_is_dead_lettered_for_its_topic_first(
    topic: str, reason: str, device_id: str | None
):
    """The device id is checked only when the registry does not know it (a registered id
    is well formed), yet a malformed id still wins over an oversized payload."""
    out = Decoded()
    big = orjson.dumps({"pad": "x" * 20_000})
    decoder().decode(RawMessage(topic, big, NOW), out)
    assert [(d.reason, d.device_id) for d in out.dead_letters] == [(reason, device_id)]
    assert out.unknown == []


GOOD_INPUT = [
    # (topic, payload, expected values) — accepted and what is kept
    ("gw/dev/smoke-1/telemetry", {"smoke": 0.4, "temperature": 21.5, "alarm": False},
     {"smoke": 0.4, "temperature": 21.5, "alarm": False}),  # a normal reading
    ("gw/dev/cover-1/telemetry", {"tilt": 3, "open": False, "water_level": 40},
     {"tilt": 3, "open": False, "water_level": 40}),  # ints are fine for numbers
    ("gw/dev/bin-1/telemetry", {"fill": 100, "weight": 0}, {"fill": 100, "weight": 0}),  # edges
    ("gw/dev/door-1/telemetry", {"door_open": True, "locked": False},
     {"door_open": True, "locked": False}),
]  # fmt: skip


@pytest.mark.parametrize(("topic", "payload", "values"), GOOD_INPUT)
def test_valid_readings_keep_their_values(topic: str, payload: object, values: dict):
    out = decode(topic, payload)
    assert out.dead_letters == []
    (reading,) = out.readings
    assert reading.values == values
    assert reading.time == NOW  # no ts: the receive time


def test_unknown_extra_fields_are_kept_not_dropped():
    out = decode("gw/dev/smoke-1/telemetry", {"smoke": 1, "firmware": "1.2", "fill": 3})
    (reading,) = out.readings
    assert reading.values == {"smoke": 1}
    assert reading.extra == {"firmware": "1.2", "fill": 3}


def test_buffer_flush_keeps_good_elements_and_dead_letters_bad_ones():
    payload = [{"seq": 1, "smoke": 1}, {"seq": 2, "smoke": 500}, {"seq": 3, "smoke": 2}]
    out = decode("gw/dev/smoke-1/telemetry", payload)
    assert [r.seq for r in out.readings] == [1, 3]
    (letter,) = out.dead_letters
    assert letter.reason == "out_of_range"
    assert letter.detail.startswith("element 1 of 3")
    assert orjson.loads(letter.payload) == {"seq": 2, "smoke": 500}


def test_credential_is_stored_only_as_a_keyed_hash():
    out = decode("gw/dev/door-1/event", {"event": "access_denied", "credential": "CARD-1234"})
    (reading,) = out.readings
    assert reading.event == "access_denied"
    assert reading.credential_hash is not None
    assert "CARD-1234" not in repr(reading)
    assert reading.credential_hash == decoder().hash_credential("CARD-1234")


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        ("2026-11-22T07:59:00Z", datetime(2026, 11, 22, 7, 59, tzinfo=UTC)),  # RFC 3339 Z
        ("2026-11-22T15:59:00+08:00", datetime(2026, 11, 22, 7, 59, tzinfo=UTC)),  # Beijing time
        (1795334340, datetime(2026, 11, 22, 7, 59, tzinfo=UTC)),  # epoch seconds
        (1795334340000, datetime(2026, 11, 22, 7, 59, tzinfo=UTC)),  # epoch milliseconds
        (None, NOW),  # absent: the receive time
    ],
)
def test_timestamps(ts: object, expected: datetime):
    assert parse_ts(ts, NOW) == expected  # type: ignore[arg-type]


def test_one_decoder_times_each_message_by_its_own_ts_and_receive_time():
    """The decoder reuses the last message's parsed ts when both match (messages of one
    socket read share their receive time and often their ts): never across a change."""
    later = NOW + timedelta(days=3)
    sent = [(1795334340, NOW), (1795334340, NOW), (1795334400, NOW), (None, NOW),
            (None, later), ("2026-11-22T07:59:00Z", NOW), (1795334340, later)]  # fmt: skip
    one = decoder()
    out = Decoded()
    for seq, (ts, received_at) in enumerate(sent):
        payload = orjson.dumps({"seq": seq, "smoke": 1.0, **({"ts": ts} if ts else {})})
        one.decode(RawMessage("gw/dev/smoke-1/telemetry", payload, received_at), out)
    assert [r.time for r in out.readings] == [parse_ts(ts, at) for ts, at in sent]
    # A day ahead of its receive time is refused, even right after the same ts was not.
    ahead = int((NOW + timedelta(days=2)).timestamp())
    one.decode(RawMessage("gw/dev/smoke-1/telemetry", b'{"ts": %d}' % ahead, later), out)
    one.decode(RawMessage("gw/dev/smoke-1/telemetry", b'{"ts": %d}' % ahead, NOW), out)
    assert [d.reason for d in out.dead_letters] == ["bad_timestamp"]


def test_status_messages():
    out = decode("gw/dev/smoke-1/status", b"offline")
    assert [(s.device_id, s.status) for s in out.statuses] == [("smoke-1", "offline")]


@given(payload=st.binary(max_size=2048), channel=st.sampled_from(["telemetry", "event", "status"]))
def test_arbitrary_bytes_never_raise(payload: bytes, channel: str):
    out = Decoded()
    decoder().decode(RawMessage(f"gw/dev/smoke-1/{channel}", payload, NOW), out)
    assert len(out.readings) + len(out.statuses) + len(out.dead_letters) >= 1


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.floats(allow_nan=False)
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=8,
)


@settings(suppress_health_check=[HealthCheck.too_slow])  # shared, noisy CI machines
@given(document=st.dictionaries(
    st.sampled_from(["smoke", "temperature", "alarm", "seq", "ts", "battery", "x"]), json_values
))  # fmt: skip
def test_arbitrary_json_objects_never_raise(document: dict):
    out = decode("gw/dev/smoke-1/telemetry", document)
    assert len(out.readings) + len(out.dead_letters) == 1


# -- per-device rate limit (token bucket, injected clock)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("rate", "burst", "arrivals", "expected"),
    [
        # (msg/s, burst, [(seconds since the previous message, how many at once)], passed)
        (5.0, 3, [(0, 5)], [True, True, True, False, False]),  # the burst, then refused
        (5.0, 3, [(0, 3), (0.2, 2)], [True] * 3 + [True, False]),  # 0.2 s refills one
        (5.0, 3, [(0, 3), (0.1, 1), (0.1, 1)], [True] * 3 + [False, True]),  # half, then one
        (5.0, 3, [(0, 3), (10, 4)], [True] * 3 + [True] * 3 + [False]),  # refills to burst only
        (2.0, 1, [(0, 1), (0.5, 1), (0.5, 1), (0.25, 1)], [True, True, True, False]),
        (2.0, 60, [(0, 60), (0, 1)], [True] * 60 + [False]),  # 60 at once: no rounding loss
        (0.5, 2, [(0, 2), (1, 1), (1, 1)], [True, True, False, True]),  # refused pays nothing
    ],
)
def test_rate_limiter(rate: float, burst: int, arrivals: list, expected: list[bool]):
    clock = FakeClock()
    limiter = RateLimiter(rate, burst, monotonic=clock)
    passed = []
    for gap, count in arrivals:
        clock.now += gap
        passed += [limiter.allow("smoke-1") for _ in range(count)]
    assert passed == expected


def test_the_rate_limit_reads_the_clock_once_per_socket_read():
    reads = []

    def clock() -> float:
        reads.append(1)
        return 1000.0 + len(reads)

    limited = Decoder(prefix="gw", max_payload_bytes=16 * 1024, credential_key=b"k",
                      lookup_device=DEVICES.get, rate_per_s=5.0, monotonic=clock)  # fmt: skip
    out = Decoded()
    for received_at in (NOW, NOW + timedelta(milliseconds=3)):  # two reads of 50 messages
        for seq in range(50):
            topic = ("gw/dev/smoke-1/telemetry", "gw/dev/bin-1/telemetry")[seq % 2]
            limited.decode(RawMessage(topic, b'{"seq": %d}' % seq, received_at), out)
    assert len(reads) == 2
    assert len(out.readings) == 100


def test_a_flooding_device_is_dead_lettered_and_others_are_not():
    clock = FakeClock()
    limited = Decoder(prefix="gw", max_payload_bytes=16 * 1024, credential_key=b"k",
                      lookup_device=DEVICES.get, rate_per_s=5.0, rate_burst=3,
                      monotonic=clock)  # fmt: skip
    out = Decoded()
    for seq in range(10):
        limited.decode(RawMessage("gw/dev/smoke-1/telemetry", b'{"seq": %d}' % seq, NOW), out)
    limited.decode(RawMessage("gw/dev/bin-1/telemetry", b'{"fill": 3}', NOW), out)
    # Events have buckets of their own: a telemetry flood does not hold back an alarm.
    limited.decode(RawMessage("gw/dev/smoke-1/event", b'{"event": "alarm"}', NOW), out)
    limited.decode(RawMessage("gw/dev/ghost-1/telemetry", b"{}", NOW), out)  # no bucket
    assert [(r.device_id, r.seq) for r in out.readings] == [
        ("smoke-1", 0), ("smoke-1", 1), ("smoke-1", 2), ("bin-1", None), ("smoke-1", None),
    ]  # fmt: skip
    letters = [(d.device_id, d.reason, d.detail, d.payload) for d in out.dead_letters]
    assert letters[:7] == [
        ("smoke-1", "rate_limited", "device over 5 msg/s (burst 3)", b'{"seq": %d}' % seq)
        for seq in range(3, 10)
    ]
    assert [d.reason for d in out.dead_letters[7:]] == ["unknown_device"]
    assert [m.topic for m in out.unknown] == ["gw/dev/ghost-1/telemetry"]
    assert (len(limited.limiter or ()), len(limited.event_limiter or ())) == (2, 1)
    clock.now += 0.2  # one token back (the clock is read once per receive time: a later one)
    later = NOW + timedelta(seconds=0.2)
    limited.decode(RawMessage("gw/dev/smoke-1/telemetry", b'{"seq": 10}', later), out)
    assert out.readings[-1].seq == 10
