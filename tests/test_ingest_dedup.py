"""The (device_id, seq) claim of `ingest.writer`, straight against PostgreSQL, both ways:
a large batch's optimistic COPY and the fallback that sorts repeats out, and a small
batch's one statement (every test runs both ways)."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from gridwarden.readings import Reading
from ingest import writer
from ingest.decode import Decoded
from ingest.writer import SMALL_BATCH, write_batch
from tests.ingest_helpers import TEST_DEVICES, register_devices

NOW = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
WINDOW_S = 3600.0


@pytest.fixture(autouse=True, params=["copy", "statement"])
def claim_by(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """`copy`: every batch is a large one (SMALL_BATCH 0); `statement`: as it is."""
    if request.param == "copy":
        monkeypatch.setattr(writer, "SMALL_BATCH", 0)
    return str(request.param)


def reading(seq: int, received_at: datetime = NOW) -> Reading:
    return Reading("telemetry", "cover-1", received_at, received_at, seq, {"tilt": float(seq)})


async def write(database_url: str, readings: list[Reading]) -> tuple[list[int | None], int]:
    conn = await asyncpg.connect(database_url)
    try:
        result = await write_batch(conn, Decoded(readings=readings), WINDOW_S)
    finally:
        await conn.close()
    return [r.seq for r in result.stored], result.duplicates


async def stored_seqs(database_url: str) -> list[int]:
    conn = await asyncpg.connect(database_url)
    try:
        return [row["seq"] for row in await conn.fetch("SELECT seq FROM telemetry ORDER BY seq")]
    finally:
        await conn.close()


async def test_new_sequences_are_claimed_in_one_go(database_url: str) -> None:
    await register_devices(database_url, TEST_DEVICES)
    assert await write(database_url, [reading(1), reading(2), reading(2), reading(3)]) == (
        [1, 2, 3],
        1,
    )
    assert await stored_seqs(database_url) == [1, 2, 3]


async def test_a_batch_with_one_repeat_stores_only_the_new(database_url: str) -> None:
    # The repeat makes the optimistic COPY fail: the fallback must keep the new ones
    # (4, 5) and drop only the repeat (2), in the same transaction.
    await register_devices(database_url, TEST_DEVICES)
    await write(database_url, [reading(1), reading(2)])
    assert await write(database_url, [reading(4), reading(2), reading(5)]) == ([4, 5], 1)
    assert await stored_seqs(database_url) == [1, 2, 4, 5]


async def test_a_sequence_seen_before_the_window_counts_as_new(database_url: str) -> None:
    # Device counters wrap: a seq last seen longer ago than the window is a new message.
    await register_devices(database_url, TEST_DEVICES)
    long_ago = NOW - timedelta(seconds=WINDOW_S + 60)
    await write(database_url, [reading(7, long_ago)])
    assert await write(database_url, [reading(7), reading(8)]) == ([7, 8], 0)
    assert await stored_seqs(database_url) == [7, 7, 8]


async def test_a_small_batch_of_events_is_written_without_copy(
    database_url: str, claim_by: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The event lane's batches: the claim and the rows in one statement each (COPY costs
    two round trips, and the claim's a savepoint around it); a large batch keeps COPY."""
    await register_devices(database_url, TEST_DEVICES)
    copies: list[str] = []
    copy = asyncpg.Connection.copy_records_to_table

    async def counting(self: asyncpg.Connection, table: str, **kwargs: Any) -> str:
        copies.append(table)
        return await copy(self, table, **kwargs)

    monkeypatch.setattr(asyncpg.Connection, "copy_records_to_table", counting)

    def event(seq: int) -> Reading:
        alarm = Reading("event", "smoke-1", NOW, NOW, seq, {})
        alarm.event = "alarm"
        return alarm

    conn = await asyncpg.connect(database_url)
    try:
        small = await write_batch(conn, Decoded(readings=[event(1), event(2), event(1)]), WINDOW_S)
        again = await write_batch(conn, Decoded(readings=[event(2), event(3)]), WINDOW_S)
        small_copies = list(copies)
        large = [event(n) for n in range(10, 11 + SMALL_BATCH)]
        await write_batch(conn, Decoded(readings=large), WINDOW_S)
        stored = [r["seq"] for r in await conn.fetch("SELECT seq FROM device_events ORDER BY seq")]
    finally:
        await conn.close()
    assert ([r.seq for r in small.stored], small.duplicates) == ([1, 2], 1)
    assert ([r.seq for r in again.stored], again.duplicates) == ([3], 1)
    assert stored == [1, 2, 3, *range(10, 11 + SMALL_BATCH)]
    if claim_by == "statement":
        assert small_copies == []
    assert copies[len(small_copies) :] == ["telemetry_dedup", "device_events"]


async def test_a_large_batch_is_copied_in_slices_letting_the_event_loop_turn(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every row lands, and between two slices of COPY_SLICE rows other tasks run (an
    alarm event's statements must not wait for a whole bulk batch to be encoded)."""
    await register_devices(database_url, TEST_DEVICES)
    monkeypatch.setattr(writer, "COPY_SLICE", 3)
    turns = 0
    made_at_turn: list[int] = []
    make_record = writer._telemetry_record

    def recording(reading: Reading) -> tuple[object, ...]:
        made_at_turn.append(turns)
        return make_record(reading)

    monkeypatch.setattr(writer, "_telemetry_record", recording)

    async def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    counter = asyncio.create_task(count_turns())
    try:
        assert await write(database_url, [reading(n) for n in range(1, 11)]) == (
            list(range(1, 11)),
            0,
        )
    finally:
        counter.cancel()
    assert await stored_seqs(database_url) == list(range(1, 11))
    # Rows 1-3, 4-6, 7-9 and 10 each made in a turn of their own.
    assert [len(list(group)) for _, group in itertools.groupby(made_at_turn)] == [3, 3, 3, 1]
