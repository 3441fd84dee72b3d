"""Where a machine's cores go over a window: the machine from /proc/stat, named groups of
processes (the service, PostgreSQL, the broker) from /proc/<pid>/stat. The benchmark's
evidence of what bounds a figure: one process at a core while the others idle, or every
core busy."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
# /proc/stat's cpu line: user nice system idle iowait irq softirq steal …
_IDLE_FIELDS: Final = (3, 4)
_BUSY_FIELDS: Final = (0, 1, 2, 5, 6, 7)


def _stat_fields(pid: int | str) -> list[str]:
    """/proc/<pid>/stat after the command name (which may hold spaces and parentheses):
    state, ppid, … (field 3 onwards of proc(5))."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


def process_cpu_s(pid: int) -> float | None:
    """utime + stime of a process so far (all its threads); None once it is gone."""
    try:
        fields = _stat_fields(pid)
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def with_children(pid: int) -> list[int]:
    """`pid` and its children (PostgreSQL: the postmaster and every backend)."""
    found = [pid]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(_stat_fields(entry.name)[1]) == pid:
                found.append(int(entry.name))
    return found


@dataclass(frozen=True)
class CpuSample:
    at: float  # time.monotonic()
    busy_s: float  # all cores together, since boot
    idle_s: float
    by_group: dict[str, dict[int, float]]  # group → pid → its CPU seconds so far


def sample(at: float, groups: dict[str, list[int]]) -> CpuSample:
    fields = [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    by_group = {
        name: {pid: cpu for pid in pids if (cpu := process_cpu_s(pid)) is not None}
        for name, pids in groups.items()
    }
    return CpuSample(
        at,
        sum(fields[i] for i in _BUSY_FIELDS) / CLOCK_TICKS,
        sum(fields[i] for i in _IDLE_FIELDS) / CLOCK_TICKS,
        by_group,
    )


def cpu_seconds(first: CpuSample, last: CpuSample) -> dict[str, float]:
    """CPU seconds each group used between two samples. A process that started in between
    counts from its start; one that ended in between is missed."""
    used: dict[str, float] = {}
    for name, now in last.by_group.items():
        before = first.by_group.get(name, {})
        used[name] = sum(cpu - before.get(pid, 0.0) for pid, cpu in now.items())
    return used


def cores_used(first: CpuSample, last: CpuSample) -> dict[str, float]:
    """Cores each group used between two samples (CPU seconds per second), then `other`
    (busy, but none of the groups: the load, the bench, the rest of the machine) and
    `idle`. They add up to the machine's cores (what a process that ended in between used
    is in `other`)."""
    wall = last.at - first.at
    if wall <= 0:
        return {}
    used = {name: seconds / wall for name, seconds in cpu_seconds(first, last).items()}
    busy = (last.busy_s - first.busy_s) / wall
    # Ticks are counted apart for the machine and each process: `other` can come out a
    # hair below zero.
    used["other"] = max(busy - sum(used.values()), 0.0)
    used["idle"] = (last.idle_s - first.idle_s) / wall
    return {name: round(cores, 3) for name, cores in used.items()}
