"""A fast MQTT load generator for `gridwarden bench`.

Not the simulator (`device_sim.fleet`): no scenarios, no clocks, just telemetry as fast as
possible or at a target rate. Each message is a pre-serialised per-kind template with only
`seq` and `ts` filled in (`bytes % (seq, ts)`), published with paho-mqtt's threaded loop
from one or more *separate OS processes* (`multiprocessing`, fork), so the publisher does
not share a Python interpreter (or its GIL) with the consumer it is measuring.

Devices are the bench's synthetic fleet: `device_id(i)` for i in 0..N-1, kind
`KINDS[i % 4]`. A controlled share of messages is alarm-triggering (smoke `alarm: true`,
manhole tilt 30°, bin fill 92 %); those go only to devices of the lower half
(`i < N // 2`), so the upper half's smoke detectors stay fresh for latency probes.
`seq` is `seq_base + message index`: unique per message, so nothing is a duplicate.

Run as ``python -m device_sim.load --mqtt-url mqtt://127.0.0.1:PORT --devices 1000
--count 100000`` (or ``--duration 20 --rate 5000``); the last line on stdout is a JSON
summary: sent, acked, elapsed_s.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import threading
import time
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlparse

import orjson
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

KINDS: Final = ("smoke_detector", "manhole_cover", "door_access", "smart_bin")
MAX_UNACKED: Final = 5_000  # per process: bounds paho's internal queue
ACK_WAIT_S: Final = 30.0

NORMAL: Final[dict[str, bytes]] = {
    "smoke_detector": b'{"seq":%d,"ts":%d,"smoke":0.4,"temperature":22.5,"co":1.0,'
    b'"alarm":false,"battery":87,"rssi":-71}',
    "manhole_cover": b'{"seq":%d,"ts":%d,"tilt":1.5,"open":false,"water_level":12.0,'
    b'"gas_ch4":0.2,"battery":80}',
    "door_access": b'{"seq":%d,"ts":%d,"door_open":false,"locked":true,"battery":90}',
    "smart_bin": b'{"seq":%d,"ts":%d,"fill":35.0,"temperature":21.0,"tilt":0.5,'
    b'"weight":40.0,"battery":75}',
}
ALARM: Final[dict[str, bytes]] = {
    "smoke_detector": b'{"seq":%d,"ts":%d,"smoke":18.0,"temperature":31.0,"co":4.0,'
    b'"alarm":true,"battery":87,"rssi":-71}',
    "manhole_cover": b'{"seq":%d,"ts":%d,"tilt":30.0,"open":false,"water_level":12.0,'
    b'"gas_ch4":0.2,"battery":80}',
    "smart_bin": b'{"seq":%d,"ts":%d,"fill":92.0,"temperature":21.0,"tilt":0.5,'
    b'"weight":80.0,"battery":75}',
}


def device_id(i: int) -> str:
    return f"b{i:07d}"


def kind_of(i: int) -> str:
    return KINDS[i % len(KINDS)]


def probe_pool(devices: int) -> list[int]:
    """Smoke detectors the load never sends an alarm reading to (the upper half)."""
    return [i for i in range(devices // 2, devices) if kind_of(i) == "smoke_detector"]


def alarm_pool(devices: int) -> list[int]:
    return [i for i in range(devices // 2) if kind_of(i) in ALARM]


def alarm_payload(seq: int, ts: float) -> bytes:
    """A smoke detector's alarm reading (what the bench's latency probes send)."""
    return ALARM["smoke_detector"] % (seq, int(ts))


@dataclass(frozen=True)
class LoadSpec:
    mqtt_url: str
    prefix: str = "gw"
    devices: int = 1000
    count: int = 0  # total messages (0: until duration)
    duration_s: float = 0.0  # 0: until count
    rate: float = 0.0  # messages/s over all processes (0: as fast as possible)
    qos: int = 1
    alarm_share: float = 0.01
    seq_base: int = 0
    processes: int = 2
    client_prefix: str = "bench-load"


def _host_port(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    return parsed.hostname or "127.0.0.1", parsed.port or 1883


def _publish_part(spec: LoadSpec, part: int, start_at: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    host, port = _host_port(spec.mqtt_url)
    topics = [f"{spec.prefix}/dev/{device_id(i)}/telemetry" for i in range(spec.devices)]
    normal = [NORMAL[kind_of(i)] for i in range(spec.devices)]
    alarms = alarm_pool(spec.devices)
    every = round(1 / spec.alarm_share) if spec.alarm_share > 0 and alarms else 0
    acked = 0
    lock = threading.Lock()

    def on_publish(*_: object) -> None:
        nonlocal acked
        with lock:
            acked += 1

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"{spec.client_prefix}-{part}")
    client.on_publish = on_publish
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(host, port, keepalive=60)
    client.loop_start()
    step = spec.processes
    per_process_rate = spec.rate / spec.processes if spec.rate > 0 else 0.0
    while time.time() < start_at:
        time.sleep(0.001)
    t0 = time.monotonic()
    sent = 0
    i = part
    qos = spec.qos
    publish = client.publish
    while True:
        if spec.count and i >= spec.count:
            break
        if sent % 256 == 0:
            now = time.monotonic()
            if spec.duration_s and now - t0 >= spec.duration_s:
                break
            if per_process_rate:
                ahead = t0 + sent / per_process_rate - now
                if ahead > 0:
                    time.sleep(ahead)
            while sent - acked > MAX_UNACKED:
                time.sleep(0.0005)
        ts = int(time.time())
        if every and i % every == 0:
            d = alarms[(i // every) % len(alarms)]
            payload = ALARM[kind_of(d)] % (spec.seq_base + i, ts)
        else:
            d = i % spec.devices
            payload = normal[d] % (spec.seq_base + i, ts)
        publish(topics[d], payload, qos)
        sent += 1
        i += step
    elapsed = time.monotonic() - t0
    deadline = time.monotonic() + ACK_WAIT_S
    while acked < sent and time.monotonic() < deadline:
        time.sleep(0.005)
    client.disconnect()
    client.loop_stop()
    out.put({"sent": sent, "acked": acked, "elapsed_s": elapsed})


def run_load(spec: LoadSpec) -> dict[str, float]:
    """Publish with `spec.processes` forked processes; returns the summed summary."""
    if not spec.count and not spec.duration_s:
        raise ValueError("give a count or a duration")
    ctx = mp.get_context("fork")
    out: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    start_at = time.time() + 0.5  # every process connected before the first publish
    procs = [
        ctx.Process(target=_publish_part, args=(spec, k, start_at, out), daemon=True)
        for k in range(spec.processes)
    ]
    t0 = time.monotonic()
    for proc in procs:
        proc.start()
    results = [out.get() for _ in procs]
    for proc in procs:
        proc.join()
    sent = sum(r["sent"] for r in results)
    return {
        "sent": sent,
        "acked": sum(r["acked"] for r in results),
        "elapsed_s": max(r["elapsed_s"] for r in results),
        "wall_s": time.monotonic() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m device_sim.load", description=__doc__)
    parser.add_argument("--mqtt-url", required=True)
    parser.add_argument("--prefix", default="gw")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--duration", type=float, default=0.0)
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--qos", type=int, choices=(0, 1), default=1)
    parser.add_argument("--alarm-share", type=float, default=0.01)
    parser.add_argument("--seq-base", type=int, default=0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--client-prefix", default="bench-load")
    args = parser.parse_args(argv)
    spec = LoadSpec(
        mqtt_url=args.mqtt_url, prefix=args.prefix, devices=args.devices, count=args.count,
        duration_s=args.duration, rate=args.rate, qos=args.qos, alarm_share=args.alarm_share,
        seq_base=args.seq_base, processes=args.processes, client_prefix=args.client_prefix,
    )  # fmt: skip
    try:
        summary = run_load(spec)
    except ValueError as exc:
        print(f"load: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(orjson.dumps(summary).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
