"""SLA timers against real PostgreSQL: missed deadlines escalate up the hierarchy, the
deadlines live in the database (a restart catches up, two instances never escalate one
case twice), and the real-time timer fires within seconds of a deadline."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from prometheus_client import REGISTRY

from alerting.cases import SYSTEM, Actor, act, open_case_for_report
from alerting.sla import SlaTimers, sla_task
from gridwarden.clock import Clock, ManualClock, SystemClock
from gridwarden.config import Settings
from gridwarden.db import create_pool
from gridwarden.embedded import EmbeddedPostgres
from tests.ingest_helpers import wait_for

T0 = datetime(2030, 3, 1, 8, 0, tzinfo=UTC)
WAIT_S = 15.0

SQUARE = (
    '{"type": "Polygon", "coordinates": [[[120, 29], [121, 29], [121, 30], [120, 30], [120, 29]]]}'
)
# A small 东华街道: street → community → grid → micro-grid, someone of every role.
CELLS = [
    ("s1", "东华街道", "street", None),
    ("c1", "东华社区", "community", "s1"),
    ("g1", "第1网格", "grid", "c1"),
    ("m1", "第1微网格", "micro", "g1"),
]
WORKERS = [
    # (id, name, role, the cell they cover)
    ("w-grid", "李娜", "grid_worker", "m1"),
    ("w-lead", "陈队长", "grid_leader", "g1"),
    ("w-comm", "王主任", "community_staff", "c1"),
    ("w-street", "刘科长", "street_staff", "s1"),
]
GRID_WORKER = Actor("w-grid", "worker", "w-grid", "grid_worker")


def sla_settings(prefix: str, **overrides: Any) -> Settings:
    # critical: accept 60 s, arrive 300 s, resolve 1200 s, escalation grace 300 s
    values: dict[str, Any] = {
        "topic_prefix": prefix,
        "data_dir": Path("/tmp/gridwarden-tests-unused"),
        "sla_critical_accept_s": 60,
        "sla_critical_arrive_s": 300,
        "sla_critical_resolve_s": 1200,
        "sla_critical_escalate_s": 300,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url)
    conn: asyncpg.Connection
    async with pool.acquire() as conn:
        await conn.executemany(
            "INSERT INTO cells (id, name, level, parent_id, geometry, min_lon, min_lat, max_lon,"
            " max_lat) VALUES ($1, $2, $3, $4, $5::jsonb, 120, 29, 121, 30)",
            [(*cell, SQUARE) for cell in CELLS],
        )
        for worker_id, name, role, cell_id in WORKERS:
            await conn.execute(
                "INSERT INTO workers (id, name, role) VALUES ($1, $2, $3)", worker_id, name, role
            )
            await conn.execute(
                "INSERT INTO worker_cells (worker_id, cell_id) VALUES ($1, $2)", worker_id, cell_id
            )
    yield pool
    await pool.close()


async def open_case(
    pool: asyncpg.Pool, settings: Settings, clock: Clock, report_id: str = "r1"
) -> int:
    """A person's report of smoke in micro-grid m1, opened as the API would."""
    conn: asyncpg.Connection
    async with pool.acquire() as conn, conn.transaction():
        case = await open_case_for_report(
            conn, report_id=report_id, cell_id="m1", lat=29.5, lon=120.5, category="fire",
            description="smoke from a window", priority="critical",
            policy=settings.sla_policy("critical"), reporter=SYSTEM,
            topic_prefix=settings.topic_prefix, now=clock.now(),
        )  # fmt: skip
    return int(case["id"])


async def case_row(pool: asyncpg.Pool, case_id: int) -> asyncpg.Record:
    row = await pool.fetchrow("SELECT * FROM cases WHERE id = $1", case_id)
    assert row is not None
    return row


async def timeline(pool: asyncpg.Pool, case_id: int) -> list[dict[str, Any]]:
    rows = await pool.fetch(
        "SELECT at, actor, action, from_state, to_state, detail FROM case_events"
        " WHERE case_id = $1 ORDER BY id",
        case_id,
    )
    return [{**dict(r), "detail": orjson.loads(r["detail"])} for r in rows]


async def notifications(pool: asyncpg.Pool, prefix: str) -> list[tuple[str, dict[str, Any]]]:
    rows = await pool.fetch(
        "SELECT topic, payload FROM outbox WHERE topic LIKE $1 ORDER BY id", f"{prefix}/workers/%"
    )
    return [(r["topic"], orjson.loads(r["payload"])) for r in rows]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_missed_deadlines_climb_the_hierarchy_then_stay_at_the_top(
    pool: asyncpg.Pool, topic_prefix: str
) -> None:
    settings = sla_settings(topic_prefix)
    clock = ManualClock(T0)
    timers = SlaTimers(pool, settings, clock)
    before = metric("gridwarden_sla_escalations_total", level="grid_leader")
    case_id = await open_case(pool, settings, clock)
    case = await case_row(pool, case_id)
    assert (case["state"], case["assignee"], case["due_step"]) == ("dispatched", "w-grid", "accept")
    assert case["due_at"] == T0 + timedelta(seconds=60)

    clock.advance(59)
    assert await timers.tick_once() == 0  # one second early: nothing
    clock.advance(1)  # the accept deadline, to the second
    assert await timers.tick_once() == 1
    case = await case_row(pool, case_id)
    assert (case["state"], case["level"], case["assignee"]) == (
        "dispatched", "grid_leader", "w-lead")  # fmt: skip
    assert case["accept_met"] is False
    assert case["escalations"] == 1
    assert case["due_at"] == clock.now() + timedelta(seconds=300)  # the escalation grace
    assert metric("gridwarden_sla_escalations_total", level="grid_leader") == before + 1
    assert metric("gridwarden_sla_overdue_cases") == 1

    sent = await notifications(pool, topic_prefix)
    assert [(topic, payload["reason"]) for topic, payload in sent] == [
        (f"{topic_prefix}/workers/w-grid/cases", "dispatched"),
        (f"{topic_prefix}/workers/w-lead/cases", "escalated"),
    ]
    escalated = sent[1][1]
    assert (escalated["case_id"], escalated["level"], escalated["state"]) == (
        case_id, "grid_leader", "dispatched")  # fmt: skip
    events = await timeline(pool, case_id)
    assert [e["action"] for e in events] == ["reported", "dispatched", "escalate", "escalated"]
    escalate = events[2]
    assert (escalate["actor"], escalate["at"], escalate["from_state"], escalate["to_state"]) == (
        "system", T0 + timedelta(seconds=60), "dispatched", "dispatched")  # fmt: skip
    assert escalate["detail"] == {
        "from_level": "grid_worker", "to_level": "grid_leader", "missed": "accept",
        "reason": "deadline missed",
    }  # fmt: skip
    assert events[3]["detail"] == {"assignee": "w-lead", "level": "grid_leader"}

    # The leader does not accept either: community staff, then street staff.
    clock.advance(300)
    assert await timers.tick_once() == 1
    assert (await case_row(pool, case_id))["assignee"] == "w-comm"
    clock.advance(300)
    assert await timers.tick_once() == 1
    case = await case_row(pool, case_id)
    assert (case["level"], case["assignee"], case["escalations"]) == ("street_staff", "w-street", 3)

    # Nobody above the street: it stays there, with more time, and nobody else is told.
    clock.advance(300)
    assert await timers.tick_once() == 1
    case = await case_row(pool, case_id)
    assert (case["state"], case["level"], case["assignee"], case["escalations"]) == (
        "dispatched", "street_staff", "w-street", 3)  # fmt: skip
    assert case["due_at"] == clock.now() + timedelta(seconds=300)
    last = (await timeline(pool, case_id))[-1]
    assert (last["action"], last["detail"]["missed"]) == ("escalation_exhausted", "accept")
    assert [p["reason"] for _, p in await notifications(pool, topic_prefix)] == [
        "dispatched", "escalated", "escalated", "escalated"]  # fmt: skip
    assert await timers.tick_once() == 0  # given more time: not due again at once
    clock.advance(300)
    assert await timers.tick_once() == 1  # ... but due again after the grace
    assert (await timeline(pool, case_id))[-1]["action"] == "escalation_exhausted"


async def test_accepted_in_time_but_not_on_site_by_the_arrive_deadline(
    pool: asyncpg.Pool, topic_prefix: str
) -> None:
    settings = sla_settings(topic_prefix)
    clock = ManualClock(T0)
    timers = SlaTimers(pool, settings, clock)
    case_id = await open_case(pool, settings, clock)
    clock.advance(30)
    async with pool.acquire() as conn, conn.transaction():
        await act(conn, case_id, "accept", GRID_WORKER, {}, now=clock.now(),
                  topic_prefix=topic_prefix)  # fmt: skip
    case = await case_row(pool, case_id)
    assert (case["state"], case["accept_met"], case["due_step"]) == ("accepted", True, "arrive")
    assert case["due_at"] == T0 + timedelta(seconds=300)

    clock.advance(60)  # past the accept deadline: accepted, so nothing to do
    assert await timers.tick_once() == 0
    clock.advance(210)  # T0 + 300: the arrive deadline
    assert await timers.tick_once() == 1
    case = await case_row(pool, case_id)
    assert (case["state"], case["level"], case["assignee"]) == (
        "dispatched", "grid_leader", "w-lead")  # fmt: skip
    assert (case["accept_met"], case["arrive_met"]) == (True, False)
    escalate = [e for e in await timeline(pool, case_id) if e["action"] == "escalate"]
    assert len(escalate) == 1
    assert (escalate[0]["from_state"], escalate[0]["detail"]["missed"]) == ("accepted", "arrive")


async def test_a_case_done_in_time_is_never_escalated(
    pool: asyncpg.Pool, topic_prefix: str
) -> None:
    settings = sla_settings(topic_prefix)
    clock = ManualClock(T0)
    timers = SlaTimers(pool, settings, clock)
    case_id = await open_case(pool, settings, clock)
    for action, body, after_s in (("accept", {}, 20), ("arrive", {}, 200), ("resolve",
                                  {"note": "a pan on the stove; ventilated"}, 600)):  # fmt: skip
        clock.advance(after_s)
        async with pool.acquire() as conn, conn.transaction():
            await act(conn, case_id, action, GRID_WORKER, body, now=clock.now(),
                      topic_prefix=topic_prefix)  # fmt: skip
        assert await timers.tick_once() == 0
    case = await case_row(pool, case_id)
    assert (case["state"], case["due_at"], case["escalations"]) == ("resolved", None, 0)
    assert (case["accept_met"], case["arrive_met"], case["resolve_met"]) == (True, True, True)
    clock.advance(86400)
    assert await timers.tick_once() == 0


async def test_the_policy_snapshot_decides_not_the_current_settings(
    pool: asyncpg.Pool, topic_prefix: str
) -> None:
    clock = ManualClock(T0)
    opened_under = sla_settings(topic_prefix)  # accept 60 s, grace 300 s
    case_id = await open_case(pool, opened_under, clock)
    # The configuration changes (a restart with new values): accept 10 min, grace 30 s.
    changed = sla_settings(topic_prefix, sla_critical_accept_s=600, sla_critical_escalate_s=30)
    timers = SlaTimers(pool, changed, clock)
    assert (await case_row(pool, case_id))["due_at"] == T0 + timedelta(seconds=60)
    clock.advance(60)
    assert await timers.tick_once() == 1  # the old 60 s still holds
    case = await case_row(pool, case_id)
    assert case["due_at"] == clock.now() + timedelta(seconds=300)  # and the old grace
    # A case opened now gets the new policy.
    newer = await open_case(pool, changed, clock, report_id="r2")
    assert (await case_row(pool, newer))["due_at"] == clock.now() + timedelta(seconds=600)


async def test_a_restart_catches_up_on_the_first_tick(
    pool: asyncpg.Pool, topic_prefix: str
) -> None:
    settings = sla_settings(topic_prefix, sla_tick_s=0.05)
    clock = ManualClock(T0)
    case_id = await open_case(pool, settings, clock)
    first = SlaTimers(pool, settings, clock)
    stop = asyncio.Event()
    running = asyncio.create_task(first.run(stop))
    await asyncio.sleep(0.2)  # a few ticks before the deadline: nothing
    stop.set()
    async with asyncio.timeout(WAIT_S):
        await running
    del first, running
    assert (await case_row(pool, case_id))["escalations"] == 0

    clock.advance(3600)  # down for an hour: the accept and the arrive deadline passed
    second = SlaTimers(pool, settings, clock)
    assert await second.tick_once() == 1
    case = await case_row(pool, case_id)
    # One level per missed deadline: the leader gets the grace to respond.
    assert (case["level"], case["assignee"], case["escalations"]) == ("grid_leader", "w-lead", 1)
    assert case["due_at"] == clock.now() + timedelta(seconds=300)
    assert await second.tick_once() == 0


async def test_two_instances_never_escalate_a_case_twice(
    database_url: str, pool: asyncpg.Pool, topic_prefix: str
) -> None:
    settings = sla_settings(topic_prefix)
    clock = ManualClock(T0)
    cases = [await open_case(pool, settings, clock, report_id=f"r{i}") for i in range(30)]
    pools = [await create_pool(database_url, min_size=1, max_size=3) for _ in range(2)]
    try:
        timers = [SlaTimers(p, settings, clock, batch=2) for p in pools]
        for level in ("grid_leader", "community_staff"):
            clock.advance(400)
            async with asyncio.timeout(WAIT_S):
                counts = await asyncio.gather(*(t.tick_once() for t in timers))
            assert sum(counts) == len(cases)
            rows = await pool.fetch("SELECT level, escalations FROM cases ORDER BY id")
            assert {(r["level"], r["escalations"]) for r in rows} == {
                (level, 1 if level == "grid_leader" else 2)
            }
    finally:
        for p in pools:
            await p.close()
    per_case = await pool.fetch(
        "SELECT case_id, count(*) AS n FROM case_events WHERE action = 'escalate' GROUP BY case_id"
    )
    assert sorted(r["case_id"] for r in per_case) == cases
    assert {r["n"] for r in per_case} == {2}
    escalated = await pool.fetchval(
        "SELECT count(*) FROM outbox WHERE payload->>'reason' = 'escalated'"
    )
    assert escalated == 2 * len(cases)


async def test_nobody_on_duty_above_keeps_the_case_with_more_time(
    pool: asyncpg.Pool, topic_prefix: str
) -> None:
    settings = sla_settings(topic_prefix)
    clock = ManualClock(T0)
    timers = SlaTimers(pool, settings, clock)
    await pool.execute("UPDATE workers SET on_duty = false WHERE id <> 'w-grid'")
    case_id = await open_case(pool, settings, clock)
    clock.advance(60)
    exhausted = metric("gridwarden_sla_exhausted_total", why="nobody_on_duty")
    assert await timers.tick_once() == 1
    assert metric("gridwarden_sla_exhausted_total", why="nobody_on_duty") == exhausted + 1
    case = await case_row(pool, case_id)
    assert (case["state"], case["level"], case["assignee"], case["escalations"]) == (
        "dispatched", "grid_worker", "w-grid", 0)  # fmt: skip
    assert case["due_at"] == clock.now() + timedelta(seconds=300)
    last = (await timeline(pool, case_id))[-1]
    assert (last["action"], last["from_state"], last["to_state"]) == (
        "escalation_exhausted", "dispatched", "dispatched")  # fmt: skip
    assert last["detail"] == {"missed": "accept", "reason": "deadline missed"}
    assert await timers.tick_once() == 0  # no escalation on every tick

    await pool.execute("UPDATE workers SET on_duty = true WHERE id = 'w-comm'")
    clock.advance(300)
    assert await timers.tick_once() == 1  # the grid leader is still away: community staff
    case = await case_row(pool, case_id)
    assert (case["level"], case["assignee"], case["accept_met"]) == (
        "community_staff", "w-comm", False)  # fmt: skip


async def test_a_case_nobody_was_on_duty_for_is_dispatched_again_at_its_deadline(
    pool: asyncpg.Pool, topic_prefix: str
) -> None:
    settings = sla_settings(topic_prefix)
    clock = ManualClock(T0)
    timers = SlaTimers(pool, settings, clock)
    await pool.execute("UPDATE workers SET on_duty = false")
    case_id = await open_case(pool, settings, clock)
    case = await case_row(pool, case_id)
    assert (case["state"], case["assignee"], case["due_at"]) == ("reported", None, None)

    clock.advance(60)  # the accept deadline: still nobody
    assert await timers.tick_once() == 1
    case = await case_row(pool, case_id)
    assert (case["state"], case["due_at"]) == ("reported", clock.now() + timedelta(seconds=300))
    last = (await timeline(pool, case_id))[-1]
    assert (last["action"], last["to_state"]) == ("escalation_exhausted", "reported")
    assert await timers.tick_once() == 0

    # The grid leader comes on duty: the next try goes to the next level up.
    await pool.execute("UPDATE workers SET on_duty = true WHERE id = 'w-lead'")
    clock.advance(300)
    assert await timers.tick_once() == 1
    case = await case_row(pool, case_id)
    assert (case["state"], case["level"], case["assignee"], case["accept_met"]) == (
        "dispatched", "grid_leader", "w-lead", False)  # fmt: skip
    assert [p["reason"] for _, p in await notifications(pool, topic_prefix)] == ["escalated"]


async def test_a_reported_case_goes_to_its_own_level_when_only_someone_there_came_back(
    pool: asyncpg.Pool, topic_prefix: str
) -> None:
    settings = sla_settings(topic_prefix)
    clock = ManualClock(T0)
    await pool.execute("UPDATE workers SET on_duty = false")
    case_id = await open_case(pool, settings, clock)
    await pool.execute("UPDATE workers SET on_duty = true WHERE id = 'w-grid'")
    clock.advance(60)
    assert await SlaTimers(pool, settings, clock).tick_once() == 1
    case = await case_row(pool, case_id)
    assert (case["state"], case["level"], case["assignee"]) == (
        "dispatched", "grid_worker", "w-grid")  # fmt: skip
    assert case["due_at"] == clock.now() + timedelta(seconds=300)  # late already: the grace


async def test_a_case_given_back_is_not_handed_again_to_who_turned_it_down(
    pool: asyncpg.Pool, topic_prefix: str
) -> None:
    settings = sla_settings(topic_prefix)
    clock = ManualClock(T0)
    timers = SlaTimers(pool, settings, clock)
    await pool.execute("UPDATE workers SET on_duty = false WHERE id <> 'w-grid'")
    case_id = await open_case(pool, settings, clock)
    clock.advance(10)
    async with pool.acquire() as conn, conn.transaction():
        await act(conn, case_id, "reject", GRID_WORKER, {"reason": "off sick"},
                  now=clock.now(), topic_prefix=topic_prefix)  # fmt: skip
    case = await case_row(pool, case_id)
    assert (case["state"], case["assignee"], case["due_at"]) == (
        "reported", None, T0 + timedelta(seconds=60))  # fmt: skip

    clock.advance(50)  # the accept deadline: only w-grid is on duty, and they said no
    assert await timers.tick_once() == 1
    case = await case_row(pool, case_id)
    assert (case["state"], case["assignee"]) == ("reported", None)
    assert case["due_at"] == clock.now() + timedelta(seconds=300)
    assert [p["reason"] for _, p in await notifications(pool, topic_prefix)] == ["dispatched"]

    await pool.execute("UPDATE workers SET on_duty = true WHERE id = 'w-lead'")
    clock.advance(300)
    assert await timers.tick_once() == 1
    case = await case_row(pool, case_id)
    assert (case["state"], case["level"], case["assignee"]) == (
        "dispatched", "grid_leader", "w-lead")  # fmt: skip


async def test_one_failing_case_does_not_stall_the_others(
    pool: asyncpg.Pool, topic_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = sla_settings(topic_prefix)
    clock = ManualClock(T0)
    timers = SlaTimers(pool, settings, clock, batch=2)
    cases = [await open_case(pool, settings, clock, report_id=f"r{i}") for i in range(5)]
    # A corrupt policy snapshot: escalating this case raises (KeyError in next_deadline).
    await pool.execute("UPDATE cases SET policy = '{}' WHERE id = $1", cases[0])
    failures = metric("gridwarden_sla_failures_total")
    clock.advance(60)
    assert await timers.tick_once() == 4
    assert metric("gridwarden_sla_failures_total") == failures + 1
    assert f"escalating case {cases[0]} failed" in caplog.text
    rows = {r["id"]: r for r in await pool.fetch("SELECT * FROM cases")}
    assert {rows[c]["level"] for c in cases[1:]} == {"grid_leader"}
    bad = rows[cases[0]]
    assert (bad["level"], bad["escalations"]) == ("grid_worker", 0)  # rolled back
    assert bad["due_at"] == clock.now() + timedelta(seconds=30)  # tried again later
    assert await timers.tick_once() == 0


async def test_the_timer_survives_a_database_outage(
    database_url: str,
    embedded_postgres: EmbeddedPostgres,
    pool: asyncpg.Pool,
    topic_prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The timer's connections are cut and the database refuses new ones while a deadline
    passes: the ticks fail (logged), the task keeps going, and the case is escalated as
    soon as the database takes connections again."""
    settings = sla_settings(topic_prefix, sla_tick_s=0.05)
    clock = ManualClock(T0)
    case_id = await open_case(pool, settings, clock)
    timer_pool = await asyncpg.create_pool(
        database_url, min_size=2, max_size=2, server_settings={"application_name": "sla-test"}
    )
    database = await pool.fetchval("SELECT current_database()")
    admin = await asyncpg.connect(embedded_postgres.dsn_for("postgres"))
    stop = asyncio.Event()
    running = asyncio.ensure_future(sla_task(timer_pool, settings, clock)(stop))
    try:
        await asyncio.sleep(0.2)
        await admin.execute(f"ALTER DATABASE {database} ALLOW_CONNECTIONS false")
        killed = await pool.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = 'sla-test'"
        )
        assert killed == 2
        clock.advance(60)  # the deadline passes during the outage
        await wait_for(
            lambda: asyncio.sleep(0, caplog.text), lambda text: "database unavailable" in text
        )
        await asyncio.sleep(0.3)  # a few more failed ticks
        assert not running.done()
        assert (await case_row(pool, case_id))["escalations"] == 0
        await admin.execute(f"ALTER DATABASE {database} ALLOW_CONNECTIONS true")
        async with asyncio.timeout(WAIT_S):
            while (await case_row(pool, case_id))["escalations"] == 0:
                assert not running.done()
                await asyncio.sleep(0.05)
    finally:
        await admin.execute(f"ALTER DATABASE {database} ALLOW_CONNECTIONS true")
        await admin.close()
        stop.set()
        async with asyncio.timeout(WAIT_S):
            await running
        await timer_pool.close()
    assert (await case_row(pool, case_id))["assignee"] == "w-lead"


async def test_a_connection_left_mid_statement_by_an_outage_fails_one_tick_not_the_timer(
    pool: asyncpg.Pool, topic_prefix: str
) -> None:
    """asyncpg raises InternalClientError (not an InterfaceError) when a connection is
    reused while a statement an outage cut short is still in progress on it; seen once in
    the outage test above, where it ended the task. Provoked here by hand: the tick fails
    once, the next tick runs."""
    ticks: list[str] = []

    class FlakyTimers(SlaTimers):
        async def tick_once(self) -> int:
            ticks.append("tick")
            if len(ticks) == 1:
                raise asyncpg.InternalClientError("cannot switch to state 15")
            return await super().tick_once()

    stop = asyncio.Event()
    timers = FlakyTimers(pool, sla_settings(topic_prefix, sla_tick_s=0.02), ManualClock(T0))
    running = asyncio.ensure_future(timers.run(stop))
    await wait_for(lambda: asyncio.sleep(0.01, len(ticks)), lambda n: n >= 3)
    assert not running.done()
    stop.set()
    await asyncio.wait_for(running, 5)


async def test_real_time_a_deadline_fires_within_seconds(
    pool: asyncpg.Pool, topic_prefix: str
) -> None:
    settings = sla_settings(topic_prefix, sla_critical_accept_s=2)
    clock = SystemClock()
    case_id = await open_case(pool, settings, clock)
    due = (await case_row(pool, case_id))["due_at"]
    stop = asyncio.Event()
    running = asyncio.ensure_future(sla_task(pool, settings)(stop))
    try:
        async with asyncio.timeout(10):
            while (await case_row(pool, case_id))["escalations"] == 0:
                assert not running.done()
                await asyncio.sleep(0.05)
        seen = datetime.now(UTC)
    finally:
        stop.set()
        stopping = time.monotonic()
        async with asyncio.timeout(WAIT_S):
            await running
    assert time.monotonic() - stopping < 2  # stops promptly too
    (escalate,) = [e for e in await timeline(pool, case_id) if e["action"] == "escalate"]
    late_s = (escalate["at"] - due).total_seconds()
    assert 0 <= late_s <= 5
    assert (seen - due).total_seconds() <= 5
