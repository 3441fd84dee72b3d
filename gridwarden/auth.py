"""API tokens (CONTRACT §5): bearer tokens, stored only as SHA-256 hashes; and browser
sessions, which a token is exchanged for at `POST /login` (ids likewise stored only as
SHA-256 hashes)."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import asyncpg

from gridwarden import audit
from gridwarden.db import query

Role = Literal["operator", "worker", "admin"]
TOKEN_PREFIX = "gw_"
MAX_TOKEN_LENGTH = 128
SESSION_ID_BYTES = 32  # 256 bits from the OS's CSPRNG
MAX_SESSION_ID_LENGTH = 128


@dataclass(frozen=True)
class Principal:
    token_id: int
    role: Role
    worker_id: str | None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def create_token(
    conn: asyncpg.Connection | asyncpg.Pool,
    role: Role,
    worker_id: str | None = None,
    label: str = "",
    *,
    actor: str = audit.CLI_ACTOR,
    address: str | None = None,
) -> str:
    """A new token (returned once; only its hash is stored), audited as `token.create`
    by `actor` in the same transaction."""
    if (role == "worker") != (worker_id is not None):
        raise ValueError("a worker token needs --worker, and only a worker token takes it")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    if isinstance(conn, asyncpg.Pool):
        async with conn.acquire() as pooled:
            await _insert_token(pooled, token, role, worker_id, label, actor, address)
    else:
        await _insert_token(conn, token, role, worker_id, label, actor, address)
    return token


async def _insert_token(
    conn: asyncpg.Connection,
    token: str,
    role: Role,
    worker_id: str | None,
    label: str,
    actor: str,
    address: str | None,
) -> None:
    async with conn.transaction():
        token_id = await conn.fetchval(
            query("create_token"), hash_token(token), role, worker_id, label
        )
        await audit.record(
            conn, actor=actor, action="token.create", target_type="api_token",
            target_id=str(token_id), address=address,
            detail={"role": role, "worker_id": worker_id, "label": label},
        )  # fmt: skip


async def principal_for(conn: asyncpg.Connection | asyncpg.Pool, token: str) -> Principal | None:
    if not token.startswith(TOKEN_PREFIX) or len(token) > MAX_TOKEN_LENGTH:
        return None
    # Looked up by its hash: the secret itself is never compared byte by byte (no timing
    # side channel), and an index probe on a SHA-256 leaks nothing usable about a token
    # that is 256 bits of randomness.
    row = await conn.fetchrow(query("token_by_hash"), hash_token(token))
    if row is None:
        return None
    return Principal(row["id"], row["role"], row["worker_id"])


@dataclass(frozen=True)
class Session:
    """A browser session just opened: the cookie value (shown once) and its expiry."""

    session_id: str
    expires_at: datetime


async def create_session(
    conn: asyncpg.Connection | asyncpg.Pool, principal: Principal, ttl_s: int
) -> Session:
    """A new session for the token behind `principal`; only its hash is stored."""
    session_id = secrets.token_urlsafe(SESSION_ID_BYTES)
    await conn.execute(query("web_sessions_prune"))
    expires_at = await conn.fetchval(
        query("web_session_create"), hash_token(session_id), principal.token_id, ttl_s
    )
    return Session(session_id, expires_at)


async def principal_for_session(
    conn: asyncpg.Connection | asyncpg.Pool, session_id: str
) -> Principal | None:
    """The principal of a live session (not expired, its token not revoked), or None.
    Like tokens, looked up by hash: no comparison of secrets."""
    if not session_id or len(session_id) > MAX_SESSION_ID_LENGTH:
        return None
    row = await conn.fetchrow(query("web_session_principal"), hash_token(session_id))
    if row is None:
        return None
    return Principal(row["id"], row["role"], row["worker_id"])


async def delete_session(conn: asyncpg.Connection | asyncpg.Pool, session_id: str) -> None:
    if session_id and len(session_id) <= MAX_SESSION_ID_LENGTH:
        await conn.execute(query("web_session_delete"), hash_token(session_id))
