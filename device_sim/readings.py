"""Realistic readings per device kind (CONTRACT §2), as functions of
(device spec, simulated time, a seeded `random.Random`) plus a small per-device state.

Everything here is deterministic for a given seed and sequence of times: no clock, no
global random state. Times are Unix seconds of *simulated* time; the engine decides how
they map to the `ts` written into the payload.

Normal readings always stay inside the contract's ranges; only the `faulty` and
`hostile` scenarios produce bad input.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

from device_sim.spec import DeviceKind, DeviceSpec

Channel = Literal["telemetry", "event"]
TsStyle = Literal["rfc3339", "epoch_ms"]

CHINA_UTC_OFFSET_S: Final = 8 * 3600  # the daily cycle follows local (UTC+8) time
DAY_S: Final = 86_400.0
HOUR_S: Final = 3_600.0

# Contract §2 ranges of the normal readings, used by the generators' clamps and by tests.
RANGES: Final[dict[str, tuple[float, float]]] = {
    "battery": (0.0, 100.0),
    "rssi": (-100.0, -60.0),  # what the simulator emits; the contract accepts any dBm ≤ 0
    "smoke": (0.0, 100.0),
    "temperature": (-50.0, 250.0),
    "co": (0.0, 10_000.0),
    "tilt": (0.0, 180.0),
    "water_level": (0.0, 100.0),
    "gas_ch4": (0.0, 100.0),
    "gas_h2s": (0.0, 10_000.0),
    "fill": (0.0, 100.0),
    "weight": (0.0, 10_000.0),
}
EVENTS: Final[dict[DeviceKind, frozenset[str]]] = {
    "smoke_detector": frozenset({"alarm", "test", "tamper", "silenced"}),
    "manhole_cover": frozenset({"opened", "closed", "tamper"}),
    "door_access": frozenset(
        {
            "access_granted",
            "access_denied",
            "door_opened",
            "door_closed",
            "door_forced",
            "door_held_open",
            "tamper",
        }
    ),
    "smart_bin": frozenset({"fire", "knocked_over", "emptied"}),
}
BOOLEAN_FIELDS: Final = frozenset(
    {"alarm", "test", "tamper", "open", "door_open", "locked", "fire"}
)

SELF_TEST_PROBABILITY: Final = 0.0002  # per smoke-detector report
MAX_DOOR_ACCESSES_PER_REPORT: Final = 12


@dataclass(frozen=True, slots=True)
class Reading:
    """One telemetry reading or event of one device, before `ts`/`seq` are added."""

    t: float  # simulated time it happened
    channel: Channel
    fields: dict[str, Any]


@dataclass(slots=True)
class DeviceState:
    """The little a device remembers between reports."""

    seq: int = 0
    last_t: float | None = None
    ts_style: TsStyle = "rfc3339"
    battery: float = 100.0
    battery_drain_per_day: float = 0.1
    rssi_base: float = -80.0
    temperature_offset: float = 0.0
    # smoke detector
    test_pending: bool = False
    # manhole cover
    tilt_base: float = 0.5
    water_base: float = 20.0
    water_level: float = 20.0
    # door access
    door_open: bool = False
    locked: bool = True
    credentials: tuple[str, ...] = ()
    # smart bin
    fill: float = 0.0
    fill_rate_per_h: float = 3.0
    empty_at: float = 80.0
    capacity_kg: float = 60.0
    # scenarios: field values forced into every telemetry reading, and holds
    # ("no_empty": the bin is not collected; "quiet": no routine door traffic)
    overrides: dict[str, Any] = field(default_factory=dict)
    hold: set[str] = field(default_factory=set)
    scenario: str | None = None
    last_fields: dict[str, Any] = field(default_factory=dict)  # the latest telemetry
    # transport profile
    codec: str | None = None  # "zigbee2mqtt" | "chirpstack" | "hikvision" | None (native)
    buffered: int = 0  # > 1: telemetry flushed as a JSON array of this many readings
    angle_sign: int = 1  # Dingtek decoders report a signed angle


def new_state(spec: DeviceSpec, rng: random.Random) -> DeviceState:
    """A device's initial state, drawn from its own random stream."""
    state = DeviceState(
        ts_style="rfc3339" if rng.random() < 0.5 else "epoch_ms",
        battery=rng.uniform(60.0, 100.0),
        battery_drain_per_day=rng.uniform(0.02, 0.3),
        rssi_base=rng.uniform(-92.0, -66.0),
        temperature_offset=rng.gauss(0.0, 0.8),
        angle_sign=rng.choice((1, -1)),
    )
    if spec.kind == "manhole_cover":
        state.tilt_base = rng.uniform(0.1, 1.5)
        state.water_base = rng.uniform(5.0, 45.0)
        state.water_level = state.water_base
    elif spec.kind == "door_access":
        state.credentials = tuple(_credential(rng) for _ in range(rng.randint(8, 30)))
    elif spec.kind == "smart_bin":
        state.fill = rng.uniform(0.0, 60.0)
        state.fill_rate_per_h = rng.uniform(1.5, 5.0)
        state.empty_at = rng.uniform(70.0, 92.0)
        state.capacity_kg = rng.uniform(40.0, 90.0)
    return state


def _credential(rng: random.Random) -> str:
    """An opaque card number: decimal (Mifare UID as printed) or hex, like real readers."""
    if rng.random() < 0.6:
        return str(rng.randrange(1_000_000_000, 4_294_967_295))
    return f"{rng.getrandbits(32):08X}"


# Shapes of the day ------------------------------------------------------------------


def local_hour(t: float) -> float:
    return ((t + CHINA_UTC_OFFSET_S) % DAY_S) / HOUR_S


def daily_temperature(t: float, *, mean: float = 22.5, amplitude: float = 7.5) -> float:
    """Ambient temperature: minimum around 03:00 local, maximum around 15:00."""
    return mean + amplitude * math.sin(2 * math.pi * (local_hour(t) - 9.0) / 24.0)


def base_temperature(spec: DeviceSpec, state: DeviceState, t: float) -> float:
    """The temperature a device of this kind sees at `t`, without noise."""
    if spec.kind == "smoke_detector":  # indoors: damped
        value = daily_temperature(t, mean=22.5, amplitude=3.5)
    elif spec.kind == "manhole_cover":  # underground: damped and cooler
        value = daily_temperature(t, mean=19.0, amplitude=2.5)
    else:
        value = daily_temperature(t)
    return value + state.temperature_offset


def _activity(t: float) -> float:
    """How busy a street is at `t` (0.1 at night, up to ~1.6 at rush hours)."""
    hour = local_hour(t)
    if hour < 6 or hour >= 23:
        return 0.1
    peaks = math.exp(-(((hour - 8.0) / 1.5) ** 2)) + math.exp(-(((hour - 18.5) / 2.0) ** 2))
    return 0.6 + peaks


def _clamp(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def _poisson(rng: random.Random, mean: float) -> int:
    if mean <= 0:
        return 0
    limit, k, product = math.exp(-mean), 0, rng.random()
    while product > limit:
        k += 1
        product *= rng.random()
    return k


# Generators ---------------------------------------------------------------------------


def generate(spec: DeviceSpec, state: DeviceState, t: float, rng: random.Random) -> list[Reading]:
    """What the device reports at simulated time `t`: zero or more events that happened
    since its last report, then one telemetry reading (scenario overrides applied).
    Readings come out in time order."""
    dt = 0.0 if state.last_t is None else max(0.0, t - state.last_t)  # first: no history
    since = t - dt
    state.last_t = t
    state.battery = max(1.0, state.battery - state.battery_drain_per_day * dt / DAY_S)

    events: list[Reading] = []
    if spec.kind == "smoke_detector":
        fields = _smoke(spec, state, t, rng, events)
    elif spec.kind == "manhole_cover":
        fields = _manhole(spec, state, t, dt, rng)
    elif spec.kind == "door_access":
        fields = _door(state, since, t, rng, events)
    else:
        fields = _bin(spec, state, t, dt, rng, events)

    fields["battery"] = round(state.battery)
    fields["rssi"] = round(_clamp(state.rssi_base + rng.gauss(0.0, 3.0), -100.0, -60.0))
    fields.update(state.overrides)
    state.last_fields = dict(fields)
    events.sort(key=lambda r: r.t)
    return [*events, Reading(t, "telemetry", fields)]


def _smoke(
    spec: DeviceSpec, state: DeviceState, t: float, rng: random.Random, events: list[Reading]
) -> dict[str, Any]:
    testing = state.test_pending
    state.test_pending = False
    if not testing and "quiet" not in state.hold and rng.random() < SELF_TEST_PROBABILITY:
        testing = True
        events.append(Reading(t, "event", {"event": "test"}))
    return {
        "smoke": round(_clamp(rng.gauss(0.04, 0.025), 0.0, 0.3), 3),
        "temperature": round(base_temperature(spec, state, t) + rng.gauss(0.0, 0.2), 1),
        "co": round(_clamp(rng.gauss(1.0, 0.6), 0.0, 8.0), 1),
        "alarm": False,
        "test": testing,
        "tamper": False,
    }


def _manhole(
    spec: DeviceSpec, state: DeviceState, t: float, dt: float, rng: random.Random
) -> dict[str, Any]:
    # Water level: a mean-reverting random walk, scaled by elapsed time (≈ ±1 %/10 min).
    step = math.sqrt(max(dt, 1.0) / 600.0)
    pull = min(1.0, dt / (6 * HOUR_S))
    state.water_level += rng.gauss(0.0, 1.0) * step + (state.water_base - state.water_level) * pull
    state.water_level = _clamp(state.water_level, 0.0, 70.0)
    return {
        "tilt": round(_clamp(state.tilt_base + rng.gauss(0.0, 0.15), 0.0, 2.0), 2),
        "open": False,
        "water_level": round(state.water_level, 1),
        "gas_ch4": round(_clamp(rng.gauss(0.3, 0.3), 0.0, 3.0), 2),
        "gas_h2s": round(_clamp(rng.gauss(0.2, 0.2), 0.0, 2.0), 2),
        "temperature": round(base_temperature(spec, state, t) + rng.gauss(0.0, 0.2), 1),
    }


def _door(
    state: DeviceState, since: float, t: float, rng: random.Random, events: list[Reading]
) -> dict[str, Any]:
    if "quiet" not in state.hold:
        # About 6 passages an hour at busy times, fewer at night.
        mean = 6.0 * _activity(t) * (t - since) / HOUR_S
        count = min(_poisson(rng, mean), MAX_DOOR_ACCESSES_PER_REPORT)
        latest = max(since, t - 25.0)  # the door is shut again before this report
        free_from = since  # one passage at a time: the door closes before it opens again
        for at in sorted(rng.uniform(since, latest) for _ in range(count)):
            at = max(at, free_from)
            if at > t:
                break
            if rng.random() < 0.92 and state.credentials:
                credential = rng.choice(state.credentials)
                opened = min(at + rng.uniform(1.0, 3.0), t)
                closed = min(opened + rng.uniform(4.0, 15.0), t)
                free_from = closed + 0.5
                events.append(
                    Reading(at, "event", {"event": "access_granted", "credential": credential})
                )
                events.append(Reading(opened, "event", {"event": "door_opened"}))
                events.append(Reading(closed, "event", {"event": "door_closed"}))
            else:
                credential = _credential(rng)
                events.append(
                    Reading(at, "event", {"event": "access_denied", "credential": credential})
                )
        state.door_open = False
        state.locked = True
    return {"door_open": state.door_open, "locked": state.locked}


def _bin(
    spec: DeviceSpec,
    state: DeviceState,
    t: float,
    dt: float,
    rng: random.Random,
    events: list[Reading],
) -> dict[str, Any]:
    rate = state.fill_rate_per_h * _activity(t) * rng.uniform(0.7, 1.3)
    state.fill = _clamp(state.fill + rate * dt / HOUR_S, 0.0, 100.0)
    if state.fill >= state.empty_at and "no_empty" not in state.hold:
        # Collected since the last report: the report shows it nearly empty again.
        events.append(Reading(t, "event", {"event": "emptied"}))
        state.fill = rng.uniform(0.0, 3.0)
        state.empty_at = rng.uniform(70.0, 92.0)
    fill = state.fill
    return {
        "fill": round(fill, 1),
        "weight": round(fill / 100.0 * state.capacity_kg, 1),
        "temperature": round(base_temperature(spec, state, t) + 1.0 + rng.gauss(0.0, 0.3), 1),
        "tilt": round(_clamp(rng.gauss(1.0, 0.5), 0.0, 5.0), 1),
        "fire": False,
    }


# Envelope -----------------------------------------------------------------------------


def format_rfc3339(t: float) -> str:
    """`2024-05-01T06:03:22.125Z`: UTC, millisecond precision."""
    stamp = datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def format_ts(t: float, style: TsStyle) -> str | int:
    return format_rfc3339(t) if style == "rfc3339" else round(t * 1000)


def stamp(state: DeviceState, reading: Reading, ts_time: float) -> dict[str, Any]:
    """The native payload object: `ts` (in the device's style), the next `seq`, fields."""
    state.seq += 1
    return {"ts": format_ts(ts_time, state.ts_style), "seq": state.seq, **reading.fields}
