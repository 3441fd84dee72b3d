"""Vendor codecs (CONTRACT §3): vendor payloads as the vendors publish them → native readings.

Tables, one line per case with the reason. Payload variants are built from one realistic
message per vendor with `patched(base, {"dotted.path": value | DROP})`.
"""

from __future__ import annotations

import base64
import copy
import re
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ingest.codecs import CODECS, CodecError
from ingest.codecs.hikvision import TABLE
from ingest.decode import Decoded, Decoder, DeviceInfo, RawMessage

DROP = object()


def patched(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of `base` with dotted paths set (or removed with DROP)."""
    doc = copy.deepcopy(base)
    for path, value in changes.items():
        *parents, last = path.split(".")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if value is DROP:
            del node[last]
        else:
            node[last] = value
    return doc


# --------------------------------------------------------------------------- devices

SMOKE = DeviceInfo("smoke-12", "smoke_detector", "cell-a", None, 3600)
DOOR = DeviceInfo("door-3", "door_access", "cell-a")
BIN = DeviceInfo("bin-0042", "smart_bin", "cell-b", height_cm=120)
BIN_NO_HEIGHT = DeviceInfo("bin-0043", "smart_bin", "cell-b")
MANHOLE = DeviceInfo("mh-7", "manhole_cover", "cell-c", height_cm=250)
MANHOLE_NO_HEIGHT = DeviceInfo("mh-8", "manhole_cover", "cell-c")
DEVICES = {d.id: d for d in (SMOKE, DOOR, BIN, BIN_NO_HEIGHT, MANHOLE, MANHOLE_NO_HEIGHT)}

# --------------------------------------------------------------------------- Zigbee2MQTT

# Heiman HS1SA as Zigbee2MQTT publishes it (last_seen: ISO_8601).
Z2M_SMOKE = {
    "battery": 100, "battery_low": False, "linkquality": 134, "smoke": False,
    "tamper": False, "test": False, "voltage": 3000, "last_seen": "2024-05-01T08:30:00.123Z",
}  # fmt: skip
# Tuya TS0601 smoke (_TZE200_ntcy3xu1 family), last_seen: epoch (ms).
Z2M_TUYA = {"battery": 90, "smoke": True, "smoke_concentration": 35, "linkquality": 87,
            "last_seen": 1714552200123}  # fmt: skip
# Aqara MCCGQ11LM door/window contact.
Z2M_CONTACT = {"battery": 91, "contact": True, "device_temperature": 27, "linkquality": 120,
               "power_outage_count": 6, "voltage": 3005}  # fmt: skip

Z2M_TS = "2024-05-01T08:30:00.123000+00:00"
Z2M_IDLE = {"ts": Z2M_TS, "battery": 100.0, "battery_low": False, "voltage_mv": 3000.0,
            "linkquality": 134, "alarm": False, "test": False, "tamper": False}  # fmt: skip


def z2m(**changes: Any) -> dict[str, Any]:
    return patched(Z2M_SMOKE, changes)


def tele(*dicts: dict[str, Any], **values: Any) -> list[tuple[str, dict[str, Any]]]:
    """One telemetry reading made of the merged dicts and values."""
    merged: dict[str, Any] = {}
    for d in dicts:
        merged.update(d)
    return [("telemetry", {**merged, **values})]


Z2M_GOOD = [
    # idle detector: smoke false → alarm false; LQI kept as extra, not as rssi
    (SMOKE, Z2M_SMOKE, tele(Z2M_IDLE)),
    # smoke detected → the detector's verdict `alarm: true`, no event (state, not happening)
    (SMOKE, z2m(smoke=True), tele(Z2M_IDLE, alarm=True)),
    # self-test button pressed
    (SMOKE, z2m(test=True), tele(Z2M_IDLE, test=True)),
    # ISO_8601_local last_seen keeps its offset
    (SMOKE, z2m(last_seen="2024-05-01T16:30:00+08:00"),
     tele(Z2M_IDLE, ts="2024-05-01T16:30:00+08:00")),
    # Tuya: ppm concentration is not obscuration %/m → extra only; epoch-ms last_seen passed on
    (SMOKE, Z2M_TUYA, tele(ts=1714552200123.0, battery=90.0, linkquality=87, alarm=True,
                           smoke_concentration=35.0)),
    # attributes not read yet are null → absent, not an error
    (SMOKE, {"smoke": None, "battery": 80, "linkquality": 40}, tele(battery=80.0, linkquality=40)),
    # optional temperature of combined smoke/heat detectors
    (SMOKE, {"smoke": False, "temperature": 23.5}, tele(alarm=False, temperature=23.5)),
    # contact: true = magnet near = door CLOSED; unknown attributes ignored
    (DOOR, Z2M_CONTACT, tele(battery=91.0, voltage_mv=3005.0, linkquality=120, door_open=False)),
    # contact: false = door open
    (DOOR, {"contact": False, "linkquality": 90}, tele(linkquality=90, door_open=True)),
    # door telemetry has no tamper field → a tamper event alongside
    (DOOR, {"contact": True, "tamper": True, "last_seen": "2024-05-01T08:30:00Z"},
     [*tele(ts="2024-05-01T08:30:00+00:00", door_open=False),
      ("event", {"event": "tamper", "ts": "2024-05-01T08:30:00+00:00"})]),
]  # fmt: skip

Z2M_BAD = [
    # a string where Zigbee2MQTT always sends a boolean
    (SMOKE, z2m(smoke="true"), "smoke must be a boolean"),
    # a buffer flush array is not a Zigbee2MQTT state message
    (SMOKE, [Z2M_SMOKE], "payload must be a JSON object"),
    # nothing Zigbee2MQTT-like in it
    (SMOKE, {"temperature_c": 21}, "no Zigbee2MQTT smoke detector field"),
    (DOOR, {}, "no Zigbee2MQTT contact sensor field"),
    # battery as text
    (SMOKE, z2m(battery="high"), "battery must be a number"),
    # contact as 0/1 (Tasmota style) is not Zigbee2MQTT
    (DOOR, {"contact": 1}, "contact must be a boolean"),
    # unparseable / zoneless / wrong-typed last_seen
    (SMOKE, z2m(last_seen="yesterday"), "last_seen 'yesterday' is not an RFC 3339"),
    (SMOKE, z2m(last_seen="2024-05-01T08:30:00"), "has no UTC offset"),
    (SMOKE, z2m(last_seen=True), "last_seen must be an RFC 3339 string or epoch"),
    # linkquality is an integer LQI
    (SMOKE, z2m(linkquality=13.5), "linkquality must be an integer"),
    # wrong device kind for this codec
    (MANHOLE, Z2M_SMOKE, "zigbee2mqtt decodes smoke_detector and door_access"),
]  # fmt: skip

# --------------------------------------------------------------------------- ChirpStack


def dingtek_frame(level_mm: int, temp: int, angle: int, alarms1: int, alarms2: int, fc: int) -> str:
    """The 17-byte Dingtek heartbeat frame (base64, as ChirpStack puts it in `data`)."""
    frame = bytes([0x80, 0x00, 0x01, 0x01, 0x11, level_mm >> 8, level_mm & 0xFF, 0x00, temp,
                   0x01 if angle < 0 else 0x00, abs(angle), alarms1, alarms2, fc >> 8, fc & 0xFF,
                   0x00, 0x81])  # fmt: skip
    return base64.b64encode(frame).decode()


# A ChirpStack v4 MQTT-integration uplink event of a Dingtek DF555-style bin sensor.
# `object` numbers are floats: ChirpStack turns the JS codec result into a protobuf Struct.
CS_BIN = {
    "deduplicationId": "3ac7e3c4-4401-4b8d-9386-a5c902f9202d",
    "time": "2024-05-01T08:30:00.775023242+00:00",
    "deviceInfo": {
        "tenantId": "52f14cd4-c6f1-4fbd-8f87-4025e1d49242", "tenantName": "Sanitation",
        "applicationId": "17c82e96-be03-4f38-aef3-f83d48582d97", "applicationName": "Bins",
        "deviceProfileId": "14855bf7-d10d-4aee-b618-ebfcb64dc7ad",
        "deviceProfileName": "Dingtek DF555", "deviceName": "bin-0042",
        "devEui": "8cf9572000012345", "deviceClassEnabled": "CLASS_A", "tags": {"street": "xinhua"},
    },
    "devAddr": "00189440", "adr": True, "dr": 5, "fCnt": 1234, "fPort": 3, "confirmed": False,
    "data": dingtek_frame(300, 25, -3, 0x00, 0x00, 1234),
    "object": {"level": 300.0, "alarmLevel": False, "alarmFire": False, "alarmFall": False,
               "alarmBattery": False, "angle": -3.0, "temperature": 25.0, "frameCounter": 1234.0},
    "rxInfo": [
        {"gatewayId": "0016c001f153a14c", "uplinkId": 4217106255, "rssi": -110, "snr": -3.2,
         "channel": 2, "context": "E3OWOQ==", "crcStatus": "CRC_OK",
         "metadata": {"region_config_id": "cn470_10", "region_common_name": "CN470"}},
        {"gatewayId": "0016c001f1500812", "uplinkId": 1092461112, "rssi": -97, "snr": 7.5,
         "channel": 2, "context": "XkmpWw==", "crcStatus": "CRC_OK"},
    ],
    "txInfo": {"frequency": 486300000, "modulation": {
        "lora": {"bandwidth": 125000, "spreadingFactor": 7, "codeRate": "CR_4_5"}}},
}  # fmt: skip
# The same for a DC410-style manhole sensor: 1700 mm from sensor to water, cover in place.
CS_MANHOLE = patched(CS_BIN, {
    "deviceInfo.deviceProfileName": "Dingtek DC410", "deviceInfo.deviceName": "mh-7",
    "data": dingtek_frame(1700, 18, 0, 0x00, 0x00, 77), "fCnt": 77,
    "object": {"level": 1700.0, "alarmLevel": False, "alarmFall": False, "alarmBattery": False,
               "angle": 0.0, "temperature": 18.0, "frameCounter": 77.0},
})  # fmt: skip


def bin_obj(**changes: Any) -> dict[str, Any]:
    """CS_BIN with `object` fields changed (DROP removes one)."""
    return patched(CS_BIN, {f"object.{key}": value for key, value in changes.items()})


def mh_obj(**changes: Any) -> dict[str, Any]:
    return patched(CS_MANHOLE, {f"object.{key}": value for key, value in changes.items()})


def without(values: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k not in keys}


CS_TS = "2024-05-01T08:30:00.775023+00:00"
CS_ENVELOPE = {"ts": CS_TS, "seq": 1234, "rssi": -97.0, "snr": 7.5}
BIN_OK = {**CS_ENVELOPE, "tilt": 3.0, "temperature": 25.0, "level_mm": 300.0,
          "alarm_level": False, "battery_low": False, "frame_counter": 1234,
          "fire": False, "fill": 75.0}  # fmt: skip
MH_OK = {**CS_ENVELOPE, "seq": 77, "tilt": 0.0, "temperature": 18.0, "level_mm": 1700.0,
         "alarm_level": False, "battery_low": False, "frame_counter": 77,
         "water_level": 32.0, "open": False}  # fmt: skip

CS_GOOD = [
    # 300 mm below a sensor 120 cm above the floor → 75 % full; best of two gateways → rssi
    (BIN, CS_BIN, tele(BIN_OK)),
    # fire and knocked over: fire is telemetry; the fall has no field → event, without seq
    (BIN, bin_obj(alarmFire=True, alarmFall=True, angle=-85.0, temperature=71.0),
     [*tele(BIN_OK, fire=True, tilt=85.0, temperature=71.0),
      ("event", {"event": "knocked_over", "ts": CS_TS})]),
    # farther than the registered height (sensor moved / empty bin echo) → clamped to 0 %
    (BIN, bin_obj(level=1500.0), tele(BIN_OK, level_mm=1500.0, fill=0.0)),
    # refuse touching the sensor → 100 %; device's own full flag kept as extra
    (BIN, bin_obj(level=0.0, alarmLevel=True),
     tele(BIN_OK, level_mm=0.0, fill=100.0, alarm_level=True)),
    # older decoders: `battery: true` is the low-battery flag, `volt` kept unconverted
    (BIN, bin_obj(alarmBattery=DROP, battery=True, volt=3.41),
     tele(BIN_OK, battery_low=True, battery_voltage=3.41)),
    # no fCnt (ChirpStack omitted a zero) and no rxInfo → no seq / rssi rather than guesses
    (BIN, patched(CS_BIN, {"fCnt": DROP, "rxInfo": DROP}),
     tele(without(BIN_OK, "seq", "rssi", "snr"))),
    # manhole: 1700 mm to water in a 250 cm well → 32 % of depth
    (MANHOLE, CS_MANHOLE, tele(MH_OK)),
    # cover lifted: tilt alarm → open, |angle| → tilt
    (MANHOLE, mh_obj(alarmFall=True, angle=-35.0), tele(MH_OK, open=True, tilt=35.0)),
    # water high: well nearly full, device flag kept
    (MANHOLE, mh_obj(level=200.0, alarmLevel=True),
     tele(MH_OK, level_mm=200.0, water_level=92.0, alarm_level=True)),
    # manhole without a registered depth: cover state still stored, no water_level
    (MANHOLE_NO_HEIGHT, CS_MANHOLE, tele(without(MH_OK, "water_level"))),
    # extra vendor fields (GPS variant) ignored
    (BIN, bin_obj(longitude="116.507430", latitude="40.038999"), tele(BIN_OK)),
]  # fmt: skip

CS_V3 = {"applicationID": "1", "devEUI": "jPlXIAABI0U=", "fCnt": 3, "objectJSON": "{}"}
CS_PARAMETERS = {"firmware": "1.4", "uploadInterval": 24.0, "levelThreshold": 30.0}

CS_BAD = [
    # a bin without registered height cannot give fill
    (BIN_NO_HEIGHT, CS_BIN, "bin 'bin-0043' has no registered height_cm"),
    # registered height that cannot be a height
    (DeviceInfo("bin-9", "smart_bin", height_cm=0), CS_BIN, "height_cm=0"),
    # no codec in the ChirpStack device profile
    (BIN, patched(CS_BIN, {"object": DROP}), "object is missing"),
    # ChirpStack v3 shape
    (BIN, CS_V3, "deviceInfo is missing: not a ChirpStack v4 uplink event"),
    (BIN, patched(CS_BIN, {"deviceInfo": "bin-0042"}), "deviceInfo must be a JSON object"),
    (BIN, patched(CS_BIN, {"object": "eyJsZXZlbCI6MzAwfQ=="}), "object must be a JSON object"),
    # the old TTN decoder's unit strings
    (BIN, bin_obj(level="300 mm"), "object.level must be a number"),
    (MANHOLE, mh_obj(alarmFall="true"), "object.alarmFall must be a boolean"),
    (BIN, bin_obj(level=-5.0), "object.level must not be negative"),
    (BIN, bin_obj(frameCounter=12.5), "object.frameCounter must be an integer"),
    # a Dingtek parameter report (reply to a config downlink) is not a reading
    (BIN, patched(CS_BIN, {"object": CS_PARAMETERS}), "object has no Dingtek reading"),
    (BIN, patched(CS_BIN, {"rxInfo": {"rssi": -90}}), "rxInfo must be a JSON array"),
    (BIN, patched(CS_BIN, {"rxInfo.1.rssi": "-97"}), "rxInfo[1].rssi must be a number"),
    (BIN, patched(CS_BIN, {"fCnt": "1234"}), "fCnt must be an integer"),
    (BIN, patched(CS_BIN, {"time": 1714552200}), "time must be an RFC 3339 string"),
    (BIN, patched(CS_BIN, {"time": "01/05/2024 08:30"}), "is not an RFC 3339 time"),
    (BIN, [CS_BIN], "uplink event must be a JSON object"),
    (SMOKE, CS_BIN, "chirpstack decodes manhole_cover and smart_bin"),
]  # fmt: skip

# --------------------------------------------------------------------------- Hikvision

# What a DS-K1T671 face/card terminal pushes (application/json part of the event POST).
HIK_CARD = {
    "ipAddress": "192.168.1.64", "portNo": 80, "protocol": "HTTP",
    "macAddress": "24:0f:9b:aa:bb:cc", "channelID": 1,
    "dateTime": "2024-05-01T08:30:00+08:00", "activePostCount": 1,
    "eventType": "AccessControllerEvent", "eventState": "active",
    "eventDescription": "Access Controller Event",
    "AccessControllerEvent": {
        "deviceName": "Access Controller", "majorEventType": 5, "subEventType": 1,
        "cardNo": "3456789012", "cardType": 1, "name": "Zhang San", "cardReaderKind": 1,
        "cardReaderNo": 1, "doorNo": 1, "verifyNo": 215, "employeeNoString": "1001",
        "serialNo": 4811, "userType": "normal", "currentVerifyMode": "cardOrFaceOrFp",
        "attendanceStatus": "undefined", "label": "", "statusValue": 0, "mask": "no",
        "purePwdVerifyEnable": True,
    },
}  # fmt: skip
# A door status event: no person, no card.
HIK_DOOR = patched(HIK_CARD, {
    "AccessControllerEvent": {"deviceName": "Access Controller", "majorEventType": 5,
                              "subEventType": 25, "doorNo": 1, "serialNo": 4812, "label": ""},
})  # fmt: skip
HIK_HEARTBEAT = {"ipAddress": "192.168.1.64", "dateTime": "2024-05-01T08:30:00+08:00",
                 "activePostCount": 1, "eventType": "heartBeat", "eventState": "active",
                 "eventDescription": "heartBeat"}  # fmt: skip


def card(**changes: Any) -> dict[str, Any]:
    """HIK_CARD with AccessControllerEvent fields changed (DROP removes one)."""
    return patched(HIK_CARD, {f"AccessControllerEvent.{k}": v for k, v in changes.items()})


def door(sub: int, major: int = 5, **changes: Any) -> dict[str, Any]:
    changes |= {"subEventType": sub, "majorEventType": major}
    return patched(HIK_DOOR, {f"AccessControllerEvent.{k}": v for k, v in changes.items()})


HIK_TS = "2024-05-01T08:30:00+08:00"
GRANTED = {"event": "access_granted", "ts": HIK_TS, "hikvision_event": "LEGAL_CARD_PASS",
           "door_no": 1, "credential": "3456789012", "verify_mode": "cardOrFaceOrFp",
           "seq": 4811}  # fmt: skip
DOOR_AT = {"ts": HIK_TS, "door_no": 1}


def access(event: str, name: str, **values: Any) -> list[tuple[str, dict[str, Any]]]:
    return [("event", {**GRANTED, "event": event, "hikvision_event": name, **values})]


def door_change(event: str, name: str, door_open: bool) -> list[tuple[str, dict[str, Any]]]:
    """The event (carrying seq) and the door_open telemetry of one status message."""
    return [
        ("event", {"event": event, "hikvision_event": name, "seq": 4812, **DOOR_AT}),
        ("telemetry", {"door_open": door_open, "hikvision_event": name, **DOOR_AT}),
    ]


HIK_GOOD = [
    # 5/0x01 valid card: card number → credential (hashed later), name/employee no dropped
    (HIK_CARD, [("event", GRANTED)]),
    # 5/0x4b (75) face verified: granted, no card → no credential
    (card(subEventType=75, cardNo=DROP),
     access("access_granted", "FACE_VERIFY_PASS", credential=DROP)),
    # 5/0x4c (76) face not recognised
    (card(subEventType=76, cardNo=DROP),
     access("access_denied", "FACE_VERIFY_FAIL", credential=DROP)),
    # 5/0x09 unknown card: denied, the presented card still hashed for "who tried"
    (card(subEventType=9), access("access_denied", "INVALID_CARD")),
    # 5/0x04 card shown, PIN never entered: counted as denied
    (card(subEventType=4), access("access_denied", "CARD_AND_PSW_TIMEOUT")),
    # 5/0x19 (25) door opened: event + door_open telemetry; seq on the event only
    (HIK_DOOR, door_change("door_opened", "DOOR_OPEN_NORMAL", True)),
    # 5/0x1a door closed
    (door(0x1A), door_change("door_closed", "DOOR_CLOSE_NORMAL", False)),
    # 5/0x1b opened without a pass → forced
    (door(0x1B), door_change("door_forced", "DOOR_OPEN_ABNORMAL", True)),
    # 5/0x1c open too long → held open
    (door(0x1C), door_change("door_held_open", "DOOR_OPEN_TIMEOUT", True)),
    # 5/0x15 lock released → telemetry locked: false, seq on it (the only reading)
    (door(0x15), tele(DOOR_AT, locked=False, hikvision_event="LOCK_OPEN", seq=4812)),
    # 1/0x404 controller case opened → tamper event
    (door(0x404, major=1, doorNo=DROP),
     [("event", {"event": "tamper", "ts": HIK_TS, "hikvision_event": "HOST_DESMANTLE_ALARM",
                 "seq": 4812})]),
    # 5/0x17 exit button: known, no gridwarden event → kept as a sign of life
    (door(0x17), tele(DOOR_AT, hikvision_event="DOOR_BUTTON_PRESS", seq=4812)),
    # listening-mode keep-alive
    (HIK_HEARTBEAT, tele(ts=HIK_TS)),
]  # fmt: skip

HIK_BAD = [
    # a code that is not in the table is dead-lettered, never guessed
    (card(subEventType=0x200), "unknown Hikvision event code major 5 / sub 512 (0x200)"),
    (card(majorEventType=4), "unknown Hikvision event code major 4"),
    (patched(HIK_CARD, {"dateTime": DROP}), "dateTime is missing"),
    # a local time without offset cannot be placed in time
    (patched(HIK_CARD, {"dateTime": "2024-05-01T08:30:00"}),
     "'2024-05-01T08:30:00' has no UTC offset"),
    (patched(HIK_CARD, {"AccessControllerEvent": DROP}), "AccessControllerEvent is missing"),
    (card(subEventType="75"), "AccessControllerEvent.subEventType must be an integer"),
    (card(majorEventType=DROP), "AccessControllerEvent.majorEventType is missing"),
    (card(cardNo=3456789012), "AccessControllerEvent.cardNo must be a string"),
    (card(serialNo="4811"), "AccessControllerEvent.serialNo must be an integer"),
    # a camera's motion event sent to the access-control codec
    (patched(HIK_CARD, {"eventType": "VMD"}), "eventType 'VMD' is not an AccessControllerEvent"),
    ("AccessControllerEvent", "payload must be a JSON object"),
]  # fmt: skip


def _expected(readings: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    return [(ch, {k: v for k, v in native.items() if v is not DROP}) for ch, native in readings]


# --------------------------------------------------------------------------- table tests


@pytest.mark.parametrize(("device", "payload", "expected"), Z2M_GOOD)
def test_zigbee2mqtt_maps(device: DeviceInfo, payload: Any, expected: Any) -> None:
    assert CODECS["zigbee2mqtt"](payload, device) == _expected(expected)


@pytest.mark.parametrize(("device", "payload", "message"), Z2M_BAD)
def test_zigbee2mqtt_rejects(device: DeviceInfo, payload: Any, message: str) -> None:
    with pytest.raises(CodecError, match=_literal(message)):
        CODECS["zigbee2mqtt"](payload, device)


@pytest.mark.parametrize(("device", "payload", "expected"), CS_GOOD)
def test_chirpstack_maps(device: DeviceInfo, payload: Any, expected: Any) -> None:
    assert CODECS["chirpstack"](payload, device) == _expected(expected)


@pytest.mark.parametrize(("device", "payload", "message"), CS_BAD)
def test_chirpstack_rejects(device: DeviceInfo, payload: Any, message: str) -> None:
    with pytest.raises(CodecError, match=_literal(message)):
        CODECS["chirpstack"](payload, device)


@pytest.mark.parametrize(("payload", "expected"), HIK_GOOD)
def test_hikvision_maps(payload: Any, expected: Any) -> None:
    assert CODECS["hikvision"](payload, DOOR) == _expected(expected)


@pytest.mark.parametrize(("payload", "message"), HIK_BAD)
def test_hikvision_rejects(payload: Any, message: str) -> None:
    with pytest.raises(CodecError, match=_literal(message)):
        CODECS["hikvision"](payload, DOOR)


def test_hikvision_is_for_doors_only() -> None:
    with pytest.raises(CodecError, match="hikvision decodes door_access devices"):
        CODECS["hikvision"](HIK_CARD, SMOKE)


def test_hikvision_table_maps_only_to_contract_events() -> None:
    events = {event for _, event, _ in TABLE.values()}
    assert events <= {None, "access_granted", "access_denied", "door_opened", "door_closed",
                      "door_forced", "door_held_open", "tamper"}  # fmt: skip


def _literal(text: str) -> str:
    return re.escape(text)


# --------------------------------------------------------------------------- through the Decoder

RECEIVED = datetime(2024, 5, 1, 8, 31, tzinfo=UTC)


def _decoder() -> Decoder:
    return Decoder(prefix="gw", max_payload_bytes=16 * 1024, credential_key=b"test-key",
                   lookup_device=DEVICES.get)  # fmt: skip


def _run(codec: str, device: DeviceInfo, payload: Any) -> Any:
    into = Decoded()
    raw = orjson.dumps(payload)
    _decoder().decode(RawMessage(f"gw/codec/{codec}/{device.id}", raw, RECEIVED), into)
    return into


ROUND_TRIPS = [
    # bin on fire and knocked over: fill, fire, extras, and the knocked_over event
    ("chirpstack", BIN, bin_obj(alarmFire=True, alarmFall=True),
     [("telemetry", None, {"fill": 75.0, "fire": True, "tilt": 3.0, "temperature": 25.0,
                           "rssi": -97.0}),
      ("event", "knocked_over", {})]),
    # manhole cover lifted
    ("chirpstack", MANHOLE, mh_obj(alarmFall=True, angle=40.0),
     [("telemetry", None, {"open": True, "tilt": 40.0, "water_level": 32.0, "temperature": 18.0,
                           "rssi": -97.0})]),
    # smoke alarm from a Heiman detector
    ("zigbee2mqtt", SMOKE, z2m(smoke=True),
     [("telemetry", None, {"alarm": True, "test": False, "tamper": False, "battery": 100.0})]),
    # door forced, reported by the access controller
    ("hikvision", DOOR, door(27),
     [("event", "door_forced", {}), ("telemetry", None, {"door_open": True})]),
    # valid card: the card number only as a keyed hash
    ("hikvision", DOOR, HIK_CARD, [("event", "access_granted", {})]),
]  # fmt: skip


@pytest.mark.parametrize(("codec", "device", "payload", "expected"), ROUND_TRIPS)
def test_codec_output_validates_in_decoder(
    codec: str, device: DeviceInfo, payload: Any, expected: Any
) -> None:
    into = _run(codec, device, payload)
    assert into.dead_letters == []
    got = [(r.channel, r.event, r.values) for r in into.readings]
    assert got == expected
    for reading in into.readings:
        assert reading.device_id == device.id
        assert reading.time.tzinfo is not None


def test_round_trip_details() -> None:
    granted = _run("hikvision", DOOR, HIK_CARD).readings[0]
    assert granted.seq == 4811
    assert granted.time == datetime(2024, 5, 1, 0, 30, tzinfo=UTC)
    assert granted.credential_hash == _decoder().hash_credential("3456789012")
    assert "3456789012" not in orjson.dumps([granted.values, granted.extra]).decode()
    assert granted.extra == {"hikvision_event": "LEGAL_CARD_PASS", "door_no": 1,
                          "verify_mode": "cardOrFaceOrFp"}  # fmt: skip

    telemetry, event = _run("chirpstack", BIN, bin_obj(alarmFall=True)).readings
    assert (telemetry.seq, event.seq) == (1234, None)
    assert telemetry.time == event.time == datetime(2024, 5, 1, 8, 30, 0, 775023, tzinfo=UTC)
    assert telemetry.extra is not None
    assert telemetry.extra["level_mm"] == 300.0
    assert telemetry.extra["snr"] == 7.5

    z2m = _run("zigbee2mqtt", SMOKE, Z2M_TUYA).readings[0]
    assert z2m.time == datetime(2024, 5, 1, 8, 30, 0, 123000, tzinfo=UTC)  # epoch ms
    assert z2m.extra == {"linkquality": 87, "smoke_concentration": 35.0}


DEAD_LETTERS = [
    # codec refuses: bin without height
    ("chirpstack", BIN_NO_HEIGHT, CS_BIN, "codec_error", "chirpstack: bin 'bin-0043' has no"),
    # codec refuses: unknown Hikvision code
    ("hikvision", DOOR, card(subEventType=0x200), "codec_error", "hikvision: unknown Hikvision"),
    # codec refuses: wrong type
    ("zigbee2mqtt", SMOKE, z2m(smoke=1), "codec_error", "zigbee2mqtt: smoke must be a boolean"),
    # codec accepts the shape, the model rejects the value: battery 150 %
    ("zigbee2mqtt", SMOKE, z2m(battery=150), "out_of_range", "battery"),
    # tilt beyond 180° is physically impossible
    ("chirpstack", MANHOLE, mh_obj(angle=200.0), "out_of_range", "tilt"),
    # a ChirpStack time from 1970 (gateway without GPS/NTP) is caught by the base decoder
    ("chirpstack", BIN, patched(CS_BIN, {"time": "1970-01-01T00:00:05Z"}), "bad_timestamp",
     "before 2000"),
]  # fmt: skip


@pytest.mark.parametrize(("codec", "device", "payload", "reason", "detail"), DEAD_LETTERS)
def test_bad_vendor_payload_becomes_dead_letter(
    codec: str, device: DeviceInfo, payload: Any, reason: str, detail: str
) -> None:
    into = _run(codec, device, payload)
    assert into.readings == []
    [dead] = into.dead_letters
    assert (dead.reason, dead.device_id) == (reason, device.id)
    assert detail in dead.detail
    assert dead.payload == orjson.dumps(payload)


def test_codecs_are_registered() -> None:
    assert set(CODECS) >= {"zigbee2mqtt", "chirpstack", "hikvision"}


# --------------------------------------------------------------------------- properties

LEAVES = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
    | st.sampled_from(["2024-05-01T08:30:00Z", "AccessControllerEvent", "heartBeat", "300 mm"])
)  # fmt: skip
JSON = st.recursive(
    LEAVES, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=12,
)  # fmt: skip
Z2M_KEYS = ["smoke", "test", "tamper", "temperature", "smoke_concentration", "battery",
            "battery_low", "voltage", "linkquality", "last_seen", "contact"]  # fmt: skip
CS_KEYS = ["time", "fCnt", "rxInfo", "deviceInfo", "object"]
CS_OBJECT_KEYS = ["level", "angle", "temperature", "alarmLevel", "alarmFall", "alarmFire",
                  "alarmBattery", "frameCounter", "volt", "battery"]  # fmt: skip
HIK_KEYS = ["eventType", "dateTime", "AccessControllerEvent"]
HIK_BODY_KEYS = ["majorEventType", "subEventType", "cardNo", "serialNo", "doorNo",
                 "currentVerifyMode"]  # fmt: skip


def _overlay(
    base: dict[str, Any], top: dict[str, Any], inner_key: str, inner: dict[str, Any]
) -> Any:
    doc = {**copy.deepcopy(base), **top}
    if isinstance(doc.get(inner_key), dict):
        doc[inner_key] = {**doc[inner_key], **inner}
    return doc


# Plausible values, so that vendor-shaped documents also get past the first checks.
SANE = (
    st.booleans() | st.integers(-10, 70_000) | st.floats(-1e3, 1e5)
    | st.sampled_from([*{k for key in TABLE for k in key}, "2024-05-01T08:30:00Z", "1"])
)  # fmt: skip
SOME = JSON | SANE | SANE


def _shaped(keys: list[str], size: int) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(keys), SOME, max_size=size)


def _device(*kinds: str) -> st.SearchStrategy[DeviceInfo]:
    return st.builds(DeviceInfo, id=st.just("dev-1"), kind=st.sampled_from(kinds),
                     height_cm=st.none() | st.floats() | st.floats(1, 500))  # fmt: skip


KINDS = ("smoke_detector", "manhole_cover", "door_access", "smart_bin")
ANY_DEVICE = _device(*KINDS)
# (codec, document, device) where document and device fit the codec, with some fields
# replaced: these reach the deep branches.
VENDOR_SHAPED = st.one_of(
    st.tuples(st.just("zigbee2mqtt"), _shaped(Z2M_KEYS, 6),
              _device("smoke_detector", "door_access")),
    st.tuples(st.just("chirpstack"),
              st.builds(_overlay, st.just(CS_BIN), _shaped(CS_KEYS, 2), st.just("object"),
                        _shaped(CS_OBJECT_KEYS, 4)),
              _device("smart_bin", "manhole_cover")),
    st.tuples(st.just("hikvision"),
              st.builds(_overlay, st.just(HIK_CARD), _shaped(HIK_KEYS, 1),
                        st.just("AccessControllerEvent"), _shaped(HIK_BODY_KEYS, 3)),
              _device("door_access")),
)  # fmt: skip


def _check(codec: str, document: Any, device: DeviceInfo) -> None:
    try:
        out = CODECS[codec](document, device)
    except CodecError:
        return
    assert isinstance(out, list)
    assert out
    for channel, native in out:
        assert channel in ("telemetry", "event")
        assert isinstance(native, dict)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(codec=st.sampled_from(sorted(CODECS)), document=JSON, device=ANY_DEVICE)
def test_any_json_raises_only_codec_error(codec: str, document: Any, device: DeviceInfo) -> None:
    _check(codec, document, device)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=VENDOR_SHAPED)
def test_vendor_shaped_json_raises_only_codec_error(case: tuple[str, Any, DeviceInfo]) -> None:
    _check(*case)


BOUNDED_LEAVES = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
)  # fmt: skip
BOUNDED_JSON = st.recursive(
    BOUNDED_LEAVES,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=12,
)  # fmt: skip


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=VENDOR_SHAPED
    | st.tuples(st.sampled_from(sorted(CODECS)), BOUNDED_JSON, _device(*sorted(KINDS)))
)
def test_decoder_never_raises_on_codec_topics(case: tuple[str, Any, DeviceInfo]) -> None:
    codec, document, device = case
    try:
        raw = orjson.dumps(document)
    except orjson.JSONEncodeError:
        assume(False)  # integers beyond 64 bits: not producible by an MQTT client's JSON
    decoder = Decoder(prefix="gw", max_payload_bytes=16 * 1024, credential_key=b"k",
                      lookup_device={device.id: device}.get)  # fmt: skip
    into = Decoded()
    decoder.decode(RawMessage(f"gw/codec/{codec}/{device.id}", raw, RECEIVED), into)
    assert into.readings or into.dead_letters
    for reading in into.readings:
        assert reading.channel in ("telemetry", "event")
