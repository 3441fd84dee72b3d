"""The simulation proper, without any I/O: a schedule of device reports and scenario
steps in simulated time, turned into MQTT messages (topic relative to the prefix,
payload bytes). `fleet.run_fleet` drives it from the wall clock and publishes; tests
drive it directly, hours of simulated time in milliseconds.
"""

from __future__ import annotations

import heapq
import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

from device_sim import codecs
from device_sim.readings import Channel, DeviceState, Reading, generate, new_state, stamp
from device_sim.spec import DeviceKind, DeviceSpec

OutChannel = Literal["telemetry", "event", "status", "codec", "other"]

DEFAULT_BUFFER_SHARE: Final = 0.1
DEFAULT_BUFFER_SIZE: Final = 3
DEFAULT_JITTER: Final = 0.1  # ± share of the interval
DEFAULT_SCENARIO_DELAY_S: Final = 30.0  # simulated seconds from start to the first scenario
DEFAULT_SCENARIO_STAGGER_S: Final = 20.0  # between the starts of successive scenarios

# What a stateless vendor format shows when an event happens (see `_encode_codec`).
_IMPLIED: Final[dict[str, dict[str, Any]]] = {
    "alarm": {"alarm": True},
    "silenced": {"alarm": False},
    "test": {"test": True},
    "tamper": {"tamper": True},
    "opened": {"open": True},
    "closed": {"open": False},
    "fire": {"fire": True},
    "knocked_over": {"tilt": 90.0},
}


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One MQTT message to publish. `topic` is relative to the prefix (`dev/x/telemetry`)."""

    topic: str
    payload: bytes
    channel: OutChannel
    device_id: str | None = None
    kind: DeviceKind | None = None
    scenario: str | None = None
    bad: bool = False  # deliberately bad input (faulty / hostile)
    retain: bool = False
    t: float = 0.0  # simulated time


@dataclass(frozen=True, slots=True)
class SimOptions:
    """Knobs of a simulation; shares are fractions of the devices of a kind (0–1)."""

    codec_share: float = 0.0
    buffer_share: float = DEFAULT_BUFFER_SHARE
    buffer_size: int = DEFAULT_BUFFER_SIZE
    jitter: float = DEFAULT_JITTER
    scenario_delay_s: float = DEFAULT_SCENARIO_DELAY_S
    scenario_stagger_s: float = DEFAULT_SCENARIO_STAGGER_S
    scenario_every_s: float | None = None  # None: each scenario runs once

    def __post_init__(self) -> None:
        for name in ("codec_share", "buffer_share", "jitter"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within 0..1, got {value}")
        if self.buffer_size < 2:
            raise ValueError(f"buffer_size must be at least 2, got {self.buffer_size}")
        if self.scenario_delay_s < 0 or self.scenario_stagger_s < 0:
            raise ValueError("scenario delays must not be negative")
        if self.scenario_every_s is not None and self.scenario_every_s <= 0:
            raise ValueError(f"scenario_every_s must be > 0, got {self.scenario_every_s}")


@dataclass(frozen=True, slots=True)
class Step:
    """One scheduled action of a scenario, at simulated time `at`.

    For a device: apply `state` (attributes of its DeviceState), `overrides` (forced
    telemetry fields; a None value removes one), `hold`; then report telemetry (if
    `telemetry`) and `event`. `clear` first returns the device to normal. `bad_fields`
    makes the report a faulty native message with these fields forced in. `raw_topic`
    publishes `raw_payload` as it is (hostile input), device or not.
    """

    at: float
    device_id: str | None = None
    state: Mapping[str, Any] | None = None
    overrides: Mapping[str, Any] | None = None
    hold: frozenset[str] | None = None
    event: Mapping[str, Any] | None = None
    telemetry: bool = True
    clear: bool = False
    bad_fields: Mapping[str, Any] | None = None
    bad_channel: Channel = "telemetry"
    raw_topic: str | None = None
    raw_payload: bytes = b""
    raw_retain: bool = False


class Scenario(Protocol):
    """A named story injected into the fleet; `plan` picks its devices and returns its
    steps (absolute simulated times, not before `t0`)."""

    name: str
    description: str

    def plan(self, sim: Simulation, t0: float, rng: random.Random) -> list[Step]: ...


@dataclass(order=True, slots=True)
class _Item:
    at: float
    order: int
    what: Literal["tick", "step", "plan"] = field(compare=False)
    device_id: str | None = field(default=None, compare=False)
    scenario: int = field(default=-1, compare=False)
    step: Step | None = field(default=None, compare=False)


def _json(document: Any) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


class Simulation:
    """Devices, their states and random streams, scenarios, and the schedule."""

    def __init__(
        self,
        devices: Sequence[DeviceSpec],
        *,
        seed: int = 1,
        start: float,
        options: SimOptions | None = None,
        scenarios: Sequence[Scenario] = (),
        stamp_time: Callable[[float], float] | None = None,
    ) -> None:
        self.seed = seed
        self.start = start
        self.options = options or SimOptions()
        self.scenarios = list(scenarios)
        self.stamp_time = stamp_time or (lambda t: t)
        self.specs: dict[str, DeviceSpec] = {}
        self.states: dict[str, DeviceState] = {}
        self._rngs: dict[str, random.Random] = {}
        self._timing: dict[str, random.Random] = {}
        self._scenario_rngs = [
            random.Random(f"{seed}/scenario/{index}/{scenario.name}")
            for index, scenario in enumerate(self.scenarios)
        ]
        self._heap: list[_Item] = []
        self._order = 0
        self.now = start
        for spec in devices:
            if spec.id in self.specs:
                raise ValueError(f"duplicate device id {spec.id!r}")
            self.specs[spec.id] = spec
            rng = random.Random(f"{seed}/device/{spec.id}")
            state = new_state(spec, rng)
            self._assign_profile(spec, state, random.Random(f"{seed}/profile/{spec.id}"))
            self.states[spec.id] = state
            self._rngs[spec.id] = rng
            timing = random.Random(f"{seed}/timing/{spec.id}")
            self._timing[spec.id] = timing
            self._push(_Item(start + timing.uniform(0.0, spec.interval_s), 0, "tick", spec.id))
        for index in range(len(self.scenarios)):
            at = start + self.options.scenario_delay_s + index * self.options.scenario_stagger_s
            self._push(_Item(at, 0, "plan", scenario=index))

    def _assign_profile(self, spec: DeviceSpec, state: DeviceState, rng: random.Random) -> None:
        # Draw both numbers always, so one share does not change the other's picks.
        codec_draw, buffer_draw = rng.random(), rng.random()
        codec = codecs.codec_for(spec)
        if codec is not None and codec_draw < self.options.codec_share:
            state.codec = codec
        elif spec.kind != "door_access" and buffer_draw < self.options.buffer_share:
            state.buffered = self.options.buffer_size

    def _push(self, item: _Item) -> None:
        self._order += 1
        item.order = self._order
        heapq.heappush(self._heap, item)

    # For scenarios ----------------------------------------------------------------------

    def devices_of(self, kind: DeviceKind, *, free: bool = True) -> list[DeviceSpec]:
        """Devices of a kind (in a stable order); `free`: not already in a scenario."""
        return [
            spec
            for spec in self.specs.values()
            if spec.kind == kind and (not free or self.states[spec.id].scenario is None)
        ]

    def claim(self, device_id: str, scenario: str) -> DeviceState:
        state = self.states[device_id]
        state.scenario = scenario
        return state

    # Running ----------------------------------------------------------------------------

    def next_due(self) -> float | None:
        return self._heap[0].at if self._heap else None

    def status_messages(self, status: Literal["online", "offline"]) -> list[Outgoing]:
        return [
            Outgoing(f"dev/{spec.id}/status", status.encode(), "status", spec.id, spec.kind,
                     retain=True, t=self.now)
            for spec in self.specs.values()
        ]  # fmt: skip

    def advance(self, until: float) -> list[Outgoing]:
        """Everything due up to simulated time `until`, in time order."""
        out: list[Outgoing] = []
        while self._heap and self._heap[0].at <= until:
            item = heapq.heappop(self._heap)
            self.now = item.at
            if item.what == "tick":
                assert item.device_id is not None
                out.extend(self._tick(item.device_id, item.at))
            elif item.what == "step":
                assert item.step is not None
                out.extend(self._step(self.scenarios[item.scenario].name, item.step))
            else:
                self._plan(item.scenario, item.at)
        self.now = max(self.now, until)
        return out

    def run_for(self, seconds: float) -> list[Outgoing]:
        """Advance by `seconds` of simulated time (for tests and batch use)."""
        return self.advance(self.now + seconds)

    def _plan(self, index: int, at: float) -> None:
        scenario = self.scenarios[index]
        for step in scenario.plan(self, at, self._scenario_rngs[index]):
            self._push(_Item(max(step.at, at), 0, "step", step.device_id, index, step))
        if self.options.scenario_every_s is not None:
            self._push(_Item(at + self.options.scenario_every_s, 0, "plan", scenario=index))

    def _tick(self, device_id: str, t: float) -> list[Outgoing]:
        spec, state = self.specs[device_id], self.states[device_id]
        rng = self._rngs[device_id]
        jitter = self.options.jitter
        interval = spec.interval_s * (1.0 + self._timing[device_id].uniform(-jitter, jitter))
        self._push(_Item(t + interval, 0, "tick", device_id))
        if state.buffered > 1 and state.codec is None:
            # A buffering device samples `buffered` times per period and flushes them all.
            readings: list[Reading] = []
            for index in range(state.buffered):
                at = t - (state.buffered - 1 - index) * spec.interval_s / state.buffered
                if at >= self.start:  # the first flush holds only what was sampled since
                    readings.extend(generate(spec, state, at, rng))
            return self._encode(spec, state, readings, state.scenario, as_array=True)
        return self._encode(spec, state, generate(spec, state, t, rng), state.scenario)

    def _step(self, scenario: str, step: Step) -> list[Outgoing]:
        if step.raw_topic is not None:
            spec = self.specs.get(step.device_id or "")
            return [
                Outgoing(step.raw_topic, step.raw_payload, _channel_of(step.raw_topic),
                         step.device_id, spec.kind if spec else None, scenario, bad=True,
                         retain=step.raw_retain, t=step.at)
            ]  # fmt: skip
        assert step.device_id is not None
        spec, state = self.specs[step.device_id], self.states[step.device_id]
        rng = self._rngs[step.device_id]
        if step.bad_fields is not None:
            return [self._faulty(spec, state, rng, step, scenario)]
        if step.clear:
            state.overrides.clear()
            state.hold.clear()
            state.scenario = None
        else:
            state.scenario = scenario
        for key, value in (step.state or {}).items():
            setattr(state, key, value)
        for key, value in (step.overrides or {}).items():
            if value is None:
                state.overrides.pop(key, None)
            else:
                state.overrides[key] = value
        if step.hold is not None:
            state.hold = set(step.hold)
        readings = generate(spec, state, step.at, rng) if step.telemetry else []
        if step.event is not None:
            readings.append(Reading(step.at, "event", dict(step.event)))
        return self._encode(spec, state, readings, scenario)

    def _faulty(
        self, spec: DeviceSpec, state: DeviceState, rng: random.Random, step: Step, scenario: str
    ) -> Outgoing:
        assert step.bad_fields is not None
        if step.bad_channel == "telemetry":
            reading = generate(spec, state, step.at, rng)[-1]
        else:
            reading = Reading(step.at, "event", {})
        document = stamp(state, reading, self.stamp_time(step.at))
        document.update(step.bad_fields)
        return Outgoing(f"dev/{spec.id}/{step.bad_channel}", _json(document), step.bad_channel,
                        spec.id, spec.kind, scenario, bad=True, t=step.at)  # fmt: skip

    # Encoding ---------------------------------------------------------------------------

    def _encode(
        self,
        spec: DeviceSpec,
        state: DeviceState,
        readings: Iterable[Reading],
        scenario: str | None,
        *,
        as_array: bool = False,
    ) -> list[Outgoing]:
        if state.codec is not None:
            return self._encode_codec(spec, state, list(readings), scenario)
        ordered = list(readings)
        if as_array:
            # `seq` counts messages in the order they are sent: the buffer goes first.
            ordered.sort(key=lambda r: r.channel == "event")
        out: list[Outgoing] = []
        buffer: list[dict[str, Any]] = []
        buffer_t = self.now
        for reading in ordered:
            document = stamp(state, reading, self.stamp_time(reading.t))
            if reading.channel == "telemetry" and as_array:
                buffer.append(document)
                buffer_t = reading.t
                continue
            if buffer:
                out.append(Outgoing(f"dev/{spec.id}/telemetry", _json(buffer), "telemetry",
                                    spec.id, spec.kind, scenario, t=buffer_t))  # fmt: skip
                buffer = []
            out.append(Outgoing(f"dev/{spec.id}/{reading.channel}", _json(document),
                                reading.channel, spec.id, spec.kind, scenario,
                                t=reading.t))  # fmt: skip
        if buffer:
            out.append(Outgoing(f"dev/{spec.id}/telemetry", _json(buffer), "telemetry",
                                spec.id, spec.kind, scenario, t=buffer_t))  # fmt: skip
        return out

    def _encode_codec(
        self, spec: DeviceSpec, state: DeviceState, readings: list[Reading], scenario: str | None
    ) -> list[Outgoing]:
        """Vendor messages. Hikvision is event-based: events become AccessControllerEvents,
        telemetry a heartBeat. Zigbee2MQTT and ChirpStack carry state, not happenings: a
        report with telemetry is one message whose flags already show its events; events
        reported alone become one message of the last state with the event's flags."""
        codec = state.codec
        assert codec is not None
        rng = self._rngs[spec.id]
        topic = f"codec/{codec}/{spec.id}"
        out: list[Outgoing] = []

        def emit(document: dict[str, Any], t: float) -> None:
            out.append(Outgoing(topic, _json(document), "codec", spec.id, spec.kind, scenario,
                                t=t))  # fmt: skip

        if codec == codecs.HIKVISION:
            for reading in readings:
                native = stamp(state, reading, self.stamp_time(reading.t))
                ts_time = self.stamp_time(reading.t)
                if reading.channel == "event":
                    emit(codecs.hikvision_event(spec, native, ts_time, native["seq"], rng),
                         reading.t)  # fmt: skip
                else:
                    emit(codecs.hikvision_heartbeat(spec, ts_time), reading.t)
            return out

        telemetry = [r for r in readings if r.channel == "telemetry"]
        if telemetry:
            reports = telemetry
        elif readings:
            fields = dict(state.last_fields)
            for reading in readings:
                fields.update(_IMPLIED.get(str(reading.fields.get("event")), {}))
            reports = [Reading(readings[-1].t, "telemetry", fields)]
        else:
            reports = []
        for reading in reports:
            native = stamp(state, reading, self.stamp_time(reading.t))
            ts_time = self.stamp_time(reading.t)
            if codec == codecs.ZIGBEE2MQTT:
                emit(codecs.zigbee2mqtt_smoke(state, native, ts_time), reading.t)
            else:
                emit(codecs.chirpstack_uplink(spec, state, native, ts_time, native["seq"], rng),
                     reading.t)  # fmt: skip
        return out


def _channel_of(topic: str) -> OutChannel:
    parts = topic.split("/")
    if len(parts) == 3 and parts[0] == "dev" and parts[2] in ("telemetry", "event", "status"):
        return parts[2]  # type: ignore[return-value]
    if len(parts) == 3 and parts[0] == "codec":
        return "codec"
    return "other"
