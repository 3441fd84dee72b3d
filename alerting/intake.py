"""The case intake: raised alarms → cases, out of the ingest transaction.

The rules store queues every raised alarm (new, or raised again after clearing) in
`case_intake`, in the alarm's own transaction, and runs `pg_notify('gw_case_intake', '')`
(delivered on commit). This task wakes on that notification (LISTEN on a pooled
connection) and polls every second in case one was missed (e.g. while its listening
connection was down). It claims up to `batch` rows, the most severe alarms first and then
in queue order (in a storm of alarms a fire is dispatched before a full bin), with `FOR
UPDATE SKIP LOCKED` (several instances may run: each row is handled by one of them) and, in one
transaction per batch, opens or joins the alarms' cases (`open_cases_for_alarms`: the
timeline, the assignment and its SLA deadline, the worker's notification through the
outbox; a few statements for the whole batch, not a few per alarm), links the alarms to
their cases and deletes the rows.

Guarantees:

- **Once.** A row is deleted in the transaction that opened its case: a crash or a kill
  mid-batch rolls both back, and the rows are claimed again. One case per incident under
  any concurrency is the unique index on the open cases' incident key.
- **The alarm as it is now.** The alarm is read with its row (its severity may have risen
  since it was queued: the case gets that priority). An alarm closed before its turn (an
  operator closed it, or acknowledged it and it cleared) gets no case: somebody handled it.
- **Ingest never waits long on it.** The alarms are linked to their cases in one statement
  at the end of the batch (locking them in id order), so an ingest batch upserting one of
  them waits a few milliseconds at most, not for the whole batch.
- **Database trouble is retried.** Connection lost, server unreachable or shutting down,
  deadlock: the batch rolls back, and is tried again after 0.2 s, 0.4 s, ... up to 30 s.
  Nothing is lost: the rows stay queued.
- **A bad row is moved aside, not retried forever.** Any other error rolls the batch back;
  it is then handled again row by row (a savepoint each), and a row that fails on its own
  is kept with `failed_at` and `error` (logged, counted in
  `gridwarden_case_intake_handled_total{outcome="failed"}`), never claimed again, while
  the others go on. Once the cause is fixed, `UPDATE case_intake SET failed_at = NULL,
  error = NULL WHERE failed_at IS NOT NULL` queues them again.

The case's deadlines count from when the intake opens it (`clock.now()`), normally a few
milliseconds after the alarm's commit; `gridwarden_case_intake_lag_seconds` is the age of
the oldest row still queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter as Tally
from typing import Any

import asyncpg
from prometheus_client import Counter, Gauge

from alerting.cases import link_alarms, open_cases_for_alarms
from gridwarden.clock import Clock, SystemClock
from gridwarden.config import Settings
from gridwarden.db import DB_UNAVAILABLE, query
from gridwarden.supervisor import TaskFn

log = logging.getLogger(__name__)

INTAKE_CHANNEL = "gw_case_intake"  # payload: '' (just a wake-up)
DEFAULT_BATCH = 50  # one transaction (a few statements): the first case waits for the last
POLL_S = 1.0  # fallback when a notification is missed
RETRY_MIN_S = 0.2
RETRY_MAX_S = 30.0
ERROR_TEXT_MAX = 2000

OUTCOMES = ("opened", "joined", "no_cell", "closed", "failed")
LAG = Gauge(
    "gridwarden_case_intake_lag_seconds",
    "Age of the oldest raised alarm still queued for its case (0: none queued)",
)
OPENED = Counter(
    "gridwarden_case_intake_cases_opened_total", "Cases opened for raised alarms by the intake"
)
HANDLED = Counter(
    "gridwarden_case_intake_handled_total",
    "Raised alarms the case intake handled, by outcome (opened: a new case; joined: the "
    "incident's open case; no_cell: outside the grid, no case; closed: closed before its "
    "turn, no case; failed: moved aside)",
    ["outcome"],
)
RETRIES = Counter(
    "gridwarden_case_intake_retries_total",
    "Intake batches rolled back by database trouble and tried again later",
)
for _outcome in OUTCOMES:
    HANDLED.labels(_outcome)

# Any database error: the run loop logs it and tries again with backoff.
_DB_ERRORS = DB_UNAVAILABLE
# The connection or the server, not the row: never a reason to move a row aside.
_TRANSIENT = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,  # 08: connection exceptions
    asyncpg.exceptions.TransactionRollbackError,  # 40: deadlock, serialization failure
    asyncpg.exceptions.InsufficientResourcesError,  # 53: disk full, too many connections
    asyncpg.exceptions.OperatorInterventionError,  # 57: shutting down, cancelled
    asyncpg.exceptions.LockNotAvailableError,  # 55P03
)


class CaseIntake:
    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: Settings,
        clock: Clock | None = None,
        *,
        batch: int = DEFAULT_BATCH,
        poll_s: float = POLL_S,
        retry_max_s: float = RETRY_MAX_S,
    ) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        self.pool = pool
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self.batch = batch
        self.poll_s = poll_s
        self.retry_max_s = retry_max_s
        self._listener: Any = None  # a pooled connection LISTENing on gw_case_intake
        self._wake = asyncio.Event()

    # -- the task ------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Drain the queue whenever woken (or every `poll_s`) until `stop`; a batch in
        progress is finished first."""

        async def wake_on_stop() -> None:
            await stop.wait()
            self._wake.set()

        watcher = asyncio.create_task(wake_on_stop(), name="case-intake-stop")
        delay = RETRY_MIN_S
        try:
            while not stop.is_set():
                self._wake.clear()
                await self._ensure_listener()
                try:
                    await self.drain(stop)
                except _DB_ERRORS as exc:
                    RETRIES.inc()
                    log.warning("case intake: database unavailable or busy (%r); retrying in "
                                "%.1fs", exc, delay)  # fmt: skip
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await stop.wait()
                    delay = min(delay * 2, self.retry_max_s)
                    continue
                delay = RETRY_MIN_S
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_s):
                        await self._wake.wait()
        finally:
            watcher.cancel()
            await self._release_listener()

    async def drain(self, stop: asyncio.Event | None = None) -> int:
        """Handle batches until the queue is empty (or `stop`); returns the rows handled."""
        total = 0
        while True:
            try:
                claimed = await self._round(careful=False)
            except _TRANSIENT:
                raise
            except Exception as exc:
                log.warning("case intake: a batch failed (%r); handling it row by row", exc)
                claimed = await self._round(careful=True)
            total += claimed
            await self._measure_lag()
            if claimed < self.batch or (stop is not None and stop.is_set()):
                return total

    # -- one batch -----------------------------------------------------------------------
    async def _round(self, *, careful: bool) -> int:
        """Claim one batch and handle it in one transaction; returns the rows claimed.
        `careful`: each row in a savepoint, and a row that fails on its own moved aside."""
        outcomes: Tally[str] = Tally()
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(query("case_intake_claim"), self.batch)
            if not rows:
                return 0
            links: dict[int, int] = {}
            done: list[int] = []
            if not careful:
                handled = await self._open(conn, rows)
            else:
                handled = []
                for row in rows:
                    try:
                        async with conn.transaction():
                            handled += await self._open(conn, [row])
                    except _TRANSIENT:
                        raise
                    except Exception as exc:
                        log.exception(
                            "case intake: alarm %s (queued as %s) failed; moved aside",
                            row["id"], row["intake_id"],
                        )  # fmt: skip
                        error = f"{type(exc).__name__}: {exc}"[:ERROR_TEXT_MAX]
                        await conn.execute(query("case_intake_set_aside"), row["intake_id"], error)
                        outcomes["failed"] += 1
            for row, (outcome, case_id) in handled:
                outcomes[outcome] += 1
                if case_id is not None:
                    links[row["id"]] = case_id
                done.append(row["intake_id"])
            await link_alarms(conn, links)
            await conn.execute(query("case_intake_done"), done)
        for outcome, count in outcomes.items():
            HANDLED.labels(outcome).inc(count)
        OPENED.inc(outcomes["opened"])
        return len(rows)

    async def _open(
        self, conn: asyncpg.Connection, rows: list[asyncpg.Record]
    ) -> list[tuple[asyncpg.Record, tuple[str, int | None]]]:
        """Open or join the cases of queued alarms: each row with (outcome, the case id).
        An alarm closed before its turn gets none (somebody handled it)."""
        opened = iter(await open_cases_for_alarms(
            conn,
            [row for row in rows if row["state"] != "closed"],
            policy_of=self.settings.sla_policy,
            topic_prefix=self.settings.topic_prefix,
            now=self.clock.now(),
            webhook_url=self.settings.webhook_url,
        ))  # fmt: skip
        handled: list[tuple[asyncpg.Record, tuple[str, int | None]]] = []
        for row in rows:
            if row["state"] == "closed":
                handled.append((row, ("closed", None)))
                continue
            result = next(opened)  # the results of the live rows, in their order
            if result is None:
                handled.append((row, ("no_cell", None)))
            else:
                handled.append((row, ("opened" if result.inserted else "joined", result.case_id)))
        return handled

    # -- the database side ---------------------------------------------------------------
    def _listening(self) -> bool:
        conn = self._listener
        if conn is None:
            return False
        try:
            return not conn.is_closed()
        except asyncpg.InterfaceError:  # the pool took it back: its connection was lost
            return False

    async def _ensure_listener(self) -> None:
        if self._listening():
            return
        await self._release_listener()
        try:
            conn = await self.pool.acquire()
        except _DB_ERRORS as exc:
            log.debug("case intake: no listening connection (%r); polling", exc)
            return
        try:
            await conn.add_listener(INTAKE_CHANNEL, self._on_notify)
        except _DB_ERRORS as exc:
            log.debug("case intake: LISTEN failed (%r); polling", exc)
            with contextlib.suppress(*_DB_ERRORS):
                await self.pool.release(conn)
            return
        self._listener = conn

    async def _release_listener(self) -> None:
        conn, self._listener = self._listener, None
        if conn is None:
            return
        with contextlib.suppress(*_DB_ERRORS):
            if not conn.is_closed():
                await conn.remove_listener(INTAKE_CHANNEL, self._on_notify)
        with contextlib.suppress(*_DB_ERRORS):
            await self.pool.release(conn)

    def _on_notify(self, *_: Any) -> None:
        self._wake.set()

    async def _measure_lag(self) -> None:
        with contextlib.suppress(*_DB_ERRORS):
            LAG.set(await self.pool.fetchval(query("case_intake_lag")))


def case_intake_task(
    pool: asyncpg.Pool,
    settings: Settings,
    clock: Clock | None = None,
    *,
    batch: int = DEFAULT_BATCH,
) -> TaskFn:
    """The supervised case intake: `supervisor.add("case-intake", case_intake_task(...))`."""
    return CaseIntake(pool, settings, clock, batch=batch).run
