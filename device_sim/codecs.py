"""Vendor payloads (CONTRACT §3) built from native readings, for devices that speak a
vendor format on `gw/codec/{codec}/{device_id}`.

* `zigbee2mqtt`: the device *state* JSON Zigbee2MQTT publishes for a smoke detector
  (Heiman/Tuya style): `smoke` (bool, the detector's alarm), `battery`, `battery_low`,
  `test`, `tamper`, `smoke_concentration` (the Tuya ppm figure, not obscuration),
  `temperature`, `voltage` (mV), `linkquality` (LQI 0–255), `last_seen`. No counter.
* `chirpstack`: a ChirpStack v4 uplink event with the decoded `object` of Dingtek-style
  sensors. `level` is the distance from the sensor to the surface in **millimetres**
  (what Dingtek's decoders emit), computed from the registered `height_cm`; `angle` is
  signed; `fCnt` and `object.frameCounter` carry the device's counter.
* `hikvision`: an ISAPI `AccessControllerEvent` (major/sub codes of the HCNetSDK table;
  `serialNo` carries the counter), and `eventType: heartBeat` keep-alives for telemetry.
"""

from __future__ import annotations

import base64
import hashlib
import random
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final

from device_sim.readings import DeviceState, format_rfc3339
from device_sim.spec import DeviceKind, DeviceSpec

ZIGBEE2MQTT: Final = "zigbee2mqtt"
CHIRPSTACK: Final = "chirpstack"
HIKVISION: Final = "hikvision"
CODECS: Final = (ZIGBEE2MQTT, CHIRPSTACK, HIKVISION)

ZIGBEE_BATTERY_LOW_PERCENT: Final = 20
DINGTEK_TILT_ALARM_DEG: Final = 10.0
DINGTEK_LEVEL_ALARM_PERCENT: Final = 90.0
DEFAULT_WELL_DEPTH_CM: Final = 200.0
CN470_UPLINK_HZ: Final = tuple(470_300_000 + 200_000 * channel for channel in range(8))
CHINA_TZ: Final = timezone(timedelta(hours=8))

# HCNetSDK access-control codes (major, sub).
MAJOR_ALARM: Final = 0x1
MAJOR_EVENT: Final = 0x5
HIKVISION_CODES: Final[dict[str, tuple[int, tuple[int, ...]]]] = {
    "access_granted": (MAJOR_EVENT, (0x01, 0x4B)),  # LEGAL_CARD_PASS, FACE_VERIFY_PASS
    "access_denied": (MAJOR_EVENT, (0x06, 0x08, 0x09)),  # no right, expired, invalid card
    "door_opened": (MAJOR_EVENT, (0x19,)),  # DOOR_OPEN_NORMAL
    "door_closed": (MAJOR_EVENT, (0x1A,)),  # DOOR_CLOSE_NORMAL
    "door_forced": (MAJOR_EVENT, (0x1B,)),  # DOOR_OPEN_ABNORMAL
    "door_held_open": (MAJOR_EVENT, (0x1C,)),  # DOOR_OPEN_TIMEOUT
    "tamper": (MAJOR_ALARM, (0x404,)),  # HOST_DESMANTLE_ALARM
}


def codec_for(spec: DeviceSpec) -> str | None:
    """The vendor format a device of this kind would speak, if any."""
    table: dict[DeviceKind, str | None] = {
        "smoke_detector": ZIGBEE2MQTT,
        "manhole_cover": CHIRPSTACK,
        "smart_bin": CHIRPSTACK if spec.height_cm is not None else None,  # fill needs height
        "door_access": HIKVISION,
    }
    return table[spec.kind]


def _digest(text: str, size: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:size]


def _lqi(rssi: float) -> int:
    """Zigbee link quality (0–255) roughly matching an RSSI in dBm."""
    return max(0, min(255, round((rssi + 100.0) * 5.5 + 20.0)))


# zigbee2mqtt --------------------------------------------------------------------------


def zigbee2mqtt_smoke(state: DeviceState, native: dict[str, Any], ts_time: float) -> dict[str, Any]:
    """The Zigbee2MQTT state message of a smoke detector whose native reading is `native`
    (an event becomes the state it leaves the device in)."""
    battery = int(native.get("battery", round(state.battery)))
    smoke = float(native.get("smoke", 0.0))
    last_seen: str | int = (
        format_rfc3339(ts_time) if state.ts_style == "rfc3339" else round(ts_time * 1000)
    )
    return {
        "battery": battery,
        "battery_low": battery < ZIGBEE_BATTERY_LOW_PERCENT,
        "linkquality": _lqi(float(native.get("rssi", state.rssi_base))),
        "smoke": bool(native.get("alarm", False)),
        "smoke_concentration": round(smoke * 10),
        "temperature": native.get("temperature"),
        "tamper": bool(native.get("tamper", False)),
        "test": bool(native.get("test", False)),
        "voltage": 2600 + battery * 5,
        "last_seen": last_seen,
    }


# ChirpStack v4 ------------------------------------------------------------------------


def chirpstack_uplink(
    spec: DeviceSpec,
    state: DeviceState,
    native: dict[str, Any],
    ts_time: float,
    counter: int,
    rng: random.Random,
) -> dict[str, Any]:
    """A ChirpStack v4 `event/up` JSON for a Dingtek manhole (DC410) or bin (DF555)."""
    battery_low = float(native.get("battery", state.battery)) < ZIGBEE_BATTERY_LOW_PERCENT
    tilt = float(native.get("tilt", 0.0))
    if spec.kind == "manhole_cover":
        depth_cm = spec.height_cm or DEFAULT_WELL_DEPTH_CM
        water = float(native.get("water_level", state.water_level))
        decoded: dict[str, Any] = {
            "level": round(depth_cm * 10 * (1 - water / 100)),
            "angle": round(state.angle_sign * tilt),
            "temperature": round(float(native.get("temperature", 20.0)), 1),
            "alarmLevel": water >= DINGTEK_LEVEL_ALARM_PERCENT,
            "alarmFall": bool(native.get("open", False)) or tilt > DINGTEK_TILT_ALARM_DEG,
            "alarmBattery": battery_low,
            "frameCounter": counter & 0xFFFF,
        }
        profile = "Dingtek DC410 manhole"
    else:
        height_cm = spec.height_cm or 100.0
        fill = float(native.get("fill", state.fill))
        decoded = {
            "level": round(height_cm * 10 * (1 - fill / 100)),
            "angle": round(state.angle_sign * tilt),
            "temperature": round(float(native.get("temperature", 20.0)), 1),
            "alarmLevel": fill >= DINGTEK_LEVEL_ALARM_PERCENT,
            "alarmFire": bool(native.get("fire", False)),
            "alarmFall": tilt > 45.0,
            "alarmBattery": battery_low,
            "frameCounter": counter & 0xFFFF,
        }
        profile = "Dingtek DF555 bin"
    rssi = int(native.get("rssi", round(state.rssi_base)))
    gateway = _digest(f"gw:{spec.building or spec.id[:3]}", 16)
    raw = bytes(rng.getrandbits(8) for _ in range(rng.choice((17, 21))))
    return {
        "deduplicationId": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "time": datetime.fromtimestamp(ts_time, UTC).isoformat(timespec="microseconds"),
        "deviceInfo": {
            "tenantId": "52f14cd4-c6f1-4fbd-8f87-4025e1d49242",
            "tenantName": "gridwarden",
            "applicationId": "8d8b4a8e-7a15-4e36-9d22-0c0b8b4c2f51",
            "applicationName": "city-sensors",
            "deviceProfileId": str(uuid.UUID(_digest(profile, 32))),
            "deviceProfileName": profile,
            "deviceName": spec.name or spec.id,
            "devEui": _digest(f"eui:{spec.id}", 16),
            "deviceClassEnabled": "CLASS_A",
            "tags": {"gridwarden_id": spec.id},
        },
        "devAddr": _digest(f"addr:{spec.id}", 8),
        "adr": True,
        "dr": 2,
        "fCnt": counter,
        "fPort": 3,
        "confirmed": False,
        "data": base64.b64encode(raw).decode(),
        "object": decoded,
        "rxInfo": [
            {
                "gatewayId": gateway,
                "uplinkId": rng.getrandbits(31),
                "rssi": rssi,
                "snr": round(rng.uniform(-8.0, 9.5), 1),
                "channel": rng.randrange(8),
                "location": {},
                "context": base64.b64encode(rng.getrandbits(32).to_bytes(4, "big")).decode(),
                "metadata": {"region_common_name": "CN470", "region_config_id": "cn470_10"},
                "crcStatus": "CRC_OK",
            }
        ],
        "txInfo": {
            "frequency": rng.choice(CN470_UPLINK_HZ),
            "modulation": {
                "lora": {"bandwidth": 125000, "spreadingFactor": 10, "codeRate": "CR_4_5"}
            },
        },
    }


# Hikvision ISAPI ----------------------------------------------------------------------


def _hik_envelope(spec: DeviceSpec, ts_time: float) -> dict[str, Any]:
    octets = bytes.fromhex(_digest(f"ip:{spec.id}", 6))
    mac = _digest(f"mac:{spec.id}", 12)
    return {
        "ipAddress": f"10.{octets[0]}.{octets[1]}.{max(octets[2], 2)}",
        "portNo": 80,
        "protocol": "HTTP",
        "macAddress": ":".join(mac[i : i + 2] for i in range(0, 12, 2)),
        "channelID": 1,
        "dateTime": datetime.fromtimestamp(ts_time, CHINA_TZ).isoformat(timespec="seconds"),
        "activePostCount": 1,
    }


def hikvision_heartbeat(spec: DeviceSpec, ts_time: float) -> dict[str, Any]:
    return {
        **_hik_envelope(spec, ts_time),
        "eventType": "heartBeat",
        "eventState": "active",
        "eventDescription": "heartBeat",
    }


def hikvision_event(
    spec: DeviceSpec, native: dict[str, Any], ts_time: float, serial: int, rng: random.Random
) -> dict[str, Any]:
    """An ISAPI AccessControllerEvent for a native door event (`native["event"]`)."""
    major, subs = HIKVISION_CODES[str(native["event"])]
    sub = rng.choice(subs)
    body: dict[str, Any] = {
        "deviceName": spec.name or spec.id,
        "majorEventType": major,
        "subEventType": sub,
        "doorNo": 1,
        "serialNo": serial,
        "cardReaderNo": 1,
        "currentVerifyMode": "cardOrFace",
        "attendanceStatus": "undefined",
        "statusValue": 0,
        "mask": "no",
        "picturesNumber": 0,
    }
    credential = native.get("credential")
    if credential is not None and sub != 0x4B:  # a face pass has no card
        body.update(cardNo=credential, cardType=1, userType="normal", cardReaderKind=1)
    return {
        **_hik_envelope(spec, ts_time),
        "eventType": "AccessControllerEvent",
        "eventState": "active",
        "eventDescription": "Access Controller Event",
        "AccessControllerEvent": body,
    }
