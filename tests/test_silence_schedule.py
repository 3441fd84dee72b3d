"""The rules engine's silence schedule (rules/silence.py): a timing wheel of device ids."""

from __future__ import annotations

import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st

from rules.silence import SilenceSchedule


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    deadlines=st.dictionaries(
        st.sampled_from([f"d{i}" for i in range(30)]),
        st.floats(min_value=0, max_value=50, allow_nan=False),
        min_size=1,
    ),
    moves=st.lists(
        st.tuples(st.sampled_from([f"d{i}" for i in range(30)]), st.floats(0, 50)), max_size=20
    ),
    tick_s=st.sampled_from([0.25, 0.5, 1.0, 2.5]),
    bucket_s=st.sampled_from([0.5, 1.0, 3.0]),
)
def test_each_device_comes_up_at_the_first_tick_at_or_after_its_deadline(
    deadlines: dict[str, float], moves: list[tuple[str, float]], tick_s: float, bucket_s: float
) -> None:
    """Driven as the engine drives it: at every tick, take what is due and schedule again
    each device whose own deadline is later (a device moved meanwhile counts at its last
    deadline)."""
    schedule = SilenceSchedule(bucket_s)
    for device, deadline in deadlines.items():
        schedule.schedule(device, deadline)
    wanted = dict(deadlines)
    for device, deadline in moves:  # scheduled again while scheduled: the last one counts
        schedule.schedule(device, deadline)
        wanted[device] = deadline
    came_up: dict[str, float] = {}
    t = 0.0
    while t <= 60:
        live = [wanted[d] for d in wanted if d not in came_up]
        if live:
            next_due = schedule.next_due()
            assert next_due is not None
            assert next_due <= min(live)
        for device in schedule.take_due(t):
            assert device not in came_up
            if wanted[device] > t:
                schedule.schedule(device, wanted[device])
            else:
                came_up[device] = t
        t += tick_s
    expected = {d: next(k * tick_s for k in range(10_000) if k * tick_s >= at)
                for d, at in wanted.items()}  # fmt: skip
    assert came_up == expected
    assert len(schedule) == 0
    assert schedule.next_due() is None


def test_a_device_scheduled_again_and_again_keeps_one_live_entry() -> None:
    schedule = SilenceSchedule()
    for deadline in range(100):
        schedule.schedule("d", 1000.0 + deadline / 10)  # all in ten buckets
    assert len(schedule) == 1
    assert schedule.take_due(1009.95) == ["d"]
    assert schedule.take_due(2000.0) == []


def test_a_million_devices_take_about_fifty_bytes_each() -> None:
    ids = [f"b{i:07d}" for i in range(1_000_000)]  # made before: not the schedule's memory
    tracemalloc.start()
    try:
        schedule = SilenceSchedule()
        for i, device in enumerate(ids):
            schedule.schedule(device, 1_800_000_000.0 + (i % 2700) + (i % 7) / 7)
        size, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(schedule) == 1_000_000
    assert size / len(ids) < 70  # a heap entry and a map of deadlines took ~150
