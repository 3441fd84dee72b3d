"""The one module that talks to the database driver: pool creation and the named
queries in `sql/queries/*.sql`, loaded once and called by name."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

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


# No statement of the service takes this long (a batch commits in well under a second):
# past it the connection is taken for dead (a half-open TCP connection never answers and
# would stall its task for the ~15 minutes the kernel takes to give up), and the caller's
# retry goes to a new one.
COMMAND_TIMEOUT_S = 30.0


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 10) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, command_timeout=COMMAND_TIMEOUT_S
    )
    assert pool is not None
    return pool
