"""The device simulator: generators, scenarios, codecs, loaders, CLI, and one run against
a real Mosquitto (the session broker of conftest.py, on its own topic prefix)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from click.testing import CliRunner

from device_sim import (
    SCENARIOS,
    DeviceFileError,
    DeviceSpec,
    Outgoing,
    SimOptions,
    Simulation,
    load_devices,
    load_devices_from_csv,
    make_scenarios,
    parse_mqtt_url,
    run_fleet,
    synthetic_fleet,
)
from device_sim.cli import sim as sim_cli
from device_sim.scenarios import HOSTILE_VARIANTS
from ingest.decode import Decoded, Decoder, DeviceInfo, RawMessage

START = datetime(2024, 5, 1, 0, 0, tzinfo=UTC).timestamp()  # 08:00 in China
HOUR = 3600.0
DAY = 24 * HOUR
WAIT_S = 20.0
EPOCH_MS = (946_684_800_000, 4_102_444_800_000)  # 2000 .. 2100
ID = r"[A-Za-z0-9_.:-]{1,64}"

# CONTRACT §2, independent of the simulator's own constants.
PERCENT = (0.0, 100.0)
NUMBER_RANGES: dict[str, tuple[float, float]] = {
    "battery": PERCENT,
    "rssi": (-200.0, 0.0),
    "smoke": PERCENT,
    "temperature": (-50.0, 250.0),
    "co": (0.0, 10_000.0),
    "tilt": (0.0, 180.0),
    "water_level": PERCENT,
    "gas_ch4": PERCENT,
    "gas_h2s": (0.0, 10_000.0),
    "fill": PERCENT,
    "weight": (0.0, 10_000.0),
}
KIND_FIELDS = {
    "smoke_detector": {"smoke", "temperature", "alarm", "test", "tamper", "co"},
    "manhole_cover": {"tilt", "open", "water_level", "gas_ch4", "gas_h2s", "temperature"},
    "door_access": {"door_open", "locked"},
    "smart_bin": {"fill", "temperature", "tilt", "fire", "weight"},
}
BOOLEANS = {"alarm", "test", "tamper", "open", "door_open", "locked", "fire"}
EVENTS = {
    "smoke_detector": {"alarm", "test", "tamper", "silenced"},
    "manhole_cover": {"opened", "closed", "tamper"},
    "door_access": {"access_granted", "access_denied", "door_opened", "door_closed",
                    "door_forced", "door_held_open", "tamper"},
    "smart_bin": {"fire", "knocked_over", "emptied"},
}  # fmt: skip


def contract_problems(kind: str, channel: str, doc: Any) -> list[str]:
    """What in one native JSON object breaks CONTRACT §2 (empty: nothing)."""
    if not isinstance(doc, dict):
        return [f"not an object: {doc!r}"]
    problems = []
    ts = doc.get("ts")
    if isinstance(ts, str):
        if not ts.endswith("Z"):
            problems.append(f"ts {ts!r} not UTC")
        else:
            datetime.fromisoformat(ts)
    elif not (isinstance(ts, int) and not isinstance(ts, bool) and EPOCH_MS[0] < ts < EPOCH_MS[1]):
        problems.append(f"ts {ts!r} is neither RFC 3339 nor epoch ms")
    seq = doc.get("seq")
    if not (isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0):
        problems.append(f"seq {seq!r}")
    if channel == "event" and doc.get("event") not in EVENTS[kind]:
        problems.append(f"event {doc.get('event')!r} for a {kind}")
    for key, value in doc.items():
        if key in BOOLEANS and not isinstance(value, bool):
            problems.append(f"{key}={value!r} is not a boolean")
        if key in NUMBER_RANGES:
            low, high = NUMBER_RANGES[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                problems.append(f"{key}={value!r} is not a number")
            elif not (math.isfinite(value) and low <= value <= high):
                problems.append(f"{key}={value!r} outside {low}..{high}")
        known = KIND_FIELDS[kind] | {"battery", "rssi"}
        if channel == "telemetry" and key in BOOLEANS | set(NUMBER_RANGES) and key not in known:
            problems.append(f"{key} is not a {kind} field")
    return problems


def simulate(
    devices: Sequence[DeviceSpec],
    seconds: float,
    *,
    seed: int = 1,
    scenarios: Sequence[str] = (),
    **options: Any,
) -> tuple[Simulation, list[Outgoing]]:
    sim = Simulation(devices, seed=seed, start=START, options=SimOptions(**options),
                     scenarios=make_scenarios(scenarios))  # fmt: skip
    return sim, sim.run_for(seconds)


def native_documents(message: Outgoing) -> list[dict[str, Any]]:
    document = json.loads(message.payload)
    return document if isinstance(document, list) else [document]


def fleet(count: int = 40, seed: int = 7) -> list[DeviceSpec]:
    return synthetic_fleet(count, seed=seed)


def codec_counter(message: Outgoing) -> int | None:
    """The counter a vendor message carries (what the platform takes as `seq`)."""
    document = json.loads(message.payload)
    codec = message.topic.split("/")[1]
    if codec == "chirpstack":
        return int(document["fCnt"])
    if codec == "hikvision" and "AccessControllerEvent" in document:
        return int(document["AccessControllerEvent"]["serialNo"])
    return None


# Generators ---------------------------------------------------------------------------


def test_normal_readings_stay_within_the_contract_for_days() -> None:
    devices = fleet(40)
    _, out = simulate(devices, 2 * DAY, buffer_share=0.3)
    kinds = {d.id: d.kind for d in devices}
    seen_channels: set[str] = set()
    arrays = 0
    assert len(out) > 3000
    for message in out:
        assert not message.bad
        assert message.scenario is None
        assert message.channel in ("telemetry", "event")
        assert re.fullmatch(rf"dev/{ID}/(telemetry|event)", message.topic)
        assert message.device_id
        assert kinds[message.device_id] == message.kind
        seen_channels.add(message.channel)
        if message.payload.startswith(b"["):
            arrays += 1
            assert message.channel == "telemetry"
        for doc in native_documents(message):
            assert contract_problems(kinds[message.device_id], message.channel, doc) == [], doc
            # Normal values stay in the everyday band, not just the physical range.
            assert -100 <= doc.get("rssi", -80) <= -60
            assert 10.0 <= doc.get("temperature", 20.0) <= 35.0
            assert doc.get("smoke", 0.0) <= 0.3
            assert doc.get("alarm", False) is False
            assert doc.get("fire", False) is False
            assert doc.get("open", False) is False
            if message.kind == "manhole_cover":
                assert doc["tilt"] <= 2.0
    assert seen_channels == {"telemetry", "event"}
    assert arrays > 0


def test_ts_mixes_rfc3339_and_epoch_ms_and_follows_the_simulated_clock() -> None:
    _, out = simulate(fleet(30), 2 * HOUR, buffer_share=0.0)
    styles = set()
    for message in out:
        for doc in native_documents(message):
            ts = doc["ts"]
            if isinstance(ts, str):
                styles.add("rfc3339")
                stamp = datetime.fromisoformat(ts).timestamp()
            else:
                styles.add("epoch_ms")
                stamp = ts / 1000
            assert START <= stamp <= message.t + 0.001
    assert styles == {"rfc3339", "epoch_ms"}


def test_seq_strictly_increasing_per_device_across_channels_and_codecs() -> None:
    devices = fleet(50)
    _, out = simulate(devices, DAY, scenarios=tuple(s for s in SCENARIOS if s != "faulty"),
                      codec_share=0.5, buffer_share=0.3)  # fmt: skip
    last: dict[str, int] = defaultdict(int)
    checked = 0
    for message in out:
        if message.bad:
            continue
        assert message.device_id is not None
        if message.channel == "codec":
            counter = codec_counter(message)
            counters = [] if counter is None else [counter]
        elif message.channel in ("telemetry", "event"):
            counters = [doc["seq"] for doc in native_documents(message)]
        else:
            continue
        for counter in counters:
            assert counter > last[message.device_id], (message.device_id, counter)
            last[message.device_id] = counter
            checked += 1
    assert checked > 1000


def test_same_seed_same_run_other_seed_other_run() -> None:
    devices = fleet(30)
    scenarios = tuple(SCENARIOS)
    _, first = simulate(devices, 6 * HOUR, seed=11, scenarios=scenarios, codec_share=0.3)
    _, again = simulate(devices, 6 * HOUR, seed=11, scenarios=scenarios, codec_share=0.3)
    _, other = simulate(devices, 6 * HOUR, seed=12, scenarios=scenarios, codec_share=0.3)
    assert first == again
    assert [m.payload for m in first] != [m.payload for m in other]


def test_a_run_does_not_depend_on_how_it_is_stepped() -> None:
    devices = fleet(20)
    _, at_once = simulate(devices, 4 * HOUR, scenarios=("fire", "hostile"))
    sim = Simulation(devices, seed=1, start=START, scenarios=make_scenarios(["fire", "hostile"]))
    stepped: list[Outgoing] = []
    for _ in range(4 * 60):
        stepped.extend(sim.run_for(60.0))
    assert stepped == at_once


def test_bins_fill_up_and_get_emptied() -> None:
    bin_ = DeviceSpec("bin-1", "smart_bin", 29.07, 119.64, interval_s=600, height_cm=120)
    _, out = simulate([bin_], 10 * DAY, buffer_share=0.0)
    fills: list[float] = []
    emptied = 0
    rises = drops = 0
    ratios: list[float] = []
    for message in out:
        doc = json.loads(message.payload)
        if message.channel == "event":
            assert doc["event"] == "emptied"
            emptied += 1
            continue
        if fills:
            if doc["fill"] > fills[-1]:
                rises += 1
            elif doc["fill"] < fills[-1]:
                drops += 1
                assert doc["fill"] < 5.0  # only a collection lowers it
                assert fills[-1] >= 70.0  # and it comes when the bin is fairly full
        fills.append(doc["fill"])
        if doc["fill"] >= 20.0:
            ratios.append(doc["weight"] / doc["fill"])  # kg per %: the bin's capacity
    assert emptied >= 3
    assert drops == emptied  # each collection shows as one drop
    assert rises > 10 * drops
    assert max(fills) <= 93.0  # a normal bin is collected before it overflows
    assert max(ratios) - min(ratios) < 0.01  # weight follows fill


def test_temperature_follows_the_daily_cycle_and_battery_only_drains() -> None:
    bin_ = DeviceSpec("bin-1", "smart_bin", 29.07, 119.64, interval_s=300, height_cm=120)
    _, out = simulate([bin_], 4 * DAY, buffer_share=0.0)
    by_hour: dict[int, list[float]] = defaultdict(list)
    batteries = []
    for message in out:
        doc = json.loads(message.payload)
        if message.channel == "telemetry":
            local = int(((message.t + 8 * HOUR) % DAY) // HOUR)
            by_hour[local].append(doc["temperature"])
            batteries.append(doc["battery"])
    afternoon = sum(by_hour[15]) / len(by_hour[15])
    night = sum(by_hour[3]) / len(by_hour[3])
    assert afternoon - night > 10.0
    assert min(min(v) for v in by_hour.values()) >= 12.0
    assert max(max(v) for v in by_hour.values()) <= 34.0
    assert batteries == sorted(batteries, reverse=True)


def test_doors_report_granted_mostly_and_open_close_pairs() -> None:
    door = DeviceSpec("door-1", "door_access", 29.07, 119.64, interval_s=300)
    _, out = simulate([door], 3 * DAY)
    events = [json.loads(m.payload) for m in out if m.channel == "event"]
    names = [e["event"] for e in events]
    assert names.count("access_granted") > 5 * max(names.count("access_denied"), 1)
    assert names.count("access_denied") >= 1
    assert names.count("door_opened") == names.count("door_closed") == names.count(
        "access_granted")  # fmt: skip
    assert all(isinstance(e["credential"], str) and e["credential"]
               for e in events if e["event"].startswith("access_"))  # fmt: skip
    # Every door_opened is closed again before the next one opens.
    state = "closed"
    for name in names:
        if name == "door_opened":
            assert state == "closed"
            state = "open"
        elif name == "door_closed":
            assert state == "open"
            state = "closed"


# Scenarios ----------------------------------------------------------------------------


def _docs_of(out: Iterable[Outgoing], device_id: str) -> list[tuple[Outgoing, dict[str, Any]]]:
    return [(m, d) for m in out if m.device_id == device_id for d in native_documents(m)]


def test_fire_alarms_and_a_second_detector_in_the_building_follows_within_a_minute() -> None:
    _, out = simulate(fleet(40), 2 * HOUR, scenarios=("fire",), buffer_share=0.0)
    alarms: dict[str, float] = {}
    for message in out:
        if message.scenario != "fire":
            continue
        doc = json.loads(message.payload)
        assert contract_problems(message.kind or "", message.channel, doc) == []
        if message.channel == "event" and doc["event"] == "alarm":
            alarms[message.device_id or ""] = message.t
            # The detector's own verdict came with it, after smoke and heat rose.
            telemetry = [d for m, d in _docs_of(out, message.device_id or "")
                         if m.channel == "telemetry" and m.t <= message.t]  # fmt: skip
            assert telemetry[-1]["alarm"] is True
            assert telemetry[-1]["smoke"] > 5.0
            assert telemetry[-1]["temperature"] > 30.0
    assert len(alarms) == 2
    (first, t1), (second, t2) = sorted(alarms.items(), key=lambda item: item[1])
    specs = {d.id: d for d in fleet(40)}
    assert specs[first].building is not None
    assert specs[first].building == specs[second].building
    assert 0 < t2 - t1 <= 60.0
    # And it ends: silenced, and back to normal readings.
    names = [json.loads(m.payload)["event"] for m in out
             if m.scenario == "fire" and m.channel == "event"]  # fmt: skip
    assert names.count("silenced") == 2
    last = [d for m, d in _docs_of(out, first) if m.channel == "telemetry"][-1]
    assert last["alarm"] is False
    assert last["smoke"] < 0.5


def test_cover_opened() -> None:
    _, out = simulate(fleet(40), 2 * HOUR, scenarios=("cover_opened",), buffer_share=0.0)
    mine = [m for m in out if m.scenario == "cover_opened"]
    events = [json.loads(m.payload)["event"] for m in mine if m.channel == "event"]
    assert events == ["opened", "closed"]
    readings = [json.loads(m.payload) for m in mine if m.channel == "telemetry"]
    assert readings[0]["open"] is True
    assert readings[0]["tilt"] > 10.0
    assert readings[-1]["open"] is False
    assert readings[-1]["tilt"] <= 2.0


def test_door_forced() -> None:
    _, out = simulate(fleet(40), HOUR, scenarios=("door_forced",))
    events = [json.loads(m.payload)["event"] for m in out
              if m.scenario == "door_forced" and m.channel == "event"]  # fmt: skip
    assert events[:2] == ["door_forced", "door_held_open"]
    assert "door_closed" in events[2:]
    forced = next(m for m in out if m.scenario == "door_forced" and m.channel == "telemetry")
    assert json.loads(forced.payload)["door_open"] is True


def test_bin_full_and_bin_fire() -> None:
    _, out = simulate(fleet(40), 2 * HOUR, scenarios=("bin_full", "bin_fire"), buffer_share=0.0)
    full = [json.loads(m.payload) for m in out if m.scenario == "bin_full"]
    assert max(d.get("fill", 0.0) for d in full) >= 95.0
    assert all(d.get("fill", 0.0) <= 100.0 for d in full)
    assert any(d.get("event") == "emptied" for d in full)
    fire = [json.loads(m.payload) for m in out if m.scenario == "bin_fire"]
    assert any(d.get("event") == "fire" for d in fire)
    burning = [d for d in fire if d.get("fire") is True]
    assert burning
    assert min(d["temperature"] for d in burning) >= 60.0
    for m in out:
        if m.scenario in ("bin_full", "bin_fire"):
            for doc in native_documents(m):
                assert contract_problems("smart_bin", m.channel, doc) == []


def test_only_faulty_is_out_of_range_and_every_faulty_message_is() -> None:
    _, out = simulate(fleet(40), 3 * HOUR, scenarios=tuple(s for s in SCENARIOS
                      if s != "hostile"), codec_share=0.0, buffer_share=0.2)  # fmt: skip
    faulty = 0
    for message in out:
        assert message.bad == (message.scenario == "faulty")
        kind = message.kind or ""
        problems = [p for doc in native_documents(message)
                    for p in contract_problems(kind, message.channel, doc)]  # fmt: skip
        if message.bad:
            faulty += 1
            assert problems, message.payload
        else:
            assert problems == [], (message.payload, problems)
    assert faulty >= 10


def test_hostile_input_covers_the_contracts_bad_input() -> None:
    sim, out = simulate(fleet(20), 2 * HOUR, scenarios=("hostile",))
    hostile = [m for m in out if m.scenario == "hostile"]
    assert hostile
    assert all(m.bad for m in hostile)
    assert len(hostile) >= len(HOSTILE_VARIANTS)

    def parses(payload: bytes) -> bool:
        try:
            json.loads(payload.decode("utf-8"), parse_constant=lambda c: 1 / 0)
        except (ValueError, ZeroDivisionError, RecursionError):
            return False
        return True

    assert any(len(m.payload) > 16 * 1024 for m in hostile)
    assert any(not parses(m.payload) for m in hostile)
    with_bad_utf8 = 0
    for m in hostile:
        try:
            m.payload.decode("utf-8")
        except UnicodeDecodeError:
            with_bad_utf8 += 1
    assert with_bad_utf8 >= 1
    ids = set(sim.specs)
    unknown = [m for m in hostile if re.fullmatch(rf"dev/{ID}/telemetry", m.topic)
               and m.topic.split("/")[1] not in ids]  # fmt: skip
    assert unknown


def test_every_good_message_is_accepted_and_every_bad_one_rejected_by_ingest() -> None:
    """Cross-check with the platform's own decoder: the simulator speaks the contract."""
    devices = fleet(60)
    _, out = simulate(devices, 6 * HOUR, scenarios=tuple(SCENARIOS), codec_share=0.4,
                      buffer_share=0.2)  # fmt: skip
    registry = {d.id: DeviceInfo(d.id, d.kind, None, d.height_cm, int(d.interval_s))
                for d in devices}  # fmt: skip
    decoder = Decoder(prefix="gw", max_payload_bytes=16 * 1024, credential_key=b"k",
                      lookup_device=registry.get)  # fmt: skip
    codecs_seen = set()
    for message in out:
        decoded = Decoded()
        received = datetime.fromtimestamp(message.t, UTC)
        decoder.decode(RawMessage(f"gw/{message.topic}", message.payload, received), decoded)
        if message.bad:
            assert decoded.dead_letters, message
        else:
            assert decoded.dead_letters == [], (message, decoded.dead_letters)
            assert decoded.readings
        if message.channel == "codec" and not message.bad:
            codecs_seen.add(message.topic.split("/")[1])
    assert codecs_seen == {"zigbee2mqtt", "chirpstack", "hikvision"}


# Codecs -------------------------------------------------------------------------------


def test_codec_payloads_have_the_vendor_fields() -> None:
    devices = fleet(40)
    _, out = simulate(devices, 6 * HOUR, codec_share=1.0, scenarios=("door_forced",))
    by_codec: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for message in out:
        if message.channel == "codec":
            by_codec[message.topic.split("/")[1]].append(json.loads(message.payload))
        else:
            assert message.channel in ("telemetry", "event")
            assert message.bad is False
            pytest.fail(f"codec_share=1 but a native message: {message.topic}")
    z2m = by_codec["zigbee2mqtt"]
    assert z2m
    for doc in z2m:
        assert {"smoke", "battery", "battery_low", "test", "tamper",
                "smoke_concentration"} <= set(doc)  # fmt: skip
        assert isinstance(doc["smoke"], bool)
        assert isinstance(doc["battery_low"], bool)
    chirp = by_codec["chirpstack"]
    assert chirp
    profiles = set()
    for doc in chirp:
        assert {"time", "deviceInfo", "fCnt", "object", "rxInfo"} <= set(doc)
        assert {"devEui", "deviceName"} <= set(doc["deviceInfo"])
        assert re.fullmatch(r"[0-9a-f]{16}", doc["deviceInfo"]["devEui"])
        obj = doc["object"]
        if "alarmFire" in obj:
            profiles.add("bin")
            assert {"level", "angle", "temperature", "alarmFire", "alarmFall"} <= set(obj)
        else:
            profiles.add("manhole")
            assert {"level", "angle", "temperature", "alarmLevel", "alarmFall", "alarmBattery",
                    "frameCounter"} <= set(obj)  # fmt: skip
        assert obj["level"] >= 0
    assert profiles == {"bin", "manhole"}
    hik = by_codec["hikvision"]
    events = [doc for doc in hik if doc.get("eventType") == "AccessControllerEvent"]
    assert events
    assert len(events) < len(hik)
    for doc in events:
        datetime.fromisoformat(doc["dateTime"])
        body = doc["AccessControllerEvent"]
        assert {"majorEventType", "subEventType", "doorNo", "serialNo"} <= set(body)
    assert any("cardNo" in doc["AccessControllerEvent"] for doc in events)
    assert any(doc["AccessControllerEvent"]["subEventType"] == 0x1B for doc in events)


def test_chirpstack_bin_level_is_the_distance_to_the_refuse() -> None:
    bin_ = DeviceSpec("bin-1", "smart_bin", 29.07, 119.64, interval_s=600, height_cm=120)
    _, out = simulate([bin_], DAY, codec_share=1.0)
    for message in out:
        doc = json.loads(message.payload)
        assert message.topic == "codec/chirpstack/bin-1"
        level_mm = doc["object"]["level"]
        assert 0 <= level_mm <= 1200
    # A full bin is a short distance: the level falls as the bin fills.
    levels = [json.loads(m.payload)["object"]["level"] for m in out]
    assert min(levels) < 0.5 * max(levels)


# Loaders, URL, CLI --------------------------------------------------------------------


def test_load_devices_from_csv(tmp_path: Path) -> None:
    path = tmp_path / "devices.csv"
    path.write_text(
        "\ufeffid,kind,lat,lon,name,building,floor,interval_s,height_cm\n"
        "smoke-001,smoke_detector,29.071,119.641,金鼎花园1幢3层烟感,金鼎花园1幢,3,300,\n"
        "manhole-001,manhole_cover,29.072,119.642,八一北街1号井盖,,,,220\n",
        encoding="utf-8",
    )
    smoke, manhole = load_devices_from_csv(path)
    assert smoke == DeviceSpec("smoke-001", "smoke_detector", 29.071, 119.641,
                               building="金鼎花园1幢", floor=3, interval_s=300.0,
                               name="金鼎花园1幢3层烟感")  # fmt: skip
    assert manhole.height_cm == 220.0
    assert manhole.building is None
    assert manhole.interval_s == 600.0  # the kind's default
    assert load_devices(path) == [smoke, manhole]


def test_a_bad_devices_file_lists_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "devices.csv"
    path.write_text(
        "id,kind,lat,lon,floor\n"
        "ok-1,smart_bin,29.0,119.0,\n"
        "bad id,smart_bin,29.0,119.0,\n"
        "x-2,toaster,29.0,119.0,\n"
        "x-3,door_access,north,119.0,\n"
        "ok-1,door_access,29.0,119.0,2.5\n",
        encoding="utf-8",
    )
    with pytest.raises(DeviceFileError) as caught:
        load_devices_from_csv(path)
    problems = caught.value.problems
    assert [p.split(":")[0] for p in problems] == ["line 3", "line 4", "line 5", "line 6"]
    assert "toaster" in problems[1]
    assert "lat" in problems[2]
    assert "floor" in problems[3]


def test_load_devices_from_json(tmp_path: Path) -> None:
    path = tmp_path / "devices.json"
    path.write_text(json.dumps([{"id": "bin-9", "kind": "smart_bin", "lat": 29.0,
                                 "lon": 119.0, "height_cm": 110}]))  # fmt: skip
    assert load_devices(path) == [
        DeviceSpec("bin-9", "smart_bin", 29.0, 119.0, interval_s=900.0, height_cm=110.0)
    ]


def test_parse_mqtt_url() -> None:
    target = parse_mqtt_url("mqtt://sim%40city:p%3Ass@broker.example:1884")
    assert (target.host, target.port, target.username, target.password, target.tls) == (
        "broker.example", 1884, "sim@city", "p:ss", False)  # fmt: skip
    secure = parse_mqtt_url("mqtts://broker.example?ca=/etc/ca.pem&insecure=1")
    assert (secure.port, secure.tls, secure.ca_file, secure.tls_insecure) == (
        8883, True, "/etc/ca.pem", True)  # fmt: skip
    for bad in ("http://x", "mqtt://", "mqtt://h:notaport", "mqtt://h?colour=red"):
        with pytest.raises(ValueError, match="MQTT URL"):
            parse_mqtt_url(bad)


def test_cli_lists_scenarios_and_rejects_bad_input(tmp_path: Path) -> None:
    runner = CliRunner()
    listed = runner.invoke(sim_cli, ["scenarios"])
    assert listed.exit_code == 0
    for name in SCENARIOS:
        assert name in listed.output
    bad_url = runner.invoke(sim_cli, ["run", "--mqtt-url", "http://x", "--count", "3"])
    assert bad_url.exit_code == 2
    assert "mqtt://" in bad_url.output
    bad_file = tmp_path / "d.csv"
    bad_file.write_text("id,kind,lat,lon\nx,toaster,1,2\n")
    rejected = runner.invoke(sim_cli, ["run", "--mqtt-url", "mqtt://127.0.0.1:1",
                                       "--devices", str(bad_file)])  # fmt: skip
    assert rejected.exit_code == 2
    assert "toaster" in rejected.output
    unknown = runner.invoke(sim_cli, ["run", "--mqtt-url", "mqtt://127.0.0.1:1",
                                      "--scenario", "meteor"])  # fmt: skip
    assert unknown.exit_code == 2


async def test_run_fleet_rejects_bad_arguments_before_connecting() -> None:
    with pytest.raises(ValueError, match="scenario"):
        await run_fleet("mqtt://127.0.0.1:1", fleet(4), scenarios=("meteor",))
    with pytest.raises(ValueError, match="speedup"):
        await run_fleet("mqtt://127.0.0.1:1", fleet(4), speedup=0)


# Against a real broker ----------------------------------------------------------------


async def test_run_fleet_publishes_to_a_real_broker(mqtt_url: str, topic_prefix: str) -> None:
    devices = [replace(d, interval_s=60.0) for d in fleet(16, seed=5)]
    ids = {d.id for d in devices}
    target = parse_mqtt_url(mqtt_url)
    received: list[aiomqtt.Message] = []
    arrived = asyncio.Event()
    async with aiomqtt.Client(
        target.host, target.port, identifier=f"sim-test-{uuid.uuid4().hex[:8]}"
    ) as subscriber:
        await subscriber.subscribe(f"{topic_prefix}/#", qos=1)

        async def collect() -> None:
            async for message in subscriber.messages:
                received.append(message)
                arrived.set()

        collector = asyncio.create_task(collect())
        try:
            async with asyncio.timeout(WAIT_S):
                stats = await run_fleet(
                    mqtt_url, devices, prefix=topic_prefix, speedup=600.0, duration_s=2.0,
                    scenarios=("fire", "faulty", "hostile"), scenario_delay_s=5.0, seed=5,
                    codec_share=0.3,
                )  # fmt: skip
            async with asyncio.timeout(WAIT_S):
                while len(received) < stats.published:
                    arrived.clear()
                    await arrived.wait()
        finally:
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector

    assert stats.published == len(received) > 100
    assert stats.failed == stats.dropped == stats.reconnects == 0
    assert stats.bad > 0
    assert {"fire", "faulty", "hostile"} <= set(stats.by_scenario)
    assert sum(stats.by_channel.values()) == stats.published

    statuses: dict[str, list[bytes]] = defaultdict(list)
    well_formed = 0
    alarm_seen = False
    native = re.compile(rf"{topic_prefix}/dev/({ID})/(telemetry|event|status)")
    vendor = re.compile(rf"{topic_prefix}/codec/(zigbee2mqtt|chirpstack|hikvision)/({ID})")
    for message in received:
        topic = message.topic.value
        payload = message.payload
        assert isinstance(payload, bytes)
        if match := native.fullmatch(topic):
            device_id, channel = match.groups()
            if channel == "status":
                if payload in (b"online", b"offline"):
                    statuses[device_id].append(payload)
                continue
        elif match := vendor.fullmatch(topic):
            device_id, channel = match.group(2), "codec"
        else:
            continue  # hostile: a bad topic
        if device_id not in ids:
            continue  # hostile: an unknown device
        try:
            document = json.loads(payload)
        except (ValueError, RecursionError):
            continue  # hostile
        documents = document if isinstance(document, list) else [document]
        if not documents or not all(isinstance(d, dict) for d in documents):
            continue
        well_formed += 1
        for doc in documents:
            alarm_seen = alarm_seen or doc.get("event") == "alarm" or (
                channel == "codec" and doc.get("smoke") is True)  # fmt: skip
    assert well_formed >= stats.published - stats.bad - 2 * len(devices)
    assert alarm_seen
    assert set(statuses) == ids
    assert all(s[0] == b"online" and s[-1] == b"offline" for s in statuses.values())
