"""Pieces shared by the three registries: the error, the report, file reading and
turning pydantic errors into one line per problem.

Problem locations: `feature [i]` (GeoJSON, 0-based index into `features`),
`line n` (CSV, 1-based physical line, the header is line 1) and `element [i]`
(JSON arrays, 0-based index).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

# Device, cell and worker ids all end up in MQTT topics (CONTRACT §2, §6): no `/`, `+`, `#`.
ID_PATTERN: Final = r"^[A-Za-z0-9_.:-]{1,64}$"

MAX_LISTED: Final = 20  # names listed in one warning before "… and N more"
_INPUT_SHOWN_CHARS: Final = 60
_POSITION = re.compile(r"^(?:line (\d+)|\w+ \[(\d+)\])")


class RegistryError(Exception):
    """A registry file was rejected whole; `problems` lists every reason, located."""

    def __init__(self, problems: list[str], *, source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        head = f"{source}: " if source else ""
        count = len(self.problems)
        lines = "\n".join(f"  {problem}" for problem in self.problems)
        super().__init__(f"{head}rejected, {count} problem{'s' if count != 1 else ''}:\n{lines}")


class ImportReport(BaseModel):
    """What an import did. Warnings never block an import; problems do (RegistryError)."""

    model_config = ConfigDict(frozen=True)

    registry: Literal["grid", "devices", "workers"]
    source: str
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    warnings: list[str] = []

    @property
    def total(self) -> int:
        return self.created + self.updated + self.unchanged

    def summary(self) -> str:
        text = (
            f"{self.registry}: {self.created} created, {self.updated} updated, "
            f"{self.unchanged} unchanged"
        )
        if self.warnings:
            text += f"; {len(self.warnings)} warning{'s' if len(self.warnings) != 1 else ''}"
        return text


class FileText(BaseModel):
    """A registry file's text, or why it could not be read."""

    text: str = ""
    problems: list[str] = []
    warnings: list[str] = []


def read_text(path: Path) -> FileText:
    """UTF-8 (a BOM is fine); GB18030 as a fallback, since Chinese Excel saves CSV in GBK."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return FileText(problems=[f"cannot read {path}: {exc.strerror or exc}"])
    try:
        return FileText(text=raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        utf8_error = exc
    try:
        text = raw.decode("gb18030")
    except UnicodeDecodeError:
        return FileText(
            problems=[f"not UTF-8 text (bad byte at offset {utf8_error.start}): save as UTF-8"]
        )
    return FileText(text=text, warnings=["file is not UTF-8; decoded as GB18030 (GBK)"])


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def parse_json(text: str) -> tuple[Any, list[str]]:
    """JSON text to Python data, or one problem naming line and column."""
    try:
        return json.loads(text, parse_constant=_reject_constant), []
    except json.JSONDecodeError as exc:
        return None, [f"line {exc.lineno} column {exc.colno}: not valid JSON: {exc.msg}"]
    except ValueError as exc:
        return None, [f"not valid JSON: {exc}"]


def describe_validation_error(
    where: str, exc: ValidationError, *, secret_fields: Iterable[str] = ()
) -> list[str]:
    """One line per pydantic error; the input is echoed except for secret fields."""
    secret = set(secret_fields)
    lines = []
    for error in exc.errors(include_url=False):
        loc = error["loc"]
        field = ".".join(str(part) for part in loc)
        kind = error["type"]
        if kind == "missing":
            lines.append(f"{where}: missing required field '{field}'")
            continue
        if kind == "extra_forbidden":
            lines.append(f"{where}: unknown field '{field}'")
            continue
        message = f"{where}: {field}: {error['msg']}" if field else f"{where}: {error['msg']}"
        if not (loc and str(loc[0]) in secret):
            shown = repr(error.get("input"))
            if len(shown) > _INPUT_SHOWN_CHARS:
                shown = shown[: _INPUT_SHOWN_CHARS - 1] + "…"
            message += f" (got {shown})"
        lines.append(message)
    return lines


def sort_problems(problems: Iterable[str]) -> list[str]:
    """File-level problems first, then by line / index (stable within one position)."""

    def key(problem: str) -> int:
        match = _POSITION.match(problem)
        if match is None:
            return -1
        return int(match.group(1) or match.group(2))

    return sorted(problems, key=key)


def listed(names: Iterable[str]) -> str:
    """`a, b, c` capped at MAX_LISTED names."""
    items = list(names)
    shown = ", ".join(items[:MAX_LISTED])
    if len(items) > MAX_LISTED:
        shown += f" … and {len(items) - MAX_LISTED} more"
    return shown


def label(where: str, record_id: object) -> str:
    """`line 4 (id 'd1')` when the record's id is known."""
    if isinstance(record_id, str) and record_id:
        return f"{where} (id {record_id!r})"
    return where


Record = TypeVar("Record")


def changes(
    records: Iterable[Record],
    key: Callable[[Record], str],
    existing: Mapping[str, Any],
    same: Callable[[Record, Any], bool],
) -> tuple[list[Record], int, int]:
    """What an import must write: the records new or different from the stored rows,
    and how many of them are new and how many updated (the rest are unchanged)."""
    changed: list[Record] = []
    created = updated = 0
    for record in records:
        row = existing.get(key(record))
        if row is None:
            created += 1
        elif same(record, row):
            continue
        else:
            updated += 1
        changed.append(record)
    return changed, created, updated
