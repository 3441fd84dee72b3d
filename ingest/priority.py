"""The event lane first: while an alarm event's batch is in flight, bulk work waits
between its slices instead of taking a turn of the event loop.

asyncio runs every ready callback in one turn, in arrival order. Under a telemetry
backlog a turn holds a decode slice, a COPY slice and a socket read of the bulk lane,
several milliseconds each, and an alarm event's batch needs a turn for every round trip
it makes (begin, claim, insert, rules, alarm, case, commit: seven or eight): it waited
the sum of them. With the bulk lane's slices held back, each of its round trips waits
only for the callback running when the answer arrives.

The pause is bounded (`MAX_PAUSE_S`): a bulk batch held back between two COPY slices holds
its dedup rows, and an event with the same (device, seq) would wait for them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator

MAX_PAUSE_S = 0.1

# What runs between two slices of work: a turn of the event loop, or `Priority.bulk_turn`.
BetweenSlices = Callable[[], Awaitable[None]]


async def one_turn() -> None:
    await asyncio.sleep(0)


class Priority:
    def __init__(self) -> None:
        self._urgent = 0
        self._clear = asyncio.Event()
        self._clear.set()

    @contextlib.contextmanager
    def urgent(self) -> Iterator[None]:
        """Around an event-lane batch, from its decode to its commit."""
        self._urgent += 1
        self._clear.clear()
        try:
            yield
        finally:
            self._urgent -= 1
            if not self._urgent:
                self._clear.set()

    def busy(self) -> bool:
        return bool(self._urgent)

    def between_slices(self, urgent: bool) -> BetweenSlices:
        """For the event lane's own work a plain turn; for the bulk lane's, `bulk_turn`."""
        return one_turn if urgent else self.bulk_turn

    async def bulk_turn(self) -> None:
        """Between two slices of bulk work: one turn of the event loop, or, while an
        urgent batch is in flight, until it is done (at most MAX_PAUSE_S)."""
        if not self._urgent:
            await one_turn()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(MAX_PAUSE_S):
                await self._clear.wait()


# For a writer without an ingest service (tests, tools): never busy, so never a pause.
NO_PRIORITY = Priority()
