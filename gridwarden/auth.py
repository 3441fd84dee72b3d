"""API tokens (CONTRACT §5): bearer tokens, stored only as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from typing import Literal

import asyncpg

from gridwarden.db import query

Role = Literal["operator", "worker", "admin"]
TOKEN_PREFIX = "gw_"


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
) -> str:
    if (role == "worker") != (worker_id is not None):
        raise ValueError("a worker token needs --worker, and only a worker token takes it")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    await conn.execute(query("create_token"), hash_token(token), role, worker_id, label)
    return token


async def principal_for(conn: asyncpg.Connection | asyncpg.Pool, token: str) -> Principal | None:
    if not token.startswith(TOKEN_PREFIX) or len(token) > 128:
        return None
    row = await conn.fetchrow(query("token_by_hash"), hash_token(token))
    if row is None:
        return None
    return Principal(row["id"], row["role"], row["worker_id"])
