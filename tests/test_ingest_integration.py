"""Ingest against a real PostgreSQL and a real Mosquitto, started by the suite."""

from __future__ import annotations

import asyncio
import gc
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import orjson
import pytest

from gridwarden.db import create_pool
from gridwarden.readings import Reading
from ingest import consumer, metrics
from ingest.consumer import IngestService, LastSeen
from ingest.decode import Decoded, RawMessage, StatusChange
from ingest.directory import REFRESH_MIN_INTERVAL_S
from ingest.writer import WriteResult
from tests.ingest_helpers import (
    TEST_DEVICES,
    fetch,
    fetchrow,
    fetchval,
    publish,
    publisher,
    register_devices,
    running_ingest,
    settings_for,
    wait_for,
)


async def test_a_reading_reaches_the_table(database_url, mqtt_url, topic_prefix):
    await register_devices(database_url, TEST_DEVICES)
    settings = settings_for(database_url, mqtt_url, topic_prefix)
    async with running_ingest(settings), publisher(mqtt_url) as client:
        await publish(client, f"{topic_prefix}/dev/smoke-1/telemetry",
                      {"seq": 7, "smoke": 2.5, "temperature": 23.5, "alarm": False,
                       "ts": "2026-11-22T08:00:00Z", "firmware": "v3"})  # fmt: skip
        await publish(client, f"{topic_prefix}/dev/door-1/event",
                      {"seq": 1, "event": "access_denied", "credential": "CARD-99"})  # fmt: skip
        await publish(client, f"{topic_prefix}/dev/bin-1/telemetry",
                      [{"seq": 1, "fill": 10}, {"seq": 2, "fill": 11}])  # fmt: skip
        rows = await wait_for(
            lambda: fetch(database_url, "SELECT * FROM telemetry ORDER BY device_id, seq"),
            lambda rows: len(rows) == 3,
        )
        events = await wait_for(
            lambda: fetch(database_url, "SELECT * FROM device_events"), lambda r: len(r) == 1
        )
    smoke = rows[2]
    assert (smoke["device_id"], smoke["seq"], smoke["smoke"], smoke["temperature"]) == (
        "smoke-1", 7, 2.5, 23.5)  # fmt: skip
    assert smoke["alarm"] is False
    assert smoke["time"].isoformat() == "2026-11-22T08:00:00+00:00"
    assert smoke["extra"] == '{"firmware": "v3"}'
    assert [(r["device_id"], r["fill"]) for r in rows[:2]] == [("bin-1", 10), ("bin-1", 11)]
    assert events[0]["event"] == "access_denied"
    assert events[0]["credential_hash"]
    assert "CARD-99" not in str(dict(events[0]))


async def test_every_kind_of_bad_input_is_dead_lettered_and_the_service_stays_up(
    database_url, mqtt_url, topic_prefix
):
    await register_devices(database_url, TEST_DEVICES)
    settings = settings_for(database_url, mqtt_url, topic_prefix)
    p = topic_prefix
    bad = {
        "not_json": (f"{p}/dev/smoke-1/telemetry", b"{oops"),
        "not_utf8": (f"{p}/dev/smoke-1/telemetry", b"\xc3\x28\xa0\xa1"),
        "wrong_type": (f"{p}/dev/smoke-1/telemetry", b'{"alarm": "yes"}'),
        "out_of_range": (f"{p}/dev/bin-1/telemetry", b'{"fill": 140}'),
        "oversized": (f"{p}/dev/smoke-1/telemetry", b'{"pad": "' + b"x" * 20_000 + b'"}'),
        "unknown_device": (f"{p}/dev/intruder-7/telemetry", b'{"smoke": 1}'),
        "device_mismatch": (f"{p}/dev/smoke-1/telemetry", b'{"device_id": "smoke-2"}'),
        "unknown_event": (f"{p}/dev/cover-1/event", b'{"event": "door_forced"}'),
        "bad_status": (f"{p}/dev/cover-1/status", b"maybe"),
    }
    async with running_ingest(settings) as service, publisher(mqtt_url) as client:
        for topic, payload in bad.values():
            await publish(client, topic, payload)
        await publish(client, f"{p}/dev/smoke-2/telemetry", {"smoke": 1})
        letters = await wait_for(
            lambda: fetch(database_url, "SELECT reason, topic, payload FROM dead_letters"),
            lambda rows: len(rows) == len(bad),
        )
        await wait_for(lambda: fetchval(database_url, "SELECT count(*) FROM telemetry"),
                       lambda n: n == 1)  # fmt: skip
        assert service.source.is_connected()
    by_reason = {row["reason"]: row for row in letters}
    assert set(by_reason) == set(bad)
    for reason, (topic, payload) in bad.items():
        assert by_reason[reason]["topic"] == topic
        assert by_reason[reason]["payload"] == payload  # raw bytes kept for inspection


async def test_a_redelivered_seq_is_stored_once(database_url, mqtt_url, topic_prefix):
    await register_devices(database_url, TEST_DEVICES)
    settings = settings_for(database_url, mqtt_url, topic_prefix)
    topic = f"{topic_prefix}/dev/cover-1/telemetry"
    async with running_ingest(settings), publisher(mqtt_url) as client:
        for _ in range(3):  # same batch and later batches
            await publish(client, topic, {"seq": 41, "tilt": 1})
        await publish(client, topic, {"seq": 42, "tilt": 2})
        await wait_for(lambda: fetchval(database_url, "SELECT count(*) FROM telemetry"),
                       lambda n: n >= 2)  # fmt: skip
    # And after a restart (new process memory), the database still knows seq 41.
    async with running_ingest(settings) as service, publisher(mqtt_url) as client:
        await publish(client, topic, {"seq": 41, "tilt": 1})
        await publish(client, topic, {"seq": 43, "tilt": 3})
        await wait_for(lambda: fetchval(database_url, "SELECT count(*) FROM telemetry"),
                       lambda n: n >= 3)  # fmt: skip
        await wait_for(lambda: _committed(service), lambda n: n >= 1)
    seqs = await fetch(database_url, "SELECT seq FROM telemetry ORDER BY seq")
    assert [r["seq"] for r in seqs] == [41, 42, 43]


async def _committed(service) -> int:
    return service.committed_batches


async def test_messages_published_while_down_arrive_after_restart(
    database_url, mqtt_url, topic_prefix
):
    await register_devices(database_url, TEST_DEVICES)
    settings = settings_for(database_url, mqtt_url, topic_prefix)
    async with running_ingest(settings):
        pass  # creates the persistent session
    async with publisher(mqtt_url) as client:
        for seq in range(50):
            await publish(client, f"{topic_prefix}/dev/smoke-1/telemetry", {"seq": seq, "smoke": 1})
    async with running_ingest(settings):
        count = await wait_for(
            lambda: fetchval(database_url, "SELECT count(*) FROM telemetry"), lambda n: n >= 50
        )
    assert count == 50


async def test_last_seen_is_flushed_without_a_write_per_message(
    database_url, mqtt_url, topic_prefix
):
    await register_devices(database_url, TEST_DEVICES)
    settings = settings_for(database_url, mqtt_url, topic_prefix)
    async with running_ingest(settings), publisher(mqtt_url) as client:
        for seq in range(20):
            await publish(client, f"{topic_prefix}/dev/smoke-2/telemetry", {"seq": seq})
        await publish(client, f"{topic_prefix}/dev/smoke-2/status", b"offline")
        row = await wait_for(
            lambda: _last_seen(database_url, "smoke-2"),
            lambda r: r is not None and r["last_seq"] == 19 and r["status"] == "offline",
        )
    assert row["last_seen"] is not None


class _FailingExecute:
    """The pool, with `execute` calls recorded (their device-id arrays) and the call
    numbered `fail_on` raising as if the database went away."""

    def __init__(self, pool: asyncpg.Pool, fail_on: int | None = None) -> None:
        self.pool = pool
        self.fail_on = fail_on
        self.chunks: list[list[str]] = []

    async def execute(self, sql: str, ids: list[str], *args: Any) -> str:
        self.chunks.append(ids)
        if len(self.chunks) == self.fail_on:
            raise OSError("connection lost")
        return await self.pool.execute(sql, ids, *args)


async def test_last_seen_is_written_in_sorted_chunks_and_what_failed_is_kept(
    database_url, mqtt_url, topic_prefix, monkeypatch: pytest.MonkeyPatch
):
    """One statement per LAST_SEEN_CHUNK devices (one for 100,000 held the event loop for
    60-240 ms); a chunk that fails keeps its devices and the later ones for the next flush."""
    await register_devices(database_url, TEST_DEVICES)
    monkeypatch.setattr(consumer, "LAST_SEEN_CHUNK", 2)
    settings = settings_for(database_url, mqtt_url, topic_prefix)
    pool = await create_pool(database_url)
    try:
        service = IngestService(settings, pool, mqtt_url)
        at = datetime.now(UTC).replace(microsecond=0)
        ids = ["smoke-2", "door-1", "bin-1", "cover-1", "smoke-1"]
        seen: dict[str, LastSeen] = {
            d: (at + timedelta(seconds=i), i, None, None) for i, d in enumerate(ids)
        }
        service._last_seen = dict(seen)
        failing = _FailingExecute(pool, fail_on=2)
        service.pool = failing  # type: ignore[assignment]
        with pytest.raises(OSError, match="connection lost"):
            await service.flush_last_seen()
        assert failing.chunks == [["door-1", "smoke-2"], ["bin-1", "cover-1"]]
        assert service._last_seen == {d: seen[d] for d in ["bin-1", "cover-1", "smoke-1"]}
        stored = await fetch(database_url, "SELECT device_id FROM device_last_seen")
        assert sorted(r["device_id"] for r in stored) == ["door-1", "smoke-2"]

        working = _FailingExecute(pool)
        service.pool = working  # type: ignore[assignment]
        await service.flush_last_seen()
        assert working.chunks == [["bin-1", "cover-1"], ["smoke-1"]]
        assert service._last_seen == {}
        stored = await fetch(database_url, "SELECT device_id, last_seen, last_seq "
                                           "FROM device_last_seen")  # fmt: skip
        assert {r["device_id"]: (r["last_seen"], r["last_seq"]) for r in stored} == {
            d: (s[0], s[1]) for d, s in seen.items()
        }
    finally:
        await pool.close()


async def test_a_device_deleted_since_it_was_heard_does_not_stop_the_last_seen_flush(
    database_url, mqtt_url, topic_prefix, caplog: pytest.LogCaptureFixture
):
    """The flush writes without looking each device up (the foreign key checks it); a
    chunk naming a device deleted meanwhile is written again without that device."""
    await register_devices(database_url, TEST_DEVICES)
    settings = settings_for(database_url, mqtt_url, topic_prefix)
    pool = await create_pool(database_url)
    try:
        service = IngestService(settings, pool, mqtt_url)
        at = datetime.now(UTC).replace(microsecond=0)
        service._last_seen = {
            "smoke-1": (at, 7, None, None),
            "deleted-1": (at, 3, "online", at),
            "door-1": (at, 9, None, None),
        }
        with caplog.at_level(logging.WARNING, logger="ingest.consumer"):
            await service.flush_last_seen()
        assert service._last_seen == {}
        stored = await fetch(database_url, "SELECT device_id, last_seq FROM device_last_seen")
        assert {r["device_id"]: r["last_seq"] for r in stored} == {"smoke-1": 7, "door-1": 9}
        assert "last seen of 1 deleted devices dropped: deleted-1" in caplog.text
    finally:
        await pool.close()


async def _last_seen(database_url: str, device_id: str) -> asyncpg.Record | None:
    rows = await fetch(database_url, "SELECT * FROM device_last_seen WHERE device_id = $1",
                       device_id)  # fmt: skip
    return rows[0] if rows else None


async def test_a_flooding_device_is_rate_limited_and_the_others_are_not(
    database_url, mqtt_url, topic_prefix
):
    """smoke-1 publishes 1,000 messages as fast as it can while bin-1 sends 50 at its own
    pace: all of bin-1's are stored; each of smoke-1's is stored or a `rate_limited` dead
    letter with its raw bytes, none lost and none both."""
    await register_devices(database_url, TEST_DEVICES)
    settings = settings_for(
        database_url, mqtt_url, topic_prefix, device_rate_per_s=5.0, device_rate_burst=50
    )
    flood, normal = 1000, 50
    before = metrics.DEAD_LETTERS.labels("rate_limited")._value.get()
    async with running_ingest(settings), publisher(mqtt_url) as client:

        async def flooder() -> None:
            for seq in range(flood):
                await publish(client, f"{topic_prefix}/dev/smoke-1/telemetry",
                              {"seq": seq, "smoke": 1})  # fmt: skip

        async def well_behaved() -> None:
            for seq in range(normal):
                await publish(client, f"{topic_prefix}/dev/bin-1/telemetry",
                              {"seq": seq, "fill": 5})  # fmt: skip
                await asyncio.sleep(0.01)

        await asyncio.gather(flooder(), well_behaved())
        counts = (
            "SELECT (SELECT count(*) FROM telemetry WHERE device_id = 'smoke-1'),"
            " (SELECT count(*) FROM dead_letters WHERE device_id = 'smoke-1'),"
            " (SELECT count(*) FROM telemetry WHERE device_id = 'bin-1')"
        )
        stored, dead, others = await wait_for(
            lambda: fetchrow(database_url, counts),
            lambda row: row[0] + row[1] == flood and row[2] == normal,
        )
    assert others == normal  # the other device is unaffected
    assert stored + dead == flood
    assert 50 <= stored < flood  # the burst, and a little of the rate
    letters = await fetch(database_url, "SELECT reason, detail, payload FROM dead_letters")
    assert {(r["reason"], r["detail"]) for r in letters} == {
        ("rate_limited", "device over 5 msg/s (burst 50)")
    }
    seqs_stored = {r["seq"] for r in await fetch(
        database_url, "SELECT seq FROM telemetry WHERE device_id = 'smoke-1'")}  # fmt: skip
    seqs_dead = {orjson.loads(r["payload"])["seq"] for r in letters}
    assert seqs_stored | seqs_dead == set(range(flood))
    assert not seqs_stored & seqs_dead
    assert metrics.DEAD_LETTERS.labels("rate_limited")._value.get() - before == dead


async def test_decoding_again_for_a_new_device_does_not_charge_the_others_twice(
    database_url, mqtt_url, topic_prefix
):
    """A batch with a device the directory does not know yet is decoded again after a
    registry refresh: only that device's messages, so the rest of the batch keeps its first
    outcome (5 messages of a burst of 5 are not refused on the second pass)."""
    await register_devices(database_url, TEST_DEVICES)
    settings = settings_for(
        database_url, mqtt_url, topic_prefix, device_rate_per_s=0.1, device_rate_burst=5,
        batch_max_delay_ms=500, last_seen_flush_s=30,  # one batch; no periodic refresh
    )  # fmt: skip
    async with running_ingest(settings), publisher(mqtt_url) as client:
        await register_devices(database_url, [("late-1", "smoke_detector", None)])
        await asyncio.sleep(REFRESH_MIN_INTERVAL_S + 0.1)  # an unknown device may refresh
        for seq in range(5):
            await publish(client, f"{topic_prefix}/dev/smoke-1/telemetry", {"seq": seq})
        await publish(client, f"{topic_prefix}/dev/late-1/telemetry", {"seq": 1})
        both = "SELECT (SELECT count(*) FROM telemetry) + (SELECT count(*) FROM dead_letters)"
        await wait_for(lambda: fetchval(database_url, both), lambda n: n >= 6)
        await asyncio.sleep(0.3)
    assert [r["reason"] for r in await fetch(database_url, "SELECT reason FROM dead_letters")] == []
    assert await fetchval(database_url, "SELECT count(*) FROM telemetry") == 6


async def test_a_message_too_deep_to_store_does_not_make_its_batch_go_one_by_one(
    database_url, mqtt_url, topic_prefix, monkeypatch: pytest.MonkeyPatch
):
    """Found by the writer, one reading nested too deeply to write back rolled its whole
    batch back and had it written again message by message (a device could slow the
    ingest down at will); refused when decoded, the batch commits at once."""
    await register_devices(database_url, TEST_DEVICES)
    settings = settings_for(database_url, mqtt_url, topic_prefix)
    pool = await create_pool(database_url)
    try:
        service = IngestService(settings, pool, mqtt_url)
        await service.directory.refresh(pool)

        async def one_by_one(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("the batch was written again message by message")

        monkeypatch.setattr(service, "_commit_one_by_one", one_by_one)
        now = datetime.now(UTC)
        topic = f"{topic_prefix}/dev/bin-1/telemetry"
        hostile = b'{"seq": 50, "fill": 5, "x": ' + b"[" * 300 + b"]" * 300 + b"}"
        batch = [RawMessage(topic, orjson.dumps({"seq": n, "fill": 5}), now) for n in range(50)]
        batch.insert(25, RawMessage(topic, hostile, now))
        result = await service._commit(service.decode(batch))
        letters = await fetch(database_url, "SELECT reason, payload FROM dead_letters")
    finally:
        await pool.close()
    assert result.telemetry_rows == 50
    assert [(r["reason"], r["payload"]) for r in letters] == [("storage_rejected", hostile)]


def test_last_seen_follows_readings_and_statuses_and_costs_the_collector_nothing(
    mqtt_url, topic_prefix
):
    """Newest reading wins (with its seq, or the last known one), a status keeps the seq;
    the entries are tuples of atoms, which the collector stops tracking after one look
    (as mutable objects, 25,000-45,000 of them were a third of every young collection)."""
    settings = settings_for("postgresql://unused/x", mqtt_url, topic_prefix)
    service = IngestService(settings, None, mqtt_url)  # type: ignore[arg-type]  # no database
    t0 = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
    t1, t2 = t0 + timedelta(seconds=1), t0 + timedelta(seconds=2)
    readings = [
        Reading("telemetry", "bin-1", t1, t1, 7, {"fill": 1.0}),
        Reading("telemetry", "bin-1", t0, t0, 6, {"fill": 1.0}),  # older: ignored
        Reading("telemetry", "smoke-1", t0, t0, 3, {}),
        Reading("telemetry", "smoke-1", t1, t1, None, {}),  # no seq: the last one stays
    ]
    statuses = [StatusChange("smoke-1", "offline", t2), StatusChange("door-1", "online", t0)]
    service._record(WriteResult(readings, 4, 0, 0, 0), Decoded(readings, statuses))
    assert service._last_seen == {
        "bin-1": (t1, 7, None, None),
        "smoke-1": (t2, 3, "offline", t2),
        "door-1": (t0, None, "online", t0),
    }
    gc.collect()
    assert not any(gc.is_tracked(entry) for entry in service._last_seen.values())
