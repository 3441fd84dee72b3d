"""What ingest hands to the rules engine: registry facts about a device and one
validated reading. Shared core types, so rules never import ingest."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    id: str
    kind: str
    cell_id: str | None = None
    height_cm: float | None = None
    interval_s: int | None = None
    building: str | None = None


@dataclass(slots=True)
class Reading:
    """A validated reading (`channel="telemetry"`) or event (`channel="event"`)."""

    channel: str
    device_id: str
    time: datetime
    received_at: datetime
    seq: int | None
    values: dict[str, Any]
    extra: dict[str, Any] | None = None
    event: str | None = None
    credential_hash: str | None = None
