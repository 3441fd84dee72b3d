"""The rules lock serves urgent waiters (the event lane) before ordinary ones (bulk
batches, rule timers), and a waiter cancelled at any point never leaves it held."""

from __future__ import annotations

import asyncio

import pytest

from rules.lock import RulesLock


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_an_urgent_waiter_goes_before_ordinary_ones_that_came_first():
    lock = RulesLock()
    order: list[str] = []

    async def take(name: str, urgent: bool) -> None:
        async with lock.hold(urgent=urgent):
            order.append(name)
            await asyncio.sleep(0)

    await lock.acquire()  # a bulk batch holds it
    tasks = [asyncio.create_task(take("bulk-1", False)), asyncio.create_task(take("bulk-2", False))]
    await _settle()
    tasks += [
        asyncio.create_task(take("event-1", True)),
        asyncio.create_task(take("event-2", True)),
    ]
    await _settle()
    assert (lock.waiting(urgent=False), lock.waiting(urgent=True)) == (2, 2)
    lock.release()
    await asyncio.gather(*tasks)
    assert order == ["event-1", "event-2", "bulk-1", "bulk-2"]
    assert not lock.locked()


async def test_a_free_lock_is_taken_at_once_and_released_for_the_next():
    lock = RulesLock()
    async with lock:
        assert lock.locked()
    assert not lock.locked()
    with pytest.raises(RuntimeError):
        lock.release()


async def test_a_waiter_cancelled_while_waiting_is_skipped():
    lock = RulesLock()
    await lock.acquire()
    cancelled = asyncio.create_task(lock.acquire(urgent=True))
    behind = asyncio.create_task(lock.acquire())
    await _settle()
    cancelled.cancel()
    await _settle()
    lock.release()
    await asyncio.wait_for(behind, 1)  # the ordinary waiter got it, not the cancelled one
    assert lock.locked()
    assert lock.waiting(urgent=True) == 0
    lock.release()
    assert not lock.locked()


async def test_a_waiter_cancelled_just_as_it_was_handed_the_lock_passes_it_on():
    lock = RulesLock()
    await lock.acquire()
    first = asyncio.create_task(lock.acquire())
    second = asyncio.create_task(lock.acquire())
    await _settle()
    lock.release()  # handed to `first`, which has not run yet
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1)
    assert lock.locked()
    lock.release()
    assert not lock.locked()
