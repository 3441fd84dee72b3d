"""Run a simulated fleet against an MQTT broker.

`run_fleet` drives a `Simulation` from the wall clock (simulated time runs `speedup`
times faster), publishes what it produces with aiomqtt, reconnects with exponential
backoff when the broker goes away (messages produced meanwhile wait in a bounded
backlog and are sent after reconnecting: at-least-once, and the platform deduplicates
on `seq`), and counts everything in `FleetStats`.

`ts` in payloads is the wall-clock time of the simulated moment by default
(`ts_clock="wall"`), so a sped-up run never writes timestamps in the future; with
`ts_clock="sim"` it is the simulated time itself (runs ahead of the clock at speedup > 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
import uuid
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

import aiomqtt

from device_sim.engine import (
    DEFAULT_BUFFER_SHARE,
    DEFAULT_SCENARIO_DELAY_S,
    Outgoing,
    SimOptions,
    Simulation,
)
from device_sim.scenarios import make_scenarios
from device_sim.spec import (
    DEFAULT_INTERVAL_S,
    DeviceFileError,
    DeviceKind,
    DeviceSpec,
    load_devices,
    load_devices_from_csv,
)
from gridwarden.mqtt_url import MqttEndpoint as MqttTarget
from gridwarden.mqtt_url import parse_mqtt_url

__all__ = [
    "DeviceFileError",
    "DeviceSpec",
    "FleetStats",
    "MqttTarget",
    "load_devices",
    "load_devices_from_csv",
    "parse_mqtt_url",
    "run_fleet",
    "synthetic_fleet",
]

log = logging.getLogger("device_sim")

PUBLISH_BATCH: Final = 200  # publishes in flight at once
PUBLISH_TIMEOUT_S: Final = 5.0  # per publish (PUBACK for QoS 1/2)
BACKLOG_MAX: Final = 100_000  # messages kept while the broker is away; oldest dropped
BACKOFF_INITIAL_S: Final = 0.25
BACKOFF_MAX_S: Final = 15.0
DRAIN_TIMEOUT_S: Final = 5.0  # after the run ends, how long to keep trying to deliver
IDLE_TICK_S: Final = 0.25  # the producer wakes at least this often


@dataclass
class FleetStats:
    """What a run published. Updated live: a caller may pass its own and watch it."""

    published: int = 0
    bytes: int = 0
    bad: int = 0  # deliberately bad messages (faulty / hostile) among `published`
    by_kind: Counter[str] = field(default_factory=Counter)  # "unknown": no such device
    by_channel: Counter[str] = field(default_factory=Counter)  # telemetry/event/status/codec
    by_scenario: Counter[str] = field(default_factory=Counter)
    failed: int = 0  # publish attempts that failed (the message was queued again)
    dropped: int = 0  # never delivered (backlog overflow, or undelivered at the end)
    reconnects: int = 0
    connected: bool = False
    backlog: int = 0
    last_error: str | None = None
    started_at: float = 0.0  # wall clock
    sim_time: float = 0.0  # current simulated time (Unix seconds)
    devices: int = 0

    def count(self, message: Outgoing) -> None:
        self.published += 1
        self.bytes += len(message.payload)
        self.by_kind[message.kind or "unknown"] += 1
        self.by_channel[message.channel] += 1
        if message.scenario is not None:
            self.by_scenario[message.scenario] += 1
        if message.bad:
            self.bad += 1


def synthetic_fleet(
    count: int = 100, *, seed: int = 1, lat: float = 29.075, lon: float = 119.655
) -> list[DeviceSpec]:
    """A made-up fleet around a point (for runs without a devices file): half smoke
    detectors in buildings of 2–6, the rest doors, manhole covers and bins."""
    if count < 0:
        raise ValueError("count must not be negative")
    rng = random.Random(f"{seed}/synthetic")
    shares: list[tuple[DeviceKind, float]] = [
        ("smoke_detector", 0.5), ("door_access", 0.2), ("manhole_cover", 0.15),
        ("smart_bin", 0.15),
    ]  # fmt: skip
    counts = {kind: math.floor(count * share) for kind, share in shares}
    counts["smoke_detector"] += count - sum(counts.values())
    specs: list[DeviceSpec] = []

    def spot(spread: float = 0.01) -> tuple[float, float]:
        return (round(lat + rng.uniform(-spread, spread), 6),
                round(lon + rng.uniform(-spread, spread), 6))  # fmt: skip

    building_no, in_building, b_lat, b_lon = 0, 0, lat, lon
    for number in range(1, counts["smoke_detector"] + 1):
        if in_building == 0:
            building_no += 1
            in_building = rng.randint(2, 6)
            b_lat, b_lon = spot()
        in_building -= 1
        specs.append(DeviceSpec(
            f"sim-smoke-{number:04d}", "smoke_detector", b_lat, b_lon,
            building=f"B{building_no:03d}", floor=rng.randint(1, 18),
            interval_s=DEFAULT_INTERVAL_S["smoke_detector"],
        ))  # fmt: skip
    for number in range(1, counts["door_access"] + 1):
        d_lat, d_lon = spot()
        specs.append(DeviceSpec(f"sim-door-{number:04d}", "door_access", d_lat, d_lon,
                                building=f"B{rng.randint(1, max(building_no, 1)):03d}", floor=1,
                                interval_s=DEFAULT_INTERVAL_S["door_access"]))  # fmt: skip
    for number in range(1, counts["manhole_cover"] + 1):
        m_lat, m_lon = spot()
        specs.append(DeviceSpec(f"sim-manhole-{number:04d}", "manhole_cover", m_lat, m_lon,
                                interval_s=DEFAULT_INTERVAL_S["manhole_cover"],
                                height_cm=float(rng.randrange(150, 310, 10))))  # fmt: skip
    for number in range(1, counts["smart_bin"] + 1):
        s_lat, s_lon = spot()
        specs.append(DeviceSpec(f"sim-bin-{number:04d}", "smart_bin", s_lat, s_lon,
                                interval_s=DEFAULT_INTERVAL_S["smart_bin"],
                                height_cm=float(rng.randrange(100, 135, 5))))  # fmt: skip
    return specs


def _client(target: MqttTarget, identifier: str) -> aiomqtt.Client:
    tls_context = target.ssl_context()
    client = aiomqtt.Client(
        target.host,
        target.port,
        username=target.username,
        password=target.password,
        identifier=identifier,
        tls_context=tls_context,
        tls_insecure=target.tls_insecure if target.tls else None,
        timeout=PUBLISH_TIMEOUT_S,
        max_inflight_messages=PUBLISH_BATCH,
    )
    client.pending_calls_threshold = PUBLISH_BATCH + 10  # batches are this big on purpose
    return client


def _forget_disconnect_error(client: aiomqtt.Client) -> None:
    """aiomqtt leaves the 'unexpected disconnection' future unretrieved when the
    connection drops; retrieve it so asyncio does not log it as never retrieved."""
    future = getattr(client, "_disconnected", None)
    if isinstance(future, asyncio.Future) and future.done() and not future.cancelled():
        future.exception()


async def _sleep_unless(event: asyncio.Event, seconds: float) -> None:
    if seconds <= 0:
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


async def run_fleet(
    mqtt_url: str,
    devices: Sequence[DeviceSpec],
    *,
    prefix: str = "gw",
    speedup: float = 1.0,
    duration_s: float | None = None,
    scenarios: Sequence[str] = (),
    qos: int = 1,
    seed: int = 1,
    status: bool = True,
    stop: asyncio.Event | None = None,
    codec_share: float = 0.0,
    buffer_share: float = DEFAULT_BUFFER_SHARE,
    scenario_delay_s: float = DEFAULT_SCENARIO_DELAY_S,
    scenario_every_s: float | None = None,
    ts_clock: Literal["wall", "sim"] = "wall",
    stats: FleetStats | None = None,
) -> FleetStats:
    """Publish the fleet's readings until `duration_s` (real seconds) passes or `stop`
    is set; then deliver what is pending (up to DRAIN_TIMEOUT_S), publish `offline`
    statuses if `status`, and disconnect. Bad arguments raise ValueError before any I/O.
    """
    target = parse_mqtt_url(mqtt_url)
    if not (math.isfinite(speedup) and speedup > 0):
        raise ValueError(f"speedup must be > 0, got {speedup}")
    if qos not in (0, 1, 2):
        raise ValueError(f"qos must be 0, 1 or 2, got {qos}")
    if duration_s is not None and duration_s < 0:
        raise ValueError(f"duration_s must not be negative, got {duration_s}")
    if not prefix or any(c in prefix for c in "+#"):
        raise ValueError(f"bad topic prefix {prefix!r}")
    if ts_clock not in ("wall", "sim"):
        raise ValueError(f"ts_clock must be 'wall' or 'sim', got {ts_clock!r}")
    options = SimOptions(codec_share=codec_share, buffer_share=buffer_share,
                         scenario_delay_s=scenario_delay_s,
                         scenario_every_s=scenario_every_s)  # fmt: skip
    scenario_objects = make_scenarios(scenarios)

    stop = stop if stop is not None else asyncio.Event()
    stats = stats if stats is not None else FleetStats()
    loop = asyncio.get_running_loop()
    wall0, mono0 = time.time(), loop.time()
    stats.started_at, stats.sim_time, stats.devices = wall0, wall0, len(devices)

    def sim_now() -> float:
        return wall0 + (loop.time() - mono0) * speedup

    def wall_of(t: float) -> float:
        return wall0 + (t - wall0) / speedup

    sim = Simulation(devices, seed=seed, start=wall0, options=options,
                     scenarios=scenario_objects,
                     stamp_time=wall_of if ts_clock == "wall" else None)  # fmt: skip
    backlog: deque[Outgoing] = deque()
    wake = asyncio.Event()
    produced_all = asyncio.Event()

    def enqueue(messages: Sequence[Outgoing]) -> None:
        backlog.extend(messages)
        overflow = len(backlog) - BACKLOG_MAX
        for _ in range(max(0, overflow)):
            backlog.popleft()
            stats.dropped += 1
        stats.backlog = len(backlog)
        if messages:
            wake.set()

    async def produce() -> None:
        end = None if duration_s is None else mono0 + duration_s
        try:
            while not stop.is_set():
                now = loop.time()
                if end is not None and now >= end:
                    enqueue(sim.advance(wall0 + (end - mono0) * speedup))
                    break
                enqueue(sim.advance(sim_now()))
                stats.sim_time = sim.now
                due = sim.next_due()
                delay = IDLE_TICK_S if due is None else (due - sim_now()) / speedup
                delay = min(max(delay, 0.001), IDLE_TICK_S)
                if end is not None:
                    delay = min(delay, max(end - loop.time(), 0.0))
                await _sleep_unless(stop, delay)
        finally:
            produced_all.set()
            wake.set()

    async def publish_batch(client: aiomqtt.Client) -> None:
        batch = [backlog.popleft() for _ in range(min(PUBLISH_BATCH, len(backlog)))]
        results = await asyncio.gather(
            *(client.publish(f"{prefix}/{m.topic}", m.payload, qos=qos, retain=m.retain)
              for m in batch),
            return_exceptions=True,
        )  # fmt: skip
        failed: list[Outgoing] = []
        error: BaseException | None = None
        for message, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                failed.append(message)
                error = error or result
            else:
                stats.count(message)
        if failed:
            stats.failed += len(failed)
            backlog.extendleft(reversed(failed))
        stats.backlog = len(backlog)
        if error is not None:
            raise error  # an MqttError makes `publish` reconnect; anything else surfaces

    async def publish() -> None:
        backoff = BACKOFF_INITIAL_S
        drain_deadline: float | None = None
        identifier = target.client_id or f"gridwarden-sim-{seed}-{uuid.uuid4().hex[:8]}"
        while True:
            if produced_all.is_set() and drain_deadline is None:
                drain_deadline = loop.time() + DRAIN_TIMEOUT_S
            client = _client(target, identifier)
            try:
                async with client:
                    stats.connected, backoff = True, BACKOFF_INITIAL_S
                    if status:  # also after a reconnect: the broker may have lost them
                        backlog.extendleft(reversed(sim.status_messages("online")))
                    while True:
                        while backlog:
                            await publish_batch(client)
                        if produced_all.is_set():
                            if status:
                                enqueue(sim.status_messages("offline"))
                                while backlog:
                                    await publish_batch(client)
                            stats.connected = False
                            return
                        wake.clear()
                        if not backlog and not produced_all.is_set():
                            await wake.wait()
            except aiomqtt.MqttError as exc:
                _forget_disconnect_error(client)
                stats.connected = False
                stats.last_error = str(exc)
                if produced_all.is_set():
                    if drain_deadline is None:
                        drain_deadline = loop.time() + DRAIN_TIMEOUT_S
                    if loop.time() >= drain_deadline:
                        stats.dropped += len(backlog)
                        backlog.clear()
                        stats.backlog = 0
                        log.warning("giving up on the broker: %s", exc)
                        return
                stats.reconnects += 1
                log.warning("MQTT %s:%d: %s; retrying in %.1f s",
                            target.host, target.port, exc, backoff)  # fmt: skip
                pause = backoff * random.uniform(0.8, 1.2)
                if drain_deadline is not None:
                    pause = min(pause, max(drain_deadline - loop.time(), 0.0))
                await asyncio.sleep(pause)
                backoff = min(backoff * 2, BACKOFF_MAX_S)

    async with asyncio.TaskGroup() as group:
        group.create_task(produce(), name="device_sim.produce")
        group.create_task(publish(), name="device_sim.publish")
    return stats
