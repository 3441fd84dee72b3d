"""The public shape of an alarm and how every alarm change is announced.

Used by everyone who changes an alarm (the rules engine, the HTTP API), so the HTTP list,
the SSE feed and the MQTT messages (CONTRACT §5, §6) all carry the same JSON.

Conventions for a writer of `alarms`, in the transaction that changes the row:

- set `updated_at = now()` on every change (the SSE feed resynchronises a reconnecting
  client from it);
- call `announce_alarm(conn, row, change, topic_prefix)` (`announce_alarms` for several)
  with the row as it is after the change (`RETURNING` the columns of `ALARM_COLUMNS`). It
  always runs
  `pg_notify('gw_alarm', <alarm id>)` (the live feed); for a lifecycle change (anything
  but `repeated`) it also inserts an outbox row - topic `{prefix}/alarms/{cell_id}`, or
  `{prefix}/alarms/unassigned` without a cell; payload `alarm_json(row)` plus
  `"change"` - and runs `pg_notify('gw_outbox', '')` to wake the publisher.

Notifications are delivered on commit only, so nobody sees a change that rolls back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, get_args

import asyncpg
import orjson

from gridwarden.db import query

Change = Literal["raised", "repeated", "severity", "acknowledged", "cleared", "closed"]
CHANGES: tuple[str, ...] = get_args(Change)
Severity = Literal["critical", "major", "minor", "warning"]
SEVERITIES: tuple[str, ...] = get_args(Severity)  # most severe first
AlarmState = Literal["active", "acknowledged", "cleared", "closed"]
ALARM_STATES: tuple[str, ...] = get_args(AlarmState)

ALARM_CHANNEL = "gw_alarm"  # payload: the alarm id
OUTBOX_CHANNEL = "gw_outbox"  # payload: '' (just a wake-up)
UNASSIGNED = "unassigned"  # the topic segment of an alarm without a cell

# The columns alarm_json reads, for `RETURNING` / `SELECT` lists.
ALARM_COLUMNS = (
    "id, device_id, kind, rule, severity, state, cell_id, first_seen, last_seen, count, "
    "cleared_at, case_id"
)


def iso(value: datetime | None) -> str | None:
    """RFC 3339 in UTC with a Z, as every time in the API."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z") if value else None


def alarm_json(row: Mapping[str, Any]) -> dict[str, Any]:
    """An alarm as CONTRACT §5 lists it (a record or mapping with `ALARM_COLUMNS`)."""
    return {
        "id": row["id"],
        "device_id": row["device_id"],
        "kind": row["kind"],
        "rule": row["rule"],
        "severity": row["severity"],
        "state": row["state"],
        "cell_id": row["cell_id"],
        "first_seen": iso(row["first_seen"]),
        "last_seen": iso(row["last_seen"]),
        "count": row["count"],
        "cleared_at": iso(row["cleared_at"]),
        "case_id": row["case_id"],
    }


def alarm_topic(topic_prefix: str, cell_id: str | None) -> str:
    """`{prefix}/alarms/{cell_id}` (CONTRACT §6); `.../unassigned` for an alarm without a cell."""
    return f"{topic_prefix}/alarms/{cell_id or UNASSIGNED}"


def alarm_message(row: Mapping[str, Any], change: Change) -> dict[str, Any]:
    """The MQTT payload of one alarm change: the alarm plus `change`."""
    return {**alarm_json(row), "change": change}


async def announce_alarm(
    conn: asyncpg.Connection, row: Mapping[str, Any], change: Change, topic_prefix: str
) -> None:
    """Notify the live feed and, unless `change` is a mere repeat, queue the MQTT message.

    Call inside the transaction that made the change."""
    await announce_alarms(conn, [(row, change)], topic_prefix)


async def announce_alarms(
    conn: asyncpg.Connection,
    changes: Sequence[tuple[Mapping[str, Any], Change]],
    topic_prefix: str,
) -> None:
    """`announce_alarm` for several changes, in their order, in one statement."""
    ids: list[int] = []
    topics: list[str | None] = []
    payloads: list[str | None] = []
    for row, change in changes:
        if change not in CHANGES:
            raise ValueError(f"unknown alarm change {change!r}")
        ids.append(row["id"])
        if change == "repeated":
            topics.append(None)
            payloads.append(None)
        else:
            topics.append(alarm_topic(topic_prefix, row["cell_id"]))
            payloads.append(orjson.dumps(alarm_message(row, change)).decode())
    if ids:
        await conn.execute(query("announce_alarms"), ids, topics, payloads)
