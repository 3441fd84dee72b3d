"""Case endpoints (CONTRACT §5): the list, one case with its timeline, the actions of the
closed loop, a person's report, and the statistics.

A worker token sees and acts on its own cases only (`act` enforces the action rules,
including what supervisors may do); operators and admins see everything. Every action
time is the injected clock's, so tests control time.

Wiring (service.py):

    app = create_app(state, routers=[..., cases_api.router])
    attach_cases(app, settings=settings, clock=SystemClock())
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

import asyncpg
import orjson
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from alerting.alarm_json import iso
from alerting.alarms_api import parse_enum_list
from alerting.cases import (
    SUPERVISOR_ROLES,
    Actor,
    CaseError,
    act,
    case_json,
    open_case_for_report,
)
from alerting.stats import By, case_stats
from gridwarden import audit
from gridwarden.auth import Principal
from gridwarden.clock import Clock
from gridwarden.config import Settings
from gridwarden.db import query
from gridwarden.registry.grid import CellLocator
from gridwarden.web import AppState, get_state, require_role

router = APIRouter(prefix="/api", tags=["cases"])
Operator = Annotated[Principal, Depends(require_role("operator", "admin"))]
Anyone = Annotated[Principal, Depends(require_role("operator", "admin", "worker"))]
State = Annotated[AppState, Depends(get_state)]
Limit = Annotated[int, Query(ge=1, le=1000)]
BIGINT_MAX = 2**63 - 1
CaseId = Annotated[int, Path(ge=1, le=BIGINT_MAX)]

CASE_STATES = ("reported", "dispatched", "accepted", "on_site", "resolved", "verified", "archived")
PRIORITIES = ("critical", "major", "minor", "warning")
Priority = Literal["critical", "major", "minor", "warning"]
LOCATOR_MAX_AGE = timedelta(seconds=60)  # the grid is re-read at most this stale
STATS_WINDOW = timedelta(days=30)  # `since` by default: this long before now
OWN_CASES_ONLY = "a worker sees their own cases only"
AUDITED_FIELDS = ("worker_id", "score")  # of an action's body; notes and reasons are free
# text (they may name people or numbers), kept in the case's own timeline only


# -- wiring


class CasesWiring:
    """What the handlers need: the settings (SLA policies, topic prefix), the clock and a
    cached cell locator for reports."""

    def __init__(self, settings: Settings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        self._locator: CellLocator | None = None
        self._loaded_at: datetime | None = None
        self._lock = asyncio.Lock()

    def _fresh(self, now: datetime) -> bool:
        if self._locator is None or self._loaded_at is None:
            return False
        return timedelta(0) <= now - self._loaded_at < LOCATOR_MAX_AGE

    async def locator(self, pool: asyncpg.Pool) -> CellLocator:
        """The grid from the cells table, re-read when older than LOCATOR_MAX_AGE."""
        if self._fresh(self.clock.now()) and self._locator is not None:
            return self._locator
        async with self._lock:  # one reload at a time; the others use its result
            now = self.clock.now()
            if not self._fresh(now) or self._locator is None:
                async with pool.acquire() as conn:
                    self._locator = await CellLocator.from_db(conn)
                self._loaded_at = now
            return self._locator


def attach_cases(app: FastAPI, *, settings: Settings, clock: Clock) -> None:
    """Give the case endpoints the settings and the clock every action time comes from."""
    app.state.cases = CasesWiring(settings, clock)


def get_wiring(request: Request) -> CasesWiring:
    wiring: CasesWiring | None = getattr(request.app.state, "cases", None)
    if wiring is None:
        raise HTTPException(503, "the case endpoints are not wired (attach_cases)")
    return wiring


Wiring = Annotated[CasesWiring, Depends(get_wiring)]


# -- cases


@router.get("/cases")
async def list_cases(
    principal: Anyone,
    state: State,
    case_state: Annotated[
        str | None, Query(alias="state", description="comma-separated states")
    ] = None,
    worker: Annotated[str | None, Query(description="the assignee's worker id")] = None,
    cell: Annotated[str | None, Query(description="this cell and the cells below it")] = None,
    priority: Annotated[str | None, Query(description="comma-separated priorities")] = None,
    limit: Limit = 100,
    cursor: Annotated[int | None, Query(ge=1, le=BIGINT_MAX)] = None,
) -> dict[str, Any]:
    """Newest first; `next_cursor` (the last id) when the page is full."""
    states = parse_enum_list("state", case_state, CASE_STATES)
    priorities = parse_enum_list("priority", priority, PRIORITIES)
    worker = worker.strip() if worker and worker.strip() else None
    cell = cell.strip() if cell and cell.strip() else None
    if principal.role == "worker":
        if worker is not None and worker != principal.worker_id:
            raise HTTPException(403, OWN_CASES_ONLY)
        worker = principal.worker_id
    async with (
        state.pool.acquire() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        rows = await conn.fetch(
            query("cases_list"), states, worker, cell, priorities, cursor, limit
        )
        items = [await case_json(conn, row, timeline=False) for row in rows]
    next_cursor = str(rows[-1]["id"]) if len(rows) == limit else None
    return {"items": items, "next_cursor": next_cursor}


@router.get("/cases/{case_id}")
async def get_case(case_id: CaseId, principal: Anyone, state: State) -> dict[str, Any]:
    """One case with its whole timeline (who, what, when)."""
    async with (
        state.pool.acquire() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        row = await conn.fetchrow(query("case_get"), case_id)
        if row is None:
            raise HTTPException(404, f"no case {case_id}")
        if principal.role == "worker" and row["assignee"] != principal.worker_id:
            # A supervisor (grid leader, community, street staff) reads the cases of
            # their area, which they verify and reassign; a worker only their own.
            actor = await Actor.of(conn, principal)
            covers = actor.worker_role in SUPERVISOR_ROLES and await conn.fetchval(
                query("worker_covers_cell"), principal.worker_id, row["cell_id"]
            )
            if not covers:
                raise HTTPException(403, OWN_CASES_ONLY)
        return await case_json(conn, row, timeline=True)


async def _json_object(request: Request) -> dict[str, Any]:
    """The optional body of an action: nothing, or a JSON object."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise HTTPException(422, "the body must be a JSON object (it is not JSON)") from None
    if not isinstance(body, dict):
        raise HTTPException(422, f"the body must be a JSON object, not {type(body).__name__}")
    return body


@router.post("/cases/{case_id}/{action}")
async def case_action(
    case_id: CaseId,
    action: str,
    request: Request,
    principal: Anyone,
    state: State,
    wiring: Wiring,
) -> dict[str, Any]:
    """accept, reject (reason), arrive, resolve (note), verify, reopen (reason), archive,
    rate (score 1–5, comment), reassign (worker_id), escalate; in one transaction.
    Answers the updated case with its timeline."""
    body = await _json_object(request)
    try:
        async with state.pool.acquire() as conn, conn.transaction():
            actor = await Actor.of(conn, principal)
            before = await conn.fetchrow(query("case_lock"), case_id)
            row = await act(
                conn,
                case_id,
                action,
                actor,
                body,
                now=wiring.clock.now(),
                topic_prefix=wiring.settings.topic_prefix,
                webhook_url=wiring.settings.webhook_url,
            )
            detail = {key: body[key] for key in AUDITED_FIELDS if key in body}
            await audit.record(
                conn, actor=audit.actor_of(principal), action=f"case.{action}",
                target_type="case", target_id=str(case_id),
                address=audit.client_address(request),
                detail={"from_state": before["state"] if before else None,
                        "to_state": row["state"], "assignee": row["assignee"], **detail},
            )  # fmt: skip
            return await case_json(conn, row, timeline=True)
    except CaseError as exc:  # raised inside the transaction: it rolled back
        raise HTTPException(exc.status, exc.message) from None


# -- reports


class ReportIn(BaseModel):
    """A person's report (发现上报): where, what, and how urgent."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, allow_inf_nan=False)

    lat: float = Field(ge=-90, le=90, strict=True, description="WGS84 degrees")
    lon: float = Field(ge=-180, le=180, strict=True, description="WGS84 degrees")
    category: str = Field(min_length=1, max_length=64)
    description: str = Field(min_length=1, max_length=2000)
    priority: Priority = "minor"


@router.post("/reports", status_code=201)
async def report(
    body: ReportIn, principal: Anyone, state: State, wiring: Wiring, request: Request
) -> dict[str, Any]:
    """A case for the cell holding the point, dispatched like a device alarm's."""
    locator = await wiring.locator(state.pool)
    cell_id = locator.locate(body.lon, body.lat)
    if cell_id is None:
        raise HTTPException(
            422,
            f"the point lat {body.lat}, lon {body.lon} is in no grid cell: reports are taken "
            "only inside the grid (WGS84 degrees)",
        )
    async with state.pool.acquire() as conn, conn.transaction():
        reporter = await Actor.of(conn, principal)
        row = await open_case_for_report(
            conn,
            report_id=uuid.uuid4().hex,
            cell_id=cell_id,
            lat=body.lat,
            lon=body.lon,
            category=body.category,
            description=body.description,
            priority=body.priority,
            policy=wiring.settings.sla_policy(body.priority),
            reporter=reporter,
            topic_prefix=wiring.settings.topic_prefix,
            now=wiring.clock.now(),
            webhook_url=wiring.settings.webhook_url,
        )
        await audit.record(
            conn, actor=audit.actor_of(principal), action="case.report", target_type="case",
            target_id=str(row["id"]), address=audit.client_address(request),
            detail={"cell_id": cell_id, "category": body.category, "priority": body.priority,
                    "to_state": row["state"], "assignee": row["assignee"]},
        )  # fmt: skip
        return await case_json(conn, row, timeline=True)


# -- statistics


@router.get("/stats")
async def stats(
    _: Operator,
    state: State,
    wiring: Wiring,
    by: Annotated[By, Query(description="per cell or per worker (the assignee)")] = "cell",
    since: Annotated[
        datetime | None, Query(description="cases created from then (default: 30 days ago)")
    ] = None,
    until: Annotated[
        datetime | None, Query(description="… until before then (default: now)")
    ] = None,
) -> dict[str, Any]:
    """Disposal rate, SLA compliance, time to accept / arrive / resolve, escalations and
    ratings of the cases created in [since, until), sorted by cell or worker id."""
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise HTTPException(422, f"{name} needs a UTC offset (RFC 3339)")
    now = wiring.clock.now()
    start = since if since is not None else (until or now) - STATS_WINDOW
    if until is not None and until <= start:
        raise HTTPException(422, "until must be after since")
    items, total = await case_stats(state.pool, by=by, since=start, until=until)
    return {
        "by": by,
        "since": iso(start),
        "until": iso(until or now),
        "items": items,
        "total": total,
    }
