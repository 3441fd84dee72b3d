"""The registries: grid cells, devices and workers (CONTRACT §4).

Each registry has a pure check (file content → typed records, or every problem,
located) and an async import that loads a checked file in one transaction,
upserting only what changed.
"""

from pathlib import Path

import asyncpg

from gridwarden import audit
from gridwarden.config import Settings
from gridwarden.keys import credential_hash_key
from gridwarden.registry.common import ID_PATTERN, ImportReport, RegistryError
from gridwarden.registry.devices import (
    DEVICE_KINDS,
    Device,
    DeviceCheck,
    DeviceKind,
    DeviceRecord,
    check_devices,
    import_devices,
    read_devices_file,
)
from gridwarden.registry.grid import (
    LEVELS,
    Cell,
    CellLocator,
    GridCheck,
    Level,
    check_grid,
    import_grid,
    load_cells,
    read_grid_file,
)
from gridwarden.registry.workers import (
    ROLES,
    Role,
    WorkerCheck,
    WorkerRecord,
    check_workers,
    hash_phone,
    import_workers,
    mask_phone,
    normalize_phone,
    read_workers_file,
)

__all__ = [
    "DEVICE_KINDS",
    "ID_PATTERN",
    "LEVELS",
    "ROLES",
    "Cell",
    "CellLocator",
    "Device",
    "DeviceCheck",
    "DeviceKind",
    "DeviceRecord",
    "GridCheck",
    "ImportReport",
    "Level",
    "RegistryError",
    "Role",
    "WorkerCheck",
    "WorkerRecord",
    "check_devices",
    "check_grid",
    "check_workers",
    "hash_phone",
    "import_devices",
    "import_file",
    "import_grid",
    "import_workers",
    "load_cells",
    "mask_phone",
    "normalize_phone",
    "read_devices_file",
    "read_grid_file",
    "read_workers_file",
]


async def import_file(
    conn: asyncpg.Connection,
    kind: str,
    path: Path,
    settings: Settings,
    *,
    actor: str = audit.CLI_ACTOR,
) -> ImportReport:
    """`gridwarden import KIND FILE`: kind is grid, devices or workers.

    Audited: `registry.import` in the import's transaction (with what it changed), or
    `registry.import_rejected` (with the number of problems) when the file is refused."""
    if kind not in ("grid", "devices", "workers"):
        raise ValueError(f"unknown registry {kind!r} (grid, devices or workers)")
    source = {"file": str(path)}
    try:
        async with conn.transaction():
            if kind == "grid":
                report = await import_grid(conn, path)
            elif kind == "devices":
                report = await import_devices(conn, path)
            else:
                hash_key = await credential_hash_key(conn, settings)
                report = await import_workers(conn, path, hash_key=hash_key)
            counts = {"created": report.created, "updated": report.updated,
                      "unchanged": report.unchanged, "warnings": len(report.warnings)}  # fmt: skip
            await audit.record(conn, actor=actor, action="registry.import", target_type=kind,
                               target_id=None, detail={**source, **counts})  # fmt: skip
    except RegistryError as exc:
        await audit.record(conn, actor=actor, action="registry.import_rejected",
                           target_type=kind, target_id=None,
                           detail={**source, "problems": len(exc.problems)})  # fmt: skip
        raise
    return report
