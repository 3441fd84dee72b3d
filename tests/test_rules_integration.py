"""Rules against the real pipeline: MQTT → ingest → rules → alarms in PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import orjson

from gridwarden.config import Settings
from gridwarden.db import create_pool
from gridwarden.readings import Reading
from ingest.consumer import IngestService
from ingest.decode import Decoded, RawMessage
from ingest.directory import DeviceDirectory
from rules import runtime
from rules.engine import AlarmOp
from rules.runtime import EVALUATE_SLICE, RulesService
from rules.store import apply_op, apply_ops, queue_cases
from tests.ingest_helpers import WAIT_S, fetch, publish, publisher, settings_for, wait_for

SQUARE = (
    '{"type": "Polygon", "coordinates": [[[120, 29], [121, 29], [121, 30], [120, 30], [120, 29]]]}'
)


async def register(database_url: str, devices: list[tuple[str, str, int, str | None]]) -> None:
    """A one-cell grid and devices (id, kind, interval_s, building) in it."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO cells (id, name, level, geometry, min_lon, min_lat, max_lon, max_lat) "
            "VALUES ('g1', '第1网格', 'street', $1::jsonb, 120, 29, 121, 30) "
            "ON CONFLICT DO NOTHING",
            SQUARE,
        )
        await conn.executemany(
            "INSERT INTO devices (id, kind, lat, lon, cell_id, interval_s, building) "
            "VALUES ($1, $2, 29.5, 120.5, 'g1', $3, $4)",
            devices,
        )
    finally:
        await conn.close()


@asynccontextmanager
async def wired(settings: Settings) -> AsyncIterator[IngestService]:
    """An ingest service with the rules wired in as `gridwarden up` does, not running."""
    assert settings.database_url
    pool = await create_pool(settings.database_url)
    try:
        ingest = IngestService(settings, pool, settings.mqtt_url or "")
        await ingest.directory.refresh(pool)
        rules = RulesService(settings, pool, ingest.directory.lookup, devices=ingest.directory.ids)
        await rules.start()
        ingest.rules = rules
        yield ingest
    finally:
        await pool.close()


@asynccontextmanager
async def running_pipeline(settings: Settings) -> AsyncIterator[RulesService]:
    """Ingest and rules as `gridwarden up` wires them, without the HTTP server."""
    assert settings.database_url
    assert settings.mqtt_url
    pool = await create_pool(settings.database_url)
    ingest = IngestService(settings, pool, settings.mqtt_url)
    await ingest.directory.refresh(pool)
    rules = RulesService(settings, pool, ingest.directory.lookup, devices=ingest.directory.ids)
    await rules.start()
    ingest.rules = rules
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(ingest.run(stop)),
        asyncio.create_task(ingest.maintain(stop)),
        asyncio.create_task(rules.run_timers(stop)),
    ]
    try:
        assert await ingest.wait_subscribed(WAIT_S)
        yield rules
    finally:
        stop.set()
        async with asyncio.timeout(WAIT_S):
            await asyncio.gather(*tasks)
        await pool.close()


async def alarms(database_url: str) -> list[asyncpg.Record]:
    return await fetch(database_url, "SELECT * FROM alarms ORDER BY id")


async def test_a_published_reading_raises_an_alarm_in_the_right_cell(
    database_url, mqtt_url, topic_prefix
):
    await register(database_url, [("bin-7", "smart_bin", 900, None)])
    settings = settings_for(database_url, mqtt_url, topic_prefix)
    async with running_pipeline(settings), publisher(mqtt_url) as client:
        topic = f"{topic_prefix}/dev/bin-7/telemetry"
        await publish(client, topic, {"seq": 1, "fill": 50})  # below 80 %: nothing
        await publish(client, topic, {"seq": 2, "fill": 85})  # full: minor
        await publish(client, topic, {"seq": 3, "fill": 97})  # fuller: severity rises
        rows = await wait_for(lambda: alarms(database_url), lambda r: r and r[0]["count"] == 2)
        await publish(client, topic, {"seq": 4, "fill": 10})  # emptied: cleared
        rows = await wait_for(
            lambda: alarms(database_url), lambda r: r and r[0]["state"] == "cleared"
        )
    (alarm,) = rows
    assert (alarm["rule"], alarm["cell_id"], alarm["device_id"]) == ("bin.full", "g1", "bin-7")
    assert (alarm["severity"], alarm["count"]) == ("major", 2)
    assert alarm["cleared_at"] is not None


async def test_100_concurrent_duplicates_make_one_alarm_with_count_100(database_url):
    await register(database_url, [("door-9", "door_access", 300, None)])
    pool = await create_pool(database_url, min_size=10, max_size=20)
    at = datetime.now(UTC)
    op = AlarmOp("raise", "door-9", "door.forced", "door-9", "door_access", "major", "g1",
                 None, at)  # fmt: skip

    async def one_transaction() -> None:
        async with pool.acquire() as conn, conn.transaction():
            await apply_op(conn, op, "gw")

    try:
        await asyncio.gather(*(one_transaction() for _ in range(100)))
    finally:
        await pool.close()
    rows = await alarms(database_url)
    assert [(r["rule"], r["count"], r["state"]) for r in rows] == [("door.forced", 100, "active")]
    raised = await fetch(
        database_url, "SELECT count(*) AS n FROM outbox WHERE payload->>'change' = 'raised'"
    )
    assert raised[0]["n"] == 1  # announced once, not 100 times


async def test_a_silent_device_is_alarmed_on_time_without_any_further_message(
    database_url, mqtt_url, topic_prefix
):
    # interval 2 s × 3 intervals: alarmed 6 s after its last message, by a timer.
    await register(database_url, [("smoke-quiet", "smoke_detector", 2, None)])
    settings = settings_for(database_url, mqtt_url, topic_prefix)
    async with running_pipeline(settings), publisher(mqtt_url) as client:
        await publish(client, f"{topic_prefix}/dev/smoke-quiet/telemetry", {"seq": 1, "smoke": 0})
        last = await wait_for(
            lambda: fetch(database_url, "SELECT received_at FROM telemetry"), lambda r: r
        )
        rows = await wait_for(
            lambda: alarms(database_url), lambda r: any(a["rule"] == "smoke.offline" for a in r)
        )
    (offline,) = [a for a in rows if a["rule"] == "smoke.offline"]
    late_s = (offline["first_seen"] - last[0]["received_at"]).total_seconds()
    assert 6.0 <= late_s <= 6.6  # within 10 % of the deadline


async def test_a_restart_in_the_middle_of_a_duration_window_still_fires_on_time(
    database_url, mqtt_url, topic_prefix, tmp_path: Path
):
    # smoke above 10 %/m must hold 4 s; the service restarts 1.5 s into the window.
    (tmp_path / "fast.toml").write_text(
        '[[overrides]]\nrule = "smoke.obscuration_high"\ndevices = ["smoke-5"]\n'
        "set = { for_s = 4 }\n"
    )
    await register(database_url, [("smoke-5", "smoke_detector", 300, None)])
    settings = settings_for(database_url, mqtt_url, topic_prefix, rules_dir=tmp_path)
    async with running_pipeline(settings), publisher(mqtt_url) as client:
        await publish(client, f"{topic_prefix}/dev/smoke-5/telemetry", {"seq": 1, "smoke": 14})
        first = await wait_for(
            lambda: fetch(database_url, "SELECT time FROM telemetry"), lambda r: r
        )
        await asyncio.sleep(1.0)
    assert await alarms(database_url) == []  # stopped before the deadline
    await asyncio.sleep(0.5)
    async with running_pipeline(settings):
        rows = await wait_for(lambda: alarms(database_url), lambda r: r)
    (alarm,) = rows
    fired_after = alarm["first_seen"] - first[0]["time"]
    assert timedelta(seconds=4) <= fired_after <= timedelta(seconds=4.5)
    assert alarm["rule"] == "smoke.obscuration_high"


async def test_two_detectors_of_one_building_make_one_confirmed_fire(
    database_url, mqtt_url, topic_prefix
):
    await register(database_url, [
        ("smoke-a", "smoke_detector", 300, "3号楼"),
        ("smoke-b", "smoke_detector", 300, "3号楼"),
        ("smoke-c", "smoke_detector", 300, "3号楼"),
    ])  # fmt: skip
    settings = settings_for(database_url, mqtt_url, topic_prefix)
    async with running_pipeline(settings), publisher(mqtt_url) as client:
        for seq, device in enumerate(["smoke-a", "smoke-b", "smoke-c"]):
            await publish(client, f"{topic_prefix}/dev/{device}/event",
                          {"seq": seq, "event": "alarm"})  # fmt: skip
        rows = await wait_for(
            lambda: alarms(database_url),
            lambda r: (
                sum(a["rule"] == "smoke.alarm" for a in r) == 3
                and any(a["rule"] == "smoke.fire_confirmed" and a["count"] == 2 for a in r)
            ),
        )
    confirmed = [a for a in rows if a["rule"] == "smoke.fire_confirmed"]
    assert len(confirmed) == 1  # one incident, not one per detector
    assert confirmed[0]["source"] == "building:g1/3号楼"
    assert confirmed[0]["severity"] == "critical"


async def test_a_detector_in_self_test_and_a_muted_cell_raise_nothing(
    database_url, mqtt_url, topic_prefix
):
    await register(database_url, [("smoke-t", "smoke_detector", 300, None),
                                  ("bin-m", "smart_bin", 900, None)])  # fmt: skip
    await fetch(
        database_url,
        "INSERT INTO maintenance_windows (cell_id, starts_at, ends_at, reason) "
        "VALUES ('g1', now() - interval '1 minute', now() + interval '1 hour', 'cleaning')",
    )
    settings = settings_for(database_url, mqtt_url, topic_prefix)
    async with running_pipeline(settings), publisher(mqtt_url) as client:
        await publish(client, f"{topic_prefix}/dev/smoke-t/telemetry",
                      {"seq": 1, "alarm": True, "test": True})  # fmt: skip
        await publish(client, f"{topic_prefix}/dev/bin-m/telemetry", {"seq": 1, "fill": 99})
        await wait_for(
            lambda: fetch(database_url, "SELECT 1 FROM telemetry"), lambda r: len(r) == 2
        )
        await asyncio.sleep(0.5)
    assert await alarms(database_url) == []


async def test_an_acknowledged_alarm_that_clears_is_closed(database_url):
    await register(database_url, [("bin-8", "smart_bin", 900, None)])
    at = datetime.now(UTC)
    raise_op = AlarmOp("raise", "bin-8", "bin.full", "bin-8", "smart_bin", "minor", "g1",
                       None, at)  # fmt: skip
    clear_op = AlarmOp("clear", "bin-8", "bin.full", "bin-8", "smart_bin", "minor", "g1",
                       None, at + timedelta(minutes=5))  # fmt: skip
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await apply_op(conn, raise_op, "gw")
        await conn.execute("UPDATE alarms SET state = 'acknowledged'")
        async with conn.transaction():
            await apply_op(conn, clear_op, "gw")
        row = await conn.fetchrow("SELECT state, closed_at, cleared_at FROM alarms")
        changes = await conn.fetch("SELECT payload->>'change' AS c FROM outbox ORDER BY id")
    finally:
        await conn.close()
    assert row["state"] == "closed"
    assert row["closed_at"] == row["cleared_at"] == clear_op.at
    assert [c["c"] for c in changes] == ["raised", "closed"]


async def test_a_batch_of_alarm_ops_applies_in_order_even_on_one_alarm(database_url):
    """apply_ops writes a batch in a few statements (rounds of distinct alarms); each
    alarm still sees its ops in order, and the outbox carries the changes in op order."""
    await register(database_url, [("bin-a", "smart_bin", 900, None),
                                  ("bin-b", "smart_bin", 900, None)])  # fmt: skip
    at = datetime.now(UTC)

    def op(action: str, device: str, severity: str, minutes: int) -> AlarmOp:
        return AlarmOp(action, device, "bin.full", device, "smart_bin", severity, "g1",  # type: ignore[arg-type]
                       None, at + timedelta(minutes=minutes))  # fmt: skip

    ops = [
        op("raise", "bin-a", "minor", 0), op("raise", "bin-b", "minor", 0),
        op("clear", "bin-a", "minor", 1),  # nothing else opens bin-a's alarm again
        op("raise", "bin-b", "major", 2),  # a repeat, more severe
        op("clear", "bin-b", "minor", 3), op("raise", "bin-b", "minor", 4),  # flaps
        op("clear", "bin-c", "minor", 5),  # nothing open: no alarm changed
    ]  # fmt: skip
    raised: list[tuple[int, AlarmOp]] = []
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            changed = await apply_ops(conn, ops, "gw", raised=raised)
            await queue_cases(conn, raised)
        rows = await conn.fetch(
            "SELECT id, source, state, severity, count, flaps FROM alarms ORDER BY source"
        )
        outbox = await conn.fetch(
            "SELECT payload->>'device_id' AS d, payload->>'change' AS c FROM outbox ORDER BY id"
        )
        queued = await conn.fetchval("SELECT count(*) FROM case_intake")
    finally:
        await conn.close()
    a, b = ({k: v for k, v in r.items() if k != "id"} for r in rows)
    assert [r["id"] for r in rows] == changed[:2]
    assert a == {"source": "bin-a", "state": "cleared", "severity": "minor", "count": 1, "flaps": 0}
    assert b == {"source": "bin-b", "state": "active", "severity": "major", "count": 3, "flaps": 1}
    assert [(r["d"], r["c"]) for r in outbox] == [
        ("bin-a", "raised"), ("bin-b", "raised"), ("bin-a", "cleared"),
        ("bin-b", "severity"), ("bin-b", "cleared"), ("bin-b", "raised"),
    ]  # fmt: skip
    id_a, id_b = changed[0], changed[1]
    assert changed == [id_a, id_b, id_a, id_b, id_b, id_b, None]
    assert [o.source for _, o in raised] == ["bin-a", "bin-b", "bin-b"]  # each raise once
    assert queued == 3


async def test_a_rate_of_rise_spanning_a_restart_fires_though_its_samples_were_never_written(
    database_url, mqtt_url, topic_prefix
):
    # +8 °C within 60 s: 20 °C before the restart, 29 °C after it.
    await register(database_url, [("smoke-r", "smoke_detector", 60, None)])
    settings = settings_for(database_url, mqtt_url, topic_prefix)
    topic = f"{topic_prefix}/dev/smoke-r/telemetry"
    now = datetime.now(UTC).timestamp()
    async with running_pipeline(settings), publisher(mqtt_url) as client:
        await publish(client, topic, {"seq": 1, "ts": now - 20, "temperature": 20.0})
        await publish(client, topic, {"seq": 2, "ts": now - 10, "temperature": 20.5})
        await wait_for(lambda: fetch(database_url, "SELECT 1 FROM telemetry"),
                       lambda rows: len(rows) == 2)  # fmt: skip
        await asyncio.sleep(0.3)  # both batches committed, the engine's memory with them
    states = await fetch(database_url, "SELECT * FROM rule_state WHERE source = 'smoke-r'")
    assert states == []  # the samples lived in memory only
    async with running_pipeline(settings), publisher(mqtt_url) as client:
        await publish(client, topic, {"seq": 3, "ts": now, "temperature": 29.0})
        rows = await wait_for(lambda: alarms(database_url), lambda r: len(r) == 1)
    assert rows[0]["rule"] == "smoke.heat_rate_of_rise"
    assert rows[0]["details"] is not None
    assert '"rise": 9.0' in rows[0]["details"]


async def test_a_bulk_batch_gives_no_turns_away_while_an_alarm_event_waits_or_is_in_flight(
    database_url, mqtt_url, topic_prefix
):
    settings = settings_for(database_url, mqtt_url, topic_prefix)
    pool = await create_pool(database_url)
    try:
        rules = RulesService(settings, pool, lambda device_id: None)
        now = datetime.now(UTC)
        # Unknown devices: evaluated in slices like any batch, with no alarm writes.
        readings = [
            Reading("telemetry", "nobody", now, now, None, {"fill": 1.0})
            for _ in range(5 * EVALUATE_SLICE)
        ]
        turns = 0

        async def count_turns() -> None:
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        async def turns_given_away(hurry: bool = False) -> int:
            async with pool.acquire() as conn:
                before = turns
                await rules.in_transaction(conn, readings, lambda: hurry)
                return turns - before

        counter = asyncio.create_task(count_turns())
        await rules.lock.acquire()  # the bulk batch holds it
        alone = await turns_given_away()
        # An alarm event's batch in flight, on its way to the lock (ingest/priority.py).
        while_an_event_is_in_flight = await turns_given_away(hurry=True)
        waiter = asyncio.create_task(rules.lock.acquire(urgent=True))
        await asyncio.sleep(0)
        assert rules.lock.waiting(urgent=True) == 1
        while_waited_for = await turns_given_away()
        rules.lock.release()
        await waiter
        rules.lock.release()
        counter.cancel()
    finally:
        await pool.close()
    assert alone >= 4  # a turn between each two slices
    assert while_an_event_is_in_flight == 0
    assert while_waited_for == 0


async def test_the_grid_is_read_again_only_when_a_cell_changed(
    database_url, mqtt_url, topic_prefix, monkeypatch
):
    """A refresh re-reads the cells table only when a cell was added or imported again
    (rebuilding the grid every refresh held the event loop 20-60 ms at city size)."""
    await register(database_url, [("bin-7", "smart_bin", 900, None)])
    reads = 0
    read_cells = runtime.CellLocator.from_db

    async def counting(conn: asyncpg.Connection) -> runtime.CellLocator:
        nonlocal reads
        reads += 1
        return await read_cells(conn)

    monkeypatch.setattr(runtime.CellLocator, "from_db", counting)
    settings = settings_for(database_url, mqtt_url, topic_prefix)
    pool = await create_pool(database_url)
    try:
        rules = RulesService(settings, pool, lambda device_id: None)
        await rules.refresh(pool)
        await rules.refresh(pool)
        assert (reads, rules.cells_of("g1.a")) == (1, ("g1.a",))  # unknown yet: itself
        await pool.execute(
            "INSERT INTO cells (id, name, level, parent_id, geometry, min_lon, min_lat,"
            " max_lon, max_lat) VALUES ('g1.a', 'a', 'micro', 'g1', $1::jsonb, 120, 29, 121, 30)",
            SQUARE,
        )
        await rules.refresh(pool)
        assert (reads, rules.cells_of("g1.a")) == (2, ("g1.a", "g1"))
        # Imported again under a new parent: updated_at moves, so the grid is read again.
        await pool.execute(
            "INSERT INTO cells (id, name, level, geometry, min_lon, min_lat, max_lon, max_lat)"
            " VALUES ('g2', '第2网格', 'street', $1::jsonb, 120, 29, 121, 30)",
            SQUARE,
        )
        await rules.refresh(pool)
        await pool.execute(
            "UPDATE cells SET parent_id = 'g2', updated_at = now() WHERE id = 'g1.a'"
        )
        await rules.refresh(pool)
        await rules.refresh(pool)
        assert (reads, rules.cells_of("g1.a")) == (4, ("g1.a", "g2"))
    finally:
        await pool.close()


async def test_devices_registered_later_are_watched_and_an_unchanged_list_is_not_gone_through(
    database_url, mqtt_url, topic_prefix
):
    """A device imported while the service runs is watched for silence from the next
    refresh; while the directory did not change, a refresh does not go through its
    devices (8-16 ms of one callback at 100,000)."""
    await register(database_url, [("bin-7", "smart_bin", 900, None)])
    settings = settings_for(database_url, mqtt_url, topic_prefix)
    pool = await create_pool(database_url)
    try:
        directory = DeviceDirectory(refresh_min_interval_s=0)
        await directory.refresh(pool)
        listed = 0

        def device_ids() -> list[str]:
            nonlocal listed
            listed += 1
            return directory.ids()

        rules = RulesService(settings, pool, directory.lookup, devices=device_ids,
                             devices_version=lambda: directory.version)  # fmt: skip
        await rules.refresh(pool)
        await rules.refresh(pool)
        assert (listed, sorted(rules.engine.heard)) == (1, ["bin-7"])
        await register(database_url, [("bin-8", "smart_bin", 900, None)])
        await directory.refresh(pool)
        await rules.refresh(pool)
        assert (listed, sorted(rules.engine.heard)) == (2, ["bin-7", "bin-8"])
    finally:
        await pool.close()


# --- a critical telemetry alarm is written ahead of its bulk batch ---------------------------


def _telemetry(prefix: str, device: str, values: dict[str, object]) -> RawMessage:
    return RawMessage(f"{prefix}/dev/{device}/telemetry", orjson.dumps(values), datetime.now(UTC))


async def test_an_alarm_reading_commits_ahead_of_its_bulk_batch(
    database_url, mqtt_url, topic_prefix
):
    # A detector's `alarm: true` in the middle of 100 bin readings: once the batch is
    # decoded, the detector's readings (its earlier one too, in order) are committed and its
    # alarm raised; the bin readings are left in the batch for the pipeline.
    await register(database_url, [("sd-a", "smoke_detector", 900, None),
                                  ("bin-a", "smart_bin", 900, None)])  # fmt: skip
    p = topic_prefix
    batch = [_telemetry(p, "bin-a", {"seq": i, "fill": 10}) for i in range(1, 101)]
    batch.insert(40, _telemetry(p, "sd-a", {"seq": 1, "smoke": 0.3}))
    batch.insert(60, _telemetry(p, "sd-a", {"seq": 2, "alarm": True}))
    async with wired(settings_for(database_url, mqtt_url, topic_prefix)) as ingest:
        bulk = ingest.lanes[1]
        decoded = await ingest._decode_bulk(bulk, batch)
        assert {r.device_id for r in decoded.readings} == {"bin-a"}
        assert len(decoded.readings) == 100
        assert list(bulk.unfinished) == [decoded]  # in flight until its batch is acked
    stored = await fetch(database_url, "SELECT device_id, seq FROM telemetry ORDER BY seq")
    assert [(r["device_id"], r["seq"]) for r in stored] == [("sd-a", 1), ("sd-a", 2)]
    raised = await alarms(database_url)
    assert [(r["device_id"], r["rule"], r["state"]) for r in raised] == [
        ("sd-a", "smoke.alarm", "active")
    ]


async def test_a_device_with_a_batch_in_flight_keeps_its_order(
    database_url, mqtt_url, topic_prefix
):
    # The detector has a reading in a batch not yet committed: its alarm reading waits in
    # its own batch, so the rules see the detector's readings in order.
    await register(database_url, [("sd-b", "smoke_detector", 900, None)])
    now = datetime.now(UTC)
    async with wired(settings_for(database_url, mqtt_url, topic_prefix)) as ingest:
        bulk = ingest.lanes[1]
        bulk.unfinished.append(
            Decoded(readings=[Reading("telemetry", "sd-b", now, now, 1, {"smoke": 0.3})])
        )
        decoded = await ingest._decode_bulk(
            bulk, [_telemetry(topic_prefix, "sd-b", {"seq": 2, "alarm": True})]
        )
        assert [(r.device_id, r.seq) for r in decoded.readings] == [("sd-b", 2)]
    assert await fetch(database_url, "SELECT * FROM telemetry") == []
    assert await alarms(database_url) == []


async def test_over_mqtt_the_alarm_reading_commits_before_the_readings_behind_it(
    database_url, mqtt_url, topic_prefix
):
    # A backlog queued while the service was down: 2,500 bin readings, a detector's alarm
    # reading, 100 more bin readings. Every bin reading after the alarm commits in a later
    # transaction than the alarm reading (without writing it ahead, the alarm commits with
    # the bin readings of its batch), and the alarm is raised in the alarm reading's own.
    await register(database_url, [("sd-c", "smoke_detector", 900, None),
                                  ("bin-c", "smart_bin", 900, None)])  # fmt: skip
    settings = settings_for(database_url, mqtt_url, topic_prefix)
    async with running_pipeline(settings):
        pass  # the sessions exist: the broker queues what comes next
    bin_topic, sd_topic = (
        f"{topic_prefix}/dev/bin-c/telemetry",
        f"{topic_prefix}/dev/sd-c/telemetry",
    )
    async with publisher(mqtt_url) as client:
        for seq in range(1, 2501):
            await publish(client, bin_topic, {"seq": seq, "fill": 10})
        await publish(client, sd_topic, {"seq": 1, "alarm": True})
        for seq in range(2501, 2601):
            await publish(client, bin_topic, {"seq": seq, "fill": 10})
    async with running_pipeline(settings):
        await wait_for(
            lambda: fetch(database_url, "SELECT count(*) AS n FROM telemetry"),
            lambda rows: rows[0]["n"] == 2601,
            within_s=60,
        )
    xid = "xmin::text::bigint AS xid"
    (alarm_reading,) = await fetch(
        database_url, f"SELECT {xid} FROM telemetry WHERE device_id = 'sd-c'"
    )
    behind = await fetch(
        database_url, "SELECT min(xmin::text::bigint) AS xid FROM telemetry WHERE seq > 2500"
    )
    assert alarm_reading["xid"] < behind[0]["xid"]
    (raised,) = await fetch(database_url, f"SELECT rule, {xid} FROM alarms")
    assert (raised["rule"], raised["xid"]) == ("smoke.alarm", alarm_reading["xid"])


@dataclass
class WaitingBatch:
    """A decoded bulk batch waiting for the committer's one slot (`_hand_over_growing`)."""

    batch: list[RawMessage]
    decoded: Decoded
    ready: asyncio.Queue[object]
    handing: asyncio.Task[None]


@asynccontextmanager
async def waiting_batch(ingest: IngestService, first: RawMessage) -> AsyncIterator[WaitingBatch]:
    """The batch of `first`, decoded and handed over while a batch the committer has not
    taken yet fills its slot; messages put in the source's queue arrive meanwhile."""
    bulk = ingest.lanes[1]
    batch = [first]
    decoded = await ingest._decode_bulk(bulk, batch)
    ready: asyncio.Queue[object] = asyncio.Queue(1)
    ready.put_nowait("the batch the committer has not taken yet")
    committer = asyncio.create_task(asyncio.Event().wait())
    handing = asyncio.create_task(
        ingest._hand_over_growing(bulk, ready, batch, decoded, committer)  # type: ignore[arg-type]
    )
    try:
        yield WaitingBatch(batch, decoded, ready, handing)
    finally:
        committer.cancel()
        handing.cancel()


def arrive(ingest: IngestService, messages: list[RawMessage]) -> None:
    source = ingest.lanes[1].source
    source._pending.extend(messages)
    source._wakeup.set()


async def test_while_the_committer_is_full_arrivals_join_the_batch_and_an_alarm_goes_ahead(
    database_url, mqtt_url, topic_prefix
):
    # A decoded bulk batch waits for the committer's one slot. Messages arriving meanwhile
    # join it (decoded at once, in order); the detector's alarm among them is committed
    # before the slot frees, not after the hand-over.
    await register(database_url, [("sd-d", "smoke_detector", 900, None),
                                  ("bin-d", "smart_bin", 900, None)])  # fmt: skip
    p = topic_prefix
    async with (
        wired(settings_for(database_url, mqtt_url, topic_prefix)) as ingest,
        waiting_batch(ingest, _telemetry(p, "bin-d", {"seq": 1, "fill": 10})) as waiting,
    ):
        arrive(ingest, [
            _telemetry(p, "bin-d", {"seq": 2, "fill": 10}),
            _telemetry(p, "sd-d", {"seq": 1, "alarm": True}),
            _telemetry(p, "bin-d", {"seq": 3, "fill": 10}),
        ])  # fmt: skip
        raised = await wait_for(lambda: alarms(database_url), lambda rows: len(rows) == 1)
        assert raised[0]["device_id"] == "sd-d"
        assert not waiting.handing.done()  # still waiting for the slot
        waiting.ready.get_nowait()  # the committer takes its batch: room for this one
        await asyncio.wait_for(waiting.handing, WAIT_S)
        assert waiting.ready.get_nowait() == (waiting.batch, waiting.decoded)
    assert len(waiting.batch) == 4  # acknowledged together once the batch commits
    assert [(r.device_id, r.seq) for r in waiting.decoded.readings] == [
        ("bin-d", 1), ("bin-d", 2), ("bin-d", 3)
    ]  # fmt: skip
    stored = await fetch(database_url, "SELECT device_id, seq FROM telemetry")
    assert [(r["device_id"], r["seq"]) for r in stored] == [("sd-d", 1)]


async def test_a_waiting_batch_grows_to_a_full_batch_and_no_further(
    database_url, mqtt_url, topic_prefix
):
    await register(database_url, [("bin-e", "smart_bin", 900, None)])
    p = topic_prefix
    settings = settings_for(database_url, mqtt_url, topic_prefix, batch_max_messages=3)
    async with (
        wired(settings) as ingest,
        waiting_batch(ingest, _telemetry(p, "bin-e", {"seq": 1, "fill": 10})) as waiting,
    ):
        arrive(ingest, [_telemetry(p, "bin-e", {"seq": seq, "fill": 10}) for seq in range(2, 6)])
        await wait_for(lambda: asyncio.sleep(0, len(waiting.batch)), lambda n: n == 3)
        await asyncio.sleep(0.05)  # polled again meanwhile: nothing more joined
        assert len(waiting.batch) == 3
        assert ingest.lanes[1].source.depth() == 2  # left for the next batch
        waiting.ready.get_nowait()
        await asyncio.wait_for(waiting.handing, WAIT_S)
    assert [r.seq for r in waiting.decoded.readings] == [1, 2, 3]


async def test_a_zigbee_smoke_alarm_through_its_codec_is_written_ahead_too(
    database_url, mqtt_url, topic_prefix
):
    # Zigbee2MQTT reports a detector's alarm as state (`smoke: true`), which the codec makes
    # telemetry `alarm: true`: the vendor's usual path for a fire, not the event channel.
    await register(database_url, [("sd-z", "smoke_detector", 900, None),
                                  ("bin-z", "smart_bin", 900, None)])  # fmt: skip
    state = b'{"smoke": true, "battery": 90, "linkquality": 120}'
    zigbee = RawMessage(f"{topic_prefix}/codec/zigbee2mqtt/sd-z", state, datetime.now(UTC))
    batch = [_telemetry(topic_prefix, "bin-z", {"seq": seq, "fill": 10}) for seq in range(1, 50)]
    async with wired(settings_for(database_url, mqtt_url, topic_prefix)) as ingest:
        decoded = await ingest._decode_bulk(ingest.lanes[1], [*batch, zigbee])
        assert {r.device_id for r in decoded.readings} == {"bin-z"}
    raised = await alarms(database_url)
    assert [(r["device_id"], r["rule"]) for r in raised] == [("sd-z", "smoke.alarm")]
