"""The audit log: `gridwarden.audit.record` in the caller's transaction, append-only
enforcement, every recorded action, `GET /api/audit` and the privacy proofs."""

from __future__ import annotations

import re
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from alerting.alarms_api import AlarmFeed, attach_alarms
from alerting.alarms_api import router as alarms_router
from alerting.cases import TRANSITIONS
from alerting.cases_api import attach_cases
from alerting.cases_api import router as cases_router
from gridwarden import audit
from gridwarden.auth import create_token, hash_token, principal_for
from gridwarden.registry import import_file
from gridwarden.sample_city import write_sample_city
from gridwarden.web import CSRF_HEADER, CSRF_VALUE, SESSION_COOKIE, AppState, create_app
from tests.test_cases_api import IN_G1, PREFIX, SETTINGS, City, open_city
from tests.test_cli import db_env, gridwarden

ADDRESS = "198.51.100.7"
IMPORT_SUMMARY = re.compile(r"(\d+) created, (\d+) updated, (\d+) unchanged(?:; (\d+) warning)?")


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


# -- every recorded action


@dataclass
class Site:
    """The city of tests/test_cases_api.py with the case and alarm endpoints in one app."""

    city: City
    client: httpx.AsyncClient
    database_url: str
    tmp_path: Path
    token_ids: dict[str, int]

    def actor(self, who: str) -> str:
        if who in ("operator", "admin"):
            return f"{who}:{self.token_ids[who]}"
        return f"worker:{who}"

    async def last(self, action: str | None = None) -> dict[str, Any]:
        async with self.city.pool.acquire() as conn:
            rows = [r for r in await _rows(conn) if action is None or r["action"] == action]
        assert rows, f"no audit row for {action}"
        return rows[-1]

    async def alarm(self) -> int:
        return int(
            await self.city.pool.fetchval(
                "INSERT INTO alarms (source, device_id, kind, rule, severity, cell_id, "
                "first_seen, last_seen) VALUES ('d1', 'd1', 'smoke_detector', 'smoke.alarm', "
                "'critical', 'g1', now(), now()) RETURNING id"
            )
        )


@pytest.fixture
async def site(database_url: str, tmp_path: Path) -> AsyncIterator[Site]:
    async with open_city(database_url) as city:
        app = create_app(AppState(city.pool), routers=[cases_router, alarms_router])
        attach_cases(app, settings=SETTINGS, clock=city.clock)
        attach_alarms(app, feed=AlarmFeed(city.pool), topic_prefix=PREFIX)
        transport = httpx.ASGITransport(app=app, client=(ADDRESS, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            token_ids = {}
            for who in ("operator", "admin"):
                token = city.tokens[who]["Authorization"].removeprefix("Bearer ")
                principal = await principal_for(city.pool, token)
                assert principal is not None
                token_ids[who] = principal.token_id
            both = City(client, city.pool, city.clock, city.tokens)
            yield Site(both, client, database_url, tmp_path, token_ids)


def _audited(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["actor"], row["action"], row["target_type"], row["target_id"], row["detail"],
            row["address"])  # fmt: skip


# The whole loop and every detour, one row per step: (who, action, body). Each step's
# audit row must say who, from which state to which, the assignee after it, and only
# the body's worker_id / score (notes and reasons are free text: not copied).
CASE_STEPS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("w-b", "reject", {"reason": "不在我的片区"}),
    ("operator", "reassign", {"worker_id": "w-b"}),
    ("w-b", "escalate", {"reason": "需要执法队"}),
    ("lead-1", "accept", None),
    ("lead-1", "arrive", None),
    ("lead-1", "resolve", {"note": "摊主电话 13800138000，已劝离"}),
    ("operator", "reopen", {"reason": "摊贩又回来了"}),
    ("lead-1", "accept", None),
    ("lead-1", "arrive", None),
    ("lead-1", "resolve", {"note": "已清理"}),
    ("cs-1", "verify", {"note": "现场核实"}),
    ("admin", "archive", None),
    ("operator", "rate", {"score": 5, "comment": "及时"}),
]


async def test_every_case_action_is_audited_with_who_from_where(site: Site) -> None:
    assert {action for _, action, _ in CASE_STEPS} == set(TRANSITIONS)  # every action
    case = await site.city.report(IN_G1)
    case_id = case["id"]
    reported = await site.last("case.report")
    assert _audited(reported) == (
        site.actor("operator"), "case.report", "case", str(case_id),
        {"cell_id": "g1", "category": "占道经营", "priority": "minor",
         "to_state": "dispatched", "assignee": "w-b"},
        ADDRESS,
    )  # fmt: skip
    state = case["state"]
    for who, action, body in CASE_STEPS:
        site.city.clock.advance(30)
        after = await site.city.ok(who, case_id, action, body)
        kept = {k: v for k, v in (body or {}).items() if k in ("worker_id", "score")}
        detail = {"from_state": state, "to_state": after["state"],
                  "assignee": after["assignee"], **kept}  # fmt: skip
        row = await site.last()
        assert _audited(row) == (
            site.actor(who),
            f"case.{action}",
            "case",
            str(case_id),
            detail,
            ADDRESS,
        ), action
        state = after["state"]
    assert "13800138000" not in str(await _rows_of(site))


async def _rows_of(site: Site) -> list[dict[str, Any]]:
    async with site.city.pool.acquire() as conn:
        return await _rows(conn)


async def test_a_refused_action_leaves_no_audit_row(site: Site) -> None:
    case_id = (await site.city.report(IN_G1))["id"]
    before = len(await _rows_of(site))
    assert (await site.city.act("w-a", case_id, "accept")).status_code == 403
    assert (await site.city.act("w-b", case_id, "arrive")).status_code == 409
    alarm_id = await site.alarm()
    ack = f"/api/alarms/{alarm_id}/ack"
    assert (await site.client.post(ack, headers=site.city.tokens["operator"])).status_code == 200
    assert (await site.client.post(ack, headers=site.city.tokens["operator"])).status_code == 409
    assert [r["action"] for r in (await _rows_of(site))[before:]] == ["alarm.ack"]


# -- the other audited actions, as a table: each performs one action the real way and
# answers the audit row expected of it (actor, action, target type, target id, detail,
# address).

Expected = tuple[str, str, str, str | None, dict[str, Any], str | None]


def _alarm_action(action: str, who: str, to_state: str) -> Callable[[Site], Awaitable[Expected]]:
    async def run(site: Site) -> Expected:
        alarm_id = await site.alarm()
        response = await site.client.post(
            f"/api/alarms/{alarm_id}/{action}", headers=site.city.tokens[who]
        )
        assert response.status_code == 200, response.text
        detail = {"from_state": "active", "to_state": to_state}
        return (site.actor(who), f"alarm.{action}", "alarm", str(alarm_id), detail, ADDRESS)

    return run


async def _cli(site: Site, *args: str) -> subprocess.CompletedProcess[str]:
    return await gridwarden(*args, env=db_env(site.database_url, site.tmp_path))


async def _token_create(site: Site) -> Expected:
    result = await _cli(site, "token", "create", "--role", "worker", "--worker", "w-b",
                        "--label", "w-b's phone")  # fmt: skip
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    principal = await principal_for(site.city.pool, token)
    assert principal is not None
    row = await site.last("token.create")
    assert token not in str(row)
    assert hash_token(token) not in str(row)
    detail = {"role": "worker", "worker_id": "w-b", "label": "w-b's phone"}
    return ("cli", "token.create", "api_token", str(principal.token_id), detail, None)


def _registry_import(kind: str) -> Callable[[Site], Awaitable[Expected]]:
    async def run(site: Site) -> Expected:
        files = write_sample_city(site.tmp_path / "city")
        for earlier in ("grid", "devices", "workers")[: ("grid", "devices", "workers").index(kind)]:
            await import_file_directly(site, earlier, getattr(files, earlier))
        path = getattr(files, kind)
        result = await _cli(site, "import", kind, str(path))
        assert result.returncode == 0, result.stderr
        summary = IMPORT_SUMMARY.search(result.stdout)
        assert summary is not None, result.stdout
        created, updated, unchanged, warnings = (int(n or 0) for n in summary.groups())
        assert created > 0
        detail = {"file": str(path), "created": created, "updated": updated,
                  "unchanged": unchanged, "warnings": warnings}  # fmt: skip
        return ("cli", "registry.import", kind, None, detail, None)

    return run


async def import_file_directly(site: Site, kind: str, path: Path) -> None:
    async with site.city.pool.acquire() as conn:
        await import_file(conn, kind, path, SETTINGS)


async def _registry_import_rejected(site: Site) -> Expected:
    path = site.tmp_path / "bad.geojson"
    path.write_text('{"type": "FeatureCollection", "features": [{"type": "Feature"}]}')
    result = await _cli(site, "import", "grid", str(path))
    assert result.returncode == 1, result.stdout
    problems = len([line for line in result.stderr.splitlines() if line.startswith("  - ")])
    detail = {"file": str(path), "problems": problems}
    return ("cli", "registry.import_rejected", "grid", None, detail, None)


async def _login(site: Site) -> Expected:
    token = site.city.tokens["admin"]["Authorization"].removeprefix("Bearer ")
    response = await site.client.post("/login", json={"token": token})
    assert response.status_code == 200, response.text
    detail = {"method": "json", "role": "admin"}
    return (site.actor("admin"), "auth.login", "api_token", str(site.token_ids["admin"]),
            detail, ADDRESS)  # fmt: skip


async def _login_failed(site: Site) -> Expected:
    wrong = "gw_" + "x" * 43
    response = await site.client.post("/login", data={"token": wrong})
    assert response.status_code == 401
    assert wrong not in str(await site.last("auth.login_failed"))
    detail = {"method": "form", "reason": "invalid or revoked token"}
    return ("anonymous", "auth.login_failed", "session", None, detail, ADDRESS)


async def _logout(site: Site) -> Expected:
    await _login(site)
    response = await site.client.post("/logout", headers={CSRF_HEADER: CSRF_VALUE})
    assert response.status_code == 204
    # A stale cookie signs nobody out: no second row.
    site.client.cookies.set(SESSION_COOKIE, "gone")
    await site.client.post("/logout", headers={CSRF_HEADER: CSRF_VALUE})
    rows = [r for r in await _rows_of(site) if r["action"] == "auth.logout"]
    assert len(rows) == 1
    return (site.actor("admin"), "auth.logout", "api_token", str(site.token_ids["admin"]), {},
            ADDRESS)  # fmt: skip


AUDITED = {
    "alarm.ack": _alarm_action("ack", "operator", "acknowledged"),
    "alarm.close": _alarm_action("close", "admin", "closed"),
    "token.create": _token_create,
    "registry.import grid": _registry_import("grid"),
    "registry.import devices": _registry_import("devices"),
    "registry.import workers": _registry_import("workers"),
    "registry.import_rejected": _registry_import_rejected,
    "auth.login": _login,
    "auth.login_failed": _login_failed,
    "auth.logout": _logout,
}


@pytest.mark.parametrize("name", list(AUDITED))
async def test_each_admin_and_alarm_action_is_audited(site: Site, name: str) -> None:
    expected = await AUDITED[name](site)
    assert _audited(await site.last(expected[1])) == expected


# -- one transaction: when the audit row cannot be written, the action is not done


async def _fail(*_: Any, **__: Any) -> None:
    raise RuntimeError("the audit log is unavailable")


async def _state_of_case(site: Site, case_id: int) -> str:
    return str(await site.city.pool.fetchval("SELECT state FROM cases WHERE id = $1", case_id))


@pytest.mark.parametrize("action", ["case.accept", "alarm.ack", "token.create", "auth.login"])
async def test_the_action_rolls_back_with_its_audit_row(
    site: Site, action: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    case_id = (await site.city.report(IN_G1))["id"]
    alarm_id = await site.alarm()
    tokens = await site.city.pool.fetchval("SELECT count(*) FROM api_tokens")
    monkeypatch.setattr(audit, "record", _fail)
    admin = site.city.tokens["admin"]
    attempts = {
        "case.accept": lambda: site.city.act("w-b", case_id, "accept"),
        "alarm.ack": lambda: site.client.post(f"/api/alarms/{alarm_id}/ack", headers=admin),
        "token.create": lambda: create_token(site.city.pool, "operator"),
        "auth.login": lambda: site.client.post(
            "/login", json={"token": admin["Authorization"].removeprefix("Bearer ")}
        ),
    }
    with pytest.raises(RuntimeError, match="audit log is unavailable"):
        await attempts[action]()
    assert await _state_of_case(site, case_id) == "dispatched"
    alarm = await site.city.pool.fetchval("SELECT state FROM alarms WHERE id = $1", alarm_id)
    assert alarm == "active"
    assert await site.city.pool.fetchval("SELECT count(*) FROM api_tokens") == tokens
    assert await site.city.pool.fetchval("SELECT count(*) FROM web_sessions") == 0


# -- GET /api/audit


async def _audit_page(site: Site, who: str | None, **params: Any) -> httpx.Response:
    headers = site.city.tokens[who] if who else {}
    return await site.client.get("/api/audit", params=params, headers=headers)


@pytest.mark.parametrize(
    ("who", "status"),
    [("operator", 200), ("admin", 200), ("w-b", 403), ("lead-1", 403), (None, 401)],
)
async def test_the_audit_log_is_for_operators_and_admins(
    site: Site, who: str | None, status: int
) -> None:
    response = await _audit_page(site, who)
    assert response.status_code == status, response.text
    if status == 200:
        # The fixture's tokens were created (as the CLI does): audited, newest first.
        items = response.json()["items"]
        assert items
        assert {i["action"] for i in items} == {"token.create"}
        assert [i["id"] for i in items] == sorted((i["id"] for i in items), reverse=True)


T = datetime(2026, 5, 1, tzinfo=UTC)


async def test_the_audit_log_pages_newest_first_and_filters(site: Site) -> None:
    rows = [  # (at, actor, action): inserted in this order, so ids rise down the list
        (T, "cli", "test.step"),
        (T + timedelta(hours=1), "operator:1", "test.step"),
        (T + timedelta(hours=2), "cli", "test.other"),
        (T + timedelta(hours=3), "operator:1", "test.step"),
        (T + timedelta(hours=4), "cli", "test.step"),
    ]
    ids = [
        await site.city.pool.fetchval(
            "INSERT INTO audit_log (at, actor, action, target_type, target_id, detail) "
            "VALUES ($1, $2, $3, 'thing', $4, '{\"n\": 1}') RETURNING id",
            at,
            actor,
            action,
            str(n),
        )
        for n, (at, actor, action) in enumerate(rows)
    ]

    async def listed(**params: Any) -> list[list[int]]:
        pages, cursor = [], None
        while True:
            query = {**params, **({"cursor": cursor} if cursor else {})}
            response = await _audit_page(site, "operator", **query)
            assert response.status_code == 200, response.text
            body = response.json()
            pages.append([item["id"] for item in body["items"]])
            cursor = body["next_cursor"]
            if cursor is None:
                return pages

    steps = [ids[4], ids[3], ids[1], ids[0]]
    assert await listed(action="test.step", limit=3) == [steps[:3], steps[3:]]
    assert await listed(action="test.step", limit=2) == [steps[:2], steps[2:], []]
    assert await listed(action="test.step", actor="cli") == [[ids[4], ids[0]]]
    since, until = (T + timedelta(hours=1)).isoformat(), (T + timedelta(hours=3)).isoformat()
    assert await listed(since=since, until=until) == [[ids[2], ids[1]]]
    first = (await _audit_page(site, "operator", action="test.other")).json()["items"][0]
    assert first == {
        "id": ids[2], "at": "2026-05-01T02:00:00Z", "actor": "cli", "action": "test.other",
        "target_type": "thing", "target_id": "2", "detail": {"n": 1}, "address": None,
    }  # fmt: skip
    for bad in ({"since": "2026-05-01T00:00:00"}, {"limit": 0}, {"limit": 1001},
                {"cursor": 0}, {"action": "a\x00b"}):  # fmt: skip
        response = await _audit_page(site, "operator", **bad)
        assert response.status_code == 422, (bad, response.text)
