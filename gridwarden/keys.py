"""Keys the service makes for itself when none is configured."""

from __future__ import annotations

import logging
import secrets

import asyncpg

from gridwarden.config import Settings
from gridwarden.db import query

log = logging.getLogger(__name__)

CREDENTIAL_HASH = "credential_hash"
# What an unset key meant before migration 010; a database holding hashes made with it
# keeps it (sql/migrations/010_service_keys.sql).
PUBLIC_DEFAULT_KEY = "gridwarden-dev-key"


async def credential_hash_key(conn: asyncpg.Connection | asyncpg.Pool, settings: Settings) -> str:
    """The key card and phone numbers are hashed with: GRIDWARDEN_CREDENTIAL_HASH_KEY, else
    one made at random on first use and kept in the database, so that every process and
    every restart hash alike and nobody outside knows it (short numbers can be recovered
    from a hash whose key is known, by trying them all)."""
    if settings.credential_hash_key:
        return settings.credential_hash_key
    for _ in range(2):  # a second ask sees the key another process made meanwhile
        key = await conn.fetchval(
            query("service_key_get_or_make"), CREDENTIAL_HASH, secrets.token_hex(32)
        )
        if key is not None:
            if key == PUBLIC_DEFAULT_KEY:
                log.warning(
                    "card and phone numbers are hashed with the old public default key "
                    "(kept because hashes made with it are stored): set "
                    "GRIDWARDEN_CREDENTIAL_HASH_KEY and import the workers again"
                )
            return str(key)
    raise RuntimeError("the credential hash key could not be read or made")
