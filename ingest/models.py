"""Payload models per device kind (CONTRACT §2), with the physical ranges.

Strict typing: a boolean must be a JSON boolean and a number a JSON number, so
`"alarm": "yes"` or `"smoke": "12"` is bad input, not silently coerced. Unknown
extra fields are kept (`model_extra`) and stored in the `extra` column.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, NotRequired, Required

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, TypeAdapter
from typing_extensions import TypedDict

# Physical ranges. Temperatures reach well above the 57 °C heat-detector threshold
# in a real fire, so the upper bound is wide; below -50 °C no sensor here operates.
Percent = Annotated[float, Field(ge=0, le=100)]
Degrees = Annotated[float, Field(ge=0, le=180)]
Celsius = Annotated[float, Field(ge=-50, le=250)]
Ppm = Annotated[float, Field(ge=0, le=10_000)]
Dbm = Annotated[float, Field(ge=-200, le=0)]
Kilograms = Annotated[float, Field(ge=0, le=10_000)]
Seq = Annotated[int, Field(ge=0, le=2**63 - 1)]
Timestamp = StrictStr | Annotated[float, Field(ge=0)]

DEVICE_KINDS = ("smoke_detector", "manhole_cover", "door_access", "smart_bin")
DeviceKind = Literal["smoke_detector", "manhole_cover", "door_access", "smart_bin"]

# Numeric and boolean reading columns of the telemetry table, in table order.
NUMERIC_FIELDS = (
    "battery", "rssi", "smoke", "temperature", "co", "tilt", "water_level",
    "gas_ch4", "gas_h2s", "fill", "weight",
)  # fmt: skip
BOOLEAN_FIELDS = ("alarm", "test", "tamper", "open", "door_open", "locked", "fire")


class _Common(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", frozen=True)

    ts: Timestamp | None = None
    seq: Seq | None = None
    # A card number (CONTRACT §2, door events): declared on every model, so it never lands
    # in `extra` in clear. On an event the decoder stores only its keyed hash
    # (`credential_hash`); telemetry has no place for it and it is not stored.
    credential: StrictStr | None = Field(default=None, max_length=256)
    battery: Percent | None = None
    rssi: Dbm | None = None
    device_id: StrictStr | None = None  # if a device names itself, it must match its topic


class SmokeTelemetry(_Common):
    smoke: Percent | None = None
    temperature: Celsius | None = None
    alarm: StrictBool | None = None
    test: StrictBool | None = None
    tamper: StrictBool | None = None
    co: Ppm | None = None


class ManholeTelemetry(_Common):
    tilt: Degrees | None = None
    open: StrictBool | None = None
    water_level: Percent | None = None
    gas_ch4: Percent | None = None
    gas_h2s: Ppm | None = None
    temperature: Celsius | None = None


class DoorTelemetry(_Common):
    door_open: StrictBool | None = None
    locked: StrictBool | None = None


class BinTelemetry(_Common):
    fill: Percent | None = None
    temperature: Celsius | None = None
    tilt: Degrees | None = None
    fire: StrictBool | None = None
    weight: Kilograms | None = None


class SmokeEvent(_Common):
    event: Literal["alarm", "test", "tamper", "silenced"]


class ManholeEvent(_Common):
    event: Literal["opened", "closed", "tamper"]


class DoorEvent(_Common):
    event: Literal[
        "access_granted", "access_denied", "door_opened", "door_closed",
        "door_forced", "door_held_open", "tamper",
    ]  # fmt: skip


class BinEvent(_Common):
    event: Literal["fire", "knocked_over", "emptied"]


TELEMETRY_MODELS: dict[str, type[_Common]] = {
    "smoke_detector": SmokeTelemetry,
    "manhole_cover": ManholeTelemetry,
    "door_access": DoorTelemetry,
    "smart_bin": BinTelemetry,
}
EVENT_MODELS: dict[str, type[_Common]] = {
    "smoke_detector": SmokeEvent,
    "manhole_cover": ManholeEvent,
    "door_access": DoorEvent,
    "smart_bin": BinEvent,
}


@dataclass(frozen=True, slots=True)
class PayloadSchema:
    """A payload model's checks as a validator returning a plain dict, declared and extra
    keys together, with the model's errors (type, location, message) for the same input:
    the decoder's hot path, which skips building a model instance (1.0 µs a message
    instead of 2.3). The models above stay the one definition of a payload."""

    validate: Callable[[Any], dict[str, Any]]
    declared: frozenset[str]


def payload_schema(model: type[BaseModel]) -> PayloadSchema:
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        annotation: Any = info.annotation
        if info.metadata:
            annotation = Annotated[(annotation, *info.metadata)]
        fields[name] = Required[annotation] if info.is_required() else NotRequired[annotation]
    make_typed_dict: Any = TypedDict  # its fields are known only here, at run time
    as_dict = make_typed_dict(f"{model.__name__}Fields", fields)
    as_dict.__pydantic_config__ = ConfigDict(strict=True, extra="allow")
    return PayloadSchema(TypeAdapter(as_dict).validator.validate_python, frozenset(fields))


TELEMETRY_SCHEMAS = {kind: payload_schema(model) for kind, model in TELEMETRY_MODELS.items()}
EVENT_SCHEMAS = {kind: payload_schema(model) for kind, model in EVENT_MODELS.items()}
