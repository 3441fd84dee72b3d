"""SLA timers: a case whose next deadline passed goes one level up the hierarchy
(grid worker → grid leader → community staff → street staff).

Deadlines live in the database (`cases.due_at`, `due_step`, computed from the policy
snapshot the case opened with), not in this process: there is nothing to rebuild on
start, and the first tick after a restart or an outage catches up every overdue case.
A timer that stalls while its process was down is the failure this design rules out.

Each tick takes the cases due at the tick's `now` in small batches, one transaction per
batch, with `FOR UPDATE SKIP LOCKED` (`cases_due`): several instances share the work
and never escalate the same case twice; a worker acting on a case at the same moment
waits for the batch's commit and then sees the case as escalated (or the other way
round: an accepted case is no longer due). Every case runs in its own savepoint, so one
that fails (a bug, a deadlock) is logged, given a retry time and does not hold up the rest.

What a missed deadline does (`alerting.cases.escalate` decides, this module only calls it):

- **someone is on duty above**: the missed step is marked missed and the case goes to
  the nearest level above with someone on duty, with the policy's escalation grace;
  they are notified on `gw/workers/{id}/cases` with reason `escalated`;
- **at the top** (street staff), **or nobody on duty above**: the case stays where it
  is and gets the escalation grace (`escalation_exhausted`); tried again after it;
- **a case still `reported`** (nobody was on duty when it opened, so it has no `due_at`
  of its own; or given back and nobody else could take it): at its accept deadline it
  is escalated like any other; if nobody is on duty above but someone at its own level
  came on duty (not one who turned it down), it is dispatched to them instead.

One level per missed deadline, also when catching up after a long outage: each level
gets its own grace to respond rather than the case jumping straight to the street.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import orjson
from prometheus_client import Counter, Gauge

from alerting.cases import LEVELS, OPEN_STATES, SYSTEM, dispatch, escalate, find_assignee
from gridwarden.clock import Clock, SystemClock
from gridwarden.config import Settings
from gridwarden.db import DB_UNAVAILABLE, query
from gridwarden.supervisor import TaskFn

log = logging.getLogger(__name__)

DEFAULT_BATCH = 20
TICK_TIMEOUT_S = 30.0  # a tick that hangs (database unreachable mid-query) is abandoned
FAILED_RETRY_S = 30.0  # a case whose escalation failed is tried again after this
REASON = "deadline missed"

ESCALATIONS = Counter(
    "gridwarden_sla_escalations_total",
    "Cases the SLA timer escalated after a missed deadline, by the level they went to",
    ["level"],
)
EXHAUSTED = Counter(
    "gridwarden_sla_exhausted_total",
    "Missed deadlines with nobody above to escalate to (top of the hierarchy, or nobody on "
    "duty): the case stays where it is and gets the escalation grace",
    ["why"],
)
FAILURES = Counter(
    "gridwarden_sla_failures_total", "Cases whose escalation failed (tried again later)"
)
OVERDUE = Gauge(
    "gridwarden_sla_overdue_cases",
    "Open cases that have missed an SLA deadline (a step marked missed, or past due now)",
)

# The connection or the server is gone: the batch is lost, the tick fails, `run` retries.
_CONNECTION_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
)
_DB_ERRORS = DB_UNAVAILABLE


def _policy(case: asyncpg.Record) -> dict[str, Any]:
    policy = case["policy"]
    return orjson.loads(policy) if isinstance(policy, str | bytes) else dict(policy)


class SlaTimers:
    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: Settings,
        clock: Clock | None = None,
        *,
        batch: int = DEFAULT_BATCH,
    ) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self.pool = pool
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self.batch = batch

    # -- one tick ------------------------------------------------------------------------
    async def tick_once(self) -> int:
        """Act on every case due at `clock.now()`; returns how many were acted on
        (escalated, re-dispatched, or kept at the top with more time)."""
        now = self.clock.now()
        acted = 0
        seen: set[int] = set()
        for name in ("cases_due", "sla_unassigned_due"):
            while True:
                async with self.pool.acquire() as conn, conn.transaction():
                    rows = await conn.fetch(query(name), now, self.batch)
                    fresh = [row for row in rows if row["id"] not in seen]
                    for case in fresh:
                        seen.add(case["id"])
                        acted += await self._one(conn, case, now)
                # Fewer than a batch: nothing more is due (or the rest is locked by another
                # instance). A case seen twice would mean it is still due after being
                # handled: never loop on it within one tick.
                if len(rows) < self.batch or len(fresh) < len(rows):
                    break
        OVERDUE.set(await self.pool.fetchval(query("sla_overdue_count"), now))
        return acted

    async def _one(self, conn: asyncpg.Connection, case: asyncpg.Record, now: datetime) -> int:
        try:
            async with conn.transaction():  # a savepoint: one bad case spoils nothing else
                return await self._handle(conn, case, now)
        except _CONNECTION_ERRORS:
            raise
        except Exception as exc:
            FAILURES.inc()
            transient = isinstance(exc, asyncpg.exceptions.TransactionRollbackError)
            retry_s = self.settings.sla_tick_s if transient else FAILED_RETRY_S
            log.exception(
                "sla: escalating case %s failed; trying again in %.0f s", case["id"], retry_s
            )
            await conn.execute(query("case_postpone"), case["id"], now + timedelta(seconds=retry_s))
            return 0

    async def _handle(self, conn: asyncpg.Connection, case: asyncpg.Record, now: datetime) -> int:
        case_id, state, level = case["id"], case["state"], case["level"]
        if state not in OPEN_STATES:
            await conn.execute(query("sla_clear_due"), case_id)
            return 0
        prefix, webhook = self.settings.topic_prefix, self.settings.webhook_url
        missed = case["due_step"] or "accept"  # a `reported` case waits to be accepted
        top = LEVELS.index(level) + 1 >= len(LEVELS)
        if state == "reported" and not top and await self._only_own_level(conn, case):
            # Nobody on duty above, but someone at its own level (not one who turned it
            # down) came on duty since: better theirs, late, than nobody's.
            rejected = list(case["rejected_by"])
            updated = await dispatch(
                conn, case, now=now, topic_prefix=prefix, reason="dispatched", exclude=rejected,
                webhook_url=webhook,
            )  # fmt: skip
            log.info("sla: unassigned case %s dispatched to %s", case_id, updated["assignee"])
        else:
            # Up one level; at the top or with nobody on duty above, `escalate` keeps the
            # case where it is with the escalation grace (`escalation_exhausted`).
            updated = await escalate(conn, case, SYSTEM, now, prefix, reason=REASON, missed=missed,
                                     webhook_url=webhook)  # fmt: skip
            if updated["escalations"] > case["escalations"]:
                ESCALATIONS.labels(updated["level"]).inc()
                log.info(
                    "sla: case %s missed its %s deadline: %s %s → %s %s", case_id, missed,
                    level, case["assignee"], updated["level"], updated["assignee"],
                )  # fmt: skip
            else:
                EXHAUSTED.labels("top" if top else "nobody_on_duty").inc()
                log.warning(
                    "sla: case %s missed its %s deadline and nobody above %s is on duty; "
                    "it stays with %s", case_id, missed, level, case["assignee"] or "nobody",
                )  # fmt: skip
        if updated["due_at"] is None or updated["due_at"] <= now:
            # Defensive: whatever happened, a handled case is not due again in this tick.
            grace = timedelta(seconds=float(_policy(case).get("escalate") or FAILED_RETRY_S))
            await conn.execute(query("case_postpone"), case_id, now + grace)
        return 1

    @staticmethod
    async def _only_own_level(conn: asyncpg.Connection, case: asyncpg.Record) -> bool:
        """Nobody on duty above the case's level, somebody at it."""
        level, cell = case["level"], case["cell_id"]
        above = LEVELS[LEVELS.index(level) + 1]
        if await find_assignee(conn, cell, above, []) is not None:
            return False
        return await find_assignee(conn, cell, level, list(case["rejected_by"])) is not None

    # -- the task ------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Tick every `settings.sla_tick_s` until `stop`; database trouble is logged and
        the next tick tries again (what was due is still due: nothing is lost)."""
        log.info("sla timers: every %g s", self.settings.sla_tick_s)
        while not stop.is_set():
            try:
                async with asyncio.timeout(max(TICK_TIMEOUT_S, self.settings.sla_tick_s)):
                    await self.tick_once()
            except _DB_ERRORS as exc:
                log.warning("sla timers: database unavailable (%r); retrying", exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.sla_tick_s):
                    await stop.wait()


def sla_task(pool: asyncpg.Pool, settings: Settings, clock: Clock | None = None) -> TaskFn:
    """The supervised SLA timer task: `supervisor.add("sla", sla_task(pool, settings))`."""
    return SlaTimers(pool, settings, clock).run
