"""The worker registry (CONTRACT §4): a JSON array of workers and the cells they cover.

Phone numbers are never stored in clear: only `phone_hash` (HMAC-SHA256 of the
normalised number, keyed) and `phone_masked` (138****5678). They are not echoed in
problem messages either.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Final, Literal

import asyncpg
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from gridwarden.db import query
from gridwarden.registry.common import (
    ID_PATTERN,
    ImportReport,
    RegistryError,
    describe_validation_error,
    label,
    listed,
    parse_json,
    read_text,
    sort_problems,
)

Role = Literal["grid_worker", "grid_leader", "community_staff", "street_staff", "part_time"]
ROLES: Final[tuple[Role, ...]] = (
    "grid_worker",
    "grid_leader",
    "community_staff",
    "street_staff",
    "part_time",
)
# The levels a role usually covers; anything else is a warning, not an error.
ROLE_LEVELS: Final[dict[str, frozenset[str]]] = {
    "grid_worker": frozenset({"grid", "micro"}),
    "part_time": frozenset({"grid", "micro"}),
    "grid_leader": frozenset({"grid", "community"}),
    "community_staff": frozenset({"community"}),
    "street_staff": frozenset({"street"}),
}

_SEPARATORS = re.compile(r"[\s().-]")
_PHONE = re.compile(r"^\+?\d{5,15}$")
_CN_MOBILE = re.compile(r"^1[3-9]\d{9}$")


def normalize_phone(raw: str) -> str:
    """Digits only (a leading + kept); +86 / 0086 dropped from Chinese mobiles.

    Raises ValueError (without echoing the number) when it is not a phone number.
    """
    compact = _SEPARATORS.sub("", raw)
    if not _PHONE.match(compact):
        raise ValueError("not a phone number (5 to 15 digits, optional leading +)")
    for prefix in ("+86", "0086"):
        if compact.startswith(prefix) and _CN_MOBILE.match(compact[len(prefix) :]):
            return compact[len(prefix) :]
    return compact


def hash_phone(phone: str, key: str) -> str:
    """HMAC-SHA256 of the normalised number, hex: lets a number be looked up, not read."""
    return hmac.new(key.encode("utf-8"), phone.encode("utf-8"), hashlib.sha256).hexdigest()


def mask_phone(phone: str) -> str:
    """138****5678 for 8 digits or more; ****78 below."""
    if len(phone) >= 8:
        return f"{phone[:3]}****{phone[-4:]}"
    return f"****{phone[-2:]}"


class WorkerRecord(BaseModel):
    """One element of a workers file, validated. `phone` is normalised and kept secret."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    id: str = Field(pattern=ID_PATTERN)
    name: str = Field(min_length=1, max_length=100)
    role: Role
    cells: list[str] = Field(min_length=1)
    phone: SecretStr | None = None
    on_duty: bool = True

    @field_validator("phone", mode="after")
    @classmethod
    def _normalize_phone(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        return SecretStr(normalize_phone(value.get_secret_value()))

    @field_validator("cells", mode="after")
    @classmethod
    def _distinct_cells(cls, value: list[str]) -> list[str]:
        return sorted({cell.strip() for cell in value})


class WorkerCheck(BaseModel):
    workers: list[WorkerRecord] = []
    problems: list[str] = []
    warnings: list[str] = []

    @property
    def ok(self) -> bool:
        return not self.problems


def check_workers(data: object, cell_levels: Mapping[str, str]) -> WorkerCheck:
    """Validate a workers array against the known cells (id → level)."""
    if not isinstance(data, list):
        return WorkerCheck(problems=["the file must be a JSON array of worker objects"])
    if not data:
        return WorkerCheck(problems=["the file lists no workers"])
    problems: list[str] = []
    warnings: list[str] = []
    workers: list[WorkerRecord] = []
    first_seen: dict[str, int] = {}
    for index, raw in enumerate(data):
        where = f"element [{index}]"
        if not isinstance(raw, dict):
            problems.append(f"{where}: must be an object")
            continue
        here = label(where, raw.get("id"))
        try:
            worker = WorkerRecord.model_validate(raw)
        except ValidationError as exc:
            problems.extend(describe_validation_error(here, exc, secret_fields={"phone"}))
            continue
        if worker.id in first_seen:
            problems.append(f"{here}: duplicate id (first at element [{first_seen[worker.id]}])")
            continue
        first_seen[worker.id] = index
        unknown = [cell for cell in worker.cells if cell not in cell_levels]
        if unknown:
            problems.append(f"{here}: unknown cell(s) {', '.join(map(repr, unknown))}")
            continue
        odd = [cell for cell in worker.cells if cell_levels[cell] not in ROLE_LEVELS[worker.role]]
        if odd:
            levels = ", ".join(f"{cell!r} ({cell_levels[cell]})" for cell in odd)
            warnings.append(f"{here}: a {worker.role} usually does not cover {levels}")
        workers.append(worker)
    return WorkerCheck(workers=workers, problems=sort_problems(problems), warnings=warnings)


def read_workers_file(path: Path, cell_levels: Mapping[str, str]) -> WorkerCheck:
    """Read and check a workers file (blocking: call it in a thread)."""
    text = read_text(path)
    if text.problems:
        return WorkerCheck(problems=text.problems)
    data, problems = parse_json(text.text)
    if problems:
        return WorkerCheck(problems=problems)
    check = check_workers(data, cell_levels)
    return check.model_copy(update={"warnings": [*text.warnings, *check.warnings]})


class _StoredWorker(BaseModel):
    """A worker as its table rows hold it."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    role: str
    phone_hash: str | None
    phone_masked: str | None
    on_duty: bool
    cells: tuple[str, ...]


def _stored(worker: WorkerRecord, hash_key: str) -> _StoredWorker:
    phone = worker.phone.get_secret_value() if worker.phone is not None else None
    return _StoredWorker(
        id=worker.id,
        name=worker.name,
        role=worker.role,
        phone_hash=hash_phone(phone, hash_key) if phone else None,
        phone_masked=mask_phone(phone) if phone else None,
        on_duty=worker.on_duty,
        cells=tuple(sorted(worker.cells)),
    )


async def import_workers(conn: asyncpg.Connection, path: Path, *, hash_key: str) -> ImportReport:
    """Check `path` against the cells in the database and upsert in one transaction.

    A worker's set of cells is replaced by the file's. `hash_key` keys the phone
    hash (e.g. settings.credential_hash_key). Workers not in the file are kept.
    """
    async with conn.transaction():
        await conn.execute(query("registry_lock"))
        levels = {
            row["id"]: row["level"] for row in await conn.fetch(query("registry_cell_levels"))
        }
        check = await asyncio.to_thread(read_workers_file, path, levels)
        if check.problems:
            raise RegistryError(check.problems, source=str(path))
        existing = {
            row["id"]: _StoredWorker(
                id=row["id"],
                name=row["name"],
                role=row["role"],
                phone_hash=row["phone_hash"],
                phone_masked=row["phone_masked"],
                on_duty=row["on_duty"],
                cells=tuple(row["cells"]),
            )
            for row in await conn.fetch(query("registry_workers_select"))
        }
        wanted = [_stored(worker, hash_key) for worker in check.workers]
        changed = [w for w in wanted if existing.get(w.id) != w]
        created = sum(1 for w in changed if w.id not in existing)
        if changed:
            await conn.execute(
                query("registry_workers_upsert"),
                [w.id for w in changed],
                [w.name for w in changed],
                [w.role for w in changed],
                [w.phone_hash for w in changed],
                [w.phone_masked for w in changed],
                [w.on_duty for w in changed],
            )
            await conn.execute(query("registry_worker_cells_clear"), [w.id for w in changed])
            pairs = [(w.id, cell) for w in changed for cell in w.cells]
            await conn.execute(
                query("registry_worker_cells_insert"),
                [worker_id for worker_id, _ in pairs],
                [cell for _, cell in pairs],
            )
    warnings = list(check.warnings)
    stale = sorted(set(existing) - {w.id for w in wanted})
    if stale:
        warnings.append(
            f"{len(stale)} workers in the database are not in this file and were kept: "
            f"{listed(stale)}"
        )
    return ImportReport(
        registry="workers",
        source=str(path),
        created=created,
        updated=len(changed) - created,
        unchanged=len(wanted) - len(changed),
        warnings=warnings,
    )
