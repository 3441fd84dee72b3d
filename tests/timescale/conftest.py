"""A real TimescaleDB for the conformance test: PGlite (PostgreSQL 17 in WebAssembly) with
TimescaleDB 2.23, served over the wire protocol by pglite-socket (see server.mjs).

Needs Node.js and npm (`scripts/setup --dev` installs them); the npm packages are installed
into tests/timescale/node_modules from the committed package-lock.json on first use.
The server takes ONE connection at a time: never hold two connections open at once.
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
NPM_CI_TIMEOUT_S = 240.0
SERVER_START_TIMEOUT_S = 60.0
SERVER_STOP_TIMEOUT_S = 10.0
_READY = re.compile(r"^READY host=(?P<host>\S+) port=(?P<port>\d+)$")


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(
            f"`{tool}` not found on PATH: the TimescaleDB conformance test runs PGlite under "
            "Node.js. Install Node.js and npm (`scripts/setup --dev`), or deselect these "
            "tests with `-m 'not timescale'`.",
            pytrace=False,
        )
    return path


def _node_modules_current() -> bool:
    """npm writes node_modules/.package-lock.json on install; older than the committed
    lockfile (or missing) means node_modules is absent or stale."""
    installed = HERE / "node_modules" / ".package-lock.json"
    try:
        return installed.stat().st_mtime >= (HERE / "package-lock.json").stat().st_mtime
    except FileNotFoundError:
        return False


def _npm_ci(npm: str) -> None:
    command = [npm, "ci", "--no-audit", "--no-fund", "--prefer-offline", "--loglevel=error"]
    try:
        done = subprocess.run(
            command,
            cwd=HERE,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=NPM_CI_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"`npm ci` in {HERE} took over {NPM_CI_TIMEOUT_S:.0f} s", pytrace=False)
    if done.returncode != 0:
        pytest.fail(
            f"`{' '.join(command)}` in {HERE} failed ({done.returncode}):\n"
            f"{done.stdout}{done.stderr}",
            pytrace=False,
        )


def _wait_ready(server: subprocess.Popen[str], stderr_path: Path) -> int:
    assert server.stdout is not None
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    with selectors.DefaultSelector() as selector:
        selector.register(server.stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not selector.select(timeout=left):
                continue
            line = server.stdout.readline()
            if not line:  # EOF: the server exited
                break
            if match := _READY.match(line.strip()):
                return int(match["port"])
    server.kill()
    server.wait()
    stderr = stderr_path.read_text(errors="replace")
    pytest.fail(
        f"PGlite server did not report READY within {SERVER_START_TIMEOUT_S:.0f} s "
        f"(exit code {server.returncode}):\n{stderr}",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def timescale_dsn() -> Iterator[str]:
    """DSN of a fresh in-memory PGlite + TimescaleDB, one server for the whole session."""
    node = _require("node")
    npm = _require("npm")
    if not _node_modules_current():
        _npm_ci(npm)

    with tempfile.TemporaryDirectory(prefix="gridwarden-pglite-") as tmp:
        stderr_path = Path(tmp) / "server.stderr"
        with stderr_path.open("w") as stderr:
            server = subprocess.Popen(
                [node, "server.mjs", "0"],  # port 0: the OS picks a free one, READY names it
                cwd=HERE,
                stdin=subprocess.PIPE,  # closed when pytest exits, however: the server exits
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env={**os.environ, "NODE_NO_WARNINGS": "1", "PGLITE_EXIT_ON_STDIN_EOF": "1"},
            )
        try:
            port = _wait_ready(server, stderr_path)
            yield f"postgresql://postgres:postgres@127.0.0.1:{port}/postgres?sslmode=disable"
            if server.poll() is not None:
                stderr = stderr_path.read_text(errors="replace")
                pytest.fail(
                    f"PGlite server died during the tests (exit code {server.returncode}):\n"
                    f"{stderr}",
                    pytrace=False,
                )
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
                try:
                    server.wait(timeout=SERVER_STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()
            for pipe in (server.stdin, server.stdout):
                if pipe is not None:
                    pipe.close()
