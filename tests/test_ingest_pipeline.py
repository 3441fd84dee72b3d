"""Two batches of a lane write at once (ingest/consumer.py `_commit_loop`): their rules and
commits keep the lane's order, and a failure rolls the later ones back and writes them
again in order. Against the real database; the rules hook records what it sees."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from gridwarden.db import create_pool
from ingest.consumer import IngestService, Lane
from ingest.decode import Decoded, RawMessage, Reading
from ingest.mqtt_source import MqttSource
from tests.ingest_helpers import TEST_DEVICES, register_devices, settings_for

BIG = 20_000  # the first batch: its COPYs take far longer than the second's single row


class RecordingRules:
    """A RulesHook that notes the first seq of every batch it evaluates and commits, and
    can fail the first evaluation of one batch like a lost connection would."""

    def __init__(self, fail_first_seq: int | None = None) -> None:
        self.lock = asyncio.Lock()
        self.evaluated: list[int] = []
        self.committed_seqs: list[int] = []
        self.fail_first_seq = fail_first_seq

    async def in_transaction(self, conn: asyncpg.Connection, readings: list[Reading]) -> Any:
        first = min(r.seq or 0 for r in readings)
        self.evaluated.append(first)
        if first == self.fail_first_seq:
            self.fail_first_seq = None
            raise OSError("injected: connection lost during the rules")
        return first

    def committed(self, evaluation: Any) -> None:
        self.committed_seqs.append(evaluation)


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
