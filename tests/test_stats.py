"""`GET /api/stats`: disposal rate, SLA compliance, durations (median, p90), escalations
and ratings per cell and per worker, over a table of cases with known timings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import pytest

from alerting.alarm_json import iso
from tests.test_cases_api import IN_G1, IN_G3, T0, City, open_city

NO_TIMES = {"median": None, "p90": None}


@pytest.fixture
async def city(database_url: str) -> AsyncIterator[City]:
    async with open_city(database_url, preload=False) as opened:
        # One grid worker on duty in g1 (w-b), so who gets what is plain; g3 → lead-2.
        await opened.pool.execute("UPDATE workers SET on_duty = false WHERE id IN ('w-a', 'w-p')")
        yield opened


async def run_case(
    city: City,
    where: dict[str, float],
    steps: list[tuple[float, str, str, dict[str, Any] | None]],
) -> int:
    """A report now, then (seconds after the report, who, action, body) in order."""
    case = await city.report(where)
    start = city.clock.now()
    for at, who, action, body in steps:
        city.clock.advance((start + timedelta(seconds=at) - city.clock.now()).total_seconds())
        await city.ok(who, case["id"], action, body)
    city.clock.advance(60)
    return int(case["id"])


# SLA (minor): accept 900 s, arrive 3600 s, resolve 14400 s from the report.
CLOSE = [("operator", "verify", None), ("operator", "archive", None)]


async def make_table(city: City) -> None:
    # Forty days before the rest: outside the default window.
    await run_case(city, IN_G1, [])
    city.clock.advance(40 * 86400)
    # A: every step in time, closed and rated 5.
    await run_case(city, IN_G1, [
        (60, "w-b", "accept", None), (600, "w-b", "arrive", None),
        (1200, "w-b", "resolve", {"note": "ok"}),
        *[(1300, who, action, body) for who, action, body in CLOSE],
        (1400, "operator", "rate", {"score": 5}),
    ])  # fmt: skip
    # B: accepted and arrived late, resolved in time; not verified yet.
    await run_case(city, IN_G1, [
        (1000, "w-b", "accept", None), (4000, "w-b", "arrive", None),
        (5000, "w-b", "resolve", {"note": "ok"}),
    ])  # fmt: skip
    # C: accepted in time, then nothing.
    await run_case(city, IN_G1, [(300, "w-b", "accept", None)])
    # D: escalated by the operator straight away (→ lead-1); no step done.
    await run_case(city, IN_G1, [(10, "operator", "escalate", None)])
    # E (g3, lead-2): all in time, closed and rated 3.
    await run_case(city, IN_G3, [
        (120, "lead-2", "accept", None), (240, "lead-2", "arrive", None),
        (360, "lead-2", "resolve", {"note": "ok"}),
        *[(400, who, action, body) for who, action, body in CLOSE],
        (500, "operator", "rate", {"score": 3}),
    ])  # fmt: skip


def times(median: float | None, p90: float | None) -> dict[str, float | None]:
    return {"median": median, "p90": p90}


def approx(value: Any) -> Any:
    """Compare floats approximately, recursively."""
    if isinstance(value, dict):
        return {k: approx(v) for k, v in value.items()}
    if isinstance(value, list):
        return [approx(v) for v in value]
    if isinstance(value, float):
        return pytest.approx(value, abs=1e-9)
    return value


# percentile_cont: p90 of [a, b, c] (sorted) = b + 0.8 (c - b); of [a, b] = a + 0.9 (b - a).
G1 = {
    "cases": 4, "disposed": 2, "disposal_rate": 0.5, "sla_compliance": 5 / 7,
    "accept_s": times(300, 860), "arrive_s": times(2300, 3660),
    "resolve_s": times(3100, 4620), "escalations": 1, "rating_avg": 5.0,
}  # fmt: skip
G3 = {
    "cases": 1, "disposed": 1, "disposal_rate": 1.0, "sla_compliance": 1.0,
    "accept_s": times(120, 120), "arrive_s": times(240, 240),
    "resolve_s": times(360, 360), "escalations": 0, "rating_avg": 3.0,
}  # fmt: skip
TOTAL = {
    "cases": 5, "disposed": 3, "disposal_rate": 0.6, "sla_compliance": 0.8,
    # accept [60, 120, 300, 1000]: p90 = 300 + 0.7 × 700
    "accept_s": times(210, 790), "arrive_s": times(600, 3320),
    "resolve_s": times(1200, 4240), "escalations": 1, "rating_avg": 4.0,
}  # fmt: skip


async def stats(city: City, params: str = "", who: str = "operator") -> Any:
    response = await city.get(f"/api/stats{params}", who=who)
    assert response.status_code == 200, response.text
    return response.json()


async def test_stats_by_cell_and_worker(city: City) -> None:
    await make_table(city)
    now = city.clock.now()
    by_cell = await stats(city)
    assert (by_cell["by"], by_cell["until"]) == ("cell", iso(now))
    assert by_cell["since"] == iso(now - timedelta(days=30))
    assert by_cell["items"] == approx([{"key": "g1", **G1}, {"key": "g3", **G3}])
    assert by_cell["total"] == approx(TOTAL)
    assert await stats(city, "?by=cell", who="admin") == by_cell

    by_worker = await stats(city, "?by=worker")
    lead_1 = {
        "cases": 1, "disposed": 0, "disposal_rate": 0.0, "sla_compliance": None,
        "accept_s": NO_TIMES, "arrive_s": NO_TIMES, "resolve_s": NO_TIMES, "escalations": 1,
        "rating_avg": None,
    }  # fmt: skip
    w_b = {**G1, "cases": 3, "disposal_rate": 2 / 3, "escalations": 0}
    assert by_worker["items"] == approx(
        [{"key": "lead-1", **lead_1}, {"key": "lead-2", **G3}, {"key": "w-b", **w_b}]
    )
    assert by_worker["total"] == approx(TOTAL)


async def test_stats_window(city: City) -> None:
    await make_table(city)

    def window(since: Any, until: Any) -> str:
        return f"?since={quote(iso(since) or '')}&until={quote(iso(until) or '')}"

    # Only the first case: created at T0 exactly (since is inclusive).
    first = await stats(city, window(T0, T0 + timedelta(seconds=1)))
    assert [(i["key"], i["cases"], i["disposed"]) for i in first["items"]] == [("g1", 1, 0)]
    assert first["since"] == iso(T0)
    # until is exclusive: nothing.
    empty = await stats(city, window(T0 - timedelta(hours=1), T0) + "&by=worker")
    assert empty["items"] == []
    assert empty["total"] == {
        "cases": 0, "disposed": 0, "disposal_rate": None, "sla_compliance": None,
        "accept_s": NO_TIMES, "arrive_s": NO_TIMES, "resolve_s": NO_TIMES, "escalations": 0,
        "rating_avg": None,
    }  # fmt: skip
    # Everything, the old case included (open, dispatched to w-b).
    everything = await stats(city, f"?since={quote(iso(T0 - timedelta(days=1)) or '')}")
    assert everything["total"]["cases"] == 6
    assert everything["items"][0]["key"] == "g1"
    assert everything["items"][0]["cases"] == 5
    assert everything["items"][0]["disposal_rate"] == pytest.approx(0.4)
    # A window given only by its end: the 30 days before it.
    before = await stats(city, f"?until={quote(iso(T0 + timedelta(days=1)) or '')}")
    assert before["since"] == iso(T0 + timedelta(days=1) - timedelta(days=30))
    assert before["total"]["cases"] == 1


async def test_stats_refusals(city: City) -> None:
    assert (await city.client.get("/api/stats")).status_code == 401
    refused = await city.get("/api/stats", who="w-b")
    assert refused.status_code == 403
    for params, why in [
        ("?by=street", "by"),
        ("?since=yesterday", "since"),
        ("?since=2026-11-01T00:00:00", "UTC offset"),
        ("?since=2026-11-02T00:00:00Z&until=2026-11-01T00:00:00Z", "until must be after since"),
    ]:
        response = await city.get(f"/api/stats{params}")
        assert response.status_code == 422, params
        assert why in response.text, response.text
