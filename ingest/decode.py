"""One raw MQTT message → stored readings or dead letters. Pure: no I/O.

Every way a message can be bad maps to one stable dead-letter reason code, so
operators can count and filter them (`GET /api/dead-letters?reason=`): `bad_topic`,
`bad_device_id`, `oversized`, `unknown_device`, `rate_limited` (a registered device over
its token bucket, `RateLimiter`), `not_utf8`, `not_json`, `not_object`, `wrong_type`,
`out_of_range`, `missing_field`, `unknown_event`, `bad_timestamp`, `bad_status`,
`device_mismatch`, `unknown_codec`, `codec_error`, `storage_rejected` (an extra field nested
deeper than can be written back); the consumer adds `storage_rejected` for what the database
itself refuses.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from pydantic import ValidationError

from gridwarden.readings import DeviceInfo, Reading
from ingest.codecs import CODECS, CodecError
from ingest.models import EVENT_SCHEMAS, TELEMETRY_SCHEMAS
from ingest.topics import TopicError, check_device_id, parse_topic, usual_topic

EARLIEST_VALID_TS = datetime(2000, 1, 1, tzinfo=UTC)
MAX_FUTURE_SKEW = timedelta(days=1)
EPOCH_MS_THRESHOLD = 1e11  # numbers above this are milliseconds (1e11 s is the year 5138)
__all__ = ["DeviceInfo", "Reading"]  # re-exported: they live in the shared core


# Not frozen: one is made per message, and a frozen dataclass takes three times as long
# to build (each field set through object.__setattr__). Treat it as read-only.
@dataclass(slots=True)
class RawMessage:
    topic: str
    payload: bytes
    received_at: datetime
    mid: int = 0
    qos: int = 0
    generation: int = 0  # the MQTT connection it came on; acks go only to that one


@dataclass(frozen=True, slots=True)
class StatusChange:
    device_id: str
    status: str
    received_at: datetime


@dataclass(frozen=True, slots=True)
class DeadLetter:
    topic: str
    device_id: str | None
    reason: str
    detail: str
    payload: bytes
    received_at: datetime


@dataclass(slots=True)
class Decoded:
    readings: list[Reading] = field(default_factory=list)
    statuses: list[StatusChange] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    # The messages dead-lettered as `unknown_device`: the consumer decodes just these
    # again after refreshing the registry (the others must not be charged twice).
    unknown: list[RawMessage] = field(default_factory=list)

    def extend(self, later: Decoded) -> None:
        """Add what the messages after this batch's gave, in their order."""
        self.readings += later.readings
        self.statuses += later.statuses
        self.dead_letters += later.dead_letters
        self.unknown += later.unknown


class BadInput(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def parse_ts(value: str | float | None, received_at: datetime) -> datetime:
    if value is None:
        return received_at
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise BadInput("bad_timestamp", f"ts {value!r} is not RFC 3339") from None
        if parsed.tzinfo is None:
            raise BadInput("bad_timestamp", f"ts {value!r} has no UTC offset")
    else:
        seconds = value / 1000 if value > EPOCH_MS_THRESHOLD else value
        try:
            parsed = datetime.fromtimestamp(seconds, UTC)
        except (OverflowError, OSError, ValueError):
            raise BadInput("bad_timestamp", f"ts {value!r} is out of range") from None
    if parsed < EARLIEST_VALID_TS or parsed > received_at + MAX_FUTURE_SKEW:
        raise BadInput("bad_timestamp", f"ts {value!r} is before 2000 or more than a day ahead")
    return parsed.astimezone(UTC)


def _validation_reason(exc: ValidationError) -> tuple[str, str]:
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]["type"]
    if first == "missing":
        reason = "missing_field"
    elif first == "literal_error":
        reason = "unknown_event"
    elif first in {"greater_than_equal", "less_than_equal", "greater_than", "less_than",
                   "string_too_long", "finite_number"}:  # fmt: skip
        reason = "out_of_range"
    else:
        reason = "wrong_type"
    detail = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'payload'}: {e['msg']}" for e in errors[:5]
    )
    return reason, detail


class RateLimiter:
    """A token bucket per device: `burst` messages at once, then `rate_per_s` on average.

    A bucket holds at most `burst` tokens, gains `rate_per_s` a second and pays one per
    message; a message finding less than one token is refused and pays nothing, so a
    device that keeps flooding still gets `rate_per_s` through. Kept in its one-number
    form (GCRA): per device only the time at which its bucket would be full again, one
    float in a dict, which costs one lookup and a few float operations per message. Only
    registered devices get an entry (unknown ones are refused before), so the state is
    bounded by the registry. `monotonic` is injectable for tests."""

    __slots__ = ("_full_at", "_interval", "_now", "_tolerance", "burst", "detail", "rate_per_s")

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        unit: str = "msg",
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError(f"rate_per_s must be > 0 and burst >= 1, got {rate_per_s}, {burst}")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.detail = f"device over {rate_per_s:g} {unit}/s (burst {burst})"
        self._interval = 1.0 / rate_per_s  # what one message costs, in seconds of refill
        # A message passes while its bucket is at most burst - 1 tokens short of full (the
        # tiny slack absorbs the rounding of adding up intervals).
        self._tolerance = (burst - 1 + 1e-6) * self._interval
        self._full_at: dict[str, float] = {}
        self._now = monotonic

    def allow(self, device_id: str, now: float | None = None) -> bool:
        """`now`: the caller's reading of `monotonic`, if it has one."""
        if now is None:
            now = self._now()
        full_at = self._full_at.get(device_id, now)
        if full_at < now:
            full_at = now
        elif full_at - now > self._tolerance:
            return False
        self._full_at[device_id] = full_at + self._interval
        return True

    def __len__(self) -> int:
        return len(self._full_at)


class Decoder:
    """Turns raw messages into readings. Holds configuration and, when a rate limit is
    set, the per-device token buckets: each message is charged once, when decoded (the
    consumer never decodes a message twice, see `Decoded.unknown`). Events have buckets of
    their own, so a device flooding telemetry still gets its alarm events through."""

    def __init__(
        self,
        *,
        prefix: str,
        max_payload_bytes: int,
        credential_key: bytes,
        lookup_device: Callable[[str], DeviceInfo | None],
        rate_per_s: float = 0.0,
        rate_burst: int = 60,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.prefix = prefix
        self.max_payload_bytes = max_payload_bytes
        self.credential_key = credential_key
        self.lookup_device = lookup_device
        # (ts, receive time, parsed time) of the last message: the next one with both the
        # same reuses the parsed time.
        self._last_time: tuple[object, datetime | None, datetime] = (None, None, EARLIEST_VALID_TS)
        self._monotonic = monotonic  # read through `_clock_at`
        self._clock_read: tuple[datetime | None, float] = (None, 0.0)
        self.limiter: RateLimiter | None = None  # 0: no limit
        self.event_limiter: RateLimiter | None = None
        if rate_per_s > 0:
            self.limiter = RateLimiter(rate_per_s, rate_burst, monotonic=monotonic)
            self.event_limiter = RateLimiter(
                rate_per_s, rate_burst, unit="events", monotonic=monotonic
            )

    def decode(self, message: RawMessage, into: Decoded) -> None:
        device_id: str | None = None
        try:
            usual = usual_topic(message.topic, self.prefix)
            if usual is not None:
                device_id, channel = usual
                self._decode(channel, device_id, None, message, into)
            else:
                topic = parse_topic(message.topic, self.prefix)
                device_id = topic.device_id
                self._decode(topic.channel, device_id, topic.codec, message, into)
        except (BadInput, TopicError) as exc:
            detail = exc.detail if isinstance(exc, BadInput) else str(exc)
            if exc.reason == "bad_device_id":
                device_id = None  # not an id: the column holds ids
            into.dead_letters.append(
                DeadLetter(message.topic, device_id, exc.reason, detail, message.payload,
                           message.received_at)
            )  # fmt: skip

    def _decode(
        self, channel: str, device_id: str, codec_name: str | None, message: RawMessage,
        into: Decoded,
    ) -> None:  # fmt: skip
        payload = message.payload
        device = self.lookup_device(device_id)
        if device is None:
            # Only here: a registered id is well formed (the registry's CHECK), and the
            # usual message skips the pattern.
            check_device_id(device_id)
        if len(payload) > self.max_payload_bytes:
            raise BadInput(
                "oversized", f"{len(payload)} bytes, the limit is {self.max_payload_bytes}"
            )
        if device is None:
            into.unknown.append(message)
            raise BadInput("unknown_device", f"device {device_id!r} is not registered")
        limiter = self.event_limiter if channel == "event" else self.limiter
        if limiter is not None and not limiter.allow(
            device.id, self._clock_at(message.received_at)
        ):
            raise BadInput("rate_limited", limiter.detail)
        if channel == "status":
            into.statuses.append(self._status(device_id, payload, message.received_at))
            return
        if b"\\u0000" in payload:
            # PostgreSQL text and jsonb cannot hold NUL; refuse it here, with a reason.
            raise BadInput("wrong_type", "strings must not contain NUL (\\u0000)")
        document = _load_json(payload)
        if channel == "codec":
            codec = CODECS.get(codec_name or "")
            if codec is None:
                raise BadInput("unknown_codec", f"no codec named {codec_name!r}")
            try:
                decoded = codec(document, device)
            except CodecError as exc:
                raise BadInput("codec_error", f"{codec_name}: {exc}") from None
            for native_channel, native in decoded:
                self._native(native_channel, native, device, message, into, index=None)
            return
        if channel == "telemetry" and isinstance(document, list):
            if not document:
                raise BadInput("not_object", "empty array")
            for index, element in enumerate(document):
                try:
                    self._native("telemetry", element, device, message, into, index=index)
                except BadInput as exc:
                    into.dead_letters.append(DeadLetter(
                        message.topic, device.id, exc.reason,
                        f"element {index} of {len(document)}: {exc.detail}",
                        orjson.dumps(element), message.received_at,
                    ))  # fmt: skip
            return
        self._native(channel, document, device, message, into, index=None)

    def _native(
        self,
        channel: str,
        document: Any,
        device: DeviceInfo,
        message: RawMessage,
        into: Decoded,
        index: int | None,
    ) -> None:
        if not isinstance(document, dict):
            raise BadInput("not_object", f"expected a JSON object, got {type(document).__name__}")
        schema = (TELEMETRY_SCHEMAS if channel == "telemetry" else EVENT_SCHEMAS)[device.kind]
        try:
            checked = schema.validate(document)
        except ValidationError as exc:
            raise BadInput(*_validation_reason(exc)) from None
        # `checked` is validation's own new dict: it becomes the reading's values once the
        # common keys, the nulls and what is not declared (`extra`, kept as given) are out.
        values: dict[str, Any] = checked
        named = values.pop("device_id", None)
        if named is not None and named != device.id:
            raise BadInput(
                "device_mismatch",
                f"payload names device {named!r} but was published for {device.id!r}",
            )
        ts, seq = values.pop("ts", None), values.pop("seq", None)
        declared = schema.declared
        extra: dict[str, Any] | None = None
        if not values.keys() <= declared:
            extra = {key: value for key, value in values.items() if key not in declared}
            values = {key: value for key, value in values.items() if key in declared}
        if None in values.values():  # declared values only: floats, ints, bools, strings
            values = {key: value for key, value in values.items() if value is not None}
        if extra is not None:
            # orjson reads 1,024 levels of nesting but writes only 254: found here, such a
            # message is one dead letter; found by the writer, its whole batch was written
            # again message by message to find it (a hostile device's cheap slowdown).
            try:
                orjson.dumps(extra)
            except orjson.JSONEncodeError as exc:
                raise BadInput("storage_rejected", f"cannot be stored: {exc}") from None
        received_at = message.received_at
        last = self._last_time
        if ts == last[0] and received_at is last[1]:
            at = last[2]  # parse_ts is pure: the messages of one read often share their ts
        else:
            at = parse_ts(ts, received_at)
            self._last_time = (ts, received_at, at)
        # Positional: keywords cost a third more, once per message.
        reading = Reading(channel, device.id, at, received_at, seq, values, extra)
        if channel == "event":
            reading.event = values.pop("event")
            credential = values.pop("credential", None)
            if credential is not None:
                reading.credential_hash = self.hash_credential(credential)
        into.readings.append(reading)

    def _clock_at(self, received_at: datetime) -> float:
        """`monotonic`, read once per receive time (one socket read), not per message."""
        read_for, now = self._clock_read
        if received_at is not read_for:
            now = self._monotonic()
            self._clock_read = (received_at, now)
        return now

    def hash_credential(self, credential: str) -> str:
        """Card numbers are never stored in clear: a keyed hash still lets us match them."""
        return hmac.new(self.credential_key, credential.encode(), hashlib.sha256).hexdigest()

    @staticmethod
    def _status(device_id: str, payload: bytes, received_at: datetime) -> StatusChange:
        text = payload.strip().strip(b'"').decode("ascii", errors="replace").lower()
        if text not in ("online", "offline"):
            raise BadInput("bad_status", f"status must be 'online' or 'offline', got {text[:40]!r}")
        return StatusChange(device_id, text, received_at)


def _load_json(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError as utf8_error:
            raise BadInput("not_utf8", f"payload is not UTF-8: {utf8_error}") from None
        raise BadInput("not_json", f"payload is not JSON: {exc}") from None


def credential_key(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else value


DeviceLookup = Mapping[str, DeviceInfo]
