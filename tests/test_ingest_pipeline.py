"""Two batches of the bulk lane write at once (ingest/consumer.py `_commit_loop`): their
rules and commits keep the lane's order, and a failure rolls the later ones back and writes
them again in order. The event lane writes one batch at a time, each holding every event
that arrived while the one before waited, and goes first to the rules lock. Against the
real database and broker; the rules hook records what it sees."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from gridwarden.db import create_pool
from ingest.consumer import IngestService, Lane
from ingest.decode import Decoded, RawMessage, Reading
from ingest.mqtt_source import MqttSource
from ingest.writer import write_batch
from rules.lock import RulesLock
from tests.ingest_helpers import (
    TEST_DEVICES,
    fetchval,
    publish,
    publisher,
    register_devices,
    running_ingest,
    settings_for,
    wait_for,
)

BIG = 20_000  # the first batch: its COPYs take far longer than the second's single row


class RecordingRules:
    """A RulesHook that notes the first seq of every batch it evaluates and commits, and
    can fail the first evaluation of one batch like a lost connection would."""

    def __init__(self, fail_first_seq: int | None = None) -> None:
        self.lock = RulesLock()
        self.evaluated: list[int] = []
        self.batches: list[list[int]] = []
        self.committed_seqs: list[int] = []
        self.fail_first_seq = fail_first_seq

    async def in_transaction(
        self, conn: asyncpg.Connection, readings: list[Reading], hurry: Callable[[], bool]
    ) -> Any:
        first = min(r.seq or 0 for r in readings)
        self.evaluated.append(first)
        self.batches.append([r.seq or 0 for r in readings])
        if first == self.fail_first_seq:
            self.fail_first_seq = None
            raise OSError("injected: connection lost during the rules")
        return first

    def committed(self, evaluation: Any) -> None:
        self.committed_seqs.append(evaluation)

    def urgent_devices(self, readings: list[Reading]) -> set[str]:
        return set()  # every reading in its batch: the order of batches is what is tested


def _batch(seqs: range) -> tuple[list[RawMessage], Decoded]:
    now = datetime.now(UTC)
    readings = [
        Reading("telemetry", "smoke-1", now - timedelta(seconds=BIG - s), now, s, {"smoke": 1.0})
        for s in seqs
    ]
    return [], Decoded(readings=readings)


async def _run_lane(database_url: str, mqtt_url: str, prefix: str, rules: RecordingRules) -> int:
    settings = settings_for(database_url, mqtt_url, prefix)
    pool = await create_pool(database_url)
    try:
        service = IngestService(settings, pool, mqtt_url, rules=rules)
        # Never started: acks go nowhere, which is all this lane needs.
        lane = Lane("bulk", MqttSource(mqtt_url, "unused", [], 10), 0.01, skip_events=True)
        ready: asyncio.Queue[tuple[list[RawMessage], Decoded] | None] = asyncio.Queue()
        for item in (_batch(range(1, BIG + 1)), _batch(range(BIG + 1, BIG + 2)), None):
            ready.put_nowait(item)
        async with asyncio.timeout(60):
            await service._commit_loop(lane, ready)
        return int(await pool.fetchval("SELECT count(*) FROM telemetry"))
    finally:
        await pool.close()


async def test_batches_written_together_run_their_rules_and_commits_in_order(
    database_url, mqtt_url, topic_prefix
):
    await register_devices(database_url, TEST_DEVICES)
    rules = RecordingRules()
    stored = await _run_lane(database_url, mqtt_url, topic_prefix, rules)
    assert rules.evaluated == [1, BIG + 1]
    assert rules.committed_seqs == [1, BIG + 1]
    assert stored == BIG + 1


async def test_a_failed_batch_makes_the_one_behind_it_wait_roll_back_and_follow_it(
    database_url, mqtt_url, topic_prefix
):
    await register_devices(database_url, TEST_DEVICES)
    rules = RecordingRules(fail_first_seq=1)
    stored = await _run_lane(database_url, mqtt_url, topic_prefix, rules)
    # The second batch never evaluated before the first committed: it waited for its
    # turn, was rolled back, and was written again after the first.
    assert rules.evaluated == [1, 1, BIG + 1]
    assert rules.committed_seqs == [1, BIG + 1]
    assert stored == BIG + 1  # every row once: the rolled-back claims left nothing behind


async def _until(condition: Callable[[], bool]) -> None:
    async def probe() -> bool:
        return condition()

    await wait_for(probe, bool)


async def test_events_arriving_while_the_rules_lock_is_busy_are_written_as_one_batch(
    database_url, mqtt_url, topic_prefix
):
    await register_devices(database_url, TEST_DEVICES)
    rules = RecordingRules()
    settings = settings_for(database_url, mqtt_url, topic_prefix)
    await rules.lock.acquire()  # a long bulk batch holds the rules lock
    async with running_ingest(settings, rules) as service, publisher(mqtt_url) as client:
        topic = f"{topic_prefix}/dev/smoke-1/event"
        await publish(client, topic, {"seq": 1, "event": "alarm"})
        await _until(lambda: rules.lock.waiting(urgent=True) == 1)
        for seq in range(2, 7):  # one by one, each past the lane's batching delay
            await publish(client, topic, {"seq": seq, "event": "alarm"})
            await asyncio.sleep(0.03)
        await _until(lambda: service.event_source.depth() == 5)
        rules.lock.release()
        await wait_for(
            lambda: fetchval(database_url, "SELECT count(*) FROM device_events"), lambda n: n == 6
        )
    # Read ahead, each of 2..6 would have been a batch of its own waiting for the lock.
    assert rules.batches == [[1], [2, 3, 4, 5, 6]]


async def test_an_event_batch_takes_the_rules_lock_before_a_waiting_bulk_batch(
    database_url, topic_prefix
):
    await register_devices(database_url, TEST_DEVICES)
    rules = RecordingRules()
    now = datetime.now(UTC)
    bulk = Decoded(readings=[Reading("telemetry", "smoke-1", now, now, 1, {"smoke": 1.0})])
    event = Decoded(readings=[Reading("event", "smoke-2", now, now, 2, {}, event="alarm")])
    pool = await create_pool(database_url)
    try:
        await rules.lock.acquire()  # the batch before them holds it

        async def write(decoded: Decoded, urgent: bool) -> None:
            async with pool.acquire() as conn:
                await write_batch(conn, decoded, 3600.0, rules, urgent=urgent)

        bulk_write = asyncio.create_task(write(bulk, urgent=False))
        await _until(lambda: rules.lock.waiting(urgent=False) == 1)
        event_write = asyncio.create_task(write(event, urgent=True))
        await _until(lambda: rules.lock.waiting(urgent=True) == 1)
        rules.lock.release()
        async with asyncio.timeout(15):
            await asyncio.gather(bulk_write, event_write)
    finally:
        await pool.close()
    assert rules.evaluated == [2, 1]  # the event first, though the bulk batch came first
