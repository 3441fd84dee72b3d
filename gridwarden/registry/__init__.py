"""The registries: grid cells, devices and workers (CONTRACT §4).

Each registry has a pure check (file content → typed records, or every problem,
located) and an async import that loads a checked file in one transaction,
upserting only what changed.
"""

from pathlib import Path

import asyncpg

from gridwarden.config import Settings
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
    conn: asyncpg.Connection, kind: str, path: Path, settings: Settings
) -> ImportReport:
    """`gridwarden import KIND FILE`: kind is grid, devices or workers."""
    if kind == "grid":
        return await import_grid(conn, path)
    if kind == "devices":
        return await import_devices(conn, path)
    if kind == "workers":
        return await import_workers(conn, path, hash_key=settings.credential_hash_key)
    raise ValueError(f"unknown registry {kind!r} (grid, devices or workers)")
