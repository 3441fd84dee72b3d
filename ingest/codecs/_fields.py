"""Typed access to vendor JSON for the codecs.

Every accessor names the field by its path in the vendor document (`object.level`,
`AccessControllerEvent.subEventType`) so a dead letter says exactly what was wrong.
JSON `null` counts as absent: vendors (Zigbee2MQTT above all) publish `null` for an
attribute they have not read yet.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

from ingest.codecs import CodecError

Native = dict[str, Any]
Output = list[tuple[str, Native]]


def json_kind(value: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def as_object(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CodecError(f"{path} must be a JSON object, got {json_kind(value)}")
    return value


def _present(obj: dict[str, Any], key: str, path: str, required: bool) -> Any:
    value = obj.get(key)
    if value is None and required:
        raise CodecError(f"{path} is missing")
    return value


def get_object(
    obj: dict[str, Any], key: str, path: str, *, required: bool = False
) -> dict[str, Any] | None:
    value = _present(obj, key, path, required)
    return None if value is None else as_object(value, path)


def get_bool(obj: dict[str, Any], key: str, path: str, *, required: bool = False) -> bool | None:
    value = _present(obj, key, path, required)
    if value is None or isinstance(value, bool):
        return value
    raise CodecError(f"{path} must be a boolean, got {json_kind(value)} {_short(value)}")


def get_number(obj: dict[str, Any], key: str, path: str, *, required: bool = False) -> float | None:
    """A JSON number as a finite float (integers too large for a float are rejected)."""
    value = _present(obj, key, path, required)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CodecError(f"{path} must be a number, got {json_kind(value)} {_short(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise CodecError(f"{path} is out of range: {_short(value)}") from None
    if not math.isfinite(number):
        raise CodecError(f"{path} must be a finite number, got {value!r}")
    return number


def get_int(obj: dict[str, Any], key: str, path: str, *, required: bool = False) -> int | None:
    """A JSON integer; an integral float (`12.0`, as protobuf JSON may write it) counts."""
    value = _present(obj, key, path, required)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise CodecError(f"{path} must be an integer, got {json_kind(value)} {_short(value)}")


def get_str(obj: dict[str, Any], key: str, path: str, *, required: bool = False) -> str | None:
    value = _present(obj, key, path, required)
    if value is None or isinstance(value, str):
        return value
    raise CodecError(f"{path} must be a string, got {json_kind(value)} {_short(value)}")


def get_timestamp(
    obj: dict[str, Any], key: str, path: str, *, required: bool = False, epoch: bool = False
) -> str | float | None:
    """An RFC 3339 time with a UTC offset, normalised (nanoseconds are cut to microseconds).

    With `epoch=True` a JSON number is also accepted and passed on as Unix seconds or
    milliseconds, which the base decoder tells apart.
    """
    value = _present(obj, key, path, required)
    if value is None:
        return None
    if epoch and isinstance(value, int | float) and not isinstance(value, bool):
        number = get_number(obj, key, path)
        assert number is not None
        if number < 0:
            raise CodecError(f"{path} must not be negative, got {_short(value)}")
        return number
    if not isinstance(value, str):
        expected = "an RFC 3339 string or epoch number" if epoch else "an RFC 3339 string"
        raise CodecError(f"{path} must be {expected}, got {json_kind(value)} {_short(value)}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise CodecError(f"{path} {_short(value)} is not an RFC 3339 time") from None
    if parsed.tzinfo is None:
        raise CodecError(f"{path} {_short(value)} has no UTC offset")
    return parsed.isoformat()


def percent_from_distance(distance_cm: float, height_cm: float) -> float:
    """How full a vessel of `height_cm` is when the sensor on top measures `distance_cm`
    to the surface: clamp((height - distance) / height * 100, 0, 100), to 0.1 %."""
    ratio = (height_cm - distance_cm) / height_cm * 100
    return round(min(max(ratio, 0.0), 100.0), 1)


def registered_height(height_cm: float | None, device_id: str, what: str) -> float | None:
    if height_cm is None:
        return None
    if not math.isfinite(height_cm) or height_cm <= 0:
        raise CodecError(
            f"device {device_id!r} is registered with height_cm={height_cm!r}; "
            f"{what} needs a positive height"
        )
    return float(height_cm)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
