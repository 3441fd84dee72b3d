"""Cases: the closed loop of CONTRACT §5, with assignment, the timeline and
notifications. Every function runs inside the caller's transaction.

States: reported → dispatched → accepted → on_site → resolved → verified → archived,
with `rate` recorded after archiving. Deadlines (accept, arrive, resolve) count from
the report time, with the policy snapshot taken when the case opened; the SLA timer
(`alerting.sla`) escalates a case whose next deadline passed.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
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


class CaseEvent(NamedTuple):
    """One timeline entry."""

    case_id: int
    at: datetime
    actor: Actor
    action: str
    from_state: str | None
    to_state: str | None
    detail: dict[str, Any] | None = None


class Proposal(NamedTuple):
    """A case as it would be opened (`case_open_or_join`)."""

    incident_key: str
    origin: str
    category: str
    title: str
    description: str
    cell_id: str
    device_id: str | None
    lat: float | None
    lon: float | None
    priority: str
    policy: dict[str, int]


async def open_or_join(
    conn: asyncpg.Connection, proposals: Sequence[Proposal], now: datetime
) -> dict[str, asyncpg.Record]:
    """Open the proposed cases, or join the open case of each incident (distinct keys):
    incident key → the case, with `inserted`."""
    if not proposals:
        return {}
    columns = list(zip(*proposals, strict=True))
    policies = [orjson.dumps(p).decode() for p in columns[-1]]
    rows = await conn.fetch(query("case_open_or_join"), *columns[:-1], policies, now)
    return {row["incident_key"]: row for row in rows}


def _alarm_proposal(alarm: asyncpg.Record, policy: dict[str, int]) -> Proposal:
    """The case for a claimed alarm (a `case_intake_claim` row: the alarm, what was
    queued with it, where its device is)."""
    details = orjson.loads(alarm["details"])
    what = details.get("label") or details.get("description") or alarm["rule"]
    where = " · ".join(p for p in (alarm["device_name"], alarm["device_building"]) if p)
    cell_id = alarm["cell_id"]
    return Proposal(
        incident_key(alarm["source"], alarm["building"], alarm["kind"], cell_id),
        "alarm",
        alarm["rule"],
        f"{what} — {where}" if where else what,
        orjson.dumps({"alarm": alarm["id"], **details}).decode(),
        cell_id,
        alarm["device_id"] or None,
        alarm["lat"],
        alarm["lon"],
        alarm["severity"],
        policy,
    )


async def open_cases_for_alarms(
    conn: asyncpg.Connection,
    alarms: Sequence[asyncpg.Record],
    *,
    policy_of: Callable[[str], dict[str, int]],
    topic_prefix: str,
    now: datetime,
    webhook_url: str | None = None,
) -> list[OpenedCase | None]:
    """Open a case for each raised alarm (`case_intake_claim` rows), or join its incident's
    open case; None for an alarm without a cell (nobody to send; it stays visible). The
    same result as one alarm after the other, in the given order, in a few statements for
    the lot: round r opens or joins the r-th alarm of every incident (so one statement
    never touches a case twice, and a later alarm of an incident joins the case the first
    one opened and dispatched), the assignees are chosen as `find_assignee` would, each
    choice counted for the next, and the timeline entries and notifications are written
    at the end, in the order one alarm after the other would have written them. Setting
    `alarms.case_id` is left to the caller (`link_alarms`, at the end of its transaction:
    ingest, upserting the same alarms, never waits long on it)."""
    results: list[OpenedCase | None] = [None] * len(alarms)
    by_incident: dict[str, list[tuple[int, Proposal]]] = {}
    for index, alarm in enumerate(alarms):
        if alarm["cell_id"] is not None:
            proposal = _alarm_proposal(alarm, policy_of(alarm["severity"]))
            by_incident.setdefault(proposal.incident_key, []).append((index, proposal))
    events: dict[int, list[CaseEvent]] = {}
    notes: dict[int, tuple[str, dict[str, Any]]] = {}
    rounds = max((len(queue) for queue in by_incident.values()), default=0)
    for r in range(rounds):
        this_round = sorted(queue[r] for queue in by_incident.values() if len(queue) > r)
        cases = await open_or_join(conn, [proposal for _, proposal in this_round], now)
        opened = {
            index: cases[proposal.incident_key]
            for index, proposal in this_round
            if cases[proposal.incident_key]["inserted"]
        }
        dispatched = await _dispatch_new(conn, opened, now) if opened else {}
        for index, proposal in this_round:
            case, alarm = cases[proposal.incident_key], alarms[index]
            cause = {"alarm_id": alarm["id"], "rule": alarm["rule"]}
            if case["inserted"]:
                events[index] = [CaseEvent(case["id"], now, SYSTEM, "reported", None,
                                           "reported", cause)]  # fmt: skip
                assigned = dispatched.get(index)
                if assigned is None:
                    events[index].append(_nobody_event(case, now, SYSTEM))
                else:
                    events[index].append(_dispatched_event(case, assigned, now, SYSTEM,
                                                           "dispatched"))  # fmt: skip
                    notes[index] = (assigned["assignee"], notification(assigned, "dispatched"))
            else:
                events[index] = [CaseEvent(case["id"], now, SYSTEM, "alarm_joined",
                                           case["state"], case["state"], cause)]  # fmt: skip
            results[index] = OpenedCase(int(case["id"]), bool(case["inserted"]))
    await add_events(conn, [event for index in sorted(events) for event in events[index]])
    await queue_notifications(conn, [notes[index] for index in sorted(notes)], topic_prefix,
                              webhook_url)  # fmt: skip
    return results


async def _dispatch_new(
    conn: asyncpg.Connection, opened: dict[int, asyncpg.Record], now: datetime
) -> dict[int, asyncpg.Record]:
    """Assign new cases (index → case, in order), each to whom `find_assignee` would give
    it after the ones before: index → the assigned case (missing: nobody on duty)."""
    candidates = await Candidates.fetch(conn, {case["cell_id"] for case in opened.values()})
    plan: dict[int, Assignment] = {}
    for index, case in opened.items():
        found = candidates.best(case["cell_id"], case["level"])
        if found is not None:
            candidates.given(found[0], now)
            plan[index] = _assignment(case, found, now)
    assigned = await assign(conn, list(plan.values()), now)
    return {index: assigned[a.case_id] for index, a in plan.items()}


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
    key = f"report:{report_id}"
    proposal = Proposal(key, "report", category, f"{category}: {description[:80]}",
                        description, cell_id, None, lat, lon, priority, policy)  # fmt: skip
    case = (await open_or_join(conn, [proposal], now))[key]
    if not case["inserted"]:
        return case  # the same report again: it already has its case
    await add_event(conn, case["id"], now, reporter, "reported", None, "reported",
                    {"category": category})  # fmt: skip
    return await dispatch(conn, case, now=now, topic_prefix=topic_prefix, reason="dispatched",
                          webhook_url=webhook_url)  # fmt: skip


# -- assignment ----------------------------------------------------------------------------
ALL_ROLES = sorted({role for roles in LEVEL_ROLES.values() for role in roles})
_NEVER = datetime.min.replace(tzinfo=UTC)  # never given a case: first (NULLS FIRST)


class Candidates:
    """Who could take a case in some cells (`case_candidates`), and the cases given to
    them since in this transaction, so that choosing case after case from one read gives
    what asking the database before each case would."""

    def __init__(self, rows: Sequence[asyncpg.Record]) -> None:
        # cell → (worker, role, depth, rank by id); rows come ordered by worker id.
        self.by_cell: dict[str, list[tuple[str, str, int, int]]] = {}
        self.open_cases: dict[str, int] = {}
        self.last_given: dict[str, datetime | None] = {}
        for rank, row in enumerate(rows):
            entry = (row["id"], row["role"], row["depth"], rank)
            self.by_cell.setdefault(row["cell_id"], []).append(entry)
            self.open_cases[row["id"]] = row["open_cases"]
            self.last_given[row["id"]] = row["last_assigned_at"]

    @classmethod
    async def fetch(cls, conn: asyncpg.Connection, cells: Iterable[str]) -> Candidates:
        return cls(await conn.fetch(query("case_candidates"), sorted(cells), ALL_ROLES))

    def best(
        self, cell_id: str, from_level: str, exclude: Sequence[str] = ()
    ) -> tuple[str, str] | None:
        """(worker id, level): the on-duty person at `from_level` or the next level up,
        by role order (grid workers before part-timers, even one covering the micro-grid
        itself), then the nearest cell, fewest open cases, longest since given one
        (round robin), id."""
        entries = self.by_cell.get(cell_id, [])
        for level in LEVELS[LEVELS.index(from_level) :]:
            roles = LEVEL_ROLES[level]
            eligible = [e for e in entries if e[1] in roles and e[0] not in exclude]
            if eligible:
                best = min(eligible, key=lambda e: self._rank(e, roles))
                return best[0], level
        return None

    def _rank(self, entry: tuple[str, str, int, int], roles: list[str]) -> tuple[Any, ...]:
        worker, role, depth, by_id = entry
        never_given_first = self.last_given[worker] or _NEVER
        return roles.index(role), depth, self.open_cases[worker], never_given_first, by_id

    def given(self, worker_id: str, now: datetime) -> None:
        """Count a case given to the worker now."""
        self.open_cases[worker_id] += 1
        self.last_given[worker_id] = now


async def find_assignee(
    conn: asyncpg.Connection, cell_id: str, from_level: str, exclude: Sequence[str]
) -> tuple[str, str] | None:
    """(worker id, level): the responsible on-duty person at `from_level`, or at the next
    level up."""
    return (await Candidates.fetch(conn, [cell_id])).best(cell_id, from_level, exclude)


class Assignment(NamedTuple):
    case_id: int
    worker_id: str
    level: str
    due_at: datetime | None
    due_step: str | None


def _assignment(case: asyncpg.Record, found: tuple[str, str], now: datetime) -> Assignment:
    step, due = next_deadline(case, "dispatched", now)
    return Assignment(case["id"], found[0], found[1], due, step)


async def assign(
    conn: asyncpg.Connection, assignments: Sequence[Assignment], now: datetime
) -> dict[int, asyncpg.Record]:
    """Give the cases to their workers (dispatched, with the accept deadline): case id →
    the case as it is now."""
    if not assignments:
        return {}
    case_ids, workers, levels, dues, steps = (list(c) for c in zip(*assignments, strict=True))
    rows = await conn.fetch(query("case_assign"), case_ids, workers, levels, now, dues, steps)
    return {row["id"]: row for row in rows}


def _dispatched_event(
    before: asyncpg.Record, after: asyncpg.Record, now: datetime, actor: Actor, reason: str
) -> CaseEvent:
    return CaseEvent(before["id"], now, actor, reason, before["state"], "dispatched",
                     {"assignee": after["assignee"], "level": after["level"]})  # fmt: skip


def _nobody_event(case: asyncpg.Record, now: datetime, actor: Actor) -> CaseEvent:
    return CaseEvent(case["id"], now, actor, "unassigned", case["state"], case["state"],
                     {"reason": "nobody on duty at any level",
                      "assignee": case["assignee"]})  # fmt: skip


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
    found: tuple[str, str] | None
    if worker_id is not None:
        worker = await conn.fetchrow(query("case_worker"), worker_id)
        if worker is None:
            raise CaseError(404, f"no worker {worker_id!r}")
        found = (worker["id"], _level_of(worker["role"]))
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
        await add_events(conn, [_nobody_event(case, now, actor)])
        return case
    updated = (await assign(conn, [_assignment(case, found, now)], now))[case["id"]]
    await add_events(conn, [_dispatched_event(case, updated, now, actor, reason)])
    await notify_worker(conn, updated, found[0], reason, topic_prefix, webhook_url)
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
async def add_events(conn: asyncpg.Connection, events: Sequence[CaseEvent]) -> None:
    """Append to the cases' timelines, in order, and tell the operators' live feed: the
    same statement runs `pg_notify('gw_case', <case id>)`, delivered on commit
    (`AlarmFeed` sends the case as an `event: case` on `GET /api/alarms/stream`)."""
    if not events:
        return
    await conn.execute(
        query("case_events_add"),
        [e.case_id for e in events], [e.at for e in events], [e.actor.name for e in events],
        [e.action for e in events], [e.from_state for e in events],
        [e.to_state for e in events], [orjson.dumps(e.detail or {}).decode() for e in events],
    )  # fmt: skip


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
    """One timeline entry (`add_events`)."""
    await add_events(conn, [CaseEvent(case_id, at, actor, action, from_state, to_state, detail)])


def worker_topic(topic_prefix: str, worker_id: str) -> str:
    return f"{topic_prefix}/workers/{worker_id}/cases"


def notification(case: asyncpg.Record, reason: str) -> dict[str, Any]:
    """CONTRACT §6: what a worker is sent about the case (`reason`: dispatched, escalated,
    reassigned, reopened)."""
    policy = _policy(case)
    created = case["created_at"]
    return {
        "reason": reason,
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


async def queue_notifications(
    conn: asyncpg.Connection,
    notes: Sequence[tuple[str, dict[str, Any]]],
    topic_prefix: str,
    webhook_url: str | None = None,
) -> None:
    """Each (worker id, payload): one QoS-1 message on the worker's topic, through the
    outbox; with a `webhook_url`, also a webhook row (the same payload plus `worker_id`)
    that the outbox publisher POSTs there."""
    if not notes:
        return
    bodies = []
    if webhook_url is not None:
        bodies = [orjson.dumps({"worker_id": w, **payload}).decode() for w, payload in notes]
    await conn.execute(
        query("outbox_add_notifications"),
        [worker_topic(topic_prefix, w) for w, _ in notes],
        [orjson.dumps(payload).decode() for _, payload in notes], webhook_url, bodies,
    )  # fmt: skip


async def notify_worker(
    conn: asyncpg.Connection,
    case: asyncpg.Record,
    worker_id: str,
    reason: str,
    topic_prefix: str,
    webhook_url: str | None = None,
) -> None:
    """One worker's notification about the case (`queue_notifications`)."""
    await queue_notifications(conn, [(worker_id, notification(case, reason))], topic_prefix,
                              webhook_url)  # fmt: skip


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
    worker_id, level = above
    await add_event(conn, case["id"], now, actor, "escalate", case["state"], "dispatched",
                    {"from_level": case["level"], "to_level": level,
                     "missed": missed, "reason": reason})  # fmt: skip
    return await dispatch(conn, fresh, now=now, topic_prefix=topic_prefix, reason="escalated",
                          worker_id=worker_id, actor=actor, webhook_url=webhook_url)  # fmt: skip


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
