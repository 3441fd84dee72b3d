"""A fast MQTT load generator for `gridwarden bench`.

Not the simulator (`device_sim.fleet`): no scenarios, no clocks, just telemetry as fast as
possible or at a target rate, from one or more *separate OS processes* (`multiprocessing`,
fork), so the publisher does not share a Python interpreter (or its GIL) with the consumer
it is measuring.

No MQTT library on the hot path. paho-mqtt spends ~40 µs of Python per QoS-1 publish
(a message-info object, a lock, a packet dict, and in its threaded mode one wake-up byte
sent over a loopback TCP socket pair per message): two paho processes peaked at ~9k msg/s
on the bench machine. Here each process speaks MQTT 3.1.1 on a plain blocking socket:
every PUBLISH is assembled from pre-encoded pieces (fixed header byte, the device's
length-prefixed topic, packet id, and a per-kind payload template with only `seq` and
`ts` filled in, `bytes % (seq, ts)`), a batch of them goes out in ONE `sendall`, and a
reader thread counts the PUBACKs (one `recv` returns hundreds). At QoS 1 at most
`MAX_UNACKED` messages per process are unacknowledged (packet ids 1..65535 never collide);
at QoS 0 a message counts as acknowledged once written. The broker, not Python, is then
the limit. With `--rate 0` (as fast as possible) and no `--processes`, one process per
CPU is used.

Devices are the bench's synthetic fleet: `device_id(i)` for i in 0..N-1, kind
`KINDS[i % 4]`. A controlled share of messages is alarm-triggering (smoke `alarm: true`,
manhole tilt 30°, bin fill 92 %); those go only to devices of the lower half
(`i < N // 2`), so the upper half's smoke detectors stay fresh for latency probes.
(`--alarm-fleet N` keeps them on the first N devices' lower half whatever the fleet size.)
`seq` is `seq_base + message index`: unique per message, so nothing is a duplicate.

Run as ``python -m device_sim.load --mqtt-url mqtt://127.0.0.1:PORT --devices 1000
--count 100000`` (or ``--duration 20 --rate 5000``); the last line on stdout is a JSON
summary: sent, acked, elapsed_s (first to last publish), drained_s (to the last PUBACK),
processes.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import queue
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import Final
from urllib.parse import urlparse

import orjson

KINDS: Final = ("smoke_detector", "manhole_cover", "door_access", "smart_bin")
MAX_UNACKED: Final = 20_000  # per process, < 65535 packet ids
MAX_BATCH: Final = 256  # PUBLISH packets per sendall
BATCH_PERIOD_S: Final = 0.005  # at a target rate: one write per ~5 ms of traffic
ACK_WAIT_S: Final = 60.0
CONNECT_TIMEOUT_S: Final = 10.0
KEEPALIVE_S: Final = 0  # we never go quiet for long; no PINGREQ to schedule

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
# What a smoke detector sends on its event channel when it goes into alarm (rule
# `smoke.alarm`, like telemetry `alarm: true`).
ALARM_EVENT: Final = b'{"seq":%d,"ts":%d,"event":"alarm"}'


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
    """A smoke detector's alarm reading (telemetry `alarm: true`)."""
    return ALARM["smoke_detector"] % (seq, int(ts))


def alarm_event_payload(seq: int, ts: float) -> bytes:
    """A smoke detector's alarm event (`gw/dev/{id}/event`)."""
    return ALARM_EVENT % (seq, int(ts))


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
    processes: int = 0  # 0: one per CPU at rate 0, else 2
    client_prefix: str = "bench-load"
    alarm_fleet: int = 0  # alarm readings go to the alarm pool of the first N (0: all)


def default_processes(rate: float) -> int:
    return max(1, os.cpu_count() or 1) if rate <= 0 else 2


# --------------------------------------------------------------------------- MQTT 3.1.1 bytes
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def connect_packet(client_id: str, keepalive: int = KEEPALIVE_S) -> bytes:
    """CONNECT, MQTT 3.1.1, clean session (a publisher keeps no state)."""
    body = _utf8("MQTT") + bytes([4, 0x02]) + struct.pack("!H", keepalive) + _utf8(client_id)
    return b"\x10" + _varint(len(body)) + body


DISCONNECT: Final = b"\xe0\x00"


class PacketBuilder:
    """PUBLISH packets from pre-encoded pieces; only the payload and packet id vary."""

    def __init__(self, topics: list[str], qos: int) -> None:
        self.qos = qos
        self.first = b"\x32" if qos else b"\x30"
        self.topics = [_utf8(t) for t in topics]
        self.extra = 2 if qos else 0  # the packet id
        self._varints = [_varint(n) for n in range(16_384)]

    def publish(self, device: int, payload: bytes, mid: int) -> bytes:
        topic = self.topics[device]
        remaining = len(topic) + self.extra + len(payload)
        header = self.first + (
            self._varints[remaining] if remaining < 16_384 else _varint(remaining)
        )
        if self.qos:
            return b"".join((header, topic, mid.to_bytes(2, "big"), payload))
        return b"".join((header, topic, payload))


class AckCounter(threading.Thread):
    """Reads what the broker sends a publisher (CONNACK, then PUBACKs) and counts PUBACKs."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.acked = 0
        self.connack: int | None = None
        self.connected = threading.Event()
        self.closed = threading.Event()

    def run(self) -> None:
        buffer = b""
        try:
            while True:
                data = self.sock.recv(1 << 16)
                if not data:
                    break
                buffer += data
                pos, acked = 0, 0
                while (packet := _next_packet(buffer, pos)) is not None:
                    kind, body, pos = packet
                    if kind == 4:
                        acked += 1
                    elif kind == 2 and len(buffer) > body + 1:
                        self.connack = buffer[body + 1]
                        self.connected.set()
                buffer = buffer[pos:]
                if acked:
                    self.acked += acked  # one writer (this thread); readers see it grow
        except OSError:
            pass
        finally:
            self.closed.set()
            self.connected.set()


def _next_packet(buffer: bytes, pos: int) -> tuple[int, int, int] | None:
    """(packet type, offset of its body, offset of the next packet), or None if the
    buffer does not hold the whole packet at `pos`."""
    end = len(buffer)
    k, length, mult = pos + 1, 0, 1
    while True:
        if k >= end:
            return None
        byte = buffer[k]
        length += (byte & 0x7F) * mult
        mult *= 128
        k += 1
        if not byte & 0x80:
            break
    if end < k + length:
        return None
    return buffer[pos] >> 4, k, k + length


def _host_port(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    return parsed.hostname or "127.0.0.1", parsed.port or 1883


def _publish_part(spec: LoadSpec, part: int, start_at: float, out: mp.Queue) -> None:  # type: ignore[type-arg]
    host, port = _host_port(spec.mqtt_url)
    topics = [f"{spec.prefix}/dev/{device_id(i)}/telemetry" for i in range(spec.devices)]
    builder = PacketBuilder(topics, spec.qos)
    normal = [NORMAL[kind_of(i)] for i in range(spec.devices)]
    alarms = alarm_pool(min(spec.alarm_fleet, spec.devices) if spec.alarm_fleet else spec.devices)
    every = round(1 / spec.alarm_share) if spec.alarm_share > 0 and alarms else 0

    sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = AckCounter(sock)
    reader.start()
    sock.sendall(connect_packet(f"{spec.client_prefix}-{part}"))
    if not reader.connected.wait(CONNECT_TIMEOUT_S) or reader.connack != 0:
        raise RuntimeError(f"the broker refused or ignored our CONNECT ({reader.connack})")

    step = spec.processes
    per_process_rate = spec.rate / spec.processes if spec.rate > 0 else 0.0
    batch_size = (
        max(1, min(MAX_BATCH, int(per_process_rate * BATCH_PERIOD_S)))
        if per_process_rate
        else MAX_BATCH
    )
    window = MAX_UNACKED if spec.qos else 0
    while time.time() < start_at:
        time.sleep(0.001)
    t0 = time.monotonic()
    sent = 0
    i = part
    seq_base = spec.seq_base
    publish = builder.publish
    batch: list[bytes] = []
    while True:
        if spec.count and i >= spec.count:
            break
        now = time.monotonic()
        if spec.duration_s and now - t0 >= spec.duration_s:
            break
        if per_process_rate:
            ahead = t0 + sent / per_process_rate - now
            if ahead > 0:
                time.sleep(ahead)
        while window and sent - reader.acked > window and not reader.closed.is_set():
            time.sleep(0.0005)
        if reader.closed.is_set():
            raise RuntimeError("the broker closed the connection")
        ts = int(time.time())
        for _ in range(batch_size):
            if spec.count and i >= spec.count:
                break
            if every and i % every == 0:
                d = alarms[(i // every) % len(alarms)]
                payload = ALARM[kind_of(d)] % (seq_base + i, ts)
            else:
                d = i % spec.devices
                payload = normal[d] % (seq_base + i, ts)
            sent += 1
            batch.append(publish(d, payload, sent % 65535 + 1))
            i += step
        sock.sendall(b"".join(batch))
        batch.clear()
    elapsed = time.monotonic() - t0
    if spec.qos:
        deadline = time.monotonic() + ACK_WAIT_S
        while reader.acked < sent and time.monotonic() < deadline:
            if reader.closed.is_set():
                break
            time.sleep(0.002)
    drained = time.monotonic() - t0
    acked = reader.acked if spec.qos else sent
    with contextlib.suppress(OSError):
        sock.sendall(DISCONNECT)
        sock.shutdown(socket.SHUT_WR)
    reader.closed.wait(5)
    sock.close()
    out.put({"sent": sent, "acked": acked, "elapsed_s": elapsed, "drained_s": drained})


def run_load(spec: LoadSpec) -> dict[str, float]:
    """Publish with `spec.processes` forked processes; returns the summed summary."""
    if not spec.count and not spec.duration_s:
        raise ValueError("give a count or a duration")
    if spec.qos not in (0, 1):
        raise ValueError("qos must be 0 or 1")
    if spec.processes <= 0:
        spec = replace(spec, processes=default_processes(spec.rate))
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
    results: list[dict[str, float]] = []
    limit = (spec.duration_s or 0) + ACK_WAIT_S + 600
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=1.0))
        except queue.Empty:  # a publisher that died never reports
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead or time.monotonic() - t0 > limit:
                for proc in procs:
                    if proc.is_alive():
                        proc.kill()
                codes = [p.exitcode for p in procs]
                raise RuntimeError(f"a publisher process failed (exit codes {codes})") from None
    for proc in procs:
        proc.join()
    sent = sum(r["sent"] for r in results)
    return {
        "sent": sent,
        "acked": sum(r["acked"] for r in results),
        "elapsed_s": max(r["elapsed_s"] for r in results),
        "drained_s": max(r["drained_s"] for r in results),
        "wall_s": time.monotonic() - t0,
        "processes": spec.processes,
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
    parser.add_argument(
        "--processes", type=int, default=0, help="0: one per CPU at --rate 0, else 2"
    )
    parser.add_argument("--client-prefix", default="bench-load")
    parser.add_argument(
        "--alarm-fleet", type=int, default=0,
        help="alarm readings only to devices among the first N (0: the lower half of all)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    spec = LoadSpec(
        mqtt_url=args.mqtt_url, prefix=args.prefix, devices=args.devices, count=args.count,
        duration_s=args.duration, rate=args.rate, qos=args.qos, alarm_share=args.alarm_share,
        seq_base=args.seq_base, processes=args.processes, client_prefix=args.client_prefix,
        alarm_fleet=args.alarm_fleet,
    )  # fmt: skip
    try:
        summary = run_load(spec)
    except (ValueError, RuntimeError) as exc:
        print(f"load: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(orjson.dumps(summary).decode() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
