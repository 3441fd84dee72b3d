"""The event-loop lag metric: a callback that holds the loop shows as lag."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import REGISTRY

from gridwarden.loop_lag import measure_loop_lag


def _observed() -> tuple[float, float]:
    count = REGISTRY.get_sample_value("gridwarden_event_loop_lag_seconds_count") or 0.0
    total = REGISTRY.get_sample_value("gridwarden_event_loop_lag_seconds_sum") or 0.0
    return count, total


async def test_a_callback_holding_the_loop_is_measured_as_lag() -> None:
    stop = asyncio.Event()
    count_before, sum_before = _observed()
    task = asyncio.create_task(measure_loop_lag(stop, interval_s=0.05))
    await asyncio.sleep(0.12)  # two quiet intervals
    quiet_count, quiet_sum = _observed()
    time.sleep(0.3)  # noqa: ASYNC251  # holds the loop: the timer due meanwhile fires late
    await asyncio.sleep(0.12)
    stop.set()
    await asyncio.wait_for(task, 1)
    count_after, sum_after = _observed()
    assert quiet_count - count_before >= 1
    assert quiet_sum - sum_before < 0.1 * (quiet_count - count_before)  # quiet: little lag
    assert sum_after - quiet_sum >= 0.2
    assert count_after > quiet_count


async def test_it_returns_as_soon_as_asked_to_stop() -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(measure_loop_lag(stop, interval_s=60))
    await asyncio.sleep(0)
    stop.set()
    await asyncio.wait_for(task, 1)
