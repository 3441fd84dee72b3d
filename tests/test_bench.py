"""`gridwarden bench` end to end with tiny parameters: every key, plausible values.

Not a speed test: it asserts that each figure was measured (positive, finite, in a sane
range), never how fast anything is. One run covers the default phases and a tiny
`--scaling` (one fleet size instead of 1k-1M).
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from typing import Any

import pytest

from device_sim.load import (
    ALARM,
    ALARM_EVENT,
    NORMAL,
    PacketBuilder,
    _next_packet,
    alarm_event_payload,
    alarm_pool,
    connect_packet,
    kind_of,
    probe_pool,
)
from gridwarden.bench import (
    ceiling_msgs_per_s,
    cpu_us_per_msg,
    lag_quantile_ms,
    service_budget_us,
)
from gridwarden.cpu_usage import CpuSample

REQUIRED = (
    "baseline_aiomqtt_msgs_per_s", "baseline_fastest_msgs_per_s", "ingest_msgs_per_s",
    "alarm_latency_ms_p50", "alarm_latency_ms_p99", "alarm_latency_ms_p99_saturated",
    "case_notify_latency_ms_p99", "peak_rss_mb", "devices", "duration_s",
)  # fmt: skip
BASELINES = {
    "aiomqtt": "baseline_aiomqtt_msgs_per_s",
    "paho-mqtt": "baseline_paho_msgs_per_s",
    "gmqtt": "baseline_gmqtt_msgs_per_s",
    "gridwarden-receiver": "baseline_gridwarden_receiver_msgs_per_s",
}
POSITIVE = (
    *BASELINES.values(), "alarm_latency_telemetry_ms_p50", "alarm_latency_telemetry_ms_p99",
    "alarm_latency_ms_p50_saturated", "case_notify_latency_ms_p50",
    "case_notify_latency_ms_p99_saturated", "case_notify_latency_telemetry_ms_p99",
    "backlog_publish_msgs_per_s", "half_rate_sent_msgs_per_s", "saturated_sent_msgs_per_s",
    "saturated_acked_msgs_per_s", "latency_probes", "latency_probes_telemetry",
    "latency_probes_saturated", "event_loop_lag_ms_p99", "event_loop_lag_ms_p99_saturated",
)  # fmt: skip
SCALING_SIZES = (150,)  # one size: CI time (the real run registers 1k, 10k, 100k, 1M)


def _positive(result: dict[str, Any], key: str) -> None:
    value = result[key]
    assert isinstance(value, int | float), key
    assert not isinstance(value, bool), key
    assert math.isfinite(value), key
    assert value > 0, (key, value)


def test_probe_devices_never_get_alarm_readings_from_the_load() -> None:
    probes, alarms = set(probe_pool(400)), set(alarm_pool(400))
    assert probes
    assert not probes & alarms
    assert all(kind_of(i) == "smoke_detector" for i in probes)
    for kind, template in {**NORMAL, **ALARM}.items():
        assert json.loads(template % (7, 1_700_000_000))["seq"] == 7, kind
    event = json.loads(alarm_event_payload(8, 1_700_000_000.5))
    assert event == {"seq": 8, "ts": 1_700_000_000, "event": "alarm"}
    assert json.loads(ALARM_EVENT % (1, 2))["event"] == "alarm"


def _decode_publish(packet: bytes) -> tuple[int, str, int | None, bytes]:
    """(first byte, topic, packet id, payload) of one whole PUBLISH packet."""
    kind, body, end = _next_packet(packet, 0) or (0, 0, 0)
    assert kind == 3
    assert end == len(packet)
    (size,) = struct.unpack_from("!H", packet, body)
    topic = packet[body + 2 : body + 2 + size].decode()
    pos = body + 2 + size
    mid = None
    if packet[0] & 0x06:
        (mid,) = struct.unpack_from("!H", packet, pos)
        pos += 2
    return packet[0], topic, mid, packet[pos:]


@pytest.mark.parametrize("qos", [0, 1])
def test_prebuilt_publish_packets_are_well_formed(qos: int) -> None:
    topics = ["gw/dev/b0000000/telemetry", "gw/dev/b0000001/telemetry"]
    builder = PacketBuilder(topics, qos)
    small = NORMAL["door_access"] % (3, 1_700_000_000)
    big = b'{"seq":1,"ts":2,"pad":"' + b"x" * 20_000 + b'"}'  # a 3-byte remaining length
    for device, payload in ((1, small), (0, big)):
        first, topic, mid, body = _decode_publish(builder.publish(device, payload, 65535))
        assert first == (0x32 if qos else 0x30)
        assert topic == topics[device]
        assert mid == (65535 if qos else None)
        assert body == payload


def test_ack_stream_is_split_into_whole_packets() -> None:
    stream = b"\x20\x02\x00\x00" + b"\x40\x02\x00\x01" * 3 + b"\x40\x02"  # the last is cut
    kinds, pos = [], 0
    while (packet := _next_packet(stream, pos)) is not None:
        kinds.append(packet[0])
        pos = packet[2]
    assert kinds == [2, 4, 4, 4]
    assert stream[pos:] == b"\x40\x02"
    assert connect_packet("x")[0] == 0x10


@pytest.mark.timeout(330)
def test_the_loop_lag_quantile_is_read_from_the_histogram_between_two_scrapes() -> None:
    inf = float("inf")
    before = {0.001: 10.0, 0.01: 10.0, 0.1: 10.0, inf: 10.0}
    # 100 observations between the scrapes: 97 under 1 ms, 2 under 10 ms, 1 under 100 ms.
    after = {0.001: 107.0, 0.01: 109.0, 0.1: 110.0, inf: 110.0}
    assert lag_quantile_ms(before, after, 0.5) == 1.0
    assert lag_quantile_ms(before, after, 0.99) == 10.0
    assert lag_quantile_ms(before, after, 1.0) == 100.0
    beyond = {0.001: 10.0, 0.01: 10.0, 0.1: 10.0, inf: 12.0}  # two over the largest bound
    assert lag_quantile_ms(before, beyond, 0.99) == 100.0
    assert lag_quantile_ms(before, before, 0.99) is None  # nothing observed
    assert lag_quantile_ms({}, {}, 0.99) is None


def test_cpu_per_message_is_each_groups_cpu_time_over_the_messages() -> None:
    first = CpuSample(0.0, 0.0, 0.0, {"consumer": {1: 10.0}, "broker": {2: 3.0}})
    last = CpuSample(4.0, 0.0, 0.0, {"consumer": {1: 10.5}, "broker": {2: 3.2}})
    assert cpu_us_per_msg(first, last, 100_000) == {"consumer": 5.0, "broker": 2.0}
    assert cpu_us_per_msg(first, last, 0) == {}  # nothing received: no figure


def test_the_ceiling_is_where_postgres_and_the_broker_alone_fill_every_core() -> None:
    # Over 2 s, 40,000 messages committed while the service used 1.8 s of CPU, PostgreSQL
    # 0.6 s and the broker 0.2 s: 45, 15 and 5 µs a message. 20 µs a message fills two
    # cores at 100,000 msg/s, whatever the service costs.
    first = CpuSample(
        0.0, 0.0, 0.0, {"service": {1: 0.0}, "postgres": {2: 0.0}, "broker": {3: 0.0}}
    )
    last = CpuSample(2.0, 0.0, 0.0, {"service": {1: 1.8}, "postgres": {2: 0.6}, "broker": {3: 0.2}})
    per_msg = cpu_us_per_msg(first, last, 40_000)
    assert per_msg == {"service": 45.0, "postgres": 15.0, "broker": 5.0}
    assert ceiling_msgs_per_s(per_msg, 2) == 100_000.0
    assert ceiling_msgs_per_s(per_msg, 4) == 200_000.0
    assert ceiling_msgs_per_s({}, 2) is None  # nothing measured: no bound claimed
    # At 50,000 msg/s two cores give 40 µs a message, 20 of them PostgreSQL's and the
    # broker's: 20 left for the service. At 200,000 msg/s they alone need more than all.
    assert service_budget_us(per_msg, 2, 50_000) == 20.0
    assert service_budget_us(per_msg, 2, 200_000) == -10.0
    assert service_budget_us(per_msg, 2, 0) is None
    assert service_budget_us({}, 2, 50_000) is None


def test_bench_json_has_every_figure() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gridwarden", "bench", "--devices", "200", "--duration", "1.5",
         "--json", "--scaling", "--scaling-devices", ",".join(map(str, SCALING_SIZES)),
         "--processes", "1,2"],
        capture_output=True, text=True, timeout=320,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # --json: only the object on stdout
    result = json.loads(lines[0])
    for key in (*REQUIRED, *POSITIVE):
        _positive(result, key)
    assert result["devices"] == 200
    assert result["duration_s"] == 1.5
    rates = {name: result[key] for name, key in BASELINES.items()}
    assert result["baseline_fastest_msgs_per_s"] == max(rates.values())
    assert rates[result["baseline_fastest_client"]] == max(rates.values())
    assert result["alarm_latency_ms_p50"] <= result["alarm_latency_ms_p99"]
    assert result["alarm_latency_telemetry_ms_p50"] <= result["alarm_latency_telemetry_ms_p99"]
    assert result["alarm_latency_ms_p50_saturated"] <= result["alarm_latency_ms_p99_saturated"]
    assert 1 < result["peak_rss_mb"] < 64 * 1024
    assert result["baseline_aiomqtt_read_ahead_max"] >= 0
    # Every probe was seen: a missing one would be counted at the grace period's end.
    assert result["probes_missing"] == {
        "alarm": 0, "notify": 0, "alarm_telemetry": 0, "notify_telemetry": 0,
        "alarm_saturated": 0, "notify_saturated": 0,
    }  # fmt: skip

    # Where the cores went while ingesting: the service busy, the parts the whole machine.
    cores = result["ingest_cpu_cores"]
    assert list(cores) == ["service", "postgres", "broker", "other", "idle"]
    assert cores["service"] > 0
    assert all(value >= 0 for value in cores.values())
    cpus = os.cpu_count() or 1
    assert abs(sum(cores.values()) - cpus) < 0.25 * cpus, cores
    # The same window per committed message, and the bound PostgreSQL and the broker set.
    per_msg = result["ingest_cpu_us_per_msg"]
    assert list(per_msg) == ["service", "postgres", "broker"]
    assert per_msg["service"] > 0
    assert per_msg["postgres"] > 0
    ceiling = result["ingest_ceiling_msgs_per_s"]
    assert ceiling == ceiling_msgs_per_s(per_msg, cpus)
    assert result["ratio_ceiling_to_fastest"] == round(
        ceiling / result["baseline_fastest_msgs_per_s"], 3
    )
    assert result["service_budget_us_at_half_fastest"] == service_budget_us(
        per_msg, cpus, result["baseline_fastest_msgs_per_s"] / 2
    )
    # The fastest bare consumer's own CPU a message, and the broker's for it.
    fastest_cost = result["baseline_fastest_cpu_us_per_msg"]
    assert list(fastest_cost) == ["consumer", "broker"]
    assert fastest_cost["consumer"] > 0

    # Two processes share the two ingest shards, one each, and both commit.
    assert [row["processes"] for row in result["by_processes"]] == [1, 2]
    assert [row["shards_owned"] for row in result["by_processes"]] == [[1], [1, 1]]
    for row in result["by_processes"]:
        _positive(row, "ingest_msgs_per_s")
        assert row["cpu_cores"]["service"] > 0

    scaling = result["scaling"]
    assert [row["devices"] for row in scaling["by_devices"]] == list(SCALING_SIZES)
    assert scaling["backlog_messages"] > 0
    for row in scaling["by_devices"]:
        for key in ("ingest_msgs_per_s", "peak_rss_mb", "publish_msgs_per_s"):
            _positive(row, key)
    assert scaling["cpu_devices"] == 200
    assert [row["load_share"] for row in scaling["cpu_per_message"]] == [0.25, 0.5, 1.0]
    for row in scaling["cpu_per_message"]:
        for key in ("target_msgs_per_s", "sent_msgs_per_s", "committed_msgs_per_s",
                    "cpu_s", "cpu_us_per_msg"):  # fmt: skip
            _positive(row, key)
