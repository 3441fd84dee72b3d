"""Which shard a message, a device and a rule-state source belong to (ingest/shards.py)."""

from __future__ import annotations

import pytest

from gridwarden.readings import DeviceInfo
from ingest import shards
from ingest.shards import ShardMap


def device(device_id: str, cell: str | None) -> DeviceInfo:
    return DeviceInfo(id=device_id, kind="smoke_detector", cell_id=cell, height_cm=None,
                      interval_s=60, building="B1")  # fmt: skip


REGISTRY = {d.id: d for d in (device("a", "cell-1"), device("b", "cell-1"), device("c", None))}


def shard_map(count: int = 4) -> ShardMap:
    return ShardMap(count, REGISTRY.get, "gw")


def test_devices_of_one_cell_and_their_groups_share_a_shard() -> None:
    m = shard_map()
    cell = m.of_cell("cell-1")
    assert m.of_device("a") == m.of_device("b") == cell  # correlation sees both detectors
    assert m.of_source("building:cell-1/B1") == cell
    assert m.of_source("cell:cell-1") == cell
    assert m.of_source("a") == cell


def test_every_topic_is_owned_by_exactly_one_shard() -> None:
    m = shard_map()
    topics = [
        "gw/dev/a/telemetry", "gw/dev/a/event", "gw/codec/zigbee2mqtt/a",
        "gw/dev/unknown-7/telemetry", "gw/dev/c/status", "gw/bad", "other/dev/a/x",
    ]  # fmt: skip
    for topic in topics:
        assert sum(m.owns_topic(s, topic) for s in range(4)) == 1, topic
    assert m.owns_topic(m.of_device("a"), "gw/codec/chirpstack/a")


@pytest.mark.parametrize("count", [1, 2, 3])
def test_one_shard_owns_everything_when_there_is_one(count: int) -> None:
    m = shard_map(count)
    assert all(0 <= m.of_device(d) < count for d in ("a", "b", "c", "zz"))
    if count == 1:
        assert m.owns_topic(0, "gw/dev/zz/telemetry")


def test_a_moved_device_is_processed_by_both_shards_for_the_grace_period(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = dict(REGISTRY)
    m = ShardMap(64, registry.get, "gw")
    old = registry["a"]
    new = next(
        device("a", f"cell-{n}") for n in range(2, 200)
        if m.of_cell(f"cell-{n}") != m.of_cell("cell-1")
    )  # fmt: skip
    registry["a"] = new
    clock = [1000.0]
    monkeypatch.setattr(shards.time, "monotonic", lambda: clock[0])
    m.note_change(old, new)
    before, after = m.of_cell("cell-1"), m.of_cell(new.cell_id or "")
    topic = "gw/dev/a/telemetry"
    # A process whose registry still says cell-1 and one that says the new cell may both
    # handle the message for a while: it is stored once (seq), never skipped by both.
    assert m.owns_topic(after, topic)
    assert m.owns_topic(before, topic)
    clock[0] += shards.MOVE_GRACE_S
    m.note_change(new, new)  # a later refresh prunes the old entry
    assert not m.owns_topic(before, topic)
