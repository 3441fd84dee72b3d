"""The HTTP application: health, readiness, metrics, authentication and browser sessions;
the packages add their routers (`ingest.api`, `alerting.*_api`, `alerting.pages`).

Authentication (CONTRACT §5): `Authorization: Bearer <token>`, or the `gw_session`
cookie that `POST /login` hands out in exchange for a token (a browser's EventSource
cannot send headers; the cookie is what makes the SSE feed work in a page). Requests that
change state (any method but GET, HEAD, OPTIONS) authenticated by the cookie must carry
`X-Requested-With: gridwarden`: a cross-site form cannot set that header, so on top of
`SameSite=Strict` a forged request gets 403. Bearer requests are exempt (a browser never
adds an Authorization header by itself).

Abuse limits: failed logins and failed bearer tokens count together per client address
(`LoginLimiter`): past `login_max_failures` within `login_window_s`, both are refused
with 429 and Retry-After before the token is looked at, even a good one. A request body
over `http_max_body_bytes` is refused with 413 (`SizeLimits`), by its Content-Length
before it is read, else as soon as the bytes received pass the limit; a query string over
8 KiB with 414. String fields of the bodies have maximum lengths in their models.
"""

from __future__ import annotations

import html
import ipaddress
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import parse_qs, urlsplit

import asyncpg
import orjson
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gridwarden import __version__, audit
from gridwarden.auth import (
    Principal,
    Role,
    create_session,
    delete_session,
    principal_for,
    principal_for_session,
)
from gridwarden.db import query

if TYPE_CHECKING:
    from gridwarden.config import Settings

ReadinessCheck = Callable[[], Awaitable[str | None]]  # None when fine, else the problem

SESSION_COOKIE = "gw_session"
CSRF_HEADER = "X-Requested-With"
CSRF_VALUE = "gridwarden"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOGIN_BODY_MAX = 4096  # bytes; a token is 46 characters
MAX_QUERY_BYTES = 8192  # a query string: filters, a cursor, `next` (at most 2,000 characters)
MAX_TRACKED_CLIENTS = 10_000  # addresses with recent failed logins kept in memory at most

LOGINS = Counter("gridwarden_web_logins_total", "Logins at POST /login", ["outcome"])
BEARER_FAILURES = Counter(
    "gridwarden_web_bearer_failures_total",
    "Requests with a bad bearer token: failed (401) or limited (429)",
    ["outcome"],
)


# -- configuration and state


@dataclass(frozen=True)
class WebConfig:
    """What the web layer needs from the settings (defaults: those of `Settings`)."""

    timezone: str = "Asia/Shanghai"
    topic_prefix: str = "gw"
    session_ttl_s: int = 12 * 3600
    login_max_failures: int = 10
    login_window_s: int = 300
    max_body_bytes: int = 64 * 1024

    @classmethod
    def from_settings(cls, settings: Settings) -> WebConfig:
        return cls(
            timezone=settings.timezone,
            topic_prefix=settings.topic_prefix,
            session_ttl_s=settings.session_ttl_s,
            login_max_failures=settings.login_max_failures,
            login_window_s=settings.login_window_s,
            max_body_bytes=settings.http_max_body_bytes,
        )


class LoginLimiter:
    """Failed logins per client address within a sliding window, **in memory**: a restart
    forgets them and several instances behind a load balancer count separately. That is
    enough for its purpose: tokens are 256-bit random and cannot be guessed, so this only
    stops a client from hammering the database with attempts. IPv6 clients are counted per
    /64 (one subscriber's prefix), or a single host could rotate through addresses.

    The address is the one uvicorn reports, which honours X-Forwarded-For only from its
    `forwarded_allow_ips` (default 127.0.0.1, a reverse proxy on the same machine)."""

    def __init__(
        self,
        max_failures: int,
        window_s: float,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        max_clients: int = MAX_TRACKED_CLIENTS,
    ) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._now = monotonic
        self._max_clients = max_clients
        self._failures: dict[str, deque[float]] = {}

    @staticmethod
    def key(address: str) -> str:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return address
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            return str(ipaddress.IPv6Network((ip, 64), strict=False))
        return str(ip)

    def _recent(self, key: str, now: float) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def retry_after(self, address: str) -> int | None:
        """Seconds until this client may try again, or None when it may now."""
        now = self._now()
        times = self._recent(self.key(address), now)
        if times is None or len(times) < self.max_failures:
            return None
        return max(1, math.ceil(times[0] + self.window_s - now))

    def failed(self, address: str) -> None:
        now = self._now()
        key = self.key(address)
        times = self._recent(key, now)
        if times is None:
            times = self._failures[key] = deque()
        times.append(now)
        while len(times) > self.max_failures:
            times.popleft()
        if len(self._failures) > self._max_clients:
            self._prune(now)

    def _prune(self, now: float) -> None:
        for key in list(self._failures):
            self._recent(key, now)
        if len(self._failures) > self._max_clients:  # still too many: forget the stalest
            by_last = sorted(self._failures, key=lambda k: self._failures[k][-1])
            for key in by_last[: len(self._failures) - self._max_clients]:
                del self._failures[key]


@dataclass
class AppState:
    pool: asyncpg.Pool
    readiness: dict[str, ReadinessCheck] = field(default_factory=dict)
    web: WebConfig = field(default_factory=WebConfig)
    login_limiter: LoginLimiter = field(init=False)

    def __post_init__(self) -> None:
        self.login_limiter = LoginLimiter(self.web.login_max_failures, self.web.login_window_s)


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.gridwarden
    return state


State = Annotated[AppState, Depends(get_state)]


# -- authentication

AuthMethod = Literal["bearer", "session"]


async def _authenticate(request: Request, state: AppState) -> Principal | str:
    """The caller's principal, or why there is none (for the 401). Records the method in
    `request.state.auth`."""
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "missing bearer token"
        address = _client_address(request)
        _refuse_if_limited(state, address, BEARER_FAILURES, "failed authentications")
        principal = await principal_for(state.pool, token.strip())
        if principal is None:
            state.login_limiter.failed(address)
            BEARER_FAILURES.labels("failed").inc()
            return "invalid or revoked token"
        request.state.auth = "bearer"
        return principal
    session_id = request.cookies.get(SESSION_COOKIE)
    if not session_id:
        return "missing bearer token"
    principal = await principal_for_session(state.pool, session_id)
    if principal is None:
        return "session expired or signed out"
    request.state.auth = "session"
    return principal


async def current_principal(request: Request, state: State) -> Principal:
    found = await _authenticate(request, state)
    if isinstance(found, str):
        raise HTTPException(401, found, headers={"WWW-Authenticate": "Bearer"})
    if (
        request.state.auth == "session"
        and request.method not in SAFE_METHODS
        and request.headers.get(CSRF_HEADER) != CSRF_VALUE
    ):
        raise HTTPException(
            403, f"a request signed in by cookie must send the header {CSRF_HEADER}: {CSRF_VALUE}"
        )
    return found


async def optional_principal(request: Request, state: State) -> Principal | None:
    """The caller, or None when not signed in (pages redirect to /login instead of 401)."""
    found = await _authenticate(request, state)
    return None if isinstance(found, str) else found


def require_role(*roles: Role) -> Callable[..., Awaitable[Principal]]:
    async def check(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
        if principal.role not in roles:
            raise HTTPException(403, f"this needs one of the roles {', '.join(roles)}")
        return principal

    return check


Anyone = Annotated[Principal, Depends(current_principal)]


def home_path(principal: Principal) -> str:
    """Where a signed-in browser belongs: the phone view for workers, else the console."""
    return "/worker" if principal.role == "worker" else "/"


def safe_next(target: str | None) -> str | None:
    """`next` after login when it is a path on this site (never `//host` or a scheme:
    no open redirect), else None."""
    if not target or len(target) > 2000 or not target.startswith("/"):
        return None
    if target.startswith(("//", "/\\")) or any(
        ord(ch) < 0x20 or ord(ch) == 0x7F or ch == "\\" for ch in target
    ):
        return None
    return target


# -- login page, login, logout

_LOGIN_PAGE = """<!doctype html>
<html lang="zh-CN">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>登录 Sign in · gridwarden</title>
<style>
  :root { color-scheme: light dark; font-family: system-ui, -apple-system, "PingFang SC",
          "Microsoft YaHei", "Noto Sans CJK SC", sans-serif; }
  body { margin: 0; min-height: 100vh; display: grid; place-items: center;
         background: Canvas; color: CanvasText; }
  main { width: min(22rem, 92vw); padding: 1.5rem; border: 1px solid GrayText;
         border-radius: .5rem; }
  h1 { font-size: 1.25rem; margin: 0 0 1rem; }
  h1 small { font-weight: normal; color: GrayText; }
  label { display: block; margin-bottom: .35rem; }
  input { box-sizing: border-box; width: 100%; padding: .6rem; font: inherit;
          font-family: ui-monospace, monospace; }
  button { margin-top: 1rem; width: 100%; padding: .6rem; font: inherit; cursor: pointer; }
  .error { color: #c62828; margin: 0 0 1rem; }
  .hint { color: GrayText; font-size: .85rem; margin-top: 1rem; }
</style>
</head>
<body>
<main>
  <h1>gridwarden <small>网格化治理</small></h1>
  __ERROR__
  <form method="post" action="/login">
    __NEXT__
    <label for="token">令牌 / Token</label>
    <input id="token" name="token" type="password" autocomplete="current-password"
           required autofocus spellcheck="false" placeholder="gw_…">
    <button type="submit">登录 / Sign in</button>
  </form>
  <p class="hint">使用管理员发放的 API 令牌登录。<br>Sign in with the API token you were given.</p>
</main>
</body>
</html>
"""
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def login_page(
    error: str | None = None, status_code: int = 200, next_path: str | None = None
) -> HTMLResponse:
    block = f'<p class="error" role="alert">{html.escape(error)}</p>' if error else ""
    hidden = (
        f'<input type="hidden" name="next" value="{html.escape(next_path, quote=True)}">'
        if next_path
        else ""
    )
    page = _LOGIN_PAGE.replace("__ERROR__", block).replace("__NEXT__", hidden)
    return HTMLResponse(page, status_code=status_code, headers=_PAGE_HEADERS)


def _client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _refuse_if_limited(state: AppState, address: str, counter: Counter, what: str) -> None:
    """429 when this address has too many failed logins or bearer tokens (counted together)."""
    retry_after = state.login_limiter.retry_after(address)
    if retry_after is not None:
        counter.labels("limited").inc()
        raise HTTPException(
            429,
            f"too many {what}; try again in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )


def _check_origin(request: Request) -> None:
    """A login posted from another site's page (login CSRF) is refused: the browser's
    Origin header, when sent, must name this host."""
    origin = request.headers.get("origin")
    if origin is None:  # not a browser, or an old one: nothing to check
        return
    hosts = {request.headers.get(name, "").lower() for name in ("host", "x-forwarded-host")}
    if urlsplit(origin).netloc.lower() not in hosts - {""}:
        raise HTTPException(403, "login from another site's page refused")


async def _login_fields(request: Request) -> tuple[str | None, str | None, bool]:
    """(the token submitted or None, `next` or None, whether the client speaks JSON)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    as_json = content_type == "application/json" or content_type.endswith("+json")
    if not as_json and content_type not in ("application/x-www-form-urlencoded", ""):
        raise HTTPException(
            415, "send the token as a form field (application/x-www-form-urlencoded) or JSON"
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > LOGIN_BODY_MAX:
            raise HTTPException(413, f"a login body is at most {LOGIN_BODY_MAX} bytes")
    if as_json:
        try:
            data = orjson.loads(bytes(body)) if body.strip() else {}
        except orjson.JSONDecodeError:
            raise HTTPException(422, "the body must be a JSON object with a token") from None
        if not isinstance(data, dict):
            raise HTTPException(422, "the body must be a JSON object with a token")
        token, next_path = data.get("token"), data.get("next")
        if token is not None and not isinstance(token, str):
            raise HTTPException(422, "token: must be a string")
        return token, next_path if isinstance(next_path, str) else None, True
    try:
        fields = parse_qs(body.decode("utf-8", errors="replace"), max_num_fields=20)
    except ValueError:  # more fields than that
        raise HTTPException(422, "too many form fields") from None
    tokens, nexts = fields.get("token"), fields.get("next")
    return (tokens[0] if tokens else None), (nexts[0] if nexts else None), False


_LOGIN_BODY_SCHEMA = {
    "type": "object",
    "properties": {
        "token": {"type": "string", "description": "an API token (gw_…)"},
        "next": {"type": "string", "description": "a path on this site to go to after"},
    },
    "required": ["token"],
}


def _session_router() -> APIRouter:
    router = APIRouter(tags=["web"])

    @router.get(
        "/login",
        response_class=HTMLResponse,
        responses={303: {"description": "already signed in: to the console or /worker"}},
    )
    async def login_form(
        request: Request,
        state: State,
        next_path: Annotated[
            str | None, Query(alias="next", description="a path to go to after signing in")
        ] = None,
    ) -> Response:
        """The sign-in page (令牌 / Token, 登录 / Sign in): self-contained, no scripts."""
        target = safe_next(next_path)
        principal = await optional_principal(request, state)
        if principal is not None:
            return RedirectResponse(target or home_path(principal), status_code=303)
        page = login_page(next_path=target)
        if SESSION_COOKIE in request.cookies:  # expired or signed out elsewhere: forget it
            page.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return page

    @router.post(
        "/login",
        response_class=HTMLResponse,
        status_code=303,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/x-www-form-urlencoded": {"schema": _LOGIN_BODY_SCHEMA},
                    "application/json": {"schema": _LOGIN_BODY_SCHEMA},
                },
            }
        },
        responses={
            200: {"description": "JSON login: the session is set; `next` is where to go"},
            303: {"description": "form login: the session cookie is set; to / or /worker"},
            401: {"description": "no such token (the form again, or a JSON error)"},
            403: {"description": "posted from another site's page"},
            429: {"description": "too many failed logins from this address; see Retry-After"},
        },
    )
    async def login(request: Request, state: State) -> Response:
        """Exchange an API token for a session cookie `gw_session` (HttpOnly,
        SameSite=Strict, Secure over https, Path=/). A form post is redirected (303) to
        `next` (a path on this site) or else `/` (operators, admins) or `/worker`
        (workers); a JSON post gets `{"role", "worker_id", "next", "expires_at"}`."""
        address = _client_address(request)
        _refuse_if_limited(state, address, LOGINS, "failed logins")
        _check_origin(request)
        token, next_path, as_json = await _login_fields(request)
        next_path = safe_next(next_path or request.query_params.get("next"))
        token = (token or "").strip()
        if not token:
            if as_json:
                raise HTTPException(422, "token: required")
            return login_page("请输入令牌。Enter a token.", 400, next_path)
        principal = await principal_for(state.pool, token)
        method = "json" if as_json else "form"
        if principal is None:
            state.login_limiter.failed(address)
            LOGINS.labels("failed").inc()
            async with state.pool.acquire() as conn:  # never the token, not even its hash
                await audit.record(
                    conn, actor=audit.ANONYMOUS_ACTOR, action="auth.login_failed",
                    target_type="session", target_id=None, address=audit.client_address(request),
                    detail={"method": method, "reason": "invalid or revoked token"},
                )  # fmt: skip
            if as_json:
                raise HTTPException(401, "invalid or revoked token")
            return login_page("令牌无效或已吊销。Invalid or revoked token.", 401, next_path)
        async with state.pool.acquire() as conn, conn.transaction():
            session = await create_session(conn, principal, state.web.session_ttl_s)
            await audit.record(
                conn, actor=audit.actor_of(principal), action="auth.login",
                target_type="api_token", target_id=str(principal.token_id),
                address=audit.client_address(request),
                detail={"method": method, "role": principal.role},
            )  # fmt: skip
        LOGINS.labels("ok").inc()
        target = next_path or home_path(principal)
        response: Response
        if as_json:
            response = JSONResponse({
                "role": principal.role,
                "worker_id": principal.worker_id,
                "next": target,
                "expires_at": session.expires_at.isoformat().replace("+00:00", "Z"),
            })  # fmt: skip
        else:
            response = RedirectResponse(target, status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            session.session_id,
            max_age=state.web.session_ttl_s,
            path="/",
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        response.headers["Cache-Control"] = "no-store"
        return response

    @router.post(
        "/logout",
        status_code=204,
        response_class=Response,
        responses={403: {"description": "cookie request without X-Requested-With"}},
    )
    async def logout(request: Request, state: State) -> Response:
        """End the browser session (its row is deleted) and clear the cookie. Needs
        `X-Requested-With: gridwarden` when a session cookie is sent."""
        session_id = request.cookies.get(SESSION_COOKIE)
        if session_id and request.headers.get(CSRF_HEADER) != CSRF_VALUE:
            raise HTTPException(403, f"logout needs the header {CSRF_HEADER}: {CSRF_VALUE}")
        if session_id:
            async with state.pool.acquire() as conn, conn.transaction():
                principal = await principal_for_session(conn, session_id)
                await delete_session(conn, session_id)
                if principal is not None:  # a live session ended (not a stale cookie)
                    await audit.record(
                        conn, actor=audit.actor_of(principal), action="auth.logout",
                        target_type="api_token", target_id=str(principal.token_id),
                        address=audit.client_address(request),
                    )  # fmt: skip
        response = Response(status_code=204)
        response.delete_cookie(
            SESSION_COOKIE,
            path="/",
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return response

    @router.get("/api/me")
    async def me(principal: Anyone, request: Request, state: State) -> dict[str, Any]:
        """Who the caller is: role, how they signed in, and for a worker token the
        worker (name, role, on duty, cells)."""
        row = await state.pool.fetchrow(query("web_me"), principal.token_id)
        worker = None
        if row is not None and row["worker_id"] is not None:
            worker = {
                "id": row["worker_id"],
                "name": row["worker_name"],
                "role": row["worker_role"],
                "on_duty": row["on_duty"],
                "cells": list(row["cells"]),
            }
        return {
            "role": principal.role,
            "token_id": principal.token_id,
            "label": row["label"] if row is not None else "",
            "auth": request.state.auth,
            "worker_id": principal.worker_id,
            "worker": worker,
        }

    @router.get("/api/config")
    async def config(_: Anyone, state: State) -> dict[str, Any]:
        """What the pages need to display: the city's time zone (API times are UTC), the
        MQTT topic prefix, the session lifetime and the version."""
        return {
            "timezone": state.web.timezone,
            "topic_prefix": state.web.topic_prefix,
            "session_ttl_s": state.web.session_ttl_s,
            "version": __version__,
        }

    return router


# -- the application


class BodyTooLarge(HTTPException):
    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"the request body is over the limit of {max_bytes} bytes")


class SizeLimits:
    """ASGI middleware: a request body over `max_bytes` gets 413 with a JSON error (a
    query string over `MAX_QUERY_BYTES`: 414). A
    Content-Length over the limit is refused before the body is read; a body without one
    (chunked) or longer than it said is cut off when the bytes received pass the limit.
    Raised inside a route's body read, `BodyTooLarge` is an HTTPException that FastAPI
    hands to the app's handler; anywhere else it is answered here."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if len(scope.get("query_string", b"")) > MAX_QUERY_BYTES:
            await _send_error(send, HTTPException(414, f"query over {MAX_QUERY_BYTES} bytes"))
            return
        limit = self.max_bytes
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _send_error(send, BodyTooLarge(limit))
                return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:
            if started:
                raise
            await _send_error(send, exc)


async def _send_error(send: Send, exc: HTTPException) -> None:
    body = orjson.dumps({"error": exc.detail})
    await send({
        "type": "http.response.start",
        "status": exc.status_code,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close")],
    })  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def create_app(state: AppState, routers: list[Any] | None = None) -> FastAPI:
    app = FastAPI(title="gridwarden", version=__version__)
    app.state.gridwarden = state
    app.add_middleware(SizeLimits, max_bytes=state.web.max_body_bytes)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return JSONResponse({"error": "bad request", "problems": problems}, status_code=422)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> JSONResponse:
        problems: dict[str, str] = {}
        for name, check in state.readiness.items():
            problem = await check()
            if problem is not None:
                problems[name] = problem
        if problems:
            return JSONResponse({"status": "unavailable", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["ops"])
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    from gridwarden.audit_api import router as audit_router  # it depends on this module

    app.include_router(_session_router())
    app.include_router(audit_router)
    for router in routers or []:
        app.include_router(router)
    return app
