"""Diagnostics for `gridwarden up`, loaded by putting this folder on PYTHONPATH (Python
imports `sitecustomize` at start); it does nothing unless asked, and nothing in any other
command. Both write next to this file, one log per process id.

GW_SLOW_CALLBACKS=15   log every event-loop callback that ran longer than 15 ms, with the
                       coroutine's position before and after it (what ran in between is
                       the culprit): slow-callbacks.<pid>
GW_TASK_DUMP=1         on SIGUSR1, write the stack of every asyncio task: tasks.<pid>
                       (where a stalled service waits)
GW_GC_PAUSES=10        log every garbage collection that took longer than 10 ms, with its
                       generation and what it collected: gc-pauses.<pid>
GW_MEM_DUMP=1          with PYTHONTRACEMALLOC=1: on SIGUSR2, the 40 source lines holding the
                       most memory, and the objects by type: memory.<pid>

    PYTHONPATH=scripts/loop_trace GW_SLOW_CALLBACKS=15 .venv/bin/gridwarden bench --json

Wall time, and the thread's CPU time beside it (`cpu=`): on a busy machine a callback
also looks slow while the process waits for a core. How *Periodic work in small
callbacks* (README, Performance) was found.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _position(task: object) -> str:
    """Where a task's coroutine chain is suspended: its three innermost frames."""
    get_coro = getattr(task, "get_coro", None)
    coro = get_coro() if get_coro else None
    parts: list[str] = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            parts.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return ">".join(parts[-3:])


def _trace_slow_callbacks(threshold_ms: float) -> None:
    import asyncio.events

    out = (HERE / f"slow-callbacks.{os.getpid()}").open("a")
    run = asyncio.events.Handle._run

    def timed_run(handle: asyncio.events.Handle) -> None:
        callback = handle._callback  # type: ignore[attr-defined]
        task = getattr(callback, "__self__", None)
        is_task = hasattr(task, "get_coro")
        before = _position(task) if is_task else ""
        started, started_cpu = time.perf_counter(), time.thread_time()
        run(handle)
        took_ms = (time.perf_counter() - started) * 1000
        if took_ms > threshold_ms:
            cpu_ms = (time.thread_time() - started_cpu) * 1000
            if is_task:
                what = f"{task.get_coro().__qualname__} FROM {before} TO {_position(task)}"  # type: ignore[union-attr]
            else:
                what = repr(callback)[:150]
            out.write(f"{time.time():.3f} {took_ms:.1f}ms cpu={cpu_ms:.1f}ms {what}\n")
            out.flush()

    asyncio.events.Handle._run = timed_run  # type: ignore[method-assign]


def _dump_tasks_on_sigusr1() -> None:
    import asyncio
    import signal

    def dump(signum: int, frame: object) -> None:
        loop = asyncio._get_running_loop()
        with (HERE / f"tasks.{os.getpid()}").open("a") as out:
            out.write(f"==== {time.time():.3f}\n")
            for task in asyncio.all_tasks(loop) if loop else ():
                out.write(f"--- {task.get_name()} {task.get_coro().__qualname__}\n")
                task.print_stack(limit=30, file=out)

    signal.signal(signal.SIGUSR1, dump)


def _trace_gc_pauses(threshold_ms: float) -> None:
    import gc

    out = (HERE / f"gc-pauses.{os.getpid()}").open("a")
    started = [0.0, 0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[:] = time.perf_counter(), time.thread_time()
            return
        took_ms = (time.perf_counter() - started[0]) * 1000
        if took_ms > threshold_ms:
            cpu_ms = (time.thread_time() - started[1]) * 1000
            out.write(f"{time.time():.3f} {took_ms:.1f}ms cpu={cpu_ms:.1f}ms "
                      f"gen{info['generation']} collected={info['collected']}\n")  # fmt: skip
            out.flush()

    gc.callbacks.append(callback)


def _dump_memory_on_sigusr2() -> None:
    import collections
    import gc
    import signal
    import tracemalloc

    def dump(signum: int, frame: object) -> None:
        with (HERE / f"memory.{os.getpid()}").open("a") as out:
            out.write(f"==== {time.time():.3f}\n")
            if tracemalloc.is_tracing():
                snapshot = tracemalloc.take_snapshot()
                for stat in snapshot.statistics("lineno")[:40]:
                    out.write(f"{stat.size / 2**20:8.1f} MB {stat.count:9,} {stat.traceback}\n")
            types = collections.Counter(type(o).__name__ for o in gc.get_objects())
            out.write("tracked objects by type: " + ", ".join(
                f"{name} {n:,}" for name, n in types.most_common(25)) + "\n")  # fmt: skip

    signal.signal(signal.SIGUSR2, dump)


if "up" in sys.argv[1:2] or sys.argv[-1:] == ["up"]:
    if os.environ.get("GW_MEM_DUMP"):
        _dump_memory_on_sigusr2()
    if os.environ.get("GW_GC_PAUSES"):
        _trace_gc_pauses(float(os.environ["GW_GC_PAUSES"]))
    if os.environ.get("GW_SLOW_CALLBACKS"):
        _trace_slow_callbacks(float(os.environ["GW_SLOW_CALLBACKS"]))
    if os.environ.get("GW_TASK_DUMP"):
        _dump_tasks_on_sigusr1()
