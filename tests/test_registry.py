"""Registries: grid, devices and workers files, checked and imported into a real
PostgreSQL; and the built-in sample city passing its own checks."""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gridwarden.config import Settings
from gridwarden.registry import (
    CellLocator,
    RegistryError,
    check_grid,
    check_workers,
    import_devices,
    import_file,
    import_grid,
    import_workers,
    read_devices_file,
)
from gridwarden.sample_city import build_sample_city, write_sample_city

HASH_KEY = "test-hash-key"

# `database_url` (a fresh migrated database per test) comes from tests/conftest.py.

# --- helpers ------------------------------------------------------------------------------


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(database_url)
    yield connection
    await connection.close()


def square(x0: float, y0: float, x1: float, y1: float) -> dict[str, Any]:
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    return {"type": "Polygon", "coordinates": [ring]}


def feature(
    cell_id: str, level: str, parent: str | None, geometry: dict[str, Any]
) -> dict[str, Any]:
    props = {"id": cell_id, "name": f"cell {cell_id}", "level": level, "parent": parent}
    return {"type": "Feature", "properties": props, "geometry": geometry}


# A street of 4 × 2 degrees: two communities, three grids, G1 split into two micro-grids.
# Feature indices: S 0, C1 1, C2 2, G1 3, G2 4, G3 5, M1 6, M2 7.
BASE = [
    feature("S", "street", None, square(0, 0, 4, 2)),
    feature("C1", "community", "S", square(0, 0, 2, 2)),
    feature("C2", "community", "S", square(2, 0, 4, 2)),
    feature("G1", "grid", "C1", square(0, 0, 1, 2)),
    feature("G2", "grid", "C1", square(1, 0, 2, 2)),
    feature("G3", "grid", "C2", square(2, 0, 4, 2)),
    feature("M1", "micro", "G1", square(0, 0, 1, 1)),
    feature("M2", "micro", "G1", square(0, 1, 1, 2)),
]

Edit = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
DROP = object()


def change(cell_id: str, **changes: Any) -> Edit:
    """Change a feature's geometry or properties (DROP removes a property)."""

    def edit(features: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for item in features:
            if item["properties"]["id"] != cell_id:
                continue
            for key, value in changes.items():
                if key == "geometry":
                    item["geometry"] = value
                elif value is DROP:
                    del item["properties"][key]
                else:
                    item["properties"][key] = value
        return features

    return edit


def drop(*cell_ids: str) -> Edit:
    return lambda features: [f for f in features if f["properties"]["id"] not in cell_ids]


def add(*extra: dict[str, Any]) -> Edit:
    return lambda features: [*features, *extra]


def collection(*edits: Edit) -> dict[str, Any]:
    features = json.loads(json.dumps(BASE))
    for edit in edits:
        features = edit(features)
    return {"type": "FeatureCollection", "features": features}


BOWTIE = {"type": "Polygon", "coordinates": [[[2, 0], [4, 2], [4, 0], [2, 2], [2, 0]]]}
TWO_CORNERS = {  # two squares touching at one point: a valid MultiPolygon
    "type": "MultiPolygon",
    "coordinates": [square(2, 0, 3, 1)["coordinates"], square(3, 1, 4, 2)["coordinates"]],
}

# --- grid validation, as a table ----------------------------------------------------------

# (edits, expected problems: one substring per problem, nothing else allowed;
#  expected warnings the same, or None when they do not matter for the case)
GRID_CASES = [
    # The base grid tiles perfectly; shared edges between siblings are not overlaps.
    pytest.param([], [], [], id="valid"),
    # Micro-grids are optional: a grid without them is complete.
    pytest.param([drop("M1", "M2")], [], [], id="micro-optional"),
    # G2 reaches 0.1° into G1: siblings may not overlap.
    pytest.param([change("G2", geometry=square(0.9, 0, 2, 2))],
                 ["feature [4] (id 'G2'): overlaps sibling 'G1' (feature [3])"], [],
                 id="overlapping-siblings"),
    # An overlap of 2e-10 deg² (a few cm²) is drawing noise, below the tolerance.
    pytest.param([change("G2", geometry=square(1 - 1e-10, 0, 2, 2))], [], [],
                 id="sliver-below-tolerance"),
    # G3 sticks 0.5° out of C2 (and of the street, where C2 ends).
    pytest.param([change("G3", geometry=square(2, 0, 4.5, 2))],
                 ["feature [5] (id 'G3'): 20.00% of its area"], None,
                 id="child-outside-parent"),
    # G3 covers only three quarters of C2: a warning with the share, not an error.
    pytest.param([change("G3", geometry=square(2, 0, 3.5, 2))], [],
                 ["feature [2] (id 'C2'): 25.00% of its area"], id="gap-is-a-warning"),
    # A MultiPolygon is a cell shape too; the rest of C2 is then a gap.
    pytest.param([change("G3", geometry=TWO_CORNERS)], [],
                 ["feature [2] (id 'C2'): 50.00% of its area"], id="multipolygon"),
    # A community without grids is 100% uncovered.
    pytest.param([drop("G3")], [], ["feature [2] (id 'C2'): community has no grid cells"],
                 id="community-without-grids"),
    # "block" is not a level.
    pytest.param([change("G3", level="block")], ["feature [5] (id 'G3'): level: Input should be"],
                 None, id="unknown-level"),
    # A micro-grid directly under a community skips the grid level.
    pytest.param([change("G3", level="micro")],
                 ["feature [5] (id 'G3'): level micro cannot be a child of community 'C2' "
                  "(expected grid)"], None, id="level-skipped"),
    # A grid directly under the street (and now overlapping C2, its new sibling).
    pytest.param([change("G3", parent="S")],
                 ["level grid cannot be a child of street 'S' (expected community)",
                  "feature [5] (id 'G3'): overlaps sibling 'C2'"], None, id="level-too-deep"),
    # Nothing can hang under a micro-grid.
    pytest.param([add(feature("X", "micro", "M1", square(0, 0, 0.5, 0.5)))],
                 ["feature [8] (id 'X'): parent 'M1' is a micro cell"], None,
                 id="child-of-micro"),
    # C9 is in no feature of the file.
    pytest.param([change("G3", parent="C9")], ["feature [5] (id 'G3'): unknown parent 'C9'"],
                 None, id="unknown-parent"),
    # Only streets are top-level; C2 at the top also overlaps the street S.
    pytest.param([change("C2", parent=None)],
                 ["feature [2] (id 'C2'): a community cell needs a parent",
                  "feature [2] (id 'C2'): overlaps sibling 'S'"], None, id="top-level-community"),
    pytest.param([change("G3", parent="G3")], ["feature [5] (id 'G3'): is its own parent"], None,
                 id="own-parent"),
    # A and B are each other's parent: a cycle, and neither level fits under a grid.
    pytest.param([add(feature("A", "grid", "B", square(10, 0, 11, 1)),
                      feature("B", "grid", "A", square(10, 0, 11, 1)))],
                 ["feature [8] (id 'A'): level grid cannot be a child of grid 'B'",
                  "feature [9] (id 'B'): level grid cannot be a child of grid 'A'",
                  "feature [8] (id 'A'): parent chain forms a cycle: A → B → A"], None,
                 id="cycle"),
    # The same id twice: the second is reported, pointing at the first.
    pytest.param([add(feature("G3", "grid", "C2", square(2, 0, 4, 2)))],
                 ["feature [8] (id 'G3'): duplicate id (first at feature [5])"], None,
                 id="duplicate-id"),
    # A bow-tie crosses itself: shapely's explain_validity says where.
    pytest.param([change("G3", geometry=BOWTIE)],
                 ["feature [5] (id 'G3'): geometry: invalid polygon: Self-intersection[3 1]"],
                 None, id="self-intersection"),
    # A ring needs at least four positions.
    pytest.param([change("G3", geometry={"type": "Polygon", "coordinates": [[[2, 0], [4, 0],
                                                                             [2, 0]]]})],
                 ["feature [5] (id 'G3'): geometry: invalid polygon: Too few points"], None,
                 id="ring-too-short"),
    # Coordinates must be numbers.
    pytest.param([change("G3", geometry={"type": "Polygon", "coordinates": [[["a", "b"]] * 4]})],
                 ["feature [5] (id 'G3'): geometry: malformed coordinates"], None,
                 id="malformed-coordinates"),
    # GeoJSON rings end where they start (shapely would close it silently).
    pytest.param([change("G3", geometry={"type": "Polygon",
                                         "coordinates": [[[2, 0], [4, 0], [4, 2], [2, 2]]]})],
                 ["feature [5] (id 'G3'): geometry: a ring is not closed"], None,
                 id="ring-not-closed"),
    # A point is not an area.
    pytest.param([change("G3", geometry={"type": "Point", "coordinates": [3, 1]})],
                 ["feature [5] (id 'G3'): geometry: type must be Polygon or MultiPolygon"], None,
                 id="not-a-polygon"),
    # Latitude 95 is off the globe (coordinates given as [lat, lon], or projected).
    pytest.param([change("G3", geometry=square(2, 95, 4, 96))],
                 ["feature [5] (id 'G3'): geometry: coordinates outside WGS84"], None,
                 id="out-of-range"),
    pytest.param([change("G3", name=DROP)], ["feature [5] (id 'G3'): missing required field "
                                             "'name'"], None, id="missing-name"),
    # Ids go into MQTT topics: no slashes.
    pytest.param([change("M2", id="M/2")], ["feature [7] (id 'M/2'): id: String should match"],
                 None, id="bad-id"),
]  # fmt: skip


@pytest.mark.parametrize(("edits", "problems", "warnings"), GRID_CASES)
def test_grid_rules(edits: list[Edit], problems: list[str], warnings: list[str] | None) -> None:
    check = check_grid(collection(*edits))
    assert len(check.problems) == len(problems), check.problems
    for expected in problems:
        assert any(expected in problem for problem in check.problems), (expected, check.problems)
    if warnings is not None:
        assert len(check.warnings) == len(warnings), check.warnings
        for expected in warnings:
            assert any(expected in warning for warning in check.warnings), (expected, check)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"type": "Feature"}, "must be a GeoJSON FeatureCollection"),  # one feature, not a set
        ({"type": "FeatureCollection", "features": []}, "no features"),
        ([1, 2], "must be a GeoJSON FeatureCollection"),  # not even an object
    ],
)
def test_grid_file_shape(data: object, problem: str) -> None:
    assert [problem in p for p in check_grid(data).problems] == [True]


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False), "utf-8")
    return path


async def count(conn: asyncpg.Connection, table: str) -> int:
    value = await conn.fetchval(f"SELECT count(*) FROM {table}")
    assert isinstance(value, int)
    return value


async def test_bad_grid_lists_every_problem_and_writes_nothing(
    conn: asyncpg.Connection, tmp_path: Path
) -> None:
    path = write_json(
        tmp_path / "grid.geojson",
        collection(
            change("G2", geometry=square(0.9, 0, 2, 2)),  # feature [4] overlaps G1
            change("G3", parent="C9"),  # feature [5] unknown parent
            change("M2", geometry=BOWTIE),  # feature [7] self-intersection
            add({"type": "Feature"}),  # feature [8] no properties, no geometry
        ),
    )
    with pytest.raises(RegistryError) as caught:
        await import_grid(conn, path)
    problems = caught.value.problems
    assert [p.split(":")[0] for p in problems] == [
        "feature [4] (id 'G2')",
        "feature [5] (id 'G3')",
        "feature [7] (id 'M2')",
        "feature [8]",
        "feature [8]",
    ]
    assert "feature [8]" in str(caught.value)
    assert await count(conn, "cells") == 0


async def test_grid_not_json_names_the_line(conn: asyncpg.Connection, tmp_path: Path) -> None:
    path = tmp_path / "grid.geojson"
    path.write_text('{"type": "FeatureCollection",\n "features": [,]}', "utf-8")
    with pytest.raises(RegistryError) as caught:
        await import_grid(conn, path)
    assert caught.value.problems[0].startswith("line 2 column")


# --- devices ------------------------------------------------------------------------------


@pytest.fixture
async def small_grid(conn: asyncpg.Connection, tmp_path: Path) -> Path:
    path = write_json(tmp_path / "grid.geojson", collection())
    report = await import_grid(conn, path)
    assert (report.created, report.updated, report.unchanged) == (8, 0, 0)
    return path


def test_locator_picks_the_deepest_cell() -> None:
    locator = CellLocator(check_grid(collection()).cells)
    assert locator.locate(0.5, 0.5) == "M1"  # micro inside G1 inside C1 inside S
    assert locator.locate(1.5, 1.0) == "G2"  # G2 has no micro-grids
    assert locator.locate(3.0, 1.0) == "G3"
    assert locator.locate(0.5, 1.0) == "M1"  # on the M1/M2 edge: the lowest id, every time
    assert locator.locate(5.0, 1.0) is None  # outside the street
    assert locator.locate(float("nan"), 1.0) is None
    assert locator.ancestors("M2") == ["M2", "G1", "C1", "S"]


async def test_device_cell_is_the_deepest_cell(
    conn: asyncpg.Connection, tmp_path: Path, small_grid: Path
) -> None:
    devices = [
        {"id": "d-micro", "kind": "smoke_detector", "lon": 0.5, "lat": 1.5, "building": "1幢",
         "floor": 3, "interval_s": 300},
        {"id": "d-grid", "kind": "smart_bin", "lon": 1.5, "lat": 0.5, "height_cm": 120},
        {"id": "d-other", "kind": "manhole_cover", "lon": 3.9, "lat": 1.9, "height_cm": 200.5},
    ]  # fmt: skip
    report = await import_devices(conn, write_json(tmp_path / "devices.json", devices))
    assert (report.created, report.updated, report.unchanged) == (3, 0, 0)
    rows = await conn.fetch("SELECT id, cell_id FROM devices ORDER BY id")
    assert {r["id"]: r["cell_id"] for r in rows} == {
        "d-micro": "M2",
        "d-grid": "G2",
        "d-other": "G3",
    }


def write_csv(path: Path, rows: list[list[object]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as out:
        csv.writer(out).writerows(rows)
    return path


async def test_bad_devices_csv_lists_every_line_and_writes_nothing(
    conn: asyncpg.Connection, tmp_path: Path, small_grid: Path
) -> None:
    path = write_csv(
        tmp_path / "devices.csv",
        [
            ["id", "kind", "lat", "lon", "floor", "height_cm"],  # line 1
            ["ok-1", "smoke_detector", "0.5", "0.5", "2", ""],  # line 2: fine
            ["bad-kind", "smoke", "0.5", "0.5", "", ""],  # line 3: unknown kind
            ["bad-lat", "smart_bin", "95", "0.5", "", "120"],  # line 4: latitude out of range
            ["nowhere", "smart_bin", "1.0", "10.0", "", "120"],  # line 5: in no cell
            ["bad id!", "door_access", "0.5", "0.5", "1", ""],  # line 6: id pattern
            ["ok-1", "door_access", "0.5", "0.5", "1", ""],  # line 7: duplicate of line 2
            ["short", "door_access", "0.5"],  # line 8: too few fields
            [],  # line 9: blank, skipped
            ["bad-floor", "smoke_detector", "0.5", "0.5", "3F", "nan"],  # line 10: two problems
            ["ok-2", "manhole_cover", "1.5", "3.5", "", "180"],  # line 11: fine
        ],
    )
    with pytest.raises(RegistryError) as caught:
        await import_devices(conn, path)
    lines = [p.split(" (")[0].split(":")[0] for p in caught.value.problems]
    assert lines == ["line 3", "line 4", "line 5", "line 6", "line 7", "line 8", "line 10",
                     "line 10"]  # fmt: skip
    assert await count(conn, "devices") == 0


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ("id,kind,lat,lon,heigth_cm", "line 1: unknown column(s) 'heigth_cm'"),  # a typo
        ("id,kind,lat", "line 1: missing column(s) 'lon'"),
        ("id,kind,lat,lon,lat", "line 1: duplicate column(s) 'lat'"),
    ],
)
def test_devices_csv_header(tmp_path: Path, header: str, problem: str) -> None:
    path = tmp_path / "devices.csv"
    path.write_text(header + "\n", "utf-8")
    locator = CellLocator(check_grid(collection()).cells)
    assert read_devices_file(path, locator).problems == [problem + _known(problem)]


def _known(problem: str) -> str:
    if "unknown" not in problem:
        return ""
    return " (known: id, kind, lat, lon, name, building, floor, interval_s, height_cm)"


async def test_devices_json_elements_and_grid_first(
    conn: asyncpg.Connection, tmp_path: Path
) -> None:
    path = write_json(
        tmp_path / "devices.json",
        [{"id": "a", "kind": "smart_bin", "lat": 1, "lon": 1}, "nope", {"id": "b", "x": 1}],
    )
    with pytest.raises(RegistryError) as caught:
        await import_devices(conn, path)  # no grid imported yet
    assert caught.value.problems == [
        "there are no grid cells in the database: import the grid first",
        "element [1]: must be an object",
        "element [2] (id 'b'): missing required field 'kind'",
        "element [2] (id 'b'): missing required field 'lat'",
        "element [2] (id 'b'): missing required field 'lon'",
        "element [2] (id 'b'): unknown field 'x'",
    ]


async def test_devices_csv_from_chinese_excel(
    conn: asyncpg.Connection, tmp_path: Path, small_grid: Path
) -> None:
    path = tmp_path / "devices.csv"
    path.write_bytes("id,kind,lat,lon,name\nd1,smoke_detector,0.5,0.5,金鼎花园3幢\n".encode("gbk"))
    report = await import_devices(conn, path)
    assert report.created == 1
    assert report.warnings == ["file is not UTF-8; decoded as GB18030 (GBK)"]
    assert await conn.fetchval("SELECT name FROM devices") == "金鼎花园3幢"


async def test_grid_change_moves_devices(
    conn: asyncpg.Connection, tmp_path: Path, small_grid: Path
) -> None:
    devices = [{"id": "d1", "kind": "smoke_detector", "lat": 0.5, "lon": 0.5}]
    await import_devices(conn, write_json(tmp_path / "devices.json", devices))
    assert await conn.fetchval("SELECT cell_id FROM devices") == "M1"
    swapped = collection(
        change("M1", geometry=square(0, 1, 1, 2)), change("M2", geometry=square(0, 0, 1, 1))
    )
    report = await import_grid(conn, write_json(tmp_path / "grid2.geojson", swapped))
    assert (report.created, report.updated, report.unchanged) == (0, 2, 6)
    assert report.warnings == ["1 devices moved to another cell: d1"]
    assert await conn.fetchval("SELECT cell_id FROM devices") == "M2"


# --- workers ------------------------------------------------------------------------------


async def test_worker_phone_never_stored_in_clear(
    conn: asyncpg.Connection, tmp_path: Path, small_grid: Path
) -> None:
    workers = [
        {"id": "w1", "name": "王丽玲", "role": "grid_worker", "cells": ["G1"],
         "phone": "+86 138-0013-5678"},
        {"id": "w2", "name": "李杰强", "role": "part_time", "cells": ["M1", "M2"],
         "on_duty": False},
    ]  # fmt: skip
    report = await import_workers(
        conn, write_json(tmp_path / "workers.json", workers), hash_key=HASH_KEY
    )
    assert (report.created, report.updated, report.unchanged) == (2, 0, 0)
    row = await conn.fetchrow("SELECT * FROM workers WHERE id = 'w1'")
    assert row is not None
    assert row["phone_masked"] == "138****5678"
    expected = hmac.new(HASH_KEY.encode(), b"13800135678", hashlib.sha256).hexdigest()
    assert row["phone_hash"] == expected
    dump = await conn.fetchval("SELECT string_agg(row_to_json(w)::text, '') FROM workers w")
    assert "0013" not in dump
    assert "13800135678" not in dump
    off = await conn.fetchrow("SELECT on_duty, phone_hash FROM workers WHERE id = 'w2'")
    assert off is not None
    assert (off["on_duty"], off["phone_hash"]) == (False, None)


def test_bad_phone_is_not_echoed() -> None:
    workers = [{"id": "w1", "name": "王", "role": "grid_worker", "cells": ["G1"],
                "phone": "138-SECRET-99"}]  # fmt: skip
    check = check_workers(workers, {"G1": "grid"})
    assert len(check.problems) == 1
    assert check.problems[0].startswith("element [0] (id 'w1'): phone: Value error, not a phone")
    assert "SECRET" not in check.problems[0]


@pytest.mark.parametrize(
    ("worker", "problem"),
    [
        ({"cells": ["G9"]}, "element [0] (id 'w1'): unknown cell(s) 'G9'"),
        ({"cells": []}, "element [0] (id 'w1'): cells: List should have at least 1 item"),
        ({"role": "boss"}, "element [0] (id 'w1'): role: Input should be"),
        ({"on_duty": "sometimes"}, "element [0] (id 'w1'): on_duty: Input should be a valid"),
    ],
)
def test_worker_rules(worker: dict[str, Any], problem: str) -> None:
    data = [{"id": "w1", "name": "王", "role": "grid_worker", "cells": ["G1"], **worker}]
    problems = check_workers(data, {"G1": "grid"}).problems
    assert len(problems) == 1
    assert problems[0].startswith(problem), problems


def test_worker_role_and_level_mismatch_is_a_warning() -> None:
    data = [{"id": "w1", "name": "王", "role": "street_staff", "cells": ["G1"]}]
    check = check_workers(data, {"G1": "grid"})
    assert check.problems == []
    assert check.warnings == ["element [0] (id 'w1'): a street_staff usually does not cover "
                              "'G1' (grid)"]  # fmt: skip


async def test_worker_cells_replaced_on_reimport(
    conn: asyncpg.Connection, tmp_path: Path, small_grid: Path
) -> None:
    path = tmp_path / "workers.json"
    worker = {"id": "w1", "name": "王", "role": "grid_worker", "cells": ["G1", "G2"]}
    await import_workers(conn, write_json(path, [worker]), hash_key=HASH_KEY)
    report = await import_workers(
        conn, write_json(path, [{**worker, "cells": ["G3"]}]), hash_key=HASH_KEY
    )
    assert (report.created, report.updated, report.unchanged) == (0, 1, 0)
    cells = await conn.fetch("SELECT cell_id FROM worker_cells WHERE worker_id = 'w1'")
    assert [r["cell_id"] for r in cells] == ["G3"]


# --- the sample city, and idempotent re-import -------------------------------------------


def test_sample_city_is_deterministic(tmp_path: Path) -> None:
    assert build_sample_city() == build_sample_city()
    first = write_sample_city(tmp_path / "a")
    second = write_sample_city(tmp_path / "b")
    for name in ("grid", "devices", "workers"):
        assert getattr(first, name).read_bytes() == getattr(second, name).read_bytes()


def test_sample_city_passes_its_own_checks(tmp_path: Path) -> None:
    city = build_sample_city()
    grid = check_grid(city.grid)
    assert (grid.problems, grid.warnings) == ([], [])  # no gaps, no overlaps
    levels = {cell.level for cell in grid.cells}
    assert levels == {"street", "community", "grid", "micro"}
    locator = CellLocator(grid.cells)
    files = write_sample_city(tmp_path)
    devices = read_devices_file(files.devices, locator)
    assert devices.problems == []
    assert len(devices.devices) == 300
    assert {d.kind for d in devices.devices} == {
        "smoke_detector", "manhole_cover", "door_access", "smart_bin"
    }  # fmt: skip
    parents = {cell.parent_id for cell in grid.cells}
    assert all(d.cell_id not in parents for d in devices.devices)  # always a leaf cell
    workers = check_workers(city.workers, {cell.id: cell.level for cell in grid.cells})
    assert (workers.problems, workers.warnings) == ([], [])


async def snapshot(conn: asyncpg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    tables = {
        "cells": "SELECT * FROM cells ORDER BY id",
        "devices": "SELECT * FROM devices ORDER BY id",
        "workers": "SELECT * FROM workers ORDER BY id",
        "worker_cells": "SELECT * FROM worker_cells ORDER BY worker_id, cell_id",
    }
    return {name: [tuple(r) for r in await conn.fetch(sql)] for name, sql in tables.items()}


async def test_sample_city_imports_and_reimport_changes_nothing(
    conn: asyncpg.Connection, tmp_path: Path
) -> None:
    city = build_sample_city()
    files = write_sample_city(tmp_path)
    first = [
        await import_grid(conn, files.grid),
        await import_devices(conn, files.devices),
        await import_workers(conn, files.workers, hash_key=HASH_KEY),
    ]
    sizes = [len(city.grid["features"]), len(city.devices), len(city.workers)]
    assert [(r.created, r.updated, r.unchanged) for r in first] == [(n, 0, 0) for n in sizes]
    assert [r.warnings for r in first] == [[], [], []]
    before = await snapshot(conn)

    again = [
        await import_grid(conn, files.grid),
        await import_devices(conn, files.devices),
        await import_workers(conn, files.workers, hash_key=HASH_KEY),
    ]
    assert [(r.created, r.updated, r.unchanged) for r in again] == [(0, 0, n) for n in sizes]
    assert await snapshot(conn) == before  # updated_at included

    # One changed row is one update; the others keep their updated_at.
    text = files.devices.read_text("utf-8").replace(
        "smoke-001,smoke_detector,", "smoke-001,door_access,", 1
    )
    files.devices.write_text(text, "utf-8")
    report = await import_devices(conn, files.devices)
    assert (report.created, report.updated, report.unchanged) == (0, 1, 299)
    after = await snapshot(conn)
    changed = [a for a, b in zip(after["devices"], before["devices"], strict=True) if a != b]
    assert [row[0] for row in changed] == ["smoke-001"]


async def test_import_file_dispatches_by_kind(conn: asyncpg.Connection, tmp_path: Path) -> None:
    settings = Settings(credential_hash_key="cli-key")
    files = write_sample_city(tmp_path)
    for kind, path in (("grid", files.grid), ("devices", files.devices),
                       ("workers", files.workers)):  # fmt: skip
        report = await import_file(conn, kind, path, settings)
        assert report.registry == kind
        assert report.created > 0
    phone = build_sample_city().workers[0]["phone"]
    hashes = await conn.fetch("SELECT phone_hash FROM workers")
    expected = hmac.new(b"cli-key", phone.encode(), hashlib.sha256).hexdigest()
    assert expected in {row["phone_hash"] for row in hashes}
    with pytest.raises(ValueError, match="unknown registry"):
        await import_file(conn, "buildings", files.grid, settings)
