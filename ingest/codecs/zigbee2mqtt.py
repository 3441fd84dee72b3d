"""`zigbee2mqtt` codec: the device state JSON Zigbee2MQTT publishes on `zigbee2mqtt/<name>`.

Bridge it unchanged to `gw/codec/zigbee2mqtt/{device_id}` (e.g. a Mosquitto bridge or
an MQTT rule). Zigbee2MQTT publishes the whole cached state of the device on every
change and on every periodic report, so a message is a *state*, not a happening.

Smoke detectors (device kind `smoke_detector`; Heiman HS1SA, Tuya TS0601 smoke,
Develco SMSZB-120 …):

| Zigbee2MQTT          | gridwarden                                                 |
|----------------------|------------------------------------------------------------|
| `smoke` (bool)       | `alarm` — the detector's own verdict that smoke is present |
| `test` (bool)        | `test`                                                     |
| `tamper` (bool)      | `tamper`                                                   |
| `temperature` (°C)   | `temperature`                                              |
| `battery` (%)        | `battery`                                                  |
| `smoke_concentration`| extra `smoke_concentration`, unconverted (see below)       |
| `battery_low` (bool) | extra `battery_low`                                        |
| `voltage` (mV)       | extra `voltage_mv`                                         |
| `linkquality` (LQI)  | extra `linkquality` (0–255 link quality, *not* dBm: no `rssi`) |
| `last_seen`          | `ts` (ISO 8601 string, or epoch milliseconds)              |

`smoke_concentration` is what some Tuya detectors report (Zigbee2MQTT documents it in
ppm). gridwarden's `smoke` reading is optical obscuration in %/m; there is no honest
conversion between the two, so `smoke` is never set by this codec and the raw value is
kept as an extra field.

No `alarm` event is emitted for `smoke: true`: a codec is stateless and Zigbee2MQTT
repeats the state in every message, so an event per message would report one fire many
times. The telemetry `alarm: true` is what the rules act on.

Contact sensors on doors (device kind `door_access`; Aqara MCCGQ11LM, Sonoff SNZB-04 …):
`contact: true` means the magnet is next to the sensor, i.e. the door is CLOSED, so
`door_open = not contact`. `battery`, `battery_low`, `voltage`, `linkquality`,
`last_seen` as above. Door telemetry has no tamper field, so `tamper: true` becomes a
`tamper` event, re-emitted with every message while the sensor reports it (the alarm
engine folds repeats into one alarm).

Zigbee2MQTT has no message counter, so there is no `seq`. A JSON `null` (an attribute
not read yet) counts as absent. A payload with none of the fields above is rejected: it
is not a Zigbee2MQTT state message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ingest.codecs import CodecError
from ingest.codecs._fields import (
    Native,
    Output,
    as_object,
    get_bool,
    get_int,
    get_number,
    get_timestamp,
)

if TYPE_CHECKING:
    from ingest.decode import DeviceInfo

NAME = "zigbee2mqtt"
_COMMON_KEYS = ("battery", "battery_low", "voltage", "linkquality", "last_seen")
_SMOKE_KEYS = ("smoke", "test", "tamper", "temperature", "smoke_concentration", *_COMMON_KEYS)
_DOOR_KEYS = ("contact", "tamper", *_COMMON_KEYS)


def decode(document: Any, device: DeviceInfo) -> Output:
    state = as_object(document, "payload")
    if device.kind == "smoke_detector":
        return _smoke(state)
    if device.kind == "door_access":
        return _door(state)
    raise CodecError(
        f"zigbee2mqtt decodes smoke_detector and door_access devices; "
        f"{device.id!r} is a {device.kind}"
    )


def _common(state: dict[str, Any], expected: tuple[str, ...], kind: str) -> Native:
    if not any(state.get(key) is not None for key in expected):
        raise CodecError(f"no Zigbee2MQTT {kind} field in payload (expected one of "
                         f"{', '.join(expected)})")  # fmt: skip
    native: Native = {}
    ts = get_timestamp(state, "last_seen", "last_seen", epoch=True)
    if ts is not None:
        native["ts"] = ts
    battery = get_number(state, "battery", "battery")
    if battery is not None:
        native["battery"] = battery
    battery_low = get_bool(state, "battery_low", "battery_low")
    if battery_low is not None:
        native["battery_low"] = battery_low
    voltage = get_number(state, "voltage", "voltage")
    if voltage is not None:
        native["voltage_mv"] = voltage
    linkquality = get_int(state, "linkquality", "linkquality")
    if linkquality is not None:
        native["linkquality"] = linkquality
    return native


def _smoke(state: dict[str, Any]) -> Output:
    native = _common(state, _SMOKE_KEYS, "smoke detector")
    smoke = get_bool(state, "smoke", "smoke")
    if smoke is not None:
        native["alarm"] = smoke
    for key in ("test", "tamper"):
        flag = get_bool(state, key, key)
        if flag is not None:
            native[key] = flag
    temperature = get_number(state, "temperature", "temperature")
    if temperature is not None:
        native["temperature"] = temperature
    concentration = get_number(state, "smoke_concentration", "smoke_concentration")
    if concentration is not None:
        native["smoke_concentration"] = concentration
    return [("telemetry", native)]


def _door(state: dict[str, Any]) -> Output:
    native = _common(state, _DOOR_KEYS, "contact sensor")
    contact = get_bool(state, "contact", "contact")
    if contact is not None:
        native["door_open"] = not contact
    out: Output = [("telemetry", native)]
    if get_bool(state, "tamper", "tamper"):
        event: Native = {"event": "tamper"}
        if "ts" in native:
            event["ts"] = native["ts"]
        out.append(("event", event))
    return out
