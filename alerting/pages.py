"""The web consoles' pages: `GET /` (the operator console), `GET /worker` (the phone view)
and `/static/...` (their scripts, styles and images, from `alerting/web/static/`).

A page needs a signed-in browser (the `gw_session` cookie from `POST /login`, or a bearer
token): otherwise 303 to `/login`. A worker opening the console is sent to `/worker`. The
pages load their data from the API with the cookie (`/api/me`, `/api/config`,
`/api/cells`, the SSE feed). Static files are public: they hold no data.

The HTML is read from disk on each request (FileResponse: ETag and Last-Modified, so the
browser revalidates cheaply), which lets the pages be edited without a restart.

Wiring (service.py):

    app = create_app(state, routers=[...])
    attach_pages(app)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, HTTPException
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from gridwarden.auth import Principal
from gridwarden.web import home_path, optional_principal

WEB_DIR = Path(__file__).resolve().parent / "web"
STATIC_DIR = WEB_DIR / "static"
OPERATOR_PAGE = "operator.html"
WORKER_PAGE = "worker.html"
PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    # Nothing leaves the machine: every script, style and image is served from here.
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
}
TO_LOGIN: dict[int | str, dict[str, Any]] = {303: {"description": "not signed in: to /login"}}

router = APIRouter(tags=["pages"])
Visitor = Annotated[Principal | None, Depends(optional_principal)]


def _page(name: str) -> FileResponse:
    path = WEB_DIR / name
    if not path.is_file():
        raise HTTPException(503, f"the page {name} is not installed")
    return FileResponse(path, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@router.get(
    "/",
    response_class=HTMLResponse,
    responses={**TO_LOGIN, 200: {"description": "the operator console"}},
)
async def operator_console(visitor: Visitor) -> Response:
    """The operator console (operators and admins; a worker is sent to /worker)."""
    if visitor is None:
        return RedirectResponse("/login", status_code=303)
    if visitor.role == "worker":
        return RedirectResponse(home_path(visitor), status_code=303)
    return _page(OPERATOR_PAGE)


@router.get(
    "/worker",
    response_class=HTMLResponse,
    responses={**TO_LOGIN, 200: {"description": "the worker's phone view"}},
)
async def worker_view(visitor: Visitor) -> Response:
    """The worker's phone view (operators may open it too)."""
    if visitor is None:
        return RedirectResponse("/login", status_code=303)
    return _page(WORKER_PAGE)


class _StaticFiles(StaticFiles):
    """StaticFiles that answers 404 (rather than 500) while the folder does not exist."""

    async def check_config(self) -> None:
        if self.directory is not None and await anyio.to_thread.run_sync(
            os.path.exists, self.directory
        ):
            await super().check_config()


def attach_pages(app: FastAPI) -> None:
    """Add the page routes and mount `/static`."""
    app.include_router(router)
    app.mount("/static", _StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
