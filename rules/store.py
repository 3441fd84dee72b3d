"""Writes an engine Evaluation: rule state and alarm changes, in the caller's
transaction, each change announced (live feed, outbox) on commit.

An alarm raised (new, or again after clearing) is queued for its case in the same
transaction (`case_intake`, with `pg_notify('gw_case_intake', '')`): the case is opened or
joined afterwards by the intake task (`alerting.intake`), never inside the ingest batch,
so a storm of alarms costs ingest one insert per batch, not a dispatch per alarm."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import asyncpg
import orjson

from alerting.alarm_json import Change, announce_alarm
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
    """One alarm operation; returns the alarm id changed, if any. An alarm raised is
    queued for its case: appended to `raised` (the caller then runs `queue_cases` once
    for all of them), or queued right away without it."""
    details = orjson.dumps(op.details).decode()
    if op.action == "raise":
        row = await conn.fetchrow(
            query("raise_alarm"),
            op.source, op.device_id, op.kind, op.rule, op.severity, op.cell_id, op.building,
            op.at, op.count, details,
        )  # fmt: skip
        assert row is not None
        change = _change(row)
        await announce_alarm(conn, row, change, topic_prefix)
        if change == "raised":
            if raised is None:
                await queue_cases(conn, [(int(row["id"]), op)])
            else:
                raised.append((int(row["id"]), op))
            if on_raised is not None:
                await on_raised(conn, row, op)
        return int(row["id"])
    row = await conn.fetchrow(query("clear_alarm"), op.source, op.rule, op.at, details)
    if row is None:
        return None  # nothing open (closed by an operator meanwhile): nothing to clear
    await announce_alarm(
        conn, row, "closed" if row["state"] == "closed" else "cleared", topic_prefix
    )
    return int(row["id"])


async def apply_evaluation(
    conn: asyncpg.Connection,
    evaluation: Evaluation,
    topic_prefix: str,
    on_raised: OnRaised | None = None,
) -> list[int]:
    """Persist state and apply alarm ops; call inside a transaction."""
    save = [(key, state) for key, state in evaluation.states.items() if state is not None]
    drop = [key for key, state in evaluation.states.items() if state is None]
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
    changed = []
    raised: Raised = []
    for op in evaluation.ops:
        alarm_id = await apply_op(conn, op, topic_prefix, on_raised, raised=raised)
        if alarm_id is not None:
            changed.append(alarm_id)
    await queue_cases(conn, raised)
    return changed


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
