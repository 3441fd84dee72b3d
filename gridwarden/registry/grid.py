"""The grid registry: street > community > grid > micro cells (CONTRACT §4).

`check_grid` validates a GeoJSON FeatureCollection without touching the database:
geometry validity (shapely's explain_validity), the level ladder, unknown parents,
duplicate ids, cycles, overlapping siblings and children leaving their parent. Gaps
(area of a parent not covered by its children) are warnings, not errors.
`import_grid` then upserts the cells in one transaction, and re-places the devices if
a geometry changed. `CellLocator` finds the deepest cell containing a point.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Final, Literal

import asyncpg
import shapely
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from shapely.geometry import Point, shape
from shapely.validation import explain_validity

from gridwarden.db import query
from gridwarden.registry.common import (
    ID_PATTERN,
    ImportReport,
    RegistryError,
    changes,
    describe_validation_error,
    label,
    listed,
    parse_json,
    read_text,
    sort_problems,
)

Level = Literal["street", "community", "grid", "micro"]
LEVELS: Final[tuple[Level, ...]] = ("street", "community", "grid", "micro")
DEPTH: Final[dict[str, int]] = {level: depth for depth, level in enumerate(LEVELS)}

# Overlaps, spill-overs and gaps below this are drawing noise, not errors.
# 1e-9 deg² is about 10 m² at the latitudes of China.
AREA_TOLERANCE_DEG2: Final = 1e-9
_M_PER_DEG: Final = 111_320.0
_POLYGONAL: Final = ("Polygon", "MultiPolygon")


class CellProperties(BaseModel):
    """A Feature's `properties`; other keys (styling, population…) are ignored."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    id: str = Field(pattern=ID_PATTERN)
    name: str = Field(min_length=1, max_length=200)
    level: Level
    parent: str | None = None


class Cell(BaseModel):
    """One validated cell. `geometry` is GeoJSON (type and coordinates only)."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    level: Level
    parent_id: str | None
    geometry: dict[str, Any]

    @cached_property
    def shape(self) -> Any:
        """The shapely geometry (built once)."""
        return shape(self.geometry)

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(min_lon, min_lat, max_lon, max_lat)."""
        min_lon, min_lat, max_lon, max_lat = self.shape.bounds
        return (float(min_lon), float(min_lat), float(max_lon), float(max_lat))

    @property
    def depth(self) -> int:
        return DEPTH[self.level]


class GridCheck(BaseModel):
    """The outcome of validating a grid file: cells, or problems (both may be partial)."""

    cells: list[Cell] = []
    problems: list[str] = []
    warnings: list[str] = []

    @property
    def ok(self) -> bool:
        return not self.problems


def approx_m2(area_deg2: float, lat: float) -> float:
    """deg² to m², good enough for messages."""
    return area_deg2 * _M_PER_DEG * _M_PER_DEG * math.cos(math.radians(lat))


def _area_text(area_deg2: float, whole_deg2: float, lat: float) -> str:
    share = 100.0 * area_deg2 / whole_deg2 if whole_deg2 > 0 else 100.0
    return f"{share:.2f}% of its area (≈ {approx_m2(area_deg2, lat):,.0f} m²)"


def _geometry_problem(geometry: object) -> tuple[dict[str, Any] | None, Any, str | None]:
    """(clean GeoJSON, shapely shape, None) or (None, None, why)."""
    if not isinstance(geometry, dict):
        return None, None, "geometry: must be a Polygon or MultiPolygon object"
    kind = geometry.get("type")
    if kind not in _POLYGONAL:
        return None, None, f"geometry: type must be Polygon or MultiPolygon (got {kind!r})"
    if "coordinates" not in geometry:
        return None, None, "geometry: missing coordinates"
    clean = {"type": kind, "coordinates": geometry["coordinates"]}
    try:
        built = shape(clean)
    except Exception as exc:  # shapely raises several types for malformed coordinates
        return None, None, f"geometry: malformed coordinates ({exc})"
    if built.is_empty:
        return None, None, "geometry: empty"
    if not _rings_closed(kind, clean["coordinates"]):
        return None, None, "geometry: a ring is not closed (first and last positions differ)"
    bounds = built.bounds
    if not all(math.isfinite(value) for value in bounds):
        return None, None, "geometry: coordinates must be finite numbers"
    min_lon, min_lat, max_lon, max_lat = bounds
    if min_lon < -180 or max_lon > 180 or min_lat < -90 or max_lat > 90:
        why = "geometry: coordinates outside WGS84 lon/lat range (are they [lon, lat] in degrees?)"
        return None, None, why
    if not built.is_valid:
        return None, None, f"geometry: invalid polygon: {explain_validity(built)}"
    if built.area <= 0:
        return None, None, "geometry: zero area"
    return clean, built, None


def _rings_closed(kind: str, coordinates: Any) -> bool:
    """RFC 7946 §3.1.6: a ring's first and last positions are the same (shapely would
    close it silently)."""
    polygons = [coordinates] if kind == "Polygon" else list(coordinates)
    return all(
        len(ring) > 0 and list(ring[0]) == list(ring[-1])
        for polygon in polygons
        for ring in polygon
    )


def check_grid(data: object) -> GridCheck:
    """Validate a GeoJSON FeatureCollection of cells; every problem is listed."""
    if not isinstance(data, dict) or data.get("type") != "FeatureCollection":
        return GridCheck(problems=["the file must be a GeoJSON FeatureCollection"])
    features = data.get("features")
    if not isinstance(features, list):
        return GridCheck(problems=["FeatureCollection: 'features' must be an array"])
    if not features:
        return GridCheck(problems=["FeatureCollection: no features"])

    problems: list[str] = []
    parsed: list[tuple[int, Cell]] = []
    mentioned: set[str] = set()  # ids of every feature, even broken ones
    for index, feature in enumerate(features):
        where = f"feature [{index}]"
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            problems.append(f"{where}: not a GeoJSON Feature")
            continue
        raw_props = feature.get("properties")
        raw_id = raw_props.get("id") if isinstance(raw_props, dict) else None
        if isinstance(raw_id, str):
            mentioned.add(raw_id.strip())
        where = label(where, raw_id)
        props: CellProperties | None = None
        if not isinstance(raw_props, dict):
            problems.append(f"{where}: properties must be an object with id, name, level, parent")
        else:
            try:
                props = CellProperties.model_validate(raw_props)
            except ValidationError as exc:
                problems.extend(describe_validation_error(where, exc))
        clean, _, why = _geometry_problem(feature.get("geometry"))
        if why is not None:
            problems.append(f"{where}: {why}")
        if props is not None and clean is not None:
            cell = Cell(
                id=props.id,
                name=props.name,
                level=props.level,
                parent_id=props.parent,
                geometry=clean,
            )
            parsed.append((index, cell))

    # Duplicate ids: the first one wins for the checks below.
    by_id: dict[str, tuple[int, Cell]] = {}
    for index, cell in parsed:
        if cell.id in by_id:
            first = by_id[cell.id][0]
            problems.append(
                f"{label(f'feature [{index}]', cell.id)}: duplicate id (first at feature [{first}])"
            )
            continue
        by_id[cell.id] = (index, cell)

    problems.extend(_ladder_problems(by_id, mentioned))
    problems.extend(_cycle_problems(by_id))
    geometry_problems, warnings = _geometry_relations(by_id)
    problems.extend(geometry_problems)
    cells = [cell for _, cell in by_id.values()]
    return GridCheck(cells=cells, problems=sort_problems(problems), warnings=warnings)


def _ladder_problems(by_id: dict[str, tuple[int, Cell]], mentioned: set[str]) -> list[str]:
    """Each child exactly one level below its parent; only streets are top-level."""
    problems = []
    for index, cell in by_id.values():
        where = label(f"feature [{index}]", cell.id)
        parent_id = cell.parent_id
        if parent_id is None:
            if cell.level != "street":
                problems.append(
                    f"{where}: a {cell.level} cell needs a parent (only street cells are top-level)"
                )
            continue
        if parent_id == cell.id:
            problems.append(f"{where}: is its own parent")
            continue
        if parent_id not in by_id:
            if parent_id not in mentioned:  # a broken parent has its own problems listed
                problems.append(f"{where}: unknown parent {parent_id!r} (not in this file)")
            continue
        parent = by_id[parent_id][1]
        if parent.level == "micro":
            problems.append(f"{where}: parent {parent_id!r} is a micro cell, which has no children")
        elif cell.depth != parent.depth + 1:
            expected = LEVELS[parent.depth + 1]
            problems.append(
                f"{where}: level {cell.level} cannot be a child of {parent.level} "
                f"{parent_id!r} (expected {expected})"
            )
    return problems


def _cycle_problems(by_id: dict[str, tuple[int, Cell]]) -> list[str]:
    problems = []
    reported: set[str] = set()
    for start in by_id:
        chain: list[str] = []
        seen: set[str] = set()
        current: str | None = start
        while current is not None and current in by_id and current not in seen:
            seen.add(current)
            chain.append(current)
            current = by_id[current][1].parent_id
        if current is None or current not in seen or current in reported:
            continue
        loop = chain[chain.index(current) :]
        reported.update(loop)
        if len(loop) == 1:
            continue  # its own parent: reported by the ladder check
        index = min(by_id[member][0] for member in loop)
        where = label(f"feature [{index}]", by_id[loop[0]][1].id)
        path = " → ".join([*loop, current])
        problems.append(f"{where}: parent chain forms a cycle: {path}")
    return problems


def _geometry_relations(by_id: dict[str, tuple[int, Cell]]) -> tuple[list[str], list[str]]:
    """Overlapping siblings and children outside their parent (problems); gaps (warnings)."""
    problems: list[str] = []
    warnings: list[str] = []
    children: dict[str | None, list[tuple[int, Cell]]] = defaultdict(list)
    for index, cell in by_id.values():
        children[cell.parent_id].append((index, cell))

    for siblings in children.values():
        problems.extend(_sibling_overlaps(siblings))

    for parent_id, kids in children.items():
        if parent_id is None or parent_id not in by_id:
            continue
        parent = by_id[parent_id][1]
        for index, kid in kids:
            spill = kid.shape.difference(parent.shape).area
            if spill > AREA_TOLERANCE_DEG2:
                lat = kid.shape.centroid.y
                problems.append(
                    f"{label(f'feature [{index}]', kid.id)}: "
                    f"{_area_text(spill, kid.shape.area, lat)} lies outside its parent "
                    f"{parent_id!r}"
                )

    for index, cell in sorted(by_id.values(), key=lambda item: item[0]):
        kids = children.get(cell.id, [])
        lat = cell.shape.centroid.y
        if not kids:
            if cell.level in ("street", "community"):
                warnings.append(
                    f"{label(f'feature [{index}]', cell.id)}: {cell.level} has no "
                    f"{LEVELS[cell.depth + 1]} cells (100% of its area uncovered)"
                )
            continue
        covered = shapely.union_all([kid.shape for _, kid in kids])
        gap = cell.shape.difference(covered).area
        if gap > AREA_TOLERANCE_DEG2:
            warnings.append(
                f"{label(f'feature [{index}]', cell.id)}: {_area_text(gap, cell.shape.area, lat)}"
                f" is not covered by its {_child_level(cell)} cells"
            )
    return problems, warnings


def _child_level(cell: Cell) -> str:
    return LEVELS[cell.depth + 1] if cell.depth + 1 < len(LEVELS) else "child"


def _sibling_overlaps(siblings: Sequence[tuple[int, Cell]]) -> list[str]:
    if len(siblings) < 2:
        return []
    shapes = [cell.shape for _, cell in siblings]
    tree = shapely.STRtree(shapes)
    left, right = tree.query(shapes, predicate="intersects")
    problems = []
    for a, b in zip(left.tolist(), right.tolist(), strict=True):
        if a >= b:
            continue
        overlap = shapes[a].intersection(shapes[b]).area
        if overlap <= AREA_TOLERANCE_DEG2:
            continue  # shared boundaries and touching corners are fine
        first, later = sorted((siblings[a], siblings[b]), key=lambda item: item[0])
        lat = later[1].shape.centroid.y
        problems.append(
            f"{label(f'feature [{later[0]}]', later[1].id)}: overlaps sibling "
            f"{first[1].id!r} (feature [{first[0]}]) by "
            f"{_area_text(overlap, later[1].shape.area, lat)}"
        )
    return problems


def read_grid_file(path: Path) -> GridCheck:
    """Read and validate a grid GeoJSON file (blocking: call it in a thread)."""
    text = read_text(path)
    if text.problems:
        return GridCheck(problems=text.problems)
    data, problems = parse_json(text.text)
    if problems:
        return GridCheck(problems=problems)
    check = check_grid(data)
    return check.model_copy(update={"warnings": [*text.warnings, *check.warnings]})


class CellLocator:
    """Finds the deepest cell (micro, else grid, …) containing a point."""

    def __init__(self, cells: Iterable[Cell]) -> None:
        self._cells = list(cells)
        self._by_id = {cell.id: cell for cell in self._cells}
        self._tree = shapely.STRtree([cell.shape for cell in self._cells])

    def __len__(self) -> int:
        return len(self._cells)

    @property
    def cells(self) -> list[Cell]:
        return list(self._cells)

    def get(self, cell_id: str) -> Cell | None:
        return self._by_id.get(cell_id)

    def locate(self, lon: float, lat: float) -> str | None:
        """The deepest cell whose area or boundary holds (lon, lat); ties go to the lowest id."""
        if not (math.isfinite(lon) and math.isfinite(lat)):
            return None
        hits = self._tree.query(Point(lon, lat), predicate="intersects")
        if len(hits) == 0:
            return None
        best: Cell = min((self._cells[i] for i in hits.tolist()), key=lambda c: (-c.depth, c.id))
        return best.id

    def ancestors(self, cell_id: str) -> list[str]:
        """`cell_id` and its parents up to the top (the escalation path)."""
        chain: list[str] = []
        current: str | None = cell_id
        while current is not None and current in self._by_id and current not in chain:
            chain.append(current)
            current = self._by_id[current].parent_id
        return chain

    @classmethod
    async def from_db(cls, conn: asyncpg.Connection) -> CellLocator:
        return cls(await load_cells(conn))


async def load_cells(conn: asyncpg.Connection) -> list[Cell]:
    """Every cell in the database."""
    rows = await conn.fetch(query("registry_cells_select"))
    return [
        Cell(
            id=row["id"],
            name=row["name"],
            level=row["level"],
            parent_id=row["parent_id"],
            geometry=json.loads(row["geometry"]),
        )
        for row in rows
    ]


def _same(cell: Cell, row: asyncpg.Record) -> bool:
    stored = (row["name"], row["level"], row["parent_id"], json.loads(row["geometry"]))
    return bool(stored == (cell.name, cell.level, cell.parent_id, cell.geometry))


async def import_grid(conn: asyncpg.Connection, path: Path) -> ImportReport:
    """Validate `path` and upsert its cells in one transaction; RegistryError if bad.

    Cells in the database but not in the file are kept (devices, workers and cases
    refer to them) and named in a warning. When a geometry changed, every device's
    cell is found again from its point.
    """
    check = await asyncio.to_thread(read_grid_file, path)
    if check.problems:
        raise RegistryError(check.problems, source=str(path))
    warnings = list(check.warnings)
    async with conn.transaction():
        await conn.execute(query("registry_lock"))
        existing = {row["id"]: row for row in await conn.fetch(query("registry_cells_select"))}
        changed, created, updated = changes(check.cells, lambda r: r.id, existing, _same)
        if changed:
            await conn.execute(
                query("registry_cells_upsert"),
                [cell.id for cell in changed],
                [cell.name for cell in changed],
                [cell.level for cell in changed],
                [cell.parent_id for cell in changed],
                [json.dumps(cell.geometry, ensure_ascii=False) for cell in changed],
                [cell.bbox[0] for cell in changed],
                [cell.bbox[1] for cell in changed],
                [cell.bbox[2] for cell in changed],
                [cell.bbox[3] for cell in changed],
            )
        file_ids = {cell.id for cell in check.cells}
        stale = sorted(set(existing) - file_ids)
        if stale:
            warnings.append(
                f"{len(stale)} cells in the database are not in this file and were kept: "
                f"{listed(stale)}"
            )
        if changed:
            warnings.extend(await _replace_devices(conn))
    return ImportReport(
        registry="grid",
        source=str(path),
        created=created,
        updated=updated,
        unchanged=len(check.cells) - created - updated,
        warnings=warnings,
    )


async def _replace_devices(conn: asyncpg.Connection) -> list[str]:
    """After a geometry change: find every device's cell again from its point."""
    locator = CellLocator(await load_cells(conn))
    moved_ids: list[str] = []
    moved_cells: list[str | None] = []
    lost: list[str] = []
    for row in await conn.fetch(query("registry_device_points")):
        cell_id = locator.locate(row["lon"], row["lat"])
        if cell_id != row["cell_id"]:
            moved_ids.append(row["id"])
            moved_cells.append(cell_id)
            if cell_id is None:
                lost.append(row["id"])
    if moved_ids:
        await conn.execute(query("registry_devices_set_cell"), moved_ids, moved_cells)
    warnings = []
    lost_set = set(lost)
    moved = [device_id for device_id in moved_ids if device_id not in lost_set]
    if moved:
        warnings.append(f"{len(moved)} devices moved to another cell: {listed(moved)}")
    if lost:
        warnings.append(f"{len(lost)} devices now lie in no cell: {listed(lost)}")
    return warnings
