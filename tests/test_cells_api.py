"""`GET /api/cells`: the grid as GeoJSON with open alarms, open and overdue cases and
devices per cell (the cell and the cells below it), the level filter, and access."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from alerting.cells_api import router
from gridwarden.auth import create_token
from gridwarden.db import create_pool
from gridwarden.web import AppState, create_app
from tests.test_alarms_api import insert_alarm
from tests.test_cases_api import _box, insert_cell

# street s1 > community c1 > grid g1 > micro m1; c1 > g2; community c2 > grid g3
CELLS = [
    ("s1", "street", None, (116.0, 39.8, 116.4, 40.0)),
    ("c1", "community", "s1", (116.0, 39.8, 116.2, 40.0)),
    ("c2", "community", "s1", (116.2, 39.8, 116.4, 40.0)),
    ("g1", "grid", "c1", (116.0, 39.8, 116.1, 40.0)),
    ("g2", "grid", "c1", (116.1, 39.8, 116.2, 40.0)),
    ("g3", "grid", "c2", (116.2, 39.8, 116.4, 40.0)),
    ("m1", "micro", "g1", (116.0, 39.8, 116.05, 39.9)),
]


@dataclass
class Grid:
    client: httpx.AsyncClient
    pool: asyncpg.Pool
    operator: dict[str, str]
    worker: dict[str, str]

    async def cells(self, query: str = "", who: str = "operator") -> dict[str, Any]:
        headers = self.operator if who == "operator" else self.worker
        response = await self.client.get(f"/api/cells{query}", headers=headers)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("application/geo+json")
        body: dict[str, Any] = response.json()
        return body


@pytest.fixture
async def grid(database_url: str) -> AsyncIterator[Grid]:
    pool = await create_pool(database_url)
    await pool.execute("INSERT INTO workers (id, name, role) VALUES ('w1', 'w1', 'grid_worker')")
    transport = httpx.ASGITransport(app=create_app(AppState(pool), routers=[router]))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw.test") as client:
        yield Grid(
            client,
            pool,
            {"Authorization": f"Bearer {await create_token(pool, 'operator')}"},
            {"Authorization": f"Bearer {await create_token(pool, 'worker', 'w1')}"},
        )
    await pool.close()


async def insert_case(pool: asyncpg.Pool, key: str, cell: str, state: str, due: str | None) -> None:
    """A case in `cell` and `state`; `due` an SQL interval from now ('-1 hour') or None."""
    await pool.execute(
        "INSERT INTO cases (incident_key, origin, category, title, cell_id, state, priority, "
        "policy, due_at) VALUES ($1, 'report', 'x', 'x', $2, $3, 'minor', '{}'::jsonb, "
        "now() + $4::text::interval)",
        key, cell, state, due,
    )  # fmt: skip


async def insert_device(pool: asyncpg.Pool, device_id: str, cell: str | None) -> None:
    await pool.execute(
        "INSERT INTO devices (id, kind, lat, lon, cell_id) VALUES ($1, 'smoke_detector', 39.85, "
        "116.02, $2)",
        device_id, cell,
    )  # fmt: skip


def by_id(collection: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["id"]: f["properties"] for f in collection["features"]}


def counts(props: dict[str, Any]) -> tuple[Any, ...]:
    severity = props["open_alarms_by_severity"]
    return (
        props["open_alarms"],
        (severity["critical"], severity["major"], severity["minor"], severity["warning"]),
        props["open_cases"],
        props["overdue_cases"],
        props["devices"],
    )


async def test_counts_per_cell_roll_up_the_cells_below(grid: Grid) -> None:
    for cell_id, level, parent, box in CELLS:
        await insert_cell(grid.pool, cell_id, level, parent, box)
    for device_id, cell in [("d1", "m1"), ("d2", "m1"), ("d3", "g2"), ("d4", "g3"), ("d5", None)]:
        await insert_device(grid.pool, device_id, cell)
    for severity, state, cell in [
        ("critical", "active", "m1"),
        ("major", "acknowledged", "m1"),
        ("minor", "cleared", "m1"),  # cleared but not closed: still open
        ("warning", "closed", "m1"),  # closed: not counted
        ("major", "active", "g2"),
        ("critical", "closed", "g3"),
        ("critical", "active", None),  # in no cell: on no map
    ]:
        await insert_alarm(grid.pool, severity=severity, state=state, cell=cell)
    for key, cell, state, due in [
        ("k1", "m1", "dispatched", "-1 hour"),  # overdue
        ("k2", "m1", "accepted", "1 hour"),
        ("k3", "m1", "resolved", "-1 hour"),  # resolved: not open, so not overdue either
        ("k4", "m1", "archived", None),
        ("k5", "g3", "reported", None),  # no deadline yet (nobody on duty): not overdue
        ("k6", "g3", "on_site", "-1 minute"),  # overdue
    ]:
        await insert_case(grid.pool, key, cell, state, due)

    collection = await grid.cells()
    assert collection["type"] == "FeatureCollection"
    cells = by_id(collection)
    #                 alarms (crit, major, minor, warn)  cases overdue devices
    assert counts(cells["m1"]) == (3, (1, 1, 1, 0), 2, 1, 2)
    assert counts(cells["g1"]) == (3, (1, 1, 1, 0), 2, 1, 2)  # only what m1 has
    assert counts(cells["g2"]) == (1, (0, 1, 0, 0), 0, 0, 1)
    assert counts(cells["c1"]) == (4, (1, 2, 1, 0), 2, 1, 3)
    assert counts(cells["g3"]) == (0, (0, 0, 0, 0), 2, 1, 1)
    assert counts(cells["c2"]) == (0, (0, 0, 0, 0), 2, 1, 1)
    assert counts(cells["s1"]) == (4, (1, 2, 1, 0), 4, 2, 4)

    # Street to micro level, then by id; each Feature carries geometry, bbox and properties.
    assert [f["id"] for f in collection["features"]] == ["s1", "c1", "c2", "g1", "g2", "g3", "m1"]
    feature = next(f for f in collection["features"] if f["id"] == "m1")
    assert feature["type"] == "Feature"
    assert feature["geometry"] == _box(116.0, 39.8, 116.05, 39.9)
    assert feature["bbox"] == [116.0, 39.8, 116.05, 39.9]
    assert set(feature["properties"]) == {
        "id", "name", "level", "parent", "open_alarms", "open_alarms_by_severity",
        "open_cases", "overdue_cases", "devices",
    }  # fmt: skip
    assert (feature["properties"]["level"], feature["properties"]["parent"]) == ("micro", "g1")
    assert cells["s1"]["parent"] is None


async def test_level_filter_access_and_an_empty_grid(grid: Grid) -> None:
    empty = await grid.cells()
    assert empty == {"type": "FeatureCollection", "features": []}
    for cell_id, level, parent, box in CELLS:
        await insert_cell(grid.pool, cell_id, level, parent, box)
    grids = await grid.cells("?level=grid")
    assert [f["id"] for f in grids["features"]] == ["g1", "g2", "g3"]
    assert [f["id"] for f in (await grid.cells("?level=street"))["features"]] == ["s1"]
    assert len((await grid.cells(who="worker"))["features"]) == len(CELLS)  # any role
    bad = await grid.client.get("/api/cells?level=district", headers=grid.operator)
    assert bad.status_code == 422
    assert (await grid.client.get("/api/cells")).status_code == 401
    # Geometry is passed through as stored (a MultiPolygon stays one).
    multi = {"type": "MultiPolygon", "coordinates": [_box(0, 0, 1, 1)["coordinates"]]}
    await grid.pool.execute(
        "UPDATE cells SET geometry = $1::jsonb WHERE id = 'g2'", orjson.dumps(multi).decode()
    )
    features = (await grid.cells("?level=grid"))["features"]
    assert next(f for f in features if f["id"] == "g2")["geometry"] == multi
