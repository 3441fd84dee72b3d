"""Helpers for the browser tests (tests/test_browser.py): headless Chromium through
Playwright, a running `gridwarden up` with the sample city, sign-in through /login.

The browser is Debian's `chromium` (`scripts/setup --dev` installs it, with
`fonts-wqy-microhei` for the Chinese labels); Playwright's own browser downloads are
never used. Every wait is bounded: Playwright's default timeouts are set on each context.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import pytest

from gridwarden.auth import create_token
from gridwarden.registry import import_devices, import_grid, import_workers
from gridwarden.sample_city import write_sample_city

try:
    from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Page, Playwright
except ImportError as error:  # pragma: no cover - a broken dev install
    raise ImportError(
        "the browser tests need Playwright: run scripts/setup --dev (installs the dev extras)"
    ) from error

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Generous but bounded: a slow shared 2-core machine runs the service, PostgreSQL,
# Mosquitto and Chromium at once.
UI_TIMEOUT_MS = 30_000
LAUNCH_TIMEOUT_MS = 60_000
TIME_ZONE = "Asia/Shanghai"

REPO = Path(__file__).resolve().parent.parent
SCREENSHOTS = REPO / "docs" / "screenshots"


async def launch_chromium(playwright: Playwright) -> Browser:
    """Debian's Chromium, headless; a clear failure (not a skip) when it is missing."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is missing: the browser tests need Debian's chromium package; "
            "run scripts/setup --dev (it installs chromium and fonts-wqy-microhei)",
            pytrace=False,
        )
    return await playwright.chromium.launch(
        executable_path=str(CHROMIUM),
        args=CHROMIUM_ARGS,
        headless=True,
        timeout=LAUNCH_TIMEOUT_MS,
    )


@dataclass
class PageLog:
    """What went wrong inside a page (uncaught errors; console errors and warnings, which
    include failed requests), for assertion messages."""

    errors: list[str] = field(default_factory=list)  # uncaught exceptions
    console: list[str] = field(default_factory=list)

    def watch(self, page: Page) -> None:
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.on("console", self._console)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.console.append(f"{message.type}: {message.text}")

    def __str__(self) -> str:
        lines = [f"page error: {e}" for e in self.errors] + self.console
        return "\n".join(lines) or "(nothing logged by the page)"


@asynccontextmanager
async def browser_page(
    browser: Browser,
    viewport: tuple[int, int],
    *,
    mobile: bool = False,
) -> AsyncIterator[tuple[Page, PageLog]]:
    """A fresh context (own cookies and storage) with one page, bounded timeouts; `mobile`
    is a phone (touch, mobile viewport meta honoured)."""
    width, height = viewport
    context: BrowserContext = await browser.new_context(
        viewport={"width": width, "height": height},
        device_scale_factor=1,
        is_mobile=mobile,
        has_touch=mobile,
        locale="zh-CN",
        timezone_id=TIME_ZONE,
    )
    context.set_default_timeout(UI_TIMEOUT_MS)
    context.set_default_navigation_timeout(UI_TIMEOUT_MS)
    try:
        page = await context.new_page()
        log = PageLog()
        log.watch(page)
        yield page, log
    finally:
        await context.close()


async def sign_in(page: Page, base_url: str, token: str, landing: str) -> None:
    """Type the token into the /login form, submit, and wait to land on `landing`."""
    await page.goto(f"{base_url}/login")
    await page.locator("#token").fill(token)
    await page.get_by_role("button", name="登录 / Sign in").click()
    await page.wait_for_url(f"{base_url}{landing}")


async def mark_page(page: Page) -> None:
    """Put a marker in the page's JavaScript world: a reload or navigation loses it."""
    await page.evaluate("window.__gwNoReload = true")


async def page_kept(page: Page) -> bool:
    """True when the page is the one `mark_page` marked (no reload in between)."""
    return bool(await page.evaluate("window.__gwNoReload === true"))


@dataclass
class City:
    """The sample city loaded into a test database, with `gridwarden up` running on it."""

    url: str
    database_url: str
    prefix: str
    operator_token: str

    async def api(self, path: str, params: dict[str, str] | None = None) -> object:
        async with httpx.AsyncClient(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.operator_token}"},
            timeout=UI_TIMEOUT_MS / 1000,
        ) as http:
            response = await http.get(path, params=params)
            response.raise_for_status()
            return response.json()

    async def worker_token(self, worker_id: str) -> str:
        conn = await asyncpg.connect(self.database_url)
        try:
            return await create_token(conn, "worker", worker_id, label="browser test")
        finally:
            await conn.close()


async def load_sample_city(database_url: str, directory: Path) -> str:
    """Import the sample city (东华街道) through the ordinary import functions; returns an
    operator token."""
    files = write_sample_city(directory)
    conn = await asyncpg.connect(database_url)
    try:
        await import_grid(conn, files.grid)
        await import_devices(conn, files.devices)
        await import_workers(conn, files.workers, hash_key="browser-test")
        return await create_token(conn, "operator", label="browser test")
    finally:
        await conn.close()


async def save_screenshot(page: Page, name: str) -> Path:
    """docs/screenshots/NAME (PNG, the viewport only), overwritten on each run."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / name
    await page.evaluate("document.fonts.ready.then(() => true)")
    await page.screenshot(path=str(path), type="png", animations="disabled", caret="hide")
    return path
