"""gridwarden runs on uvloop (the in-process tests keep asyncio's loop; every test that
starts `gridwarden up` as a process runs it on uvloop)."""

from __future__ import annotations

import asyncio

import uvloop

from gridwarden.cli import _run


async def _loop_type() -> type:
    return type(asyncio.get_running_loop())


def test_the_service_runs_on_uvloop():
    assert issubclass(_run(_loop_type()), uvloop.Loop)
