"""Alarm endpoints (CONTRACT §5): the list, acknowledge / close, and the live SSE feed.

The feed is one `LISTEN gw_alarm` connection per process (`AlarmFeed`, a supervised task)
fanned out to every open stream, not a database connection per browser tab. Each event is
the alarm's whole current state, so a client that reconnects is brought up to date by
replaying the alarms changed since its `Last-Event-ID` (the alarm's `updated_at`) rather
than every intermediate change.

The same connection also LISTENs on `gw_case` (`alerting.cases.add_event`): each committed
case change is sent as `event: case`, `data:` the case (as `GET /api/cases` lists it,
without the timeline) plus `"change"`, the latest timeline action. Case events are live
only: they carry no `id:` (a client's `Last-Event-ID` stays the last alarm's, so alarm
replays work as before) and are not replayed; a console that reconnects re-reads
`GET /api/cases`. EventSource clients receive only the event types they listen to, so
`alarm` listeners see exactly what they saw before.

Wiring (service.py):

    feed = AlarmFeed(pool)
    app = create_app(state, routers=[..., alarms_api.router])
    attach_alarms(app, feed=feed, topic_prefix=settings.topic_prefix)
    supervisor.add("alarm-feed", feed.run)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import asyncpg
import orjson
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.responses import StreamingResponse
from prometheus_client import Counter, Gauge

from alerting.alarm_json import (
    ALARM_CHANNEL,
    ALARM_STATES,
    SEVERITIES,
    Change,
    alarm_json,
    announce_alarm,
    iso,
)
from alerting.cases import CASE_CHANNEL, case_json
from gridwarden import audit
from gridwarden.auth import Principal
from gridwarden.db import BIGINT_MAX, query
from gridwarden.web import AppState, get_state, require_role

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api/alarms", tags=["alarms"])
Operator = Annotated[Principal, Depends(require_role("operator", "admin"))]
Anyone = Annotated[Principal, Depends(require_role("operator", "admin", "worker"))]
State = Annotated[AppState, Depends(get_state)]
Limit = Annotated[int, Query(ge=1, le=1000)]

HEARTBEAT_S = 15.0  # a comment line this often keeps proxies from closing an idle stream
SUBSCRIBER_BACKLOG = 1000  # events queued for one slow client before it is cut off
REPLAY_MAX = 1000  # alarms resent to a reconnecting client at most
# Replays start this much before the client's last event: `updated_at` is the writing
# transaction's start, so a change can commit after a later-stamped one was sent.
REPLAY_MARGIN = timedelta(seconds=10)
RETRY_MIN_S = 0.2
RETRY_MAX_S = 5.0

STREAMS = Gauge("gridwarden_alarm_streams", "Open alarm SSE streams")
STREAMS_DROPPED = Counter(
    "gridwarden_alarm_streams_dropped_total", "Alarm streams cut off for falling behind"
)


# -- wiring


@dataclass(frozen=True)
class AlarmsWiring:
    feed: AlarmFeed
    topic_prefix: str


def attach_alarms(app: FastAPI, *, feed: AlarmFeed, topic_prefix: str) -> None:
    """Give the alarm endpoints their feed and the MQTT topic prefix of the outbox rows."""
    app.state.alarms = AlarmsWiring(feed, topic_prefix)


def get_wiring(request: Request) -> AlarmsWiring:
    wiring: AlarmsWiring | None = getattr(request.app.state, "alarms", None)
    if wiring is None:
        raise HTTPException(503, "the alarm endpoints are not wired (attach_alarms)")
    return wiring


Wiring = Annotated[AlarmsWiring, Depends(get_wiring)]


# -- list, acknowledge, close


def parse_enum_list(name: str, raw: str | None, allowed: Iterable[str]) -> list[str] | None:
    """`a,b` → ["a", "b"]; None or empty → None (no filter); unknown values → 422."""
    if raw is None or not raw.strip():
        return None
    options = tuple(allowed)
    values = [v.strip() for v in raw.split(",") if v.strip()]
    unknown = [v for v in values if v not in options]
    if unknown:
        raise HTTPException(
            422,
            f"{name}: unknown value {', '.join(repr(v) for v in unknown)}; "
            f"expected one or more (comma-separated) of {', '.join(options)}",
        )
    return values


@router.get("")
async def list_alarms(
    principal: Anyone,
    state: State,
    alarm_state: Annotated[str | None, Query(alias="state")] = None,
    severity: str | None = None,
    cell: Annotated[str | None, Query(description="this cell and the cells below it")] = None,
    device: str | None = None,
    limit: Limit = 100,
    cursor: Annotated[int | None, Query(ge=1, le=BIGINT_MAX)] = None,
) -> dict[str, Any]:
    states = parse_enum_list("state", alarm_state, ALARM_STATES)
    severities = parse_enum_list("severity", severity, SEVERITIES)
    if principal.role == "worker":
        # A worker sees only alarms linked to a case assigned to them (CONTRACT §5). Cases
        # do not exist yet, so no alarm is linked to any: the list is empty, not a 403.
        # When the cases table lands: join alarms.case_id to cases.assignee = worker_id.
        return {"items": [], "next_cursor": None}
    rows = await state.pool.fetch(
        query("list_alarms"), states, severities, cell, device, cursor, limit
    )
    next_cursor = str(rows[-1]["id"]) if len(rows) == limit else None
    return {"items": [alarm_json(r) for r in rows], "next_cursor": next_cursor}


def _actor(principal: Principal) -> str:
    """Who did it, as recorded in `acked_by`: `operator:12` (role and token id)."""
    return f"{principal.role}:{principal.token_id}"


async def _transition(
    state: AppState,
    wiring: AlarmsWiring,
    alarm_id: int,
    principal: Principal,
    action: str,
    address: str | None,
) -> dict[str, Any]:
    async with state.pool.acquire() as conn, conn.transaction():
        current = await conn.fetchrow(query("alarm_for_update"), alarm_id)
        if current is None:
            raise HTTPException(404, f"no alarm {alarm_id}")
        was = current["state"]
        change: Change
        if action == "ack" and was == "active":
            name, change = "acknowledge_alarm", "acknowledged"
        elif (action == "ack" and was == "cleared") or (action == "close" and was != "closed"):
            # Acknowledging a cleared alarm closes it: nothing is left to do (ThingsBoard).
            name, change = "close_alarm", "closed"
        else:
            raise HTTPException(409, f"alarm {alarm_id} is already {was}")
        row = await conn.fetchrow(query(name), alarm_id, _actor(principal))
        await announce_alarm(conn, row, change, wiring.topic_prefix)
        await audit.record(
            conn, actor=audit.actor_of(principal), action=f"alarm.{action}",
            target_type="alarm", target_id=str(alarm_id), address=address,
            detail={"from_state": was, "to_state": row["state"]},
        )  # fmt: skip
    return alarm_json(row)


# -- the live feed


@dataclass(frozen=True)
class StreamFilter:
    severities: frozenset[str] | None = None
    cells: frozenset[str] | None = None  # a cell and the cells below it

    def wants(self, alarm: dict[str, Any]) -> bool:
        if self.severities is not None and alarm["severity"] not in self.severities:
            return False
        return self.cells is None or alarm["cell_id"] in self.cells

    def wants_case(self, case: dict[str, Any]) -> bool:
        """Cases follow the cell filter only (`severity` is about alarms)."""
        return self.cells is None or case["cell_id"] in self.cells


class _Subscriber:
    """One open stream: a bounded backlog of encoded events."""

    def __init__(self, wanted: StreamFilter, backlog: int) -> None:
        self.filter = wanted
        self._backlog = backlog
        self._events: deque[bytes] = deque()
        self._ready = asyncio.Event()
        self.closed = False

    def push(self, alarm: dict[str, Any], event: bytes) -> None:
        if self.filter.wants(alarm):
            self._queue(event)

    def push_case(self, case: dict[str, Any], event: bytes) -> None:
        if self.filter.wants_case(case):
            self._queue(event)

    def _queue(self, event: bytes) -> None:
        if self.closed:
            return
        if len(self._events) >= self._backlog:
            log.warning("alarm stream fell %d events behind; closing it", self._backlog)
            STREAMS_DROPPED.inc()
            self.close()
            return
        self._events.append(event)
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._events.clear()
        self._ready.set()

    async def take(self, wait_s: float) -> list[bytes] | None:
        """The events queued so far ([] after `wait_s` without any); None once closed."""
        if not self._events and not self.closed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._ready.wait()
        self._ready.clear()
        if self.closed:
            return None
        events = list(self._events)
        self._events.clear()
        return events


def sse_event(row: Any) -> tuple[dict[str, Any], bytes]:
    """An alarm row (with `updated_at`) → its JSON and its `event: alarm` block."""
    alarm = alarm_json(row)
    event_id = iso(row["updated_at"]) or ""
    return alarm, (f"id: {event_id}\nevent: alarm\ndata: ".encode() + orjson.dumps(alarm) + b"\n\n")


def case_event(case: dict[str, Any]) -> bytes:
    """A case's JSON (with `change`) → its `event: case` block (no `id:`: not replayed)."""
    return b"event: case\ndata: " + orjson.dumps(case) + b"\n\n"


class FeedClosed(Exception):
    pass


class AlarmFeed:
    """`LISTEN gw_alarm` and `gw_case` on one pooled connection; each notified alarm or
    case is read once and sent to every open stream whose filter it matches.

    Reconnects (with backoff) when the database connection is lost, and then resends
    the alarms changed while it was away. On stop every stream ends, so the HTTP server
    can drain."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        heartbeat_s: float = HEARTBEAT_S,
        backlog: int = SUBSCRIBER_BACKLOG,
    ) -> None:
        self.pool = pool
        self.heartbeat_s = heartbeat_s
        self._backlog = backlog
        self._subscribers: set[_Subscriber] = set()
        self._pending: list[int] = []
        self._pending_cases: list[int] = []
        self._wake = asyncio.Event()
        self._closed = False
        self._caught_up = False
        self.listening = asyncio.Event()  # set while LISTEN is in place

    def subscribe(self, wanted: StreamFilter) -> _Subscriber:
        if self._closed:
            raise FeedClosed
        subscriber = _Subscriber(wanted, self._backlog)
        self._subscribers.add(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: _Subscriber) -> None:
        self._subscribers.discard(subscriber)

    async def run(self, stop: asyncio.Event) -> None:
        async def wake_on_stop() -> None:
            await stop.wait()
            self._wake.set()

        watcher = asyncio.create_task(wake_on_stop(), name="alarm-feed-stop")
        missed_since: datetime | None = None  # when the last connection was lost
        delay = RETRY_MIN_S
        try:
            while not stop.is_set():
                self._caught_up = False
                try:
                    await self._listen(stop, missed_since)
                    problem = "the connection closed"
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    problem = repr(exc)
                if self._caught_up:  # it was listening: start the backoff afresh
                    missed_since, delay = None, RETRY_MIN_S
                if stop.is_set():
                    break
                log.warning("alarm feed lost the database (%s); retrying in %.1fs", problem, delay)
                if missed_since is None:
                    missed_since = datetime.now(UTC) - REPLAY_MARGIN
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await stop.wait()
                delay = min(delay * 2, RETRY_MAX_S)
        finally:
            watcher.cancel()
            self._closed = True
            for subscriber in list(self._subscribers):
                subscriber.close()
            self._subscribers.clear()

    async def _listen(self, stop: asyncio.Event, missed_since: datetime | None) -> None:
        lost = asyncio.Event()

        def on_lost(_: Any) -> None:
            lost.set()
            self._wake.set()

        async with self.pool.acquire() as conn:
            conn.add_termination_listener(on_lost)
            try:
                await conn.add_listener(ALARM_CHANNEL, self._on_notify)
                await conn.add_listener(CASE_CHANNEL, self._on_notify)
                self.listening.set()
                if missed_since is not None:  # what changed while nobody was listening
                    rows = await conn.fetch(query("alarms_changed_since"), missed_since, REPLAY_MAX)
                    self._fan_out(rows)
                self._caught_up = True
                while not stop.is_set() and not lost.is_set():
                    await self._wake.wait()
                    self._wake.clear()
                    ids, self._pending = self._pending, []
                    case_ids, self._pending_cases = self._pending_cases, []
                    if ids and self._subscribers:
                        rows = await conn.fetch(query("alarms_by_ids"), list(dict.fromkeys(ids)))
                        by_id = {r["id"]: r for r in rows}
                        self._fan_out(by_id[i] for i in dict.fromkeys(ids) if i in by_id)
                    if case_ids and self._subscribers:
                        await self._fan_out_cases(conn, list(dict.fromkeys(case_ids)))
            finally:
                self.listening.clear()
                conn.remove_termination_listener(on_lost)
                for channel in (ALARM_CHANNEL, CASE_CHANNEL):
                    if not conn.is_closed():
                        with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError):
                            await conn.remove_listener(channel, self._on_notify)

    def _on_notify(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        try:
            item = int(payload)
        except ValueError:
            log.warning("ignoring %s notification with payload %r", channel, payload)
            return
        (self._pending_cases if channel == CASE_CHANNEL else self._pending).append(item)
        self._wake.set()

    def _fan_out(self, rows: Iterable[Any]) -> None:
        for row in rows:
            alarm, event = sse_event(row)
            for subscriber in list(self._subscribers):
                subscriber.push(alarm, event)

    async def _fan_out_cases(self, conn: asyncpg.Connection, ids: list[int]) -> None:
        rows = await conn.fetch(query("cases_feed_by_ids"), ids)
        by_id = {r["id"]: r for r in rows}
        for case_id in ids:
            row = by_id.get(case_id)
            if row is None:
                continue
            case = {**await case_json(conn, row, timeline=False), "change": row["change"]}
            event = case_event(case)
            for subscriber in list(self._subscribers):
                subscriber.push_case(case, event)


def _parse_event_id(value: str | None) -> datetime | None:
    """A Last-Event-ID we sent (an RFC 3339 time); anything else is ignored."""
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


@router.get("/stream")
async def stream(
    _: Operator,
    state: State,
    wiring: Wiring,
    cell: Annotated[str | None, Query(description="this cell and the cells below it")] = None,
    severity: str | None = None,
    since: Annotated[
        datetime | None, Query(description="first resend the alarms changed since then")
    ] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> StreamingResponse:
    """Server-Sent Events: `event: alarm`, `data:` the alarm's JSON, once per change; and
    `event: case`, `data:` the case's JSON (no timeline) plus `change`, once per committed
    case change (live only). `cell` filters both; `severity` filters alarms."""
    severities = parse_enum_list("severity", severity, SEVERITIES)
    if since is not None and since.tzinfo is None:
        raise HTTPException(422, "since needs a UTC offset (RFC 3339)")
    replay_from = since
    resumed = _parse_event_id(last_event_id)
    if resumed is not None:
        replay_from = resumed - REPLAY_MARGIN
    cells = None
    if cell is not None:
        below = await state.pool.fetch(query("cell_scope"), cell)
        cells = frozenset([cell, *(r["id"] for r in below)])
    wanted = StreamFilter(frozenset(severities) if severities else None, cells)
    feed = wiring.feed
    try:
        subscriber = feed.subscribe(wanted)  # before the replay: nothing falls in between
    except FeedClosed:
        raise HTTPException(503, "the service is stopping") from None

    async def events() -> AsyncIterator[bytes]:
        STREAMS.inc()
        try:
            yield b": connected\n\n"
            if replay_from is not None:
                replay = query("alarms_changed_since")
                for row in await state.pool.fetch(replay, replay_from, REPLAY_MAX):
                    alarm, event = sse_event(row)
                    if wanted.wants(alarm):
                        yield event
            while True:
                batch = await subscriber.take(feed.heartbeat_s)
                if batch is None:
                    return
                if not batch:
                    yield b": keepalive\n\n"
                for event in batch:
                    yield event
        finally:
            feed.unsubscribe(subscriber)
            STREAMS.dec()

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get("/{alarm_id}")
async def get_alarm(alarm_id: int, _: Operator, state: State) -> dict[str, Any]:
    rows = await state.pool.fetch(query("alarms_by_ids"), [alarm_id])
    if not rows:
        raise HTTPException(404, f"no alarm {alarm_id}")
    return alarm_json(rows[0])


@router.post("/{alarm_id}/ack")
async def acknowledge(
    alarm_id: int, principal: Operator, state: State, wiring: Wiring, request: Request
) -> dict[str, Any]:
    """active → acknowledged; cleared → closed; 409 when already acknowledged or closed."""
    address = audit.client_address(request)
    return await _transition(state, wiring, alarm_id, principal, "ack", address)


@router.post("/{alarm_id}/close")
async def close(
    alarm_id: int, principal: Operator, state: State, wiring: Wiring, request: Request
) -> dict[str, Any]:
    """Any state but closed → closed (an operator dismisses it); 409 when already closed."""
    address = audit.client_address(request)
    return await _transition(state, wiring, alarm_id, principal, "close", address)
