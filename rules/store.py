"""Writes an engine Evaluation: rule state and alarm changes, in the caller's
transaction, each change announced (live feed, outbox) on commit.

An alarm raised (new, or again after clearing) is queued for its case in the same
transaction (`case_intake`, with `pg_notify('gw_case_intake', '')`): the case is opened or
joined afterwards by the intake task (`alerting.intake`), never inside the ingest batch,
so a storm of alarms costs ingest one insert per batch, not a dispatch per alarm."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from alerting.alarm_json import Change, announce_alarms
from gridwarden.db import query
from rules.engine import AlarmOp, Evaluation, due_at

# An extra hook called inside the transaction for an alarm raised (new, or again after
# clearing), after it is queued for its case. The service passes none: cases are opened by
# the intake task. Kept for `rules.runtime.RulesService(on_raised=...)`.
OnRaised = Callable[[asyncpg.Connection, asyncpg.Record, AlarmOp], Awaitable[object]]
# What `queue_cases` takes: (alarm id, op) of each raised alarm, in order.
Raised = list[tuple[int, AlarmOp]]


def _change(row: asyncpg.Record) -> Change:
    if row["inserted"] or row["previous_state"] == "cleared":
        return "raised"
    if row["previous_severity"] is not None and row["previous_severity"] != row["severity"]:
        return "severity"
    return "repeated"


async def apply_op(
    conn: asyncpg.Connection,
    op: AlarmOp,
    topic_prefix: str,
    on_raised: OnRaised | None = None,
    *,
    raised: Raised | None = None,
) -> int | None:
    """One alarm operation (see `apply_ops`); returns the alarm id changed, if any."""
    return (await apply_ops(conn, [op], topic_prefix, on_raised, raised=raised))[0]


async def apply_ops(
    conn: asyncpg.Connection,
    ops: Sequence[AlarmOp],
    topic_prefix: str,
    on_raised: OnRaised | None = None,
    *,
    raised: Raised | None = None,
) -> list[int | None]:
    """Alarm operations in their order; returns the alarm id each changed (None: a clear
    with nothing open). An alarm raised is queued for its case: appended to `raised` (the
    caller then runs `queue_cases` once for all of them), or queued right away without it.

    A few statements for the whole batch, not a round trip per op (a batch of readings
    brings dozens of ops, and the rules lock is held meanwhile): round r takes each
    (source, rule)'s r-th op, so one statement never touches an alarm twice and each
    alarm sees its ops in order; ops on different alarms are independent."""
    rounds: list[list[int]] = []
    seen: dict[tuple[str, str], int] = {}
    for n, op in enumerate(ops):
        r = seen.get((op.source, op.rule), 0)
        seen[(op.source, op.rule)] = r + 1
        if r == len(rounds):
            rounds.append([])
        rounds[r].append(n)
    rows: dict[int, asyncpg.Record] = {}
    for members in rounds:
        raises = [n for n in members if ops[n].action == "raise"]
        clears = [n for n in members if ops[n].action == "clear"]
        if raises:
            for row in await conn.fetch(query("raise_alarms"), *_raise_arrays(ops, raises)):
                rows[row["n"]] = row
        if clears:
            for row in await conn.fetch(query("clear_alarms"), *_clear_arrays(ops, clears)):
                rows[row["n"]] = row
    changes: list[tuple[asyncpg.Record, Change]] = []
    newly: list[tuple[asyncpg.Record, AlarmOp]] = []
    for n, op in enumerate(ops):
        row = rows.get(n)
        if row is None:
            continue
        if op.action == "clear":
            changes.append((row, "closed" if row["state"] == "closed" else "cleared"))
            continue
        change = _change(row)
        changes.append((row, change))
        if change == "raised":
            newly.append((row, op))
    await announce_alarms(conn, changes, topic_prefix)
    queued = [(int(row["id"]), op) for row, op in newly]
    if raised is None:
        await queue_cases(conn, queued)
    else:
        raised.extend(queued)
    if on_raised is not None:
        for row, op in newly:
            await on_raised(conn, row, op)
    return [int(rows[n]["id"]) if n in rows else None for n in range(len(ops))]


def _raise_arrays(ops: Sequence[AlarmOp], members: list[int]) -> list[list[Any]]:
    chosen = [ops[n] for n in members]
    return [
        [op.source for op in chosen], [op.device_id for op in chosen],
        [op.kind for op in chosen], [op.rule for op in chosen],
        [op.severity for op in chosen], [op.cell_id for op in chosen],
        [op.building for op in chosen], [op.at for op in chosen],
        [op.count for op in chosen], [orjson.dumps(op.details).decode() for op in chosen],
        members,
    ]  # fmt: skip


def _clear_arrays(ops: Sequence[AlarmOp], members: list[int]) -> list[list[Any]]:
    chosen = [ops[n] for n in members]
    return [
        [op.source for op in chosen], [op.rule for op in chosen], [op.at for op in chosen],
        [orjson.dumps(op.details).decode() for op in chosen], members,
    ]  # fmt: skip


async def apply_evaluation(
    conn: asyncpg.Connection,
    evaluation: Evaluation,
    topic_prefix: str,
    on_raised: OnRaised | None = None,
) -> list[int]:
    """Persist state and apply alarm ops; call inside a transaction."""
    unsaved = evaluation.unsaved
    save = [(key, state) for key, state in evaluation.states.items()
            if state is not None and key not in unsaved]  # fmt: skip
    drop = [key for key, state in evaluation.states.items() if state is None and key not in unsaved]
    if save:
        await conn.execute(
            query("save_rule_states"),
            [key[0] for key, _ in save],
            [key[1] for key, _ in save],
            [orjson.dumps(state).decode() for _, state in save],
            [_due(state) for _, state in save],
        )
    if drop:
        await conn.execute(
            query("delete_rule_states"), [key[0] for key in drop], [key[1] for key in drop]
        )
    raised: Raised = []
    changed = await apply_ops(conn, evaluation.ops, topic_prefix, on_raised, raised=raised)
    await queue_cases(conn, raised)
    return [alarm_id for alarm_id in changed if alarm_id is not None]


async def queue_cases(conn: asyncpg.Connection, raised: Raised) -> None:
    """Queue raised alarms for their case (one statement; the intake wakes on commit)."""
    if not raised:
        return
    await conn.execute(
        query("case_intake_add"),
        [alarm_id for alarm_id, _ in raised],
        [op.source for _, op in raised],
        [op.building for _, op in raised],
        [orjson.dumps(op.details).decode() for _, op in raised],
    )


def _due(state: dict[str, object]) -> datetime | None:
    due = due_at(state)
    return datetime.fromtimestamp(due, UTC) if due is not None else None
