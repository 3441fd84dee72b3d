"""The rule engine, driven by an injected clock: table-driven scenarios, Alertmanager style.

The engine has no clock of its own: a scenario gives every reading its time and calls
`tick(now)` explicitly. A scenario is a list of steps (times in seconds from T0):

    (t, "reading", device, {fields})        one telemetry reading
    (t, "event", device, "door_forced")     one event
    (t, "batch", [step, step, …])           several messages in one evaluate() (steps without t)
    (t, "tick")                             timers due by t
    (t, "expect", device)                   watch a never-heard device for silence from t
    (t, "restart")                          a new engine loaded from what the DB holds

and the expected alarm operations are `(t, "raise" | "clear", source, rule, severity, count)`.
After each step the harness commits the evaluation as the service does (and keeps the
states, last-heard times and telemetry a database would hold, JSON round-tripped, for
"restart").

Every case carries a comment saying why it fires or not.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gridwarden.readings import DeviceInfo, Reading
from rules.engine import FLAP_COUNT, FLAP_HOLD_S, FLAP_WINDOW_S, AlarmOp, Engine, Evaluation
from rules.spec import Rule, RuleSet, load_rules

# --- the harness ---------------------------------------------------------------------------

T0 = datetime(2025, 6, 1, 8, 0, tzinfo=UTC)

Step = tuple[Any, ...]
Op = tuple[float, str, str, str, str, int]

DEVICES: dict[str, DeviceInfo] = {
    d.id: d
    for d in (
        DeviceInfo("bin", "smart_bin", cell_id="g1"),
        DeviceInfo("door", "door_access", cell_id="g1"),
        DeviceInfo("door_a", "door_access", cell_id="g1", interval_s=60),  # reports every minute
        DeviceInfo("sd1", "smoke_detector", cell_id="g1", building="b1"),
        DeviceInfo("sd2", "smoke_detector", cell_id="g1", building="b1"),
        DeviceInfo("sd3", "smoke_detector", cell_id="g1", building="b2"),
        DeviceInfo("sd4", "smoke_detector", cell_id="g2", building="b1"),  # b1 of another cell
        DeviceInfo("sd", "smoke_detector", cell_id="g1"),  # no building: never correlated
        DeviceInfo("mh", "manhole_cover", cell_id="g1"),
    )
}


def at(t: float) -> datetime:
    return T0 + timedelta(seconds=t)


def reading(t: float, channel: str, device: str, payload: Any) -> Reading:
    """`payload` is the fields of a reading, or the name of an event."""
    if channel == "event":
        return Reading("event", device, at(t), at(t), None, {}, event=payload)
    assert channel == "reading", channel
    return Reading("telemetry", device, at(t), at(t), None, dict(payload))


def as_op(op: AlarmOp) -> Op:
    t = (op.at - T0).total_seconds()
    return (int(t) if t == int(t) else t, op.action, op.source, op.rule, op.severity, op.count)


class Harness:
    """One engine and what the database would hold: rule states and last-heard times."""

    def __init__(
        self,
        ruleset: RuleSet,
        devices: dict[str, DeviceInfo] = DEVICES,
        cells_of: Callable[[str | None], tuple[str, ...]] | None = None,
        muted: Callable[[DeviceInfo, datetime], bool] | None = None,
    ) -> None:
        self.ruleset = ruleset
        self.devices = devices
        self.options: dict[str, Any] = {}
        if cells_of is not None:
            self.options["cells_of"] = cells_of
        if muted is not None:
            self.options["muted"] = muted
        self.db_states: dict[tuple[str, str], dict[str, Any]] = {}
        self.db_heard: dict[str, float] = {}
        self.db_telemetry: list[Reading] = []
        self.evaluations: list[Evaluation] = []
        self.engine = self._new_engine()

    def _new_engine(self) -> Engine:
        return Engine(self.ruleset, self.devices.get, **self.options)

    def restart(self, t: float) -> None:
        """A new process at `t`: a fresh engine loaded from the database (rule states,
        last-heard times, and the telemetry of the rate-of-rise window), the old one gone."""
        self.engine = self._new_engine()
        states = [
            (source, rule_id, json.loads(json.dumps(state)))
            for (source, rule_id), state in self.db_states.items()
        ]
        self.engine.load(states, dict(self.db_heard))
        window_s, _ = self.ruleset.rate_of_rise_scope()
        since = at(t) - timedelta(seconds=window_s)
        self.engine.restore_samples([r for r in self.db_telemetry if r.received_at > since])

    def step(self, step: Step) -> list[Op]:
        t, action, *args = step
        if action == "tick":
            evaluation = self.engine.tick(at(t))
        elif action == "expect":
            self.engine.expect(args[0], at(t).timestamp())
            return []
        elif action == "restart":
            self.restart(t)
            return []
        elif action == "batch":
            readings = [reading(t, *item) for item in args[0]]
            evaluation = self.engine.evaluate(readings)
        else:
            readings = [reading(t, action, *args)]
            evaluation = self.engine.evaluate(readings)
        # The service writes states (but the unsaved), ops and readings in one transaction,
        # then commits.
        if action != "tick":
            self.db_telemetry += [r for r in readings if r.channel == "telemetry"]
        for key, state in evaluation.states.items():
            if key in evaluation.unsaved:
                continue
            if state is None:
                self.db_states.pop(key, None)
            else:
                self.db_states[key] = json.loads(json.dumps(state))
        for device, heard in evaluation.heard.items():
            self.db_heard[device] = max(heard, self.db_heard.get(device, heard))
        self.engine.commit(evaluation)
        self.evaluations.append(evaluation)
        return [as_op(op) for op in evaluation.ops]

    def run(self, steps: Iterable[Step]) -> list[Op]:
        ops: list[Op] = []
        for step in steps:
            ops += self.step(step)
        return ops


def rule(rule_id: str, when: dict[str, Any], **options: Any) -> Rule:
    """A custom rule for smart bins (device "bin"), severity minor unless given."""
    data = {"id": rule_id, "kind": "smart_bin", "severity": "minor", "when": when, **options}
    return Rule.model_validate(data)


def ruleset(*rules: Rule) -> RuleSet:
    return RuleSet(rules)


def run(rules: RuleSet, steps: Sequence[Step], **options: Any) -> list[Op]:
    return Harness(rules, **options).run(steps)


# --- field thresholds ----------------------------------------------------------------------

THRESHOLDS = [
    # 81 > 80: `above` holds
    ({"field": "fill", "above": 80}, 81, True),
    # 80 is not above 80: `above` is strict
    ({"field": "fill", "above": 80}, 80, False),
    # 80 ≥ 80: `at_least` includes its bound
    ({"field": "fill", "at_least": 80}, 80, True),
    # 79.9 < 80: not at least 80
    ({"field": "fill", "at_least": 80}, 79.9, False),
    # 14 < 15: `below` holds
    ({"field": "battery", "below": 15}, 14, True),
    # 15 is not below 15: `below` is strict
    ({"field": "battery", "below": 15}, 15, False),
    # 15 ≤ 15: `at_most` includes its bound
    ({"field": "battery", "at_most": 15}, 15, True),
    # 16 > 15: not at most 15
    ({"field": "battery", "at_most": 15}, 16, False),
    # 0 is a value, not a missing field
    ({"field": "fill", "at_most": 0}, 0, True),
    # negative values compare as numbers
    ({"field": "temperature", "below": -10}, -12.5, True),
    # is = true matches true
    ({"field": "door_open", "is": True}, True, True),
    # is = true does not match false
    ({"field": "door_open", "is": True}, False, False),
    # is = false matches false
    ({"field": "door_open", "is": False}, False, True),
    # is = false does not match true
    ({"field": "door_open", "is": False}, True, False),
    # a boolean is not a number: true does not pass a numeric threshold
    ({"field": "fill", "at_least": 0}, True, False),
]


@pytest.mark.parametrize(("when", "value", "fires"), THRESHOLDS)
def test_threshold(when: dict[str, Any], value: Any, fires: bool) -> None:
    rules = ruleset(rule("t.rule", when))
    ops = run(rules, [(0, "reading", "bin", {when["field"]: value})])
    assert ops == ([(0, "raise", "bin", "t.rule", "minor", 1)] if fires else [])


FILL_80 = {"field": "fill", "at_least": 80}
FILL_BELOW_30 = {"field": "fill", "below": 30}

MISSING_FIELD = [
    pytest.param(
        # no `fill` in the reading: says nothing, so no raise
        [(0, "reading", "bin", {"battery": 90})],
        [],
        id="not-firing-stays-quiet",
    ),
    pytest.param(
        # firing, then a reading without `fill`: `when` neither holds nor stops holding
        [(0, "reading", "bin", {"fill": 85}), (60, "reading", "bin", {"battery": 90})],
        [(0, "raise", "bin", "t.rule", "minor", 1)],
        id="firing-no-clear-no-repeat",
    ),
    pytest.param(
        # ... and the next reading that has the field below 80 does clear it
        [
            (0, "reading", "bin", {"fill": 85}),
            (60, "reading", "bin", {"battery": 90}),
            (120, "reading", "bin", {"fill": 10}),
        ],
        [(0, "raise", "bin", "t.rule", "minor", 1), (120, "clear", "bin", "t.rule", "minor", 1)],
        id="firing-cleared-by-next-real-value",
    ),
    pytest.param(
        # an event has no fields at all: it says nothing to a field rule
        [(0, "reading", "bin", {"fill": 85}), (60, "event", "bin", "knocked_over")],
        [(0, "raise", "bin", "t.rule", "minor", 1)],
        id="event-says-nothing",
    ),
    pytest.param(
        # a null value is a missing value
        [(0, "reading", "bin", {"fill": 85}), (60, "reading", "bin", {"fill": None})],
        [(0, "raise", "bin", "t.rule", "minor", 1)],
        id="null-is-missing",
    ),
]


@pytest.mark.parametrize(("steps", "expected"), MISSING_FIELD)
def test_reading_without_the_field(steps: list[Step], expected: list[Op]) -> None:
    assert run(ruleset(rule("t.rule", FILL_80)), steps) == expected


@pytest.mark.parametrize(("steps", "expected"), MISSING_FIELD[1:3])
def test_reading_without_the_field_with_hysteresis(steps: list[Step], expected: list[Op]) -> None:
    # Same with a `clear` condition: the clear test says nothing either.
    assert run(ruleset(rule("t.rule", FILL_80, clear=FILL_BELOW_30)), steps) == expected


# --- hysteresis ----------------------------------------------------------------------------

HYSTERESIS = [
    pytest.param(
        # 85 ≥ 80 raises; 50 is neither ≥ 80 nor < 30: still firing, no op; 25 < 30 clears
        True,
        [
            (0, "reading", "bin", {"fill": 85}),
            (60, "reading", "bin", {"fill": 50}),
            (120, "reading", "bin", {"fill": 25}),
        ],
        [(0, "raise", "bin", "t.full", "minor", 1), (120, "clear", "bin", "t.full", "minor", 1)],
        id="clear-band",
    ),
    pytest.param(
        # 30 is not below 30: the clear bound is strict, still firing
        True,
        [(0, "reading", "bin", {"fill": 85}), (60, "reading", "bin", {"fill": 30})],
        [(0, "raise", "bin", "t.full", "minor", 1)],
        id="clear-bound-strict",
    ),
    pytest.param(
        # never raised: a value in the clear range has nothing to clear
        True,
        [(0, "reading", "bin", {"fill": 10})],
        [],
        id="clear-without-raise",
    ),
    pytest.param(
        # in the band from the start: not ≥ 80, so nothing
        True,
        [(0, "reading", "bin", {"fill": 50})],
        [],
        id="band-without-raise",
    ),
    pytest.param(
        # cleared, then ≥ 80 again: a new raise
        True,
        [
            (0, "reading", "bin", {"fill": 85}),
            (60, "reading", "bin", {"fill": 25}),
            (120, "reading", "bin", {"fill": 81}),
        ],
        [
            (0, "raise", "bin", "t.full", "minor", 1),
            (60, "clear", "bin", "t.full", "minor", 1),
            (120, "raise", "bin", "t.full", "minor", 1),
        ],
        id="raise-again-after-clear",
    ),
    pytest.param(
        # without `clear`: 50 no longer ≥ 80, so it clears at once
        False,
        [(0, "reading", "bin", {"fill": 85}), (60, "reading", "bin", {"fill": 50})],
        [(0, "raise", "bin", "t.full", "minor", 1), (60, "clear", "bin", "t.full", "minor", 1)],
        id="no-clear-condition",
    ),
    pytest.param(
        # without `clear`: 79.9 is the first value that stops `when` holding
        False,
        [(0, "reading", "bin", {"fill": 80}), (60, "reading", "bin", {"fill": 79.9})],
        [(0, "raise", "bin", "t.full", "minor", 1), (60, "clear", "bin", "t.full", "minor", 1)],
        id="no-clear-condition-bound",
    ),
]


@pytest.mark.parametrize(("with_clear", "steps", "expected"), HYSTERESIS)
def test_hysteresis(with_clear: bool, steps: list[Step], expected: list[Op]) -> None:
    options = {"clear": FILL_BELOW_30} if with_clear else {}
    assert run(ruleset(rule("t.full", FILL_80, **options)), steps) == expected


# --- repeats and levels (shipped bin.full: ≥ 80 minor, ≥ 95 major, clears < 30) -------------

REPEATS = [
    pytest.param(
        # still ≥ 80 while firing: a repeat raise (the DB counts it)
        [(0, "reading", "bin", {"fill": 85}), (60, "reading", "bin", {"fill": 90})],
        [(0, "raise", "bin", "bin.full", "minor", 1), (60, "raise", "bin", "bin.full", "minor", 1)],
        id="repeat",
    ),
    pytest.param(
        # 96 ≥ 95 meets the level: the repeat carries major
        [(0, "reading", "bin", {"fill": 85}), (60, "reading", "bin", {"fill": 96})],
        [(0, "raise", "bin", "bin.full", "minor", 1), (60, "raise", "bin", "bin.full", "major", 1)],
        id="level-on-repeat",
    ),
    pytest.param(
        # straight to 95: the level's bound is inclusive, raised major at once
        [(0, "reading", "bin", {"fill": 95})],
        [(0, "raise", "bin", "bin.full", "major", 1)],
        id="level-at-once",
    ),
    pytest.param(
        # each op carries the severity of its own reading
        [(0, "reading", "bin", {"fill": 96}), (60, "reading", "bin", {"fill": 85})],
        [(0, "raise", "bin", "bin.full", "major", 1), (60, "raise", "bin", "bin.full", "minor", 1)],
        id="level-per-reading",
    ),
    pytest.param(
        # two raises in one evaluation fold into one op: count 2, the highest severity
        [(0, "batch", [("reading", "bin", {"fill": 85}), ("reading", "bin", {"fill": 96})])],
        [(0, "raise", "bin", "bin.full", "major", 2)],
        id="batch-folds",
    ),
    pytest.param(
        # a value in the band while firing: no repeat (`when` does not hold), no clear
        [(0, "reading", "bin", {"fill": 85}), (60, "reading", "bin", {"fill": 79})],
        [(0, "raise", "bin", "bin.full", "minor", 1)],
        id="band-no-repeat",
    ),
]


@pytest.mark.parametrize(("steps", "expected"), REPEATS)
def test_repeats_and_levels(steps: list[Step], expected: list[Op]) -> None:
    assert run(load_rules(), steps) == expected


LEVELS_ELSEWHERE = [
    # tilt 50 > 45: manhole.tilted's critical level
    ("manhole_cover", "manhole.tilted", {"tilt": 50}, "critical"),
    # tilt 20 > 10 but not > 45: the base severity
    ("manhole_cover", "manhole.tilted", {"tilt": 20}, "major"),
    # 25 % LEL methane: the second (critical) alarm level
    ("manhole_cover", "manhole.methane", {"gas_ch4": 25}, "critical"),
    # 150 ppm CO: critical
    ("smoke_detector", "smoke.co_high", {"co": 150}, "critical"),
]


@pytest.mark.parametrize(("kind", "rule_id", "values", "severity"), LEVELS_ELSEWHERE)
def test_levels_of_the_defaults(
    kind: str, rule_id: str, values: dict[str, Any], severity: str
) -> None:
    devices = {"d": DeviceInfo("d", kind, cell_id="g1")}
    ops = run(load_rules(), [(0, "reading", "d", values)], devices=devices)
    assert ops == [(0, "raise", "d", rule_id, severity, 1)]


# --- duration: for_s -----------------------------------------------------------------------

OPEN = {"door_open": True}
SHUT = {"door_open": False}


DURATION = [
    pytest.param(
        # open at 0 and still open at 300: the reading completing the 300 s fires
        [(0, "reading", "bin", OPEN), (300, "reading", "bin", OPEN)],
        [(300, "raise", "bin", "t.held", "minor", 1)],
        id="fired-by-reading",
    ),
    pytest.param(
        # 299 s held is not 300: nothing yet
        [(0, "reading", "bin", OPEN), (299, "reading", "bin", OPEN)],
        [],
        id="one-second-short",
    ),
    pytest.param(
        # open at 0 and no further message: tick fires at the deadline, not at 299
        [(0, "reading", "bin", OPEN), (299, "tick"), (300, "tick")],
        [(300, "raise", "bin", "t.held", "minor", 1)],
        id="fired-by-tick",
    ),
    pytest.param(
        # a late tick fires at its own time, once; later ticks repeat nothing
        [(0, "reading", "bin", OPEN), (450, "tick"), (900, "tick")],
        [(450, "raise", "bin", "t.held", "minor", 1)],
        id="late-tick-fires-once",
    ),
    pytest.param(
        # shut at 100: the period is interrupted, the 300 s deadline passes quietly
        [
            (0, "reading", "bin", OPEN),
            (100, "reading", "bin", SHUT),
            (300, "tick"),
            (1000, "tick"),
        ],
        [],
        id="interrupted",
    ),
    pytest.param(
        # interrupted at 100, open again at 200: a new period, due at 500
        [
            (0, "reading", "bin", OPEN),
            (100, "reading", "bin", SHUT),
            (200, "reading", "bin", OPEN),
            (300, "tick"),
            (499, "tick"),
            (500, "tick"),
        ],
        [(500, "raise", "bin", "t.held", "minor", 1)],
        id="restarted-period",
    ),
    pytest.param(
        # a reading without door_open says nothing: the period is not interrupted
        [
            (0, "reading", "bin", OPEN),
            (100, "reading", "bin", {"battery": 80}),
            (300, "reading", "bin", OPEN),
        ],
        [(300, "raise", "bin", "t.held", "minor", 1)],
        id="missing-field-does-not-interrupt",
    ),
    pytest.param(
        # fired by tick, then shut: cleared by the reading
        [(0, "reading", "bin", OPEN), (300, "tick"), (400, "reading", "bin", SHUT)],
        [(300, "raise", "bin", "t.held", "minor", 1), (400, "clear", "bin", "t.held", "minor", 1)],
        id="tick-fired-then-cleared",
    ),
    pytest.param(
        # fired, then still open: repeats need no new period
        [
            (0, "reading", "bin", OPEN),
            (300, "reading", "bin", OPEN),
            (330, "reading", "bin", OPEN),
        ],
        [(300, "raise", "bin", "t.held", "minor", 1), (330, "raise", "bin", "t.held", "minor", 1)],
        id="repeat-after-firing",
    ),
    pytest.param(
        # open reported at 0, 100 and 200, then silence: one raise at 300, counted once
        [
            (0, "reading", "bin", OPEN),
            (100, "reading", "bin", OPEN),
            (200, "reading", "bin", OPEN),
            (300, "tick"),
        ],
        [(300, "raise", "bin", "t.held", "minor", 1)],
        id="several-readings-then-tick",
    ),
    pytest.param(
        # a period restarted at 200 (due 500) and one late tick at 600: one raise
        [
            (0, "reading", "bin", OPEN),
            (100, "reading", "bin", SHUT),
            (200, "reading", "bin", OPEN),
            (600, "tick"),
        ],
        [(600, "raise", "bin", "t.held", "minor", 1)],
        id="late-tick-after-restarted-period",
    ),
]


@pytest.mark.parametrize(("steps", "expected"), DURATION)
def test_duration(steps: list[Step], expected: list[Op]) -> None:
    rules = ruleset(
        rule(
            "t.held",
            {"field": "door_open", "is": True},
            for_s=300,
            clear={"field": "door_open", "is": False},
        )
    )
    assert run(rules, steps) == expected


DURATION_DEFAULTS = [
    pytest.param(
        # door.held_open: open 5 min with no further message, fired by tick
        [(0, "reading", "door", OPEN), (299, "tick"), (300, "tick")],
        [(300, "raise", "door", "door.held_open", "minor", 1)],
        id="door-held-open",
    ),
    pytest.param(
        # obscuration 30 > 25 held 10 s, the reading completing it: critical level
        [(0, "reading", "sd1", {"smoke": 30}), (10, "reading", "sd1", {"smoke": 30})],
        [(10, "raise", "sd1", "smoke.obscuration_high", "critical", 1)],
        id="obscuration-level-by-reading",
    ),
    pytest.param(
        # a puff: 12 at 0, 3 at 5 interrupts the 10 s, nothing
        [(0, "reading", "sd1", {"smoke": 12}), (5, "reading", "sd1", {"smoke": 3}), (10, "tick")],
        [],
        id="obscuration-puff",
    ),
    pytest.param(
        # obscuration 30 > 25 held 10 s, completed by tick: the same critical level
        [(0, "reading", "sd1", {"smoke": 30}), (10, "tick")],
        [(10, "raise", "sd1", "smoke.obscuration_high", "critical", 1)],
        id="obscuration-level-by-tick",
    ),
]


@pytest.mark.parametrize(("steps", "expected"), DURATION_DEFAULTS)
def test_duration_defaults(steps: list[Step], expected: list[Op]) -> None:
    assert run(load_rules(), steps) == expected


# --- rate of rise (shipped smoke.heat_rate_of_rise: +8 °C within 60 s, clears after 600 s) --


def temps(*points: tuple[float, float]) -> list[Step]:
    return [(t, "reading", "sd1", {"temperature": value}) for t, value in points]


def rate_raise(t: float) -> Op:
    return (t, "raise", "sd1", "smoke.heat_rate_of_rise", "critical", 1)


def rate_clear(t: float) -> Op:
    return (t, "clear", "sd1", "smoke.heat_rate_of_rise", "critical", 1)


RATE = [
    # +8 °C within 60 s (20 → 28): fires
    pytest.param(temps((0, 20), (60, 28)), [rate_raise(60)], id="plus-8-in-60s"),
    # +8 °C in 61 s: the first sample left the window
    pytest.param(temps((0, 20), (61, 28)), [], id="plus-8-in-61s"),
    # +8 °C over 120 s, 4 per minute: never 8 within one window
    pytest.param(temps((0, 20), (60, 24), (120, 28)), [], id="plus-8-over-120s"),
    # +7.9 within 60 s: below `by`
    pytest.param(temps((0, 20), (30, 27.9)), [], id="plus-7.9"),
    # 20 at 0 is older than 60 s at t=100: the rise counts from 25 (at 50), only +3
    pytest.param(temps((0, 20), (50, 25), (100, 28)), [], id="old-samples-dropped"),
    # the rise counts from the lowest sample in the window, 20 at 30, not the first
    pytest.param(temps((0, 30), (30, 20), (90, 28)), [rate_raise(90)], id="from-window-minimum"),
    # a fall is no rise
    pytest.param(temps((0, 28), (30, 20)), [], id="falling"),
    # momentary: still +8 or more within the window at 50, so a repeat raise
    pytest.param(temps((0, 20), (30, 28), (50, 30)), [rate_raise(30), rate_raise(50)], id="repeat"),
    # a reading without temperature is ignored: 20 still the window's minimum at 40
    pytest.param(
        [*temps((0, 20)), (20, "reading", "sd1", {"battery": 90}), *temps((40, 28))],
        [rate_raise(40)],
        id="missing-field-ignored",
    ),
    # quiet 600 s after the trigger: cleared by tick, not at 659
    pytest.param(
        [*temps((0, 20), (60, 28)), (659, "tick"), (660, "tick")],
        [rate_raise(60), rate_clear(660)],
        id="clear-after-quiet",
    ),
    # a new trigger at 100 restarts the quiet period: clears at 700
    pytest.param(
        [*temps((0, 20), (60, 28), (100, 36)), (660, "tick"), (700, "tick")],
        [rate_raise(60), rate_raise(100), rate_clear(700)],
        id="retrigger-extends-quiet",
    ),
    # a test reading (test=true) is suppressed by `unless`, its sample too
    pytest.param(
        [*temps((0, 20)), (30, "reading", "sd1", {"temperature": 30, "test": True})],
        [],
        id="self-test-suppressed",
    ),
    # a reading at 120 that does not trigger (no rise since 60) must not double the clear
    pytest.param(
        [*temps((0, 20), (60, 28), (120, 28)), (660, "tick")],
        [rate_raise(60), rate_clear(660)],
        id="clear-once-after-non-trigger",
    ),
]


@pytest.mark.parametrize(("steps", "expected"), RATE)
def test_rate_of_rise(steps: list[Step], expected: list[Op]) -> None:
    assert run(load_rules(), steps) == expected


RATE_ACROSS_RESTARTS = [
    # the 20 °C sample was never written, yet survives the restart: rebuilt from telemetry
    pytest.param(
        [*temps((0, 20)), (30, "restart"), *temps((40, 28))],
        [rate_raise(40)],
        id="rise-spanning-a-restart",
    ),
    # a reading older than the window at the restart is not brought back
    pytest.param([*temps((0, 20)), (70, "restart"), *temps((75, 28))], [], id="old-not-restored"),
    # a self-test's sample stays out after the restart too
    pytest.param(
        [
            (0, "reading", "sd1", {"temperature": 20, "test": True}),
            (30, "restart"),
            *temps((40, 28)),
        ],
        [],
        id="self-test-not-restored",
    ),
    # a raise written before the restart still clears after its quiet period
    pytest.param(
        [*temps((0, 20), (60, 28)), (100, "restart"), (660, "tick")],
        [rate_raise(60), rate_clear(660)],
        id="clear-after-restart",
    ),
    # the restart raises nothing again from the readings it replays
    pytest.param(
        [*temps((0, 20), (30, 28)), (40, "restart"), *temps((50, 22))],
        [rate_raise(30)],
        id="replay-raises-nothing",
    ),
]


@pytest.mark.parametrize(("steps", "expected"), RATE_ACROSS_RESTARTS)
def test_rate_of_rise_across_restarts(steps: list[Step], expected: list[Op]) -> None:
    assert run(load_rules(), steps) == expected


def test_rate_of_rise_samples_cost_no_write_until_they_trigger() -> None:
    harness = Harness(load_rules())
    harness.run(temps((0, 20), (10, 20.5), (20, 21)))
    key = ("sd1", "smoke.heat_rate_of_rise")
    assert key not in harness.db_states  # three readings, samples in memory only
    assert len(harness.engine.states[key]["samples"]) == 3
    harness.run(temps((30, 29)))  # triggered: the quiet period's end must survive a restart
    assert harness.db_states[key]["clear_due"] == at(630).timestamp()


# --- count in a window (shipped door.access_denied_burst: 5 in 60 s, clears after 600 s) ---


def denied(*times: float) -> list[Step]:
    return [(t, "event", "door", "access_denied") for t in times]


def burst_raise(t: float) -> Op:
    return (t, "raise", "door", "door.access_denied_burst", "minor", 1)


def burst_clear(t: float) -> Op:
    return (t, "clear", "door", "door.access_denied_burst", "minor", 1)


COUNT = [
    # 5 refused within 40 s: the fifth fires
    pytest.param(denied(0, 10, 20, 30, 40), [burst_raise(40)], id="five-in-60s"),
    # 5 refused, first and last exactly 60 s apart: the window is inclusive
    pytest.param(denied(0, 15, 30, 45, 60), [burst_raise(60)], id="five-in-exactly-60s"),
    # only 4: below at_least
    pytest.param(denied(0, 10, 20, 30), [], id="four"),
    # 5 spread over 2 minutes: never more than 3 in one 60 s window
    pytest.param(denied(0, 30, 60, 90, 120), [], id="five-over-2-minutes"),
    # a sixth within the window: momentary, a repeat raise
    pytest.param(denied(0, 10, 20, 30, 40, 50), [burst_raise(40), burst_raise(50)], id="sixth"),
    # other events and telemetry are not counted
    pytest.param(
        [
            *denied(0, 10, 20, 30),
            (35, "event", "door", "access_granted"),
            (36, "reading", "door", {"battery": 80}),
        ],
        [],
        id="others-not-counted",
    ),
    # five in one batch: one raise, for the fifth
    pytest.param(
        [(0, "batch", [("event", "door", "access_denied")] * 5)],
        [burst_raise(0)],
        id="batch",
    ),
    # quiet 600 s after the burst: cleared by tick at 640, not at 639
    pytest.param(
        [*denied(0, 10, 20, 30, 40), (639, "tick"), (640, "tick"), (2000, "tick")],
        [burst_raise(40), burst_clear(640)],
        id="clear-after-quiet",
    ),
    # after the clear the count starts afresh: 4 more within a minute do not fire
    pytest.param(
        [*denied(0, 10, 20, 30, 40), (640, "tick"), *denied(650, 651, 652, 653)],
        [burst_raise(40), burst_clear(640)],
        id="fresh-after-clear",
    ),
    # a lone refusal at 200 does not trigger: the quiet period still ends at 640, one clear
    pytest.param(
        [*denied(0, 10, 20, 30, 40, 200), (640, "tick")],
        [burst_raise(40), burst_clear(640)],
        id="clear-once-after-non-trigger",
    ),
]


@pytest.mark.parametrize(("steps", "expected"), COUNT)
def test_count_in_window(steps: list[Step], expected: list[Op]) -> None:
    assert run(load_rules(), steps) == expected


# --- events (shipped door.forced: no clear_after_s; door.tamper: clear_after_s 3600) ------


def forced(t: float, count: int = 1) -> Op:
    return (t, "raise", "door", "door.forced", "major", count)


EVENTS = [
    # every door_forced raises (the DB's one open alarm per rule counts them)
    pytest.param(
        [(0, "event", "door", "door_forced"), (30, "event", "door", "door_forced")],
        [forced(0), forced(30)],
        id="every-time",
    ),
    # two in one evaluation: one op, count 2
    pytest.param(
        [(0, "batch", [("event", "door", "door_forced")] * 2)], [forced(0, 2)], id="batch-count"
    ),
    # no clear_after_s: never cleared by time, an operator closes it
    pytest.param(
        [(0, "event", "door", "door_forced"), (3600, "tick"), (86400 * 7, "tick")],
        [forced(0)],
        id="never-clears-by-itself",
    ),
    # nor by later telemetry: nothing "stops holding" for an event
    pytest.param(
        [(0, "event", "door", "door_forced"), (10, "reading", "door", SHUT)],
        [forced(0)],
        id="not-cleared-by-telemetry",
    ),
    # an event the rule does not list
    pytest.param([(0, "event", "door", "access_granted")], [], id="other-event"),
    # tamper has clear_after_s 3600: cleared by tick an hour after the last one
    pytest.param(
        [(0, "event", "door", "tamper"), (3599, "tick"), (3600, "tick")],
        [
            (0, "raise", "door", "door.tamper", "minor", 1),
            (3600, "clear", "door", "door.tamper", "minor", 1),
        ],
        id="clear-after-s",
    ),
]


@pytest.mark.parametrize(("steps", "expected"), EVENTS)
def test_events(steps: list[Step], expected: list[Op]) -> None:
    assert run(load_rules(), steps) == expected


MIXED_ANY_OF = [
    pytest.param(
        # smoke.alarm raised by the `alarm` event: clear_after_s 600 clears it by tick
        [(0, "event", "sd", "alarm"), (599, "tick"), (600, "tick")],
        [
            (0, "raise", "sd", "smoke.alarm", "critical", 1),
            (600, "clear", "sd", "smoke.alarm", "critical", 1),
        ],
        id="smoke-alarm-event",
    ),
    pytest.param(
        # bin.fire raised by the `fire` event: clear_after_s 1800
        [(0, "event", "bin", "fire"), (1800, "tick")],
        [
            (0, "raise", "bin", "bin.fire", "critical", 1),
            (1800, "clear", "bin", "bin.fire", "critical", 1),
        ],
        id="bin-fire-event",
    ),
    pytest.param(
        # the `alarm` field true, then false: the detector's own verdict clears it at once
        [
            (0, "reading", "sd", {"alarm": True}),
            (60, "reading", "sd", {"alarm": False}),
            (600, "tick"),
        ],
        [
            (0, "raise", "sd", "smoke.alarm", "critical", 1),
            (60, "clear", "sd", "smoke.alarm", "critical", 1),
        ],
        id="smoke-alarm-field",
    ),
    pytest.param(
        # with an explicit `clear` (manhole.open), the field side clears it
        [(0, "reading", "mh", {"open": True}), (60, "reading", "mh", {"open": False})],
        [
            (0, "raise", "mh", "manhole.open", "major", 1),
            (60, "clear", "mh", "manhole.open", "major", 1),
        ],
        id="manhole-open-field",
    ),
    pytest.param(
        # ... after the `opened` event too
        [(0, "event", "mh", "opened"), (60, "reading", "mh", {"open": False})],
        [
            (0, "raise", "mh", "manhole.open", "major", 1),
            (60, "clear", "mh", "manhole.open", "major", 1),
        ],
        id="manhole-opened-event",
    ),
]


@pytest.mark.parametrize(("steps", "expected"), MIXED_ANY_OF)
def test_any_of_field_or_event(steps: list[Step], expected: list[Op]) -> None:
    assert run(load_rules(), steps) == expected


# --- absence (shipped door.offline: 3 intervals; door_a reports every 60 s) -----------------


def offline(t: float, action: str = "raise", device: str = "door_a") -> Op:
    return (t, action, device, "door.offline", "minor", 1)


ABSENCE = [
    # last message at 0: silent 3 × 60 s at 180, not at 179; raised exactly once
    pytest.param(
        [
            (0, "reading", "door_a", SHUT),
            (179, "tick"),
            (180, "tick"),
            (400, "tick"),
            (5000, "tick"),
        ],
        [offline(180)],
        id="raised-at-180-once",
    ),
    # heard again at 100: the deadline moves to 280
    pytest.param(
        [
            (0, "reading", "door_a", SHUT),
            (100, "reading", "door_a", SHUT),
            (180, "tick"),
            (279, "tick"),
            (280, "tick"),
        ],
        [offline(280)],
        id="heard-again-moves-deadline",
    ),
    # any message counts, an event too
    pytest.param(
        [
            (0, "reading", "door_a", SHUT),
            (100, "event", "door_a", "access_granted"),
            (180, "tick"),
            (280, "tick"),
        ],
        [offline(280)],
        id="event-counts",
    ),
    # offline at 180, a message at 500 clears it; silent again, raised again at 680
    pytest.param(
        [
            (0, "reading", "door_a", SHUT),
            (180, "tick"),
            (500, "reading", "door_a", SHUT),
            (679, "tick"),
            (680, "tick"),
        ],
        [offline(180), offline(500, "clear"), offline(680)],
        id="message-clears",
    ),
    # never heard: expect() starts the watch at 0
    pytest.param(
        [(0, "expect", "door_a"), (179, "tick"), (180, "tick")], [offline(180)], id="never-heard"
    ),
    # a device without a reporting interval is never absent
    pytest.param(
        [(0, "reading", "door", SHUT), (0, "expect", "door"), (86400, "tick")], [], id="no-interval"
    ),
    # a reading from a device the registry does not know is skipped, not heard
    pytest.param([(0, "reading", "ghost", SHUT), (86400, "tick")], [], id="unknown-device"),
]


@pytest.mark.parametrize(("steps", "expected"), ABSENCE)
def test_absence(steps: list[Step], expected: list[Op]) -> None:
    assert run(load_rules(), steps) == expected


@pytest.mark.parametrize(
    ("intervals", "deadline"),
    [
        # 1.5 × 60 s
        (1.5, 90),
        # 10 × 60 s
        (10, 600),
    ],
)
def test_absence_custom_intervals(intervals: float, deadline: int) -> None:
    devices = {"b": DeviceInfo("b", "smart_bin", cell_id="g1", interval_s=60)}
    rules = ruleset(rule("t.offline", {"absent_for_intervals": intervals}, severity="warning"))
    steps = [(0, "reading", "b", {"fill": 1}), (deadline - 1, "tick"), (deadline, "tick")]
    assert run(rules, steps, devices=devices) == [
        (deadline, "raise", "b", "t.offline", "warning", 1)
    ]


def test_next_due_points_at_the_deadlines() -> None:
    # The service sleeps until next_due(): it must name the duration and silence deadlines.
    harness = Harness(load_rules())
    harness.run([(0, "reading", "door_a", SHUT), (10, "reading", "door", OPEN)])
    assert harness.engine.next_due() == at(180).timestamp()
    harness.run([(180, "tick")])
    assert harness.engine.next_due() == at(310).timestamp()  # door.held_open, for_s 300


# --- correlation (shipped smoke.fire_confirmed: 2 detectors of a building within 120 s) ----


def smoke(t: float, device: str, action: str = "raise") -> Op:
    return (t, action, device, "smoke.alarm", "critical", 1)


def confirmed(t: float, group: str = "building:g1/b1", action: str = "raise") -> Op:
    return (t, action, group, "smoke.fire_confirmed", "critical", 1)


ALARM = {"alarm": True}

CORRELATION = [
    # two detectors of g1/b1, 60 s apart: a confirmed fire, once, for the building
    pytest.param(
        [(0, "reading", "sd1", ALARM), (60, "reading", "sd2", ALARM)],
        [smoke(0, "sd1"), smoke(60, "sd2"), confirmed(60)],
        id="two-in-one-building",
    ),
    # exactly 120 s apart: within the window (inclusive)
    pytest.param(
        [(0, "reading", "sd1", ALARM), (120, "reading", "sd2", ALARM)],
        [smoke(0, "sd1"), smoke(120, "sd2"), confirmed(120)],
        id="at-window-edge",
    ),
    # 3 minutes apart: the first has left the window
    pytest.param(
        [(0, "reading", "sd1", ALARM), (180, "reading", "sd2", ALARM)],
        [smoke(0, "sd1"), smoke(180, "sd2")],
        id="three-minutes-apart",
    ),
    # different buildings of one cell: not one incident
    pytest.param(
        [(0, "reading", "sd1", ALARM), (60, "reading", "sd3", ALARM)],
        [smoke(0, "sd1"), smoke(60, "sd3")],
        id="different-buildings",
    ),
    # building "b1" of another cell is another building
    pytest.param(
        [(0, "reading", "sd1", ALARM), (60, "reading", "sd4", ALARM)],
        [smoke(0, "sd1"), smoke(60, "sd4")],
        id="same-name-other-cell",
    ),
    # one detector alarming twice is one device, not two
    pytest.param(
        [(0, "reading", "sd1", ALARM), (60, "reading", "sd1", ALARM)],
        [smoke(0, "sd1"), smoke(60, "sd1")],
        id="one-device-twice",
    ),
    # both in one batch: confirmed once
    pytest.param(
        [(0, "batch", [("reading", "sd1", ALARM), ("reading", "sd2", ALARM)])],
        [smoke(0, "sd1"), smoke(0, "sd2"), confirmed(0)],
        id="one-batch",
    ),
    # the `alarm` event counts like the field
    pytest.param(
        [(0, "event", "sd1", "alarm"), (60, "event", "sd2", "alarm")],
        [smoke(0, "sd1"), smoke(60, "sd2"), confirmed(60)],
        id="events",
    ),
    # the second detector is in self-test: suppressed, so no second device
    pytest.param(
        [(0, "reading", "sd1", ALARM), (60, "reading", "sd2", {"alarm": True, "test": True})],
        [smoke(0, "sd1")],
        id="self-test-does-not-confirm",
    ),
    # a lone detector never confirms: no op at all for the building, not even a clear
    # (the detector's own alarm clears after its quiet period)
    pytest.param(
        [(0, "reading", "sd1", ALARM), (120, "tick"), (1000, "tick")],
        [smoke(0, "sd1"), (1000, "clear", "sd1", "smoke.alarm", "critical", 1)],
        id="lone-detector-no-building-op",
    ),
    # no clear_after_s: the confirmed fire stays until an operator closes it
    pytest.param(
        [
            (0, "reading", "sd1", ALARM),
            (60, "reading", "sd2", ALARM),
            (180, "tick"),
            (3600, "tick"),
        ],
        [
            smoke(0, "sd1"),
            smoke(60, "sd2"),
            confirmed(60),
            (3600, "clear", "sd1", "smoke.alarm", "critical", 1),
            (3600, "clear", "sd2", "smoke.alarm", "critical", 1),
        ],
        id="confirmed-stays-open",
    ),
]


@pytest.mark.parametrize(("steps", "expected"), CORRELATION)
def test_correlation(steps: list[Step], expected: list[Op]) -> None:
    assert run(load_rules(), steps) == expected


def test_correlation_by_cell() -> None:
    # by = "cell": any two bins of one cell, whatever their buildings.
    rules = ruleset(
        rule("t.fire", {"event": ["fire"]}, severity="critical"),
        rule("t.fires", {"correlate": "t.fire", "min_devices": 2, "within_s": 60, "by": "cell"}),
    )
    devices = {
        "b1": DeviceInfo("b1", "smart_bin", cell_id="g1"),
        "b2": DeviceInfo("b2", "smart_bin", cell_id="g1", building="x"),
        "b3": DeviceInfo("b3", "smart_bin", cell_id="g2"),
    }
    steps = [(0, "event", "b1", "fire"), (10, "event", "b3", "fire"), (20, "event", "b2", "fire")]
    assert run(rules, steps, devices=devices) == [
        (0, "raise", "b1", "t.fire", "critical", 1),
        (10, "raise", "b3", "t.fire", "critical", 1),
        (20, "raise", "b2", "t.fire", "critical", 1),
        (20, "raise", "cell:g1", "t.fires", "minor", 1),
    ]


# --- suppression: `unless` and maintenance ----------------------------------------------

MAINTENANCE = {"sd1": (100, 400), "door_a": (100, 400)}  # device → [start, end)


def in_maintenance(device: DeviceInfo, when: datetime) -> bool:
    window = MAINTENANCE.get(device.id)
    return window is not None and at(window[0]) <= when < at(window[1])


SUPPRESSION = [
    # alarm=true with test=true: the detector's self-test, `unless` drops it
    pytest.param([(0, "reading", "sd2", {"alarm": True, "test": True})], [], id="self-test"),
    # test=false: a real alarm
    pytest.param(
        [(0, "reading", "sd2", {"alarm": True, "test": False})], [smoke(0, "sd2")], id="not-a-test"
    ),
    # obscuration 30 held 10 s, but in self-test: nothing
    pytest.param(
        [
            (0, "reading", "sd2", {"smoke": 30, "test": True}),
            (10, "tick"),
            (10, "reading", "sd2", {"smoke": 30, "test": True}),
        ],
        [],
        id="self-test-duration",
    ),
    # a self-test reading while firing is ignored: it does not clear
    pytest.param(
        [
            (0, "reading", "sd2", {"temperature": 60}),
            (30, "reading", "sd2", {"temperature": 20, "test": True}),
        ],
        [(0, "raise", "sd2", "smoke.heat_high", "critical", 1)],
        id="self-test-does-not-clear",
    ),
    # sd1 in maintenance 100–400: its alarm at 200 raises nothing
    pytest.param([(200, "reading", "sd1", ALARM)], [], id="maintenance"),
    # before and after the window it does
    pytest.param(
        [
            (99, "reading", "sd1", ALARM),
            (200, "reading", "sd1", ALARM),
            (400, "reading", "sd1", ALARM),
        ],
        [smoke(99, "sd1"), smoke(400, "sd1")],
        id="maintenance-window-edges",
    ),
    # a device in maintenance is not raised offline (deadline 180 inside 100–400)
    pytest.param(
        [(0, "reading", "door_a", SHUT), (180, "tick"), (399, "tick")], [], id="maintenance-absence"
    ),
    # ... but still silent after the maintenance: offline at the first tick after it
    pytest.param(
        [(0, "reading", "door_a", SHUT), (180, "tick"), (400, "tick")],
        [offline(400)],
        id="silent-after-maintenance",
    ),
    # a message during maintenance still counts as heard: deadline 300 + 180
    pytest.param(
        [
            (0, "reading", "door_a", SHUT),
            (300, "reading", "door_a", SHUT),
            (400, "tick"),
            (479, "tick"),
            (480, "tick"),
        ],
        [offline(480)],
        id="heard-in-maintenance",
    ),
]


@pytest.mark.parametrize(("steps", "expected"), SUPPRESSION)
def test_suppression(steps: list[Step], expected: list[Op]) -> None:
    assert run(load_rules(), steps, muted=in_maintenance) == expected


# --- flapping ------------------------------------------------------------------------------

HIGH, LOW = {"fill": 90}, {"fill": 10}


def flaps(times: Iterable[float]) -> tuple[list[Step], list[Op]]:
    """Alternate raise / clear readings at `times`: raise first."""
    steps: list[Step] = []
    ops: list[Op] = []
    for i, t in enumerate(times):
        action = "raise" if i % 2 == 0 else "clear"
        steps.append((t, "reading", "bin", HIGH if action == "raise" else LOW))
        ops.append((t, action, "bin", "t.flap", "minor", 1))
    return steps, ops


def flap_op(t: float, action: str) -> Op:
    return (t, action, "bin", "t.flap", "minor", 1)


# FLAP_COUNT raise/clear cycles 10 s apart, then a raise: flapping, its next clear is held.
_CYCLES, _CYCLE_OPS = flaps(range(0, 20 * FLAP_COUNT + 1, 10))
_LAST = 20 * FLAP_COUNT  # the raise after FLAP_COUNT clears
_HELD = _LAST + 10  # the clear that is held
# The same number of cycles, spaced so that clears never crowd FLAP_WINDOW_S.
_SLOW = FLAP_WINDOW_S / FLAP_COUNT + 1
_SLOW_CYCLES, _SLOW_OPS = flaps([i * _SLOW for i in range(2 * FLAP_COUNT + 2)])

FLAPPING = [
    pytest.param(
        # FLAP_COUNT clears within FLAP_WINDOW_S: the next clear waits FLAP_HOLD_S, then tick
        [
            *_CYCLES,
            (_HELD, "reading", "bin", LOW),
            (_HELD + FLAP_HOLD_S - 1, "tick"),
            (_HELD + FLAP_HOLD_S, "tick"),
        ],
        [*_CYCLE_OPS, flap_op(_HELD + FLAP_HOLD_S, "clear")],
        id="held-then-cleared-by-tick",
    ),
    pytest.param(
        # the held clear: a later low reading within the hold does not clear either
        [
            *_CYCLES,
            (_HELD, "reading", "bin", LOW),
            (_HELD + 100, "reading", "bin", LOW),
            (_HELD + FLAP_HOLD_S, "reading", "bin", LOW),
        ],
        [*_CYCLE_OPS, flap_op(_HELD + FLAP_HOLD_S, "clear")],
        id="held-then-cleared-by-reading",
    ),
    pytest.param(
        # high again during the hold: a repeat raise, and the hold starts afresh at the next low
        [
            *_CYCLES,
            (_HELD, "reading", "bin", LOW),
            (_HELD + 100, "reading", "bin", HIGH),
            (_HELD + 200, "reading", "bin", LOW),
            (_HELD + FLAP_HOLD_S, "tick"),
            (_HELD + 200 + FLAP_HOLD_S, "tick"),
        ],
        [*_CYCLE_OPS, flap_op(_HELD + 100, "raise"), flap_op(_HELD + 200 + FLAP_HOLD_S, "clear")],
        id="hold-interrupted",
    ),
    pytest.param(
        # one clear fewer than FLAP_COUNT: the next clear is immediate
        [*_CYCLES[:-2], (_HELD, "reading", "bin", LOW)],
        [*_CYCLE_OPS[:-2], flap_op(_HELD, "clear")],
        id="below-flap-count",
    ),
    pytest.param(
        # as many cycles, but slow: fewer than FLAP_COUNT clears in any window, no hold
        _SLOW_CYCLES,
        _SLOW_OPS,
        id="slow-cycles",
    ),
]


@pytest.mark.parametrize(("steps", "expected"), FLAPPING)
def test_flapping(steps: list[Step], expected: list[Op]) -> None:
    assert run(ruleset(rule("t.flap", FILL_80)), steps) == expected


def test_flapping_raise_is_marked() -> None:
    harness = Harness(ruleset(rule("t.flap", FILL_80)))
    harness.run(_CYCLES)
    (last,) = harness.evaluations[-1].ops
    assert last.details.get("flapping") is True
    first_raise = harness.evaluations[0].ops[0]
    assert "flapping" not in first_raise.details


# --- durability: the states of a run, loaded into a new engine ----------------------------

DURABILITY = [
    pytest.param(
        # a duration started before the restart fires by tick at the same deadline
        load_rules,
        [(0, "reading", "door", OPEN), (100, "restart"), (299, "tick"), (300, "tick")],
        [(300, "raise", "door", "door.held_open", "minor", 1)],
        id="duration",
    ),
    pytest.param(
        # ... and an interruption after the restart still cancels it
        load_rules,
        [
            (0, "reading", "door", OPEN),
            (100, "restart"),
            (200, "reading", "door", SHUT),
            (300, "tick"),
        ],
        [],
        id="duration-interrupted",
    ),
    pytest.param(
        # the rate samples survive: 20 before, 28 after, within 60 s
        load_rules,
        [*temps((0, 20)), (30, "restart"), *temps((60, 28))],
        [rate_raise(60)],
        id="rate-samples",
    ),
    pytest.param(
        # the count window survives: 3 refusals before, 2 after
        load_rules,
        [*denied(0, 10, 20), (25, "restart"), *denied(30, 40)],
        [burst_raise(40)],
        id="count-hits",
    ),
    pytest.param(
        # a quiet period survives: tamper at 0 clears at 3600
        load_rules,
        [(0, "event", "door", "tamper"), (10, "restart"), (3599, "tick"), (3600, "tick")],
        [
            (0, "raise", "door", "door.tamper", "minor", 1),
            (3600, "clear", "door", "door.tamper", "minor", 1),
        ],
        id="quiet-period",
    ),
    pytest.param(
        # the last-heard time survives: offline at 180 after the restart
        load_rules,
        [(0, "reading", "door_a", SHUT), (60, "restart"), (179, "tick"), (180, "tick")],
        [offline(180)],
        id="absence",
    ),
    pytest.param(
        # a firing offline alarm survives: the next message clears it
        load_rules,
        [
            (0, "reading", "door_a", SHUT),
            (180, "tick"),
            (200, "restart"),
            (300, "reading", "door_a", SHUT),
        ],
        [offline(180), offline(300, "clear")],
        id="absence-firing",
    ),
    pytest.param(
        # firing with hysteresis survives: 50 is in the band, 25 clears
        load_rules,
        [
            (0, "reading", "bin", {"fill": 85}),
            (30, "restart"),
            (60, "reading", "bin", {"fill": 50}),
            (120, "reading", "bin", {"fill": 25}),
        ],
        [
            (0, "raise", "bin", "bin.full", "minor", 1),
            (120, "clear", "bin", "bin.full", "minor", 1),
        ],
        id="hysteresis",
    ),
    pytest.param(
        # a correlation group survives: sd1 before, sd2 after
        load_rules,
        [(0, "reading", "sd1", ALARM), (30, "restart"), (60, "reading", "sd2", ALARM)],
        [smoke(0, "sd1"), smoke(60, "sd2"), confirmed(60)],
        id="correlation",
    ),
    pytest.param(
        # the flap history survives: the clear after the restart is held
        lambda: ruleset(rule("t.flap", FILL_80)),
        [
            *_CYCLES,
            (_LAST + 1, "restart"),
            (_HELD, "reading", "bin", LOW),
            (_HELD + FLAP_HOLD_S, "tick"),
        ],
        [*_CYCLE_OPS, flap_op(_HELD + FLAP_HOLD_S, "clear")],
        id="flapping",
    ),
    pytest.param(
        # a held clear survives: it is due by tick after the restart
        lambda: ruleset(rule("t.flap", FILL_80)),
        [
            *_CYCLES,
            (_HELD, "reading", "bin", LOW),
            (_HELD + 1, "restart"),
            (_HELD + FLAP_HOLD_S, "tick"),
        ],
        [*_CYCLE_OPS, flap_op(_HELD + FLAP_HOLD_S, "clear")],
        id="flap-hold",
    ),
]


@pytest.mark.parametrize(("make_rules", "steps", "expected"), DURABILITY)
def test_durability(
    make_rules: Callable[[], RuleSet], steps: list[Step], expected: list[Op]
) -> None:
    assert run(make_rules(), steps) == expected


def test_restart_matches_an_uninterrupted_run() -> None:
    # The same scenario with and without a restart gives the same ops.
    steps = [
        (0, "reading", "door", OPEN),
        (300, "tick"),
        (350, "reading", "door", {"battery": 50}),
        (400, "reading", "door", SHUT),
    ]
    straight = run(load_rules(), steps)
    restarted = run(load_rules(), [steps[0], (200, "restart"), *steps[1:]])
    assert (
        straight
        == restarted
        == [
            (300, "raise", "door", "door.held_open", "minor", 1),
            (400, "clear", "door", "door.held_open", "minor", 1),
        ]
    )


def test_uncommitted_evaluation_leaves_memory_untouched() -> None:
    # A crash before commit: the redelivered batch is evaluated from the same state.
    harness = Harness(load_rules())
    batch = [reading(0, "reading", "bin", {"fill": 85})]
    first = harness.engine.evaluate(batch)
    again = harness.engine.evaluate(batch)
    assert [as_op(op) for op in first.ops] == [as_op(op) for op in again.ops]
    assert first.states == again.states
    assert harness.engine.states == {}


def test_idle_state_is_forgotten() -> None:
    # A field rule that neither fires nor waits keeps no state, and a reading that
    # changes nothing writes nothing; a state that becomes idle is deleted.
    harness = Harness(ruleset(rule("t.full", FILL_80, for_s=60)))
    harness.run([(0, "reading", "bin", {"fill": 10})])
    assert harness.evaluations[-1].states == {}
    harness.run([(1, "reading", "bin", {"fill": 90})])
    assert harness.evaluations[-1].states[("bin", "t.full")] is not None
    harness.run([(2, "reading", "bin", {"fill": 10})])
    assert harness.evaluations[-1].states == {("bin", "t.full"): None}
    assert harness.engine.states == {}


def test_silence_watch_keeps_one_timer_entry_per_device() -> None:
    # Every reading moves the device's deadline; the timer heap must not grow with the
    # message count (100,000 devices at thousands of messages a second).
    devices = {"b": DeviceInfo("b", "smart_bin", cell_id="g1", interval_s=60)}
    harness = Harness(ruleset(rule("t.silent", {"absent_for_intervals": 2})), devices)
    harness.run([(t, "reading", "b", {"fill": 10}) for t in range(0, 500, 5)])
    assert harness.engine._silences.entries == 1
    assert harness.run([(614, "tick")]) == []
    assert harness.run([(615, "tick")]) == [(615, "raise", "b", "t.silent", "minor", 1)]


# --- urgent readings: written ahead of their bulk batch by ingest --------------------------

URGENT = [
    # the detector's own alarm flag: smoke.alarm is critical
    ("sd", {"alarm": True, "smoke": 0.5}, True),
    # its flag down: nothing to raise
    ("sd", {"alarm": False, "smoke": 0.5}, False),
    # in self-test the flag is no fire (smoke.alarm's `unless`)
    ("sd", {"alarm": True, "test": True}, False),
    # past the fixed-heat threshold: smoke.heat_high is critical
    ("sd", {"temperature": 60.0}, True),
    # obscuration above 10 %/m is major; above 25 its critical level
    ("sd", {"smoke": 15.0}, False),
    ("sd", {"smoke": 30.0}, True),
    # a bin's fire flag: bin.fire is critical
    ("bin", {"fire": True}, True),
    # a full bin is minor, however full
    ("bin", {"fill": 99.0}, False),
    # a manhole cover tilted past 45° is critical; 30° only major
    ("mh", {"tilt": 50.0}, True),
    ("mh", {"tilt": 30.0}, False),
    # an unregistered device has no rules
    ("nobody", {"alarm": True}, False),
]


@pytest.mark.parametrize(("device", "values", "urgent"), URGENT)
def test_a_reading_is_urgent_when_it_would_raise_a_critical_alarm(
    device: str, values: dict[str, Any], urgent: bool
) -> None:
    harness = Harness(load_rules())
    batch = [reading(0, "reading", device, values)]
    assert harness.engine.urgent_devices(batch) == ({device} if urgent else set())


def test_a_critical_alarm_raised_already_is_not_urgent_again() -> None:
    # The first alarm reading raises smoke.alarm (state: its quiet period); the next one
    # only repeats it, so nothing is gained by writing it ahead of its batch.
    harness = Harness(load_rules())
    alarm = {"alarm": True}
    assert harness.engine.urgent_devices([reading(0, "reading", "sd", alarm)]) == {"sd"}
    harness.run([(0, "reading", "sd", alarm)])
    assert harness.engine.urgent_devices([reading(5, "reading", "sd", alarm)]) == set()
    # Another detector's alarm still is.
    batch = [reading(5, "reading", "sd", alarm), reading(5, "reading", "sd1", alarm)]
    assert harness.engine.urgent_devices(batch) == {"sd1"}


def test_a_muted_device_and_an_event_are_never_urgent() -> None:
    # In maintenance nothing is raised; an alarm event is the event lane's already.
    muted = Harness(load_rules(), muted=lambda device, at: device.id == "sd")
    assert muted.engine.urgent_devices([reading(0, "reading", "sd", {"alarm": True})]) == set()
    harness = Harness(load_rules())
    assert harness.engine.urgent_devices([reading(0, "event", "sd", "alarm")]) == set()


def test_a_rule_with_several_critical_levels_is_urgent_when_any_of_them_holds() -> None:
    hot = rule("t.hot", {"field": "temperature", "above": 40}, levels=[
        {"when": {"field": "temperature", "above": 80}, "severity": "critical"},
        {"when": {"field": "fill", "above": 99}, "severity": "critical"},
    ])  # fmt: skip
    harness = Harness(ruleset(hot))
    urgent = harness.engine.urgent_devices
    assert urgent([reading(0, "reading", "bin", {"temperature": 90})]) == {"bin"}
    assert urgent([reading(0, "reading", "bin", {"temperature": 50, "fill": 100})]) == {"bin"}
    # Hot, but only at the rule's own (minor) severity.
    assert urgent([reading(0, "reading", "bin", {"temperature": 50, "fill": 50})]) == set()
