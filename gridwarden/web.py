"""The HTTP application: health, readiness, metrics, authentication; the packages
add their routers (`ingest.api`, later rules and alerting)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import asyncpg
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from gridwarden import __version__
from gridwarden.auth import Principal, Role, principal_for

ReadinessCheck = Callable[[], Awaitable[str | None]]  # None when fine, else the problem


@dataclass
class AppState:
    pool: asyncpg.Pool
    readiness: dict[str, ReadinessCheck] = field(default_factory=dict)


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.gridwarden
    return state


async def current_principal(
    request: Request, state: Annotated[AppState, Depends(get_state)]
) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
    principal = await principal_for(state.pool, token.strip())
    if principal is None:
        raise HTTPException(401, "invalid or revoked token", headers={"WWW-Authenticate": "Bearer"})
    return principal


def require_role(*roles: Role) -> Callable[..., Awaitable[Principal]]:
    async def check(principal: Annotated[Principal, Depends(current_principal)]) -> Principal:
        if principal.role not in roles:
            raise HTTPException(403, f"this needs one of the roles {', '.join(roles)}")
        return principal

    return check


def create_app(state: AppState, routers: list[Any] | None = None) -> FastAPI:
    app = FastAPI(title="gridwarden", version=__version__)
    app.state.gridwarden = state

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

    for router in routers or []:
        app.include_router(router)
    return app
