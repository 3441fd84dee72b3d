"""`chirpstack` codec: a ChirpStack v4 uplink event (the JSON of the MQTT integration's
`application/{id}/device/{devEui}/event/up`), bridged to `gw/codec/chirpstack/{device_id}`.

The device must have a codec in its ChirpStack device profile: this codec reads the
decoded `object`, not the raw `data`. Field names are those of Dingtek's ChirpStack/TTN
JavaScript decoders for their ultrasonic sensors (DC410-style manhole level/tilt sensor,
DF555/DF702-style bin fill sensor):

    level         distance from the sensor to the surface below it, in MILLIMETRES
                  (Dingtek decoders: `(bytes[5] << 8) + bytes[6]`, unit mm; their
                  thresholds such as `levelThreshold` are in cm, the reading is mm)
    angle         tilt in degrees; decoders emit it signed, so tilt = |angle|
    temperature   °C
    alarmLevel    level beyond the configured threshold (bin full / water high)
    alarmFall     tilt beyond the configured threshold (cover lifted / bin knocked over)
    alarmFire     temperature beyond the fire threshold (bins)
    alarmBattery  battery low
    frameCounter  the sensor's own 16-bit uplink counter
    volt          battery voltage, V (some models)

Envelope:
    `time` → `ts` (ChirpStack's RX time, RFC 3339 with nanoseconds, cut to µs).
    `fCnt` → `seq`. One rule for every device: the LoRaWAN frame counter is what the
        network server itself deduplicates on, it is 32-bit and present for any device
        profile. `object.frameCounter` is kept as the extra field `frame_counter`. Both
        counters restart when the device rejoins; the store's dedup window copes with that.
        An absent `fCnt` (older ChirpStack 4.x omit zero-valued fields) gives no `seq`
        rather than a guessed 0.
    `rxInfo[].rssi` → `rssi`: the best (highest) over all receiving gateways; that
        gateway's `snr` → extra `snr`.
    `deviceInfo` is required (it is what makes this a v4 event; v3 events had
        `devEUI` / `objectJSON` at the top) but its names and EUI are not checked: the
        topic's device id is the registered id.

Manhole covers (`manhole_cover`):
    tilt = |angle|; open = alarmFall (the sensor's verdict that the cover is tilted past
    its threshold, i.e. lifted or displaced); temperature; water_level = % of the well
    depth from `level` and the registered `height_cm` (sensor to well bottom):
    clamp((height − distance) / height × 100, 0, 100). Without a registered height the
    reading is still stored (the cover state matters most) but without `water_level`.
    Extras: `level_mm`, `alarm_level`, `battery_low`, `frame_counter`, `battery_voltage`, `snr`.

Smart bins (`smart_bin`):
    fill = clamp((height − distance) / height × 100, 0, 100) from `level` and the
    registered `height_cm` (sensor to bin floor). A bin without a height is rejected
    (CodecError): fill is the reading a bin exists for, and the dead letter tells the
    operator to register it. tilt = |angle|; temperature; fire = alarmFire.
    alarmFall → a `knocked_over` event (bin telemetry has no field for it), re-emitted
    with every uplink while the flag is set; the event carries no `seq` so it can never
    be taken for a duplicate of the telemetry reading.
    Extras as for manholes (`alarm_level` = bin full).

No `opened` / `fire` events are emitted for flags that have a telemetry field: a codec
is stateless and the flags repeat in every heartbeat uplink.

Dingtek's battery is a low-battery flag (`alarmBattery`, or `battery: true|false` in
older decoders), not a percentage, so `battery` is never set; `volt` is not converted to
a percentage (the discharge curve is model-specific). Unit-suffixed strings from the old
TTN decoder variants (`"level": "1700 mm"`) are rejected: install the numeric decoder.
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
    get_object,
    get_timestamp,
    percent_from_distance,
    registered_height,
)

if TYPE_CHECKING:
    from ingest.decode import DeviceInfo

NAME = "chirpstack"
_READING_KEYS = ("level", "angle", "temperature", "alarmLevel", "alarmFall", "alarmFire",
                 "alarmBattery")  # fmt: skip


def decode(document: Any, device: DeviceInfo) -> Output:
    uplink = as_object(document, "uplink event")
    if device.kind not in ("manhole_cover", "smart_bin"):
        raise CodecError(
            f"chirpstack decodes manhole_cover and smart_bin devices; "
            f"{device.id!r} is a {device.kind}"
        )
    if uplink.get("deviceInfo") is None:
        raise CodecError("deviceInfo is missing: not a ChirpStack v4 uplink event "
                         "(v3 events are not supported)")  # fmt: skip
    get_object(uplink, "deviceInfo", "deviceInfo", required=True)
    if uplink.get("object") is None:
        raise CodecError("object is missing: ChirpStack sent no decoded payload; "
                         "configure the Dingtek codec in the device profile")  # fmt: skip
    decoded = as_object(uplink["object"], "object")
    if not any(decoded.get(key) is not None for key in _READING_KEYS):
        raise CodecError(
            f"object has no Dingtek reading (expected one of {', '.join(_READING_KEYS)}); "
            f"parameter reports are not readings"
        )

    native = _envelope(uplink)
    level_mm = get_number(decoded, "level", "object.level")
    if level_mm is not None and level_mm < 0:
        raise CodecError(f"object.level must not be negative, got {level_mm}")
    angle = get_number(decoded, "angle", "object.angle")
    temperature = get_number(decoded, "temperature", "object.temperature")
    alarm_level = get_bool(decoded, "alarmLevel", "object.alarmLevel")
    alarm_fall = get_bool(decoded, "alarmFall", "object.alarmFall")
    alarm_battery = get_bool(decoded, "alarmBattery", "object.alarmBattery")
    frame_counter = get_int(decoded, "frameCounter", "object.frameCounter")
    volt = get_number(decoded, "volt", "object.volt")
    if alarm_battery is None and isinstance(decoded.get("battery"), bool):
        alarm_battery = decoded["battery"]

    if angle is not None:
        native["tilt"] = abs(angle)
    if temperature is not None:
        native["temperature"] = temperature
    if level_mm is not None:
        native["level_mm"] = level_mm
    if alarm_level is not None:
        native["alarm_level"] = alarm_level
    if alarm_battery is not None:
        native["battery_low"] = alarm_battery
    if frame_counter is not None:
        native["frame_counter"] = frame_counter
    if volt is not None:
        native["battery_voltage"] = volt

    if device.kind == "manhole_cover":
        height = registered_height(device.height_cm, device.id, "water_level")
        if level_mm is not None and height is not None:
            native["water_level"] = percent_from_distance(level_mm / 10, height)
        if alarm_fall is not None:
            native["open"] = alarm_fall
        return [("telemetry", native)]

    alarm_fire = get_bool(decoded, "alarmFire", "object.alarmFire")
    if alarm_fire is not None:
        native["fire"] = alarm_fire
    if level_mm is not None:
        height = registered_height(device.height_cm, device.id, "fill")
        if height is None:
            raise CodecError(
                f"bin {device.id!r} has no registered height_cm: fill cannot be computed "
                f"from object.level; register the height (sensor to bin floor, cm)"
            )
        native["fill"] = percent_from_distance(level_mm / 10, height)
    out: Output = [("telemetry", native)]
    if alarm_fall:
        event: Native = {"event": "knocked_over"}
        if "ts" in native:
            event["ts"] = native["ts"]
        out.append(("event", event))
    return out


def _envelope(uplink: dict[str, Any]) -> Native:
    native: Native = {}
    ts = get_timestamp(uplink, "time", "time")
    if ts is not None:
        native["ts"] = ts
    f_cnt = get_int(uplink, "fCnt", "fCnt")
    if f_cnt is not None:
        native["seq"] = f_cnt
    rx_info = uplink.get("rxInfo")
    if rx_info is None:
        return native
    if not isinstance(rx_info, list):
        raise CodecError("rxInfo must be a JSON array")
    best: tuple[float, float | None] | None = None
    for index, entry in enumerate(rx_info):
        gateway = as_object(entry, f"rxInfo[{index}]")
        rssi = get_number(gateway, "rssi", f"rxInfo[{index}].rssi")
        snr = get_number(gateway, "snr", f"rxInfo[{index}].snr")
        if rssi is not None and (best is None or rssi > best[0]):
            best = (rssi, snr)
    if best is not None:
        native["rssi"] = best[0]
        if best[1] is not None:
            native["snr"] = best[1]
    return native
