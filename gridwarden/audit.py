"""The audit log: who did what to which thing, from where (`audit_log`, migration 008).

`record` writes one row on the caller's connection, so inside the caller's transaction
the action and its audit row commit or roll back together:

    async with pool.acquire() as conn, conn.transaction():
        ...                                   # the change itself
        await audit.record(conn, actor=audit.actor_of(principal), action="case.accept",
                           target_type="case", target_id=str(case_id), address=address)

The table is append-only (the database refuses UPDATE, DELETE and TRUNCATE). `detail`
is for ids, states, counts and reasons: never a token, a card number or a phone number.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
from starlette.requests import HTTPConnection

from gridwarden.db import query

if TYPE_CHECKING:
    from gridwarden.auth import Principal

CLI_ACTOR = "cli"
ANONYMOUS_ACTOR = "anonymous"


def actor_of(principal: Principal) -> str:
    """`worker:<worker id>` for a worker token, `<role>:<token id>` (as in `acked_by`)
    for an operator or admin token."""
    if principal.worker_id is not None:
        return f"worker:{principal.worker_id}"
    return f"{principal.role}:{principal.token_id}"


def client_address(request: HTTPConnection) -> str | None:
    """The peer address of an HTTP request (behind a proxy: the proxy's, as uvicorn
    reports it when `--forwarded-allow-ips` is not set)."""
    return request.client.host if request.client is not None else None


async def record(
    conn: asyncpg.Connection,
    *,
    actor: str,
    action: str,
    target_type: str,
    target_id: str | None,
    detail: dict[str, Any] | None = None,
    address: str | None = None,
) -> None:
    """Append one audit row on `conn` (in its current transaction, if any)."""
    payload = orjson.dumps(detail or {}, default=str).decode()
    await conn.execute(
        query("audit_record"), actor, action, target_type, target_id, payload, address
    )
