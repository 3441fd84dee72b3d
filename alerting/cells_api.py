"""`GET /api/cells` (CONTRACT §5): the grid as a GeoJSON FeatureCollection with the open
alarms and cases of every cell, for the console's map.

Each Feature has the cell's geometry, its `bbox` and `properties`: `id, name, level,
parent, open_alarms, open_alarms_by_severity {critical, major, minor, warning},
open_cases, overdue_cases, devices`. Counts cover the cell and every cell below it (as
the `cell=` filters of the other endpoints do). The whole document is built by one query
in the database (`web_cells`), so the map costs one round trip however large the grid.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response

from gridwarden.auth import Principal
from gridwarden.db import query
from gridwarden.registry.grid import Level
from gridwarden.web import AppState, current_principal, get_state

router = APIRouter(prefix="/api", tags=["cells"])
Anyone = Annotated[Principal, Depends(current_principal)]
State = Annotated[AppState, Depends(get_state)]

GEOJSON = "application/geo+json"
_SEVERITY_COUNTS = {
    "type": "object",
    "properties": {s: {"type": "integer"} for s in ("critical", "major", "minor", "warning")},
}
_FEATURE_COLLECTION: dict[str, Any] = {
    "type": "object",
    "required": ["type", "features"],
    "properties": {
        "type": {"const": "FeatureCollection"},
        "features": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "id", "geometry", "properties"],
                "properties": {
                    "type": {"const": "Feature"},
                    "id": {"type": "string"},
                    "geometry": {"type": "object", "description": "GeoJSON Polygon/MultiPolygon"},
                    "bbox": {"type": "array", "items": {"type": "number"}},
                    "properties": {
                        "type": "object",
                        "properties": {
                            "id": {"type": "string"},
                            "name": {"type": "string"},
                            "level": {"enum": ["street", "community", "grid", "micro"]},
                            "parent": {"type": ["string", "null"]},
                            "open_alarms": {"type": "integer"},
                            "open_alarms_by_severity": _SEVERITY_COUNTS,
                            "open_cases": {"type": "integer"},
                            "overdue_cases": {"type": "integer"},
                            "devices": {"type": "integer"},
                        },
                    },
                },
            },
        },
    },
}


@router.get(
    "/cells",
    response_class=Response,
    responses={
        200: {
            "description": "a GeoJSON FeatureCollection, street to micro level, by id",
            "content": {GEOJSON: {"schema": _FEATURE_COLLECTION}},
        }
    },
)
async def cells(
    _: Anyone,
    state: State,
    level: Annotated[Level | None, Query(description="only the cells of this level")] = None,
) -> Response:
    """The grid with, per cell (and the cells below it): open alarms (not closed) in all
    and by severity, open cases (not yet resolved), overdue cases (open, past their
    current deadline) and devices."""
    document: str = await state.pool.fetchval(query("web_cells"), level)
    return Response(document, media_type=GEOJSON, headers={"Cache-Control": "no-cache"})
