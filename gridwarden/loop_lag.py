"""How late the service's event loop runs what is due. Every socket read, timer and batch
step of the process waits in that one queue, so an alarm's latency grows with it; a
callback that holds the loop (see scripts/loop_trace) shows here as lag."""

from __future__ import annotations

import asyncio

from prometheus_client import Histogram

LAG_INTERVAL_S = 0.25
EVENT_LOOP_LAG = Histogram(
    "gridwarden_event_loop_lag_seconds",
    f"How late a {LAG_INTERVAL_S} s timer of the event loop fired: what every task of the "
    "process waited, at that moment, for its turn",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


async def measure_loop_lag(stop: asyncio.Event, interval_s: float = LAG_INTERVAL_S) -> None:
    """Until `stop`: sleep `interval_s`, observe how much later than due it woke."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        due = loop.time() + interval_s
        try:
            async with asyncio.timeout(interval_s):
                await stop.wait()
            return
        except TimeoutError:
            EVENT_LOOP_LAG.observe(max(0.0, loop.time() - due))
