"""`gridwarden bench`: every figure of the performance issue, measured in one run.

Everything runs on this machine against a private PostgreSQL and Mosquitto started for the
run under a fresh temporary data dir (removed afterwards); the service is `gridwarden up`
as a subprocess, so its peak RSS and CPU time are its own. The load comes from
`device_sim.load` (separate processes writing pre-built MQTT packets; ~60-80k msg/s into
this broker on a 2-core machine, where paho-mqtt publishers managed ~9k).

Phases (each at most `duration` seconds of measuring):

1. **Backlog.** Five persistent MQTT v5 QoS-1 sessions are subscribed to `gw/dev/+/+` and
   `gw/codec/+/+`: four bare consumers (our own receiver, gmqtt, paho-mqtt, aiomqtt) and
   the service's `gridwarden-ingest`. Then one stream of `backlog` telemetry messages is
   published once at QoS 1, so the broker holds the same stream for each of them. In this
   and every other load, 1 % of the readings trigger an alarm, always on the same 375
   devices (the alarm pool of the first 1,000): spread over the whole fleet, each would
   be a new incident opening a case, a storm of thousands of cases (40 a second at half
   rate) that the case intake works through ahead of the probes' cases.
2. **Baselines.** Each bare consumer drains its own queue, orjson-parsing every message
   and acknowledging it at QoS 1, fastest first (see the broker, below). Rate = messages
   after the first delivery / (last - first receipt), stopping at `duration` seconds.
3. **Ingest.** `gridwarden up` starts and drains its queue through validation, the rules,
   alarms/cases and commit; the rate is `gridwarden_ingest_stored_total{table="telemetry"}`
   (rows committed) from /metrics over a steady window (after a warm-up) of at most
   `duration` seconds. The service is then stopped and the rest of its queue discarded.
   `ingest_cpu_cores`: the cores used over the same window by the service, PostgreSQL
   (postmaster and backends), the broker, everything else (the bench, the machine's own
   services), and idle (`gridwarden.cpu_usage`; they add up to the machine's cores).
4. **Latency at half rate.** The service restarts and is left to go quiet (its CPU under
   15 % of a core: the last phase's cases opened and notified). The load publishes at
   half the ingest rate (`--qos`) while the bench sends 20 alarm probes a second, each
   from a smoke detector that has no open alarm (so each opens a case), noting the
   publish time:
   alternately an alarm *event* `{"event": "alarm"}` on `gw/dev/{id}/event` (what a
   detector sends when it goes into alarm; rule `smoke.alarm`; the service's priority
   lane, session `gridwarden-ingest-events`) and, on other detectors, telemetry with
   `alarm: true` (the bulk lane, behind the load; written ahead of its batch once decoded):
   `alarm_latency_ms_*` and `case_notify_latency_ms_*` are the events', `*_telemetry_*`
   the readings'.
   *Alarm latency* = publish → the alarm row is visible to a poller (every 10 ms) in
   `alarms`: an upper bound on publish → commit by at most the poll period.
   *Case notification latency* = publish → the `dispatched` message for that device
   received on `gw/workers/+/cases` (through the outbox).
5. **Saturated.** After the service goes quiet again, event probes again, with the load
   publishing as fast as it can.

Peak RSS is VmHWM of the service processes (the largest of the starts).

`--scaling` adds, after these: (6) the service's CPU time per committed message
(utime + stime from /proc/<pid>/stat over a window ÷ telemetry rows committed in it) with
the load at 25 %, 50 % and 100 % of the measured ingest rate, each window after the
service went quiet; (7) in a second database, ingest rate and peak RSS with 1,000 /
10,000 / 100,000 / 1,000,000 registered devices, the same backlog each time, spread over
all registered devices (each step registers more with COPY).

What the baselines measure, and why aiomqtt was at ~2,000 msg/s
-------------------------------------------------------------
Measured on the bench machine (2 shared cores, Mosquitto 2.0.11, paho-mqtt 2.2, aiomqtt
2.5.1, gmqtt 0.8), every consumer MQTT v5 on a persistent session, draining 40-400k
queued messages; each still orjson-parses every message and acknowledges it at QoS 1.

* **aiomqtt** is paho underneath: aiomqtt registers paho's socket with the event loop and
  each readable event calls `loop_read()`, which reads ONE packet (paho sizes that loop by
  its in-flight outgoing and QoS-2 messages: none for a QoS-1 consumer) with four
  `recv()` calls. paho acknowledges the QoS-1 message right there, before the application
  has seen it, and aiomqtt puts it in an unbounded `asyncio.Queue`. The application side,
  `async for m in client.messages` (aiomqtt's only way to consume), creates a Task for
  `queue.get()` and `asyncio.wait`s it together with the disconnect future: about three
  event-loop turns per message against the reader's one. So under a backlog the reader
  pulls the broker's queue into the process at about 3x the consumed rate, acking as it
  goes (the queue held 2x what had been consumed at every point we sampled); Receive
  Maximum and Mosquitto's `max_inflight_messages` (1000 in the embedded config) never
  throttle it, since everything read is already acked, and the process spends about two
  thirds of its CPU reading messages it will consume much later. Each queued v5 message
  carries a paho `Properties` object (~15 µs to build), and the cyclic GC keeps walking
  the growing queue (with the GC disabled: ~3,100 instead of ~2,100 msg/s). Result:
  ~5,500 msg/s on a 60k backlog (the reader finishes early, then the consumer runs
  alone), ~2,100 on 200k or more, CPU-bound throughout; ~460 µs of CPU per consumed
  message. The only bound aiomqtt offers, `max_queued_incoming_messages`, *drops*
  messages it has already acked; `max_inflight_messages` is for outgoing messages, and
  `queue_type` or Receive Maximum do not change the per-message cost. With MQTT 3.1.1
  (no Properties) the same loop reaches ~11,000 msg/s on a 60k backlog, the issue's
  figure; but the service needs v5 (Session Expiry, Receive Maximum) and every other
  consumer here speaks v5, so v5 it is. `baseline_aiomqtt_read_ahead_max` is the
  largest read-ahead seen (messages acked by aiomqtt but not yet consumed).
* **paho-mqtt** with `loop_start()` (~11,500 msg/s, the previous figure) pays per message
  a `select()` in its thread, one packet per `loop_read()`, and for each manual `ack()` a
  wake-up byte sent over its loopback-TCP socket pair and read back on the next turn.
  Driven through its documented external-loop API instead (`socket()`, `loop_read()` until
  a call yields no message, `loop_write()` once per burst, `loop_misc()`), no thread and no
  socket pair: ~18,000-21,000 msg/s, manual ack after parsing.
* **gmqtt** is a pure asyncio protocol that parses every packet of a socket read in one
  pass and calls a plain function per message. With `optimistic_acknowledgement` (its
  default) the PUBACK is queued in that same call just before the handler runs (as early
  as aiomqtt's): ~50,000-70,000 msg/s. Acknowledging after the handler needs a coroutine
  handler, a Task per message: ~38,000.
* **Our receiver** (`ingest.mqtt_source.MqttSource` used bare: take batches of 2000,
  parse, ack the batch in one write) with the service's Receive Maximum of 8000.
* **The broker.** Mosquitto 2.0 writes its whole persistence file at every save, serving
  no client meanwhile. Five sessions holding a 400k backlog make a 115-135 MB file that
  takes about a second to save; with Mosquitto's `autosave_interval 1` the saves ran back to
  back, and under the saturated load an alarm event waited for them in the broker (publish
  → received p99 1.0-1.2 s, against 65-120 ms with saves 30 s apart). The embedded broker's
  saves are now paced by their cost (`gridwarden.broker_autosave`: every second while cheap,
  at most 2 % of the broker's time, at least every 60 s); `broker_saves` and
  `broker_save_ms_max` (and `_saturated`) report them in each latency phase: an alarm
  published during a long save waits for it. `broker_persistence_mb_max` is the largest
  file size seen before a baseline (`broker_persistence_mb_saturated`: after the saturated
  load, whose surplus queues up for the service's bulk session). It shrinks only a little
  as drained sessions are deleted (the messages stay stored for the service's session), so
  the order of the baselines hardly matters; the fastest go first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlparse

import aiomqtt
import asyncpg
import gmqtt  # type: ignore[import-untyped]
import httpx
import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from rich.console import Console
from rich.table import Table

from device_sim.load import (
    alarm_event_payload,
    alarm_payload,
    alarm_pool,
    device_id,
    kind_of,
    probe_pool,
)
from gridwarden import cpu_usage
from gridwarden.cpu_usage import CpuSample
from ingest.mqtt_source import MqttSource

if TYPE_CHECKING:
    from gridwarden.embedded import EmbeddedMosquitto, EmbeddedPostgres

PREFIX: Final = "gw"
TOPICS: Final = (f"{PREFIX}/dev/+/+", f"{PREFIX}/codec/+/+")
SERVICE_CLIENT_ID: Final = "gridwarden-ingest"
SERVICE_EVENTS_CLIENT_ID: Final = "gridwarden-ingest-events"
RECEIVER_CLIENT_ID: Final = "bench-gridwarden-receiver"
GMQTT_CLIENT_ID: Final = "bench-gmqtt"
PAHO_CLIENT_ID: Final = "bench-paho"
AIOMQTT_CLIENT_ID: Final = "bench-aiomqtt"
SESSION_EXPIRY_S: Final = 7 * 24 * 3600
BARE_RECEIVE_MAXIMUM: Final = 65535  # the window never throttles a bare consumer
RECEIVER_RECEIVE_MAXIMUM: Final = 8000  # as the service's bulk lane: 4 batches of 2000
RECEIVER_BATCH: Final = 2000
RECEIVER_MAX_DELAY_S: Final = 0.05
PAHO_READS_PER_WAKEUP: Final = 512
ALARM_SHARE: Final = 0.01
BACKLOG_RATE_GUESS: Final = 20_000  # msgs/s: backlog = duration × this (capped)
BACKLOG_MIN: Final = 5_000
BACKLOG_MAX: Final = 600_000
WARMUP_S: Final = 2.0
PROBE_RATE: Final = 20.0  # alarm probes per second, all kinds together
POLL_S: Final = 0.01
LOOP_LAG_BUCKET: Final = "gridwarden_event_loop_lag_seconds_bucket"  # gridwarden/loop_lag.py
GRID_SIDE: Final = 4  # 4 × 4 grids, 2 × 2 grids per community
ORIGIN: Final = (120.000, 30.000)
GRID_DEG: Final = 0.01
READY_TIMEOUT_S: Final = 300.0
IDLE_STOP_S: Final = 5.0
FIRST_MESSAGE_TIMEOUT_S: Final = 60.0
STOP_TIMEOUT_S: Final = 15.0  # then SIGKILL (after the ingest phase its queue is discarded)
SCALING_DEVICES: Final = (1_000, 10_000, 100_000, 1_000_000)
# Every load sends its alarm-triggering readings to the alarm pool of the first 1,000
# devices (375 of them): the same alarm and case work at every fleet size, and no storm of
# thousands of new incidents (each would open a case) ahead of the probes' cases.
ALARM_FLEET: Final = 1_000
QUIET_CPU_SHARE: Final = 0.15  # the service counts as idle below this share of a core
QUIET_LIMIT_S: Final = 90.0
QUIET_SAMPLE_S: Final = 0.5
SCALING_LOAD_SHARES: Final = (0.25, 0.5, 1.0)
SCALING_DATABASE: Final = "bench_scaling"
DEVICE_CHUNK: Final = 200_000

KEYS: Final = (
    "baseline_aiomqtt_msgs_per_s", "baseline_fastest_msgs_per_s", "ingest_msgs_per_s",
    "alarm_latency_ms_p50", "alarm_latency_ms_p99", "alarm_latency_ms_p99_saturated",
    "case_notify_latency_ms_p99", "peak_rss_mb", "devices", "duration_s",
)  # fmt: skip
BASELINE_KEYS: Final = {
    "gridwarden-receiver": "baseline_gridwarden_receiver_msgs_per_s",
    "gmqtt": "baseline_gmqtt_msgs_per_s",
    "paho-mqtt": "baseline_paho_msgs_per_s",
    "aiomqtt": "baseline_aiomqtt_msgs_per_s",
}


@dataclass
class BenchConfig:
    devices: int = 100_000
    duration: float = 20.0
    qos: int = 1
    load_processes: int = 0  # 0: device_sim.load's default (one per CPU at full speed)
    scaling: bool = False
    scaling_devices: tuple[int, ...] = SCALING_DEVICES
    processes: tuple[int, ...] = ()  # ingest throughput with this many processes (shards)


class Progress:
    """One line per step on stderr (rich), so `--json` keeps stdout clean."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.t0 = time.monotonic()

    def __call__(self, message: str) -> None:
        self.console.log(f"[{time.monotonic() - self.t0:6.1f}s] {message}")


# --------------------------------------------------------------------------- the city
def _bbox(lon0: float, lat0: float, lon1: float, lat1: float) -> str:
    ring = [[lon0, lat0], [lon1, lat0], [lon1, lat1], [lon0, lat1], [lon0, lat0]]
    return json.dumps({"type": "Polygon", "coordinates": [ring]})


def _grids() -> tuple[list[tuple[str, str, str, str | None, float, float, float, float]],
                      list[tuple[str, float, float]]]:  # fmt: skip
    lon0, lat0 = ORIGIN
    side = GRID_SIDE * GRID_DEG
    cells: list[tuple[str, str, str, str | None, float, float, float, float]] = [
        ("bs", "基准街道", "street", None, lon0, lat0, lon0 + side, lat0 + side)
    ]
    grids: list[tuple[str, float, float]] = []
    for cy in range(2):
        for cx in range(2):
            cid = f"bs-c{cy}{cx}"
            c_lon, c_lat = lon0 + cx * 2 * GRID_DEG, lat0 + cy * 2 * GRID_DEG
            cells.append((cid, f"社区{cy}{cx}", "community", "bs",
                          c_lon, c_lat, c_lon + 2 * GRID_DEG, c_lat + 2 * GRID_DEG))  # fmt: skip
            for gy in range(2):
                for gx in range(2):
                    gid = f"{cid}-g{gy}{gx}"
                    g_lon, g_lat = c_lon + gx * GRID_DEG, c_lat + gy * GRID_DEG
                    cells.append((gid, f"网格{cy}{cx}{gy}{gx}", "grid", cid,
                                  g_lon, g_lat, g_lon + GRID_DEG, g_lat + GRID_DEG))  # fmt: skip
                    grids.append((gid, g_lon, g_lat))
    return cells, grids


async def seed(conn: asyncpg.Connection, devices: int) -> int:
    """One street, 4 communities, 16 grids (bounding boxes), a grid worker per grid and a
    leader per community; `devices` devices spread over the grids (COPY). Returns workers."""
    cells, grids = _grids()
    async with conn.transaction():
        await conn.executemany(
            "INSERT INTO cells (id, name, level, parent_id, geometry, min_lon, min_lat, "
            "max_lon, max_lat) VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9)",
            [(c[0], c[1], c[2], c[3], _bbox(*c[4:]), *c[4:]) for c in cells],
        )
        await add_devices(conn, 0, devices)
        workers = [(f"bw-{gid}", f"网格员{n}", "grid_worker", gid) for n, (gid, _, _) in
                   enumerate(grids)]  # fmt: skip
        workers += [(f"bl-{c[0]}", f"网格长{c[0]}", "grid_leader", c[0]) for c in cells
                    if c[2] == "community"]  # fmt: skip
        await conn.executemany(
            "INSERT INTO workers (id, name, role, on_duty) VALUES ($1, $2, $3, true)",
            [w[:3] for w in workers],
        )
        await conn.executemany(
            "INSERT INTO worker_cells (worker_id, cell_id) VALUES ($1, $2)",
            [(w[0], w[3]) for w in workers],
        )
    return len(workers)


async def add_devices(conn: asyncpg.Connection, start: int, end: int) -> None:
    """Register devices `start`..`end - 1` (COPY, in chunks), spread over the 16 grids."""
    for lo in range(start, end, DEVICE_CHUNK):
        await conn.copy_records_to_table(
            "devices", records=_device_records(lo, min(end, lo + DEVICE_CHUNK)),
            columns=["id", "kind", "lat", "lon", "cell_id", "interval_s"],
        )  # fmt: skip


def _device_records(lo: int, hi: int) -> list[tuple[str, str, float, float, str, int]]:
    _, grids = _grids()
    rng = random.Random(6 + lo)
    records = []
    for i in range(lo, hi):
        gid, g_lon, g_lat = grids[i % len(grids)]
        lon = g_lon + GRID_DEG * (0.05 + 0.9 * rng.random())
        lat = g_lat + GRID_DEG * (0.05 + 0.9 * rng.random())
        # No building: every probe alarm is its own incident (no building-level join).
        records.append((device_id(i), kind_of(i), lat, lon, gid, 3600))
    return records


# --------------------------------------------------------------------------- MQTT helpers
def _host_port(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    return parsed.hostname or "127.0.0.1", parsed.port or 1883


def _connect_props(receive_maximum: int | None = None) -> Properties:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = SESSION_EXPIRY_S
    if receive_maximum:
        props.ReceiveMaximum = receive_maximum
    return props


def _paho_v5(client_id: str, **kwargs: Any) -> paho.Client:
    return paho.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5, **kwargs
    )


def prepare_session(
    mqtt_url: str, client_id: str, *, subscribe: bool, topics: tuple[str, ...] = TOPICS
) -> None:
    """`subscribe`: create a persistent session subscribed to `topics` (QoS 1);
    otherwise delete the client's session and everything queued for it."""
    host, port = _host_port(mqtt_url)
    client = _paho_v5(client_id)
    done = threading.Event()
    client.on_connect = lambda *_: done.set()
    client.on_subscribe = lambda *_: done.set()
    props = _connect_props()
    if not subscribe:
        props.SessionExpiryInterval = 0
    client.connect(host, port, clean_start=not subscribe, properties=props)
    client.loop_start()
    try:
        if not done.wait(10):
            raise RuntimeError(f"cannot connect to {mqtt_url} as {client_id}")
        if subscribe:
            done.clear()
            client.subscribe([(topic, 1) for topic in topics])
            if not done.wait(10):
                raise RuntimeError("no SUBACK")
    finally:
        client.disconnect()
        client.loop_stop()


def drop_service_sessions(mqtt_url: str, shards: int = 1) -> None:
    """Delete the service's sessions (both lanes of every shard) and what is queued."""
    suffixes = [""] if shards == 1 else [f"-s{i}" for i in range(shards)]
    for suffix in suffixes:
        for client_id in (f"{SERVICE_CLIENT_ID}{suffix}", f"{SERVICE_CLIENT_ID}{suffix}-events"):
            prepare_session(mqtt_url, client_id, subscribe=False)


@dataclass
class DrainResult:
    received: int = 0
    first: float = 0.0  # when the first delivery (a message, or a batch) was handled
    last: float = 0.0
    first_count: int = 1  # messages in that first delivery: not part of the rate
    read_ahead_max: int = 0  # aiomqtt: messages acked by the library, not yet consumed

    @property
    def rate(self) -> float:
        counted = self.received - self.first_count
        if counted < 1 or self.last <= self.first:
            return 0.0
        return counted / (self.last - self.first)

    def note(self, count: int, expected: int, cap_s: float) -> bool:
        """Count a delivery of `count` messages; True when the drain should stop."""
        now = time.monotonic()
        if not self.received:
            self.first = now
            self.first_count = count
        self.received += count
        self.last = now
        return self.received >= expected or now - self.first >= cap_s

    def idle(self, started: float) -> bool:
        now = time.monotonic()
        if self.received:
            return now - self.last > IDLE_STOP_S
        return now - started > FIRST_MESSAGE_TIMEOUT_S


async def _drain_until_idle(
    consume: Coroutine[Any, Any, None],
    result: DrainResult,
    *helpers: Coroutine[Any, Any, None],
) -> None:
    """Run `consume` until it returns or no message came for IDLE_STOP_S (a watchdog
    every 0.25 s instead of a timeout rescheduled per message)."""
    task = asyncio.create_task(consume)
    others = [asyncio.create_task(h) for h in helpers]
    started = time.monotonic()
    try:
        while not task.done():
            await asyncio.wait([task], timeout=0.25)
            if not task.done() and result.idle(started):
                break
    finally:
        for t in (task, *others):
            t.cancel()
        for t in (task, *others):
            with contextlib.suppress(asyncio.CancelledError):
                await t


async def drain_aiomqtt(mqtt_url: str, expected: int, cap_s: float) -> DrainResult:
    """aiomqtt's one way to consume: `async for message in client.messages`."""
    host, port = _host_port(mqtt_url)
    result = DrainResult()
    async with aiomqtt.Client(
        host, port, identifier=AIOMQTT_CLIENT_ID, protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False, properties=_connect_props(BARE_RECEIVE_MAXIMUM),
    ) as client:  # fmt: skip

        async def consume() -> None:
            async for message in client.messages:
                orjson.loads(message.payload)
                if result.note(1, expected, cap_s):
                    return

        async def sample_read_ahead() -> None:
            while True:
                result.read_ahead_max = max(result.read_ahead_max, len(client.messages))
                await asyncio.sleep(0.1)

        await _drain_until_idle(consume(), result, sample_read_ahead())
    return result


def drain_paho(mqtt_url: str, expected: int, cap_s: float) -> DrainResult:
    """paho-mqtt through its external-loop API, manual ack after parsing (see above)."""
    host, port = _host_port(mqtt_url)
    result = DrainResult()
    stop = False
    client = _paho_v5(PAHO_CLIENT_ID, manual_ack=True)

    def on_message(c: paho.Client, _u: object, message: paho.MQTTMessage) -> None:
        nonlocal stop
        orjson.loads(message.payload)
        c.ack(message.mid, message.qos)
        if result.note(1, expected, cap_s):
            stop = True

    client.on_message = on_message
    client.connect(host, port, clean_start=False, properties=_connect_props(BARE_RECEIVE_MAXIMUM))
    sock = client.socket()
    if sock is None:
        raise RuntimeError(f"paho-mqtt: no socket to {mqtt_url}")
    fd = sock.fileno()
    started = time.monotonic()
    try:
        while not stop and not result.idle(started):
            wants = [fd] if client.want_write() else []
            readable, _, _ = select.select([fd], wants, [], 0.25)
            if readable:
                for _ in range(PAHO_READS_PER_WAKEUP):
                    before = result.received
                    rc = client.loop_read()
                    if rc != paho.MQTT_ERR_SUCCESS:
                        raise RuntimeError(f"paho-mqtt: {paho.error_string(rc)}")
                    if stop or result.received == before:
                        break
            if client.want_write():
                client.loop_write()
            client.loop_misc()
    finally:
        client.disconnect()
        with contextlib.suppress(Exception):
            client.loop_write()
    return result


async def drain_gmqtt(mqtt_url: str, expected: int, cap_s: float) -> DrainResult:
    """gmqtt with its default optimistic acknowledgement and a plain handler."""
    host, port = _host_port(mqtt_url)
    result = DrainResult()
    done = asyncio.Event()
    client = gmqtt.Client(
        GMQTT_CLIENT_ID, clean_session=False, optimistic_acknowledgement=True,
        session_expiry_interval=SESSION_EXPIRY_S, receive_maximum=BARE_RECEIVE_MAXIMUM,
    )  # fmt: skip

    def on_message(_c: object, _topic: str, payload: bytes, _qos: int, _p: object) -> int:
        orjson.loads(payload)
        if result.note(1, expected, cap_s):
            done.set()
        return 0

    client.on_message = on_message
    await client.connect(host, port)
    try:
        await _drain_until_idle(done.wait(), result)  # type: ignore[arg-type]
    finally:
        await client.disconnect()
    return result


async def drain_receiver(mqtt_url: str, expected: int, cap_s: float) -> DrainResult:
    """Our own receiver used bare: take a batch, parse each message, ack the batch."""
    result = DrainResult()
    source = MqttSource(mqtt_url, RECEIVER_CLIENT_ID, list(TOPICS), RECEIVER_RECEIVE_MAXIMUM)
    source.start()

    async def consume() -> None:
        while True:
            batch = await source.take(RECEIVER_BATCH, RECEIVER_MAX_DELAY_S)
            for message in batch:
                orjson.loads(message.payload)
            source.ack(batch)
            if result.note(len(batch), expected, cap_s):
                return

    try:
        await _drain_until_idle(consume(), result)
    finally:
        source.stop()
        await asyncio.sleep(0.5)  # its graceful close: DISCONNECT, the broker closes
    return result


Drain = Callable[[str, int, float], DrainResult]


def _baselines() -> list[tuple[str, str, Drain]]:
    """(name, client id, drain) fastest first."""
    return [
        ("gridwarden-receiver", RECEIVER_CLIENT_ID,
         lambda u, n, c: asyncio.run(drain_receiver(u, n, c))),
        ("gmqtt", GMQTT_CLIENT_ID, lambda u, n, c: asyncio.run(drain_gmqtt(u, n, c))),
        ("paho-mqtt", PAHO_CLIENT_ID, drain_paho),
        ("aiomqtt", AIOMQTT_CLIENT_ID, lambda u, n, c: asyncio.run(drain_aiomqtt(u, n, c))),
    ]  # fmt: skip


def run_load_process(
    mqtt_url: str, devices: int, *, processes: int = 0, count: int = 0, duration: float = 0.0,
    rate: float = 0.0, qos: int = 1, seq_base: int = 0, alarm_share: float = ALARM_SHARE,
    alarm_fleet: int = ALARM_FLEET,
) -> subprocess.Popen[bytes]:  # fmt: skip
    argv = [
        sys.executable, "-m", "device_sim.load", "--mqtt-url", mqtt_url, "--prefix", PREFIX,
        "--devices", str(devices), "--count", str(count), "--duration", str(duration),
        "--rate", str(rate), "--qos", str(qos), "--seq-base", str(seq_base),
        "--processes", str(processes), "--alarm-share", str(alarm_share),
        "--alarm-fleet", str(alarm_fleet),
    ]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def load_summary(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"the load generator did not finish in {timeout:.0f} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed: {err.decode(errors='replace')[-2000:]}")
    return dict(orjson.loads(out.strip().splitlines()[-1]))


def _sent_rate(summary: dict[str, Any]) -> float:
    return float(summary["sent"]) / max(float(summary["elapsed_s"]), 1e-9)


def _acked_rate(summary: dict[str, Any]) -> float:
    seconds = float(summary.get("drained_s") or summary["elapsed_s"])
    return float(summary["acked"]) / max(seconds, 1e-9)


# --------------------------------------------------------------------------- the service


@dataclass
class Service:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path
    peak_rss_kb: int = 0

    def vm_hwm_kb(self) -> int:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_rss_kb = max(self.peak_rss_kb, int(line.split()[1]))
        return self.peak_rss_kb

    def cpu_s(self) -> float:
        """utime + stime of the service process so far (all its threads)."""
        cpu = cpu_usage.process_cpu_s(self.proc.pid)
        if cpu is None:
            raise RuntimeError(f"the service exited: {self.log_path.read_text()[-3000:]}")
        return cpu

    def metrics(self) -> list[str]:
        """The lines of the service's /metrics."""
        return httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines()

    def stored(self) -> float:
        for line in self.metrics():
            if line.startswith('gridwarden_ingest_stored_total{table="telemetry"}'):
                return float(line.split()[-1])
        return 0.0

    def loop_lag_buckets(self) -> dict[float, float]:
        """The service's event-loop lag histogram: cumulative count by bucket bound (s)."""
        buckets: dict[float, float] = {}
        for line in self.metrics():
            if line.startswith(LOOP_LAG_BUCKET + "{"):
                bound = line.split('le="', 1)[1].split('"', 1)[0]
                buckets[float(bound)] = float(line.split()[-1])
        return buckets

    def pids(self) -> list[int]:
        return [self.proc.pid]

    def stop(self) -> int:
        self.vm_hwm_kb()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.peak_rss_kb


@dataclass
class ServiceGroup:
    """Several services sharing ingest (`GRIDWARDEN_INGEST_SHARDS`), measured as one."""

    services: list[Service]

    def stored(self) -> float:
        return sum(service.stored() for service in self.services)

    def pids(self) -> list[int]:
        return [service.proc.pid for service in self.services]

    def vm_hwm_kb(self) -> int:
        return max(service.vm_hwm_kb() for service in self.services)

    def shards_owned(self) -> list[int]:
        owned = []
        for service in self.services:
            value = next((line.split()[-1] for line in service.metrics()
                          if line.startswith("gridwarden_ingest_shards_owned ")), "0")  # fmt: skip
            owned.append(int(float(value)))
        return owned

    def signal(self, signum: int) -> None:
        for service in self.services:
            service.proc.send_signal(signum)

    def stop(self) -> int:
        return max(service.stop() for service in self.services)


def lag_quantile_ms(
    before: dict[float, float], after: dict[float, float], q: float
) -> float | None:
    """The q-quantile of the event-loop lag observed between two scrapes, as the upper
    bound of its histogram bucket in ms (the largest finite bound when it lies beyond it);
    None when nothing was observed."""
    counts = sorted((bound, after[bound] - before.get(bound, 0.0)) for bound in after)
    if not counts or counts[-1][1] <= 0:
        return None
    # The last bucket (+Inf) holds every observation, so one always qualifies.
    bound = next(bound for bound, count in counts if count >= q * counts[-1][1])
    if not math.isfinite(bound):
        bound = max(b for b, _ in counts if math.isfinite(b))
    return round(1000 * bound, 1)


def start_service(
    database_url: str, mqtt_url: str, root: Path, name: str, extra_env: dict[str, str] | None = None
) -> Service:
    from gridwarden.embedded import free_port

    port = free_port()
    env = {
        **os.environ,
        "GRIDWARDEN_DATABASE_URL": database_url,
        "GRIDWARDEN_MQTT_URL": mqtt_url,
        "GRIDWARDEN_HTTP_HOST": "127.0.0.1",
        "GRIDWARDEN_HTTP_PORT": str(port),
        "GRIDWARDEN_DATA_DIR": str(root / "service"),
        "GRIDWARDEN_TOPIC_PREFIX": PREFIX,
        # The load sends each of a small fleet's devices far more than any real device
        # (1,000 devices at 6,000 msg/s: 6 each): a limit that runs (its cost is part of
        # the figures) but never refuses.
        "GRIDWARDEN_DEVICE_RATE_PER_S": "100000",
        **(extra_env or {}),
    }
    log_path = root / f"service-{name}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gridwarden", "up"], env=env, stdout=log, stderr=log
        )
    service = Service(proc, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited: {log_path.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{service.url}/readyz", timeout=2).status_code == 200:
                return service
        time.sleep(0.2)
    service.stop()
    raise RuntimeError(f"the service was not ready in {READY_TIMEOUT_S:.0f} s")


def cpu_groups(
    service: Service | ServiceGroup, postgres: EmbeddedPostgres, mosquitto: EmbeddedMosquitto
) -> Callable[[], dict[str, list[int]]]:
    """The processes whose CPU `measure_ingest` notes. The servers run throughout; the
    backends are looked up at each sample (they come and go)."""
    postmaster, broker = postgres.running_pid(), mosquitto.running_pid()

    def groups() -> dict[str, list[int]]:
        return {
            "service": service.pids(),
            "postgres": cpu_usage.with_children(postmaster) if postmaster else [],
            "broker": [broker] if broker else [],
        }

    return groups


@dataclass(frozen=True)
class IngestRate:
    msgs_per_s: float
    # Cores used over the same window: by the service, PostgreSQL, the broker, anything
    # else, and idle (gridwarden/cpu_usage.py).
    cpu_cores: dict[str, float]
    # The same window as CPU time per committed message of the service, PostgreSQL and the
    # broker.
    cpu_us_per_msg: dict[str, float]


def ceiling_msgs_per_s(per_msg_us: dict[str, float], machine_cores: int) -> float | None:
    """The rate at which PostgreSQL and the broker alone, at their CPU cost per message
    measured while ingesting, would keep every core of the machine busy: an upper bound
    for any service that stores each message there, even one that costs nothing itself
    (an estimate: both may get cheaper per message in bigger batches at higher rates)."""
    floor_us = _storage_us(per_msg_us)
    return round(machine_cores / floor_us * 1e6, 1) if floor_us > 0 else None


def _storage_us(per_msg_us: dict[str, float]) -> float:
    """CPU a stored message costs PostgreSQL and the broker, whatever the service does."""
    return per_msg_us.get("postgres", 0.0) + per_msg_us.get("broker", 0.0)


def service_budget_us(
    per_msg_us: dict[str, float], machine_cores: int, rate: float
) -> float | None:
    """The CPU a message a service could spend at `rate` with PostgreSQL and the broker at
    their measured cost per message, all on this machine's cores (negative: they alone
    exceed it). Below what a bare consumer spends to only parse and ack, no service
    reaches the rate."""
    if rate <= 0 or not per_msg_us:
        return None
    return round(machine_cores / rate * 1e6 - _storage_us(per_msg_us), 2)


def cpu_us_per_msg(first: CpuSample, last: CpuSample, messages: int) -> dict[str, float]:
    """CPU time per message of each group between two samples (whatever else the window
    held, a drain's connect and its idle wait for the end, costs next to nothing)."""
    if messages <= 0:
        return {}
    return {
        name: round(seconds / messages * 1e6, 2)
        for name, seconds in cpu_usage.cpu_seconds(first, last).items()
    }


def measure_ingest(
    service: Service | ServiceGroup,
    cap_s: float,
    backlog: int,
    progress: Callable[[str], None],
    cpu_groups: Callable[[], dict[str, list[int]]],
) -> IngestRate:
    """Committed telemetry rows per second over a steady window of the backlog drain, and
    where the cores went meanwhile."""
    start = time.monotonic()
    samples: list[tuple[float, float, CpuSample]] = []
    while True:
        now, stored = time.monotonic(), service.stored()
        service.vm_hwm_kb()
        samples.append((now, stored, cpu_usage.sample(now, cpu_groups())))
        if stored > 0 and not any(s for _, s, _ in samples[:-1]):
            progress(f"ingest: first rows committed {now - start:.1f} s after start")
        active = [t for t, s, _ in samples if s > 0]
        if active:
            if now - active[0] >= WARMUP_S + cap_s or stored >= backlog * 0.98:
                break
            if len(samples) > 4 and samples[-5][1] == stored and stored > 0:
                break  # nothing more committed for 2 s: drained (or stuck)
        elif now - start > 120:
            raise RuntimeError("the service committed nothing within 120 s")
        time.sleep(0.5)
    t_first = next(t for t, s, _ in samples if s > 0)
    window = [sample for sample in samples if sample[0] >= t_first + WARMUP_S] or samples
    # Up to the last increase (the drain may end inside the window).
    end = max(range(len(window)), key=lambda k: (window[k][1], -k))
    first, last = window[0], window[end]
    if last[0] <= first[0]:  # drained within the warm-up: the whole run
        first, last = samples[0], samples[-1]
    (t0, s0, cpu0), (t1, s1, cpu1) = first, last
    progress(f"ingest: {s1 - s0:,.0f} rows over {t1 - t0:.1f} s (of {stored:,.0f} committed)")
    cores = cpu_usage.cores_used(cpu0, cpu1)
    progress("ingest: cores used meanwhile: " + ", ".join(f"{k} {v:.2f}" for k, v in cores.items()))
    per_msg = cpu_us_per_msg(cpu0, cpu1, round(s1 - s0))
    return IngestRate((s1 - s0) / (t1 - t0) if t1 > t0 else 0.0, cores, per_msg)


# --------------------------------------------------------------------------- latency
def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[k]


EVENT: Final = "event"
TELEMETRY: Final = "telemetry"


@dataclass
class ProbeTimes:
    alarm_ms: list[float] = field(default_factory=list)
    notify_ms: list[float] = field(default_factory=list)
    # publish -> the service read it off its socket (`received_at` of the stored row): the
    # broker's and the socket's share of `alarm_ms`, the rest is the service's.
    receive_ms: list[float] = field(default_factory=list)
    alarm_missing: int = 0
    notify_missing: int = 0


@dataclass
class LatencyResult:
    probes: dict[str, int] = field(default_factory=dict)
    by_kind: dict[str, ProbeTimes] = field(default_factory=dict)
    load: dict[str, Any] = field(default_factory=dict)

    def kind(self, name: str) -> ProbeTimes:
        return self.by_kind.setdefault(name, ProbeTimes())


def _interleave(groups: dict[str, list[int]]) -> list[tuple[str, int]]:
    """One probe of each kind in turn: [(kind, device index), ...]."""
    out: list[tuple[str, int]] = []
    longest = max((len(v) for v in groups.values()), default=0)
    for n in range(longest):
        out += [(kind, devices[n]) for kind, devices in groups.items() if n < len(devices)]
    return out


async def latency_phase(
    mqtt_url: str, database_url: str, config: BenchConfig, *, rate: float,
    probes: dict[str, list[int]], seq_base: int, grace_s: float,
    progress: Callable[[str], None], label: str,
) -> LatencyResult:  # fmt: skip
    """Load at `rate` (0: as fast as possible) for `duration` s while probing: `probes`
    maps a probe kind (EVENT, TELEMETRY) to the smoke detectors it uses, one probe each."""
    host, port = _host_port(mqtt_url)
    schedule = _interleave(probes)
    kind_of_probe: dict[str, str] = {device_id(i): kind for kind, i in schedule}
    sent_at: dict[str, float] = {}
    seq_of: dict[str, int] = {}
    alarm_seen: dict[str, float] = {}
    notify_seen: dict[str, float] = {}
    result = LatencyResult(probes={kind: len(v) for kind, v in probes.items()})
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    publisher = _paho_v5(f"bench-probe-{label}")
    publisher.connect(host, port)
    publisher.loop_start()
    stop = asyncio.Event()
    all_seen = asyncio.Event()
    probing_done = False

    def check() -> None:
        if probing_done and len(alarm_seen) >= len(sent_at) and len(notify_seen) >= len(sent_at):
            all_seen.set()

    async def watch_alarms() -> None:
        while not stop.is_set():
            pending = [d for d in sent_at if d not in alarm_seen]
            if pending:
                rows = await pool.fetch(
                    "SELECT source FROM alarms WHERE source = ANY($1::text[]) "
                    "AND rule = 'smoke.alarm'",
                    pending,
                )
                now = time.time()
                for row in rows:
                    alarm_seen.setdefault(row["source"], now)
                check()
            await asyncio.sleep(POLL_S)

    async def watch_notifications(ready: asyncio.Event) -> None:
        async with aiomqtt.Client(host, port, identifier=f"bench-notify-{label}") as client:
            await client.subscribe(f"{PREFIX}/workers/+/cases", qos=1)
            ready.set()
            async for message in client.messages:
                now = time.time()
                body = orjson.loads(message.payload)
                device = body.get("device_id")
                if body.get("reason") == "dispatched" and device in sent_at:
                    notify_seen.setdefault(device, now)
                    check()

    ready = asyncio.Event()
    tasks = [asyncio.create_task(watch_alarms()),
             asyncio.create_task(watch_notifications(ready))]  # fmt: skip
    try:
        await asyncio.wait_for(ready.wait(), 10)
        load = run_load_process(
            mqtt_url, config.devices, processes=config.load_processes,
            duration=config.duration, rate=rate, qos=config.qos, seq_base=seq_base,
        )  # fmt: skip
        await asyncio.sleep(1.0)  # the load is flowing before the first probe
        interval = max(config.duration - 1.5, 0.5) / max(len(schedule), 1)
        for n, (kind, i) in enumerate(schedule):
            d = device_id(i)
            now = time.time()
            seq = seq_base + 10**9 + n
            if kind == EVENT:
                topic, payload = f"{PREFIX}/dev/{d}/event", alarm_event_payload(seq, now)
            else:
                topic, payload = f"{PREFIX}/dev/{d}/telemetry", alarm_payload(seq, now)
            sent_at[d], seq_of[d] = now, seq
            publisher.publish(topic, payload, qos=1)
            await asyncio.sleep(interval)
        result.load = await asyncio.to_thread(load_summary, load, config.duration + 180)
        progress(
            f"{label}: load sent {result.load['sent']:,} msgs in {result.load['elapsed_s']:.1f}"
            f" s ({_sent_rate(result.load):,.0f}/s); waiting for the probes"
        )
        probing_done = True
        check()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_seen.wait(), grace_s)
        received = await _received_at(pool, seq_of, kind_of_probe)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task
        publisher.disconnect()
        publisher.loop_stop()
        await pool.close()
    # Wall clock on one machine for both ends. A probe never seen counts as the grace
    # period's end (a lower bound) and is reported as missing.
    waited = grace_s + config.duration
    for d, t in sent_at.items():
        times = result.kind(kind_of_probe[d])
        if d in alarm_seen:
            times.alarm_ms.append((alarm_seen[d] - t) * 1000)
        else:
            times.alarm_missing += 1
            times.alarm_ms.append(waited * 1000)
        if d in received:
            times.receive_ms.append((received[d] - t) * 1000)
        if d in notify_seen:
            times.notify_ms.append((notify_seen[d] - t) * 1000)
        else:
            times.notify_missing += 1
            times.notify_ms.append(waited * 1000)
    return result


async def _received_at(
    pool: asyncpg.Pool, seq_of: dict[str, int], kind_of_probe: dict[str, str]
) -> dict[str, float]:
    """When the service received each probe (epoch seconds), from its stored row."""
    received: dict[str, float] = {}
    for kind, table in ((EVENT, "device_events"), (TELEMETRY, "telemetry")):
        devices = [d for d in seq_of if kind_of_probe[d] == kind]
        rows = await pool.fetch(
            f"SELECT device_id, received_at FROM {table} t "  # a constant table name
            "JOIN unnest($1::text[], $2::bigint[]) AS p(device_id, seq) USING (device_id, seq)",
            devices, [seq_of[d] for d in devices],
        )  # fmt: skip
        received.update((r["device_id"], r["received_at"].timestamp()) for r in rows)
    return received


# --------------------------------------------------------------------------- the run
@contextlib.contextmanager
def _services(
    progress: Callable[[str], None],
) -> Iterator[tuple[EmbeddedPostgres, EmbeddedMosquitto, str, str, Path]]:
    from gridwarden.embedded import EmbeddedMosquitto, EmbeddedPostgres

    root = Path(tempfile.mkdtemp(prefix="gridwarden-bench-"))
    root.chmod(0o711)  # the servers' unprivileged account must traverse it
    postgres = EmbeddedPostgres(root / "data")
    mosquitto = EmbeddedMosquitto(root / "data", anonymous=True)
    try:
        progress("starting PostgreSQL and Mosquitto")
        dsn = postgres.start()
        url = mosquitto.start()
        yield postgres, mosquitto, dsn, url, root
    finally:
        with contextlib.suppress(Exception):
            mosquitto.stop()
        with contextlib.suppress(Exception):
            postgres.stop()
        if not os.environ.get("GRIDWARDEN_KEEP_BENCH"):
            shutil.rmtree(root, ignore_errors=True)


def _server_versions(dsn: str) -> str:
    import psycopg

    with psycopg.connect(dsn) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


async def _seed(dsn: str, devices: int) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return await seed(conn, devices)
    finally:
        await conn.close()


def _latency_keys(out: dict[str, Any], half: LatencyResult, sat: LatencyResult) -> None:
    event, telemetry, saturated = half.kind(EVENT), half.kind(TELEMETRY), sat.kind(EVENT)

    def ms(values: list[float], q: float) -> float:
        return round(_percentile(values, q), 1)

    out["alarm_latency_ms_p50"] = ms(event.alarm_ms, 50)
    out["alarm_latency_ms_p99"] = ms(event.alarm_ms, 99)
    out["alarm_latency_ms_p99_saturated"] = ms(saturated.alarm_ms, 99)
    out["alarm_latency_ms_p50_saturated"] = ms(saturated.alarm_ms, 50)
    out["alarm_receive_ms_p50"] = ms(event.receive_ms, 50)
    out["alarm_receive_ms_p99"] = ms(event.receive_ms, 99)
    out["alarm_receive_ms_p50_saturated"] = ms(saturated.receive_ms, 50)
    out["alarm_receive_ms_p99_saturated"] = ms(saturated.receive_ms, 99)
    out["alarm_latency_telemetry_ms_p50"] = ms(telemetry.alarm_ms, 50)
    out["alarm_latency_telemetry_ms_p99"] = ms(telemetry.alarm_ms, 99)
    out["case_notify_latency_ms_p50"] = ms(event.notify_ms, 50)
    out["case_notify_latency_ms_p99"] = ms(event.notify_ms, 99)
    out["case_notify_latency_ms_p99_saturated"] = ms(saturated.notify_ms, 99)
    out["case_notify_latency_telemetry_ms_p99"] = ms(telemetry.notify_ms, 99)
    out["latency_probes"] = half.probes.get(EVENT, 0)
    out["latency_probes_telemetry"] = half.probes.get(TELEMETRY, 0)
    out["latency_probes_saturated"] = sat.probes.get(EVENT, 0)
    out["probes_missing"] = {
        "alarm": event.alarm_missing, "notify": event.notify_missing,
        "alarm_telemetry": telemetry.alarm_missing, "notify_telemetry": telemetry.notify_missing,
        "alarm_saturated": saturated.alarm_missing, "notify_saturated": saturated.notify_missing,
    }  # fmt: skip


def _note_persistence(
    out: dict[str, Any], path: Path, key: str = "broker_persistence_mb_max"
) -> None:
    """The largest size seen of the broker's persistence file."""
    with contextlib.suppress(OSError):
        size = round(path.stat().st_size / 2**20, 1)
        out[key] = max(out.get(key, 0.0), size)


def _note_saves(
    out: dict[str, Any], broker: EmbeddedMosquitto, since: float, phase: str,
    progress: Callable[[str], None],
) -> None:  # fmt: skip
    """The broker's persistence saves during a latency phase: it serves no client while it
    saves, so an alarm published meanwhile waits for the save."""
    saves = broker.autosave.stats.between(since, time.monotonic())
    out[f"broker_saves{phase}"] = len(saves)
    out[f"broker_save_ms_max{phase}"] = round(max((t for _, t in saves), default=0) * 1000, 1)
    timeline = ", ".join(f"{at - since:.1f} s: {took * 1000:,.0f} ms" for at, took in saves)
    progress(f"broker saves during the phase (since its start: how long): {timeline or 'none'}")


def run_bench(config: BenchConfig, console: Console) -> dict[str, Any]:
    from gridwarden.migrate import migrate

    progress = Progress(console)
    t_start = time.monotonic()
    out: dict[str, Any] = {"devices": config.devices, "duration_s": config.duration}
    backlog = int(min(max(config.duration * BACKLOG_RATE_GUESS, BACKLOG_MIN), BACKLOG_MAX))
    with _services(progress) as (postgres, mosquitto, dsn, mqtt_url, root):
        asyncio.run(migrate(dsn))
        t = time.monotonic()
        workers = asyncio.run(_seed(dsn, config.devices))
        progress(f"registered {config.devices:,} devices and {workers} workers "
                 f"in {time.monotonic() - t:.1f} s")  # fmt: skip

        # 1. One stream, queued for five sessions.
        baselines = _baselines()
        for client_id in [cid for _, cid, _ in baselines] + [SERVICE_CLIENT_ID]:
            prepare_session(mqtt_url, client_id, subscribe=True)
        progress(f"publishing a backlog of {backlog:,} messages (QoS 1)")
        summary = load_summary(
            run_load_process(mqtt_url, config.devices, processes=config.load_processes,
                             count=backlog, qos=1, seq_base=0),
            timeout=900,
        )  # fmt: skip
        out["backlog_messages"] = backlog
        out["backlog_publish_msgs_per_s"] = round(_acked_rate(summary), 1)
        out["load_processes"] = summary.get("processes")
        progress(f"backlog: {summary['acked']:,} acknowledged by the broker in "
                 f"{summary['drained_s']:.1f} s ({_acked_rate(summary):,.0f}/s, "
                 f"{summary.get('processes')} publisher processes)")  # fmt: skip

        # 2. Baselines, each on its own session of the same stream.
        rates: dict[str, float] = {}
        baseline_cpu: dict[str, dict[str, float]] = {}
        persistence = root / "data" / "mosquitto" / "mosquitto.db"
        broker_pid = mosquitto.running_pid()
        consumer_groups = {"consumer": [os.getpid()], "broker": [broker_pid] if broker_pid else []}
        for name, client_id, drain in baselines:
            _note_persistence(out, persistence)
            progress(f"baseline: bare {name} draining the backlog")
            before = cpu_usage.sample(time.monotonic(), consumer_groups)
            res = drain(mqtt_url, backlog, config.duration)
            baseline_cpu[name] = cpu_us_per_msg(
                before, cpu_usage.sample(time.monotonic(), consumer_groups), res.received
            )
            prepare_session(mqtt_url, client_id, subscribe=False)
            rates[name] = res.rate
            out[BASELINE_KEYS[name]] = round(res.rate, 1)
            extra = ""
            if name == "aiomqtt":
                out["baseline_aiomqtt_read_ahead_max"] = res.read_ahead_max
                extra = f" (up to {res.read_ahead_max:,} acked but not yet consumed)"
            progress(f"{name}: {res.received:,} msgs, {res.rate:,.0f} msg/s{extra}")
        fastest_client, fastest = max(rates.items(), key=lambda kv: kv[1])
        out["baseline_fastest_msgs_per_s"] = round(fastest, 1)
        out["baseline_fastest_client"] = fastest_client
        out["baseline_fastest_cpu_us_per_msg"] = baseline_cpu[fastest_client]

        # 3. Ingest.
        progress("ingest: starting `gridwarden up` on the queued backlog")
        service = start_service(dsn, mqtt_url, root, "ingest")
        try:
            measured = measure_ingest(service, config.duration, backlog, progress,
                                      cpu_groups(service, postgres, mosquitto))  # fmt: skip
        finally:
            rss = [service.stop()]
        drop_service_sessions(mqtt_url)  # and the rest of the backlog
        ingest = measured.msgs_per_s
        out["ingest_msgs_per_s"] = round(ingest, 1)
        out["ingest_cpu_cores"] = measured.cpu_cores
        out["ingest_cpu_us_per_msg"] = measured.cpu_us_per_msg
        machine_cores = os.cpu_count() or 1
        ceiling = ceiling_msgs_per_s(out["ingest_cpu_us_per_msg"], machine_cores)
        out["ingest_ceiling_msgs_per_s"] = ceiling
        progress(f"ingest: CPU µs a message {out['ingest_cpu_us_per_msg']}; PostgreSQL "
                 f"and the broker alone fill the machine at {ceiling or 0:,.0f} msg/s")  # fmt: skip

        # 4./5. Latency.
        # PROBE_RATE probes per second in each phase (each probe opens a case): at half
        # rate alternately an event and a telemetry reading, saturated only events.
        pool = probe_pool(config.devices)
        per_kind = max(1, min(int(PROBE_RATE * config.duration / 2), len(pool) // 4))
        half_event, half_telemetry = pool[:per_kind], pool[per_kind : 2 * per_kind]
        saturated_event = pool[2 * per_kind : 4 * per_kind]
        half = max(ingest / 2, 1.0)
        progress("latency: restarting the service")
        service = start_service(dsn, mqtt_url, root, "latency")
        try:
            wait_quiet(service, progress, "latency")
            progress(f"latency: load at {half:,.0f} msg/s (half of ingest), {per_kind} alarm "
                     f"events and {per_kind} alarm readings as probes")  # fmt: skip
            lag, half_started = service.loop_lag_buckets(), time.monotonic()
            half_res = asyncio.run(latency_phase(
                mqtt_url, dsn, config, rate=half,
                probes={EVENT: half_event, TELEMETRY: half_telemetry},
                seq_base=10**12, grace_s=30.0, progress=progress, label="half",
            ))  # fmt: skip
            out["event_loop_lag_ms_p99"] = lag_quantile_ms(lag, service.loop_lag_buckets(), 0.99)
            _note_saves(out, mosquitto, half_started, "", progress)
            service.vm_hwm_kb()
            wait_quiet(service, progress, "saturated")
            progress(f"saturated: load as fast as possible, {len(saturated_event)} alarm events")
            lag, sat_started = service.loop_lag_buckets(), time.monotonic()
            sat_res = asyncio.run(latency_phase(
                mqtt_url, dsn, config, rate=0.0, probes={EVENT: saturated_event},
                seq_base=2 * 10**12, grace_s=max(60.0, 4 * config.duration),
                progress=progress, label="saturated",
            ))  # fmt: skip
            out["event_loop_lag_ms_p99_saturated"] = lag_quantile_ms(
                lag, service.loop_lag_buckets(), 0.99
            )
            _note_persistence(out, persistence, "broker_persistence_mb_saturated")
            _note_saves(out, mosquitto, sat_started, "_saturated", progress)
        finally:
            rss.append(service.stop())
        drop_service_sessions(mqtt_url)
        _latency_keys(out, half_res, sat_res)
        out["half_rate_target_msgs_per_s"] = round(half, 1)
        out["half_rate_sent_msgs_per_s"] = round(_sent_rate(half_res.load), 1)
        out["saturated_sent_msgs_per_s"] = round(_sent_rate(sat_res.load), 1)
        out["saturated_acked_msgs_per_s"] = round(_acked_rate(sat_res.load), 1)
        out["peak_rss_mb"] = round(max(rss) / 1024, 1)
        out["qos"] = config.qos
        out["postgres_version"] = _server_versions(dsn)
        out["ratio_ingest_to_aiomqtt"] = (
            round(ingest / rates["aiomqtt"], 3) if rates["aiomqtt"] else None
        )
        out["ratio_ingest_to_fastest"] = round(ingest / fastest, 3) if fastest else None
        out["ratio_ceiling_to_fastest"] = (
            round(ceiling / fastest, 3) if ceiling and fastest else None
        )
        out["service_budget_us_at_half_fastest"] = service_budget_us(
            out["ingest_cpu_us_per_msg"], machine_cores, fastest / 2
        )

        if config.scaling:
            out["scaling"] = run_scaling(
                config, postgres, mosquitto, dsn, mqtt_url, root, ingest, backlog, progress
            )
        if config.processes:
            out["by_processes"] = run_processes(config, (postgres, mosquitto), dsn, mqtt_url,
                                                root, ingest, backlog, progress)  # fmt: skip
    out["wall_s"] = round(time.monotonic() - t_start, 1)
    return out


# --------------------------------------------------------------------------- processes
def run_processes(
    config: BenchConfig, servers: tuple[EmbeddedPostgres, EmbeddedMosquitto], dsn: str,
    mqtt_url: str, root: Path, ingest: float, backlog: int, progress: Callable[[str], None],
) -> list[dict[str, Any]]:  # fmt: skip
    """Ingest throughput with N `gridwarden up` processes sharing N ingest shards.

    The N processes start first and rebalance (one shard each), then all are paused
    (SIGSTOP) while the same backlog is published, and resumed together: each drains the
    queue of its own shard sessions, which (Mosquitto having no hash-based shared
    subscription) each hold the whole stream; a shard acknowledges other shards'
    messages unseen. Rate = telemetry rows committed by all of them per second."""
    size = int(min(max(ingest * (WARMUP_S + config.duration + 5) * 1.25, BACKLOG_MIN), backlog))
    rows = []
    for step, count in enumerate(config.processes):
        env = {"GRIDWARDEN_INGEST_SHARDS": str(count)}
        group = ServiceGroup([start_service(dsn, mqtt_url, root, f"processes-{count}-{i}", env)
                              for i in range(count)])  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while group.shards_owned() != [1] * count and time.monotonic() < deadline:
                time.sleep(0.5)
            owned = group.shards_owned()
            group.signal(signal.SIGSTOP)
            progress(f"processes: {count} running (shards {owned}), paused; "
                     f"publishing {size:,} messages")  # fmt: skip
            load_summary(
                run_load_process(mqtt_url, config.devices, processes=config.load_processes,
                                 count=size, qos=1, seq_base=(30 + step) * 10**12,
                                 alarm_fleet=ALARM_FLEET),
                timeout=900,
            )  # fmt: skip
            group.signal(signal.SIGCONT)
            measured = measure_ingest(group, config.duration, size, progress,
                                      cpu_groups(group, *servers))  # fmt: skip
        finally:
            group.signal(signal.SIGCONT)
            peak = group.stop()
        drop_service_sessions(mqtt_url, count)
        rows.append({
            "processes": count, "ingest_msgs_per_s": round(measured.msgs_per_s, 1),
            "shards_owned": owned, "peak_rss_mb_per_process": round(peak / 1024, 1),
            "cpu_cores": measured.cpu_cores,
        })  # fmt: skip
        progress(f"processes: {count}: {measured.msgs_per_s:,.0f} msg/s")
    return rows


# --------------------------------------------------------------------------- scaling
def cpu_per_message(
    config: BenchConfig, dsn: str, mqtt_url: str, root: Path, ingest: float,
    progress: Callable[[str], None],
) -> list[dict[str, Any]]:  # fmt: skip
    """Service CPU time per committed message with the load at shares of `ingest`."""
    rows: list[dict[str, Any]] = []
    warmup = min(WARMUP_S, config.duration / 2)
    service = start_service(dsn, mqtt_url, root, "cpu")
    try:
        for n, share in enumerate(SCALING_LOAD_SHARES):
            idle = wait_quiet(service, progress, f"cpu at {share:.0%}")
            rate = max(ingest * share, 1.0)
            load = run_load_process(
                mqtt_url, config.devices, processes=config.load_processes,
                duration=warmup + config.duration, rate=rate, qos=1,
                seq_base=(5 + n) * 10**12,
            )  # fmt: skip
            time.sleep(0.5 + warmup)  # the load's start delay, then a warm-up
            cpu0, stored0, t0 = service.cpu_s(), service.stored(), time.monotonic()
            summary = load_summary(load, config.duration + 180)
            cpu1, stored1, t1 = service.cpu_s(), service.stored(), time.monotonic()
            service.vm_hwm_kb()
            committed = stored1 - stored0
            row = {
                "load_share": share,
                "target_msgs_per_s": round(rate, 1),
                "sent_msgs_per_s": round(_sent_rate(summary), 1),
                "committed_msgs_per_s": round(committed / max(t1 - t0, 1e-9), 1),
                "cpu_s": round(cpu1 - cpu0, 2),
                "cpu_share_of_one_core": round((cpu1 - cpu0) / max(t1 - t0, 1e-9), 3),
                "cpu_us_per_msg": round((cpu1 - cpu0) / committed * 1e6, 1) if committed else None,
                "idle_cpu_share_before": round(idle, 3),
            }
            rows.append(row)
            progress(f"cpu at {share:.0%} of ingest ({rate:,.0f} msg/s): "
                     f"{row['cpu_us_per_msg']} µs of service CPU per message, "
                     f"{row['cpu_share_of_one_core']:.0%} of a core")  # fmt: skip
    finally:
        service.stop()
    drop_service_sessions(mqtt_url)
    return rows


def wait_quiet(service: Service, progress: Callable[[str], None], what: str) -> float:
    """Until the service uses less than QUIET_CPU_SHARE of a core for a second (two
    samples in a row: its queue drained, cases opened, notifications sent), at most
    QUIET_LIMIT_S; returns the CPU share of the last sample."""
    t0 = time.monotonic()
    quiet, share = 0, 1.0
    cpu, t = service.cpu_s(), t0
    while quiet < 2 and t - t0 < QUIET_LIMIT_S:
        time.sleep(QUIET_SAMPLE_S)
        cpu_now, t_now = service.cpu_s(), time.monotonic()
        share = (cpu_now - cpu) / (t_now - t)
        quiet = quiet + 1 if share < QUIET_CPU_SHARE else 0
        cpu, t = cpu_now, t_now
    waited = time.monotonic() - t0
    if quiet < 2:
        progress(f"{what}: the service was still busy ({share:.0%} of a core) after "
                 f"{waited:.0f} s; going on")  # fmt: skip
    elif waited > 3:
        progress(f"{what}: waited {waited:.0f} s for the service to go quiet")
    return share


def run_scaling(
    config: BenchConfig, postgres: EmbeddedPostgres, mosquitto: EmbeddedMosquitto, dsn: str,
    mqtt_url: str, root: Path, ingest: float, backlog: int, progress: Callable[[str], None],
) -> dict[str, Any]:  # fmt: skip
    from gridwarden.migrate import migrate

    progress(f"scaling: service CPU per message at {config.devices:,} devices")
    cpu_rows = cpu_per_message(config, dsn, mqtt_url, root, ingest, progress)

    # The same backlog at every size, enough for the warm-up and the window.
    size = int(min(max(ingest * (WARMUP_S + config.duration + 5) * 1.25, BACKLOG_MIN), backlog))
    scaling_dsn = postgres.dsn_for(SCALING_DATABASE)

    async def create() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f"CREATE DATABASE {SCALING_DATABASE}")
        finally:
            await conn.close()

    asyncio.run(create())
    asyncio.run(migrate(scaling_dsn))
    asyncio.run(_seed(scaling_dsn, 0))

    async def register(start: int, end: int) -> None:
        conn = await asyncpg.connect(scaling_dsn)
        try:
            await add_devices(conn, start, end)
            await conn.execute("ANALYZE devices")
        finally:
            await conn.close()

    alarm_devices = len(alarm_pool(ALARM_FLEET))
    rows: list[dict[str, Any]] = []
    registered = 0
    for step, devices in enumerate(sorted(config.scaling_devices)):
        t = time.monotonic()
        asyncio.run(register(registered, devices))
        register_s = time.monotonic() - t
        registered = devices
        progress(f"scaling: {devices:,} devices registered ({register_s:.1f} s); "
                 f"publishing {size:,} messages")  # fmt: skip
        prepare_session(mqtt_url, SERVICE_CLIENT_ID, subscribe=True)
        summary = load_summary(
            run_load_process(mqtt_url, devices, processes=config.load_processes, count=size,
                             qos=1, seq_base=(10 + step) * 10**12,
                             alarm_fleet=ALARM_FLEET),
            timeout=900,
        )  # fmt: skip
        service = start_service(scaling_dsn, mqtt_url, root, f"scaling-{devices}")
        try:
            groups = cpu_groups(service, postgres, mosquitto)
            rate = measure_ingest(service, config.duration, size, progress, groups).msgs_per_s
        finally:
            peak = service.stop()
        drop_service_sessions(mqtt_url)
        rows.append({
            "devices": devices, "ingest_msgs_per_s": round(rate, 1),
            "peak_rss_mb": round(peak / 1024, 1), "register_s": round(register_s, 1),
            "publish_msgs_per_s": round(_acked_rate(summary), 1),
        })  # fmt: skip
        progress(f"scaling: {devices:,} devices: {rate:,.0f} msg/s, "
                 f"peak RSS {peak / 1024:,.0f} MB")  # fmt: skip
    return {
        "backlog_messages": size,
        "alarm_devices": alarm_devices,
        "by_devices": rows,
        "cpu_devices": config.devices,
        "cpu_per_message": cpu_rows,
    }


# --------------------------------------------------------------------------- output
def render_table(result: dict[str, Any], console: Console) -> None:
    table = Table(title="gridwarden bench")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        if key in ("scaling", "by_processes"):
            continue
        if isinstance(value, float):
            shown = f"{value:,.1f}"
        elif key in ("ingest_cpu_cores", "ingest_cpu_us_per_msg",
                     "baseline_fastest_cpu_us_per_msg"):  # fmt: skip
            shown = ", ".join(f"{name} {amount:.2f}" for name, amount in value.items())
        else:
            shown = str(value)
        table.add_row(key, shown)
    console.print(table)
    scaling = result.get("scaling")
    if scaling:
        render_scaling(scaling, console)
    if result.get("by_processes"):
        render_processes(result["by_processes"], console)


def render_processes(rows: list[dict[str, Any]], console: Console) -> None:
    table = Table(title="ingest by processes sharing ingest shards")
    for column in ("processes", "ingest msg/s", "shards owned", "peak RSS MB per process",
                   "cores: service / PostgreSQL / broker / other / idle"):  # fmt: skip
        table.add_column(column, justify="right")
    for row in rows:
        rate, rss = row["ingest_msgs_per_s"], row["peak_rss_mb_per_process"]
        owned = str(row["shards_owned"])
        cores = " / ".join(f"{v:.2f}" for v in row["cpu_cores"].values())
        table.add_row(str(row["processes"]), f"{rate:,.0f}", owned, f"{rss:,.0f}", cores)
    console.print(table)


def render_scaling(scaling: dict[str, Any], console: Console) -> None:
    by_devices = Table(title=f"ingest by registered devices "
                             f"(backlog {scaling['backlog_messages']:,} each)")  # fmt: skip
    for column in ("devices", "ingest msg/s", "peak RSS MB", "registering s"):
        by_devices.add_column(column, justify="right")
    for row in scaling["by_devices"]:
        by_devices.add_row(f"{row['devices']:,}", f"{row['ingest_msgs_per_s']:,.0f}",
                           f"{row['peak_rss_mb']:,.0f}", f"{row['register_s']:.1f}")  # fmt: skip
    console.print(by_devices)
    cpu = Table(title=f"service CPU per message ({scaling['cpu_devices']:,} devices)")
    for column in ("load", "target msg/s", "committed msg/s", "CPU µs/msg", "cores"):
        cpu.add_column(column, justify="right")
    for row in scaling["cpu_per_message"]:
        per_msg = row["cpu_us_per_msg"]
        cpu.add_row(f"{row['load_share']:.0%}", f"{row['target_msgs_per_s']:,.0f}",
                    f"{row['committed_msgs_per_s']:,.0f}",
                    "-" if per_msg is None else f"{per_msg:,.1f}",
                    f"{row['cpu_share_of_one_core']:.2f}")  # fmt: skip
    console.print(cpu)


def main(
    devices: int, duration: float, as_json: bool, qos: int, *, scaling: bool = False,
    scaling_devices: tuple[int, ...] = SCALING_DEVICES, processes: tuple[int, ...] = (),
) -> None:  # fmt: skip
    """Entry point for `gridwarden bench` (see gridwarden/cli.py)."""
    err = Console(stderr=True)
    config = BenchConfig(
        devices=devices, duration=duration, qos=qos, scaling=scaling,
        scaling_devices=scaling_devices or SCALING_DEVICES, processes=processes,
    )  # fmt: skip
    result = run_bench(config, err)
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
        if scaling:
            render_scaling(result["scaling"], err)
        if processes:
            render_processes(result["by_processes"], err)
    else:
        render_table(result, Console())
