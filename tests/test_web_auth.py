"""Browser sessions: the login page, token → cookie, the cookie's flags, cookie
authentication (also for the SSE feed, over a real HTTP server), the X-Requested-With rule
for cookie POSTs, logout, expiry and revocation, the limit on failed logins, the page
routes and their redirects, /api/me and /api/config."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from alerting.alarms_api import AlarmFeed, attach_alarms
from alerting.alarms_api import router as alarms_router
from alerting.cases_api import attach_cases
from alerting.cases_api import router as cases_router
from alerting.cells_api import router as cells_router
from alerting.pages import attach_pages
from gridwarden.auth import create_token
from gridwarden.clock import ManualClock
from gridwarden.config import Settings
from gridwarden.db import create_pool
from gridwarden.service import bind_http, http_task
from gridwarden.web import (
    CSRF_HEADER,
    CSRF_VALUE,
    SESSION_COOKIE,
    AppState,
    LoginLimiter,
    WebConfig,
    create_app,
    safe_next,
)
from tests.ingest_helpers import WAIT_S
from tests.test_alarms_api import EventReader, insert_alarm
from tests.test_cases_api import insert_cell

PREFIX = "gwt"
CSRF = {CSRF_HEADER: CSRF_VALUE}
WEB = WebConfig(timezone="Asia/Urumqi", topic_prefix=PREFIX, session_ttl_s=12 * 3600)


@dataclass
class Site:
    client: httpx.AsyncClient
    pool: asyncpg.Pool
    feed: AlarmFeed
    app: Any
    tokens: dict[str, str]  # operator, admin, worker (w1), revoked

    async def login(self, who: str = "operator", **kwargs: Any) -> str:
        """Sign in with a form post; the session id. The client keeps no cookies: each
        test sends the cookie it means to."""
        response = await self.client.post("/login", data={"token": self.tokens[who]}, **kwargs)
        assert response.status_code == 303, response.text
        session_id = response.cookies[SESSION_COOKIE]
        self.client.cookies.clear()
        return session_id


def cookie(session_id: str) -> dict[str, str]:
    return {"Cookie": f"{SESSION_COOKIE}={session_id}"}


def build_app(pool: asyncpg.Pool, feed: AlarmFeed, web: WebConfig = WEB) -> Any:
    app = create_app(AppState(pool, web=web), routers=[alarms_router, cases_router, cells_router])
    attach_pages(app)
    attach_alarms(app, feed=feed, topic_prefix=PREFIX)
    attach_cases(
        app,
        settings=Settings(topic_prefix=PREFIX),
        clock=ManualClock(datetime(2026, 11, 22, tzinfo=UTC)),
    )
    return app


@pytest.fixture
async def site(database_url: str) -> AsyncIterator[Site]:
    pool = await create_pool(database_url)
    await insert_cell(pool, "g1", "grid", None, (116.0, 39.8, 116.1, 40.0))
    await pool.execute("INSERT INTO workers (id, name, role) VALUES ('w1', '王五', 'grid_worker')")
    await pool.execute("INSERT INTO worker_cells (worker_id, cell_id) VALUES ('w1', 'g1')")
    tokens = {
        "operator": await create_token(pool, "operator", label="值班员 1"),
        "admin": await create_token(pool, "admin"),
        "worker": await create_token(pool, "worker", "w1"),
        "revoked": await create_token(pool, "operator"),
    }
    await pool.execute(
        "UPDATE api_tokens SET revoked_at = now() WHERE token_hash = $1",
        hashlib.sha256(tokens["revoked"].encode()).hexdigest(),
    )
    feed = AlarmFeed(pool, heartbeat_s=0.3)
    app = build_app(pool, feed)
    transport = httpx.ASGITransport(app=app, client=("198.51.100.7", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw.test") as client:
        yield Site(client, pool, feed, app, tokens)
    await pool.close()


def set_cookie_attributes(response: httpx.Response) -> dict[str, str]:
    """The attributes of the gw_session Set-Cookie header, lower-cased names."""
    headers = [h for h in response.headers.get_list("set-cookie") if h.startswith(SESSION_COOKIE)]
    assert len(headers) == 1, headers
    parts = [p.strip() for p in headers[0].split(";")]
    attributes = {"value": parts[0].split("=", 1)[1]}
    for part in parts[1:]:
        name, _, value = part.partition("=")
        attributes[name.lower()] = value
    return attributes


# -- the login page and the exchange


async def test_login_page_is_self_contained_and_bilingual(site: Site) -> None:
    response = await site.client.get("/login")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    for label in ("令牌", "Token", "登录", "Sign in"):
        assert label in page
    assert '<form method="post" action="/login">' in page
    assert 'name="token"' in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing external
    assert "<script" not in page
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]


@pytest.mark.parametrize(
    ("who", "home"), [("operator", "/"), ("admin", "/"), ("worker", "/worker")]
)
async def test_a_good_token_opens_a_session(site: Site, who: str, home: str) -> None:
    response = await site.client.post("/login", data={"token": site.tokens[who]})
    assert response.status_code == 303
    assert response.headers["location"] == home
    attributes = set_cookie_attributes(response)
    session_id = attributes["value"]
    assert len(session_id) >= 40
    assert "httponly" in attributes
    assert attributes["samesite"].lower() == "strict"
    assert attributes["path"] == "/"
    assert int(attributes["max-age"]) == 12 * 3600
    assert "secure" not in attributes  # plain http (a test, or localhost)
    # Only the hash is stored; it points at the token; it lasts 12 hours.
    rows = await site.pool.fetch("SELECT * FROM web_sessions")
    assert len(rows) == 1
    row = rows[0]
    assert row["id_hash"] == hashlib.sha256(session_id.encode()).hexdigest()
    assert session_id not in {str(v) for v in row.values()}
    token_id = await site.pool.fetchval(
        "SELECT id FROM api_tokens WHERE token_hash = $1",
        hashlib.sha256(site.tokens[who].encode()).hexdigest(),
    )
    assert row["token_id"] == token_id
    lifetime = row["expires_at"] - row["created_at"]
    assert abs(lifetime - timedelta(hours=12)) < timedelta(seconds=5)


async def test_the_cookie_is_secure_over_https(site: Site) -> None:
    transport = httpx.ASGITransport(app=site.app)
    async with httpx.AsyncClient(transport=transport, base_url="https://gw.test") as client:
        response = await client.post("/login", data={"token": site.tokens["operator"]})
    assert response.status_code == 303
    assert "secure" in set_cookie_attributes(response)


async def test_json_login(site: Site) -> None:
    response = await site.client.post("/login", json={"token": site.tokens["worker"]})
    assert response.status_code == 200
    body = response.json()
    assert body["role"] == "worker"
    assert body["worker_id"] == "w1"
    assert body["next"] == "/worker"
    assert body["expires_at"].endswith("Z")
    assert "httponly" in set_cookie_attributes(response)


async def test_bad_tokens_are_refused(site: Site) -> None:
    for token in ("gw_nope", site.tokens["revoked"], "x" * 500):
        form = await site.client.post("/login", data={"token": token})
        assert form.status_code == 401
        assert "令牌无效" in form.text  # the form again, with the reason
        assert "Invalid" in form.text
        assert SESSION_COOKIE not in form.headers.get("set-cookie", "")
        as_json = await site.client.post("/login", json={"token": token})
        assert as_json.status_code == 401
        assert as_json.json() == {"error": "invalid or revoked token"}
    empty = await site.client.post("/login", data={"token": "  "})
    assert empty.status_code == 400
    assert (await site.client.post("/login", json={"token": 12})).status_code == 422
    assert (await site.client.post("/login", json=["gw_x"])).status_code == 422
    as_json_type = {"content-type": "application/json"}
    not_json = await site.client.post("/login", content=b"{", headers=as_json_type)
    assert not_json.status_code == 422
    as_text = {"content-type": "text/plain"}
    text = await site.client.post("/login", content=b"token=x", headers=as_text)
    assert text.status_code == 415
    many = await site.client.post("/login", data={f"f{i}": "x" for i in range(30)})
    assert many.status_code == 422
    huge = await site.client.post("/login", data={"token": "gw_" + "a" * 10_000})
    assert huge.status_code == 413
    assert await site.pool.fetchval("SELECT count(*) FROM web_sessions") == 0


async def test_a_login_posted_from_another_site_is_refused(site: Site) -> None:
    good = {"token": site.tokens["operator"]}
    foreign = await site.client.post("/login", data=good, headers={"Origin": "https://evil.test"})
    assert foreign.status_code == 403
    null = await site.client.post("/login", data=good, headers={"Origin": "null"})
    assert null.status_code == 403
    same = await site.client.post("/login", data=good, headers={"Origin": "http://gw.test"})
    assert same.status_code == 303
    proxied = await site.client.post(
        "/login",
        data=good,
        headers={"Origin": "https://city.example", "X-Forwarded-Host": "city.example"},
    )
    assert proxied.status_code == 303


async def test_next_is_followed_only_within_the_site(site: Site) -> None:
    page = await site.client.get("/login?next=/worker%23case-3")
    assert 'name="next" value="/worker#case-3"' in page.text
    token = site.tokens["operator"]
    response = await site.client.post("/login", data={"token": token, "next": "/worker#case-3"})
    assert response.headers["location"] == "/worker#case-3"
    for evil in ("//evil.test/", "https://evil.test/", "/\\evil.test", "javascript:alert(1)"):
        response = await site.client.post("/login", data={"token": token, "next": evil})
        assert response.headers["location"] == "/", evil
        assert safe_next(evil) is None
    site.client.cookies.clear()


# -- using the session


async def test_the_cookie_authenticates_reads(site: Site) -> None:
    session_id = await site.login("operator")
    assert (await site.client.get("/api/me")).status_code == 401  # no cookie, no token
    me = await site.client.get("/api/me", headers=cookie(session_id))
    assert me.status_code == 200
    assert me.json() == {
        "role": "operator",
        "token_id": me.json()["token_id"],
        "label": "值班员 1",
        "auth": "session",
        "worker_id": None,
        "worker": None,
    }
    alarm = await insert_alarm(site.pool)
    listed = await site.client.get("/api/alarms", headers=cookie(session_id))
    assert [a["id"] for a in listed.json()["items"]] == [alarm]
    assert (await site.client.get("/api/cells", headers=cookie(session_id))).status_code == 200
    bogus = await site.client.get("/api/me", headers=cookie("not-a-session"))
    assert bogus.status_code == 401
    assert bogus.json() == {"error": "session expired or signed out"}


async def test_me_for_a_worker_and_by_bearer(site: Site) -> None:
    session_id = await site.login("worker")
    me = (await site.client.get("/api/me", headers=cookie(session_id))).json()
    assert me["role"] == "worker"
    assert me["worker_id"] == "w1"
    assert me["worker"] == {
        "id": "w1", "name": "王五", "role": "grid_worker", "on_duty": True, "cells": ["g1"],
    }  # fmt: skip
    bearer = {"Authorization": f"Bearer {site.tokens['admin']}"}
    me = (await site.client.get("/api/me", headers=bearer)).json()
    assert (me["role"], me["auth"], me["worker"]) == ("admin", "bearer", None)


async def test_config(site: Site) -> None:
    assert (await site.client.get("/api/config")).status_code == 401
    session_id = await site.login("worker")
    config = (await site.client.get("/api/config", headers=cookie(session_id))).json()
    assert config["timezone"] == "Asia/Urumqi"
    assert config["topic_prefix"] == PREFIX
    assert config["session_ttl_s"] == 12 * 3600
    assert Settings().timezone == "Asia/Shanghai"
    assert WebConfig.from_settings(Settings(timezone="Europe/Berlin")).timezone == "Europe/Berlin"


async def test_cookie_posts_need_the_header(site: Site) -> None:
    session_id = await site.login("operator")
    alarm = await insert_alarm(site.pool)
    refused = await site.client.post(f"/api/alarms/{alarm}/ack", headers=cookie(session_id))
    assert refused.status_code == 403
    assert CSRF_HEADER in refused.json()["error"]
    wrong = await site.client.post(
        f"/api/alarms/{alarm}/ack", headers={**cookie(session_id), CSRF_HEADER: "XMLHttpRequest"}
    )
    assert wrong.status_code == 403
    assert await site.pool.fetchval("SELECT state FROM alarms WHERE id = $1", alarm) == "active"
    # With the header the request reaches the handler (and its own rules: 409 on a repeat).
    acked = await site.client.post(
        f"/api/alarms/{alarm}/ack", headers={**cookie(session_id), **CSRF}
    )
    assert acked.status_code == 200, acked.text
    assert acked.json()["state"] == "acknowledged"
    again = await site.client.post(
        f"/api/alarms/{alarm}/ack", headers={**cookie(session_id), **CSRF}
    )
    assert again.status_code == 409
    # A handler with a body, through the cookie: a report (no cell there: 422 from it).
    report = {"lat": 1.0, "lon": 1.0, "category": "x", "description": "y"}
    no_header = await site.client.post("/api/reports", json=report, headers=cookie(session_id))
    assert no_header.status_code == 403
    handled = await site.client.post(
        "/api/reports", json=report, headers={**cookie(session_id), **CSRF}
    )
    assert handled.status_code == 422
    assert "no grid cell" in handled.json()["error"]
    # Bearer requests are exempt: a browser never adds that header by itself.
    other = await insert_alarm(site.pool, device="smoke-9")
    bearer = {"Authorization": f"Bearer {site.tokens['operator']}"}
    assert (await site.client.post(f"/api/alarms/{other}/ack", headers=bearer)).status_code == 200


async def test_a_worker_session_keeps_the_worker_rules(site: Site) -> None:
    session_id = await site.login("worker")
    alarm = await insert_alarm(site.pool)
    refused = await site.client.post(
        f"/api/alarms/{alarm}/ack", headers={**cookie(session_id), **CSRF}
    )
    assert refused.status_code == 403
    assert "operator" in refused.json()["error"]


async def test_logout(site: Site) -> None:
    session_id = await site.login("operator")
    refused = await site.client.post("/logout", headers=cookie(session_id))
    assert refused.status_code == 403
    assert (await site.client.get("/api/me", headers=cookie(session_id))).status_code == 200
    response = await site.client.post("/logout", headers={**cookie(session_id), **CSRF})
    assert response.status_code == 204
    cleared = response.headers["set-cookie"]
    assert cleared.startswith(f'{SESSION_COOKIE}=""') or cleared.startswith(f"{SESSION_COOKIE}=;")
    assert "max-age=0" in cleared.lower()
    assert await site.pool.fetchval("SELECT count(*) FROM web_sessions") == 0
    gone = await site.client.get("/api/me", headers=cookie(session_id))
    assert gone.status_code == 401
    # Signing out twice, or without a session, is fine.
    assert (
        await site.client.post("/logout", headers={**cookie(session_id), **CSRF})
    ).status_code == 204
    assert (await site.client.post("/logout")).status_code == 204


async def test_expiry_revocation_and_deletion_end_sessions(site: Site) -> None:
    expired = await site.login("operator")
    revoked = await site.login("admin")
    deleted = await site.login("worker")
    await site.pool.execute(
        "UPDATE web_sessions SET expires_at = now() - interval '1 second' WHERE id_hash = $1",
        hashlib.sha256(expired.encode()).hexdigest(),
    )
    response = await site.client.get("/api/me", headers=cookie(expired))
    assert response.status_code == 401
    assert response.json() == {"error": "session expired or signed out"}
    page = await site.client.get("/", headers=cookie(expired))
    assert (page.status_code, page.headers["location"]) == (303, "/login")
    form = await site.client.get("/login", headers=cookie(expired))
    assert form.status_code == 200
    assert "max-age=0" in form.headers["set-cookie"].lower()  # the stale cookie is dropped
    site.client.cookies.clear()
    admin_hash = hashlib.sha256(site.tokens["admin"].encode()).hexdigest()
    await site.pool.execute(
        "UPDATE api_tokens SET revoked_at = now() WHERE token_hash = $1", admin_hash
    )
    assert (await site.client.get("/api/me", headers=cookie(revoked))).status_code == 401
    # Deleting the token (here: with its worker) deletes its sessions.
    assert await site.pool.fetchval("SELECT count(*) FROM web_sessions") == 3
    await site.pool.execute("DELETE FROM worker_cells WHERE worker_id = 'w1'")
    await site.pool.execute("DELETE FROM workers WHERE id = 'w1'")
    assert (await site.client.get("/api/me", headers=cookie(deleted))).status_code == 401
    assert await site.pool.fetchval("SELECT count(*) FROM web_sessions") == 2
    # The next login sweeps expired sessions away.
    await site.login("operator")
    stale = await site.pool.fetchval("SELECT count(*) FROM web_sessions WHERE expires_at <= now()")
    assert stale == 0


async def test_last_seen_is_touched_at_most_once_a_minute(site: Site) -> None:
    session_id = await site.login("operator")
    id_hash = hashlib.sha256(session_id.encode()).hexdigest()
    await site.pool.execute(
        "UPDATE web_sessions SET last_seen = now() - interval '10 minutes' WHERE id_hash = $1",
        id_hash,
    )
    await site.client.get("/api/me", headers=cookie(session_id))
    first = await site.pool.fetchval(
        "SELECT last_seen FROM web_sessions WHERE id_hash = $1", id_hash
    )
    assert datetime.now(UTC) - first < timedelta(seconds=30)
    await site.client.get("/api/me", headers=cookie(session_id))
    second = await site.pool.fetchval(
        "SELECT last_seen FROM web_sessions WHERE id_hash = $1", id_hash
    )
    assert second == first


# -- failed logins


async def test_more_than_ten_failures_from_one_address_are_429(site: Site) -> None:
    for _ in range(10):
        response = await site.client.post("/login", data={"token": "gw_wrong"})
        assert response.status_code == 401
    # The 11th attempt is refused before the token is looked at, even a good one.
    limited = await site.client.post("/login", data={"token": site.tokens["operator"]})
    assert limited.status_code == 429
    retry_after = int(limited.headers["retry-after"])
    assert 1 <= retry_after <= 300
    assert "too many failed logins" in limited.json()["error"]
    assert SESSION_COOKIE not in limited.headers.get("set-cookie", "")
    # Another address is not affected; this one is refused bearer requests too (one limit).
    transport = httpx.ASGITransport(app=site.app, client=("203.0.113.9", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw.test") as other:
        ok = await other.post("/login", data={"token": site.tokens["operator"]})
        assert ok.status_code == 303
    bearer = {"Authorization": f"Bearer {site.tokens['operator']}"}
    assert (await site.client.get("/api/me", headers=bearer)).status_code == 429


async def test_failed_bearer_tokens_are_limited_like_logins(site: Site) -> None:
    for token in ["gw_wrong"] * 9 + [site.tokens["revoked"]]:
        response = await site.client.get("/api/me", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401
    # The 11th is refused before the token is looked at, even a good one; logins as well.
    good = {"Authorization": f"Bearer {site.tokens['operator']}"}
    limited = await site.client.get("/api/alarms", headers=good)
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["retry-after"]) <= 300
    assert "too many failed authentications" in limited.json()["error"]
    login = await site.client.post("/login", data={"token": site.tokens["operator"]})
    assert login.status_code == 429
    # A session cookie of the same address is not a guess and is not refused.
    other_transport = httpx.ASGITransport(app=site.app, client=("203.0.113.9", 50000))
    async with httpx.AsyncClient(transport=other_transport, base_url="http://gw.test") as other:
        assert (await other.get("/api/me", headers=good)).status_code == 200
        session_id = (await other.post("/login", data={"token": site.tokens["operator"]})
                      ).cookies[SESSION_COOKIE]  # fmt: skip
    assert (await site.client.get("/api/me", headers=cookie(session_id))).status_code == 200


# -- size limits


async def test_request_bodies_over_the_limit_are_413(site: Site, database_url: str) -> None:
    small = build_app(site.pool, site.feed, dataclasses.replace(WEB, max_body_bytes=2048))
    transport = httpx.ASGITransport(app=small, client=("198.51.100.8", 40000))
    headers = {"Authorization": f"Bearer {site.tokens['operator']}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://gw.test") as client:
        report = {"lat": 39.9, "lon": 116.05, "category": "road", "description": "x" * 1500}
        # Declared too large: refused before the body is read, on any route.
        big = {**report, "description": "坑" * 1500}  # 4.5 KB as UTF-8
        response = await client.post("/api/reports", json=big, headers=headers)
        assert response.status_code == 413
        assert response.json() == {"error": "the request body is over the limit of 2048 bytes"}
        get = await client.request("GET", "/api/me", content=b"x" * 4096, headers=headers)
        assert get.status_code == 413
        # Streamed without a Content-Length: cut off when the bytes pass the limit.

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(10):
                yield b" " * 1024

        streamed = await client.post("/api/cases/1/resolve", content=chunks(), headers=headers)
        assert streamed.status_code == 413
        assert streamed.json()["error"].startswith("the request body is over the limit")
        # Under the limit: served (the model's own limits still apply).
        assert (await client.post("/api/reports", json=report, headers=headers)).status_code == 201
        assert (await client.get("/api/alarms?limit=1001", headers=headers)).status_code == 422
        long_query = await client.get("/api/alarms?device=" + "x" * 9000, headers=headers)
        assert long_query.status_code == 414
    too_long = {**report, "description": "x" * 2001}
    refused = await site.client.post("/api/reports", json=too_long, headers=headers)
    assert refused.status_code == 422
    assert "description" in str(refused.json()["problems"])
    assert WebConfig().max_body_bytes == Settings().http_max_body_bytes == 64 * 1024


def test_login_limiter_window_and_addresses() -> None:
    now = [1000.0]
    limiter = LoginLimiter(3, 60, monotonic=lambda: now[0], max_clients=4)
    for _ in range(3):
        assert limiter.retry_after("10.0.0.1") is None
        limiter.failed("10.0.0.1")
    assert limiter.retry_after("10.0.0.1") == 60
    now[0] += 45
    assert limiter.retry_after("10.0.0.1") == 15
    now[0] += 15
    assert limiter.retry_after("10.0.0.1") is None  # the oldest failure left the window
    # IPv6 addresses of one /64 count together; IPv4-mapped addresses as IPv4.
    for host in ("2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::9"):
        limiter.failed(host)
    assert limiter.retry_after("2001:db8:1:2::77") is not None
    assert limiter.retry_after("2001:db8:1:3::1") is None
    assert LoginLimiter.key("::ffff:10.0.0.1") == "10.0.0.1"
    # Memory stays bounded: the stalest addresses are forgotten first.
    for index in range(10):
        now[0] += 1
        limiter.failed(f"192.0.2.{index}")
    assert len(limiter._failures) <= 4
    assert limiter.retry_after("192.0.2.9") is None  # one failure of three


# -- pages


async def test_pages_redirect_and_serve(site: Site) -> None:
    for path in ("/", "/worker"):
        response = await site.client.get(path)
        assert (response.status_code, response.headers["location"]) == (303, "/login"), path
    operator = await site.login("operator")
    worker = await site.login("worker")
    console = await site.client.get("/", headers=cookie(operator))
    assert console.status_code == 200
    assert console.headers["content-type"].startswith("text/html")
    assert "<html" in console.text.lower()
    assert console.headers["x-frame-options"] == "DENY"
    assert "default-src 'self'" in console.headers["content-security-policy"]
    assert (await site.client.get("/worker", headers=cookie(operator))).status_code == 200
    sent_on = await site.client.get("/", headers=cookie(worker))
    assert (sent_on.status_code, sent_on.headers["location"]) == (303, "/worker")
    phone = await site.client.get("/worker", headers=cookie(worker))
    assert phone.status_code == 200
    assert "<html" in phone.text.lower()
    # A signed-in browser opening /login goes home (or to next).
    again = await site.client.get("/login", headers=cookie(worker))
    assert (again.status_code, again.headers["location"]) == (303, "/worker")
    onward = await site.client.get("/login?next=/worker", headers=cookie(operator))
    assert onward.headers["location"] == "/worker"
    # Bearer works for pages too (curl, tests).
    bearer = {"Authorization": f"Bearer {site.tokens['operator']}"}
    assert (await site.client.get("/", headers=bearer)).status_code == 200
    # Static files: public, and a missing one is a 404, not an error.
    assert (await site.client.get("/static/no-such-file.js")).status_code == 404


# -- the SSE feed with the cookie, through a real HTTP server


async def test_the_cookie_opens_the_alarm_stream(site: Site) -> None:
    sock = bind_http("127.0.0.1", 0)
    host, port = sock.getsockname()[:2]
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(site.feed.run(stop), name="alarm-feed"),
        asyncio.create_task(http_task(site.app, sock)(stop), name="http"),
    ]
    alarm = await insert_alarm(site.pool)
    try:
        async with asyncio.timeout(WAIT_S):
            await site.feed.listening.wait()
        async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=WAIT_S) as browser:
            # Like a browser: the cookie jar keeps what /login set and sends it back.
            login = await browser.post("/login", data={"token": site.tokens["operator"]})
            assert (login.status_code, login.headers["location"]) == (303, "/")
            assert SESSION_COOKIE in browser.cookies
            assert (await browser.get("/")).status_code == 200
            async with browser.stream("GET", "/api/alarms/stream") as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                events = EventReader(response)
                assert await events.next_block() == [": connected"]
                acked = await browser.post(f"/api/alarms/{alarm}/ack", headers=CSRF)
                assert acked.status_code == 200
                _, changed = await events.next_alarm()
                assert (changed["id"], changed["state"]) == (alarm, "acknowledged")
            # Without the cookie the stream is refused.
            browser.cookies.clear()
            assert (await browser.get("/api/alarms/stream")).status_code == 401
    finally:
        stop.set()
        async with asyncio.timeout(WAIT_S):
            await asyncio.gather(*tasks)
        sock.close()
