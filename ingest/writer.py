"""One batch → one transaction: claim sequence numbers, COPY readings, events and
dead letters. Nothing is acknowledged to the broker before this commits."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import asyncpg
import orjson

from gridwarden.db import query
from ingest.decode import Decoded, Reading
from ingest.models import BOOLEAN_FIELDS, NUMERIC_FIELDS
from ingest.priority import NO_PRIORITY, BetweenSlices, Priority, one_turn
from rules.lock import RulesLock

TELEMETRY_COLUMNS = ("time", "device_id", "seq", "received_at", *NUMERIC_FIELDS,
                     *BOOLEAN_FIELDS, "extra")  # fmt: skip
EVENT_COLUMNS = ("time", "device_id", "seq", "received_at", "event", "credential_hash", "data")
DEDUP_COLUMNS = ("device_id", "seq", "received_at")
DEAD_LETTER_COLUMNS = ("received_at", "topic", "device_id", "reason", "detail", "payload")
_READING_FIELDS = (*NUMERIC_FIELDS, *BOOLEAN_FIELDS)
# Up to this many readings, a batch claims its sequence numbers and writes its events in one
# statement each instead of COPY (two round trips each, and a savepoint around the claim's):
# the event lane's batches of a few alarms, where every round trip waits for a turn of a
# busy event loop. Larger batches keep COPY, which costs less per row.
SMALL_BATCH = 50
# Rows a COPY encodes between two turns of the event loop (~1-2 ms): encoding a bulk batch of
# 2,000 readings at once held the loop 15-75 ms, and every await of an alarm event's path
# (claim, insert, lock, rules, commit) could wait that long for its turn.
COPY_SLICE = 250

T = TypeVar("T")


class RulesHook(Protocol):
    """What ingest needs of the rules engine: evaluate the fresh readings inside the
    batch's transaction, and learn when that transaction committed."""

    lock: RulesLock

    async def in_transaction(
        self, conn: asyncpg.Connection, readings: list[Reading], hurry: Callable[[], bool]
    ) -> Any:
        """`hurry()` is true while an alarm event's batch is in flight: then evaluate
        without giving turns of the event loop away."""

    def committed(self, evaluation: Any) -> None: ...

    def urgent_devices(self, readings: list[Reading]) -> set[str]:
        """Devices with a reading that would raise a critical alarm not raised yet."""
        ...


@dataclass(frozen=True, slots=True)
class Turn:
    """A batch's place in its lane: `committed` is set once it committed (never when it
    failed: the batches after it are then rolled back and written again, in order)."""

    previous: asyncio.Event | None
    committed: asyncio.Event

    async def previous_committed(self) -> None:
        if self.previous is not None:
            await self.previous.wait()


@dataclass(frozen=True, slots=True)
class WriteResult:
    stored: list[Reading]
    telemetry_rows: int
    event_rows: int
    dead_letter_rows: int
    duplicates: int


def _json(value: object) -> str | None:
    return orjson.dumps(value).decode() if value else None


def _telemetry_record(reading: Reading) -> tuple[object, ...]:
    values = reading.values
    return (
        reading.time, reading.device_id, reading.seq, reading.received_at,
        *map(values.get, _READING_FIELDS),
        _json(reading.extra),
    )  # fmt: skip


def _event_record(reading: Reading) -> tuple[object, ...]:
    data = {**reading.values, **(reading.extra or {})}
    return (
        reading.time, reading.device_id, reading.seq, reading.received_at,
        reading.event, reading.credential_hash, _json(data),
    )  # fmt: skip


def _copy_rows(
    items: Sequence[T], row: Callable[[T], tuple[object, ...]], between: BetweenSlices
) -> list[tuple[object, ...]] | AsyncIterator[tuple[object, ...]]:
    """The COPY records of `items`: a list for a small batch, else made and encoded a
    COPY_SLICE at a time (asyncpg takes an async iterable of records)."""
    if len(items) <= COPY_SLICE:
        return [row(item) for item in items]
    return _rows_in_slices(items, row, between)


async def _rows_in_slices(
    items: Sequence[T], row: Callable[[T], tuple[object, ...]], between: BetweenSlices
) -> AsyncIterator[tuple[object, ...]]:
    for start in range(0, len(items), COPY_SLICE):
        if start:
            await between()
        for item in items[start : start + COPY_SLICE]:
            yield row(item)


async def _claim_by_statement(
    conn: asyncpg.Connection, first_of_key: dict[tuple[str, int], Reading], dedup_window_s: float
) -> set[tuple[str, int]]:
    """The keys that are new, or last seen longer than the dedup window ago."""
    keys = list(first_of_key)
    rows = await conn.fetch(
        query("claim_sequences"),
        [device for device, _ in keys],
        [seq for _, seq in keys],
        [first_of_key[key].received_at for key in keys],
        float(dedup_window_s),
    )
    return {(row["device_id"], row["seq"]) for row in rows}


async def claim_new(
    conn: asyncpg.Connection,
    readings: list[Reading],
    dedup_window_s: float,
    between_slices: BetweenSlices = one_turn,
) -> tuple[list[Reading], int]:
    """Drop repeated (device_id, seq): within the batch here, across batches and
    restarts through the telemetry_dedup table. Readings without seq always pass."""
    first_of_key: dict[tuple[str, int], Reading] = {}
    with_seq = 0
    for reading in readings:
        if reading.seq is not None:
            with_seq += 1
            first_of_key.setdefault((reading.device_id, reading.seq), reading)
    claimed: set[tuple[str, int]] = set()
    if first_of_key and len(readings) <= SMALL_BATCH:
        claimed = await _claim_by_statement(conn, first_of_key, dedup_window_s)
    elif first_of_key:
        keys = list(first_of_key)
        try:
            # Optimistic: a repeat is rare (a redelivery after a reconnect), and COPY into
            # the dedup table costs half of INSERT … ON CONFLICT. A repeat makes the COPY
            # fail; then, from the savepoint, the claim that sorts repeats out.
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "telemetry_dedup",
                    records=_copy_rows(
                        keys, lambda key: (*key, first_of_key[key].received_at), between_slices
                    ),
                    columns=DEDUP_COLUMNS,
                )
            if with_seq == len(first_of_key):
                return list(readings), 0  # the usual batch: every key new, none repeated
            claimed = set(keys)
        except asyncpg.UniqueViolationError:
            claimed = await _claim_by_statement(conn, first_of_key, dedup_window_s)
    fresh = [
        reading
        for reading in readings
        if reading.seq is None
        or (
            (reading.device_id, reading.seq) in claimed
            and first_of_key[(reading.device_id, reading.seq)] is reading
        )
    ]
    return fresh, len(readings) - len(fresh)


async def write_batch(
    conn: asyncpg.Connection,
    decoded: Decoded,
    dedup_window_s: float,
    rules: RulesHook | None = None,
    turn: Turn | None = None,
    *,
    urgent: bool = False,
    priority: Priority = NO_PRIORITY,
) -> WriteResult:
    # The rules lock (one writer of engine state at a time) is taken only for the rules
    # and the commit, not for the claim and the COPYs before them: the event lane's
    # alarms need not wait for a bulk batch's COPY. Both lanes take their row locks
    # (dedup claims) before the rules lock, and the rules touch no such rows, so a batch
    # waiting for the lock never holds anything its holder needs.
    # `turn`: batches of one lane in flight together (ingest/consumer.py) run their rules
    # and commit in the lane's order; the claim and COPYs before need no order.
    # `urgent`: the event lane's batch takes the lock before any waiting bulk batch.
    # `priority` (ingest/priority.py): while an event-lane batch is in flight, a bulk
    # batch waits between its COPY slices, and runs its rules without yielding.
    between_slices = priority.between_slices(urgent)
    async with contextlib.AsyncExitStack() as holding:
        async with conn.transaction():
            fresh, duplicates = await claim_new(
                conn, decoded.readings, dedup_window_s, between_slices
            )
            telemetry = [r for r in fresh if r.channel == "telemetry"]
            events = [_event_record(r) for r in fresh if r.channel == "event"]
            if telemetry:
                await conn.copy_records_to_table(
                    "telemetry",
                    records=_copy_rows(telemetry, _telemetry_record, between_slices),
                    columns=TELEMETRY_COLUMNS,
                )
            if events and len(decoded.readings) <= SMALL_BATCH:
                await conn.execute(query("insert_events"), *map(list, zip(*events, strict=True)))
            elif events:
                await conn.copy_records_to_table(
                    "device_events", records=events, columns=EVENT_COLUMNS
                )
            dead = [
                (d.received_at, d.topic, d.device_id, d.reason, d.detail, d.payload)
                for d in decoded.dead_letters
            ]
            if dead:
                await conn.copy_records_to_table(
                    "dead_letters", records=dead, columns=DEAD_LETTER_COLUMNS
                )
            evaluation = None
            if turn is not None:
                await turn.previous_committed()
            if rules is not None and fresh:
                await holding.enter_async_context(rules.lock.hold(urgent=urgent))
                evaluation = await rules.in_transaction(conn, fresh, priority.busy)
        # Committed (an error above skips this): the engine's memory follows, then
        # `holding` releases the lock.
        if rules is not None and evaluation is not None:
            rules.committed(evaluation)
    if turn is not None:
        turn.committed.set()
    return WriteResult(fresh, len(telemetry), len(events), len(dead), duplicates)
