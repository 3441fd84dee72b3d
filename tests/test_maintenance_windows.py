"""Which readings maintenance windows mute (rules.runtime.MaintenanceWindows, indexed)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from gridwarden.readings import DeviceInfo
from rules.runtime import MaintenanceWindow, MaintenanceWindows

T0 = datetime(2026, 12, 3, 8, 0, tzinfo=UTC)
# street s1 > community c1 > grids g1, g2; a micro-grid m1 in g1
PARENTS = {"s1": None, "c1": "s1", "g1": "c1", "g2": "c1", "m1": "g1"}


def cells_of(cell: str | None) -> tuple[str, ...]:
    chain: list[str] = []
    while cell is not None:
        chain.append(cell)
        cell = PARENTS.get(cell)
    return tuple(chain)


def window(device: str | None, cell: str | None, start_min: int, end_min: int) -> MaintenanceWindow:
    return MaintenanceWindow(device, cell, T0 + timedelta(minutes=start_min),
                             T0 + timedelta(minutes=end_min))  # fmt: skip


def test_a_window_mutes_its_device_its_cell_and_every_cell_below_while_open() -> None:
    windows = MaintenanceWindows(
        [window("bin-9", None, 0, 10), window(None, "g1", 5, 15), window(None, "c1", 30, 40)],
        cells_of,
    )
    in_m1 = DeviceInfo("bin-1", "smart_bin", cell_id="m1")
    in_g2 = DeviceInfo("bin-2", "smart_bin", cell_id="g2")
    no_cell = DeviceInfo("bin-9", "smart_bin")
    at = [T0 + timedelta(minutes=m) for m in (0, 5, 14, 15, 30, 39, 40)]
    assert [windows.cover(in_m1, t) for t in at] == [False, True, True, False, True, True, False]
    assert [windows.cover(in_g2, t) for t in at] == [False, False, False, False, True, True, False]
    assert [windows.cover(no_cell, t) for t in at] == [True, True, False, False, False, False,
                                                       False]  # fmt: skip
    assert not MaintenanceWindows([], cells_of).cover(in_m1, T0)


WINDOWS = st.lists(
    st.builds(
        window,
        st.sampled_from([None, "d1", "d2"]),
        st.sampled_from([None, *PARENTS]),
        st.integers(0, 30),
        st.integers(0, 60),
    ),
    max_size=8,
)


@settings(max_examples=200, derandomize=True, database=None)
@given(
    windows=WINDOWS,
    device=st.sampled_from(["d1", "d2", "d3"]),
    cell=st.sampled_from([None, *PARENTS, "unknown"]),
    minute=st.integers(0, 60),
)
def test_the_index_answers_as_walking_every_window_does(
    windows: list[MaintenanceWindow], device: str, cell: str | None, minute: int
) -> None:
    info = DeviceInfo(device, "smart_bin", cell_id=cell)
    at = T0 + timedelta(minutes=minute)
    cells = set(cells_of(cell))
    walked = any(
        w.starts_at <= at < w.ends_at and (w.device_id == device or w.cell_id in cells)
        for w in windows
    )
    indexed = MaintenanceWindows(windows, cells_of)
    assert indexed.cover(info, at) == walked
    assert indexed.cover(info, at) == walked  # asked again: from the per-cell gathering
