"""Fuzzers over the decoder, the payload models and every codec, filling what
tests/test_decode.py and tests/test_codecs.py do not cover:

- hostile JSON *text* that a JSON library would never write: NaN / Infinity literals,
  1e400, integers beyond 64 bits, lone surrogates, NUL escapes, nesting at and beyond
  orjson's limits (254 levels written, 1,024 read), 1 MB strings, wrong types; in native
  and vendor shapes, on every topic (and on arbitrary topics);
- the outcome as the ingest sees it: each message becomes readings the writer can encode
  (their rows are built here) or dead letters with a known reason, never an exception, and
  every stored value is within its column's physical range;
- round trips: a valid reading of each kind (and a buffer flush mixing good and bad
  elements, and each codec's main fields) decodes to exactly the values sent.

Settings: derandomized, a fixed number of examples, no deadline; about 20 s in all.
"""

from __future__ import annotations

import copy
import math
import typing
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import annotated_types
import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ingest.codecs import CODECS
from ingest.decode import Decoded, Decoder, DeviceInfo, RawMessage
from ingest.models import (
    BOOLEAN_FIELDS,
    EVENT_MODELS,
    EVENT_SCHEMAS,
    NUMERIC_FIELDS,
    TELEMETRY_MODELS,
    TELEMETRY_SCHEMAS,
)
from ingest.writer import _event_record, _telemetry_record
from tests.faults.harness import KNOWN_REASONS
from tests.test_codecs import (
    CS_BIN,
    CS_KEYS,
    CS_MANHOLE,
    CS_OBJECT_KEYS,
    HIK_BODY_KEYS,
    HIK_CARD,
    HIK_KEYS,
    Z2M_CONTACT,
    Z2M_KEYS,
    Z2M_SMOKE,
    patched,
)

NOW = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
KEY = b"fuzz-key"
DEVICES = {
    "smoke-1": DeviceInfo("smoke-1", "smoke_detector", "g1"),
    "cover-1": DeviceInfo("cover-1", "manhole_cover", "g1", height_cm=200),
    "door-1": DeviceInfo("door-1", "door_access", "g1"),
    "bin-1": DeviceInfo("bin-1", "smart_bin", "g1", height_cm=120),
}
KIND_DEVICE = {d.kind: d.id for d in DEVICES.values()}
# The configured default, and the largest limit configuration allows (1 MiB): 1 MB
# strings get past the size check and reach the models.
DECODERS = [
    Decoder(prefix="gw", max_payload_bytes=size, credential_key=KEY, lookup_device=DEVICES.get)
    for size in (16 * 1024, 1024 * 1024)
]
FUZZ = settings(
    derandomize=True, deadline=None, max_examples=300, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)  # fmt: skip
UNWRITABLE = (orjson.JSONEncodeError, RecursionError)  # what ingest/consumer.py dead-letters


def _bounds(model: type, name: str) -> tuple[float, float]:
    """The physical range of a field (`Percent | None` and the like)."""
    low, high = -math.inf, math.inf
    field = model.model_fields[name]  # type: ignore[attr-defined]
    metadata = list(field.metadata)
    for arg in typing.get_args(field.annotation):
        for info in getattr(arg, "__metadata__", ()):
            metadata += getattr(info, "metadata", [])
    for item in metadata:
        if isinstance(item, annotated_types.Ge):
            low = float(item.ge)  # type: ignore[arg-type]
        elif isinstance(item, annotated_types.Le):
            high = float(item.le)  # type: ignore[arg-type]
    assert math.isfinite(low), (model, name)
    assert math.isfinite(high), (model, name)
    return low, high


# -- what the ingest makes of one message --------------------------------------------------


def _walk_strings(value: Any) -> typing.Iterator[str]:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def outcome(topic: str, payload: bytes, decoder: Decoder = DECODERS[0]) -> Decoded:
    """Decode as the consumer does, build every reading's row as the writer does, and check
    what would be stored. Never raises except on a broken property."""
    out = Decoded()
    try:
        decoder.decode(RawMessage(topic, payload, NOW), out)
    except UNWRITABLE:  # the consumer makes the message one storage_rejected dead letter
        return Decoded()
    assert {d.reason for d in out.dead_letters} <= KNOWN_REASONS
    for letter in out.dead_letters:
        assert letter.detail
        assert isinstance(letter.payload, bytes)
    for reading in out.readings:
        assert reading.device_id in DEVICES
        assert reading.channel in ("telemetry", "event")
        assert datetime(2000, 1, 1, tzinfo=UTC) <= reading.time <= NOW + timedelta(days=1)
        assert reading.seq is None or 0 <= reading.seq < 2**63
        kind = DEVICES[reading.device_id].kind
        models = TELEMETRY_MODELS if reading.channel == "telemetry" else EVENT_MODELS
        for name, value in reading.values.items():
            if name in NUMERIC_FIELDS:
                assert isinstance(value, int | float)
                assert not isinstance(value, bool)
                low, high = _bounds(models[kind], name)
                assert low <= value <= high, (name, value)
            elif name in BOOLEAN_FIELDS:
                assert isinstance(value, bool)
        assert "credential" not in (reading.extra or {})
        assert all("\x00" not in s for s in _walk_strings([reading.values, reading.extra]))
        try:
            row = (_telemetry_record if reading.channel == "telemetry" else _event_record)(reading)
        except UNWRITABLE:  # the consumer makes it a storage_rejected dead letter
            continue
        assert all("\x00" not in s for s in row if isinstance(s, str))
    return out


# -- hostile JSON text ---------------------------------------------------------------------

DEEP = st.sampled_from([253, 254, 255, 300, 999, 1023, 1024, 1025, 5000]).map(
    lambda n: "[" * n + "]" * n
)
HOSTILE_NUMBERS = st.sampled_from([
    "NaN", "-NaN", "Infinity", "-Infinity", "inf", "1e400", "-1e400", "2e-400", "1e308",
    "-1e308", "-0", "0.0", "18446744073709551616", "18446744073709551615",
    "9223372036854775807", "9223372036854775808", "-9223372036854775809",
    "123456789012345678901234567890", "1E5", "01", "+1", ".5", "5.", "0x10",
])  # fmt: skip
HOSTILE_STRINGS = st.sampled_from([
    '"\\u0000"', '"a\\u0000b"', '"\\ud800"', '"\\udfff"', '"x\\ud83d"', '"\\ud83d\\ude00"',
    '"\\\\u0000"', '"5"', '"true"', '"null"', '"2024-05-01T08:30:00Z"', '"2024-05-01T08:30:00"',
    '"\u202e"', '"\ufeff"', '""', '"\\"', "'single'",
])  # fmt: skip
MB_STRING = st.just('"' + "a" * 1_000_000 + '"')
PLAIN = st.one_of(
    st.sampled_from(["true", "false", "null", "[]", "{}"]),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.text(max_size=8).map(lambda s: orjson.dumps(s).decode()),
)
LEAF = st.one_of(PLAIN, PLAIN, HOSTILE_NUMBERS, HOSTILE_STRINGS, DEEP, MB_STRING)
MODEL_KEYS = sorted({name for model in (*TELEMETRY_MODELS.values(), *EVENT_MODELS.values())
                     for name in model.model_fields})  # fmt: skip
KEYS = st.one_of(
    st.sampled_from(
        MODEL_KEYS + Z2M_KEYS + CS_KEYS + CS_OBJECT_KEYS + HIK_KEYS + HIK_BODY_KEYS
    ).map(lambda k: orjson.dumps(k).decode()),
    st.sampled_from(['"\\u0000"', '"\\ud800"', '""', '"event"', '"ts"']),
    st.text(max_size=6).map(lambda s: orjson.dumps(s).decode()),
)


def _object(members: list[tuple[str, str]]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in members) + "}"


DOCUMENT = st.recursive(
    LEAF,
    lambda inner: (
        st.lists(inner, max_size=4).map(lambda items: "[" + ",".join(items) + "]")
        | st.lists(st.tuples(KEYS, inner), max_size=6).map(_object)
    ),
    max_leaves=10,
)
OBJECT = st.lists(st.tuples(KEYS, DOCUMENT), min_size=1, max_size=8).map(_object)


def _events(model: type) -> tuple[str, ...]:
    return typing.get_args(model.model_fields["event"].annotation)  # type: ignore[attr-defined]


EVENT_NAMES = sorted({name for model in EVENT_MODELS.values() for name in _events(model)})
EVENT_OBJECT = st.tuples(st.sampled_from(EVENT_NAMES), OBJECT).map(
    lambda pair: '{"event": "' + pair[0] + '", ' + pair[1][1:]
)
TOPICS = st.one_of(
    st.tuples(st.sampled_from(sorted(DEVICES)), st.sampled_from(["telemetry", "event"])).map(
        lambda pair: f"gw/dev/{pair[0]}/{pair[1]}"
    ),
    st.tuples(st.sampled_from([*sorted(CODECS), "nope"]), st.sampled_from(sorted(DEVICES))).map(
        lambda pair: f"gw/codec/{pair[0]}/{pair[1]}"
    ),
)


HOSTILE = st.one_of(
    HOSTILE_NUMBERS,
    HOSTILE_STRINGS,
    DEEP,
    MB_STRING,
    st.sampled_from(["[" * 300 + "1" + "]" * 300, '{"a": ' * 300 + "1" + "}" * 300]),
)
SENTINEL = "\u2063hostile\u2063"
# Realistic messages, native and vendor, in which one value is replaced by hostile text.
BASES: list[tuple[str, dict[str, Any]]] = [
    ("gw/dev/smoke-1/telemetry", {"seq": 1, "ts": "2026-11-22T07:59:00Z", "smoke": 1.5,
                                  "temperature": 21.0, "alarm": False, "battery": 90,
                                  "note": "kept in extra", "meta": {"fw": "1.2", "hw": [1]}}),
    ("gw/dev/cover-1/telemetry", {"seq": 2, "tilt": 3.0, "open": False, "water_level": 20.0}),
    ("gw/dev/bin-1/telemetry", {"seq": 3, "fill": 40.0, "weight": 12.5, "fire": False, "fw": "2"}),
    ("gw/dev/door-1/event", {"seq": 4, "event": "access_granted", "credential": "12345",
                              "reader": {"no": 1}}),
    ("gw/codec/zigbee2mqtt/smoke-1", Z2M_SMOKE),
    ("gw/codec/zigbee2mqtt/door-1", Z2M_CONTACT),
    ("gw/codec/chirpstack/bin-1", CS_BIN),
    ("gw/codec/chirpstack/cover-1", CS_MANHOLE),
    ("gw/codec/hikvision/door-1", HIK_CARD),
]  # fmt: skip


def _paths(value: Any, prefix: str = "") -> list[str]:
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _paths(v, f"{prefix}{k}.")] + (
            [prefix[:-1]] if prefix else []
        )
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _paths(v, f"{prefix}{i}.")]
    return [prefix[:-1]]


@st.composite
def vendor_shaped(draw: st.DrawFn) -> tuple[str, bytes]:
    topic, base = draw(st.sampled_from(BASES))
    path = draw(st.sampled_from(_paths(base)))
    document = copy.deepcopy(base)
    *parents, last = path.split(".")
    node: Any = document
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[int(last) if isinstance(node, list) else last] = SENTINEL
    text = orjson.dumps(document).decode()
    return topic, text.replace(orjson.dumps(SENTINEL).decode(), draw(HOSTILE), 1).encode()


@settings(FUZZ, max_examples=250)
@given(case=vendor_shaped(), big=st.booleans())
def test_vendor_shaped_json_with_a_hostile_value_is_stored_or_a_known_dead_letter(
    case: tuple[str, bytes], big: bool
):
    outcome(*case, DECODERS[big])  # the properties are checked there


@settings(FUZZ, max_examples=200)
@given(topic=TOPICS, document=st.one_of(OBJECT, EVENT_OBJECT, DOCUMENT), big=st.booleans())
def test_hostile_json_text_is_stored_or_a_known_dead_letter(topic: str, document: str, big: bool):
    outcome(topic, document.encode(), DECODERS[big])  # the properties are checked there


@FUZZ
@given(
    topic=st.one_of(
        st.text(max_size=80),
        st.tuples(st.text(max_size=70), st.sampled_from(["telemetry", "event", "status", "x"]))
        .map(lambda pair: f"gw/dev/{pair[0]}/{pair[1]}"),
        st.tuples(st.text(max_size=20), st.text(max_size=70))
        .map(lambda pair: f"gw/codec/{pair[0]}/{pair[1]}"),
    ),
    payload=st.binary(max_size=512) | st.lists(st.tuples(KEYS, PLAIN), max_size=4)
    .map(lambda members: _object(members).encode()),
)  # fmt: skip
def test_arbitrary_topics_and_bytes_are_one_known_outcome(topic: str, payload: bytes):
    out = outcome(topic, payload)
    if not topic.startswith(("gw/dev/", "gw/codec/")) or topic.count("/") < 3:
        assert [d.reason for d in out.dead_letters] in (["bad_topic"], ["bad_device_id"])


# -- round trips -------------------------------------------------------------------------------


def _value(model: type, name: str) -> st.SearchStrategy[Any]:
    if name in BOOLEAN_FIELDS:
        return st.booleans()
    low, high = _bounds(model, name)
    return st.floats(low, high, allow_nan=False) | st.integers(math.ceil(low), math.floor(high))


SAFE_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00",
                            ), max_size=20),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=5).filter(lambda k: "\x00" not in k), inner, max_size=3),
    max_leaves=6,
)  # fmt: skip
TIMESTAMPS = st.datetimes(
    min_value=datetime(2000, 1, 2), max_value=datetime(2026, 11, 22, 8, 0),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=8)), timezone(-timedelta(hours=3.5))]),
)  # fmt: skip


CREDENTIALS = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    min_size=1, max_size=20,
)  # fmt: skip


@st.composite
def valid_message(
    draw: st.DrawFn, channel: str, kind: str | None = None
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(kind, the document sent, what must come out: values, extra, seq, time, event)."""
    kind = kind or draw(st.sampled_from(sorted(KIND_DEVICE)))
    model = (TELEMETRY_MODELS if channel == "telemetry" else EVENT_MODELS)[kind]
    names = [n for n in model.model_fields if n in NUMERIC_FIELDS or n in BOOLEAN_FIELDS]
    values = draw(st.fixed_dictionaries({}, optional={n: _value(model, n) for n in names}))
    extra = draw(st.dictionaries(
        st.text(min_size=1, max_size=8).filter(
            lambda k: k not in model.model_fields and "\x00" not in k),
        SAFE_JSON, max_size=3,
    ))  # fmt: skip
    document: dict[str, Any] = {**extra, **values}
    expected: dict[str, Any] = {"values": values, "extra": extra or None, "seq": None,
                                "time": NOW, "event": None}  # fmt: skip
    if draw(st.booleans()):
        expected["seq"] = document["seq"] = draw(st.integers(0, 2**63 - 1))
    when = draw(st.none() | TIMESTAMPS)
    if when is not None:
        form = draw(st.sampled_from(["rfc3339", "seconds", "milliseconds"]))
        if form == "rfc3339":
            document["ts"] = when.isoformat()
            expected["time"] = when.astimezone(UTC)
        elif form == "seconds":
            document["ts"] = int(when.timestamp())
            expected["time"] = datetime.fromtimestamp(int(when.timestamp()), UTC)
        else:
            document["ts"] = int(when.timestamp() * 1000)
            expected["time"] = datetime.fromtimestamp(document["ts"] / 1000, UTC)
    if channel == "event":
        event = draw(st.sampled_from(_events(model)))
        expected["event"] = document["event"] = event
        if kind == "door_access" and draw(st.booleans()):
            document["credential"] = draw(CREDENTIALS)
    return kind, document, expected


def _matches(reading: Any, expected: dict[str, Any]) -> None:
    assert reading.values == expected["values"]
    assert reading.extra == expected["extra"]
    assert (reading.seq, reading.time, reading.event) == (
        expected["seq"], expected["time"], expected["event"])  # fmt: skip


def _checked(validate: Any, document: Any) -> tuple[str, Any]:
    try:
        return "valid", validate(document)
    except ValidationError as exc:
        return "invalid", exc.errors(include_url=False)


@settings(FUZZ, max_examples=400)
@given(
    document=st.one_of(
        OBJECT,
        EVENT_OBJECT,
        valid_message("telemetry").map(lambda case: orjson.dumps(case[1]).decode()),
    ),
    kind=st.sampled_from(sorted(TELEMETRY_MODELS)),
    channel=st.sampled_from(["telemetry", "event"]),
)
@example(document='{"credential": "' + "9" * 257 + '"}', kind="door_access", channel="event")
def test_the_decoders_payload_schema_checks_exactly_what_the_model_does(
    document: str, kind: str, channel: str
):
    """The hot path validates into a plain dict (`PayloadSchema`) instead of the model: for
    any JSON object, the same verdict, the same errors, and the same fields and extras."""
    try:
        parsed = orjson.loads(document)
    except orjson.JSONDecodeError:
        return  # not JSON: refused before either is asked
    model = (TELEMETRY_MODELS if channel == "telemetry" else EVENT_MODELS)[kind]
    schema = (TELEMETRY_SCHEMAS if channel == "telemetry" else EVENT_SCHEMAS)[kind]
    verdict, by_model = _checked(model.model_validate, parsed)
    assert _checked(schema.validate, parsed)[0] == verdict
    if verdict == "invalid":
        assert _checked(schema.validate, parsed)[1] == by_model
        return
    fields = schema.validate(parsed)
    declared = {k: v for k, v in fields.items() if k in schema.declared}
    extra = {k: v for k, v in fields.items() if k not in schema.declared}
    assert declared == {
        k: getattr(by_model, k) for k in by_model.model_fields_set if k in model.model_fields
    }
    assert extra == (by_model.model_extra or {})
    assert schema.declared == set(model.model_fields)


@FUZZ
@given(case=valid_message("telemetry") | valid_message("event"))
def test_a_valid_reading_decodes_to_what_was_sent(case: tuple[str, dict[str, Any], dict]):
    kind, document, expected = case
    channel = "telemetry" if expected["event"] is None else "event"
    out = outcome(f"gw/dev/{KIND_DEVICE[kind]}/{channel}", orjson.dumps(document))
    assert out.dead_letters == []
    [reading] = out.readings
    _matches(reading, expected)
    if "credential" in document:
        assert reading.credential_hash == DECODERS[0].hash_credential(document["credential"])
        assert "credential" not in reading.values
        assert "credential" not in (reading.extra or {})


@FUZZ
@given(
    elements=st.lists(
        valid_message("telemetry", "smart_bin")
        | st.sampled_from([{"fill": 100.5}, {"fill": "5"}, {"tilt": 181}, 3, "x", [], None]),
        min_size=1, max_size=6,
    )
)  # fmt: skip
def test_a_buffer_flush_stores_each_good_element_and_dead_letters_each_bad_one(elements):
    documents = [e[1] if isinstance(e, tuple) else e for e in elements]
    out = outcome("gw/dev/bin-1/telemetry", orjson.dumps(documents))
    good = [e[2] for e in elements if isinstance(e, tuple)]
    assert len(out.readings) == len(good)
    assert len(out.dead_letters) == len(elements) - len(good)
    for reading, expected in zip(out.readings, good, strict=True):
        _matches(reading, expected)


FINITE = {"allow_nan": False, "allow_infinity": False}


@FUZZ
@given(
    smoke=st.none() | st.booleans(), test=st.none() | st.booleans(),
    tamper=st.none() | st.booleans(), battery=st.none() | st.integers(0, 100),
    temperature=st.none() | st.floats(-50, 250, **FINITE),
)  # fmt: skip
def test_zigbee2mqtt_smoke_state_round_trips(smoke, test, tamper, battery, temperature):
    state = {"smoke": smoke, "test": test, "tamper": tamper, "battery": battery,
             "temperature": temperature, "linkquality": 100}  # fmt: skip
    out = outcome("gw/codec/zigbee2mqtt/smoke-1", orjson.dumps(state))
    [reading] = out.readings
    sent = {"alarm": smoke, "test": test, "tamper": tamper, "battery": battery,
            "temperature": temperature}  # fmt: skip
    assert reading.values == {k: v for k, v in sent.items() if v is not None}


@FUZZ
@given(contact=st.booleans(), battery=st.integers(0, 100))
def test_zigbee2mqtt_contact_round_trips(contact: bool, battery: int):
    out = outcome("gw/codec/zigbee2mqtt/door-1", orjson.dumps({"contact": contact,
                                                                "battery": battery}))  # fmt: skip
    [reading] = out.readings
    assert reading.values == {"door_open": not contact, "battery": battery}


@FUZZ
@given(
    f_cnt=st.integers(0, 2**32 - 1), angle=st.floats(-180, 180, **FINITE),
    temperature=st.floats(-50, 250, **FINITE), fire=st.booleans(),
)  # fmt: skip
def test_chirpstack_bin_uplink_round_trips(f_cnt, angle, temperature, fire):
    decoded = {"angle": angle, "temperature": temperature, "alarmFire": fire}
    uplink = {"time": "2024-05-01T08:30:00+00:00", "fCnt": f_cnt,
              "deviceInfo": {"deviceName": "bin-1"}, "object": decoded}  # fmt: skip
    out = outcome("gw/codec/chirpstack/bin-1", orjson.dumps(uplink))
    assert out.dead_letters == []
    telemetry = next(r for r in out.readings if r.channel == "telemetry")
    assert telemetry.seq == f_cnt
    assert (telemetry.values["tilt"], telemetry.values["temperature"]) == (abs(angle), temperature)
    assert telemetry.values["fire"] is fire


@FUZZ
@given(serial=st.integers(0, 2**31 - 1), card_no=st.text("0123456789", min_size=1, max_size=20))
def test_hikvision_card_event_round_trips(serial: int, card_no: str):
    body = patched(HIK_CARD, {"AccessControllerEvent.serialNo": serial,
                              "AccessControllerEvent.cardNo": card_no})  # fmt: skip
    out = outcome("gw/codec/hikvision/door-1", orjson.dumps(body))
    [event] = out.readings
    assert (event.event, event.seq) == ("access_granted", serial)
    assert event.credential_hash == DECODERS[0].hash_credential(card_no)
