"""The OpenAPI document describes every endpoint of CONTRACT §5 and the web consoles', and
schemathesis, generating requests from it (valid and invalid), gets no 5xx from the app."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import asyncpg
import hypothesis
import pytest
from fastapi import FastAPI

from alerting.alarms_api import AlarmFeed, attach_alarms
from alerting.alarms_api import router as alarms_router
from alerting.cases_api import attach_cases
from alerting.cases_api import router as cases_router
from alerting.cells_api import router as cells_router
from alerting.pages import attach_pages
from gridwarden.auth import create_token
from gridwarden.clock import SystemClock
from gridwarden.config import Settings
from gridwarden.db import create_pool
from gridwarden.web import AppState, create_app
from ingest.api import router as ingest_router
from tests.test_cases_api import insert_cell

PREFIX = "gwt"
CONTRACT = Path(__file__).resolve().parents[2] / "shared" / "CONTRACT.md"
# CONTRACT §5, as (method, path) with the path parameters unnamed.
CONTRACT_ENDPOINTS = {
    ("GET", "/api/alarms"),
    ("POST", "/api/alarms/{}/ack"),
    ("GET", "/api/alarms/stream"),
    ("GET", "/api/cases"),
    ("GET", "/api/cases/{}"),
    ("POST", "/api/cases/{}/{}"),
    ("POST", "/api/reports"),
    ("GET", "/api/cells"),
    ("GET", "/api/stats"),
    ("GET", "/api/devices"),
    ("GET", "/api/devices/{}"),
    ("GET", "/api/devices/{}/telemetry"),
    ("GET", "/api/dead-letters"),
    ("GET", "/metrics"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
}
WEB_ENDPOINTS = {
    ("GET", "/login"),
    ("POST", "/login"),
    ("POST", "/logout"),
    ("GET", "/api/me"),
    ("GET", "/api/config"),
    ("GET", "/api/audit"),
    ("GET", "/"),
    ("GET", "/worker"),
}


def full_app(state: AppState) -> FastAPI:
    """The application as `gridwarden up` wires it (service.run_service)."""
    app = create_app(state, routers=[ingest_router, alarms_router, cases_router, cells_router])
    attach_pages(app)
    attach_cases(app, settings=Settings(topic_prefix=PREFIX), clock=SystemClock())
    return app


def unnamed(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "{}", path)


def documented(app: FastAPI) -> set[tuple[str, str]]:
    paths: dict[str, dict[str, Any]] = app.openapi()["paths"]  # what /openapi.json serves
    return {(method.upper(), unnamed(path)) for path, ops in paths.items() for method in ops}


def test_every_contract_and_web_endpoint_is_documented() -> None:
    found = documented(full_app(AppState(cast(asyncpg.Pool, None))))
    assert CONTRACT_ENDPOINTS - found == set()
    assert WEB_ENDPOINTS - found == set()


@pytest.mark.skipif(not CONTRACT.is_file(), reason="CONTRACT.md is not next to the repository")
def test_the_list_above_is_contract_section_5() -> None:
    text = CONTRACT.read_text("utf-8")
    section = text.split("## 5.", 1)[1].split("\n## ", 1)[0]
    listed = {
        (method, unnamed(path))
        for method, path in re.findall(r"`?(GET|POST|PUT|PATCH|DELETE) (/[^\s`?|]*)", section)
    }
    assert listed == CONTRACT_ENDPOINTS


def test_every_route_is_in_the_document() -> None:
    """Nothing served is left out of the document (but /static, a mount, and the
    document's own routes)."""
    app = full_app(AppState(cast(asyncpg.Pool, None)))
    served = {
        (method, unnamed(route.path))
        for route in app.routes
        for method in getattr(route, "methods", None) or ()
        if method != "HEAD"
        and route.path not in ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc")
    }
    assert served - documented(app) == set()


# -- schemathesis


@pytest.fixture
async def seeded(database_url: str) -> tuple[str, str]:
    """A small grid, a worker and an alarm in the test's database; an operator token."""
    pool = await create_pool(database_url)
    try:
        await insert_cell(pool, "s1", "street", None, (116.0, 39.8, 116.4, 40.0))
        await insert_cell(pool, "g1", "grid", "s1", (116.0, 39.8, 116.4, 40.0))
        await pool.execute("INSERT INTO workers (id, name, role) VALUES ('w1', 'w', 'grid_worker')")
        await pool.execute("INSERT INTO worker_cells (worker_id, cell_id) VALUES ('w1', 'g1')")
        await pool.execute(
            "INSERT INTO alarms (source, device_id, kind, rule, severity, cell_id, first_seen, "
            "last_seen) VALUES ('d1', 'd1', 'smoke_detector', 'smoke.alarm', 'critical', 'g1', "
            "now(), now())"
        )
        token = await create_token(pool, "operator")
    finally:
        await pool.close()
    return database_url, token


def test_schemathesis_finds_no_server_errors(seeded: tuple[str, str]) -> None:
    """Every operation (but the endpless SSE stream) with valid and invalid requests, a
    bounded number of examples each, derandomized so a run is repeatable. The app runs on
    schemathesis's own event loop: its pool is opened by the app's lifespan there."""
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis.python.asgi import shutdown_lifespans

    database_url, token = seeded
    state = AppState(cast(asyncpg.Pool, None))
    app = full_app(state)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.pool = await create_pool(database_url)
        attach_alarms(app, feed=AlarmFeed(state.pool), topic_prefix=PREFIX)
        try:
            yield
        finally:
            await state.pool.close()

    app.router.lifespan_context = lifespan
    schema = schemathesis.openapi.from_asgi("/openapi.json", app).exclude(path="/api/alarms/stream")
    bearer = {"Authorization": f"Bearer {token}"}
    settings = hypothesis.settings(
        max_examples=12,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate, hypothesis.Phase.shrink],
    )
    operations = 0
    try:
        for result in schema.get_all_operations():
            operation = result.ok()
            operations += 1
            for mode in (
                schemathesis.GenerationMode.POSITIVE,
                schemathesis.GenerationMode.NEGATIVE,
            ):

                @settings
                @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
                def no_server_error(case: Any) -> None:
                    response = case.call(headers={**(case.headers or {}), **bearer})
                    assert response.status_code < 500, (
                        f"{case.method} {case.formatted_path} {case.query or ''} → "
                        f"{response.status_code}: {response.text[:500]}"
                    )

                try:
                    no_server_error()
                except hypothesis.errors.Unsatisfiable:
                    # Nothing to make invalid (no parameters, no body): only positive cases.
                    assert mode == schemathesis.GenerationMode.NEGATIVE
    finally:
        shutdown_lifespans()
    assert operations >= len(CONTRACT_ENDPOINTS | WEB_ENDPOINTS) - 1
