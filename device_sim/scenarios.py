"""Named scenarios injected into a normal fleet.

- `fire`: a smoke detector's smoke and temperature rise, it alarms (`alarm: true` +
  event `alarm`); a second detector in the same building follows within a minute;
  silenced about ten minutes later.
- `cover_opened`: a manhole cover is lifted (tilt 25–85°, `open: true`, event `opened`)
  and put back (`closed`) after 15 minutes.
- `door_forced`: a door is opened without a pass (`door_forced`), left open
  (`door_held_open`), closed after 5 minutes.
- `bin_full`: a bin fills to 95–100 % and is not collected for 20 minutes, then `emptied`.
- `bin_fire`: a bin's temperature climbs past 60 °C: `fire: true` + event `fire`; out
  after about ten minutes.
- `faulty`: a few devices send out-of-range values (smoke 150, fill −5 …), wrong types,
  bad `ts` / `seq`, unknown events.
- `hostile`: not JSON, invalid UTF-8, > 16 KiB, unknown device ids, bad topics, random
  bytes, NaN, NUL, deep nesting …

Times are simulated seconds. Every scenario picks its devices with its own seeded
random stream, so a run is reproducible from the fleet and the seed.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from device_sim.engine import Scenario, Simulation, Step
from device_sim.readings import base_temperature
from device_sim.spec import DeviceKind, DeviceSpec

QUIET: Final = frozenset({"quiet"})
NO_EMPTY: Final = frozenset({"no_empty"})
SMOKE_ALARM_THRESHOLD: Final = 8.0  # %/m obscuration at which the detector alarms
BIN_FIRE_THRESHOLD_C: Final = 60.0
OVERSIZED_MIN_BYTES: Final = 17 * 1024


def _compact(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


@dataclass
class Fire:
    name: str = "fire"
    description: str = "smoke detector alarms, a second one in the same building follows"
    rise_s: float = 120.0
    burn_s: float = 480.0
    report_every_s: float = 10.0

    def plan(self, sim: Simulation, t0: float, rng: random.Random) -> list[Step]:
        detectors = sim.devices_of("smoke_detector")
        if not detectors:
            return []
        buildings: dict[str, list[DeviceSpec]] = defaultdict(list)
        for spec in detectors:
            if spec.building is not None:
                buildings[spec.building].append(spec)
        shared = sorted(b for b, members in buildings.items() if len(members) >= 2)
        if shared:
            first, second = rng.sample(buildings[rng.choice(shared)], 2)
            pair: list[tuple[DeviceSpec, float]] = [(first, t0), (second, t0 + rng.uniform(20, 50))]
        else:
            pair = [(rng.choice(detectors), t0)]
        steps: list[Step] = []
        for spec, start in pair:
            sim.claim(spec.id, self.name)
            steps.extend(self._burn(sim, spec, start, rng))
        return steps

    def _burn(
        self, sim: Simulation, spec: DeviceSpec, start: float, rng: random.Random
    ) -> list[Step]:
        ambient = base_temperature(spec, sim.states[spec.id], start)
        steps: list[Step] = []
        count = max(2, round(self.rise_s / self.report_every_s))
        alarmed = False
        for index in range(count + 1):
            frac = index / count
            smoke = round(0.1 + 29.9 * frac**2 + rng.uniform(-0.05, 0.05) * frac, 2)
            temperature = round(ambient + 40.0 * frac**1.5 + rng.gauss(0.0, 0.3), 1)
            co = round(1.0 + 150.0 * frac**2, 1)  # smouldering: carbon monoxide rises too
            alarm = smoke >= SMOKE_ALARM_THRESHOLD
            event = None
            if alarm and not alarmed:
                event = {"event": "alarm", "smoke": smoke, "temperature": temperature}
                alarmed = True
            steps.append(Step(
                start + index * self.report_every_s, spec.id,
                overrides={"smoke": smoke, "temperature": temperature, "co": co, "alarm": alarm},
                hold=QUIET, event=event,
            ))  # fmt: skip
        t = start + self.rise_s
        while t < start + self.rise_s + self.burn_s:
            t += 30.0
            steps.append(Step(t, spec.id, overrides={
                "smoke": round(rng.uniform(25.0, 35.0), 2),
                "temperature": round(ambient + rng.uniform(38.0, 50.0), 1),
                "co": round(rng.uniform(120.0, 250.0), 1),
                "alarm": True,
            }))  # fmt: skip
        # Someone silences it; the smoke clears.
        steps.append(Step(t + 30.0, spec.id, event={"event": "silenced"}, overrides={
            "smoke": round(rng.uniform(3.0, 5.0), 2),
            "temperature": round(ambient + 15.0, 1), "co": 30.0, "alarm": False,
        }))  # fmt: skip
        steps.append(Step(t + 90.0, spec.id, overrides={
            "smoke": round(rng.uniform(0.5, 1.0), 2),
            "temperature": round(ambient + 4.0, 1), "co": 5.0, "alarm": False,
        }))  # fmt: skip
        steps.append(Step(t + 150.0, spec.id, clear=True))
        return steps


@dataclass
class CoverOpened:
    name: str = "cover_opened"
    description: str = "a manhole cover is lifted (tilt > 10°, open, event opened), closed later"
    open_s: float = 900.0
    report_every_s: float = 60.0

    def plan(self, sim: Simulation, t0: float, rng: random.Random) -> list[Step]:
        covers = sim.devices_of("manhole_cover")
        if not covers:
            return []
        spec = rng.choice(covers)
        sim.claim(spec.id, self.name)
        tilt = rng.uniform(25.0, 85.0)
        steps = [Step(t0, spec.id, overrides={"tilt": round(tilt, 1), "open": True},
                      event={"event": "opened"})]  # fmt: skip
        t = t0
        while t + self.report_every_s < t0 + self.open_s:
            t += self.report_every_s
            steps.append(Step(t, spec.id, overrides={"tilt": round(tilt + rng.gauss(0, 0.3), 1)}))
        steps.append(Step(t0 + self.open_s, spec.id, clear=True, event={"event": "closed"}))
        return steps


@dataclass
class DoorForced:
    name: str = "door_forced"
    description: str = "a door is forced open, held open, closed after a while"
    open_s: float = 300.0

    def plan(self, sim: Simulation, t0: float, rng: random.Random) -> list[Step]:
        doors = sim.devices_of("door_access")
        if not doors:
            return []
        spec = rng.choice(doors)
        sim.claim(spec.id, self.name)
        opened = {"door_open": True, "locked": True}
        return [
            Step(t0, spec.id, state=opened, hold=QUIET, event={"event": "door_forced"}),
            Step(t0 + rng.uniform(60.0, 120.0), spec.id, state=opened,
                 event={"event": "door_held_open"}),
            Step(t0 + self.open_s, spec.id, clear=True, state={"door_open": False},
                 event={"event": "door_closed"}),
        ]  # fmt: skip


@dataclass
class BinFull:
    name: str = "bin_full"
    description: str = "a bin fills up to 95-100 % and is not collected for a while"
    full_s: float = 1200.0
    report_every_s: float = 120.0

    def plan(self, sim: Simulation, t0: float, rng: random.Random) -> list[Step]:
        bins = sim.devices_of("smart_bin")
        if not bins:
            return []
        spec = rng.choice(bins)
        state = sim.claim(spec.id, self.name)
        fill = max(state.fill, 86.0)
        steps = [Step(t0, spec.id, state={"fill": fill}, hold=NO_EMPTY)]
        t = t0
        while t + self.report_every_s < t0 + self.full_s:
            t += self.report_every_s
            fill = min(fill + rng.uniform(2.0, 4.0), rng.uniform(97.0, 100.0))
            steps.append(Step(t, spec.id, state={"fill": fill}))
        steps.append(Step(t0 + self.full_s, spec.id, clear=True, state={"fill": 0.5},
                          event={"event": "emptied"}))  # fmt: skip
        return steps


@dataclass
class BinFire:
    name: str = "bin_fire"
    description: str = "a bin's temperature climbs past 60 °C: fire, then put out"
    rise_s: float = 180.0
    burn_s: float = 480.0

    def plan(self, sim: Simulation, t0: float, rng: random.Random) -> list[Step]:
        bins = sim.devices_of("smart_bin")
        if not bins:
            return []
        spec = rng.choice(bins)
        ambient = base_temperature(spec, sim.claim(spec.id, self.name), t0)
        steps: list[Step] = []
        burning = False
        for index in range(7):
            frac = index / 6
            temperature = round(ambient + (85.0 - ambient) * frac**1.3 + rng.gauss(0, 0.5), 1)
            fire = temperature >= BIN_FIRE_THRESHOLD_C
            event = {"event": "fire"} if fire and not burning else None
            burning = burning or fire
            steps.append(
                Step(
                    t0 + index * self.rise_s / 6,
                    spec.id,
                    overrides={"temperature": temperature, "fire": fire},
                    event=event,
                )
            )
        t = t0 + self.rise_s
        while t + 60.0 < t0 + self.rise_s + self.burn_s:
            t += 60.0
            steps.append(Step(t, spec.id, overrides={
                "temperature": round(rng.uniform(70.0, 95.0), 1), "fire": True}))  # fmt: skip
        steps.append(Step(t + 60.0, spec.id, overrides={
            "temperature": round(ambient + 15.0, 1), "fire": False}))  # fmt: skip
        steps.append(Step(t + 180.0, spec.id, clear=True))
        return steps


# Bad input ----------------------------------------------------------------------------

_FAULTS: Final[dict[DeviceKind, tuple[dict[str, Any], ...]]] = {
    "smoke_detector": (
        {"smoke": 150}, {"smoke": -1.5}, {"temperature": "hot"}, {"alarm": "yes"},
        {"co": -5}, {"temperature": 9999},
    ),
    "manhole_cover": (
        {"tilt": 200}, {"water_level": 140}, {"open": 1}, {"gas_ch4": -3},
        {"tilt": "level"},
    ),
    "door_access": ({"door_open": "open"}, {"locked": "true"}, {"door_open": 0}),
    "smart_bin": ({"fill": -5}, {"fill": 120}, {"weight": -1}, {"fire": "no"}, {"tilt": 270}),
}  # fmt: skip
_COMMON_FAULTS: Final = (
    {"battery": 130}, {"battery": -2}, {"rssi": 20}, {"seq": "12"}, {"seq": -1},
    {"ts": "yesterday"}, {"ts": 10**18}, {"ts": "2024-13-45T99:00:00Z"},
)  # fmt: skip
_EVENT_FAULTS: Final = ({"event": "explode"}, {"event": 42}, {"event": None})


@dataclass
class Faulty:
    name: str = "faulty"
    description: str = "devices sending out-of-range values, wrong types, bad ts/seq/events"
    duration_s: float = 600.0
    every_s: float = 30.0

    def plan(self, sim: Simulation, t0: float, rng: random.Random) -> list[Step]:
        targets: list[DeviceSpec] = []
        for kind in _FAULTS:
            candidates = sim.devices_of(kind, free=False)
            if candidates:
                targets.append(rng.choice(candidates))
        if not targets:
            return []
        steps: list[Step] = []
        t = t0
        while t < t0 + self.duration_s:
            spec = rng.choice(targets)
            roll = rng.random()
            if roll < 0.15:
                steps.append(Step(t, spec.id, bad_fields=dict(rng.choice(_EVENT_FAULTS)),
                                  bad_channel="event"))  # fmt: skip
            else:
                pool = _FAULTS[spec.kind] if roll < 0.7 else _COMMON_FAULTS
                steps.append(Step(t, spec.id, bad_fields=dict(rng.choice(pool))))
            t += self.every_s * rng.uniform(0.5, 1.5)
        return steps


def hostile_message(
    variant: str, sim: Simulation, rng: random.Random
) -> tuple[str, bytes, str | None, bool]:
    """(topic relative to the prefix, payload, device id or None, retain) of one piece of
    hostile input of the named variant."""
    specs = list(sim.specs.values())
    spec = rng.choice(specs)
    telemetry = f"dev/{spec.id}/telemetry"
    ghost = f"ghost-{rng.getrandbits(32):08x}"
    if variant == "not_json":
        return telemetry, b"smoke=12;temperature=21.5", spec.id, False
    if variant == "invalid_utf8":
        return telemetry, b'{"smoke": 0.1, "note": "\xff\xfe\xc3("}', spec.id, False
    if variant == "oversized":
        size = rng.randint(OVERSIZED_MIN_BYTES, 48 * 1024)
        return telemetry, _compact({"smoke": 0.1, "padding": "x" * size}), spec.id, False
    if variant == "unknown_device":
        return f"dev/{ghost}/telemetry", _compact({"smoke": 0.1, "seq": 1}), None, False
    if variant == "garbage":
        return telemetry, b"\xde\xad" + rng.randbytes(rng.randint(1, 512)), spec.id, False
    if variant == "empty":
        return telemetry, b"", spec.id, False
    if variant == "junk_array":
        return telemetry, b'[1, "two", null, []]', spec.id, False
    if variant == "nan":
        return telemetry, b'{"smoke": NaN, "temperature": Infinity}', spec.id, False
    if variant == "bad_status":
        return f"dev/{spec.id}/status", b"maybe", spec.id, False
    if variant == "device_mismatch":
        other = rng.choice(specs)
        impostor = other.id if other.id != spec.id else ghost
        return telemetry, _compact({"device_id": impostor, "smoke": 0.1}), spec.id, False
    if variant == "unknown_codec":
        return f"codec/acme/{spec.id}", _compact({"value": 1}), spec.id, False
    if variant == "wrong_codec":
        codec = "hikvision" if spec.kind != "door_access" else "chirpstack"
        return f"codec/{codec}/{spec.id}", _compact({"smoke": True}), spec.id, False
    if variant == "bad_channel":
        return f"dev/{spec.id}/nonsense", _compact({"smoke": 0.1}), spec.id, False
    if variant == "bad_device_id":
        return "dev/bad id!/telemetry", _compact({"smoke": 0.1}), None, False
    if variant == "deep_nesting":
        depth = 3000
        return telemetry, b"[" * depth + b"]" * depth, spec.id, False
    if variant == "nul":
        return telemetry, b'{"smoke": 0.1, "note": "a\\u0000b"}', spec.id, False
    if variant == "not_object":
        return f"dev/{spec.id}/event", b'"door_forced"', spec.id, False
    raise ValueError(f"unknown hostile variant {variant!r}")


HOSTILE_VARIANTS: Final = (
    "not_json", "invalid_utf8", "oversized", "unknown_device", "garbage", "empty",
    "junk_array", "nan", "bad_status", "device_mismatch", "unknown_codec", "wrong_codec",
    "bad_channel", "bad_device_id", "deep_nesting", "nul", "not_object",
)  # fmt: skip


@dataclass
class Hostile:
    name: str = "hostile"
    description: str = "garbage: not JSON, invalid UTF-8, oversized, unknown ids, bad topics"
    duration_s: float = 600.0
    every_s: float = 20.0

    def plan(self, sim: Simulation, t0: float, rng: random.Random) -> list[Step]:
        if not sim.specs:
            return []
        variants = list(HOSTILE_VARIANTS)
        rng.shuffle(variants)
        steps: list[Step] = []
        t, index = t0, 0
        while t < t0 + self.duration_s:
            topic, payload, device_id, retain = hostile_message(
                variants[index % len(variants)], sim, rng
            )
            steps.append(Step(t, device_id, raw_topic=topic, raw_payload=payload,
                              raw_retain=retain))  # fmt: skip
            index += 1
            t += self.every_s * rng.uniform(0.5, 1.5)
        return steps


SCENARIOS: Final[dict[str, type[Scenario]]] = {
    "fire": Fire,
    "cover_opened": CoverOpened,
    "door_forced": DoorForced,
    "bin_full": BinFull,
    "bin_fire": BinFire,
    "faulty": Faulty,
    "hostile": Hostile,
}


def make_scenarios(names: Sequence[str]) -> list[Scenario]:
    """Scenario objects for the given names (repeats allowed); unknown names: ValueError."""
    unknown = [name for name in names if name not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    return [SCENARIOS[name]() for name in names]
