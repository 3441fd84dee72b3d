"""The one module that talks to the database driver: pool creation and the named
queries in `sql/queries/*.sql`, loaded once and called by name."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from typing import Any

import asyncpg

BIGINT_MAX = 2**63 - 1  # a larger id or cursor would fail in the driver: refuse it with 422
_NAME_LINE = re.compile(r"^--\s*name:\s*([a-z_][a-z0-9_]*)\s*$", re.MULTILINE)


@cache
def queries() -> dict[str, str]:
    """Every `-- name: x` block of every file in sql/queries, by name."""
    found: dict[str, str] = {}
    folder = resources.files("gridwarden") / "sql" / "queries"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".sql"):
            continue
        text = entry.read_text("utf-8")
        marks = list(_NAME_LINE.finditer(text))
        for index, mark in enumerate(marks):
            end = marks[index + 1].start() if index + 1 < len(marks) else len(text)
            name = mark.group(1)
            if name in found:
                raise RuntimeError(f"query {name!r} defined twice ({entry.name})")
            found[name] = text[mark.end() : end].strip().rstrip(";")
    return found


def query(name: str) -> str:
    return queries()[name]


# The database is down, unreachable or dropped a connection: log, wait, try again. Includes
# asyncpg's InternalClientError, raised when a connection is reused while a statement that
# an outage cut short is still in progress on it (seen in the SLA timers' outage test).
DB_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)  # fmt: skip


# No statement of the service takes this long (a batch commits in well under a second):
# past it the connection is taken for dead (a half-open TCP connection never answers and
# would stall its task for the ~15 minutes the kernel takes to give up), and the caller's
# retry goes to a new one.
COMMAND_TIMEOUT_S = 30.0


# Giving a connection back waits this long at most (and then closes it): for the answer
# to the cancellation of a statement that timed out, and for the reset.
RELEASE_TIMEOUT_S = 5.0


class _Pool(asyncpg.Pool):  # type: ignore[misc]  # asyncpg ships no type hints
    """A pool that gives connections back with a timeout when the caller names none
    (`async with pool.acquire()`, `Pool.execute`, `fetch`…). Without one, a connection
    whose statement timed out waits for its cancellation to be answered (asyncpg pool.py,
    `_wait_for_cancellation(None)`): for ever on a half-open connection, and the task that
    used it with it. With one, the connection is closed and the task goes on."""

    async def release(self, connection: Any, *, timeout: float | None = None) -> None:  # noqa: ASYNC109 (asyncpg's signature)
        await super().release(connection, timeout=RELEASE_TIMEOUT_S if timeout is None else timeout)


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 10) -> asyncpg.Pool:
    # What asyncpg.create_pool does, with our class: it takes no pool class.
    pool = _Pool(
        dsn, min_size=min_size, max_size=max_size, command_timeout=COMMAND_TIMEOUT_S,
        max_queries=50_000, max_inactive_connection_lifetime=300.0, setup=None, init=None,
        loop=None, connection_class=asyncpg.Connection, record_class=asyncpg.Record,
    )  # fmt: skip
    await pool
    return pool
