"""The event lane first (ingest/priority.py): while an alarm event's batch is in flight,
bulk work waits between its slices, for a bounded time; with none, it takes one turn."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from gridwarden.db import create_pool
from gridwarden.readings import Reading
from ingest import consumer, writer
from ingest import priority as priority_module
from ingest.consumer import IngestService
from ingest.decode import Decoded, RawMessage
from ingest.priority import Priority
from ingest.writer import write_batch
from tests.ingest_helpers import TEST_DEVICES, fetchval, register_devices, settings_for


@pytest.fixture
async def ingest_service(
    database_url: str, mqtt_url: str, topic_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[IngestService]:
    """A service that is not consuming (its lanes unstarted), pauses unbounded."""
    monkeypatch.setattr(priority_module, "MAX_PAUSE_S", 10.0)
    pool = await create_pool(database_url)
    try:
        yield IngestService(settings_for(database_url, mqtt_url, topic_prefix), pool, mqtt_url)
    finally:
        await pool.close()


async def _turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_bulk_work_takes_one_turn_when_no_event_is_in_flight() -> None:
    priority = Priority()
    ran: list[str] = []

    async def other() -> None:
        ran.append("other")

    task = asyncio.create_task(other())
    await priority.bulk_turn()
    assert ran == ["other"]  # the turn was given away
    await task


async def test_bulk_work_waits_between_slices_until_the_event_batch_is_done() -> None:
    priority = Priority()
    slices: list[int] = []

    async def bulk() -> None:
        for n in range(3):
            if n:
                await priority.bulk_turn()
            slices.append(n)

    with priority.urgent():
        assert priority.busy()
        task = asyncio.create_task(bulk())
        await _turns(20)
        assert slices == [0]  # held back after its first slice
    assert not priority.busy()
    await asyncio.wait_for(task, 1)
    assert slices == [0, 1, 2]


async def test_two_event_batches_in_flight_hold_bulk_work_until_both_are_done() -> None:
    priority = Priority()
    with priority.urgent():
        with priority.urgent():
            waiting = asyncio.create_task(priority.bulk_turn())
        await _turns(20)
        assert not waiting.done()  # one is still in flight
    await asyncio.wait_for(waiting, 1)


async def test_a_pause_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bulk batch held between two COPY slices holds its dedup rows: an event with the
    same (device, seq) waits for them, so the bulk batch must go on after a while."""
    monkeypatch.setattr(priority_module, "MAX_PAUSE_S", 0.05)
    priority = Priority()
    with priority.urgent():
        started = time.monotonic()
        await asyncio.wait_for(priority.bulk_turn(), 2)
        waited = time.monotonic() - started
    assert 0.045 <= waited < 1.0


class CountingPriority(Priority):
    def __init__(self) -> None:
        super().__init__()
        self.pauses = 0

    async def bulk_turn(self) -> None:
        self.pauses += 1
        await super().bulk_turn()


async def test_an_event_batch_commits_while_a_bulk_copy_waits_between_its_slices(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real PostgreSQL: the bulk batch's COPY stops after its first slice while the event
    batch is in flight; the event commits; then the bulk batch writes every row."""
    await register_devices(database_url, TEST_DEVICES)
    monkeypatch.setattr(writer, "COPY_SLICE", 3)
    monkeypatch.setattr(priority_module, "MAX_PAUSE_S", 10.0)
    now = datetime.now(UTC)
    bulk = Decoded(
        readings=[
            Reading("telemetry", "cover-1", now, now, n, {"tilt": float(n)}) for n in range(1, 11)
        ]
    )
    event = Decoded(readings=[Reading("event", "smoke-1", now, now, 1, {}, event="alarm")])
    priority = CountingPriority()
    pool = await create_pool(database_url)
    try:

        async def write(decoded: Decoded, urgent: bool) -> None:
            async with pool.acquire() as conn:
                await write_batch(conn, decoded, 3600.0, urgent=urgent, priority=priority)

        with priority.urgent():
            bulk_write = asyncio.create_task(write(bulk, urgent=False))
            for _ in range(400):
                if priority.pauses:
                    break
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.05)
            assert priority.pauses == 1  # its first slice of readings, then held back
            await write(event, urgent=True)
            assert not bulk_write.done()
            assert await fetchval(database_url, "SELECT count(*) FROM device_events") == 1
        await asyncio.wait_for(bulk_write, 5)
    finally:
        await pool.close()
    # Ten readings claim by one statement (SMALL_BATCH), then COPY 1-3 | 4-6 | 7-9 | 10.
    assert priority.pauses == 3
    assert await fetchval(database_url, "SELECT count(*) FROM telemetry") == 10


async def test_the_last_seen_flush_waits_while_an_event_batch_is_in_flight(
    database_url: str, ingest_service: IngestService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each chunk's statement is encoded in one callback (~7 ms on a slow machine): none
    while an alarm event's batch is in flight."""
    await register_devices(database_url, TEST_DEVICES)
    monkeypatch.setattr(consumer, "LAST_SEEN_CHUNK", 2)
    service = ingest_service
    at = datetime.now(UTC)
    service._last_seen = {d: (at, 1, None, None) for d, _, _ in TEST_DEVICES}
    with service.priority.urgent():
        flush = asyncio.create_task(service.flush_last_seen())
        await asyncio.sleep(0.1)
        assert not flush.done()
        assert await fetchval(database_url, "SELECT count(*) FROM device_last_seen") == 0
    await asyncio.wait_for(flush, 5)
    stored = await fetchval(database_url, "SELECT count(*) FROM device_last_seen")
    assert stored == len(TEST_DEVICES)


async def test_a_committed_bulk_batch_is_acknowledged_after_the_event_batch_in_flight(
    database_url: str, ingest_service: IngestService, topic_prefix: str
) -> None:
    """Acknowledging and noting a bulk batch of 2,000 is one callback of several ms: it
    waits for the alarm event's batch in flight (the messages stay unacknowledged, the
    rows are committed)."""
    await register_devices(database_url, TEST_DEVICES)
    service = ingest_service
    bulk_lane = next(lane for lane in service.lanes if not lane.urgent)
    now = datetime.now(UTC)
    raw = [RawMessage(f"{topic_prefix}/dev/cover-1/telemetry", b"{}", now, 1, 1)]
    decoded = Decoded(readings=[Reading("telemetry", "cover-1", now, now, 1, {"tilt": 1.0})])
    ready: asyncio.Queue[tuple[list[RawMessage], Decoded] | None] = asyncio.Queue()
    ready.put_nowait((raw, decoded))
    ready.put_nowait(None)
    with service.priority.urgent():
        loop = asyncio.create_task(service._commit_loop(bulk_lane, ready))
        for _ in range(400):
            if await fetchval(database_url, "SELECT count(*) FROM telemetry"):
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)
        assert service.committed_batches == 0  # committed, not yet acknowledged
    await asyncio.wait_for(loop, 5)
    assert service.committed_batches == 1


async def test_bulk_decoding_waits_between_slices_and_the_event_lane_never_waits(
    ingest_service: IngestService, topic_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(consumer, "DECODE_SLICE", 2)
    service = ingest_service
    bulk_lane = next(lane for lane in service.lanes if not lane.urgent)
    event_lane = next(lane for lane in service.lanes if lane.urgent)
    now = datetime.now(UTC)
    batch = [
        RawMessage(f"{topic_prefix}/dev/cover-{n}/telemetry", b'{"tilt": 1}', now, n, 1)
        for n in range(5)
    ]
    with service.priority.urgent():
        # The event lane's own batch (an alarm storm can bring more than a slice).
        events = await asyncio.wait_for(service._decode_yielding(batch, event_lane), 1)
        bulk = asyncio.create_task(service._decode_yielding(batch, bulk_lane))
        await asyncio.sleep(0.05)
        assert not bulk.done()
    decoded = await asyncio.wait_for(bulk, 5)
    assert len(events.unknown) == len(decoded.unknown) == 5  # nobody registered
