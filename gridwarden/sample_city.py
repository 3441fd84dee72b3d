"""The built-in sample city, generated deterministically (fixed seed).

东华街道 (a fictional street near Jinhua, about lon 119.64, lat 29.07): three
communities side by side, each tiled by four grids (网格), two of which are tiled by
four micro-grids (微网格). Every boundary is drawn from one shared lattice of points,
so the tiling has no gaps and no overlaps by construction. Then 300 devices (smoke
detectors and door access in residential buildings, manhole covers along roads,
smart bins at sorting points) and about forty workers.

`write_sample_city(directory)` writes grid.geojson, devices.csv and workers.json so
that `gridwarden demo` loads them through the ordinary import functions.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from shapely.geometry import Point, shape
from shapely.prepared import prep

SAMPLE_CITY_SEED: Final = 20240111

STREET_ID: Final = "dh"
STREET_NAME: Final = "东华街道"
COMMUNITIES: Final = (("jd", "金鼎社区"), ("jb", "江滨社区"), ("gl", "桂林社区"))
ESTATES: Final = {
    "jd": ("金鼎花园", "金鼎新村", "鼎盛家园"),
    "jb": ("江滨小区", "滨江苑", "三江名邸"),
    "gl": ("桂林苑", "桂花里", "丹桂小区"),
}
ROADS: Final = ("八一北街", "李渔路", "宾虹路", "双溪西路", "婺州街", "丹溪路", "人民东路")
SPLIT_GRIDS: Final = frozenset({1, 4})  # grid numbers with micro-grids, in every community

# Lattice: 12 × 4 blocks of about 240 m × 280 m; a community is 4 × 4 blocks, a grid
# 2 × 2, a micro-grid one block.
_ORIGIN_LON: Final = 119.640
_ORIGIN_LAT: Final = 29.070
_STEP_DEG: Final = 0.0025
_COLUMNS: Final = 12
_ROWS: Final = 4
_JITTER_DEG: Final = 0.0003  # interior points only; keeps every block convex
_MARGIN_DEG: Final = 0.0001  # ≈ 10 m: devices stay clear of cell boundaries

DEVICE_COUNTS: Final = {
    "smoke_detector": 150,
    "door_access": 60,
    "manhole_cover": 45,
    "smart_bin": 45,
}
INTERVAL_S: Final = {
    "smoke_detector": 300,
    "door_access": 300,
    "manhole_cover": 600,
    "smart_bin": 900,
}
DEVICE_COLUMNS: Final = (
    "id",
    "kind",
    "lat",
    "lon",
    "name",
    "building",
    "floor",
    "interval_s",
    "height_cm",
)

_SURNAMES: Final = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何林高罗郑梁谢宋唐许邓冯韩曹曾彭"
_GIVEN: Final = "伟芳娜敏静丽强磊军洋勇艳杰涛明超秀霞平刚桂英华建国红梅兰志文斌海燕"


@dataclass(frozen=True)
class SampleCity:
    grid: dict[str, Any]  # GeoJSON FeatureCollection
    devices: list[dict[str, Any]]  # one dict per device, DEVICE_COLUMNS keys (None = absent)
    workers: list[dict[str, Any]]  # as in workers.json


@dataclass(frozen=True)
class SampleCityFiles:
    grid: Path
    devices: Path
    workers: Path


@dataclass(frozen=True)
class _Leaf:
    cell_id: str
    level: str
    community: str
    geometry: dict[str, Any]


def _lattice(rng: random.Random) -> list[list[tuple[float, float]]]:
    """points[i][j], i the column (west → east), j the row (south → north)."""
    points = []
    for i in range(_COLUMNS + 1):
        column = []
        for j in range(_ROWS + 1):
            lon = _ORIGIN_LON + i * _STEP_DEG + 0.0006 * math.sin(j * 0.9 + i * 0.4)
            lat = _ORIGIN_LAT + j * _STEP_DEG + 0.0007 * math.sin(i * 0.7 + j * 0.5)
            if 0 < i < _COLUMNS and 0 < j < _ROWS:
                lon += rng.uniform(-_JITTER_DEG, _JITTER_DEG)
                lat += rng.uniform(-_JITTER_DEG, _JITTER_DEG)
            column.append((round(lon, 6), round(lat, 6)))
        points.append(column)
    return points


def _block(
    points: list[list[tuple[float, float]]], i0: int, j0: int, i1: int, j1: int
) -> dict[str, Any]:
    """The Polygon of lattice blocks [i0, i1) × [j0, j1), counter-clockwise, every
    lattice point on its boundary included (neighbours share vertices exactly)."""
    ring = [points[i][j0] for i in range(i0, i1)]
    ring += [points[i1][j] for j in range(j0, j1)]
    ring += [points[i][j1] for i in range(i1, i0, -1)]
    ring += [points[i0][j] for j in range(j1, j0, -1)]
    ring.append(ring[0])
    return {"type": "Polygon", "coordinates": [[list(point) for point in ring]]}


def _feature(
    cell_id: str, name: str, level: str, parent: str | None, geometry: dict[str, Any]
) -> dict[str, Any]:
    return {
        "type": "Feature",
        "properties": {"id": cell_id, "name": name, "level": level, "parent": parent},
        "geometry": geometry,
    }


def _build_grid(rng: random.Random) -> tuple[dict[str, Any], list[_Leaf], dict[str, list[str]]]:
    """The FeatureCollection, its leaf cells, and per community its grid ids."""
    points = _lattice(rng)
    features = [_feature(STREET_ID, STREET_NAME, "street", None, _block(points, 0, 0, 12, 4))]
    leaves: list[_Leaf] = []
    grids_of: dict[str, list[str]] = {}
    for c, (community_id, community_name) in enumerate(COMMUNITIES):
        cid = f"{STREET_ID}-{community_id}"
        features.append(
            _feature(
                cid, community_name, "community", STREET_ID, _block(points, 4 * c, 0, 4 * c + 4, 4)
            )
        )
        grids_of[cid] = []
        for gy in range(2):
            for gx in range(2):
                number = gy * 2 + gx + 1
                gid = f"{cid}-g{number}"
                i0, j0 = 4 * c + 2 * gx, 2 * gy
                geometry = _block(points, i0, j0, i0 + 2, j0 + 2)
                features.append(
                    _feature(gid, f"{community_name}第{number}网格", "grid", cid, geometry)
                )
                grids_of[cid].append(gid)
                if number not in SPLIT_GRIDS:
                    leaves.append(_Leaf(gid, "grid", community_id, geometry))
                    continue
                for sy in range(2):
                    for sx in range(2):
                        micro = sy * 2 + sx + 1
                        mid = f"{gid}-m{micro}"
                        mgeom = _block(points, i0 + sx, j0 + sy, i0 + sx + 1, j0 + sy + 1)
                        name = f"{community_name}第{number}网格第{micro}微网格"
                        features.append(_feature(mid, name, "micro", gid, mgeom))
                        leaves.append(_Leaf(mid, "micro", community_id, mgeom))
    return {"type": "FeatureCollection", "features": features}, leaves, grids_of


def _point_in(rng: random.Random, leaf: _Leaf) -> tuple[float, float]:
    """A random point at least _MARGIN_DEG inside the leaf, rounded to 6 decimals."""
    inner = shape(leaf.geometry).buffer(-_MARGIN_DEG)
    prepared = prep(inner)
    min_lon, min_lat, max_lon, max_lat = inner.bounds
    while True:
        lon = round(rng.uniform(min_lon, max_lon), 6)
        lat = round(rng.uniform(min_lat, max_lat), 6)
        if prepared.contains(Point(lon, lat)):
            return lon, lat


def _device(
    kind: str, number: int, lon: float, lat: float, name: str, **extra: Any
) -> dict[str, Any]:
    prefix = {
        "smoke_detector": "smoke",
        "door_access": "door",
        "manhole_cover": "manhole",
        "smart_bin": "bin",
    }[kind]
    device: dict[str, Any] = dict.fromkeys(DEVICE_COLUMNS)
    device.update(
        id=f"{prefix}-{number:03d}",
        kind=kind,
        lat=lat,
        lon=lon,
        name=name,
        interval_s=INTERVAL_S[kind],
        **extra,
    )
    return device


def _build_devices(rng: random.Random, leaves: list[_Leaf]) -> list[dict[str, Any]]:
    # Residential buildings: two per micro-grid, five per undivided grid.
    buildings: list[tuple[str, float, float, int]] = []  # name, lon, lat, floors
    numbering: dict[str, int] = {}
    for leaf in leaves:
        for _ in range(2 if leaf.level == "micro" else 5):
            estate = rng.choice(ESTATES[leaf.community])
            numbering[estate] = numbering.get(estate, 0) + 1
            lon, lat = _point_in(rng, leaf)
            floors = rng.choice((6, 7, 11, 18, 26))
            buildings.append((f"{estate}{numbering[estate]}幢", lon, lat, floors))

    def near(lon: float, lat: float) -> tuple[float, float]:  # same building, a few metres off
        return (round(lon + rng.uniform(-2e-5, 2e-5), 6), round(lat + rng.uniform(-2e-5, 2e-5), 6))

    devices = []
    smoke_homes = list(range(len(buildings)))
    smoke_homes += [
        rng.randrange(len(buildings))
        for _ in range(DEVICE_COUNTS["smoke_detector"] - len(buildings))
    ]
    used_floors: dict[int, set[int]] = {}
    for number, home in enumerate(sorted(smoke_homes), start=1):
        name, lon, lat, floors = buildings[home]
        free = [f for f in range(1, floors + 1) if f not in used_floors.get(home, set())]
        floor = rng.choice(free or list(range(1, floors + 1)))
        used_floors.setdefault(home, set()).add(floor)
        dlon, dlat = near(lon, lat)
        devices.append(
            _device(
                "smoke_detector",
                number,
                dlon,
                dlat,
                f"{name}{floor}层烟感",
                building=name,
                floor=floor,
            )
        )

    for number, home in enumerate(
        sorted(rng.sample(range(len(buildings)), DEVICE_COUNTS["door_access"])), start=1
    ):
        name, lon, lat, _ = buildings[home]
        garage = rng.random() < 0.15
        dlon, dlat = near(lon, lat)
        label = f"{name}地下车库门禁" if garage else f"{name}单元门禁"
        devices.append(
            _device(
                "door_access", number, dlon, dlat, label, building=name, floor=-1 if garage else 1
            )
        )

    road_numbers: dict[str, int] = {}
    for number in range(1, DEVICE_COUNTS["manhole_cover"] + 1):
        leaf = rng.choice(leaves)
        road = rng.choice(ROADS)
        road_numbers[road] = road_numbers.get(road, 0) + 1
        lon, lat = _point_in(rng, leaf)
        devices.append(
            _device(
                "manhole_cover",
                number,
                lon,
                lat,
                f"{road}{road_numbers[road]}号井盖",
                height_cm=float(rng.randrange(150, 310, 10)),
            )
        )

    point_numbers: dict[str, int] = {}
    for number in range(1, DEVICE_COUNTS["smart_bin"] + 1):
        leaf = rng.choice(leaves)
        estate = rng.choice(ESTATES[leaf.community])
        point_numbers[estate] = point_numbers.get(estate, 0) + 1
        lon, lat = _point_in(rng, leaf)
        devices.append(
            _device(
                "smart_bin",
                number,
                lon,
                lat,
                f"{estate}垃圾分类点{point_numbers[estate]}",
                height_cm=float(rng.randrange(100, 135, 5)),
            )
        )
    return devices


def _names(rng: random.Random) -> Iterator[str]:
    seen: set[str] = set()
    while True:
        name = rng.choice(_SURNAMES) + "".join(rng.choice(_GIVEN) for _ in range(rng.randint(1, 2)))
        if name not in seen:
            seen.add(name)
            yield name


def _build_workers(
    rng: random.Random, grids_of: dict[str, list[str]], micro_of: dict[str, list[str]]
) -> list[dict[str, Any]]:
    names = _names(rng)
    phones: set[str] = set()

    def phone() -> str:
        while True:
            number = f"1{rng.choice('3578')}{rng.randrange(10**9):09d}"
            if number not in phones:
                phones.add(number)
                return number

    def worker(worker_id: str, role: str, cells: list[str], on_duty: bool = True) -> dict[str, Any]:
        return {
            "id": worker_id,
            "name": next(names),
            "role": role,
            "cells": cells,
            "phone": phone(),
            "on_duty": on_duty,
        }

    workers = []
    off_duty_given = False
    for community, grids in grids_of.items():
        for gid in grids:
            count = rng.choice((1, 2))
            for n in range(1, count + 1):
                off = count == 2 and n == 2 and not off_duty_given  # one worker is on leave
                off_duty_given = off_duty_given or off
                workers.append(worker(f"w-{gid}-{n}", "grid_worker", [gid], on_duty=not off))
            workers.append(worker(f"w-{gid}-pt", "part_time", micro_of.get(gid, [gid])))
        workers.append(worker(f"w-{community}-leader", "grid_leader", list(grids)))
        for n in (1, 2):
            workers.append(worker(f"w-{community}-staff-{n}", "community_staff", [community]))
    for n in (1, 2):
        workers.append(worker(f"w-{STREET_ID}-street-{n}", "street_staff", [STREET_ID]))
    return workers


def build_sample_city(seed: int = SAMPLE_CITY_SEED) -> SampleCity:
    """The whole sample city; the same seed gives the same city, byte for byte."""
    rng = random.Random(seed)
    grid, leaves, grids_of = _build_grid(rng)
    micro_of: dict[str, list[str]] = {}
    for feature in grid["features"]:
        props = feature["properties"]
        if props["level"] == "micro":
            micro_of.setdefault(props["parent"], []).append(props["id"])
    devices = _build_devices(rng, leaves)
    workers = _build_workers(rng, grids_of, micro_of)
    return SampleCity(grid=grid, devices=devices, workers=workers)


def sample_grid() -> dict[str, Any]:
    """The sample city's grid, a GeoJSON FeatureCollection."""
    return build_sample_city().grid


def sample_devices() -> list[dict[str, Any]]:
    """The sample city's 300 devices (keys as the devices.csv columns; None = absent)."""
    return build_sample_city().devices


def sample_workers() -> list[dict[str, Any]]:
    """The sample city's workers, as in workers.json."""
    return build_sample_city().workers


def write_sample_city(directory: Path, seed: int = SAMPLE_CITY_SEED) -> SampleCityFiles:
    """Write grid.geojson, devices.csv and workers.json (UTF-8) into `directory`."""
    city = build_sample_city(seed)
    directory.mkdir(parents=True, exist_ok=True)
    files = SampleCityFiles(
        grid=directory / "grid.geojson",
        devices=directory / "devices.csv",
        workers=directory / "workers.json",
    )
    files.grid.write_text(json.dumps(city.grid, ensure_ascii=False, indent=1) + "\n", "utf-8")
    with files.devices.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(DEVICE_COLUMNS)
        for device in city.devices:
            writer.writerow(["" if device[c] is None else device[c] for c in DEVICE_COLUMNS])
    files.workers.write_text(json.dumps(city.workers, ensure_ascii=False, indent=2) + "\n", "utf-8")
    return files
