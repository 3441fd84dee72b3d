"""What the simulator knows about a device: the registry record of CONTRACT §4.

`DeviceSpec` is the simulator's own frozen copy of a devices-file row; the loaders read
the same CSV / JSON files as `gridwarden import devices` and report every problem with
its line (CSV) or element (JSON) number, all at once.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, get_args

DeviceKind = Literal["smoke_detector", "manhole_cover", "door_access", "smart_bin"]
DEVICE_KINDS: Final[tuple[DeviceKind, ...]] = get_args(DeviceKind)
DEVICE_ID_PATTERN: Final = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")

# Reporting interval when the registry gives none (seconds of simulated time); the same
# values as the sample city.
DEFAULT_INTERVAL_S: Final[Mapping[DeviceKind, float]] = {
    "smoke_detector": 300.0,
    "door_access": 300.0,
    "manhole_cover": 600.0,
    "smart_bin": 900.0,
}
CSV_COLUMNS: Final = (
    "id", "kind", "lat", "lon", "name", "building", "floor", "interval_s", "height_cm",
)  # fmt: skip
_REQUIRED: Final = ("id", "kind", "lat", "lon")


class DeviceFileError(ValueError):
    """A devices file that cannot be loaded; `problems` lists every one of them."""

    def __init__(self, path: str | Path, problems: Sequence[str]) -> None:
        self.path = str(path)
        self.problems = list(problems)
        listing = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{self.path}: {len(self.problems)} problem(s):\n{listing}")


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One simulated device. `interval_s` is its nominal reporting period (simulated s)."""

    id: str
    kind: DeviceKind
    lat: float
    lon: float
    building: str | None = None
    floor: int | None = None
    interval_s: float = 300.0
    height_cm: float | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if not DEVICE_ID_PATTERN.match(self.id):
            raise ValueError(f"device id {self.id!r} does not match [A-Za-z0-9_.:-]{{1,64}}")
        if self.kind not in DEVICE_KINDS:
            raise ValueError(f"device {self.id}: unknown kind {self.kind!r}")
        if not (-90 <= self.lat <= 90 and -180 <= self.lon <= 180):
            raise ValueError(f"device {self.id}: lat/lon ({self.lat}, {self.lon}) out of range")
        if not (math.isfinite(self.interval_s) and self.interval_s > 0):
            raise ValueError(f"device {self.id}: interval_s must be > 0, got {self.interval_s}")
        if self.height_cm is not None and not (
            math.isfinite(self.height_cm) and self.height_cm > 0
        ):
            raise ValueError(f"device {self.id}: height_cm must be > 0, got {self.height_cm}")

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any]) -> DeviceSpec:
        """Build from a devices-file record (CSV row or JSON object; blank/None = absent)."""

        def blank(key: str) -> bool:
            value = row.get(key)
            return value is None or (isinstance(value, str) and not value.strip())

        missing = [key for key in _REQUIRED if blank(key)]
        if missing:
            raise ValueError(f"missing {', '.join(missing)}")
        kind = str(row["kind"]).strip()
        if kind not in DEVICE_KINDS:
            raise ValueError(f"kind {kind!r} is not one of {', '.join(DEVICE_KINDS)}")
        typed_kind: DeviceKind = kind
        return cls(
            id=str(row["id"]).strip(),
            kind=typed_kind,
            lat=_number(row["lat"], "lat"),
            lon=_number(row["lon"], "lon"),
            building=None if blank("building") else str(row["building"]).strip(),
            floor=None if blank("floor") else _integer(row["floor"], "floor"),
            interval_s=(
                DEFAULT_INTERVAL_S[typed_kind]
                if blank("interval_s")
                else _number(row["interval_s"], "interval_s")
            ),
            height_cm=None if blank("height_cm") else _number(row["height_cm"], "height_cm"),
            name=None if blank("name") else str(row["name"]).strip(),
        )


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{key} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{key} must be finite, got {value!r}")
    return number


def _integer(value: Any, key: str) -> int:
    number = _number(value, key)
    if not number.is_integer():
        raise ValueError(f"{key} must be an integer, got {value!r}")
    return int(number)


def _check_unique(specs: list[tuple[str, DeviceSpec]], problems: list[str]) -> None:
    seen: dict[str, str] = {}
    for where, spec in specs:
        if spec.id in seen:
            problems.append(f"{where}: duplicate id {spec.id!r} (first at {seen[spec.id]})")
        else:
            seen[spec.id] = where


def load_devices_from_csv(path: str | Path) -> list[DeviceSpec]:
    """Read a devices CSV (header row; columns of CONTRACT §4; UTF-8, BOM tolerated)."""
    text = Path(path).read_text(encoding="utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    problems: list[str] = []
    absent = [column for column in _REQUIRED if column not in header]
    if absent:
        raise DeviceFileError(path, [f"line 1: header lacks column(s) {', '.join(absent)}"])
    unknown = [column for column in header if column not in CSV_COLUMNS]
    if unknown:
        problems.append(f"line 1: unknown column(s) {', '.join(unknown)}")
    specs: list[tuple[str, DeviceSpec]] = []
    for row in reader:
        where = f"line {reader.line_num}"
        if None in row:
            problems.append(f"{where}: more cells than header columns")
            continue
        try:
            specs.append((where, DeviceSpec.from_mapping(row)))
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    _check_unique(specs, problems)
    if problems:
        raise DeviceFileError(path, problems)
    return [spec for _, spec in specs]


def load_devices_from_json(path: str | Path) -> list[DeviceSpec]:
    """Read a devices JSON array (objects with the CSV's keys)."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise DeviceFileError(path, [f"not JSON: {exc}"]) from None
    if not isinstance(document, list):
        raise DeviceFileError(path, ["expected a JSON array of device objects"])
    problems: list[str] = []
    specs: list[tuple[str, DeviceSpec]] = []
    for index, element in enumerate(document):
        where = f"element {index}"
        if not isinstance(element, dict):
            problems.append(f"{where}: expected an object")
            continue
        unknown = sorted(set(element) - set(CSV_COLUMNS))
        if unknown:
            problems.append(f"{where}: unknown key(s) {', '.join(unknown)}")
            continue
        try:
            specs.append((where, DeviceSpec.from_mapping(element)))
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    _check_unique(specs, problems)
    if problems:
        raise DeviceFileError(path, problems)
    return [spec for _, spec in specs]


def load_devices(path: str | Path) -> list[DeviceSpec]:
    """A devices file, CSV or JSON (told apart by the first non-blank character)."""
    head = Path(path).read_text(encoding="utf-8-sig").lstrip()[:1]
    if head == "[":
        return load_devices_from_json(path)
    return load_devices_from_csv(path)
