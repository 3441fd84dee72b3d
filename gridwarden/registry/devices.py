"""The device registry (CONTRACT §4): a CSV with a header, or a JSON array.

`check_devices` validates the text without touching the database, given a
`CellLocator`: types and ranges per record, duplicate ids, and the cell of each
device found from its point (a point in no cell is a problem). `import_devices`
loads the cells, checks, and upserts in one transaction.
"""

from __future__ import annotations

import asyncio
import csv
import io
from pathlib import Path
from typing import Annotated, Final, Literal

import asyncpg
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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
from gridwarden.registry.grid import CellLocator, load_cells

DeviceKind = Literal["smoke_detector", "manhole_cover", "door_access", "smart_bin"]
DEVICE_KINDS: Final[tuple[DeviceKind, ...]] = (
    "smoke_detector",
    "manhole_cover",
    "door_access",
    "smart_bin",
)
FileFormat = Literal["csv", "json"]

MAX_INTERVAL_S: Final = 7 * 24 * 3600  # a device reporting less than weekly is not monitored
MAX_HEIGHT_CM: Final = 5000.0  # 50 m: deeper than any well or bin
FLOOR_RANGE: Final = (-10, 200)

_Text = Annotated[str, Field(min_length=1, max_length=200)]


class DeviceRecord(BaseModel):
    """One row of a devices file, validated."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    id: str = Field(pattern=ID_PATTERN)
    kind: DeviceKind
    lat: float = Field(ge=-90, le=90, allow_inf_nan=False)
    lon: float = Field(ge=-180, le=180, allow_inf_nan=False)
    name: _Text | None = None
    building: _Text | None = None
    floor: int | None = Field(default=None, ge=FLOOR_RANGE[0], le=FLOOR_RANGE[1])
    interval_s: int | None = Field(default=None, gt=0, le=MAX_INTERVAL_S)
    height_cm: float | None = Field(default=None, gt=0, le=MAX_HEIGHT_CM, allow_inf_nan=False)


class Device(DeviceRecord):
    """A record placed in the grid: `cell_id` is the deepest cell holding its point."""

    cell_id: str


class DeviceCheck(BaseModel):
    devices: list[Device] = []
    problems: list[str] = []
    warnings: list[str] = []

    @property
    def ok(self) -> bool:
        return not self.problems


COLUMNS: Final = tuple(DeviceRecord.model_fields)
REQUIRED_COLUMNS: Final = ("id", "kind", "lat", "lon")


def detect_format(path: Path, text: str) -> FileFormat:
    """By extension (.csv / .json); otherwise a text starting with `[` is JSON."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "csv"
    if suffix == ".json":
        return "json"
    return "json" if text.lstrip().startswith("[") else "csv"


def _csv_rows(text: str) -> tuple[list[tuple[str, dict[str, str]]], list[str]]:
    """(where, raw fields) per data row; empty cells are left out (= not given)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
    except csv.Error as exc:
        return [], [f"line 1: {exc}"]
    if header is None or not any(name.strip() for name in header):
        return [], ["line 1: no header (expected columns: " + ", ".join(COLUMNS) + ")"]
    names = [name.strip().lower() for name in header]
    problems = []
    unknown = [name for name in names if name not in COLUMNS]
    if unknown:
        problems.append(
            f"line 1: unknown column(s) {', '.join(map(repr, unknown))} "
            f"(known: {', '.join(COLUMNS)})"
        )
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        problems.append(f"line 1: duplicate column(s) {', '.join(map(repr, duplicated))}")
    missing = [name for name in REQUIRED_COLUMNS if name not in names]
    if missing:
        problems.append(f"line 1: missing column(s) {', '.join(map(repr, missing))}")
    if problems:
        return [], problems

    rows: list[tuple[str, dict[str, str]]] = []
    while True:
        line = reader.line_num + 1
        try:
            fields = next(reader, None)
        except csv.Error as exc:
            problems.append(f"line {line}: {exc}")
            break
        if fields is None:
            break
        if not any(field.strip() for field in fields):
            continue  # blank line
        if len(fields) != len(names):
            problems.append(f"line {line}: {len(fields)} fields, but the header has {len(names)}")
            continue
        raw = {
            name: field.strip() for name, field in zip(names, fields, strict=True) if field.strip()
        }
        rows.append((f"line {line}", raw))
    return rows, problems


def _json_rows(text: str) -> tuple[list[tuple[str, object]], list[str]]:
    data, problems = parse_json(text)
    if problems:
        return [], problems
    if not isinstance(data, list):
        return [], ["the file must be a JSON array of device objects"]
    return [(f"element [{index}]", item) for index, item in enumerate(data)], []


def check_devices(text: str, fmt: FileFormat, locator: CellLocator) -> DeviceCheck:
    """Validate a devices file's text and place each device in its deepest cell."""
    rows: list[tuple[str, object]]
    if fmt == "csv":
        csv_rows, problems = _csv_rows(text)
        rows = list(csv_rows)
    else:
        rows, problems = _json_rows(text)
    if not rows and not problems:
        problems.append("the file lists no devices")
    if len(locator) == 0:
        problems.append("there are no grid cells in the database: import the grid first")

    devices: list[Device] = []
    first_seen: dict[str, str] = {}
    for where, raw in rows:
        raw_id = raw.get("id") if isinstance(raw, dict) else None
        here = label(where, raw_id)
        if not isinstance(raw, dict):
            problems.append(f"{where}: must be an object")
            continue
        try:
            record = DeviceRecord.model_validate(raw)
        except ValidationError as exc:
            problems.extend(describe_validation_error(here, exc))
            continue
        if record.id in first_seen:
            problems.append(f"{here}: duplicate id (first at {first_seen[record.id]})")
            continue
        first_seen[record.id] = where
        if len(locator) == 0:
            continue
        cell_id = locator.locate(record.lon, record.lat)
        if cell_id is None:
            problems.append(
                f"{here}: point (lon {record.lon}, lat {record.lat}) lies in no grid cell"
            )
            continue
        devices.append(Device(**record.model_dump(), cell_id=cell_id))
    return DeviceCheck(devices=devices, problems=sort_problems(problems))


def read_devices_file(path: Path, locator: CellLocator) -> DeviceCheck:
    """Read and check a devices file (blocking: call it in a thread)."""
    text = read_text(path)
    if text.problems:
        return DeviceCheck(problems=text.problems)
    check = check_devices(text.text, detect_format(path, text.text), locator)
    return check.model_copy(update={"warnings": [*text.warnings, *check.warnings]})


_ROW_FIELDS: Final = (
    "kind",
    "lat",
    "lon",
    "cell_id",
    "name",
    "building",
    "floor",
    "interval_s",
    "height_cm",
)


def _same(device: Device, row: asyncpg.Record) -> bool:
    return all(getattr(device, field) == row[field] for field in _ROW_FIELDS)


async def import_devices(conn: asyncpg.Connection, path: Path) -> ImportReport:
    """Check `path` against the grid in the database and upsert in one transaction.

    Devices in the database but not in the file are kept and named in a warning.
    """
    async with conn.transaction():
        await conn.execute(query("registry_lock"))
        locator = CellLocator(await load_cells(conn))
        check = await asyncio.to_thread(read_devices_file, path, locator)
        if check.problems:
            raise RegistryError(check.problems, source=str(path))
        existing = {row["id"]: row for row in await conn.fetch(query("registry_devices_select"))}
        changed, created, updated = changes(check.devices, lambda r: r.id, existing, _same)
        if changed:
            await conn.execute(
                query("registry_devices_upsert"),
                [d.id for d in changed],
                [d.kind for d in changed],
                [d.lat for d in changed],
                [d.lon for d in changed],
                [d.cell_id for d in changed],
                [d.name for d in changed],
                [d.building for d in changed],
                [d.floor for d in changed],
                [d.interval_s for d in changed],
                [d.height_cm for d in changed],
            )
    warnings = list(check.warnings)
    stale = sorted(set(existing) - {device.id for device in check.devices})
    if stale:
        warnings.append(
            f"{len(stale)} devices in the database are not in this file and were kept: "
            f"{listed(stale)}"
        )
    return ImportReport(
        registry="devices",
        source=str(path),
        created=created,
        updated=updated,
        unchanged=len(check.devices) - created - updated,
        warnings=warnings,
    )
