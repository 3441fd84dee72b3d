"""Where the cores go (gridwarden/cpu_usage.py): the bench's split of CPU time by group."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from gridwarden import cpu_usage
from gridwarden.cpu_usage import CpuSample


def test_cores_are_the_deltas_per_second_with_other_and_idle_the_rest() -> None:
    first = CpuSample(10.0, 100.0, 50.0, {"service": {1: 5.0}, "postgres": {2: 1.0, 3: 2.0}})
    # Two seconds later: the service used 1.8 s, backend 3 0.4 s, a new backend 4 0.2 s
    # since it started; the machine 3 s busy and 1 s idle of its 4 core-seconds.
    last = CpuSample(12.0, 103.0, 51.0, {"service": {1: 6.8}, "postgres": {2: 1.0, 3: 2.4, 4: 0.2}})
    assert cpu_usage.cores_used(first, last) == {
        "service": 0.9, "postgres": 0.3, "other": 0.3, "idle": 0.5,
    }  # fmt: skip


def test_cpu_seconds_are_each_groups_deltas_a_new_process_counted_from_its_start() -> None:
    first = CpuSample(10.0, 100.0, 50.0, {"service": {1: 5.0}, "postgres": {2: 1.0, 3: 2.0}})
    last = CpuSample(12.0, 103.0, 51.0, {"service": {1: 6.8}, "postgres": {2: 1.0, 3: 2.4, 4: 0.2}})
    seconds = cpu_usage.cpu_seconds(first, last)
    assert seconds.keys() == {"service", "postgres"}
    assert round(seconds["service"], 9) == 1.8
    assert round(seconds["postgres"], 9) == 0.6


def test_other_never_goes_below_zero_and_an_empty_window_says_nothing() -> None:
    first = CpuSample(0.0, 10.0, 0.0, {"service": {1: 0.0}})
    last = CpuSample(1.0, 10.99, 1.0, {"service": {1: 1.0}})  # ticks counted apart
    assert cpu_usage.cores_used(first, last)["other"] == 0.0
    assert cpu_usage.cores_used(first, first) == {}


def test_a_busy_process_shows_as_its_group_and_the_parts_add_up_to_the_machine() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        me = os.getpid()
        assert child.pid in cpu_usage.with_children(me)
        assert cpu_usage.with_children(me)[0] == me
        groups = {"test": [me], "child": [child.pid]}
        first = cpu_usage.sample(time.monotonic(), groups)
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:  # one core, busy
            sum(range(1000))
        last = cpu_usage.sample(time.monotonic(), groups)
    finally:
        child.kill()
        child.wait()
    cores = cpu_usage.cores_used(first, last)
    # One thread: at most one core; well under it when the machine's other work (CI runs
    # tests alongside) takes turns on that core.
    assert 0.2 < cores["test"] <= 1.05, cores
    assert cores["child"] < 0.1  # asleep
    cpus = os.cpu_count() or 1
    assert abs(sum(cores.values()) - cpus) < 0.25 * cpus, cores
    assert cpu_usage.process_cpu_s(child.pid) is None  # gone
