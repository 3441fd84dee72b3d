"""HTTP endpoints of ingest (CONTRACT §5): dead letters, devices, telemetry history."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, HTTPException, Query

from gridwarden.auth import Principal
from gridwarden.db import BIGINT_MAX, query
from gridwarden.web import AppState, get_state, require_role

router = APIRouter(prefix="/api", tags=["ingest"])
Operator = Annotated[Principal, Depends(require_role("operator", "admin"))]
Anyone = Annotated[Principal, Depends(require_role("operator", "admin", "worker"))]
State = Annotated[AppState, Depends(get_state)]
Limit = Annotated[int, Query(ge=1, le=1000)]
# Ids (devices, cells: at most 64 characters) and names such as a reason code or a kind.
Name = Annotated[str | None, Query(max_length=64)]
DEFAULT_HISTORY = timedelta(hours=24)
MAX_RAW_ROWS = 5000
HOUR_S = 3600  # served from the hourly continuous aggregate


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else None


def _device(row: Any) -> dict[str, Any]:
    out = dict(row)
    for key in ("last_seen", "status_at"):
        out[key] = _iso(out[key])
    return out


@router.get("/dead-letters")
async def dead_letters(
    _: Operator,
    state: State,
    reason: Name = None,
    device: Name = None,
    limit: Limit = 100,
    cursor: Annotated[int | None, Query(ge=1, le=BIGINT_MAX)] = None,
) -> dict[str, Any]:
    rows = await state.pool.fetch(query("list_dead_letters"), reason, device, cursor, limit)
    items = []
    for row in rows:
        payload: bytes = row["payload"]
        try:
            text: str | None = payload.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        items.append({
            "id": row["id"],
            "received_at": _iso(row["received_at"]),
            "topic": row["topic"],
            "device_id": row["device_id"],
            "reason": row["reason"],
            "detail": row["detail"],
            "size": len(payload),
            "payload_text": text[:4096] if text is not None else None,
            "payload_base64": base64.b64encode(payload).decode(),
        })  # fmt: skip
    next_cursor = str(rows[-1]["id"]) if len(rows) == limit else None
    return {"items": items, "next_cursor": next_cursor}


@router.get("/devices")
async def devices(
    _: Anyone,
    state: State,
    cell: Name = None,
    kind: Name = None,
    limit: Limit = 100,
    cursor: Name = None,
) -> dict[str, Any]:
    rows = await state.pool.fetch(query("list_devices"), cell, kind, cursor, limit)
    next_cursor = rows[-1]["id"] if len(rows) == limit else None
    return {"items": [_device(r) for r in rows], "next_cursor": next_cursor}


@router.get("/devices/{device_id}")
async def device(device_id: str, _: Anyone, state: State) -> dict[str, Any]:
    row = await state.pool.fetchrow(query("get_device"), device_id)
    if row is None:
        raise HTTPException(404, f"no device {device_id!r}")
    return _device(row)


@router.get("/devices/{device_id}/telemetry")
async def telemetry(
    device_id: str,
    _: Anyone,
    state: State,
    since: datetime | None = None,
    until: datetime | None = None,
    bucket: Annotated[int | None, Query(ge=1, le=31 * 86400, description="seconds")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_RAW_ROWS)] = 1000,
) -> dict[str, Any]:
    if await state.pool.fetchval("SELECT 1 FROM devices WHERE id = $1", device_id) is None:
        raise HTTPException(404, f"no device {device_id!r}")
    until = until or datetime.now(UTC)
    since = since or until - DEFAULT_HISTORY
    if since.tzinfo is None or until.tzinfo is None:
        raise HTTPException(422, "since and until need a UTC offset (RFC 3339)")
    if since >= until:
        raise HTTPException(422, "since must be before until")
    if bucket is None:
        rows = await state.pool.fetch(query("device_telemetry_raw"), device_id, since, until, limit)
        points = []
        for row in rows:
            point = {k: v for k, v in dict(row).items() if v is not None and k != "extra"}
            point["time"] = _iso(row["time"])
            if row["extra"]:
                point["extra"] = orjson.loads(row["extra"])
            points.append(point)
    else:
        if bucket == HOUR_S:
            rows = await state.pool.fetch(
                query("device_telemetry_hourly"), device_id, since, until, limit
            )
        else:
            rows = await state.pool.fetch(
                query("device_telemetry_bucketed"), device_id, since, until, float(bucket), limit
            )
        points = [
            {**{k: v for k, v in dict(r).items() if v is not None}, "bucket": _iso(r["bucket"])}
            for r in rows
        ]
    return {"device_id": device_id, "since": _iso(since), "until": _iso(until), "points": points}
