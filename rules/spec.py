"""The rule language: TOML files, validated into frozen models at start.

A file holds rules for one device kind:

    kind = "smart_bin"

    [[rules]]
    id = "bin.full"
    severity = "minor"
    when  = { field = "fill", at_least = 80 }
    clear = { field = "fill", below = 30 }     # hysteresis

Conditions (`when`, `clear`, `unless`):
- field:        { field = "x", above | at_least | below | at_most = N }
                or { field = "x", is = true }
- event:        { event = ["door_forced", "tamper"] }
- any_of:       { any_of = [cond, cond, …] }
- rate of rise: { rate_of_rise = "temperature", by = 8, within_s = 60 }
- count:        { count = cond, at_least = 5, within_s = 60 }
- absence:      { absent_for_intervals = 3 }          (fired by a timer)
- correlation:  { correlate = "smoke.alarm", min_devices = 2, within_s = 120, by = "building" }

Rule options: `for_s` (held continuously before it fires), `clear` (hysteresis;
default: `when` no longer holds), `clear_after_s` (momentary conditions — events,
counts, rates — clear after this long without a new trigger; unset: stay until an
operator closes them), `unless` (suppression: a reading matching any of these is
ignored by the rule, e.g. a detector in self-test), `levels` (a higher severity
when a field goes further), `enabled`.

Overrides (files with `[[overrides]]`) change a rule for some devices or cells (a
cell covers every cell below it): `{ rule = "bin.full", cells = ["g1"], devices = [],
set = { severity = "major", enabled = false, for_s = 30, when = {…}, clear = {…} } }`.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Severity = Literal["critical", "major", "minor", "warning"]
SEVERITY_RANK: dict[str, int] = {"warning": 1, "minor": 2, "major": 3, "critical": 4}
DEVICE_KINDS = ("smoke_detector", "manhole_cover", "door_access", "smart_bin")
DEFAULTS_DIR = Path(__file__).parent / "defaults"

_Strict = ConfigDict(extra="forbid", frozen=True)


class FieldCondition(BaseModel):
    model_config = _Strict
    field: str
    above: float | None = None
    at_least: float | None = None
    below: float | None = None
    at_most: float | None = None
    is_: bool | None = Field(default=None, alias="is")

    @model_validator(mode="after")
    def _exactly_one_test(self) -> FieldCondition:
        tests = [self.above, self.at_least, self.below, self.at_most, self.is_]
        if sum(t is not None for t in tests) != 1:
            raise ValueError("give exactly one of above, at_least, below, at_most, is")
        return self


class EventCondition(BaseModel):
    model_config = _Strict
    event: list[str] = Field(min_length=1)


class AnyOf(BaseModel):
    model_config = _Strict
    any_of: list[Condition] = Field(min_length=1)


class RateOfRise(BaseModel):
    model_config = _Strict
    rate_of_rise: str
    by: float = Field(gt=0)
    within_s: float = Field(gt=0, le=3600)


class CountInWindow(BaseModel):
    model_config = _Strict
    count: FieldCondition | EventCondition
    at_least: int = Field(ge=2)
    within_s: float = Field(gt=0, le=86400)


class Absence(BaseModel):
    model_config = _Strict
    absent_for_intervals: float = Field(gt=1, le=1000)


class Correlation(BaseModel):
    model_config = _Strict
    correlate: str
    min_devices: int = Field(ge=2)
    within_s: float = Field(gt=0, le=3600)
    by: Literal["building", "cell"] = "building"


Condition = FieldCondition | EventCondition | AnyOf
Trigger = (
    FieldCondition | EventCondition | AnyOf | RateOfRise | CountInWindow | Absence | Correlation
)
AnyOf.model_rebuild()


class Level(BaseModel):
    model_config = _Strict
    when: FieldCondition
    severity: Severity


class Rule(BaseModel):
    model_config = _Strict
    id: Annotated[str, Field(pattern=r"^[a-z0-9_]+(\.[a-z0-9_]+)+$")]
    kind: str = ""  # filled from the file's `kind`
    description: str = ""
    severity: Severity
    when: Trigger
    clear: Condition | None = None
    for_s: float = Field(default=0, ge=0, le=86400)
    clear_after_s: float | None = Field(default=None, gt=0)
    unless: list[Condition] = Field(default_factory=list)
    levels: list[Level] = Field(default_factory=list)
    enabled: bool = True

    @property
    def momentary(self) -> bool:
        """Events, counts and rates happen at an instant: nothing 'stops holding'."""
        return isinstance(self.when, EventCondition | RateOfRise | CountInWindow) or (
            isinstance(self.when, AnyOf)
            and all(isinstance(c, EventCondition) for c in self.when.any_of)
        )

    @model_validator(mode="after")
    def _consistent(self) -> Rule:
        if isinstance(self.when, Absence | Correlation) and (self.for_s or self.clear):
            raise ValueError("absence and correlation rules take neither for_s nor clear")
        if self.clear is not None and self.momentary:
            raise ValueError("a momentary condition clears by clear_after_s, not clear")
        return self


class Override(BaseModel):
    model_config = _Strict
    rule: str
    cells: list[str] = Field(default_factory=list)
    devices: list[str] = Field(default_factory=list)
    set: dict[str, Any]

    @model_validator(mode="after")
    def _targets(self) -> Override:
        if not self.cells and not self.devices:
            raise ValueError("an override needs cells or devices")
        unknown = set(self.set) - {"severity", "enabled", "for_s", "when", "clear",
                                   "clear_after_s", "unless", "levels"}  # fmt: skip
        if unknown:
            raise ValueError(f"cannot override {sorted(unknown)}")
        return self


class RuleFile(BaseModel):
    model_config = _Strict
    kind: str | None = None
    rules: list[Rule] = Field(default_factory=list)
    overrides: list[Override] = Field(default_factory=list)


class RulesError(Exception):
    """Invalid rule files; every problem names file, rule and key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid rules:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


class RuleSet:
    """All rules by kind, plus overrides; resolves the effective rule for a device."""

    def __init__(self, rules: Iterable[Rule], overrides: Iterable[Override] = ()) -> None:
        self.rules: dict[str, Rule] = {}
        self.by_kind: dict[str, list[Rule]] = {kind: [] for kind in DEVICE_KINDS}
        for rule in rules:
            self.rules[rule.id] = rule
            self.by_kind.setdefault(rule.kind, []).append(rule)
        self.overrides = list(overrides)
        self.correlations: dict[str, list[Rule]] = {}
        for rule in self.rules.values():
            if isinstance(rule.when, Correlation):
                self.correlations.setdefault(rule.when.correlate, []).append(rule)
        self._resolved: dict[tuple[str, str, tuple[str, ...]], Rule] = {}

    def for_device(self, kind: str, device_id: str, cells: tuple[str, ...]) -> list[Rule]:
        """The device's effective rules; `cells` is its cell and every cell above it."""
        out = []
        for rule in self.by_kind.get(kind, []):
            effective = self._effective(rule, device_id, cells)
            if effective.enabled:
                out.append(effective)
        return out

    def _effective(self, rule: Rule, device_id: str, cells: tuple[str, ...]) -> Rule:
        matching = [
            o for o in self.overrides
            if o.rule == rule.id and (device_id in o.devices or set(o.cells) & set(cells))
        ]  # fmt: skip
        if not matching:
            return rule
        key = (rule.id, device_id, cells)
        cached = self._resolved.get(key)
        if cached is None:
            data = rule.model_dump(by_alias=True)
            # Cell overrides first, the device's own last: the most specific wins.
            for override in sorted(matching, key=lambda o: device_id in o.devices):
                data.update(override.set)
            cached = Rule.model_validate(data)
            self._resolved[key] = cached
        return cached


def _problems(path: Path, exc: ValidationError, data: dict[str, Any]) -> list[str]:
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = list(error["loc"])
        where = ".".join(str(p) for p in loc)
        if len(loc) >= 2 and loc[0] in ("rules", "overrides") and isinstance(loc[1], int):
            items = data.get(str(loc[0]), [])
            item = items[loc[1]] if loc[1] < len(items) else {}
            name = item.get("id") or item.get("rule") if isinstance(item, dict) else None
            key = ".".join(str(p) for p in loc[2:] if not str(p).endswith("Condition"))
            where = f"{loc[0][:-1]} {name or '#' + str(loc[1])}, key {key or '?'}"
        problems.append(f"{path.name}: {where}: {error['msg']}")
    return problems


def load_rules(extra_dirs: Iterable[Path] = ()) -> RuleSet:
    """The defaults plus every `*.toml` in `extra_dirs` (a rule with the same id
    replaces the default). Raises RulesError listing every problem."""
    problems: list[str] = []
    rules: dict[str, Rule] = {}
    overrides: list[Override] = []
    files = sorted(DEFAULTS_DIR.glob("*.toml"))
    for folder in extra_dirs:
        files += sorted(Path(folder).glob("*.toml"))
    for path in files:
        try:
            data = tomllib.loads(path.read_text("utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            problems.append(f"{path.name}: cannot read: {exc}")
            continue
        kind = data.get("kind")
        for item in data.get("rules", []):
            if isinstance(item, dict) and kind is not None:
                item.setdefault("kind", kind)
        try:
            parsed = RuleFile.model_validate(data)
        except ValidationError as exc:
            problems += _problems(path, exc, data)
            continue
        for rule in parsed.rules:
            if rule.kind not in DEVICE_KINDS:
                problems.append(f"{path.name}: rule {rule.id}: unknown kind {rule.kind!r}")
            rules[rule.id] = rule
        overrides += parsed.overrides
    for rule in rules.values():
        if isinstance(rule.when, Correlation) and rule.when.correlate not in rules:
            problems.append(f"rule {rule.id}: correlates unknown rule {rule.when.correlate!r}")
    for override in overrides:
        if override.rule not in rules:
            problems.append(f"override of unknown rule {override.rule!r}")
    if problems:
        raise RulesError(problems)
    ruleset = RuleSet(rules.values(), overrides)
    for override in overrides:  # an override must still give a valid rule
        base = rules[override.rule].model_dump(by_alias=True)
        try:
            Rule.model_validate({**base, **override.set})
        except ValidationError as exc:
            problems.append(f"override of {override.rule}: {exc.errors()[0]['msg']}")
    if problems:
        raise RulesError(problems)
    return ruleset
