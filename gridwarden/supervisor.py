"""One owner for every long-lived task.

Each task is a coroutine function taking the shared `stop` event. SIGTERM/SIGINT
set the event; tasks finish their in-flight work and return. A task that dies
unexpectedly (an exception, or returning while not asked to stop) stops the whole
service, which then exits non-zero rather than limping on without it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

TaskFn = Callable[[asyncio.Event], Awaitable[None]]


class TaskDied(Exception):
    def __init__(self, name: str, cause: BaseException | None) -> None:
        super().__init__(f"task {name!r} stopped unexpectedly: {cause!r}")
        self.name = name
        self.cause = cause


class Supervisor:
    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self._tasks: dict[str, TaskFn] = {}

    def add(self, name: str, fn: TaskFn) -> None:
        if name in self._tasks:
            raise ValueError(f"task {name!r} added twice")
        self._tasks[name] = fn

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop, sig.name)

    def request_stop(self, why: str = "requested") -> None:
        if not self.stop.is_set():
            log.info("stopping (%s): draining in-flight work", why)
            self.stop.set()

    async def run(self) -> None:
        """Run every task until stop; raise TaskDied if one failed."""
        failure: TaskDied | None = None

        async def guard(name: str, fn: TaskFn) -> None:
            nonlocal failure
            try:
                await fn(self.stop)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("task %s failed", name)
                failure = failure or TaskDied(name, exc)
                self.request_stop(f"task {name} failed")
                return
            if not self.stop.is_set():
                failure = failure or TaskDied(name, None)
                self.request_stop(f"task {name} returned")

        async with asyncio.TaskGroup() as group:
            for name, fn in self._tasks.items():
                group.create_task(guard(name, fn), name=name)
        if failure is not None:
            raise failure
