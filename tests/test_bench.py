"""`gridwarden bench` end to end with tiny parameters: every key, plausible values.

Not a speed test: it asserts that each figure was measured (positive, finite, in a sane
range), never how fast anything is.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from device_sim.load import ALARM, NORMAL, alarm_pool, kind_of, probe_pool

REQUIRED = (
    "baseline_aiomqtt_msgs_per_s", "baseline_fastest_msgs_per_s", "ingest_msgs_per_s",
    "alarm_latency_ms_p50", "alarm_latency_ms_p99", "alarm_latency_ms_p99_saturated",
    "case_notify_latency_ms_p99", "peak_rss_mb", "devices", "duration_s",
)  # fmt: skip


def test_probe_devices_never_get_alarm_readings_from_the_load() -> None:
    probes, alarms = set(probe_pool(400)), set(alarm_pool(400))
    assert probes
    assert not probes & alarms
    assert all(kind_of(i) == "smoke_detector" for i in probes)
    for kind, template in {**NORMAL, **ALARM}.items():
        assert json.loads(template % (7, 1_700_000_000))["seq"] == 7, kind


@pytest.mark.timeout(180)
def test_bench_json_has_every_figure() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gridwarden", "bench", "--devices", "200", "--duration", "2",
         "--json"],
        capture_output=True, text=True, timeout=170,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # --json: only the object on stdout
    result = json.loads(lines[0])
    for key in REQUIRED:
        value = result[key]
        assert isinstance(value, int | float), key
        assert math.isfinite(value), key
        assert value > 0, (key, value)
    assert result["devices"] == 200
    assert result["duration_s"] == 2
    assert result["baseline_fastest_msgs_per_s"] >= result["baseline_aiomqtt_msgs_per_s"]
    assert result["baseline_fastest_client"] in {"aiomqtt", "paho-mqtt"}
    assert result["alarm_latency_ms_p50"] <= result["alarm_latency_ms_p99"]
    assert 1 < result["peak_rss_mb"] < 64 * 1024
    assert result["latency_probes"] > 0
    # Every probe was seen: a missing one would be counted at the grace period's end.
    assert result["probes_missing"] == {
        "alarm": 0, "notify": 0, "alarm_saturated": 0, "notify_saturated": 0,
    }  # fmt: skip
