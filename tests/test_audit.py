"""The audit log: `gridwarden.audit.record` in the caller's transaction, append-only
enforcement, every recorded action, `GET /api/audit` and the privacy proofs."""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson
import pytest

from gridwarden import audit


async def _rows(conn: asyncpg.Connection) -> list[dict[str, Any]]:
    rows = await conn.fetch("SELECT * FROM audit_log ORDER BY id")
    return [{**dict(r), "detail": orjson.loads(r["detail"])} for r in rows]


async def test_record_commits_and_rolls_back_with_the_callers_transaction(database_url):
    conn = await asyncpg.connect(database_url)
    try:
        tx = conn.transaction()
        await tx.start()
        await audit.record(conn, actor="cli", action="x.rolled_back", target_type="thing",
                           target_id="1")  # fmt: skip
        await tx.rollback()  # the action failed: its audit row goes with it
        async with conn.transaction():
            await audit.record(
                conn, actor="operator:3", action="x.done", target_type="thing",
                target_id="2", detail={"n": 1}, address="10.0.0.9",
            )  # fmt: skip
        rows = await _rows(conn)
        assert [(r["actor"], r["action"], r["target_type"], r["target_id"], r["detail"],
                 r["address"]) for r in rows] == [
            ("operator:3", "x.done", "thing", "2", {"n": 1}, "10.0.0.9")
        ]  # fmt: skip
        assert rows[0]["at"] is not None
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_log SET actor = 'someone else'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ],
)
async def test_the_database_refuses_to_edit_the_audit_log(database_url, statement):
    conn = await asyncpg.connect(database_url)
    try:
        await audit.record(conn, actor="cli", action="x.done", target_type="thing", target_id="1")
        with pytest.raises(asyncpg.RaiseError, match="audit_log is append-only"):
            await conn.execute(statement)
        assert len(await _rows(conn)) == 1
    finally:
        await conn.close()
