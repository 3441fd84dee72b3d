"""`hikvision` codec: the ISAPI event JSON a Hikvision access controller pushes to its
HTTP listening host (`eventType: "AccessControllerEvent"`), bridged to
`gw/codec/hikvision/{device_id}`. Only for `door_access` devices.

    dateTime                            → ts (must carry a UTC offset)
    AccessControllerEvent.serialNo      → seq (the controller's event serial number)
    AccessControllerEvent.cardNo        → credential (the base decoder stores only a
                                          keyed hash of it)
    AccessControllerEvent.doorNo        → extra `door_no`
    AccessControllerEvent.currentVerifyMode → extra `verify_mode`
    majorEventType / subEventType       → the event below; its SDK name is kept as the
                                          extra `hikvision_event` (e.g. FACE_VERIFY_PASS)

Personal data in the event (`name`, `employeeNoString`, pictures) is not stored. Face
and fingerprint events therefore carry no credential.

Event codes are those of the HCNetSDK / ISAPI access-control event table (MAJOR_ALARM
0x1, MAJOR_EXCEPTION 0x2, MAJOR_OPERATION 0x3, MAJOR_EVENT 0x5), listed in `TABLE`
below with their SDK names. Mapping:

* every "...PASS" / "...VERIFY_SUCCESS" of major 5 → `access_granted`
* every "...FAIL", "...TIMEOUT" (verification abandoned, e.g. card shown but PIN never
  entered), no right / invalid / expired card, anti-passback, blocklist … → `access_denied`
* 5/0x19 DOOR_OPEN_NORMAL → `door_opened` + telemetry `door_open: true`
* 5/0x1a DOOR_CLOSE_NORMAL → `door_closed` + telemetry `door_open: false`
* 5/0x1b DOOR_OPEN_ABNORMAL (opened without a pass) → `door_forced` + `door_open: true`
* 5/0x1c DOOR_OPEN_TIMEOUT (left open too long) → `door_held_open` + `door_open: true`
* 5/0x15 LOCK_OPEN, 5/0x16 LOCK_CLOSE → telemetry `locked: false / true`
* 1/0x404, 0x406, 0x40f, 0x422 (controller, reader, security module, channel
  controller dismantled) → `tamper`
* other listed codes (button pressed, doorbell, remote operations, power, network,
  alarm-input and tamper *resume* …) have no gridwarden event: they become a telemetry
  reading with no values, i.e. a sign of life with `hikvision_event` as extra, so they
  are kept but never guessed into an alarm. Note that 1/0x40a STRESS_ALARM (duress
  code) is among them: the contract has no duress event.

A code not in the table is a CodecError naming it, so it is dead-lettered with the
reason rather than guessed. `eventType: "heartBeat"` (the keep-alive of the listening
mode) becomes an empty telemetry reading.

When one message gives an event and a telemetry reading, the `seq` goes on the event
only, so the second reading can never be taken for a duplicate of the first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ingest.codecs import CodecError
from ingest.codecs._fields import (
    Native,
    Output,
    as_object,
    get_int,
    get_object,
    get_str,
    get_timestamp,
)

if TYPE_CHECKING:
    from ingest.decode import DeviceInfo

NAME = "hikvision"

MAJOR_ALARM, MAJOR_EXCEPTION, MAJOR_OPERATION, MAJOR_EVENT = 0x1, 0x2, 0x3, 0x5

# (major, sub) → (SDK name, gridwarden event or None, telemetry values)
Mapping = tuple[str, str | None, dict[str, bool]]
TABLE: dict[tuple[int, int], Mapping] = {}


def _add(major: int, event: str | None, codes: dict[int, str], **telemetry: bool) -> None:
    for sub, name in codes.items():
        TABLE[(major, sub)] = (name, event, dict(telemetry))


_add(MAJOR_EVENT, "access_granted", {
    0x01: "LEGAL_CARD_PASS", 0x02: "CARD_AND_PSW_PASS", 0x10: "MULTI_VERIFY_SUCCESS",
    0x22: "MULTI_VERIFY_SUPERPASSWD_VERIFY_SUCCESS", 0x26: "FINGERPRINT_COMPARE_PASS",
    0x28: "CARD_FINGERPRINT_VERIFY_PASS", 0x2B: "CARD_FINGERPRINT_PASSWD_VERIFY_PASS",
    0x2E: "FINGERPRINT_PASSWD_VERIFY_PASS", 0x36: "FACE_AND_FP_VERIFY_PASS",
    0x39: "FACE_AND_PW_VERIFY_PASS", 0x3C: "FACE_AND_CARD_VERIFY_PASS",
    0x3F: "FACE_AND_PW_AND_FP_VERIFY_PASS", 0x42: "FACE_CARD_AND_FP_VERIFY_PASS",
    0x45: "EMPLOYEENO_AND_FP_VERIFY_PASS", 0x48: "EMPLOYEENO_AND_FP_AND_PW_VERIFY_PASS",
    0x4B: "FACE_VERIFY_PASS", 0x4D: "EMPLOYEENO_AND_FACE_VERIFY_PASS",
    0x65: "EMPLOYEENO_AND_PW_PASS", 0x69: "PEOPLE_AND_ID_CARD_COMPARE_PASS",
    0x99: "COMBINED_VERIFY_PASS",
})  # fmt: skip
_add(MAJOR_EVENT, "access_denied", {
    0x03: "CARD_AND_PSW_FAIL", 0x04: "CARD_AND_PSW_TIMEOUT", 0x05: "CARD_AND_PSW_OVER_TIME",
    0x06: "CARD_NO_RIGHT", 0x07: "CARD_INVALID_PERIOD", 0x08: "CARD_OUT_OF_DATE",
    0x09: "INVALID_CARD", 0x0A: "ANTI_SNEAK_FAIL", 0x0B: "INTERLOCK_DOOR_NOT_CLOSE",
    0x0C: "NOT_BELONG_MULTI_GROUP", 0x0D: "INVALID_MULTI_VERIFY_PERIOD",
    0x0E: "MULTI_VERIFY_SUPER_RIGHT_FAIL", 0x0F: "MULTI_VERIFY_REMOTE_RIGHT_FAIL",
    0x24: "MULTI_VERIFY_TIMEOUT", 0x27: "FINGERPRINT_COMPARE_FAIL",
    0x29: "CARD_FINGERPRINT_VERIFY_FAIL", 0x2A: "CARD_FINGERPRINT_VERIFY_TIMEOUT",
    0x2C: "CARD_FINGERPRINT_PASSWD_VERIFY_FAIL", 0x2D: "CARD_FINGERPRINT_PASSWD_VERIFY_TIMEOUT",
    0x2F: "FINGERPRINT_PASSWD_VERIFY_FAIL", 0x30: "FINGERPRINT_PASSWD_VERIFY_TIMEOUT",
    0x31: "FINGERPRINT_INEXISTENCE", 0x37: "FACE_AND_FP_VERIFY_FAIL",
    0x38: "FACE_AND_FP_VERIFY_TIMEOUT", 0x3A: "FACE_AND_PW_VERIFY_FAIL",
    0x3B: "FACE_AND_PW_VERIFY_TIMEOUT", 0x3D: "FACE_AND_CARD_VERIFY_FAIL",
    0x3E: "FACE_AND_CARD_VERIFY_TIMEOUT", 0x40: "FACE_AND_PW_AND_FP_VERIFY_FAIL",
    0x41: "FACE_AND_PW_AND_FP_VERIFY_TIMEOUT", 0x43: "FACE_CARD_AND_FP_VERIFY_FAIL",
    0x44: "FACE_CARD_AND_FP_VERIFY_TIMEOUT", 0x46: "EMPLOYEENO_AND_FP_VERIFY_FAIL",
    0x47: "EMPLOYEENO_AND_FP_VERIFY_TIMEOUT", 0x49: "EMPLOYEENO_AND_FP_AND_PW_VERIFY_FAIL",
    0x4A: "EMPLOYEENO_AND_FP_AND_PW_VERIFY_TIMEOUT", 0x4C: "FACE_VERIFY_FAIL",
    0x4E: "EMPLOYEENO_AND_FACE_VERIFY_FAIL", 0x4F: "EMPLOYEENO_AND_FACE_VERIFY_TIMEOUT",
    0x50: "FACE_RECOGNIZE_FAIL", 0x66: "EMPLOYEENO_AND_PW_FAIL",
    0x67: "EMPLOYEENO_AND_PW_TIMEOUT", 0x70: "PEOPLE_AND_ID_CARD_COMPARE_FAIL",
    0x71: "CERTIFICATE_BLOCKLIST", 0x77: "CARD_ENCRYPT_VERIFY_FAIL",
    0x97: "PASSWORD_MISMATCH", 0x98: "EMPLOYEE_NO_NOT_EXIST",
    0x9A: "COMBINED_VERIFY_TIMEOUT", 0x9B: "VERIFY_MODE_MISMATCH",
})  # fmt: skip
_add(MAJOR_EVENT, "door_opened", {0x19: "DOOR_OPEN_NORMAL"}, door_open=True)
_add(MAJOR_EVENT, "door_closed", {0x1A: "DOOR_CLOSE_NORMAL"}, door_open=False)
_add(MAJOR_EVENT, "door_forced", {0x1B: "DOOR_OPEN_ABNORMAL"}, door_open=True)
_add(MAJOR_EVENT, "door_held_open", {0x1C: "DOOR_OPEN_TIMEOUT"}, door_open=True)
_add(MAJOR_EVENT, None, {0x15: "LOCK_OPEN"}, locked=False)
_add(MAJOR_EVENT, None, {0x16: "LOCK_CLOSE"}, locked=True)
_add(MAJOR_EVENT, None, {
    0x11: "LEADER_CARD_OPEN_BEGIN", 0x12: "LEADER_CARD_OPEN_END", 0x13: "ALWAYS_OPEN_BEGIN",
    0x14: "ALWAYS_OPEN_END", 0x17: "DOOR_BUTTON_PRESS", 0x18: "DOOR_BUTTON_RELEASE",
    0x1D: "ALARMOUT_ON", 0x1E: "ALARMOUT_OFF", 0x1F: "ALWAYS_CLOSE_BEGIN",
    0x20: "ALWAYS_CLOSE_END", 0x21: "MULTI_VERIFY_NEED_REMOTE_OPEN",
    0x23: "MULTI_VERIFY_REPEAT_VERIFY", 0x25: "DOORBELL_RINGING", 0x32: "CARD_PLATFORM_VERIFY",
    0x33: "CALL_CENTER", 0x34: "FIRE_RELAY_TURN_ON_DOOR_ALWAYS_OPEN",
    0x35: "FIRE_RELAY_RECOVER_DOOR_RECOVER_NORMAL", 0x51: "FIRSTCARD_AUTHORIZE_BEGIN",
    0x52: "FIRSTCARD_AUTHORIZE_END", 0x53: "DOORLOCK_INPUT_SHORT_CIRCUIT",
    0x54: "DOORLOCK_INPUT_BROKEN_CIRCUIT", 0x55: "DOORLOCK_INPUT_EXCEPTION",
    0x56: "DOORCONTACT_INPUT_SHORT_CIRCUIT", 0x57: "DOORCONTACT_INPUT_BROKEN_CIRCUIT",
    0x58: "DOORCONTACT_INPUT_EXCEPTION", 0x59: "OPENBUTTON_INPUT_SHORT_CIRCUIT",
    0x5A: "OPENBUTTON_INPUT_BROKEN_CIRCUIT", 0x5B: "OPENBUTTON_INPUT_EXCEPTION",
    0x5C: "DOORLOCK_OPEN_EXCEPTION", 0x5D: "DOORLOCK_OPEN_TIMEOUT",
    0x5E: "FIRSTCARD_OPEN_WITHOUT_AUTHORIZE", 0x83: "HEART_BEAT",
})  # fmt: skip
_add(MAJOR_ALARM, "tamper", {
    0x404: "HOST_DESMANTLE_ALARM", 0x406: "CARD_READER_DESMANTLE_ALARM",
    0x40F: "SECURITY_MODULE_DESMANTLE_ALARM", 0x422: "CHANNEL_CONTROLLER_DESMANTLE_ALARM",
})  # fmt: skip
_add(MAJOR_ALARM, None, {
    0x400: "ALARMIN_SHORT_CIRCUIT", 0x401: "ALARMIN_BROKEN_CIRCUIT", 0x402: "ALARMIN_EXCEPTION",
    0x403: "ALARMIN_RESUME", 0x405: "HOST_DESMANTLE_RESUME",
    0x407: "CARD_READER_DESMANTLE_RESUME", 0x408: "CASE_SENSOR_ALARM",
    0x409: "CASE_SENSOR_RESUME", 0x40A: "STRESS_ALARM", 0x40B: "OFFLINE_ECENT_NEARLY_FULL",
    0x40C: "CARD_MAX_AUTHENTICATE_FAIL", 0x40D: "SD_CARD_FULL", 0x40E: "LINKAGE_CAPTURE_PIC",
    0x410: "SECURITY_MODULE_DESMANTLE_RESUME", 0x423: "CHANNEL_CONTROLLER_DESMANTLE_RESUME",
})  # fmt: skip
_add(MAJOR_EXCEPTION, None, {
    0x400: "DEV_POWER_ON", 0x401: "DEV_POWER_OFF", 0x402: "WATCH_DOG_RESET",
    0x403: "LOW_BATTERY", 0x404: "BATTERY_RESUME", 0x405: "AC_OFF", 0x406: "AC_RESUME",
    0x407: "NET_RESUME", 0x408: "FLASH_ABNORMAL", 0x409: "CARD_READER_OFFLINE",
    0x40A: "CARD_READER_RESUME",
})  # fmt: skip
_add(MAJOR_OPERATION, None, {
    0x400: "REMOTE_OPEN_DOOR", 0x401: "REMOTE_CLOSE_DOOR", 0x402: "REMOTE_ALWAYS_OPEN",
    0x403: "REMOTE_ALWAYS_CLOSE", 0x404: "REMOTE_CHECK_TIME", 0x405: "NTP_CHECK_TIME",
})  # fmt: skip


def decode(document: Any, device: DeviceInfo) -> Output:
    message = as_object(document, "payload")
    if device.kind != "door_access":
        raise CodecError(f"hikvision decodes door_access devices; {device.id!r} is a {device.kind}")
    event_type = get_str(message, "eventType", "eventType")
    if event_type == "heartBeat":
        beat: Native = {}
        ts = get_timestamp(message, "dateTime", "dateTime")
        if ts is not None:
            beat["ts"] = ts
        return [("telemetry", beat)]
    if event_type not in (None, "AccessControllerEvent"):
        raise CodecError(f"eventType {event_type!r} is not an AccessControllerEvent")
    ts = get_timestamp(message, "dateTime", "dateTime", required=True)
    path = "AccessControllerEvent"
    body = get_object(message, "AccessControllerEvent", path, required=True)
    assert body is not None
    major = get_int(body, "majorEventType", f"{path}.majorEventType", required=True)
    sub = get_int(body, "subEventType", f"{path}.subEventType", required=True)
    assert major is not None
    assert sub is not None
    mapping = TABLE.get((major, sub))
    if mapping is None:
        raise CodecError(
            f"unknown Hikvision event code major {major} / sub {sub} ({sub:#x}); "
            f"not mapped rather than guessed"
        )
    name, event, telemetry = mapping

    common: Native = {"ts": ts, "hikvision_event": name}
    door_no = get_int(body, "doorNo", f"{path}.doorNo")
    if door_no is not None:
        common["door_no"] = door_no
    seq = get_int(body, "serialNo", f"{path}.serialNo")
    card_no = get_str(body, "cardNo", f"{path}.cardNo")
    verify_mode = get_str(body, "currentVerifyMode", f"{path}.currentVerifyMode")

    out: Output = []
    if event is not None:
        native: Native = {"event": event, **common}
        if card_no:
            native["credential"] = card_no
        if verify_mode:
            native["verify_mode"] = verify_mode
        out.append(("event", native))
    if telemetry or event is None:
        out.append(("telemetry", {**common, **telemetry}))
    if seq is not None:
        out[0][1]["seq"] = seq
    return out
