"""Case statistics for `GET /api/stats` (CONTRACT §5): per cell or per worker, over the
cases created in a time window.

- `cases`: how many were created in the window;
- `disposed`: how many are resolved, verified or archived now; `disposal_rate` (处置率)
  is disposed / cases;
- `sla_compliance`: of the steps with a known deadline outcome (accept, arrive, resolve;
  `accept_met`, `arrive_met`, `resolve_met` not NULL), the share that met it;
- `accept_s`, `arrive_s`, `resolve_s`: `{"median", "p90"}` seconds from the report time
  (continuous percentiles, over the cases that reached the step);
- `escalations`: their sum; `rating_avg`: the mean score of the rated cases.

Rates and durations are None when there is nothing to measure.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import asyncpg

from gridwarden.db import query

By = Literal["cell", "worker"]


def _seconds(value: Any) -> float | None:
    return None if value is None else round(float(value), 3)


def _percentiles(values: Any) -> dict[str, float | None]:
    """percentile_cont(ARRAY[0.5, 0.9]) → {"median", "p90"} (NULL when no case got there)."""
    if values is None:
        return {"median": None, "p90": None}
    median, p90 = values
    return {"median": _seconds(median), "p90": _seconds(p90)}


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def stats_json(row: asyncpg.Record) -> dict[str, Any]:
    cases, disposed = int(row["cases"]), int(row["disposed"])
    return {
        "cases": cases,
        "disposed": disposed,
        "disposal_rate": _ratio(disposed, cases),
        "sla_compliance": _ratio(int(row["steps_met"]), int(row["steps_timed"])),
        "accept_s": _percentiles(row["accept_s"]),
        "arrive_s": _percentiles(row["arrive_s"]),
        "resolve_s": _percentiles(row["resolve_s"]),
        "escalations": int(row["escalations"]),
        "rating_avg": row["rating_avg"],
    }


async def case_stats(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    by: By,
    since: datetime,
    until: datetime | None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows (one per cell or assignee, sorted by key; `key` None for cases nobody has
    been given, last) and the total over the window. `until` None: no upper bound."""
    items: list[dict[str, Any]] = []
    total: dict[str, Any] | None = None
    for row in await conn.fetch(query("case_stats"), by, since, until):
        if row["is_total"]:
            total = stats_json(row)
        else:
            items.append({"key": row["key"], **stats_json(row)})
    assert total is not None  # GROUPING SETS (()) always yields the total row
    return items, total
