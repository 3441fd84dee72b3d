"""When each watched device is next looked at for silence (the absence rules).

One entry per device, in buckets of `BUCKET_S` seconds of deadline: a timing wheel keyed by
bucket number. Per device that is a map slot pointing at its bucket and a slot in the
bucket's list, about 50 bytes; a heap entry (a tuple and a float) and a map of live
deadlines (another float) took about 150, 110 MB a million devices. Each bucket keeps only
its earliest deadline. The engine works each device's real deadline out from when it was
last heard once its bucket comes up (a reading only moves that time, never the schedule),
and schedules again the devices not due yet: each fires at the first tick at or after its
own deadline, as with a heap.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Final

BUCKET_S: Final = 1.0


@dataclass(slots=True, eq=False)
class _Bucket:
    earliest: float
    devices: list[str] = field(default_factory=list)


class SilenceSchedule:
    def __init__(self, bucket_s: float = BUCKET_S) -> None:
        self.bucket_s = bucket_s
        self._bucket_of: dict[str, _Bucket] = {}  # the device's live entry
        self._buckets: dict[int, _Bucket] = {}
        self._numbers: list[int] = []  # a heap of the buckets' numbers

    def __contains__(self, device_id: str) -> bool:
        return device_id in self._bucket_of

    def __len__(self) -> int:
        return len(self._bucket_of)

    @property
    def entries(self) -> int:
        """Slots in all buckets, stale ones included: what the schedule's size grows with."""
        return sum(len(bucket.devices) for bucket in self._buckets.values())

    def schedule(self, device_id: str, deadline: float) -> None:
        """Look at the device at `deadline` (an entry it had before is dropped)."""
        number = math.floor(deadline / self.bucket_s)
        bucket = self._buckets.get(number)
        if bucket is None:
            bucket = self._buckets[number] = _Bucket(deadline)
            heapq.heappush(self._numbers, number)
        elif deadline < bucket.earliest:
            bucket.earliest = deadline
        bucket.devices.append(device_id)
        self._bucket_of[device_id] = bucket

    def next_due(self) -> float | None:
        return self._buckets[self._numbers[0]].earliest if self._numbers else None

    def take_due(self, t: float) -> list[str]:
        """The devices of every bucket whose earliest deadline is at or before `t`, no
        longer scheduled: the caller schedules again those whose own deadline is later."""
        due: list[str] = []
        while self._numbers and self._buckets[self._numbers[0]].earliest <= t:
            bucket = self._buckets.pop(heapq.heappop(self._numbers))
            for device_id in bucket.devices:
                if self._bucket_of.get(device_id) is bucket:  # else moved to another since
                    del self._bucket_of[device_id]
                    due.append(device_id)
        return due
