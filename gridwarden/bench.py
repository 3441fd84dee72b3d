"""`gridwarden bench`: every figure of the performance issue, measured in one run.

Everything runs on this machine against a private PostgreSQL and Mosquitto started for the
run under a fresh temporary data dir (removed afterwards); the service is `gridwarden up`
as a subprocess, so its peak RSS is its own. The load comes from `device_sim.load`
(paho-mqtt publishers in separate processes, pre-serialised payloads).

Phases (each at most `duration` seconds of measuring):

1. **Backlog.** Three persistent QoS-1 sessions are subscribed to `gw/dev/+/+` (a bare
   aiomqtt consumer, a bare paho-mqtt consumer, and the service's own `gridwarden-ingest`
   session), then one stream of `backlog` telemetry messages (1 % alarm-triggering) is
   published once at QoS 1, so the broker holds the same stream for each of them.
2. **Baselines.** The aiomqtt consumer drains its queue (orjson-parse each message, the
   library acks); then the paho-mqtt consumer (threaded loop, `manual_ack`, orjson-parse,
   ack each). Rate = messages / (last - first receipt), stopping at `duration` seconds.
3. **Ingest.** `gridwarden up` starts and drains its queue through validation, the rules,
   alarms/cases and commit; the rate is `gridwarden_ingest_stored_total{table="telemetry"}`
   (rows committed) from /metrics over a steady window (after a warm-up) of at most
   `duration` seconds. The service is then stopped and the rest of its queue discarded.
4. **Latency at half rate.** The service restarts; the load publishes at half the ingest
   rate (`--qos`) while the bench publishes alarm probes (a smoke detector's `alarm: true`,
   each to a detector that has no open alarm) at a few per second, noting the publish time.
   *Alarm latency* = publish → the alarm row is visible to a poller (every 10 ms) in
   `alarms`: an upper bound on publish → commit by at most the poll period.
   *Case notification latency* = publish → the `dispatched` message for that device
   received on `gw/workers/+/cases` (through the outbox).
5. **Saturated.** The same with the load publishing as fast as it can.

Peak RSS is VmHWM of the service processes (the larger of the two starts).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlparse

import aiomqtt
import asyncpg
import httpx
import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from rich.console import Console
from rich.table import Table

from device_sim.load import alarm_payload, device_id, kind_of, probe_pool

PREFIX: Final = "gw"
SERVICE_CLIENT_ID: Final = "gridwarden-ingest"
AIOMQTT_CLIENT_ID: Final = "bench-aiomqtt"
PAHO_CLIENT_ID: Final = "bench-paho"
SESSION_EXPIRY_S: Final = 7 * 24 * 3600
ALARM_SHARE: Final = 0.01
BACKLOG_RATE_GUESS: Final = 20_000  # msgs/s: backlog = duration × this (capped)
BACKLOG_MIN: Final = 5_000
BACKLOG_MAX: Final = 600_000
WARMUP_S: Final = 2.0
PROBE_RATE: Final = 20.0  # alarm probes per second
POLL_S: Final = 0.01
GRID_SIDE: Final = 4  # 4 × 4 grids, 2 × 2 grids per community
ORIGIN: Final = (120.000, 30.000)
GRID_DEG: Final = 0.01
READY_TIMEOUT_S: Final = 180.0
IDLE_STOP_S: Final = 5.0
STOP_TIMEOUT_S: Final = 15.0  # then SIGKILL (after the ingest phase its queue is discarded)

KEYS: Final = (
    "baseline_aiomqtt_msgs_per_s", "baseline_fastest_msgs_per_s", "ingest_msgs_per_s",
    "alarm_latency_ms_p50", "alarm_latency_ms_p99", "alarm_latency_ms_p99_saturated",
    "case_notify_latency_ms_p99", "peak_rss_mb", "devices", "duration_s",
)  # fmt: skip


@dataclass
class BenchConfig:
    devices: int = 100_000
    duration: float = 20.0
    qos: int = 1
    load_processes: int = 2


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


async def seed(conn: asyncpg.Connection, devices: int) -> int:
    """One street, 4 communities, 16 grids (bounding boxes), a grid worker per grid and a
    leader per community; `devices` devices spread over the grids (COPY). Returns workers."""
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
    rng = random.Random(6)
    async with conn.transaction():
        await conn.executemany(
            "INSERT INTO cells (id, name, level, parent_id, geometry, min_lon, min_lat, "
            "max_lon, max_lat) VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8, $9)",
            [(c[0], c[1], c[2], c[3], _bbox(*c[4:]), *c[4:]) for c in cells],
        )
        records = []
        for i in range(devices):
            gid, g_lon, g_lat = grids[i % len(grids)]
            lon = g_lon + GRID_DEG * (0.05 + 0.9 * rng.random())
            lat = g_lat + GRID_DEG * (0.05 + 0.9 * rng.random())
            # No building: every probe alarm is its own incident (no building-level join).
            records.append((device_id(i), kind_of(i), lat, lon, gid, 3600))
        await conn.copy_records_to_table(
            "devices", records=records,
            columns=["id", "kind", "lat", "lon", "cell_id", "interval_s"],
        )  # fmt: skip
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


# --------------------------------------------------------------------------- MQTT helpers
def _host_port(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    return parsed.hostname or "127.0.0.1", parsed.port or 1883


def _connect_props() -> Properties:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = SESSION_EXPIRY_S
    return props


def _paho_v5(client_id: str, **kwargs: Any) -> paho.Client:
    return paho.Client(
        CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5, **kwargs
    )


def prepare_session(mqtt_url: str, client_id: str, *, subscribe: bool) -> None:
    """`subscribe`: create a persistent session subscribed to the device topics (QoS 1);
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
            client.subscribe([(f"{PREFIX}/dev/+/+", 1), (f"{PREFIX}/codec/+/+", 1)])
            if not done.wait(10):
                raise RuntimeError("no SUBACK")
    finally:
        client.disconnect()
        client.loop_stop()


@dataclass
class DrainResult:
    received: int = 0
    first: float = 0.0
    last: float = 0.0

    @property
    def rate(self) -> float:
        if self.received < 2 or self.last <= self.first:
            return 0.0
        return (self.received - 1) / (self.last - self.first)


async def drain_aiomqtt(mqtt_url: str, expected: int, cap_s: float) -> DrainResult:
    host, port = _host_port(mqtt_url)
    result = DrainResult()
    async with aiomqtt.Client(
        host, port, identifier=AIOMQTT_CLIENT_ID, protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=False, properties=_connect_props(),
    ) as client:  # fmt: skip
        loop = asyncio.get_running_loop()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(IDLE_STOP_S * 12) as idle:
                async for message in client.messages:
                    orjson.loads(message.payload)
                    now = time.monotonic()
                    if not result.received:
                        result.first = now
                    result.received += 1
                    result.last = now
                    if result.received >= expected or now - result.first >= cap_s:
                        break
                    idle.reschedule(loop.time() + IDLE_STOP_S)
    return result


def drain_paho(mqtt_url: str, expected: int, cap_s: float) -> DrainResult:
    host, port = _host_port(mqtt_url)
    result = DrainResult()
    done = threading.Event()
    client = _paho_v5(PAHO_CLIENT_ID, manual_ack=True)

    def on_message(c: paho.Client, _u: object, message: paho.MQTTMessage) -> None:
        orjson.loads(message.payload)
        c.ack(message.mid, message.qos)
        now = time.monotonic()
        if not result.received:
            result.first = now
        result.received += 1
        result.last = now
        if result.received >= expected or now - result.first >= cap_s:
            done.set()

    client.on_message = on_message
    client.connect(host, port, clean_start=False, properties=_connect_props())
    client.loop_start()
    started = time.monotonic()
    try:
        while not done.wait(0.5):
            if result.received and time.monotonic() - result.last > IDLE_STOP_S:
                break
            if not result.received and time.monotonic() - started > IDLE_STOP_S * 12:
                break
    finally:
        client.disconnect()
        client.loop_stop()
    return result


def run_load_process(
    mqtt_url: str, devices: int, *, processes: int, count: int = 0, duration: float = 0.0,
    rate: float = 0.0, qos: int = 1, seq_base: int = 0, alarm_share: float = ALARM_SHARE,
) -> subprocess.Popen[bytes]:  # fmt: skip
    argv = [
        sys.executable, "-m", "device_sim.load", "--mqtt-url", mqtt_url, "--prefix", PREFIX,
        "--devices", str(devices), "--count", str(count), "--duration", str(duration),
        "--rate", str(rate), "--qos", str(qos), "--seq-base", str(seq_base),
        "--processes", str(processes), "--alarm-share", str(alarm_share),
    ]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def load_summary(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed: {err.decode(errors='replace')[-2000:]}")
    return dict(orjson.loads(out.strip().splitlines()[-1]))


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

    def stored(self) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith('gridwarden_ingest_stored_total{table="telemetry"}'):
                return float(line.split()[-1])
        return 0.0

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


def start_service(database_url: str, mqtt_url: str, root: Path, n: int) -> Service:
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
    }
    log_path = root / f"service-{n}.log"
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


def measure_ingest(
    service: Service, cap_s: float, backlog: int, progress: Callable[[str], None]
) -> float:
    """Committed telemetry rows per second over a steady window of the backlog drain."""
    start = time.monotonic()
    samples: list[tuple[float, float]] = []
    while True:
        now, stored = time.monotonic(), service.stored()
        service.vm_hwm_kb()
        samples.append((now, stored))
        if stored > 0 and not any(s for _, s in samples[:-1]):
            progress(f"ingest: first rows committed {now - start:.1f} s after start")
        active = [(t, s) for t, s in samples if s > 0]
        if active:
            t_first = active[0][0]
            if now - t_first >= WARMUP_S + cap_s or stored >= backlog * 0.98:
                break
            if len(samples) > 4 and samples[-5][1] == stored and stored > 0:
                break  # nothing more committed for 2 s: drained (or stuck)
        elif now - start > 120:
            raise RuntimeError("the service committed nothing within 120 s")
        time.sleep(0.5)
    t_first = next(t for t, s in samples if s > 0)
    window = [(t, s) for t, s in samples if t >= t_first + WARMUP_S] or samples
    # Up to the last increase (the drain may end inside the window).
    end = max(range(len(window)), key=lambda k: (window[k][1], -k))
    (t0, s0), (t1, s1) = window[0], window[end]
    if t1 <= t0:  # drained within the warm-up: the whole run
        (t0, s0), (t1, s1) = samples[0], samples[-1]
    progress(f"ingest: {s1 - s0:,.0f} rows over {t1 - t0:.1f} s (of {stored:,.0f} committed)")
    return (s1 - s0) / (t1 - t0) if t1 > t0 else 0.0


# --------------------------------------------------------------------------- latency
def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[k]


@dataclass
class LatencyResult:
    probes: int = 0
    alarm_ms: list[float] = field(default_factory=list)
    notify_ms: list[float] = field(default_factory=list)
    alarm_missing: int = 0
    notify_missing: int = 0
    load: dict[str, Any] = field(default_factory=dict)


async def latency_phase(
    mqtt_url: str, database_url: str, config: BenchConfig, *, rate: float, probes: list[int],
    seq_base: int, grace_s: float, progress: Callable[[str], None], label: str,
) -> LatencyResult:  # fmt: skip
    host, port = _host_port(mqtt_url)
    sent_at: dict[str, float] = {}
    alarm_seen: dict[str, float] = {}
    notify_seen: dict[str, float] = {}
    result = LatencyResult(probes=len(probes))
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
        interval = max(config.duration - 1.5, 0.5) / max(len(probes), 1)
        for n, i in enumerate(probes):
            d = device_id(i)
            topic = f"{PREFIX}/dev/{d}/telemetry"
            now = time.time()
            sent_at[d] = now
            publisher.publish(topic, alarm_payload(seq_base + 10**9 + n, now), qos=1)
            await asyncio.sleep(interval)
        result.load = await asyncio.to_thread(load_summary, load, config.duration + 120)
        progress(
            f"{label}: load sent {result.load['sent']:,} msgs in {result.load['elapsed_s']:.1f}"
            f" s ({result.load['sent'] / max(result.load['elapsed_s'], 1e-9):,.0f}/s); "
            "waiting for the probes"
        )
        probing_done = True
        check()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_seen.wait(), grace_s)
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
        if d in alarm_seen:
            result.alarm_ms.append((alarm_seen[d] - t) * 1000)
        else:
            result.alarm_missing += 1
            result.alarm_ms.append(waited * 1000)
        if d in notify_seen:
            result.notify_ms.append((notify_seen[d] - t) * 1000)
        else:
            result.notify_missing += 1
            result.notify_ms.append(waited * 1000)
    return result


# --------------------------------------------------------------------------- the run
@contextlib.contextmanager
def _services(progress: Callable[[str], None]) -> Iterator[tuple[str, str, Path]]:
    from gridwarden.embedded import EmbeddedMosquitto, EmbeddedPostgres

    root = Path(tempfile.mkdtemp(prefix="gridwarden-bench-"))
    root.chmod(0o711)  # the servers' unprivileged account must traverse it
    postgres = EmbeddedPostgres(root / "data")
    mosquitto = EmbeddedMosquitto(root / "data")
    try:
        progress("starting PostgreSQL and Mosquitto")
        dsn = postgres.start()
        url = mosquitto.start()
        yield dsn, url, root
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


def run_bench(config: BenchConfig, console: Console) -> dict[str, Any]:
    from gridwarden.migrate import migrate

    progress = Progress(console)
    t_start = time.monotonic()
    out: dict[str, Any] = {"devices": config.devices, "duration_s": config.duration}
    backlog = int(min(max(config.duration * BACKLOG_RATE_GUESS, BACKLOG_MIN), BACKLOG_MAX))
    with _services(progress) as (dsn, mqtt_url, root):
        asyncio.run(migrate(dsn))

        async def do_seed() -> int:
            conn = await asyncpg.connect(dsn)
            try:
                return await seed(conn, config.devices)
            finally:
                await conn.close()

        t = time.monotonic()
        workers = asyncio.run(do_seed())
        progress(f"registered {config.devices:,} devices and {workers} workers "
                 f"in {time.monotonic() - t:.1f} s")  # fmt: skip

        # 1. One stream, queued for three sessions.
        for client_id in (AIOMQTT_CLIENT_ID, PAHO_CLIENT_ID, SERVICE_CLIENT_ID):
            prepare_session(mqtt_url, client_id, subscribe=True)
        progress(f"publishing a backlog of {backlog:,} messages (QoS 1, "
                 f"{config.load_processes} paho processes)")  # fmt: skip
        summary = load_summary(
            run_load_process(mqtt_url, config.devices, processes=config.load_processes,
                             count=backlog, qos=1, seq_base=0),
            timeout=600,
        )  # fmt: skip
        progress(f"backlog: {summary['acked']:,} acknowledged by the broker in "
                 f"{summary['elapsed_s']:.1f} s")  # fmt: skip

        # 2. Baselines.
        progress("baseline: bare aiomqtt consumer draining the backlog")
        aio = asyncio.run(drain_aiomqtt(mqtt_url, backlog, config.duration))
        prepare_session(mqtt_url, AIOMQTT_CLIENT_ID, subscribe=False)
        progress(f"aiomqtt: {aio.received:,} msgs, {aio.rate:,.0f} msg/s")
        progress("baseline: bare paho-mqtt consumer (manual acks) draining the backlog")
        pah = drain_paho(mqtt_url, backlog, config.duration)
        prepare_session(mqtt_url, PAHO_CLIENT_ID, subscribe=False)
        progress(f"paho-mqtt: {pah.received:,} msgs, {pah.rate:,.0f} msg/s")
        out["baseline_aiomqtt_msgs_per_s"] = round(aio.rate, 1)
        out["baseline_paho_msgs_per_s"] = round(pah.rate, 1)
        fastest = max((aio.rate, "aiomqtt"), (pah.rate, "paho-mqtt"))
        out["baseline_fastest_msgs_per_s"] = round(fastest[0], 1)
        out["baseline_fastest_client"] = fastest[1]

        # 3. Ingest.
        progress("ingest: starting `gridwarden up` on the queued backlog")
        service = start_service(dsn, mqtt_url, root, 1)
        try:
            ingest = measure_ingest(service, config.duration, backlog, progress)
        finally:
            rss1 = service.stop()
        prepare_session(mqtt_url, SERVICE_CLIENT_ID, subscribe=False)  # drop the rest
        out["ingest_msgs_per_s"] = round(ingest, 1)
        out["backlog_messages"] = backlog

        # 4./5. Latency.
        pool = probe_pool(config.devices)
        per_phase = max(1, min(int(PROBE_RATE * config.duration), len(pool) // 2))
        half = max(ingest / 2, 1.0)
        progress("latency: restarting the service")
        service = start_service(dsn, mqtt_url, root, 2)
        try:
            progress(f"latency: load at {half:,.0f} msg/s (half of ingest), "
                     f"{per_phase} alarm probes")  # fmt: skip
            half_res = asyncio.run(latency_phase(
                mqtt_url, dsn, config, rate=half, probes=pool[:per_phase], seq_base=10**12,
                grace_s=30.0, progress=progress, label="half",
            ))  # fmt: skip
            service.vm_hwm_kb()
            progress("saturated: load as fast as possible, the same probes")
            sat_res = asyncio.run(latency_phase(
                mqtt_url, dsn, config, rate=0.0, probes=pool[per_phase:2 * per_phase],
                seq_base=2 * 10**12, grace_s=max(60.0, 4 * config.duration),
                progress=progress, label="saturated",
            ))  # fmt: skip
        finally:
            rss2 = service.stop()
        out["alarm_latency_ms_p50"] = round(_percentile(half_res.alarm_ms, 50), 1)
        out["alarm_latency_ms_p99"] = round(_percentile(half_res.alarm_ms, 99), 1)
        out["alarm_latency_ms_p99_saturated"] = round(_percentile(sat_res.alarm_ms, 99), 1)
        out["alarm_latency_ms_p50_saturated"] = round(_percentile(sat_res.alarm_ms, 50), 1)
        out["case_notify_latency_ms_p50"] = round(_percentile(half_res.notify_ms, 50), 1)
        out["case_notify_latency_ms_p99"] = round(_percentile(half_res.notify_ms, 99), 1)
        out["case_notify_latency_ms_p99_saturated"] = round(_percentile(sat_res.notify_ms, 99), 1)
        out["latency_probes"] = half_res.probes
        out["latency_probes_saturated"] = sat_res.probes
        out["probes_missing"] = {
            "alarm": half_res.alarm_missing, "notify": half_res.notify_missing,
            "alarm_saturated": sat_res.alarm_missing, "notify_saturated": sat_res.notify_missing,
        }  # fmt: skip
        out["half_rate_target_msgs_per_s"] = round(half, 1)
        out["half_rate_sent_msgs_per_s"] = round(
            half_res.load["sent"] / max(half_res.load["elapsed_s"], 1e-9), 1
        )
        out["saturated_sent_msgs_per_s"] = round(
            sat_res.load["sent"] / max(sat_res.load["elapsed_s"], 1e-9), 1
        )
        out["peak_rss_mb"] = round(max(rss1, rss2) / 1024, 1)
        out["qos"] = config.qos
        out["postgres_version"] = _server_versions(dsn)
    out["ratio_ingest_to_aiomqtt"] = round(ingest / aio.rate, 3) if aio.rate else None
    out["ratio_ingest_to_fastest"] = round(ingest / fastest[0], 3) if fastest[0] else None
    out["wall_s"] = round(time.monotonic() - t_start, 1)
    return out


def render_table(result: dict[str, Any], console: Console) -> None:
    table = Table(title="gridwarden bench")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        shown = f"{value:,.1f}" if isinstance(value, float) else str(value)
        table.add_row(key, shown)
    console.print(table)


def main(devices: int, duration: float, as_json: bool, qos: int) -> None:
    """Entry point for `gridwarden bench` (see gridwarden/cli.py)."""
    err = Console(stderr=True)
    result = run_bench(BenchConfig(devices=devices, duration=duration, qos=qos), err)
    if as_json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        render_table(result, Console())
