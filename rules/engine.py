"""The stateful rule engine. Pure: no I/O, no clock of its own.

`evaluate(readings)` and `tick(now)` return an `Evaluation`: the new state of every
(source, rule) they touched and the alarm operations to apply. The caller writes
both in one transaction (with the readings themselves, for `evaluate`) and only
then calls `commit(evaluation)`: memory never runs ahead of the database, so a
crash before commit re-evaluates the redelivered batch from the same state.

Semantics, per kind of rule:
- field rules (threshold / boolean) hold a `firing` flag: they raise when `when`
  holds (after `for_s` if set), repeat while it holds, and clear when `clear`
  holds (hysteresis) or, without `clear`, when `when` stops holding. A reading that
  lacks the field says nothing either way.
- momentary rules (events, counts, rates of rise, correlations) raise at every
  trigger; the database's one-open-alarm-per-(source, rule) turns a repeat into a
  count. `clear_after_s` clears them after a quiet period.
- absence rules are fired by `tick`, from each device's last message and its
  reporting interval; the next message clears them.
- flapping: an alarm raised again after clearing FLAP_COUNT times within
  FLAP_WINDOW_S is held: it clears only after its clear condition has held for
  FLAP_HOLD_S.
"""

from __future__ import annotations

import bisect
import heapq
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from gridwarden.readings import DeviceInfo, Reading
from rules.silence import SilenceSchedule
from rules.spec import (
    SEVERITY_RANK,
    Absence,
    AnyOf,
    Condition,
    Correlation,
    CountInWindow,
    EventCondition,
    FieldCondition,
    RateOfRise,
    Rule,
    RuleSet,
)

FLAP_COUNT = 3
FLAP_WINDOW_S = 600.0
FLAP_HOLD_S = 300.0
MAX_RATE_SAMPLES = 64
MUTED_RECHECK_S = 60.0  # a silence that falls in maintenance is looked at again
_PENDING = ("pending_since", "pending_since_due", "pending_details", "pending_severity")

_SAMPLE_TIME = operator.itemgetter(0)  # of a rate-of-rise sample [t, value]
_SAMPLE_VALUE = operator.itemgetter(1)

Key = tuple[str, str]  # (source, rule id)
State = dict[str, Any]


@dataclass
class AlarmOp:
    action: Literal["raise", "clear"]
    source: str
    rule: str
    device_id: str
    kind: str
    severity: str
    cell_id: str | None
    building: str | None
    at: datetime
    count: int = 1
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Evaluation:
    states: dict[Key, State | None] = field(default_factory=dict)  # None: idle, forget it
    ops: list[AlarmOp] = field(default_factory=list)
    heard: dict[str, float] = field(default_factory=dict)  # device → last message time
    # Keys of `states` whose change is only in rate-of-rise samples: kept in memory but not
    # written (a smoke detector's every reading would cost a row), for the telemetry table
    # holds them already: `Engine.restore_samples` rebuilds them on start.
    unsaved: set[Key] = field(default_factory=set)

    def add(self, op: AlarmOp) -> None:
        """Consecutive raises of one key fold into one op with a count."""
        last = self.ops[-1] if self.ops else None
        if (
            op.action == "raise"
            and last is not None
            and last.action == "raise"
            and (last.source, last.rule) == (op.source, op.rule)
        ):
            last.count += op.count
            last.at = max(last.at, op.at)
            if SEVERITY_RANK[op.severity] > SEVERITY_RANK[last.severity]:
                last.severity = op.severity
            last.details = op.details
            return
        self.ops.append(op)

    @property
    def empty(self) -> bool:
        return not self.states and not self.ops


def due_at(state: State | None) -> float | None:
    """When a timer must look at this state without waiting for a message."""
    if not state:
        return None
    times = [state.get("pending_since_due"), state.get("clear_pending_due"),
             state.get("clear_due")]  # fmt: skip
    present = [t for t in times if t is not None]
    return min(present) if present else None


def _ts(value: datetime) -> float:
    return value.timestamp()


def _dt(value: float) -> datetime:
    return datetime.fromtimestamp(value, UTC)


def matches(condition: Condition, reading: Reading, *, for_clear: bool = False) -> bool | None:
    """True / False, or None when the reading says nothing about it.

    `for_clear`: deciding whether a firing condition stopped holding. An event is
    then False on a telemetry reading, so `alarm = false` clears a rule that fires on
    `alarm = true` OR the `alarm` event."""
    return _matcher(condition, for_clear)(reading)


Matcher = Callable[[Reading], "bool | None"]
# Each condition compiled once into a closure (the engine asks ~10 questions of every
# reading, and walking the condition's fields each time cost ~2 µs a question). Keyed by
# id(): the entry holds the condition, so the id cannot be reused while it is cached.
_MATCHERS: dict[tuple[int, bool], tuple[Condition, Matcher]] = {}


def _matcher(condition: Condition, for_clear: bool) -> Matcher:
    cached = _MATCHERS.get((id(condition), for_clear))
    if cached is not None and cached[0] is condition:
        return cached[1]
    compiled = _compile(condition, for_clear)
    _MATCHERS[(id(condition), for_clear)] = (condition, compiled)
    return compiled


def _compile(condition: Condition, for_clear: bool) -> Matcher:
    if isinstance(condition, FieldCondition):
        return _compile_field(condition)
    if isinstance(condition, EventCondition):
        events = frozenset(condition.event)
        other_channel = False if for_clear else None

        def event_matches(reading: Reading) -> bool | None:
            if reading.channel != "event":
                return other_channel
            return reading.event in events

        return event_matches
    parts = [_matcher(c, for_clear) for c in condition.any_of]

    def any_matches(reading: Reading) -> bool | None:
        unknown = False
        for part in parts:
            result = part(reading)
            if result is True:
                return True
            if result is None:
                unknown = True
        return None if unknown else False

    return any_matches


def _compile_field(condition: FieldCondition) -> Matcher:
    name = condition.field
    if condition.is_ is not None:
        wanted = condition.is_

        def is_matches(reading: Reading) -> bool | None:
            value = reading.values.get(name)
            return None if value is None else bool(value) is wanted

        return is_matches
    if condition.above is not None:
        compare, limit = operator.gt, condition.above
    elif condition.at_least is not None:
        compare, limit = operator.ge, condition.at_least
    elif condition.below is not None:
        compare, limit = operator.lt, condition.below
    else:
        assert condition.at_most is not None
        compare, limit = operator.le, condition.at_most

    def threshold_matches(reading: Reading) -> bool | None:
        value = reading.values.get(name)
        if value is None or isinstance(value, bool):
            return None
        return bool(compare(value, limit))

    return threshold_matches


def _suppressed(unless: tuple[Matcher, ...], reading: Reading) -> bool:
    for condition in unless:  # noqa: SIM110 (any() over a generator: slower, asked per reading)
        if condition(reading) is True:
            return True
    return False


def _without(state: State | None, name: str) -> State:
    if not state or (len(state) == 1 and name in state):
        return {}  # the usual rate-of-rise state: nothing but its samples
    return {k: v for k, v in state.items() if k != name}


def _idle(state: State) -> State | None:
    return state if any(v not in (None, False, [], {}) for v in state.values()) else None


class Engine:
    def __init__(
        self,
        ruleset: RuleSet,
        lookup_device: Callable[[str], DeviceInfo | None],
        cells_of: Callable[[str | None], tuple[str, ...]] = lambda cell: (cell,) if cell else (),
        muted: Callable[[DeviceInfo, datetime], bool] = lambda device, at: False,
    ) -> None:
        self.ruleset = ruleset
        self.lookup_device = lookup_device
        self.cells_of = cells_of
        self.muted = muted
        self.states: dict[Key, State] = {}
        self.heard: dict[str, float] = {}
        # One entry per watched device: a reading only moves `heard`, and the entry, when
        # it comes up, is scheduled again at the device's real deadline.
        self._silences = SilenceSchedule()
        self._timer_heap: list[tuple[float, Key]] = []
        # Plans by (device named by an override or None, kind, cell), shared between
        # entries with the same rules.
        self._plans: dict[tuple[str | None, str, str | None], _Plan] = {}
        self._shared_plans: dict[tuple[int, ...], _Plan] = {}

    # -- loading ---------------------------------------------------------------------
    def load(self, states: Iterable[tuple[str, str, State]], heard: dict[str, float]) -> None:
        """Restore persisted rule state and each device's last message time."""
        for source, rule, state in states:
            self.states[(source, rule)] = state
            due = due_at(state)
            if due is not None:
                heapq.heappush(self._timer_heap, (due, (source, rule)))
        for device_id, at in heard.items():
            self.expect(device_id, at)

    def restore_samples(self, readings: Iterable[Reading]) -> int:
        """Rebuild rate-of-rise samples from recent telemetry, oldest reading first: they
        are not written with every reading (`Evaluation.unsaved`), and the table holds
        every reading they were made of. Call after `load`. Replays the readings through
        the rate-of-rise rules only, as `evaluate` did, but raises nothing (what they
        raised is in the database). Returns how many (source, rule) states it rebuilt."""
        for state in self.states.values():
            state.pop("samples", None)  # all of them are in `readings`
        evaluation = Evaluation()
        self.evaluate_part(evaluation, readings, replay_rates=True)
        evaluation.ops.clear()
        self.commit(evaluation)
        return len(evaluation.states)

    def expect(self, device_id: str, heard_at: float) -> None:
        """Start watching a device for silence, as if last heard at `heard_at`."""
        heard = self.heard.get(device_id)
        if heard is None or heard_at > heard:
            self.heard[device_id] = heard = heard_at
        if device_id in self._silences:
            return  # its entry comes up first and is scheduled again at the new deadline
        deadline = self._absence_deadline(self.lookup_device(device_id), heard)
        if deadline is not None:
            self._silences.schedule(device_id, deadline)

    def rules_for(self, device: DeviceInfo) -> list[Rule]:
        return self._plan(device).rules

    def _plan(self, device: DeviceInfo) -> _Plan:
        """The device's rules, each with how it is evaluated: resolved once per kind and
        cell, and for each device an override names (an entry per device was ~100 bytes
        each, 100 MB at a million devices)."""
        named = device.id in self.ruleset.named_devices
        key = (device.id if named else None, device.kind, device.cell_id)
        plan = self._plans.get(key)
        if plan is None:
            rules = self.ruleset.for_device(device.kind, device.id, self.cells_of(device.cell_id))
            # The rules are held by the plan, so their ids stay theirs while it lives.
            shared = tuple(id(rule) for rule in rules)
            plan = self._shared_plans.get(shared)
            if plan is None:
                plan = self._shared_plans[shared] = _Plan.of(rules)
            self._plans[key] = plan
        return plan

    def _absence_rule(self, device: DeviceInfo) -> Rule | None:
        return self._plan(device).absence

    def _absence_deadline(self, device: DeviceInfo | None, heard_at: float) -> float | None:
        if device is None or not device.interval_s:
            return None
        rule = self._absence_rule(device)
        if rule is None:
            return None
        assert isinstance(rule.when, Absence)
        return heard_at + rule.when.absent_for_intervals * device.interval_s

    # -- state access within one evaluation ---------------------------------------------
    def _get(self, evaluation: Evaluation, key: Key) -> State:
        if key in evaluation.states:
            return dict(evaluation.states[key] or {})
        return dict(self.states.get(key, {}))

    def _peek(self, evaluation: Evaluation, key: Key) -> State | None:
        """The current state, not to be modified (no copy: the common case is no state)."""
        if key in evaluation.states:
            return evaluation.states[key]
        return self.states.get(key)

    def _put(
        self, evaluation: Evaluation, key: Key, state: State, *, rebuildable: str | None = None
    ) -> None:
        """Record the new state only if it changed: an unchanged state costs no write, nor
        does one that changed only in `rebuildable` (see `Evaluation.unsaved`)."""
        new = _idle(state)
        first = key not in evaluation.states
        before = self.states.get(key) if first else evaluation.states[key]
        if first and new == before:
            return
        evaluation.states[key] = new
        if (
            rebuildable is not None
            and (first or key in evaluation.unsaved)
            and _without(new, rebuildable) == _without(before, rebuildable)
        ):
            evaluation.unsaved.add(key)
        else:
            evaluation.unsaved.discard(key)

    # -- messages --------------------------------------------------------------------
    def evaluate(self, readings: Iterable[Reading]) -> Evaluation:
        evaluation = Evaluation()
        self.evaluate_part(evaluation, readings)
        self.finish(evaluation)
        return evaluation

    def finish(self, evaluation: Evaluation) -> None:
        """Incidents across devices, from everything the batch raised."""
        self._correlate(evaluation)

    def evaluate_part(
        self, evaluation: Evaluation, readings: Iterable[Reading], *, replay_rates: bool = False
    ) -> None:
        """`evaluate` in parts (the caller may yield in between): every part of a batch
        into one `evaluation`, in order, then `finish` it once. `replay_rates`: only the
        rate-of-rise rules, and no last-heard times (`restore_samples`)."""
        received_at: datetime | None = None
        heard = 0.0
        for reading in readings:
            device = self.lookup_device(reading.device_id)
            if device is None:
                continue
            at = min(reading.time, reading.received_at)
            if not replay_rates:
                if reading.received_at is not received_at:  # one per socket read, not message
                    received_at = reading.received_at
                    heard = _ts(received_at)
                before = evaluation.heard.get(device.id)
                if before is None or heard > before:
                    evaluation.heard[device.id] = heard
            if self.muted(device, at):
                continue
            plan = self._plan(device)
            if plan.absence is not None and not replay_rates:
                self._heard_again(evaluation, plan.absence, device, reading.received_at)
            for step in plan.for_telemetry if reading.channel == "telemetry" else plan.evaluated:
                if replay_rates and not step.rate:
                    continue
                if step.unless and _suppressed(step.unless, reading):
                    continue  # e.g. a self-test
                if step.momentary:
                    self._momentary(evaluation, step, device, reading, at)
                    continue
                holds = step.holds(reading)  # type: ignore[misc]  # stateful: always set
                if holds is not True:
                    key = (device.id, step.rule.id)
                    if not (evaluation.states[key] if key in evaluation.states
                            else self.states.get(key)):  # fmt: skip
                        continue  # not firing, nothing pending: the usual reading
                self._stateful(evaluation, step, device, reading, at, holds)

    def urgent_devices(self, readings: Iterable[Reading]) -> set[str]:
        """The devices of `readings` with a telemetry reading that would raise a critical
        alarm not raised yet (a detector's own alarm flag, a bin's fire flag, heat past the
        fixed threshold): no state for that rule, not suppressed, not muted. A guess from
        the committed state, made outside the rules lock: ingest writes such a device's
        readings ahead of a bulk batch (ingest/consumer.py), and the rules decide as usual."""
        urgent: set[str] = set()
        for reading in readings:
            device = self.lookup_device(reading.device_id)
            if device is None or device.id in urgent or reading.channel != "telemetry":
                continue
            for step in self._plan(device).critical:
                if step.critical(reading) is not True:  # type: ignore[misc]  # critical only
                    continue
                if self.states.get((device.id, step.rule.id)):
                    continue  # raised already, or on its way
                if step.unless and _suppressed(step.unless, reading):
                    continue
                if not self.muted(device, min(reading.time, reading.received_at)):
                    urgent.add(device.id)
                break
        return urgent

    def _op(
        self,
        action: Literal["raise", "clear"],
        rule: Rule,
        device: DeviceInfo,
        at: datetime,
        severity: str | None = None,
        details: dict[str, Any] | None = None,
        source: str | None = None,
    ) -> AlarmOp:
        return AlarmOp(
            action=action,
            source=source or device.id,
            rule=rule.id,
            device_id=device.id,
            kind=device.kind,
            severity=severity or rule.severity,
            cell_id=device.cell_id,
            building=device.building,
            at=at,
            details={"label": rule.label, "description": rule.description, **(details or {})},
        )

    def _severity(self, rule: Rule, reading: Reading | None) -> str:
        severity = rule.severity
        if reading is not None:
            for level in rule.levels:
                if matches(level.when, reading) and (
                    SEVERITY_RANK[level.severity] > SEVERITY_RANK[severity]
                ):
                    severity = level.severity
        return severity

    @staticmethod
    def _reading_details(fields: tuple[str, ...], reading: Reading) -> dict[str, Any]:
        details: dict[str, Any] = {k: reading.values[k] for k in fields if k in reading.values}
        if reading.event:
            details["event"] = reading.event
        return details

    def _momentary(
        self, evaluation: Evaluation, step: _Step, device: DeviceInfo, reading: Reading,
        at: datetime,
    ) -> None:  # fmt: skip
        rule, fields = step.rule, step.fields
        key = (device.id, rule.id)
        when = rule.when
        triggered = False
        value = 0.0
        if isinstance(when, RateOfRise):
            raw = reading.values.get(when.rate_of_rise)
            if raw is None or isinstance(raw, bool):
                return
            value = float(raw)
            if self._rate_sample_only(evaluation, key, when, _ts(at), value):
                return
        elif step.holds is not None and step.holds(reading) is not True:
            return  # an event rule and another reading, or not counted: nothing to do
        t = _ts(at)
        state = self._get(evaluation, key)
        measured: dict[str, Any] = {}
        if isinstance(when, RateOfRise):
            samples = [s for s in state.get("samples", []) if s[0] >= t - when.within_s]
            samples = sorted([*samples, [t, value]])[-MAX_RATE_SAMPLES:]
            rise = value - min(v for _, v in samples)
            triggered = rise >= when.by
            state["samples"] = samples
            if triggered:
                measured["rise"] = round(rise, 3)
        elif isinstance(when, CountInWindow):
            hits = [h for h in state.get("hits", []) if h >= t - when.within_s] + [t]
            triggered = len(hits) >= when.at_least
            state["hits"] = hits[-when.at_least :]
            measured["count_in_window"] = len(hits)
        else:
            triggered = True
        if triggered:
            details = {**self._reading_details(fields, reading), **measured}
            evaluation.add(self._op("raise", rule, device, at, self._severity(rule, reading),
                                    details))  # fmt: skip
            if rule.clear_after_s:
                state["clear_due"] = t + rule.clear_after_s
        self._put(evaluation, key, state,
                  rebuildable="samples" if isinstance(when, RateOfRise) else None)  # fmt: skip

    def _rate_sample_only(
        self, evaluation: Evaluation, key: Key, when: RateOfRise, t: float, value: float
    ) -> bool:
        """The usual rate-of-rise reading, done here: a sample later than the last, no
        rise, a state of nothing but samples. Exactly what the general path makes of it
        (samples in order, the last MAX_RATE_SAMPLES, unsaved) at a fraction of its cost:
        a smoke detector's every reading comes here. False: not such a reading."""
        current = self._peek(evaluation, key)
        if not current:
            samples = [[t, value]]
        elif len(current) == 1 and "samples" in current and current["samples"][-1][0] < t:
            old = current["samples"]
            samples = old[bisect.bisect_left(old, t - when.within_s, key=_SAMPLE_TIME) :]
            samples.append([t, value])
            if len(samples) > MAX_RATE_SAMPLES:
                del samples[:-MAX_RATE_SAMPLES]
        else:
            return False
        if value - min(samples, key=_SAMPLE_VALUE)[1] >= when.by:
            return False  # it fires: the general path
        first = key not in evaluation.states
        evaluation.states[key] = {"samples": samples}
        if first or key in evaluation.unsaved:
            evaluation.unsaved.add(key)  # only samples changed (see `_put`)
        return True

    def _stateful(
        self, evaluation: Evaluation, step: _Step, device: DeviceInfo, reading: Reading,
        at: datetime, holds: bool | None,
    ) -> None:  # fmt: skip
        """`holds`: the step's condition on the reading. `evaluate_part` asks it, and
        comes here only when it holds or the rule has a state (inlined there: asked ~5
        times of every reading, the usual reading changes nothing)."""
        key = (device.id, step.rule.id)
        rule, fields = step.rule, step.fields
        assert step.still is not None
        t = _ts(at)
        state = self._get(evaluation, key)
        if step.clears is not None:
            clears = step.clears(reading)
        else:
            still = step.still(reading)
            clears = None if still is None else not still
        details = self._reading_details(fields, reading)
        if not state.get("firing"):
            if holds is True:
                since = state.get("pending_since", t)
                if t - since >= rule.for_s:
                    self._fire(evaluation, state, rule, device, at, reading, details)
                else:
                    state["pending_since"] = since
                    state["pending_since_due"] = since + rule.for_s
                    state["pending_details"] = details
                    state["pending_severity"] = self._severity(rule, reading)
            elif holds is False:
                for name in _PENDING:
                    state.pop(name, None)
        elif clears is True:
            self._clear(evaluation, state, rule, device, at, details)
        elif holds is True:
            state.pop("clear_pending_since", None)
            state.pop("clear_pending_due", None)
            if rule.clear_after_s:
                state["clear_due"] = t + rule.clear_after_s
            evaluation.add(self._op("raise", rule, device, at, self._severity(rule, reading),
                                    details))  # fmt: skip
        self._put(evaluation, key, state)

    def _fire(
        self,
        evaluation: Evaluation,
        state: State,
        rule: Rule,
        device: DeviceInfo,
        at: datetime,
        reading: Reading | None,
        details: dict[str, Any],
    ) -> None:
        t = _ts(at)
        severity = self._severity(rule, reading) if reading else state.get("pending_severity")
        for name in _PENDING:
            state.pop(name, None)
        state["firing"] = True
        if rule.clear_after_s:
            state["clear_due"] = t + rule.clear_after_s
        clears = [c for c in state.get("clears", []) if c >= t - FLAP_WINDOW_S]
        state["clears"] = clears
        if len(clears) >= FLAP_COUNT:
            state["flapping"] = True
            details = {**details, "flapping": True}
        evaluation.add(self._op("raise", rule, device, at, severity, details))

    def _clear(
        self,
        evaluation: Evaluation,
        state: State,
        rule: Rule,
        device: DeviceInfo,
        at: datetime,
        details: dict[str, Any],
    ) -> None:
        t = _ts(at)
        if state.get("flapping") and "clear_pending_since" not in state:
            state["clear_pending_since"] = t
            state["clear_pending_due"] = t + FLAP_HOLD_S
            return
        if state.get("flapping") and t < state["clear_pending_due"]:
            return
        for name in ("firing", "flapping", "clear_pending_since", "clear_pending_due", "clear_due"):
            state.pop(name, None)
        state["clears"] = [c for c in state.get("clears", []) if c >= t - FLAP_WINDOW_S] + [t]
        evaluation.add(self._op("clear", rule, device, at, details=details))

    def _heard_again(
        self, evaluation: Evaluation, rule: Rule, device: DeviceInfo, at: datetime
    ) -> None:
        key = (device.id, rule.id)
        current = self._peek(evaluation, key)
        if current and current.get("firing"):
            state = dict(current)
            state.pop("firing")
            evaluation.add(self._op("clear", rule, device, at, details={"heard_again": True}))
            self._put(evaluation, key, state)

    def _correlate(self, evaluation: Evaluation) -> None:
        raised = [op for op in evaluation.ops if op.action == "raise" and op.source == op.device_id]
        for op in raised:
            for rule in self.ruleset.correlations.get(op.rule, []):
                assert isinstance(rule.when, Correlation)
                device = self.lookup_device(op.device_id)
                if device is None or device.cell_id is None:
                    continue
                if rule.when.by == "building":
                    if not device.building:
                        continue
                    group = f"building:{device.cell_id}/{device.building}"
                else:
                    group = f"cell:{device.cell_id}"
                key = (group, rule.id)
                t = _ts(op.at)
                state = self._get(evaluation, key)
                members = {d: s for d, s in state.get("devices", {}).items()
                           if s >= t - rule.when.within_s}  # fmt: skip
                members[device.id] = t
                state["devices"] = members
                if len(members) >= rule.when.min_devices:
                    state["firing"] = True
                    if rule.clear_after_s:
                        state["clear_due"] = t + rule.clear_after_s
                    evaluation.add(self._op(
                        "raise", rule, device, op.at,
                        details={"devices": sorted(members), "group": group}, source=group,
                    ))  # fmt: skip
                self._put(evaluation, key, state)

    # -- timers ----------------------------------------------------------------------
    def next_due(self) -> float | None:
        candidates = []
        if self._timer_heap:
            candidates.append(self._timer_heap[0][0])
        silence = self._silences.next_due()
        if silence is not None:
            candidates.append(silence)
        return min(candidates) if candidates else None

    def tick(self, now: datetime) -> Evaluation:
        """Everything due by `now`: durations held, quiet periods over, silences."""
        evaluation = Evaluation()
        t = _ts(now)
        while self._timer_heap and self._timer_heap[0][0] <= t:
            _, key = heapq.heappop(self._timer_heap)
            state = evaluation.states[key] if key in evaluation.states else self.states.get(key)
            due = due_at(state)
            if state is None or due is None or due > t:
                continue  # stale entry: the state moved on
            self._timer(evaluation, key, dict(state), now)
        for device_id in self._silences.take_due(t):
            device = self.lookup_device(device_id)
            heard_at = self.heard.get(device_id)
            rule = self._absence_rule(device) if device else None
            if device is None or rule is None or heard_at is None:
                continue
            real = self._absence_deadline(device, heard_at)
            if real is None:
                continue
            if real > t:
                self._silences.schedule(device_id, real)  # heard again since, or not due
                continue
            if self.muted(device, now):
                self._silences.schedule(device_id, t + MUTED_RECHECK_S)
                continue
            key = (device.id, rule.id)
            state = self._get(evaluation, key)
            if not state.get("firing"):
                state["firing"] = True
                silent_s = round(t - heard_at, 1)
                evaluation.add(self._op("raise", rule, device, now,
                                        details={"silent_s": silent_s}))  # fmt: skip
                self._put(evaluation, key, state)
        return evaluation

    def _timer(self, evaluation: Evaluation, key: Key, state: State, now: datetime) -> None:
        source, rule_id = key
        rule = self.ruleset.rules.get(rule_id)
        t = _ts(now)
        device = self.lookup_device(source if not source.startswith(("building:", "cell:")) else "")
        if rule is None:
            self._put(evaluation, key, {})
            return
        if device is not None:
            rule = next((r for r in self.rules_for(device) if r.id == rule_id), rule)
        pending_due = state.get("pending_since_due")
        due_now = pending_due is not None and pending_due <= t
        if due_now and device is not None and not self.muted(device, now):
            details = state.get("pending_details", {})
            self._fire(evaluation, state, rule, device, now, None, details)
        if state.get("clear_pending_due") is not None and state["clear_pending_due"] <= t:
            state["clear_pending_due"] = t
            if device is not None:
                self._clear(evaluation, state, rule, device, now, {"flap_hold_s": FLAP_HOLD_S})
        if state.get("clear_due") is not None and state["clear_due"] <= t:
            firing = state.pop("firing", None) or rule.momentary
            for name in ("clear_due", "samples", "hits", "devices", "flapping"):
                state.pop(name, None)
            if device is not None and firing:
                evaluation.add(self._op("clear", rule, device, now, details={"quiet": True}))
            elif source.startswith(("building:", "cell:")) and firing:
                evaluation.add(AlarmOp("clear", source, rule.id, "", rule.kind, rule.severity,
                                       None, None, now))  # fmt: skip
        self._put(evaluation, key, state)

    # -- after the transaction committed ---------------------------------------------------
    def commit(self, evaluation: Evaluation) -> None:
        for key, state in evaluation.states.items():
            if state is None:
                self.states.pop(key, None)
            else:
                self.states[key] = state
                due = due_at(state)
                if due is not None:
                    heapq.heappush(self._timer_heap, (due, key))
        for device_id, heard_at in evaluation.heard.items():
            self.expect(device_id, heard_at)

    def forget_device_rules(self) -> None:
        """The registry changed (a device moved cell): resolve rules again."""
        self._plans.clear()
        self._shared_plans.clear()


def _detail_fields(rule: Rule) -> tuple[str, ...]:
    """The reading fields worth showing with the rule's alarm."""
    fields: set[str] = set()
    for condition in [rule.when, *(level.when for level in rule.levels)]:
        if isinstance(condition, FieldCondition):
            fields.add(condition.field)
        elif isinstance(condition, AnyOf):
            fields |= {c.field for c in condition.any_of if isinstance(c, FieldCondition)}
        elif isinstance(condition, RateOfRise):
            fields.add(condition.rate_of_rise)
    return tuple(sorted(fields))


@dataclass(frozen=True, slots=True)
class _Step:
    """One rule as readings are matched against it, its conditions compiled once (looking
    each up per reading cost more than asking it)."""

    rule: Rule
    momentary: bool
    fields: tuple[str, ...]  # shown with its alarm
    rate: bool  # rate of rise: replayed from stored readings after a restart
    unless: tuple[Matcher, ...]
    holds: Matcher | None  # when it fires (what it counts); None: rate of rise
    still: Matcher | None  # stateful: whether the firing condition still holds
    clears: Matcher | None  # stateful, with a clear condition of its own
    # Whether a reading alone makes the rule critical (its condition, if its severity is
    # critical, else its critical levels'); None: never from one reading (rates, counts).
    critical: Matcher | None

    @classmethod
    def of(cls, rule: Rule) -> _Step:
        when = rule.when
        holds: Matcher | None = None  # rate of rise
        if isinstance(when, CountInWindow):
            holds = _matcher(when.count, False)
        elif not isinstance(when, RateOfRise):
            assert not isinstance(when, Absence | Correlation)  # not evaluated per reading
            holds = _matcher(when, False)
        stateful = not rule.momentary and holds is not None
        return cls(
            rule, rule.momentary, _detail_fields(rule), isinstance(when, RateOfRise),
            tuple(_matcher(c, False) for c in rule.unless), holds,
            _matcher(when, True) if stateful else None,  # type: ignore[arg-type]
            _matcher(rule.clear, False) if stateful and rule.clear is not None else None,
            _critical_matcher(rule, holds),
        )  # fmt: skip


def _critical_matcher(rule: Rule, holds: Matcher | None) -> Matcher | None:
    if holds is None or isinstance(rule.when, CountInWindow):
        return None
    if rule.severity == "critical":
        return holds
    levels = [_matcher(level.when, False) for level in rule.levels if level.severity == "critical"]
    if len(levels) <= 1:
        return levels[0] if levels else None  # the usual case: no closure around it

    def any_level(reading: Reading) -> bool | None:
        for level in levels:
            if level(reading) is True:
                return True
        return None

    return any_level


@dataclass(frozen=True, slots=True)
class _Plan:
    """A device's rules sorted for evaluation: its absence rule (fed by every message),
    and the rules readings are matched against. Correlations are left out: the ops of the
    rule they correlate drive them."""

    rules: list[Rule]
    absence: Rule | None
    evaluated: tuple[_Step, ...]
    # Without the momentary rules only an event can trigger: on telemetry they do nothing.
    for_telemetry: tuple[_Step, ...]
    critical: tuple[_Step, ...]  # of for_telemetry, those one reading can make critical

    @classmethod
    def of(cls, rules: list[Rule]) -> _Plan:
        absence = next((r for r in rules if isinstance(r.when, Absence)), None)
        evaluated = tuple(
            _Step.of(rule) for rule in rules if not isinstance(rule.when, Absence | Correlation)
        )
        for_telemetry = tuple(
            step for step in evaluated if not (step.momentary and _events_only(step.rule.when))
        )
        critical = tuple(step for step in for_telemetry if step.critical is not None)
        return cls(rules, absence, evaluated, for_telemetry, critical)


def _events_only(condition: object) -> bool:
    """Whether only an event can make `condition` hold (a telemetry reading never does)."""
    if isinstance(condition, EventCondition):
        return True
    if isinstance(condition, CountInWindow):
        return _events_only(condition.count)
    if isinstance(condition, AnyOf):
        return all(_events_only(part) for part in condition.any_of)
    return False
