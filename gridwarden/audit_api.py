"""`GET /api/audit`: the audit log (gridwarden/audit.py), newest first, for operators
and admins (a worker token gets 403). Paginated like the other lists: `next_cursor` (the
last id of a full page) goes back as `cursor` for the next page. Mounted by
`gridwarden.web.create_app`, like the session endpoints."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, HTTPException, Query

from alerting.alarm_json import iso
from gridwarden.auth import Principal
from gridwarden.db import query
from gridwarden.web import AppState, get_state, require_role

router = APIRouter(prefix="/api", tags=["audit"])
Operator = Annotated[Principal, Depends(require_role("operator", "admin"))]
State = Annotated[AppState, Depends(get_state)]
BIGINT_MAX = 2**63 - 1
Text = Annotated[str | None, Query(max_length=200)]


def _text(name: str, value: str | None) -> str | None:
    """A filter's value stripped; empty means no filter. NUL cannot be in a text column."""
    if value is None or not value.strip():
        return None
    if "\x00" in value:
        raise HTTPException(422, f"{name}: must not contain NUL")
    return value.strip()


@router.get("/audit")
async def list_audit(
    _: Operator,
    state: State,
    action: Annotated[Text, Query(description="e.g. case.accept, token.create")] = None,
    actor: Annotated[Text, Query(description="e.g. operator:3, worker:w-7, cli")] = None,
    since: Annotated[datetime | None, Query(description="from then (inclusive)")] = None,
    until: Annotated[datetime | None, Query(description="until before then")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[int | None, Query(ge=1, le=BIGINT_MAX)] = None,
) -> dict[str, Any]:
    """Who did what to which thing, when and from where: `id, at, actor, action,
    target_type, target_id, detail, address`, newest first."""
    for name, moment in (("since", since), ("until", until)):
        if moment is not None and moment.tzinfo is None:
            raise HTTPException(422, f"{name} needs a UTC offset (RFC 3339)")
    rows = await state.pool.fetch(
        query("audit_list"),
        _text("action", action),
        _text("actor", actor),
        since,
        until,
        cursor,
        limit,
    )
    items = [
        {
            "id": r["id"],
            "at": iso(r["at"]),
            "actor": r["actor"],
            "action": r["action"],
            "target_type": r["target_type"],
            "target_id": r["target_id"],
            "detail": orjson.loads(r["detail"]),
            "address": r["address"],
        }
        for r in rows
    ]
    next_cursor = str(rows[-1]["id"]) if len(rows) == limit else None
    return {"items": items, "next_cursor": next_cursor}
