"""Cases: the closed loop of CONTRACT §5, with assignment, the timeline and
notifications. Every function runs inside the caller's transaction.

States: reported → dispatched → accepted → on_site → resolved → verified → archived,
with `rate` recorded after archiving. Deadlines (accept, arrive, resolve) count from
the report time, with the policy snapshot taken when the case opened; the SLA timer
(`alerting.sla`) escalates a case whose next deadline passed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, NamedTuple

import asyncpg
import orjson

from alerting.alarm_json import announce_alarm, iso
from gridwarden.auth import Principal
from gridwarden.db import query

OPEN_STATES = ("reported", "dispatched", "accepted", "on_site")
LEVELS = ("grid_worker", "grid_leader", "community_staff", "street_staff")
LEVEL_ROLES: dict[str, list[str]] = {
    "grid_worker": ["grid_worker", "part_time"],
    "grid_leader": ["grid_leader"],
    "community_staff": ["community_staff"],
    "street_staff": ["street_staff"],
}
SUPERVISOR_ROLES = ("grid_leader", "community_staff", "street_staff")
CASE_CHANNEL = "gw_case"  # payload: the case id; see `add_event`
STEP_AFTER = {"dispatched": "accept", "accepted": "arrive", "on_site": "resolve"}

Action = Literal[
    "accept", "reject", "arrive", "resolve", "verify", "reopen", "archive", "rate",
    "reassign", "escalate",
]  # fmt: skip
Who = Literal["assignee", "supervisor", "operator", "assignee_or_supervisor"]


@dataclass(frozen=True)
class Transition:
    allowed_from: tuple[str, ...]
    to: str | None  # None: decided by the action (reject, escalate, rate)
    who: Who


TRANSITIONS: dict[str, Transition] = {
    "accept": Transition(("dispatched",), "accepted", "assignee"),
    "reject": Transition(("dispatched",), None, "assignee"),
    "arrive": Transition(("accepted",), "on_site", "assignee"),
    "resolve": Transition(("on_site",), "resolved", "assignee"),
    "verify": Transition(("resolved",), "verified", "supervisor"),
    "reopen": Transition(("resolved", "verified"), "dispatched", "supervisor"),
    "archive": Transition(("verified",), "archived", "operator"),
    "rate": Transition(("archived",), None, "operator"),
    "reassign": Transition(OPEN_STATES, "dispatched", "supervisor"),
    "escalate": Transition(OPEN_STATES, None, "assignee_or_supervisor"),
}


class CaseError(Exception):
    """A refused action: `status` is the HTTP status the API answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Notify:
    """Where worker notifications go: the MQTT topic prefix and, optionally, a webhook."""

    topic_prefix: str
    webhook_url: str | None = None


@dataclass(frozen=True)
class Actor:
    """Who acts: a token's principal, or the system (timers, the rules engine)."""

    name: str  # worker id, `operator:<token id>`, `admin:<token id>`, `system`
    role: str  # operator, admin, worker, system
    worker_id: str | None = None
    worker_role: str | None = None

    @classmethod
    async def of(cls, conn: asyncpg.Connection, principal: Principal) -> Actor:
        if principal.role == "worker" and principal.worker_id:
            row = await conn.fetchrow(query("case_worker"), principal.worker_id)
            return cls(principal.worker_id, "worker", principal.worker_id,
                       row["role"] if row else None)  # fmt: skip
        return cls(f"{principal.role}:{principal.token_id}", principal.role)


SYSTEM = Actor("system", "system")


# -- opening -------------------------------------------------------------------------------
def incident_key(alarm_source: str, device_building: str | None, kind: str, cell_id: str) -> str:
    """What a case is about. Smoke in one building is one incident whichever detector
    saw it (and the correlated `building:` alarm joins it too); otherwise the device."""
    if alarm_source.startswith(("building:", "cell:")):
        return alarm_source
    if kind == "smoke_detector" and device_building:
        return f"building:{cell_id}/{device_building}"
    return alarm_source


class OpenedCase(NamedTuple):
    case_id: int
    inserted: bool  # a new case (reported and dispatched), or False: joined an open one


async def open_case_for_alarm(
    conn: asyncpg.Connection,
    alarm: asyncpg.Record,
    *,
    source: str,
    building: str | None,
    details: dict[str, Any],
    policy: dict[str, int],
    topic_prefix: str,
    now: datetime,
    webhook_url: str | None = None,
    link: bool = True,
) -> OpenedCase | None:
    """Open a case for a raised alarm, or join the incident's open case (None: the alarm
    has no cell, nobody to send). `link=False` leaves setting `alarms.case_id` to the
    caller (`link_alarms`, once for a batch: the intake locks alarms only at the end of
    its transaction, so ingest, upserting the same alarms, never waits long on it)."""
    cell_id = alarm["cell_id"]
    if cell_id is None:
        return None  # a device outside the grid: nobody to send; the alarm stays visible
    location = await conn.fetchrow(query("case_device_location"), alarm["device_id"])
    what = details.get("label") or details.get("description") or alarm["rule"]
    where = " · ".join(p for p in (location["name"], location["building"]) if p) if location else ""
    case = await conn.fetchrow(
        query("case_open_or_join"),
        incident_key(source, building, alarm["kind"], cell_id),
        "alarm",
        alarm["rule"],
        f"{what} — {where}" if where else what,
        orjson.dumps({"alarm": alarm["id"], **details}).decode(),
        cell_id,
        alarm["device_id"] or None,
        location["lat"] if location else None,
        location["lon"] if location else None,
        alarm["severity"],
        orjson.dumps(policy).decode(),
        now,
    )
    assert case is not None
    if link:
        await link_alarms(conn, {alarm["id"]: case["id"]})
    if case["inserted"]:
        await add_event(conn, case["id"], now, SYSTEM, "reported", None, "reported",
                        {"alarm_id": alarm["id"], "rule": alarm["rule"]})  # fmt: skip
        await dispatch(conn, case, now=now, topic_prefix=topic_prefix, reason="dispatched",
                       webhook_url=webhook_url)  # fmt: skip
    else:
        joined = {"alarm_id": alarm["id"], "rule": alarm["rule"]}
        await add_event(conn, case["id"], now, SYSTEM, "alarm_joined", case["state"],
                        case["state"], joined)  # fmt: skip
    return OpenedCase(int(case["id"]), bool(case["inserted"]))


async def link_alarms(conn: asyncpg.Connection, links: dict[int, int]) -> int:
    """Set `case_id` of the alarms (alarm id → case id): the alarms are locked in id order
    in one statement, and each one whose link changed is told to the live feed (a
    `repeated` change: no MQTT message). Returns how many changed."""
    if not links:
        return 0
    ids = sorted(links)
    rows = await conn.fetch(query("alarms_link_cases"), ids, [links[i] for i in ids])
    return len(rows)


async def open_case_for_report(
    conn: asyncpg.Connection,
    *,
    report_id: str,
    cell_id: str,
    lat: float,
    lon: float,
    category: str,
    description: str,
    priority: str,
    policy: dict[str, int],
    reporter: Actor,
    topic_prefix: str,
    now: datetime,
    webhook_url: str | None = None,
) -> asyncpg.Record:
    case = await conn.fetchrow(
        query("case_open_or_join"),
        f"report:{report_id}", "report", category, f"{category}: {description[:80]}",
        description, cell_id, None, lat, lon, priority, orjson.dumps(policy).decode(), now,
    )  # fmt: skip
    assert case is not None
    if not case["inserted"]:
        return case  # the same report again: it already has its case
    await add_event(conn, case["id"], now, reporter, "reported", None, "reported",
                    {"category": category})  # fmt: skip
    return await dispatch(conn, case, now=now, topic_prefix=topic_prefix, reason="dispatched",
                          webhook_url=webhook_url)  # fmt: skip


# -- assignment ----------------------------------------------------------------------------
async def find_assignee(
    conn: asyncpg.Connection, cell_id: str, from_level: str, exclude: list[str]
) -> tuple[asyncpg.Record, str] | None:
    """The responsible on-duty person at `from_level`, or at the next level up."""
    for level in LEVELS[LEVELS.index(from_level) :]:
        row = await conn.fetchrow(query("case_candidate"), cell_id, LEVEL_ROLES[level], exclude)
        if row is not None:
            return row, level
    return None


async def dispatch(
    conn: asyncpg.Connection,
    case: asyncpg.Record,
    *,
    now: datetime,
    topic_prefix: str,
    reason: str,
    level: str | None = None,
    worker_id: str | None = None,
    actor: Actor = SYSTEM,
    exclude: list[str] | None = None,
    webhook_url: str | None = None,
) -> asyncpg.Record:
    """Give the case to a person (the given worker, or the best candidate from `level`
    up) with its accept deadline; notify them. Without anyone it stays `reported`."""
    level = level or case["level"]
    if worker_id is not None:
        worker = await conn.fetchrow(query("case_worker"), worker_id)
        if worker is None:
            raise CaseError(404, f"no worker {worker_id!r}")
        found: tuple[Any, str] | None = (worker, _level_of(worker["role"]))
    else:
        found = await find_assignee(conn, case["cell_id"], level, exclude or [])
    if found is None:
        if case["assignee"] is not None and case["assignee"] in (exclude or []):
            # The assignee gave it back and nobody else can take it: nobody has it now.
            unassigned = await conn.fetchrow(query("case_unassign"), case["id"], now)
            assert unassigned is not None
            await add_event(conn, case["id"], now, actor, "unassigned", case["state"],
                            "reported", {"reason": "nobody else on duty at any level"})  # fmt: skip
            return unassigned
        await add_event(conn, case["id"], now, actor, "unassigned", case["state"], case["state"],
                        {"reason": "nobody on duty at any level",
                         "assignee": case["assignee"]})  # fmt: skip
        return case
    worker, level = found
    step, due = next_deadline(case, "dispatched", now)
    updated = await conn.fetchrow(
        query("case_assign"), case["id"], worker["id"], level, now, due, step
    )
    assert updated is not None
    await add_event(conn, case["id"], now, actor, reason, case["state"], "dispatched",
                    {"assignee": worker["id"], "level": level})  # fmt: skip
    await notify_worker(conn, updated, worker["id"], reason, topic_prefix, webhook_url)
    return updated


def _level_of(role: str) -> str:
    return "grid_worker" if role == "part_time" else role


def next_deadline(
    case: asyncpg.Record | dict[str, Any], state: str, now: datetime
) -> tuple[str | None, datetime | None]:
    """The step the case waits for in `state`, and its deadline from the report time.
    A step already late (after an escalation) gets the policy's escalation grace."""
    step = STEP_AFTER.get(state)
    if step is None:
        return None, None
    policy = _policy(case)
    due = case["created_at"] + timedelta(seconds=policy[f"{step}"])
    if due <= now:
        due = now + timedelta(seconds=policy["escalate"])
    return step, due


def _policy(case: asyncpg.Record | dict[str, Any]) -> dict[str, int]:
    policy = case["policy"]
    return orjson.loads(policy) if isinstance(policy, str) else dict(policy)


# -- the timeline and notifications -------------------------------------------------------------
async def add_event(
    conn: asyncpg.Connection,
    case_id: int,
    at: datetime,
    actor: Actor,
    action: str,
    from_state: str | None,
    to_state: str | None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Append to the case's timeline and tell the operators' live feed: the same statement
    runs `pg_notify('gw_case', <case id>)`, delivered on commit (`AlarmFeed` sends the case
    as an `event: case` on `GET /api/alarms/stream`)."""
    await conn.execute(
        query("case_event_add"), case_id, at, actor.name, action, from_state, to_state,
        orjson.dumps(detail or {}).decode(),
    )  # fmt: skip


def worker_topic(topic_prefix: str, worker_id: str) -> str:
    return f"{topic_prefix}/workers/{worker_id}/cases"


async def notify_worker(
    conn: asyncpg.Connection,
    case: asyncpg.Record,
    worker_id: str,
    reason: str,
    topic_prefix: str,
    webhook_url: str | None = None,
) -> None:
    """CONTRACT §6: one QoS-1 message on the worker's topic, through the outbox; with a
    `webhook_url`, also a webhook row (the same payload plus `worker_id`) that the outbox
    publisher POSTs there."""
    policy = _policy(case)
    created = case["created_at"]
    payload = {
        "reason": reason,  # dispatched, escalated, reassigned, reopened
        "case_id": case["id"],
        "state": case["state"],
        "priority": case["priority"],
        "level": case["level"],
        "title": case["title"],
        "what": case["category"],
        "cell_id": case["cell_id"],
        "device_id": case["device_id"],
        "location": {"lat": case["lat"], "lon": case["lon"]},
        "due": {
            "accept_by": iso(created + timedelta(seconds=policy["accept"])),
            "arrive_by": iso(created + timedelta(seconds=policy["arrive"])),
            "resolve_by": iso(created + timedelta(seconds=policy["resolve"])),
            "next": iso(case["due_at"]),
        },
        "created_at": iso(created),
    }
    body = None
    if webhook_url is not None:
        body = orjson.dumps({"worker_id": worker_id, **payload}).decode()
    await conn.execute(
        query("outbox_add_notification"),
        worker_topic(topic_prefix, worker_id), orjson.dumps(payload).decode(), webhook_url, body,
    )  # fmt: skip


# -- actions -------------------------------------------------------------------------------------
def _allowed(transition: Transition, case: asyncpg.Record, actor: Actor) -> bool:
    operator = actor.role in ("operator", "admin")
    assignee = actor.worker_id is not None and actor.worker_id == case["assignee"]
    supervisor = operator or (actor.worker_role in SUPERVISOR_ROLES and not assignee)
    return {
        "assignee": assignee or operator,
        "supervisor": supervisor,
        "operator": operator,
        "assignee_or_supervisor": assignee or supervisor,
    }[transition.who]


async def act(
    conn: asyncpg.Connection,
    case_id: int,
    action: str,
    actor: Actor,
    body: dict[str, Any],
    *,
    now: datetime,
    topic_prefix: str,
    webhook_url: str | None = None,
) -> asyncpg.Record:
    """Apply one action of CONTRACT §5 to a case; raises CaseError when refused."""
    transition = TRANSITIONS.get(action)
    if transition is None:
        raise CaseError(404, f"unknown action {action!r}; one of {', '.join(TRANSITIONS)}")
    case = await conn.fetchrow(query("case_lock"), case_id)
    if case is None:
        raise CaseError(404, f"no case {case_id}")
    if (
        actor.role == "worker"
        and case["assignee"] != actor.worker_id
        and actor.worker_role not in SUPERVISOR_ROLES
    ):
        raise CaseError(403, "a worker acts on their own cases only")
    if not _allowed(transition, case, actor):
        raise CaseError(403, f"{action} is not allowed to {actor.name}")
    if (
        actor.role == "worker"
        and case["assignee"] != actor.worker_id
        and not await conn.fetchval(query("worker_covers_cell"), actor.worker_id, case["cell_id"])
    ):
        raise CaseError(403, f"case {case_id} is outside {actor.name}'s area")
    if case["state"] not in transition.allowed_from:
        raise CaseError(
            409, f"cannot {action} a case that is {case['state']} "
            f"(only from {', '.join(transition.allowed_from)})",
        )  # fmt: skip
    handler = _HANDLERS[action]
    return await handler(conn, case, actor, body, now, Notify(topic_prefix, webhook_url))


def _text(body: dict[str, Any], key: str, *, required: bool, limit: int = 2000) -> str | None:
    value = body.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise CaseError(422, f"{key} is required")
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise CaseError(422, f"{key} must be text of at most {limit} characters")
    return value.strip()


STEP_COLUMNS = (
    "accepted_at", "arrived_at", "resolved_at", "resolved_by", "resolution", "verified_at",
    "verified_by", "archived_at", "rating", "rating_comment", "accept_met", "arrive_met",
    "resolve_met",
)  # fmt: skip
MET_COLUMN = {"accepted": "accept_met", "on_site": "arrive_met", "resolved": "resolve_met"}


async def _step(
    conn: asyncpg.Connection,
    case: asyncpg.Record,
    actor: Actor,
    action: str,
    to: str,
    now: datetime,
    sets: dict[str, Any],
    detail: dict[str, Any] | None = None,
) -> asyncpg.Record:
    """Move to `to`, recording the step's time, whether it met its deadline, and the
    next deadline."""
    step, due = next_deadline(case, to, now)
    if to in MET_COLUMN:
        deadline = case["created_at"] + timedelta(seconds=_policy(case)[STEP_AFTER[case["state"]]])
        sets[MET_COLUMN[to]] = now <= deadline
    row = await conn.fetchrow(
        query("case_step"), case["id"], to, due, step, now, *(sets.get(c) for c in STEP_COLUMNS)
    )
    assert row is not None
    await add_event(conn, case["id"], now, actor, action, case["state"], to, detail)
    return row


async def _accept(
    conn: asyncpg.Connection,
    case: asyncpg.Record,
    actor: Actor,
    body: dict[str, Any],
    now: datetime,
    notify: Notify,
) -> asyncpg.Record:
    return await _step(conn, case, actor, "accept", "accepted", now, {"accepted_at": now})


async def _arrive(
    conn: asyncpg.Connection,
    case: asyncpg.Record,
    actor: Actor,
    body: dict[str, Any],
    now: datetime,
    notify: Notify,
) -> asyncpg.Record:
    return await _step(conn, case, actor, "arrive", "on_site", now, {"arrived_at": now})


async def _resolve(
    conn: asyncpg.Connection,
    case: asyncpg.Record,
    actor: Actor,
    body: dict[str, Any],
    now: datetime,
    notify: Notify,
) -> asyncpg.Record:
    note = _text(body, "note", required=True)
    return await _step(conn, case, actor, "resolve", "resolved", now,
                       {"resolved_at": now, "resolved_by": actor.name, "resolution": note},
                       {"note": note})  # fmt: skip


async def _verify(
    conn: asyncpg.Connection,
    case: asyncpg.Record,
    actor: Actor,
    body: dict[str, Any],
    now: datetime,
    notify: Notify,
) -> asyncpg.Record:
    if actor.name == case["resolved_by"] or actor.worker_id == case["assignee"]:
        raise CaseError(403, "the verifier must not be the worker who resolved it")
    return await _step(conn, case, actor, "verify", "verified", now,
                       {"verified_at": now, "verified_by": actor.name},
                       {"note": _text(body, "note", required=False)})  # fmt: skip


async def _archive(
    conn: asyncpg.Connection,
    case: asyncpg.Record,
    actor: Actor,
    body: dict[str, Any],
    now: datetime,
    notify: Notify,
) -> asyncpg.Record:
    row = await _step(conn, case, actor, "archive", "archived", now, {"archived_at": now})
    for alarm in await conn.fetch(query("case_close_alarms"), case["id"], now):
        await announce_alarm(conn, alarm, "closed", notify.topic_prefix)
    return row


async def _rate(
    conn: asyncpg.Connection,
    case: asyncpg.Record,
    actor: Actor,
    body: dict[str, Any],
    now: datetime,
    notify: Notify,
) -> asyncpg.Record:
    if case["rating"] is not None:
        raise CaseError(409, f"case {case['id']} is already rated")
    score = body.get("score")
    if not isinstance(score, int) or isinstance(score, bool) or not 1 <= score <= 5:
        raise CaseError(422, "score must be a whole number from 1 to 5")
    comment = _text(body, "comment", required=False)
    return await _step(conn, case, actor, "rate", "archived", now,
                       {"rating": score, "rating_comment": comment},
                       {"score": score, "comment": comment})  # fmt: skip


async def _reject(
    conn: asyncpg.Connection,
    case: asyncpg.Record,
    actor: Actor,
    body: dict[str, Any],
    now: datetime,
    notify: Notify,
) -> asyncpg.Record:
    reason = _text(body, "reason", required=True)
    rejected = [*case["rejected_by"], case["assignee"]] if case["assignee"] else case["rejected_by"]
    await conn.execute(query("case_set_rejected"), case["id"], rejected)
    await add_event(conn, case["id"], now, actor, "reject", case["state"], case["state"],
                    {"reason": reason})  # fmt: skip
    fresh = await conn.fetchrow(query("case_get"), case["id"])
    return await dispatch(conn, fresh, now=now, topic_prefix=notify.topic_prefix,
                          reason="reassigned", exclude=rejected,
                          webhook_url=notify.webhook_url)  # fmt: skip


async def _reopen(
    conn: asyncpg.Connection,
    case: asyncpg.Record,
    actor: Actor,
    body: dict[str, Any],
    now: datetime,
    notify: Notify,
) -> asyncpg.Record:
    reason = _text(body, "reason", required=True)
    await add_event(conn, case["id"], now, actor, "reopen", case["state"], "dispatched",
                    {"reason": reason})  # fmt: skip
    await conn.execute(query("case_reopen_reset"), case["id"])
    fresh = await conn.fetchrow(query("case_get"), case["id"])
    return await dispatch(conn, fresh, now=now, topic_prefix=notify.topic_prefix,
                          reason="reopened", worker_id=case["assignee"], actor=actor,
                          webhook_url=notify.webhook_url)  # fmt: skip


async def _reassign(
    conn: asyncpg.Connection,
    case: asyncpg.Record,
    actor: Actor,
    body: dict[str, Any],
    now: datetime,
    notify: Notify,
) -> asyncpg.Record:
    worker_id = _text(body, "worker_id", required=True, limit=64)
    return await dispatch(conn, case, now=now, topic_prefix=notify.topic_prefix,
                          reason="reassigned", worker_id=worker_id, actor=actor,
                          webhook_url=notify.webhook_url)  # fmt: skip


async def _escalate(
    conn: asyncpg.Connection,
    case: asyncpg.Record,
    actor: Actor,
    body: dict[str, Any],
    now: datetime,
    notify: Notify,
) -> asyncpg.Record:
    return await escalate(conn, case, actor, now, notify.topic_prefix,
                          reason=_text(body, "reason", required=False),
                          webhook_url=notify.webhook_url)  # fmt: skip


async def escalate(
    conn: asyncpg.Connection,
    case: asyncpg.Record,
    actor: Actor,
    now: datetime,
    topic_prefix: str,
    *,
    reason: str | None,
    missed: str | None = None,
    webhook_url: str | None = None,
) -> asyncpg.Record:
    """One level up the hierarchy (grid worker → grid leader → community → street)."""
    index = LEVELS.index(case["level"])
    above = (
        await find_assignee(conn, case["cell_id"], LEVELS[index + 1], [])
        if index + 1 < len(LEVELS)
        else None
    )
    if above is None:
        # Nobody above (the top, or nobody on duty): keep it where it is, with more time.
        due = now + timedelta(seconds=_policy(case)["escalate"])
        await conn.execute(query("case_postpone"), case["id"], due)
        await add_event(conn, case["id"], now, actor, "escalation_exhausted", case["state"],
                        case["state"], {"missed": missed, "reason": reason})  # fmt: skip
        row = await conn.fetchrow(query("case_get"), case["id"])
        assert row is not None
        return row
    await conn.execute(query("case_escalated"), case["id"], missed)
    fresh = await conn.fetchrow(query("case_get"), case["id"])
    worker, level = above
    await add_event(conn, case["id"], now, actor, "escalate", case["state"], "dispatched",
                    {"from_level": case["level"], "to_level": level,
                     "missed": missed, "reason": reason})  # fmt: skip
    return await dispatch(conn, fresh, now=now, topic_prefix=topic_prefix, reason="escalated",
                          worker_id=worker["id"], actor=actor, webhook_url=webhook_url)  # fmt: skip


Handler = Callable[
    [asyncpg.Connection, asyncpg.Record, Actor, dict[str, Any], datetime, Notify],
    Awaitable[asyncpg.Record],
]
_HANDLERS: dict[str, Handler] = {
    "accept": _accept, "arrive": _arrive, "resolve": _resolve, "verify": _verify,
    "archive": _archive, "rate": _rate, "reject": _reject, "reopen": _reopen,
    "reassign": _reassign, "escalate": _escalate,
}  # fmt: skip


# -- reading -------------------------------------------------------------------------------------
async def case_json(
    conn: asyncpg.Connection, case: asyncpg.Record, *, timeline: bool
) -> dict[str, Any]:
    """A case as CONTRACT §5 lists it."""
    out: dict[str, Any] = {
        "id": case["id"],
        "alarm_ids": [r["id"] for r in await conn.fetch(query("case_alarm_ids"), case["id"])],
        "cell_id": case["cell_id"],
        "state": case["state"],
        "assignee": case["assignee"],
        "level": case["level"],
        "priority": case["priority"],
        "created_at": iso(case["created_at"]),
        "due_at": iso(case["due_at"]),
        "due_step": case["due_step"],
        "title": case["title"],
        "category": case["category"],
        "origin": case["origin"],
        "device_id": case["device_id"],
        "location": {"lat": case["lat"], "lon": case["lon"]},
        "escalations": case["escalations"],
        "rating": case["rating"],
    }
    if timeline:
        out["timeline"] = [
            {
                "at": iso(e["at"]), "who": e["actor"], "action": e["action"],
                "from": e["from_state"], "to": e["to_state"], "detail": orjson.loads(e["detail"]),
            }
            for e in await conn.fetch(query("case_timeline"), case["id"])
        ]  # fmt: skip
    return out
