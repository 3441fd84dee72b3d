"""The rule language: the shipped defaults, overrides per cell and device (driven through the
engine with the scenario harness of test_rules_engine), and validation of rule files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gridwarden.readings import DeviceInfo
from rules.spec import (
    DEVICE_KINDS,
    Absence,
    Correlation,
    Override,
    Rule,
    RulesError,
    RuleSet,
    load_rules,
)
from tests.test_rules_engine import Harness, Op, Step, rule

# --- the shipped defaults ------------------------------------------------------------------


def test_defaults_load() -> None:
    rules = load_rules()
    assert set(DEVICE_KINDS) <= set(rules.by_kind)
    for kind in DEVICE_KINDS:
        kind_rules = rules.by_kind[kind]
        assert kind_rules, kind
        assert all(r.kind == kind for r in kind_rules)
        # every kind is watched for silence
        assert sum(isinstance(r.when, Absence) for r in kind_rules) == 1, kind
    assert rules.overrides == []
    confirmed = rules.rules["smoke.fire_confirmed"].when
    assert isinstance(confirmed, Correlation)
    assert rules.correlations == {"smoke.alarm": [rules.rules["smoke.fire_confirmed"]]}


MOMENTARY = [
    # an event happens at an instant
    ({"event": ["door_forced"]}, True),
    # so does a count reaching its threshold
    ({"count": {"event": ["access_denied"]}, "at_least": 5, "within_s": 60}, True),
    # and a rise
    ({"rate_of_rise": "temperature", "by": 8, "within_s": 60}, True),
    # any_of events only: still an instant
    ({"any_of": [{"event": ["fire"]}, {"event": ["smoke"]}]}, True),
    # a field holds over time
    ({"field": "fill", "at_least": 80}, False),
    # any_of with a field in it: not momentary (field semantics, events count as false)
    ({"any_of": [{"field": "fire", "is": True}, {"event": ["fire"]}]}, False),
]


@pytest.mark.parametrize(("when", "momentary"), MOMENTARY)
def test_momentary(when: dict[str, Any], momentary: bool) -> None:
    assert rule("t.rule", when).momentary is momentary


# --- overrides -----------------------------------------------------------------------------


def cells_of(cell: str | None) -> tuple[str, ...]:
    """A cell and every cell above it: "g1.a.3" → ("g1.a.3", "g1.a", "g1")."""
    if not cell:
        return ()
    parts = cell.split(".")
    return tuple(".".join(parts[:i]) for i in range(len(parts), 0, -1))


BINS = {
    d.id: d
    for d in (
        DeviceInfo("top", "smart_bin", cell_id="g1"),
        DeviceInfo("mid", "smart_bin", cell_id="g1.a"),
        DeviceInfo("leaf", "smart_bin", cell_id="g1.a.3"),
        DeviceInfo("other", "smart_bin", cell_id="g2"),
        DeviceInfo("g10", "smart_bin", cell_id="g10"),  # looks like g1 as a string; is not
        DeviceInfo("nowhere", "smart_bin"),  # no cell yet
    )
}

FULL = rule("t.full", {"field": "fill", "at_least": 80})


def at_least(n: float) -> dict[str, Any]:
    return {"when": {"field": "fill", "at_least": n}}


def cell(cells: str, **set_: Any) -> dict[str, Any]:
    return {"rule": "t.full", "cells": cells.split(","), "set": set_}


def device(devices: str, **set_: Any) -> dict[str, Any]:
    return {"rule": "t.full", "devices": devices.split(","), "set": set_}


OVERRIDES = [
    # no override: 70 < 80
    ([], "leaf", 70, None),
    # no override: 85 ≥ 80
    ([], "leaf", 85, "minor"),
    # g1.a lowered to 60: a device of g1.a itself
    ([cell("g1.a", **at_least(60))], "mid", 70, "minor"),
    # ... and of its sub-cell g1.a.3
    ([cell("g1.a", **at_least(60))], "leaf", 70, "minor"),
    # ... but not of the cell above it
    ([cell("g1.a", **at_least(60))], "top", 70, None),
    # ... nor of another cell
    ([cell("g1.a", **at_least(60))], "other", 70, None),
    # g10 is not below g1, whatever the string prefix
    ([cell("g1", **at_least(60))], "g10", 70, None),
    # a device without a cell gets no cell override
    ([cell("g1", **at_least(60))], "nowhere", 70, None),
    # an override lists several cells
    ([cell("g2,g1", **at_least(60))], "other", 70, "minor"),
    # the device's own override (90) beats its cell's (60): 85 does not fire
    ([cell("g1.a", **at_least(60)), device("leaf", **at_least(90))], "leaf", 85, None),
    # ... whatever the order they are listed in
    ([device("leaf", **at_least(90)), cell("g1.a", **at_least(60))], "leaf", 85, None),
    # ... and only for that device: mid, in g1.a, keeps the cell's 60
    ([cell("g1.a", **at_least(60)), device("leaf", **at_least(90))], "mid", 70, "minor"),
    # an override changes only what it sets: the cell's severity, the device's threshold
    ([cell("g1", severity="major"), device("leaf", **at_least(60))], "leaf", 70, "major"),
    # enabled = false for g1: silent in g1 and below
    ([cell("g1", enabled=False)], "leaf", 95, None),
    # ... not elsewhere
    ([cell("g1", enabled=False)], "other", 95, "minor"),
    # enabled = false for one device
    ([device("leaf", enabled=False)], "leaf", 95, None),
    # disabled for the cell, enabled again for one device of it
    ([cell("g1", enabled=False), device("leaf", enabled=True)], "leaf", 95, "minor"),
    # the nearest cell wins: g1.a's 60, not g1's 90, for a device in g1.a.3
    pytest.param(
        [cell("g1.a", **at_least(60)), cell("g1", **at_least(90))],
        "leaf",
        70,
        "minor",
        id="nearest-cell-wins",
    ),
]


@pytest.mark.parametrize(("overrides", "device_id", "fill", "severity"), OVERRIDES)
def test_override(
    overrides: list[dict[str, Any]], device_id: str, fill: float, severity: str | None
) -> None:
    rules = RuleSet([FULL], [Override.model_validate(o) for o in overrides])
    harness = Harness(rules, devices=BINS, cells_of=cells_of)
    ops = harness.run([(0, "reading", device_id, {"fill": fill})])
    assert ops == ([(0, "raise", device_id, "t.full", severity, 1)] if severity else [])


OVERRIDE_SCENARIOS = [
    pytest.param(
        # for_s = 30 in g1: 85 at 0 fires by tick at 30, not at once
        [cell("g1", for_s=30)],
        [(0, "reading", "leaf", {"fill": 85}), (29, "tick"), (30, "tick")],
        [(30, "raise", "leaf", "t.full", "minor", 1)],
        id="for_s",
    ),
    pytest.param(
        # clear = below 30 for one device: 50 no longer clears it, 20 does
        [device("leaf", clear={"field": "fill", "below": 30})],
        [
            (0, "reading", "leaf", {"fill": 85}),
            (60, "reading", "leaf", {"fill": 50}),
            (120, "reading", "leaf", {"fill": 20}),
        ],
        [(0, "raise", "leaf", "t.full", "minor", 1), (120, "clear", "leaf", "t.full", "minor", 1)],
        id="clear",
    ),
    pytest.param(
        # levels for g1: 96 is major there
        [cell("g1", levels=[{"when": {"field": "fill", "at_least": 95}, "severity": "major"}])],
        [(0, "reading", "leaf", {"fill": 96}), (0, "reading", "other", {"fill": 96})],
        [(0, "raise", "leaf", "t.full", "major", 1), (0, "raise", "other", "t.full", "minor", 1)],
        id="levels",
    ),
    pytest.param(
        # unless for g1: a reading flagged test=true is ignored there
        [cell("g1", unless=[{"field": "test", "is": True}])],
        [
            (0, "reading", "leaf", {"fill": 96, "test": True}),
            (0, "reading", "other", {"fill": 96, "test": True}),
        ],
        [(0, "raise", "other", "t.full", "minor", 1)],
        id="unless",
    ),
]


@pytest.mark.parametrize(("overrides", "steps", "expected"), OVERRIDE_SCENARIOS)
def test_override_scenarios(
    overrides: list[dict[str, Any]], steps: list[Step], expected: list[Op]
) -> None:
    rules = RuleSet([FULL], [Override.model_validate(o) for o in overrides])
    assert Harness(rules, devices=BINS, cells_of=cells_of).run(steps) == expected


def test_override_follows_a_device_that_moved() -> None:
    # The registry moves "other" from g2 into g1.a: after forget_device_rules() it gets
    # g1.a's override.
    rules = RuleSet([FULL], [Override.model_validate(cell("g1.a", **at_least(60)))])
    devices = dict(BINS)
    harness = Harness(rules, devices=devices, cells_of=cells_of)
    assert harness.run([(0, "reading", "other", {"fill": 70})]) == []
    devices["other"] = DeviceInfo("other", "smart_bin", cell_id="g1.a.7")
    harness.engine.forget_device_rules()
    ops = harness.run([(60, "reading", "other", {"fill": 70})])
    assert ops == [(60, "raise", "other", "t.full", "minor", 1)]


def test_overrides_from_a_file(tmp_path: Path) -> None:
    # [[overrides]] in an extra dir change a shipped rule; the default cells_of is the cell.
    (tmp_path / "g1.toml").write_text(
        '[[overrides]]\nrule = "bin.full"\ncells = ["g1"]\n'
        'set = { when = { field = "fill", at_least = 60 }, severity = "major" }\n\n'
        '[[overrides]]\nrule = "bin.offline"\ndevices = ["b2"]\nset = { enabled = false }\n',
        "utf-8",
    )
    rules = load_rules(extra_dirs=[tmp_path])
    devices = {
        "b1": DeviceInfo("b1", "smart_bin", cell_id="g1", interval_s=60),
        "b2": DeviceInfo("b2", "smart_bin", cell_id="g2", interval_s=60),
    }
    steps = [(0, "reading", "b1", {"fill": 65}), (0, "reading", "b2", {"fill": 65}), (180, "tick")]
    assert Harness(rules, devices=devices).run(steps) == [
        (0, "raise", "b1", "bin.full", "major", 1),
        (180, "raise", "b1", "bin.offline", "warning", 1),  # b2's offline rule is disabled
    ]


def test_overrides_that_combine_into_an_invalid_rule(tmp_path: Path) -> None:
    (tmp_path / "lid.toml").write_text(
        'kind = "smart_bin"\n\n[[rules]]\nid = "bin.lid"\nseverity = "minor"\n'
        'when = { field = "lid_open", is = true }\n\n'
        '[[overrides]]\nrule = "bin.lid"\ncells = ["g1"]\n'
        'set = { clear = { field = "lid_open", is = false } }\n\n'
        '[[overrides]]\nrule = "bin.lid"\ndevices = ["b1"]\n'
        'set = { when = { event = ["lid_opened"] } }\n',
        "utf-8",
    )
    # "validated into frozen models at start": a RulesError now, not an error per reading.
    with pytest.raises(RulesError):
        load_rules(extra_dirs=[tmp_path])


# --- validation of rule files --------------------------------------------------------------

RULE_HEAD = 'kind = "smart_bin"\n\n[[rules]]\nid = "{id}"\nseverity = "minor"\n'


def bin_rule(rule_id: str, body: str) -> str:
    return RULE_HEAD.format(id=rule_id) + body + "\n"


# (case id, file name, content, substrings one problem must hold, problem names its file)
# fmt: off
BAD_FILES: list[tuple[str, str, str | bytes, list[str], bool]] = [
    # a key the language does not have
    ("unknown-key", "colour.toml",
     bin_rule("bin.colourful", 'colour = "red"\nwhen = { field = "fill", above = 80 }'),
     ["rule bin.colourful", "key colour", "Extra inputs are not permitted"], True),
    # an unknown key inside a condition
    ("unknown-condition-key", "cond_key.toml",
     bin_rule("bin.cond_key", 'when = { field = "fill", above = 80, unit = "%" }'),
     ["rule bin.cond_key", "unit", "Extra inputs are not permitted"], True),
    # two tests in one field condition: which one?
    ("two-tests", "two.toml",
     bin_rule("bin.two_tests", 'when = { field = "fill", above = 80, below = 90 }'),
     ["rule bin.two_tests", "when", "give exactly one of above, at_least, below, at_most, is"],
     True),
    # a field condition without a test
    ("no-test", "none.toml", bin_rule("bin.no_test", 'when = { field = "fill" }'),
     ["rule bin.no_test", "give exactly one of"], True),
    # a device kind that does not exist
    ("unknown-device-kind", "lamp.toml",
     'kind = "lamp_post"\n\n[[rules]]\nid = "lamp.dark"\nseverity = "minor"\n'
     'when = { field = "lux", below = 5 }\n',
     ["rule lamp.dark", "unknown kind 'lamp_post'"], True),
    # a kind of condition that does not exist
    ("unknown-condition-kind", "median.toml",
     bin_rule("bin.median", 'when = { median = "fill", above = 3 }'),
     ["rule bin.median", "key when", "a condition needs one of the keys"], True),
    # a correlation of a rule nobody defined
    ("correlate-unknown", "ghost.toml",
     'kind = "smoke_detector"\n\n[[rules]]\nid = "smoke.ghost_confirmed"\n'
     'severity = "critical"\n'
     'when = { correlate = "smoke.ghost", min_devices = 2, within_s = 60 }\n',
     ["rule smoke.ghost_confirmed", "key when.correlate", "unknown rule 'smoke.ghost'"], True),
    # not TOML
    ("bad-toml", "broken.toml", 'kind = "smart_bin"\n[[rules]\nid = \n', ["cannot read"], True),
    # not UTF-8
    ("not-utf8", "latin1.toml", b'kind = "smart_bin" # \xe9\xe9\n', ["cannot read"], True),
    # a momentary condition with `clear`
    ("momentary-with-clear", "door_x.toml",
     bin_rule("bin.x", 'when = { event = ["x"] }\nclear = { field = "fill", below = 30 }'),
     ["rule bin.x", "a momentary condition clears by clear_after_s, not clear"], True),
    # an absence rule with for_s
    ("absence-with-for_s", "silence.toml",
     bin_rule("bin.silent", "when = { absent_for_intervals = 2 }\nfor_s = 10"),
     ["rule bin.silent", "absence and correlation rules take neither for_s nor clear"], True),
    # an id that is not dotted lower case
    ("bad-id", "id.toml", bin_rule("Bin Full", 'when = { field = "fill", above = 80 }'),
     ["rule Bin Full", "key id", "should match pattern"], True),
    # a severity that does not exist
    ("bad-severity", "severity.toml",
     RULE_HEAD.format(id="bin.x").replace('"minor"', '"urgent"')
     + 'when = { field = "fill", above = 80 }\n',
     ["rule bin.x", "key severity"], True),
    # out of range: a count of 1 is not a burst
    ("count-of-one", "count.toml",
     bin_rule("bin.burst", 'when = { count = { event = ["x"] }, at_least = 1, within_s = 60 }'),
     ["rule bin.burst", "at_least", "greater than or equal to 2"], True),
    # an override of a key that cannot be overridden
    ("override-unknown-key", "ov_key.toml",
     '[[overrides]]\nrule = "bin.full"\ncells = ["g1"]\nset = { id = "bin.other" }\n',
     ["override bin.full", "cannot override ['id']"], True),
    # an override for nobody
    ("override-no-target", "ov_target.toml",
     '[[overrides]]\nrule = "bin.full"\nset = { severity = "major" }\n',
     ["override bin.full", "an override needs cells or devices"], True),
    # an override of a rule nobody defined
    ("override-unknown-rule", "ov_rule.toml",
     '[[overrides]]\nrule = "bin.nope"\ncells = ["g1"]\nset = { severity = "major" }\n',
     ["bin.nope", "unknown rule"], True),
    # an override that makes the rule invalid: for_s on an absence rule
    ("override-invalid-rule", "ov_invalid.toml",
     '[[overrides]]\nrule = "bin.offline"\ndevices = ["b1"]\nset = { for_s = 30 }\n',
     ["bin.offline", "neither for_s nor clear"], True),
]
# fmt: on


def write(folder: Path, name: str, content: str | bytes) -> None:
    if isinstance(content, bytes):
        (folder / name).write_bytes(content)
    else:
        (folder / name).write_text(content, "utf-8")


def problems_of(folder: Path) -> list[str]:
    with pytest.raises(RulesError) as caught:
        load_rules(extra_dirs=[folder])
    problems = caught.value.problems
    assert str(caught.value).startswith("invalid rules:")
    assert all(f"  - {p}" in str(caught.value) for p in problems)
    return problems


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        pytest.param(name, content, expected, id=case)
        for case, name, content, expected, _ in BAD_FILES
    ],
)
def test_bad_file(tmp_path: Path, name: str, content: str | bytes, expected: list[str]) -> None:
    write(tmp_path, name, content)
    problems = problems_of(tmp_path)
    assert any(all(s in p for s in expected) for p in problems), problems


@pytest.mark.parametrize(
    ("name", "content"),
    [
        pytest.param(name, content, id=case)
        for case, name, content, _, names_file in BAD_FILES
        if names_file
    ],
)
def test_bad_file_problems_name_the_file(tmp_path: Path, name: str, content: str | bytes) -> None:
    write(tmp_path, name, content)
    assert all(p.startswith(f"{name}: ") for p in problems_of(tmp_path))


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            case,
            id=case,
            marks=(),
        )
        for case, *_ in BAD_FILES
    ],
)
def test_every_problem_is_listed(tmp_path: Path, case: str) -> None:
    # All bad files at once: one RulesError still holds this case's problem.
    for _, name, content, _, _ in BAD_FILES:
        write(tmp_path, name, content)
    problems = problems_of(tmp_path)
    expected = next(e for c, _, _, e, _ in BAD_FILES if c == case)
    assert any(all(s in p for s in expected) for p in problems), problems


def test_every_problem_is_listed_across_files(tmp_path: Path) -> None:
    # Problems of different stages (parse, kind, correlation, override) come together.
    write(tmp_path, "a.toml", "not toml at all")
    write(tmp_path, "b.toml", bin_rule("bin.b", 'when = { field = "fill", above = 80, x = 1 }'))
    write(
        tmp_path,
        "c.toml",
        'kind = "lamp_post"\n\n[[rules]]\nid = "lamp.c"\nseverity = "minor"\n'
        'when = { event = ["x"] }\n',
    )
    write(
        tmp_path,
        "d.toml",
        'kind = "smoke_detector"\n\n[[rules]]\nid = "smoke.d"\nseverity = "major"\n'
        'when = { correlate = "smoke.nope", min_devices = 2, within_s = 9 }\n\n'
        '[[overrides]]\nrule = "bin.nope"\ndevices = ["x"]\nset = { severity = "major" }\n',
    )
    problems = problems_of(tmp_path)
    for expected in (
        ["a.toml", "cannot read"],
        ["b.toml", "rule bin.b", "Extra inputs are not permitted"],
        ["c.toml", "rule lamp.c", "unknown kind"],
        ["rule smoke.d", "unknown rule 'smoke.nope'"],
        ["override of bin.nope", "unknown rule 'bin.nope'"],
    ):
        assert any(all(s in p for s in expected) for p in problems), (expected, problems)


def test_one_mistake_one_problem(tmp_path: Path) -> None:
    write(
        tmp_path, "two.toml", bin_rule("bin.two", 'when = { field = "fill", above = 1, below = 9 }')
    )
    assert problems_of(tmp_path) == [
        "two.toml: rule bin.two, key when: "
        "Value error, give exactly one of above, at_least, below, at_most, is"
    ]


def test_valid_extra_dir_loads(tmp_path: Path) -> None:
    write(tmp_path, "extra.toml", bin_rule("bin.lid_open", 'when = { field = "lid", is = true }'))
    rules = load_rules(extra_dirs=[tmp_path])
    assert rules.rules["bin.lid_open"].kind == "smart_bin"
    assert rules.rules["bin.lid_open"] in rules.by_kind["smart_bin"]
    assert "bin.full" in rules.rules  # the defaults are still there


def test_extra_rule_replaces_the_default(tmp_path: Path) -> None:
    # Same id as the shipped bin.full: the extra dir's rule replaces it, once.
    write(tmp_path, "full.toml", bin_rule("bin.full", 'when = { field = "fill", at_least = 70 }'))
    rules = load_rules(extra_dirs=[tmp_path])
    replaced = rules.rules["bin.full"]
    assert replaced.when == rule("x.y", {"field": "fill", "at_least": 70}).when
    assert replaced.levels == []  # nothing kept from the default
    assert replaced.clear is None
    assert [r.id for r in rules.by_kind["smart_bin"]].count("bin.full") == 1
    devices = {"b": DeviceInfo("b", "smart_bin", cell_id="g1")}
    steps = [(0, "reading", "b", {"fill": 75}), (60, "reading", "b", {"fill": 50})]
    assert Harness(rules, devices=devices).run(steps) == [
        (0, "raise", "b", "bin.full", "minor", 1),
        (60, "clear", "b", "bin.full", "minor", 1),  # no `clear` any more: clears under 70
    ]


def test_later_extra_dir_wins(tmp_path: Path) -> None:
    first, second = tmp_path / "1", tmp_path / "2"
    first.mkdir()
    second.mkdir()
    write(first, "full.toml", bin_rule("bin.full", 'when = { field = "fill", at_least = 70 }'))
    write(second, "full.toml", bin_rule("bin.full", 'when = { field = "fill", at_least = 60 }'))
    when = load_rules(extra_dirs=[first, second]).rules["bin.full"].when
    assert when == rule("x.y", {"field": "fill", "at_least": 60}).when


def test_rule_models_are_frozen() -> None:
    with pytest.raises(ValueError, match="frozen"):
        FULL.severity = "major"  # type: ignore[misc]
    assert isinstance(load_rules().rules["bin.full"], Rule)


def test_devices_no_override_names_share_their_cells_plan() -> None:
    # One plan entry per (kind, cell) for the devices no override names, one of its own
    # for a device an override names: 1,000 bins in one cell, one of them named.
    named = Override.model_validate(
        {"rule": "t.full", "devices": ["bin-7"], "set": {"severity": "major"}}
    )
    devices = {f"bin-{i}": DeviceInfo(f"bin-{i}", "smart_bin", cell_id="g1") for i in range(1000)}
    harness = Harness(RuleSet([FULL], [named]), devices=devices, cells_of=cells_of)
    steps = [(0, "reading", device_id, {"fill": 95}) for device_id in ("bin-6", "bin-7", "bin-8")]
    steps += [(1, "reading", device_id, {"fill": 10}) for device_id in devices]
    ops = harness.run(steps)
    assert [op for op in ops if op[1] == "raise"] == [
        (0, "raise", "bin-6", "t.full", "minor", 1),
        (0, "raise", "bin-7", "t.full", "major", 1),  # its own override
        (0, "raise", "bin-8", "t.full", "minor", 1),
    ]
    assert len(harness.engine._plans) == 2
