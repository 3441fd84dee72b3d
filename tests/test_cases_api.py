"""The case endpoints: reports and dispatch, the closed loop through the API, refusals,
reject / reassign / escalate / reopen, the timeline, listing and the worker's own cases."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from alerting.alarm_json import iso
from alerting.cases_api import attach_cases, router
from gridwarden.auth import create_token
from gridwarden.clock import ManualClock
from gridwarden.config import Settings
from gridwarden.db import create_pool
from gridwarden.web import AppState, create_app

T0 = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
PREFIX = "gwt"
SETTINGS = Settings(
    topic_prefix=PREFIX,
    sla_minor_accept_s=900,
    sla_minor_arrive_s=3600,
    sla_minor_resolve_s=4 * 3600,
    sla_minor_escalate_s=1800,
    sla_critical_accept_s=60,
)


def _box(min_lon: float, min_lat: float, max_lon: float, max_lat: float) -> dict[str, Any]:
    ring = [[min_lon, min_lat], [max_lon, min_lat], [max_lon, max_lat], [min_lon, max_lat],
            [min_lon, min_lat]]  # fmt: skip
    return {"type": "Polygon", "coordinates": [ring]}


# street s1 > community c1 > grids g1, g2; community c2 > grid g3 (lon 116.0–116.4, lat 39.8–40.0)
CELLS = [
    ("s1", "street", None, (116.0, 39.8, 116.4, 40.0)),
    ("c1", "community", "s1", (116.0, 39.8, 116.2, 40.0)),
    ("c2", "community", "s1", (116.2, 39.8, 116.4, 40.0)),
    ("g1", "grid", "c1", (116.0, 39.8, 116.1, 40.0)),
    ("g2", "grid", "c1", (116.1, 39.8, 116.2, 40.0)),
    ("g3", "grid", "c2", (116.2, 39.8, 116.4, 40.0)),
]
IN_G1 = {"lat": 39.9, "lon": 116.05}
IN_G2 = {"lat": 39.9, "lon": 116.15}
IN_G3 = {"lat": 39.9, "lon": 116.3}
OUTSIDE = {"lat": 39.9, "lon": 117.05}
# (id, role, cell, on duty). g2 and g3 have nobody at grid level.
WORKERS = [
    ("w-a", "grid_worker", "g1", True),  # already has one open case (the preload)
    ("w-aoff", "grid_worker", "g1", False),  # would be first (no open case, id) but off duty
    ("w-b", "grid_worker", "g1", True),
    ("w-p", "part_time", "g1", True),
    ("lead-1", "grid_leader", "c1", True),
    ("lead-2", "grid_leader", "c2", True),
    ("cs-1", "community_staff", "c1", True),
    ("ss-1", "street_staff", "s1", True),
]


async def insert_cell(
    pool: asyncpg.Pool, cell_id: str, level: str, parent: str | None, box: tuple[float, ...]
) -> None:
    await pool.execute(
        "INSERT INTO cells (id, name, level, parent_id, geometry, min_lon, min_lat, max_lon, "
        "max_lat) VALUES ($1, $1, $2, $3, $4::jsonb, $5, $6, $7, $8)",
        cell_id, level, parent, orjson.dumps(_box(*box)).decode(), *box,
    )  # fmt: skip


@dataclass
class City:
    client: httpx.AsyncClient
    pool: asyncpg.Pool
    clock: ManualClock
    tokens: dict[str, dict[str, str]]  # "operator", "admin" and every worker id

    async def report(self, where: dict[str, float], who: str = "operator", **extra: Any) -> Any:
        body = {**where, "category": "占道经营", "description": "路口有流动摊贩", **extra}
        response = await self.client.post("/api/reports", json=body, headers=self.tokens[who])
        assert response.status_code == 201, response.text
        return response.json()

    async def act(
        self, who: str, case_id: int, action: str, body: dict[str, Any] | None = None
    ) -> httpx.Response:
        return await self.client.post(
            f"/api/cases/{case_id}/{action}", json=body, headers=self.tokens[who]
        )

    async def ok(
        self, who: str, case_id: int, action: str, body: dict[str, Any] | None = None
    ) -> Any:
        response = await self.act(who, case_id, action, body)
        assert response.status_code == 200, response.text
        return response.json()

    async def get(self, path: str, who: str = "operator") -> httpx.Response:
        return await self.client.get(path, headers=self.tokens[who])


@asynccontextmanager
async def open_city(database_url: str, *, preload: bool = True) -> AsyncIterator[City]:
    """The cell tree and workers above, a token for each, the API on a ManualClock at T0.
    `preload`: w-a has one open case already (created the day before T0)."""
    pool = await create_pool(database_url)
    try:
        for cell_id, level, parent, box in CELLS:
            await insert_cell(pool, cell_id, level, parent, box)
        for worker_id, role, cell, on_duty in WORKERS:
            await pool.execute(
                "INSERT INTO workers (id, name, role, on_duty) VALUES ($1, $1, $2, $3)",
                worker_id, role, on_duty,
            )  # fmt: skip
            await pool.execute(
                "INSERT INTO worker_cells (worker_id, cell_id) VALUES ($1, $2)", worker_id, cell
            )
        if preload:
            await pool.execute(
                "INSERT INTO cases (incident_key, origin, category, title, cell_id, state, "
                "priority, assignee, policy, created_at) VALUES ('preload', 'report', 'x', 'x', "
                "'g1', 'dispatched', 'minor', 'w-a', $1::jsonb, $2)",
                orjson.dumps(SETTINGS.sla_policy("minor")).decode(), T0 - timedelta(days=1),
            )  # fmt: skip
        tokens = {
            "operator": await create_token(pool, "operator"),
            "admin": await create_token(pool, "admin"),
        }
        for worker_id, *_ in WORKERS:
            tokens[worker_id] = await create_token(pool, "worker", worker_id)
        clock = ManualClock(T0)
        app = create_app(AppState(pool), routers=[router])
        attach_cases(app, settings=SETTINGS, clock=clock)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield City(
                client,
                pool,
                clock,
                {who: {"Authorization": f"Bearer {token}"} for who, token in tokens.items()},
            )
    finally:
        await pool.close()


@pytest.fixture
async def city(database_url: str) -> AsyncIterator[City]:
    async with open_city(database_url) as opened:
        yield opened


def steps(case: dict[str, Any]) -> list[tuple[str, str, str | None, str | None]]:
    """The timeline as (who, action, from, to)."""
    return [(e["who"], e["action"], e["from"], e["to"]) for e in case["timeline"]]


# -- dispatch


async def test_report_is_dispatched_to_the_responsible_worker(city: City) -> None:
    first = await city.report(IN_G1)
    # Grid workers before the part-timer; the fewest open cases (w-a has one); the
    # off-duty w-aoff is skipped although it has none and sorts first.
    assert (first["cell_id"], first["state"], first["assignee"], first["level"]) == (
        "g1", "dispatched", "w-b", "grid_worker")  # fmt: skip
    assert first["priority"] == "minor"
    assert first["origin"] == "report"
    assert first["location"] == IN_G1
    assert first["due_step"] == "accept"
    assert first["due_at"] == iso(T0 + timedelta(seconds=900))
    assert first["alarm_ids"] == []
    operator = first["timeline"][0]["who"]
    assert re.fullmatch(r"operator:\d+", operator)
    assert steps(first) == [
        (operator, "reported", None, "reported"),
        ("system", "dispatched", "reported", "dispatched"),
    ]
    assert first["timeline"][1]["detail"] == {"assignee": "w-b", "level": "grid_worker"}
    assert {e["at"] for e in first["timeline"]} == {iso(T0)}
    # The worker is told on their topic (CONTRACT §6), through the outbox.
    note = await city.pool.fetchrow("SELECT topic, payload FROM outbox ORDER BY id DESC LIMIT 1")
    assert note["topic"] == f"{PREFIX}/workers/w-b/cases"
    assert orjson.loads(note["payload"])["case_id"] == first["id"]

    # Both grid workers have one open case now: round robin, the longest since given one.
    assignees = []
    for _ in range(3):
        city.clock.advance(1)
        assignees.append((await city.report(IN_G1))["assignee"])
    assert assignees == ["w-a", "w-b", "w-a"]

    # Nobody at grid level in g2 / g3: the grid leader of the community.
    g2 = await city.report(IN_G2)
    assert (g2["cell_id"], g2["assignee"], g2["level"]) == ("g2", "lead-1", "grid_leader")
    g3 = await city.report(IN_G3, priority="critical")
    assert (g3["cell_id"], g3["assignee"], g3["level"]) == ("g3", "lead-2", "grid_leader")
    assert g3["priority"] == "critical"
    assert g3["due_at"] == iso(city.clock.now() + timedelta(seconds=60))

    # The part-timer when no grid worker is on duty; then the leader; then the community.
    await city.pool.execute("UPDATE workers SET on_duty = false WHERE id IN ('w-a', 'w-b')")
    assert (await city.report(IN_G1))["assignee"] == "w-p"
    await city.pool.execute("UPDATE workers SET on_duty = false WHERE id = 'w-p'")
    assert (await city.report(IN_G1))["assignee"] == "lead-1"
    await city.pool.execute("UPDATE workers SET on_duty = false WHERE id = 'lead-1'")
    nobody_below = await city.report(IN_G1)
    assert (nobody_below["assignee"], nobody_below["level"]) == ("cs-1", "community_staff")
    # Back on duty, w-aoff (no open case) is first again.
    await city.pool.execute("UPDATE workers SET on_duty = true WHERE id = 'w-aoff'")
    assert (await city.report(IN_G1))["assignee"] == "w-aoff"


async def test_a_grid_worker_comes_before_a_part_timer_of_the_micro_grid(city: City) -> None:
    # A micro-grid inside g1 with its own part-timer: the grid's grid worker still
    # comes first (role before nearness); the nearest part-timer before g1's.
    await insert_cell(city.pool, "g1m", "micro", "g1", (116.0, 39.85, 116.1, 39.95))
    await city.pool.execute(
        "INSERT INTO workers (id, name, role) VALUES ('w-pm', 'w-pm', 'part_time')"
    )
    await city.pool.execute("INSERT INTO worker_cells (worker_id, cell_id) VALUES ('w-pm', 'g1m')")
    case = await city.report(IN_G1)
    assert (case["cell_id"], case["assignee"]) == ("g1m", "w-b")
    await city.pool.execute("UPDATE workers SET on_duty = false WHERE role = 'grid_worker'")
    city.clock.advance(60)  # the grid is re-read after a minute
    assert (await city.report(IN_G1))["assignee"] == "w-pm"


async def test_nobody_on_duty_leaves_the_case_reported(city: City) -> None:
    await city.pool.execute("UPDATE workers SET on_duty = false")
    case = await city.report(IN_G3)
    assert (case["state"], case["assignee"]) == ("reported", None)
    assert [e["action"] for e in case["timeline"]] == ["reported", "unassigned"]


async def test_reports_by_workers_and_validation(city: City) -> None:
    by_worker = await city.report(IN_G2, who="w-p", category="井盖缺失", priority="major")
    assert by_worker["timeline"][0]["who"] == "w-p"
    assert (by_worker["category"], by_worker["priority"]) == ("井盖缺失", "major")
    assert by_worker["title"] == "井盖缺失: 路口有流动摊贩"

    async def refused(body: Any, who: str | None = "operator") -> dict[str, Any]:
        headers = city.tokens[who] if who else {}
        response = await city.client.post("/api/reports", json=body, headers=headers)
        assert response.status_code == 422, response.text
        return dict(response.json())

    good = {**IN_G1, "category": "垃圾", "description": "垃圾满溢"}
    outside = await refused({**good, **OUTSIDE})
    assert "in no grid cell" in outside["error"]
    for bad in [
        {**good, "lat": 90.5},
        {**good, "lon": -181},
        {**good, "lat": "39.9"},
        {**good, "category": ""},
        {**good, "category": "x" * 65},
        {**good, "description": "   "},
        {**good, "description": "x" * 2001},
        {**good, "priority": "urgent"},
        {**good, "photo": "a.jpg"},
        {"lat": 39.9, "lon": 116.05},
        [good],
    ]:
        problems = (await refused(bad))["problems"]
        assert problems, bad
    assert "lat" in str((await refused({**good, "lat": 91}))["problems"])
    response = await city.client.post("/api/reports", json=good)
    assert response.status_code == 401
    assert (
        await city.pool.fetchval("SELECT count(*) FROM cases WHERE incident_key <> 'preload'") == 1
    )


async def test_the_grid_is_reread_after_a_minute(city: City) -> None:
    await city.report(IN_G1)  # loads the grid
    await insert_cell(city.pool, "s2", "street", None, (117.0, 39.8, 117.1, 40.0))
    outside = await city.client.post(
        "/api/reports",
        json={**OUTSIDE, "category": "c", "description": "d"},
        headers=city.tokens["operator"],
    )
    assert outside.status_code == 422
    city.clock.advance(61)
    case = await city.report(OUTSIDE)
    assert case["cell_id"] == "s2"
    assert (case["state"], case["assignee"]) == ("reported", None)  # nobody works there


# -- the closed loop


async def test_closed_loop_accept_to_rated(city: City) -> None:
    case = await city.report(IN_G1)
    case_id = case["id"]
    assert case["assignee"] == "w-b"
    operator = case["timeline"][0]["who"]

    # Another worker can neither see nor act on it.
    other = await city.get(f"/api/cases/{case_id}", who="w-a")
    assert other.status_code == 403
    assert other.json() == {"error": "a worker sees their own cases only"}
    refused = await city.act("w-a", case_id, "accept")
    assert refused.status_code == 403
    assert "own cases" in refused.json()["error"]
    # Wrong state: a clear 409.
    early = await city.act("w-b", case_id, "arrive")
    assert early.status_code == 409
    assert early.json() == {"error": "cannot arrive a case that is dispatched (only from accepted)"}

    city.clock.advance(60)
    accepted = await city.ok("w-b", case_id, "accept")
    assert (accepted["state"], accepted["due_step"]) == ("accepted", "arrive")
    assert accepted["due_at"] == iso(T0 + timedelta(seconds=3600))
    assert (await city.act("w-b", case_id, "accept")).status_code == 409
    city.clock.advance(540)
    assert (await city.ok("w-b", case_id, "arrive"))["state"] == "on_site"
    city.clock.advance(600)
    missing = await city.act("w-b", case_id, "resolve")
    assert missing.status_code == 422
    assert missing.json() == {"error": "note is required"}
    resolved = await city.ok("w-b", case_id, "resolve", {"note": "已劝离摊贩，路口已清理"})
    assert (resolved["state"], resolved["due_at"]) == ("resolved", None)

    # The resolver may not verify their own work, nor archive.
    assert (await city.act("w-b", case_id, "verify")).status_code == 403
    assert (await city.act("w-b", case_id, "archive")).status_code == 403
    archive_early = await city.act("operator", case_id, "archive")
    assert archive_early.status_code == 409
    assert "cannot archive a case that is resolved" in archive_early.json()["error"]
    city.clock.advance(60)
    assert (await city.ok("operator", case_id, "verify", {"note": "现场核实"}))["state"] == (
        "verified"
    )
    city.clock.advance(60)
    assert (await city.ok("admin", case_id, "archive"))["state"] == "archived"
    for score in (0, 6, "5", 4.5, True, None):
        bad = await city.act("operator", case_id, "rate", {"score": score})
        assert bad.status_code == 422, score
        assert bad.json() == {"error": "score must be a whole number from 1 to 5"}
    assert (await city.act("w-b", case_id, "rate", {"score": 5})).status_code == 403
    city.clock.advance(60)
    rated = await city.ok("operator", case_id, "rate", {"score": 5, "comment": "处置及时"})
    assert (rated["state"], rated["rating"]) == ("archived", 5)

    # The whole timeline, who / what / when, as the worker who did it sees it.
    mine = await city.get(f"/api/cases/{case_id}", who="w-b")
    assert mine.status_code == 200
    final = mine.json()
    assert final == rated
    admin = final["timeline"][-2]["who"]
    assert re.fullmatch(r"admin:\d+", admin)
    assert [(e["at"], *step) for e, step in zip(final["timeline"], steps(final), strict=True)] == [
        (iso(T0), operator, "reported", None, "reported"),
        (iso(T0), "system", "dispatched", "reported", "dispatched"),
        (iso(T0 + timedelta(seconds=60)), "w-b", "accept", "dispatched", "accepted"),
        (iso(T0 + timedelta(seconds=600)), "w-b", "arrive", "accepted", "on_site"),
        (iso(T0 + timedelta(seconds=1200)), "w-b", "resolve", "on_site", "resolved"),
        (iso(T0 + timedelta(seconds=1260)), operator, "verify", "resolved", "verified"),
        (iso(T0 + timedelta(seconds=1320)), admin, "archive", "verified", "archived"),
        (iso(T0 + timedelta(seconds=1380)), operator, "rate", "archived", "archived"),
    ]
    details = [e["detail"] for e in final["timeline"]]
    assert details[4] == {"note": "已劝离摊贩，路口已清理"}
    assert details[5] == {"note": "现场核实"}
    assert details[7] == {"score": 5, "comment": "处置及时"}
    row = await city.pool.fetchrow("SELECT * FROM cases WHERE id = $1", case_id)
    assert (row["accept_met"], row["arrive_met"], row["resolve_met"]) == (True, True, True)
    assert row["resolved_by"] == "w-b"
    assert row["verified_by"] == operator


async def test_a_supervisor_who_resolved_may_not_verify(city: City) -> None:
    case_id = (await city.report(IN_G2))["id"]  # → lead-1, nobody at grid level
    for action, body in [("accept", None), ("arrive", None), ("resolve", {"note": "修好了"})]:
        await city.ok("lead-1", case_id, action, body)
    own = await city.act("lead-1", case_id, "verify")
    assert (own.status_code, own.json()) == (403, {"error": "verify is not allowed to lead-1"})
    verified = await city.ok("cs-1", case_id, "verify")  # another supervisor may
    assert verified["timeline"][-1]["who"] == "cs-1"
    # An operator who did the work may not verify it either; another operator may.
    by_desk = (await city.report(IN_G1))["id"]
    for action, body in [("accept", None), ("arrive", None), ("resolve", {"note": "电话处理"})]:
        await city.ok("operator", by_desk, action, body)
    same = await city.act("operator", by_desk, "verify")
    assert (same.status_code, same.json()) == (
        403, {"error": "the verifier must not be the worker who resolved it"})  # fmt: skip
    assert (await city.ok("admin", by_desk, "verify"))["state"] == "verified"
    # A plain grid worker may not verify someone else's case.
    case_2 = (await city.report(IN_G2))["id"]
    for action, body in [("accept", None), ("arrive", None), ("resolve", {"note": "好"})]:
        await city.ok("lead-1", case_2, action, body)
    assert (await city.act("w-a", case_2, "verify")).status_code == 403


async def test_reject_goes_to_the_next_candidate(city: City) -> None:
    case_id = (await city.report(IN_G1))["id"]
    no_reason = await city.act("w-b", case_id, "reject")
    assert no_reason.status_code == 422
    assert no_reason.json() == {"error": "reason is required"}
    city.clock.advance(10)
    after_b = await city.ok("w-b", case_id, "reject", {"reason": "不在辖区"})
    # The other grid worker (more open cases, still before the part-timer).
    assert (after_b["state"], after_b["assignee"]) == ("dispatched", "w-a")
    assert (await city.get(f"/api/cases/{case_id}", who="w-b")).status_code == 403
    city.clock.advance(10)
    after_a = await city.ok("w-a", case_id, "reject", {"reason": "正在处理另一起"})
    assert after_a["assignee"] == "w-p"
    city.clock.advance(10)
    after_p = await city.ok("w-p", case_id, "reject", {"reason": "今天休息"})
    assert (after_p["assignee"], after_p["level"]) == ("lead-1", "grid_leader")
    assert [(e["who"], e["action"], e["detail"]) for e in after_p["timeline"][2:]] == [
        ("w-b", "reject", {"reason": "不在辖区"}),
        ("system", "reassigned", {"assignee": "w-a", "level": "grid_worker"}),
        ("w-a", "reject", {"reason": "正在处理另一起"}),
        ("system", "reassigned", {"assignee": "w-p", "level": "grid_worker"}),
        ("w-p", "reject", {"reason": "今天休息"}),
        ("system", "reassigned", {"assignee": "lead-1", "level": "grid_leader"}),
    ]
    rejected = await city.pool.fetchval("SELECT rejected_by FROM cases WHERE id = $1", case_id)
    assert rejected == ["w-b", "w-a", "w-p"]
    # Rejecting from the wrong state.
    await city.ok("lead-1", case_id, "accept")
    late = await city.act("lead-1", case_id, "reject", {"reason": "x"})
    assert late.status_code == 409


async def test_reassign_by_an_operator(city: City) -> None:
    case_id = (await city.report(IN_G1))["id"]  # → w-b
    assert (await city.act("w-b", case_id, "reassign", {"worker_id": "w-a"})).status_code == 403
    missing = await city.act("operator", case_id, "reassign")
    assert (missing.status_code, missing.json()) == (422, {"error": "worker_id is required"})
    unknown = await city.act("operator", case_id, "reassign", {"worker_id": "nobody"})
    assert (unknown.status_code, unknown.json()) == (404, {"error": "no worker 'nobody'"})
    city.clock.advance(30)
    moved = await city.ok("operator", case_id, "reassign", {"worker_id": "w-p"})
    assert (moved["assignee"], moved["level"], moved["state"]) == (
        "w-p",
        "grid_worker",
        "dispatched",
    )
    assert moved["timeline"][-1]["action"] == "reassigned"
    assert moved["timeline"][-1]["who"].startswith("operator:")
    assert moved["timeline"][-1]["at"] == iso(T0 + timedelta(seconds=30))
    # A grid leader (a supervisor) may reassign a case that is not theirs.
    to_leader = await city.ok("lead-1", case_id, "reassign", {"worker_id": "w-a"})
    assert to_leader["assignee"] == "w-a"
    # Once accepted it can still be reassigned (an open state); once resolved, not.
    await city.ok("w-a", case_id, "accept")
    assert (await city.ok("operator", case_id, "reassign", {"worker_id": "w-b"}))["state"] == (
        "dispatched"
    )
    for action, body in [("accept", None), ("arrive", None), ("resolve", {"note": "ok"})]:
        await city.ok("w-b", case_id, action, body)
    closed = await city.act("operator", case_id, "reassign", {"worker_id": "w-a"})
    assert closed.status_code == 409


async def test_escalate_up_the_hierarchy(city: City) -> None:
    case_id = (await city.report(IN_G1))["id"]  # → w-b
    assert (await city.act("w-a", case_id, "escalate")).status_code == 403
    city.clock.advance(5)
    up = await city.ok("w-b", case_id, "escalate", {"reason": "需要执法队"})
    assert (up["assignee"], up["level"], up["escalations"]) == ("lead-1", "grid_leader", 1)
    assert up["timeline"][-2]["detail"] == {
        "from_level": "grid_worker", "to_level": "grid_leader", "missed": None,
        "reason": "需要执法队",
    }  # fmt: skip
    assert (up["timeline"][-1]["action"], up["timeline"][-1]["who"]) == ("escalated", "w-b")
    up = await city.ok("operator", case_id, "escalate")
    assert (up["assignee"], up["level"], up["escalations"]) == ("cs-1", "community_staff", 2)
    up = await city.ok("cs-1", case_id, "escalate")
    assert (up["assignee"], up["level"], up["escalations"]) == ("ss-1", "street_staff", 3)
    top = await city.ok("operator", case_id, "escalate")
    assert (top["assignee"], top["level"], top["escalations"]) == ("ss-1", "street_staff", 3)
    assert top["timeline"][-1]["action"] == "escalation_exhausted"


async def test_reopen_sends_it_back_to_the_worker(city: City) -> None:
    case_id = (await city.report(IN_G1))["id"]
    for action, body in [("accept", None), ("arrive", None), ("resolve", {"note": "ok"})]:
        await city.ok("w-b", case_id, action, body)
    no_reason = await city.act("operator", case_id, "reopen")
    assert no_reason.status_code == 422
    reopened = await city.ok("operator", case_id, "reopen", {"reason": "摊贩又回来了"})
    assert (reopened["state"], reopened["assignee"]) == ("dispatched", "w-b")
    assert [e["action"] for e in reopened["timeline"][-2:]] == ["reopen", "reopened"]


async def test_action_bodies_and_unknowns(city: City) -> None:
    case_id = (await city.report(IN_G1))["id"]
    path = f"/api/cases/{case_id}/accept"
    headers = city.tokens["w-b"]
    for raw, why in [(b"[1, 2]", "not list"), (b'"x"', "not str"), (b"{nope", "it is not JSON")]:
        response = await city.client.post(path, content=raw, headers=headers)
        assert response.status_code == 422, raw
        assert why in response.json()["error"]
    assert (await city.client.post(path)).status_code == 401
    unknown = await city.act("operator", case_id, "explode")
    assert unknown.status_code == 404
    assert "unknown action 'explode'" in unknown.json()["error"]
    assert (await city.act("operator", 999_999, "accept")).status_code == 404
    assert (await city.act("operator", 0, "accept")).status_code == 422
    # Refused actions leave no trace.
    events = await city.pool.fetchval(
        "SELECT count(*) FROM case_events WHERE case_id = $1", case_id
    )
    assert events == 2
    # An empty object is fine.
    response = await city.client.post(path, content=b"{}", headers=headers)
    assert response.status_code == 200


# -- reading


async def test_get_one_case(city: City) -> None:
    assert (await city.client.get("/api/cases/1")).status_code == 401
    missing = await city.get("/api/cases/424242")
    assert (missing.status_code, missing.json()) == (404, {"error": "no case 424242"})
    assert (await city.get("/api/cases/424242", who="w-a")).status_code == 404
    case = await city.report(IN_G1)
    got = await city.get(f"/api/cases/{case['id']}")
    assert got.json() == case


async def test_supervisors_act_and_read_only_in_their_area(city: City) -> None:
    case = await city.report(IN_G1)  # g1 is in c1: lead-1's area, not lead-2's
    path = f"/api/cases/{case['id']}"
    assert (await city.get(path, who="lead-1")).status_code == 200
    assert (await city.get(path, who="ss-1")).status_code == 200  # the street covers all
    assert (await city.get(path, who="lead-2")).status_code == 403
    outside = await city.act("lead-2", case["id"], "reassign", {"worker_id": "w-b"})
    assert outside.status_code == 403
    assert "outside lead-2's area" in outside.json()["error"]
    moved = await city.ok("lead-1", case["id"], "reassign", {"worker_id": "w-b"})
    assert moved["assignee"] == "w-b"


async def test_list_filters_pagination_and_own_cases(city: City) -> None:
    preload = await city.pool.fetchval("SELECT id FROM cases WHERE incident_key = 'preload'")
    ids: dict[str, int] = {}
    for name, where, priority in [
        ("g1-b", IN_G1, "minor"),  # → w-b
        ("g1-a", IN_G1, "major"),  # → w-a
        ("g2", IN_G2, "critical"),  # → lead-1
        ("g3", IN_G3, "minor"),  # → lead-2
        ("g1-b2", IN_G1, "warning"),  # → w-b
    ]:
        city.clock.advance(1)
        ids[name] = (await city.report(where, priority=priority))["id"]
    await city.ok("w-b", ids["g1-b"], "accept")
    await city.ok("lead-2", ids["g3"], "accept")
    await city.ok("lead-2", ids["g3"], "arrive")
    names = {v: k for k, v in ids.items()} | {preload: "preload"}

    async def listed(params: str, who: str = "operator") -> list[str]:
        response = await city.get(f"/api/cases{params}", who=who)
        assert response.status_code == 200, response.text
        return [names[item["id"]] for item in response.json()["items"]]

    everything = ["g1-b2", "g3", "g2", "g1-a", "g1-b", "preload"]
    assert await listed("") == everything
    assert await listed("", who="admin") == everything
    assert await listed("?state=dispatched") == ["g1-b2", "g2", "g1-a", "preload"]
    assert await listed("?state=accepted,on_site") == ["g3", "g1-b"]
    assert await listed("?state=resolved") == []
    assert await listed("?worker=w-b") == ["g1-b2", "g1-b"]
    assert await listed("?cell=c1") == ["g1-b2", "g2", "g1-a", "g1-b", "preload"]
    assert await listed("?cell=s1") == everything
    assert await listed("?cell=g2") == ["g2"]
    assert await listed("?cell=nowhere") == []
    assert await listed("?priority=minor,critical") == ["g3", "g2", "g1-b", "preload"]
    assert await listed("?cell=c1&state=dispatched&priority=major") == ["g1-a"]
    item = (await city.get("/api/cases?cell=g3")).json()["items"][0]
    assert "timeline" not in item
    assert (item["state"], item["assignee"], item["cell_id"]) == ("on_site", "lead-2", "g3")

    # Pagination: newest first, the cursor is the last id of a full page.
    seen: list[str] = []
    cursor = ""
    for _ in range(10):
        page = (await city.get(f"/api/cases?limit=4{cursor}")).json()
        seen += [names[i["id"]] for i in page["items"]]
        if page["next_cursor"] is None:
            break
        cursor = f"&cursor={page['next_cursor']}"
    assert seen == everything
    first = (await city.get("/api/cases?limit=2")).json()
    assert first["next_cursor"] == str(ids["g3"])
    assert await listed(f"?cursor={ids['g2']}") == ["g1-a", "g1-b", "preload"]

    # A worker sees their own cases only, whatever the filters.
    assert await listed("", who="w-b") == ["g1-b2", "g1-b"]
    assert await listed("?worker=w-b&state=accepted", who="w-b") == ["g1-b"]
    assert await listed("?cell=g3", who="w-b") == []
    assert await listed("", who="w-a") == ["g1-a", "preload"]
    assert await listed("", who="ss-1") == []
    foreign = await city.get("/api/cases?worker=w-a", who="w-b")
    assert (foreign.status_code, foreign.json()) == (
        403,
        {"error": "a worker sees their own cases only"},
    )

    for bad in ("?state=open", "?priority=urgent", "?limit=0", "?limit=1001", "?cursor=0"):
        assert (await city.get(f"/api/cases{bad}")).status_code == 422, bad
    bad_state = (await city.get("/api/cases?state=dispatched,open")).json()
    assert "'open'" in bad_state["error"]
    assert (await city.client.get("/api/cases")).status_code == 401
