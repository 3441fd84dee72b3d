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
when a field goes further), `label` (the short name staff see, e.g. 烟感报警),
`description`, `enabled`.

Overrides (files with `[[overrides]]`) change a rule for some devices or cells (a
cell covers every cell below it): `{ rule = "bin.full", cells = ["g1"], devices = [],
set = { severity = "major", enabled = false, for_s = 30, when = {…}, clear = {…} } }`.
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

log = logging.getLogger(__name__)

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


# Each condition kind is told by its key, so one mistake gives one problem about
# that kind, not one per kind the union could have been.
_TAG_KEYS = {
    "field": "field", "event": "event", "any_of": "any_of", "rate_of_rise": "rate_of_rise",
    "count": "count", "absent_for_intervals": "absence", "correlate": "correlation",
}  # fmt: skip
CONDITION_TAGS = frozenset(_TAG_KEYS.values())


def _condition_tag(value: Any) -> str | None:
    if isinstance(value, dict):
        return next((tag for key, tag in _TAG_KEYS.items() if key in value), None)
    return _MODEL_TAGS.get(type(value))


_UNKNOWN = "a condition needs one of the keys " + ", ".join(_TAG_KEYS)
Condition = Annotated[
    Annotated[FieldCondition, Tag("field")]
    | Annotated[EventCondition, Tag("event")]
    | Annotated[AnyOf, Tag("any_of")],
    Discriminator(_condition_tag, custom_error_type="condition", custom_error_message=_UNKNOWN),
]
Trigger = Annotated[
    Annotated[FieldCondition, Tag("field")]
    | Annotated[EventCondition, Tag("event")]
    | Annotated[AnyOf, Tag("any_of")]
    | Annotated[RateOfRise, Tag("rate_of_rise")]
    | Annotated[CountInWindow, Tag("count")]
    | Annotated[Absence, Tag("absence")]
    | Annotated[Correlation, Tag("correlation")],
    Discriminator(_condition_tag, custom_error_type="condition", custom_error_message=_UNKNOWN),
]
_MODEL_TAGS: dict[type, str] = {
    FieldCondition: "field", EventCondition: "event", AnyOf: "any_of",
    RateOfRise: "rate_of_rise", CountInWindow: "count", Absence: "absence",
    Correlation: "correlation",
}  # fmt: skip
AnyOf.model_rebuild()


class Level(BaseModel):
    model_config = _Strict
    when: FieldCondition
    severity: Severity


class Rule(BaseModel):
    model_config = _Strict
    id: Annotated[str, Field(pattern=r"^[a-z0-9_]+(\.[a-z0-9_]+)+$")]
    kind: str = ""  # filled from the file's `kind`
    label: str = Field(default="", max_length=40)  # the short name staff see (Chinese)
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
        # Only these devices can have rules of their own; every other device's depend on
        # its kind and cells alone (Engine._plan shares them).
        self.named_devices = frozenset(d for o in self.overrides for d in o.devices)
        self.correlations: dict[str, list[Rule]] = {}
        for rule in self.rules.values():
            if isinstance(rule.when, Correlation):
                self.correlations.setdefault(rule.when.correlate, []).append(rule)
        self._resolved: dict[tuple[str, str, tuple[str, ...]], Rule] = {}

    def rate_of_rise_scope(self) -> tuple[float, list[str]]:
        """How far back any rate-of-rise rule looks, and the device kinds that have one,
        overrides included ((0, []): none does)."""
        rates = [r for r in self.rules.values() if isinstance(r.when, RateOfRise)]
        windows = [r.when.within_s for r in rates if isinstance(r.when, RateOfRise)]
        kinds = {r.kind for r in rates}
        for override in self.overrides:
            when = override.set.get("when")
            if isinstance(when, dict) and "rate_of_rise" in when and override.rule in self.rules:
                windows.append(float(when.get("within_s", 0)))
                kinds.add(self.rules[override.rule].kind)
        return max(windows, default=0.0), sorted(kinds)

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
            cached = apply_overrides(rule, _most_specific_last(matching, device_id, cells))
            self._resolved[key] = cached
        return cached


def _most_specific_last(
    overrides: list[Override], device_id: str, cells: tuple[str, ...]
) -> list[Override]:
    """Widest cell first, nearest cell next, the device's own last: the last one wins.
    `cells` runs from the device's cell up to the street."""

    def specificity(override: Override) -> tuple[int, int]:
        if device_id in override.devices:
            return (1, 0)
        depth = min(cells.index(c) for c in override.cells if c in cells)
        return (0, -depth)

    return sorted(overrides, key=specificity)


def apply_overrides(rule: Rule, overrides: Iterable[Override]) -> Rule:
    data = rule.model_dump(by_alias=True)
    for override in overrides:
        data.update(override.set)
    try:
        return Rule.model_validate(data)
    except ValidationError:
        # load_rules checks every override and their combination; this is a last guard.
        log.exception("overrides of %s give an invalid rule; using the rule as written", rule.id)
        return rule


def _key(loc: list[Any]) -> str:
    """The TOML key of an error location, without the condition-kind tags."""
    parts: list[str] = []
    for index, part in enumerate(loc):
        before = loc[index - 1] if index else None
        holder = before in ("when", "clear", "count") or (
            isinstance(before, int) and index >= 2 and loc[index - 2] in ("unless", "any_of")
        )
        if part in CONDITION_TAGS and holder:
            continue
        parts.append(str(part))
    return ".".join(parts)


def _problems(path: Path, exc: ValidationError, data: dict[str, Any]) -> list[str]:
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = list(error["loc"])
        where = ".".join(str(p) for p in loc)
        if len(loc) >= 2 and loc[0] in ("rules", "overrides") and isinstance(loc[1], int):
            items = data.get(str(loc[0]), [])
            item = items[loc[1]] if loc[1] < len(items) else {}
            name = item.get("id") or item.get("rule") if isinstance(item, dict) else None
            key = _key(loc[2:])
            where = f"{loc[0][:-1]} {name or '#' + str(loc[1])}, key {key or '?'}"
        problems.append(f"{path.name}: {where}: {error['msg']}")
    return problems


def load_rules(extra_dirs: Iterable[Path] = ()) -> RuleSet:
    """The defaults plus every `*.toml` in `extra_dirs` (a rule with the same id
    replaces the default). Raises RulesError listing every problem."""
    problems: list[str] = []
    rules: dict[str, Rule] = {}
    overrides: list[tuple[str, Override]] = []
    rule_file: dict[str, str] = {}
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
            rule_file[rule.id] = path.name
        overrides += [(path.name, o) for o in parsed.overrides]
    for rule in rules.values():
        if isinstance(rule.when, Correlation) and rule.when.correlate not in rules:
            problems.append(
                f"{rule_file[rule.id]}: rule {rule.id}, key when.correlate: "
                f"unknown rule {rule.when.correlate!r}"
            )
    by_rule: dict[str, list[tuple[str, Override]]] = {}
    for file_name, override in overrides:
        if override.rule not in rules:
            problems.append(
                f"{file_name}: override of {override.rule}, key rule: unknown rule "
                f"{override.rule!r}"
            )
        else:
            by_rule.setdefault(override.rule, []).append((file_name, override))
    # Each override must give a valid rule, and so must all of a rule's overrides
    # together (cells first, devices last), since one device may match several.
    for rule_id, items in by_rule.items():
        candidates = [([o], f) for f, o in items]
        if len(items) > 1:
            ordered = sorted(items, key=lambda item: bool(item[1].devices))
            candidates.append(([o for _, o in ordered], ", ".join(sorted({f for f, _ in items}))))
        for chosen, file_name in candidates:
            data = rules[rule_id].model_dump(by_alias=True)
            for override in chosen:
                data.update(override.set)
            try:
                Rule.model_validate(data)
            except ValidationError as exc:
                together = " (the overrides together)" if len(chosen) > 1 else ""
                error = exc.errors(include_url=False)[0]
                problems.append(
                    f"{file_name}: override of {rule_id}{together}, key "
                    f"{_key(list(error['loc'])) or '?'}: {error['msg']}"
                )
    if problems:
        raise RulesError(problems)
    return RuleSet(rules.values(), [o for _, o in overrides])
