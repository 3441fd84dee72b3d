"""The rules lock: one writer of engine state at a time, alarm events first.

Both ingest lanes and the rule timers evaluate under this lock (evaluate → commit). A
plain `asyncio.Lock` serves its waiters in arrival order, so under a telemetry backlog an
alarm event waited for every bulk batch queued before it (two are in flight), each
holding the lock for its rules and its commit. Here an *urgent* waiter (the event lane)
goes before every ordinary one: it waits at most for the batch holding the lock.

Ownership passes straight from the releaser to the next waiter, so no newcomer can slip
in between; a waiter cancelled after it was handed the lock passes it on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator


class RulesLock:
    def __init__(self) -> None:
        self._held = False
        self._urgent: collections.deque[asyncio.Future[None]] = collections.deque()
        self._ordinary: collections.deque[asyncio.Future[None]] = collections.deque()

    def locked(self) -> bool:
        return self._held

    def waiting(self, *, urgent: bool) -> int:
        return len(self._urgent if urgent else self._ordinary)

    async def acquire(self, *, urgent: bool = False) -> None:
        if not self._held and not self._urgent and not self._ordinary:
            self._held = True
            return
        queue = self._urgent if urgent else self._ordinary
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue.append(granted)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release()  # handed over just as we were cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):  # release() may have dropped it
                    queue.remove(granted)
            raise

    def release(self) -> None:
        if not self._held:
            raise RuntimeError("the rules lock is not held")
        for queue in (self._urgent, self._ordinary):
            while queue:
                waiter = queue.popleft()
                if not waiter.done():
                    waiter.set_result(None)  # still held: now by that waiter
                    return
        self._held = False

    @contextlib.asynccontextmanager
    async def hold(self, *, urgent: bool = False) -> AsyncIterator[None]:
        await self.acquire(urgent=urgent)
        try:
            yield
        finally:
            self.release()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *_: object) -> None:
        self.release()
