"""The rules engine's shortcuts for the usual reading decide exactly what its general path
decides: the same alarm operations, the same states, the same states left unsaved.

The reference engine has the shortcuts switched off: every rate-of-rise reading goes
through the general path (sorting, copying, `_put`), and every step of a device's plan
is asked of telemetry, the momentary event rules included."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gridwarden.readings import DeviceInfo, Reading
from rules.engine import Engine, _Plan
from rules.spec import load_rules

T0 = datetime(2025, 6, 1, 8, 0, tzinfo=UTC)
RULES = load_rules()
DEVICES = {
    d.id: d
    for d in (
        DeviceInfo("sd1", "smoke_detector", cell_id="g1", building="b1"),
        DeviceInfo("sd2", "smoke_detector", cell_id="g1", building="b1"),
        DeviceInfo("door1", "door_access", cell_id="g1"),
        DeviceInfo("mh1", "manhole_cover", cell_id="g1"),
    )
}


class GeneralPathEngine(Engine):
    """The engine without its shortcuts."""

    def _rate_sample_only(self, *args: Any) -> bool:
        return False

    def _plan(self, device: DeviceInfo) -> _Plan:
        plan = super()._plan(device)
        return replace(plan, for_telemetry=plan.evaluated)


# A reading: (seconds after T0, device, channel, fields or event). Times go mostly
# forward, sometimes back (a late reading) or not at all (two in one second).
readings = st.lists(
    st.tuples(
        st.sampled_from([0.0, 0.0, 0.5, 5.0, 20.0, 30.0, 59.0, 60.0, 61.0, 300.0, -3.0, -70.0]),
        st.sampled_from(sorted(DEVICES)),
        st.sampled_from(["telemetry", "telemetry", "telemetry", "event"]),
        st.fixed_dictionaries(
            {},
            optional={
                "temperature": st.sampled_from([20.0, 22.5, 25.0, 29.0, 31.0, 45.0, 70.0]),
                "smoke": st.sampled_from([0.1, 5.0, 20.0]),
                "test": st.booleans(),
                "door_open": st.booleans(),
                "tilt": st.sampled_from([1.0, 30.0]),
                "alarm": st.booleans(),
            },
        ),
        st.sampled_from(
            ["alarm", "door_forced", "access_denied", "tamper", "door_held_open", "opened"]
        ),
    ),
    max_size=40,
)
batch_sizes = st.lists(st.integers(min_value=1, max_value=8), min_size=1, max_size=10)


def _as_readings(steps: list[tuple[float, str, str, dict[str, Any], str]]) -> list[Reading]:
    out, t = [], 0.0
    for delta, device, channel, fields, event in steps:
        t = max(0.0, t + delta)
        when = T0 + timedelta(seconds=t)
        if channel == "event":
            out.append(Reading("event", device, when, when, None, {}, event=event))
        else:
            out.append(Reading("telemetry", device, when, when, None, dict(fields)))
    return out


@settings(max_examples=300, deadline=None)
@given(steps=readings, sizes=batch_sizes)
def test_the_shortcuts_decide_what_the_general_path_decides(
    steps: list[tuple[float, str, str, dict[str, Any], str]], sizes: list[int]
) -> None:
    fast, general = Engine(RULES, DEVICES.get), GeneralPathEngine(RULES, DEVICES.get)
    pending = _as_readings(steps)
    batches = []
    while pending:
        size = sizes[len(batches) % len(sizes)]
        batches.append(pending[:size])
        pending = pending[size:]
    for batch in batches:
        one, other = fast.evaluate(batch), general.evaluate(batch)
        assert one.ops == other.ops
        assert one.states == other.states
        assert one.unsaved == other.unsaved
        fast.commit(one)
        general.commit(other)
    assert fast.states == general.states


def test_a_steady_temperature_takes_the_shortcut_and_a_rise_still_fires() -> None:
    """The rate-of-rise shortcut is taken (its samples in order, one exactly a window
    old still in, nothing written) and leaves a rise to the general path, which raises it."""
    engine = Engine(RULES, DEVICES.get)
    for i, temperature in enumerate([22.0, 22.5, 23.0]):
        when = T0 + timedelta(seconds=30 * i)  # the window: 60 s
        evaluation = engine.evaluate(
            [Reading("telemetry", "sd1", when, when, None, {"temperature": temperature})]
        )
        assert evaluation.ops == []
        assert evaluation.unsaved == {("sd1", "smoke.heat_rate_of_rise")}
        engine.commit(evaluation)
    samples = engine.states[("sd1", "smoke.heat_rate_of_rise")]["samples"]
    assert samples == [[T0.timestamp() + 30 * i, t] for i, t in enumerate([22.0, 22.5, 23.0])]
    when = T0 + timedelta(seconds=70)
    evaluation = engine.evaluate(
        [Reading("telemetry", "sd1", when, when, None, {"temperature": 31.0})]
    )
    assert [(op.action, op.rule) for op in evaluation.ops] == [("raise", "smoke.heat_rate_of_rise")]
    assert evaluation.ops[0].details["rise"] == 8.5  # from 22.5, 60 s before


def test_telemetry_is_not_asked_of_momentary_event_rules() -> None:
    plan = Engine(RULES, DEVICES.get)._plan(DEVICES["door1"])
    skipped = {step.rule.id for step in plan.evaluated} - {
        step.rule.id for step in plan.for_telemetry
    }
    assert skipped == {
        "door.forced", "door.access_denied_burst", "door.held_open_reported", "door.tamper"
    }  # fmt: skip
    assert "door.held_open" in {step.rule.id for step in plan.for_telemetry}
