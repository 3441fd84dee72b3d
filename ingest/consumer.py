"""The ingest loop: take a batch from the broker, decode, commit, then acknowledge.

Two lanes, each its own persistent MQTT session, so a fire alarm never waits behind
a backlog of bin readings: the *event* lane (`{prefix}/dev/+/event`: alarms, door
forced, tamper…) with small batches, and the *bulk* lane (telemetry, status, codec
topics). The bulk session also subscribes to `dev/+/+` so a message on an unknown
channel still reaches a dead letter; it acknowledges event messages without storing
them (the event session has its own copy). Each device's messages stay in order
within a lane; both lanes evaluate rules and commit under the one rules lock (taken
after the batch's COPYs, ingest/writer.py).

Within the bulk lane, decoding the next batch overlaps the writes of the previous ones,
and two batches write at once on their own connections (one's claim and COPYs overlap the
other's rules and commit): Python works while PostgreSQL does. Their rules and commits
keep the lane's order (`ingest.writer.Turn`), and they are acknowledged in order.
The event lane writes one batch at a time, taken only once the one before committed, so
each batch holds every event that arrived meanwhile and waits once for the rules lock,
where it goes before any waiting bulk batch (`rules.lock.RulesLock`). (Read ahead like
the bulk lane, a chain of small event batches each waited for the lock behind a bulk
batch: 0.7 s median under a saturating load.)

Failure handling:
- a batch's write fails while others are in flight behind it: those are rolled back
  (they wait for its turn, so none committed) and all are written again one at a time,
  in order, as below;
- the database is unreachable: the batch is kept and retried with backoff; nothing
  is acknowledged, so the broker holds the rest (bounded by Receive Maximum);
- the database refuses the batch's data (a constraint or encoding error that
  validation did not foresee): the batch is retried one message at a time and the
  culprit goes to dead letters with the database's reason, so one poison message
  never blocks the stream.
Both retry the batch as decoded, never decoding it again: a message is charged to its
device's rate limit (`rate_limited`, `Decoder`) once and keeps its first outcome.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
import orjson

from gridwarden.config import Settings
from gridwarden.db import DB_UNAVAILABLE, query
from gridwarden.keys import credential_hash_key
from ingest import metrics
from ingest.decode import DeadLetter, Decoded, Decoder, RawMessage, Reading, credential_key
from ingest.directory import DeviceDirectory
from ingest.mqtt_source import MqttSource
from ingest.priority import Priority
from ingest.shards import ShardMap
from ingest.topics import event_subscriptions, subscriptions
from ingest.writer import RulesHook, Turn, WriteResult, write_batch

log = logging.getLogger(__name__)

RETRY_MIN_S = 0.2
RETRY_MAX_S = 5.0
DEDUP_PRUNE_INTERVAL_S = 600.0
# What a Receive Maximum of a few batches buys: two batches writing, one decoded and
# waiting, one being decoded, one arriving; memory stays bounded when the database stalls.
RECEIVE_MAXIMUM_BATCHES = 5
# Batches of one lane writing at once: one's claim and COPYs overlap the other's rules and
# commit (PostgreSQL works while Python does).
PIPELINE_DEPTH = 2
# The first event goes at once; those arriving while it commits gather into the next batch.
EVENT_LANE_MAX_DELAY_S = 0.0
EVENT_LANE_RECEIVE_MAXIMUM = 1000
DECODE_SLICE = 100  # messages decoded between two turns of the event loop (~2-3 ms)
# How often a decoded bulk batch waiting for the committer looks for messages to add.
HAND_OVER_POLL_S = 0.002
UNKNOWN = "unknown_device"
LAST_SEEN_CHUNK = 500  # devices per last-seen statement (~1-4 ms of encoding)

# Valid JSON that cannot be written back: orjson reads 1,024 levels of nesting but writes
# only 254 (the `extra` column, a dead letter of an array element), and repr() of the
# deepest recurses past Python's limit. Such a message is a dead letter, not a crash.
_UNWRITABLE = (orjson.JSONEncodeError, RecursionError)
# A batch's write failed: the database refused its data (retried message by message, the
# culprit dead-lettered), or was unavailable (retried with backoff). Anything else is a bug.
_REFUSED = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, *_UNWRITABLE)
_UNAVAILABLE = DB_UNAVAILABLE

T = TypeVar("T")
AfterCommit = Callable[[list[Reading]], Awaitable[None]]


@dataclass
class Lane:
    name: str
    source: MqttSource
    max_delay_s: float
    skip_events: bool  # the bulk lane: event messages are the event lane's
    urgent: bool = False  # the event lane: one batch at a time, first to the rules lock
    # The bulk lane: batches decoded and handed over, not yet committed and acknowledged,
    # in order (whose devices' readings a reading written ahead must not overtake).
    unfinished: collections.deque[Decoded] = field(default_factory=collections.deque)


@dataclass
class _InFlight:
    batch: list[RawMessage]
    decoded: Decoded
    turn: Turn
    task: asyncio.Task[WriteResult]


# A device's last message and status until the next flush: (last seen, last seq, status,
# status at). A plain tuple of atoms, replaced on each update: the garbage collector stops
# tracking it after one look (it does not for objects, nor for tuple subclasses). As a
# mutable dataclass, the 25,000-45,000 of a flush period were a third of every young
# collection, one of 56-92 ms every few seconds at 100,000 devices.
LastSeen = tuple[datetime, int | None, str | None, datetime | None]


class IngestService:
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool,
        mqtt_url: str,
        *,
        rules: RulesHook | None = None,
        after_commit: AfterCommit | None = None,
        shard: int | None = None,
    ) -> None:
        """`shard`: run shard `shard` of `settings.ingest_shards` (ingest/shards.py); its
        sessions' client ids get `-s{shard}`, and other shards' messages are acked unseen."""
        self.settings = settings
        self.pool = pool
        self.shard = shard
        self.shards: ShardMap | None = None
        self.directory = DeviceDirectory()
        client_id = settings.mqtt_client_id
        if shard is not None:
            client_id = f"{client_id}-s{shard}"
            self.shards = ShardMap(settings.ingest_shards, self.directory.lookup,
                                   settings.topic_prefix)  # fmt: skip
            self.directory.on_change = self.shards.note_change
        self.decoder = Decoder(
            prefix=settings.topic_prefix,
            max_payload_bytes=settings.max_payload_bytes,
            # Unset: the database's, read when the ingest starts (`run`).
            credential_key=credential_key(settings.credential_hash_key or b""),
            lookup_device=self.directory.lookup,
            rate_per_s=settings.device_rate_per_s,
            rate_burst=settings.device_rate_burst,
        )
        self.source = MqttSource(
            mqtt_url,
            client_id=client_id,
            topics=subscriptions(settings.topic_prefix),
            receive_maximum=settings.batch_max_messages * RECEIVE_MAXIMUM_BATCHES,
        )
        self.event_source = MqttSource(
            mqtt_url,
            client_id=f"{client_id}-events",
            topics=event_subscriptions(settings.topic_prefix),
            receive_maximum=EVENT_LANE_RECEIVE_MAXIMUM,
        )
        self.lanes = [
            Lane(
                "events", self.event_source, EVENT_LANE_MAX_DELAY_S, skip_events=False, urgent=True
            ),
            Lane("bulk", self.source, settings.batch_max_delay_ms / 1000, skip_events=True),
        ]
        self._event_topic = (f"{settings.topic_prefix}/dev/", "/event")
        self.rules = rules
        self.after_commit = after_commit
        self._last_seen: dict[str, LastSeen] = {}
        self.committed_batches = 0
        self.priority = Priority()

    # -- tasks ---------------------------------------------------------------------
    def subscribed(self) -> bool:
        return all(lane.source.subscribed.is_set() for lane in self.lanes)

    async def wait_subscribed(self, timeout_s: float) -> bool:
        def wait() -> bool:
            return all(lane.source.subscribed.wait(timeout_s) for lane in self.lanes)

        return await asyncio.to_thread(wait)

    def is_connected(self) -> bool:
        return all(lane.source.is_connected() for lane in self.lanes)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set, then finish what was handed over and return."""
        await self.directory.refresh(self.pool)
        key = await credential_hash_key(self.pool, self.settings)
        self.decoder.credential_key = credential_key(key)
        for lane in self.lanes:
            lane.source.start()
        try:
            await asyncio.gather(*(self._run_lane(lane, stop) for lane in self.lanes))
        finally:
            for lane in self.lanes:
                lane.source.stop()
            await self.flush_last_seen()

    async def _run_lane(self, lane: Lane, stop: asyncio.Event) -> None:
        """take → decode here, commit → acknowledge in `committer`, one batch apart."""
        if lane.urgent:
            await self._run_urgent_lane(lane, stop)
            return
        ready: asyncio.Queue[tuple[list[RawMessage], Decoded] | None] = asyncio.Queue(1)
        committer = asyncio.create_task(self._commit_loop(lane, ready), name=f"commit-{lane.name}")
        try:
            while not stop.is_set():
                batch = await self._take(lane, stop)
                if batch is None:
                    break
                decoded = await self._decode_bulk(lane, batch)
                await self._hand_over_growing(lane, ready, batch, decoded, committer)
            while lane.source.depth():  # what was handed over before the stop
                batch = await lane.source.take(self.settings.batch_max_messages, 0)
                decoded = await self._decode_bulk(lane, batch)
                await self._hand_over_growing(lane, ready, batch, decoded, committer)
            await self._hand_over(ready, None, committer)
            await committer
        finally:
            committer.cancel()

    async def _run_urgent_lane(self, lane: Lane, stop: asyncio.Event) -> None:
        """take → decode → commit → acknowledge, one batch at a time (no read-ahead)."""
        while True:
            batch = await self._take(lane, stop)
            if batch is None:  # stopping: what was handed over before the stop
                if not lane.source.depth():
                    return
                batch = await lane.source.take(self.settings.batch_max_messages, 0)
            with self.priority.urgent():
                decoded = await self._decode(lane, batch)
                result = await self._commit(decoded, urgent=True)
            await self._finish(lane, batch, decoded, result)

    async def _decode_bulk(self, lane: Lane, batch: list[RawMessage]) -> Decoded:
        """Decode a bulk batch and write its urgent readings ahead of it (`_write_ahead`)."""
        decoded = await self._decode(lane, batch)
        await self._write_ahead(lane, decoded)
        lane.unfinished.append(decoded)
        return decoded

    async def _write_ahead(self, lane: Lane, decoded: Decoded) -> None:
        """A telemetry reading that raises a critical alarm not raised yet (a detector's
        `alarm: true`, as vendors' devices send it, not on the event channel) is not left
        to wait behind the batches ahead of it: its device's readings of this batch are
        committed at once, with the event lane's priority, and taken out of the batch. Not
        if a batch still in flight holds a reading of that device: each device's readings
        reach the rules in order. The raw messages are acknowledged with their batch, after
        it commits; redelivered before that, the readings are duplicates by (device, seq)."""
        if self.rules is None or not decoded.readings:
            return
        devices = self.rules.urgent_devices(decoded.readings)
        for earlier in lane.unfinished:
            if not devices:
                return
            devices.difference_update(reading.device_id for reading in earlier.readings)
        if not devices:
            return
        ahead = Decoded(readings=[r for r in decoded.readings if r.device_id in devices])
        decoded.readings = [r for r in decoded.readings if r.device_id not in devices]
        metrics.WRITTEN_AHEAD.inc(len(ahead.readings))
        with self.priority.urgent():
            result = await self._commit(ahead, urgent=True)
        await self._committed(result, ahead)

    async def _take(self, lane: Lane, stop: asyncio.Event) -> list[RawMessage] | None:
        take = asyncio.ensure_future(
            lane.source.take(self.settings.batch_max_messages, lane.max_delay_s)
        )
        stopping = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({take, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if take not in done:
            take.cancel()
            return None
        return take.result()

    async def _hand_over_growing(
        self,
        lane: Lane,
        ready: asyncio.Queue[tuple[list[RawMessage], Decoded] | None],
        batch: list[RawMessage],
        decoded: Decoded,
        committer: asyncio.Task[None],
    ) -> None:
        """Hand a decoded bulk batch to the committer. While the committer has no room,
        what arrives meanwhile joins the batch (up to a full one) and is decoded at once,
        so an urgent reading in it is written ahead now (`_write_ahead`), not after
        waiting for the hand-over; the batch stays as large as it would have been."""
        while ready.full() and len(batch) < self.settings.batch_max_messages:
            if committer.done():
                break  # failed: `_hand_over` raises its error
            if not lane.source.depth():
                await asyncio.sleep(HAND_OVER_POLL_S)
                continue
            more = await lane.source.take(self.settings.batch_max_messages - len(batch), 0)
            later = await self._decode(lane, more)
            await self._write_ahead(lane, later)  # `decoded`'s devices keep their order
            batch += more
            decoded.extend(later)
        await self._hand_over(ready, (batch, decoded), committer)

    @staticmethod
    async def _hand_over(
        ready: asyncio.Queue[tuple[list[RawMessage], Decoded] | None],
        item: tuple[list[RawMessage], Decoded] | None,
        committer: asyncio.Task[None],
    ) -> None:
        put = asyncio.ensure_future(ready.put(item))
        await asyncio.wait({put, committer}, return_when=asyncio.FIRST_COMPLETED)
        if not put.done():
            put.cancel()
            committer.result()  # the committer failed: raise its error here

    async def _commit_loop(
        self, lane: Lane, ready: asyncio.Queue[tuple[list[RawMessage], Decoded] | None]
    ) -> None:
        """Write up to PIPELINE_DEPTH batches at once, each on its own connection, and
        acknowledge them in order. Their rules and commits keep the lane's order (`Turn`);
        when one fails, those after it are rolled back and all are written again one at a
        time, in order, with the retries of `_commit`."""
        window: collections.deque[_InFlight] = collections.deque()
        getter: asyncio.Future[tuple[list[RawMessage], Decoded] | None] | None = None
        closed = False
        try:
            while window or not closed:
                if getter is None and not closed and len(window) < PIPELINE_DEPTH:
                    getter = asyncio.ensure_future(ready.get())
                waiting: set[asyncio.Future[Any]] = {window[0].task} if window else set()
                if getter is not None:
                    waiting.add(getter)
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if getter is not None and getter.done():
                    item, getter = getter.result(), None
                    if item is None:
                        closed = True
                    else:
                        previous = window[-1].turn.committed if window else None
                        window.append(self._start_write(*item, previous))
                while window and window[0].task.done():
                    head = window.popleft()
                    if head.task.exception() is None:
                        await self.priority.bulk_turn()  # acking 2,000 takes a while too
                        await self._finish(lane, head.batch, head.decoded, head.task.result())
                        continue
                    await self._rewrite_in_order(lane, head, list(window))
                    window.clear()
        finally:
            if getter is not None:
                getter.cancel()
            for in_flight in window:
                in_flight.task.cancel()

    def _start_write(
        self, batch: list[RawMessage], decoded: Decoded, previous: asyncio.Event | None
    ) -> _InFlight:
        turn = Turn(previous, asyncio.Event())
        return _InFlight(batch, decoded, turn, asyncio.create_task(self._write_once(decoded, turn)))

    async def _write_once(self, decoded: Decoded, turn: Turn) -> WriteResult:
        started = time.perf_counter()
        async with self.pool.acquire() as conn:
            result = await write_batch(
                conn, decoded, self.settings.dedup_window_s, self.rules, turn,
                priority=self.priority,
            )  # fmt: skip
        self._observe(started, decoded)
        return result

    async def _rewrite_in_order(
        self, lane: Lane, failed: _InFlight, after: list[_InFlight]
    ) -> None:
        for in_flight in after:  # waiting for `failed`'s turn, or about to: roll them back
            in_flight.task.cancel()
        await asyncio.gather(*(f.task for f in after), return_exceptions=True)
        error = failed.task.exception()
        assert error is not None
        if isinstance(error, _REFUSED):
            pass  # written again one message at a time by `_commit`, the culprit dead-lettered
        elif isinstance(error, _UNAVAILABLE):
            metrics.DB_ERRORS.inc()
            log.warning("batch write failed (%r); writing it and %d more again", error, len(after))
        else:
            raise error  # a bug of ours, not a fault of the data or the database
        for in_flight in (failed, *after):
            result = await self._commit(in_flight.decoded)
            await self._finish(lane, in_flight.batch, in_flight.decoded, result)

    async def maintain(self, stop: asyncio.Event) -> None:
        """Periodic work off the hot path: last-seen flush, registry refresh, dedup pruning."""
        last_prune = time.monotonic()
        while not stop.is_set():
            try:
                async with asyncio.timeout(self.settings.last_seen_flush_s):
                    await stop.wait()
            except TimeoutError:
                pass
            try:
                await self.flush_last_seen()
                await self.directory.refresh(self.pool)
                if time.monotonic() - last_prune > DEDUP_PRUNE_INTERVAL_S:
                    await self.pool.execute(
                        query("prune_dedup"), float(self.settings.dedup_window_s)
                    )
                    last_prune = time.monotonic()
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("ingest maintenance failed, will retry: %r", exc)

    # -- one batch -------------------------------------------------------------------
    async def _decode(self, lane: Lane, batch: list[RawMessage]) -> Decoded:
        metrics.RECEIVED.inc(len(batch))
        metrics.QUEUE_DEPTH.set(lane.source.depth())
        decoded = await self._decode_yielding(batch, lane)
        if decoded.unknown and self.directory.refresh_due():
            # A device imported moments ago: look again before dead-lettering it. Only
            # the messages of unknown devices are decoded again: the others have been
            # charged to their device's rate limit once, and keep their outcome.
            await self._with_retry(self.directory.refresh)
            again, decoded.unknown = decoded.unknown, []
            decoded.dead_letters = [d for d in decoded.dead_letters if d.reason != UNKNOWN]
            await self._decode_yielding(again, lane, into=decoded)
        return decoded

    async def _decode_yielding(
        self, batch: list[RawMessage], lane: Lane, into: Decoded | None = None
    ) -> Decoded:
        """Decode in slices, letting the event loop run in between: the event lane, the
        outbox and the HTTP API must not wait for a whole bulk batch."""
        decoded = Decoded() if into is None else into
        between = self.priority.between_slices(lane.urgent)
        for start in range(0, len(batch), DECODE_SLICE):
            if start:
                await between()
            self.decode(batch[start : start + DECODE_SLICE], skip_events=lane.skip_events,
                        into=decoded)  # fmt: skip
        return decoded

    async def _finish(
        self, lane: Lane, batch: list[RawMessage], decoded: Decoded, result: WriteResult
    ) -> None:
        """After the commit: acknowledge, note last-seen, tell who waits for new readings."""
        lane.source.ack(batch)
        if lane.unfinished and lane.unfinished[0] is decoded:
            lane.unfinished.popleft()
        self.committed_batches += 1
        await self._committed(result, decoded)

    async def _committed(self, result: WriteResult, decoded: Decoded) -> None:
        self._record(result, decoded)
        if self.after_commit is not None and result.stored:
            await self.after_commit(result.stored)

    def decode(
        self, batch: list[RawMessage], *, skip_events: bool = False, into: Decoded | None = None
    ) -> Decoded:
        decoded = Decoded() if into is None else into
        head, tail = self._event_topic
        shards, shard, others = self.shards, self.shard or 0, 0
        for message in batch:
            if skip_events and message.topic.endswith(tail) and message.topic.startswith(head):
                continue  # the event lane's
            if shards is not None and not shards.owns_topic(shard, message.topic):
                others += 1  # another shard's: acknowledged with the batch, stored by its owner
                continue
            readings, letters = len(decoded.readings), len(decoded.dead_letters)
            try:
                self.decoder.decode(message, decoded)
            except _UNWRITABLE as exc:  # not even its dead letter could be written
                del decoded.readings[readings:], decoded.dead_letters[letters:]
                decoded.dead_letters.append(DeadLetter(
                    message.topic, None, "storage_rejected", f"cannot be stored: {exc}",
                    message.payload, message.received_at,
                ))  # fmt: skip
        if others:
            metrics.OTHER_SHARD.inc(others)
        return decoded

    async def _commit(self, decoded: Decoded, *, urgent: bool = False) -> WriteResult:
        """Write one batch alone, retrying while the database is unavailable."""
        started = time.perf_counter()
        try:
            result = await self._write(decoded, urgent)
        except _DataRefused:
            result = await self._commit_one_by_one(decoded, urgent)
        self._observe(started, decoded)
        return result

    @staticmethod
    def _observe(started: float, decoded: Decoded) -> None:
        metrics.COMMIT_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(len(decoded.readings) + len(decoded.dead_letters))

    async def _commit_one_by_one(self, decoded: Decoded, urgent: bool) -> WriteResult:
        stored: list[Reading] = []
        telemetry = events = dead = duplicates = 0
        singles = [Decoded(readings=[r]) for r in decoded.readings]
        singles += [Decoded(dead_letters=[d]) for d in decoded.dead_letters]
        for single in singles:
            try:
                part = await self._write(single, urgent)
            except _DataRefused as refused:
                reading = single.readings[0]
                letter = DeadLetter(
                    topic=f"{self.settings.topic_prefix}/dev/{reading.device_id}/{reading.channel}",
                    device_id=reading.device_id,
                    reason="storage_rejected",
                    detail=str(refused),
                    payload=_describe(reading),
                    received_at=reading.received_at,
                )
                decoded.dead_letters.append(letter)
                part = await self._write(Decoded(dead_letters=[letter]), urgent)
            stored += part.stored
            telemetry += part.telemetry_rows
            events += part.event_rows
            dead += part.dead_letter_rows
            duplicates += part.duplicates
        return WriteResult(stored, telemetry, events, dead, duplicates)

    async def _write(self, decoded: Decoded, urgent: bool = False) -> WriteResult:
        async def work(conn: asyncpg.Connection) -> WriteResult:
            return await write_batch(
                conn, decoded, self.settings.dedup_window_s, self.rules,
                urgent=urgent, priority=self.priority,
            )  # fmt: skip

        return await self._with_retry(work)

    async def _with_retry(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        delay = RETRY_MIN_S
        while True:
            try:
                async with self.pool.acquire() as conn:
                    return await work(conn)
            except _REFUSED as exc:
                raise _DataRefused(str(exc)) from exc
            except _UNAVAILABLE as exc:
                metrics.DB_ERRORS.inc()
                log.warning("database unavailable (%r); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)

    def _record(self, result: WriteResult, decoded: Decoded) -> None:
        metrics.STORED.labels("telemetry").inc(result.telemetry_rows)
        metrics.STORED.labels("device_events").inc(result.event_rows)
        metrics.DUPLICATES.inc(result.duplicates)
        for letter in decoded.dead_letters:
            metrics.DEAD_LETTERS.labels(letter.reason).inc()
        last_seen = self._last_seen
        for reading in decoded.readings:
            seen = last_seen.get(reading.device_id)
            if seen is None:
                last_seen[reading.device_id] = (reading.received_at, reading.seq, None, None)
            elif reading.received_at >= seen[0]:
                seq = reading.seq if reading.seq is not None else seen[1]
                last_seen[reading.device_id] = (reading.received_at, seq, seen[2], seen[3])
        for status in decoded.statuses:
            at, seq, _, _ = last_seen.get(status.device_id, (status.received_at, None, None, None))
            last_seen[status.device_id] = (
                max(at, status.received_at), seq, status.status, status.received_at,
            )  # fmt: skip
        metrics.STORED.labels("device_status").inc(len(decoded.statuses))

    async def flush_last_seen(self) -> None:
        """Write last-seen in chunks, each its own statement: encoding one statement for
        the 100,000 devices heard in a flush period took one callback of 60-240 ms, and an
        alarm event arriving meanwhile waited for it. Each chunk is sorted, so two writers
        take their row locks in the same order."""
        if not self._last_seen:
            return
        pending, self._last_seen = self._last_seen, {}
        ids = list(pending)
        for start in range(0, len(ids), LAST_SEEN_CHUNK):
            await self.priority.bulk_turn()  # not while an alarm event's batch is in flight
            chunk = sorted(ids[start : start + LAST_SEEN_CHUNK])
            try:
                await self._write_last_seen(chunk, pending)
            except BaseException:
                # Keep what is not written yet for the next flush (newer entries win).
                for device_id in ids[start:]:
                    self._last_seen.setdefault(device_id, pending[device_id])
                raise

    async def _write_last_seen(self, chunk: list[str], pending: dict[str, LastSeen]) -> None:
        """One chunk. A device deleted (by hand) since it was heard fails the foreign key:
        then the chunk again without it (nothing to keep of a deleted device)."""
        try:
            await self._upsert_last_seen(chunk, pending)
        except asyncpg.ForeignKeyViolationError:
            rows = await self.pool.fetch(query("registered_of"), chunk)
            registered = {row["id"] for row in rows}
            dropped = [d for d in chunk if d not in registered]
            log.warning("last seen of %d deleted devices dropped: %s",
                        len(dropped), ", ".join(dropped[:5]))  # fmt: skip
            await self._upsert_last_seen([d for d in chunk if d in registered], pending)

    async def _upsert_last_seen(self, chunk: list[str], pending: dict[str, LastSeen]) -> None:
        if not chunk:
            return
        at, seq, status, status_at = zip(*(pending[d] for d in chunk), strict=True)
        await self.pool.execute(
            query("flush_last_seen"), chunk, list(at), list(seq), list(status), list(status_at)
        )


def _describe(reading: Reading) -> bytes:
    try:
        return repr(reading).encode()
    except RecursionError:
        return f"Reading({reading.device_id!r}, seq={reading.seq!r}): nested too deeply".encode()


class _DataRefused(Exception):
    """The database rejected the data itself (not a connection problem)."""
