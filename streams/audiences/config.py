"""The audiences config: a versioned YAML file of audiences, each a rule over the profile.

Rules are typed pydantic models (a discriminated union keyed by the single key
of each mapping), not a string DSL: a typo is a validation error naming the file
and line, and the rule engine never parses text at run time. Example::

    version: "2026-11-28.1"
    consent: Advertising
    deletion_events: [User Deleted]
    audiences:
      - name: cart-abandoners
        platforms: {meta: {audience_id: "2385..."}}
        rule:
          all:
            - event: {name: Product Added, within: 3d}
            - not:
                event: {name: Order Completed, within: 3d, since_last: Product Added}

See ``audiences.example.yaml`` at the repository root for every condition.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d|w)\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_SLUG = r"^[a-z0-9][a-z0-9_-]{0,79}$"
_GOOGLE_USER_LIST = r"^customers/\d+/userLists/\d+$"


class AudienceConfigError(ValueError):
    """The config file is unreadable or invalid; the message names file and line of each problem."""


def parse_duration(value: Any) -> int:
    """``"7d"``, ``"36h"``, ``"5s"``, ``"30m"``, ``"500ms"`` (or an int of ms) -> milliseconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is a string like '7d', '36h' or '5s'")
    if isinstance(value, int):
        ms = value
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        ms = int(m.group(1)) * _UNIT_MS[m.group(2)]
    else:
        raise ValueError(f"{value!r} is not a duration like '7d', '36h', '30m', '5s' or '500ms'")
    if ms <= 0:
        raise ValueError("a duration must be positive")
    return ms


DurationMs = Annotated[int, BeforeValidator(parse_duration)]
Scalar = str | int | float | bool | None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# ------------------------------------------------------------------------- conditions


class EventCondition(_Strict):
    """At least ``min_count`` events named ``name`` (one or several) within the window.

    ``properties`` are equality filters on the event's properties (top-level
    keys). ``since_last`` counts only events after the profile's latest event of
    that name (no such event: no restriction beyond the window).
    """

    name: str | list[str]
    within: DurationMs
    min_count: int = Field(1, ge=1, le=1000)
    properties: dict[str, Scalar] = Field(default_factory=dict)
    since_last: str | None = None

    @field_validator("name")
    @classmethod
    def _names(cls, v: str | list[str]) -> str | list[str]:
        names = [v] if isinstance(v, str) else v
        if not names or any(not n.strip() for n in names):
            raise ValueError("event name(s) must be non-empty")
        return v

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name,) if isinstance(self.name, str) else tuple(self.name)


class RecommendationCondition(_Strict):
    """One of the profile's current top ``top_n`` recommendations has this category / score."""

    category: str | None = None
    min_score: float | None = None
    top_n: int = Field(10, ge=1, le=1000)

    @model_validator(mode="after")
    def _something(self) -> RecommendationCondition:
        if self.category is None and self.min_score is None:
            raise ValueError("give category and/or min_score")
        return self


class ViewedRecommendedCondition(_Strict):
    """Viewed (``Product Viewed`` with ``properties.product_id``) a product that is
    CURRENTLY among the profile's top ``top_n`` recommendations, within the window."""

    within: DurationMs
    top_n: int = Field(1000, ge=1, le=1000)
    event: str = "Product Viewed"
    product_property: str = "product_id"


class TraitCondition(_Strict):
    """A profile trait (dotted path into nested objects) equals / is one of / exists."""

    name: str
    equals: Scalar = None
    in_: list[Scalar] | None = Field(None, alias="in")
    exists: bool | None = None

    @model_validator(mode="after")
    def _one_test(self) -> TraitCondition:
        given = [k for k in ("equals", "in_", "exists") if k in self.model_fields_set]
        if len(given) != 1:
            raise ValueError("a trait condition needs exactly one of equals, in, exists")
        return self


# ----------------------------------------------------------------------------- rules


class AllRule(_Strict):
    all: list[Rule] = Field(min_length=1)


class AnyRule(_Strict):
    any: list[Rule] = Field(min_length=1)


class NotRule(_Strict):
    not_: Rule = Field(alias="not")


class EventRule(_Strict):
    event: EventCondition


class RecommendationRule(_Strict):
    recommendation: RecommendationCondition


class ViewedRecommendedRule(_Strict):
    viewed_recommended: ViewedRecommendedCondition


class TraitRule(_Strict):
    trait: TraitCondition


RULE_KINDS = ("all", "any", "not", "event", "recommendation", "viewed_recommended", "trait")


def _rule_kind(value: Any) -> str | None:
    """The union's tag: the single key of the mapping (or the model's kind)."""
    if isinstance(value, dict):
        keys = list(value)
        if len(keys) == 1 and keys[0] in RULE_KINDS:
            return str(keys[0])
        return None
    for kind, cls in _RULE_CLASSES.items():
        if isinstance(value, cls):
            return kind
    return None


Rule = Annotated[
    Annotated[AllRule, Tag("all")]
    | Annotated[AnyRule, Tag("any")]
    | Annotated[NotRule, Tag("not")]
    | Annotated[EventRule, Tag("event")]
    | Annotated[RecommendationRule, Tag("recommendation")]
    | Annotated[ViewedRecommendedRule, Tag("viewed_recommended")]
    | Annotated[TraitRule, Tag("trait")],
    Discriminator(
        _rule_kind,
        custom_error_type="rule_kind",
        custom_error_message=("a rule is a mapping with exactly one key: " + ", ".join(RULE_KINDS)),
    ),
]

_RULE_CLASSES: dict[str, type[BaseModel]] = {
    "all": AllRule,
    "any": AnyRule,
    "not": NotRule,
    "event": EventRule,
    "recommendation": RecommendationRule,
    "viewed_recommended": ViewedRecommendedRule,
    "trait": TraitRule,
}
for _cls in _RULE_CLASSES.values():
    _cls.model_rebuild()


# ------------------------------------------------------------------------- audiences


class MetaTarget(_Strict):
    audience_id: str = Field(pattern=r"^\d{1,32}$")


class GoogleAdsTarget(_Strict):
    user_list: str = Field(pattern=_GOOGLE_USER_LIST)


class LinkedInTarget(_Strict):
    #: The DMP segment's numeric id (the path of /rest/dmpSegments/{id}/users; the
    #: number in urn:li:dmpSegment:<id>), not the ad segment URN.
    segment_id: str = Field(pattern=r"^\d{1,32}$")


class Platforms(_Strict):
    meta: MetaTarget | None = None
    google_ads: GoogleAdsTarget | None = None
    linkedin: LinkedInTarget | None = None

    @model_validator(mode="after")
    def _at_least_one(self) -> Platforms:
        if not self.targets():
            raise ValueError("an audience needs at least one platform (meta, google_ads, linkedin)")
        return self

    def targets(self) -> dict[str, str]:
        """platform -> the platform's audience id, in a fixed order."""
        out: dict[str, str] = {}
        if self.meta is not None:
            out["meta"] = self.meta.audience_id
        if self.google_ads is not None:
            out["google_ads"] = self.google_ads.user_list
        if self.linkedin is not None:
            out["linkedin"] = self.linkedin.segment_id
        return out


class Audience(_Strict):
    name: str = Field(pattern=_SLUG)
    description: str = ""
    platforms: Platforms
    rule: Rule


class AudiencesConfig(_Strict):
    version: str = Field(min_length=1, max_length=64)
    consent: str = Field("Advertising", min_length=1)
    deletion_events: list[str] = Field(default_factory=lambda: ["User Deleted"])
    default_country: str | None = Field(None, pattern=r"^[A-Za-z]{2}$")
    #: Stored events per event name per profile (newest kept): bounds state size.
    max_events_per_name: int = Field(200, ge=1, le=10_000)
    audiences: list[Audience] = Field(min_length=1)

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, v: Any) -> Any:
        # YAML reads `version: 1.2` as a float; a version is text.
        return str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _unique_names(self) -> AudiencesConfig:
        seen: set[str] = set()
        for audience in self.audiences:
            if audience.name in seen:
                raise ValueError(f"audience name {audience.name!r} is used twice")
            seen.add(audience.name)
        return self

    @cached_property
    def referenced_events(self) -> frozenset[str]:
        """Track event names any rule reads (stored per profile)."""
        names: set[str] = set()
        for audience in self.audiences:
            for cond in iter_conditions(audience.rule):
                if isinstance(cond, EventCondition):
                    names.update(cond.names)
                    if cond.since_last:
                        names.add(cond.since_last)
                elif isinstance(cond, ViewedRecommendedCondition):
                    names.add(cond.event)
        return frozenset(names)

    @cached_property
    def windows(self) -> dict[str, tuple[int, ...]]:
        """Event name -> the distinct windows (ms) of the conditions that count it."""
        out: dict[str, set[int]] = {}
        for audience in self.audiences:
            for cond in iter_conditions(audience.rule):
                if isinstance(cond, EventCondition):
                    for n in cond.names:
                        out.setdefault(n, set()).add(cond.within)
                elif isinstance(cond, ViewedRecommendedCondition):
                    out.setdefault(cond.event, set()).add(cond.within)
        return {k: tuple(sorted(v)) for k, v in out.items()}

    @cached_property
    def max_window_ms(self) -> int:
        return max((w for ws in self.windows.values() for w in ws), default=0)

    def audience(self, name: str) -> Audience:
        for audience in self.audiences:
            if audience.name == name:
                return audience
        raise KeyError(name)


def iter_conditions(rule: Any) -> list[Any]:
    """Every leaf condition of a rule, depth first."""
    if isinstance(rule, AllRule):
        return [c for r in rule.all for c in iter_conditions(r)]
    if isinstance(rule, AnyRule):
        return [c for r in rule.any for c in iter_conditions(r)]
    if isinstance(rule, NotRule):
        return iter_conditions(rule.not_)
    if isinstance(rule, EventRule):
        return [rule.event]
    if isinstance(rule, RecommendationRule):
        return [rule.recommendation]
    if isinstance(rule, ViewedRecommendedRule):
        return [rule.viewed_recommended]
    if isinstance(rule, TraitRule):
        return [rule.trait]
    raise TypeError(f"not a rule: {type(rule).__name__}")


# ---------------------------------------------------------------------------- loading


def _line_of(root: yaml.Node | None, loc: tuple[int | str, ...]) -> int | None:
    """1-based line of the deepest YAML node along a pydantic error location.

    Location parts that are not in the document (union tags such as ``event``
    in ``rule.event.event.within``, pydantic's ``[key]`` markers) are skipped.
    """
    node = root
    if node is None:
        return None
    line = node.start_mark.line + 1
    for part in loc:
        child: yaml.Node | None = None
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(part):
                    child = value_node
                    break
        elif (
            isinstance(node, yaml.SequenceNode)
            and isinstance(part, int)
            and 0 <= part < len(node.value)
        ):
            child = node.value[part]
        if child is not None:
            node = child
            line = node.start_mark.line + 1
    return line


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    previous: int | str | None = None
    for part in loc:
        if part == previous and part in RULE_KINDS:
            continue  # the union's tag, repeated by pydantic before the field itself
        previous = part
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def parse_config(text: str, source: str = "<string>") -> AudiencesConfig:
    """Parse and validate; raise :class:`AudienceConfigError` with ``source:line`` per problem."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        raise AudienceConfigError(f"{source}{at}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise AudienceConfigError(f"{source}:1: the config must be a mapping (version, audiences)")
    _check_unique_names(root, data, source)
    try:
        return AudiencesConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            loc = tuple(err["loc"])
            line = _line_of(root, loc)
            where = f"{source}:{line}" if line is not None else source
            problems.append(f"{where}: {_format_loc(loc)}: {err['msg']}")
        raise AudienceConfigError("invalid audiences config:\n" + "\n".join(problems)) from None


def _check_unique_names(root: yaml.Node | None, data: dict[str, Any], source: str) -> None:
    """Duplicate audience names, reported at the second occurrence's line."""
    audiences = data.get("audiences")
    if not isinstance(audiences, list):
        return
    seen: set[str] = set()
    for i, audience in enumerate(audiences):
        name = audience.get("name") if isinstance(audience, dict) else None
        if not isinstance(name, str):
            continue
        if name in seen:
            line = _line_of(root, ("audiences", i, "name"))
            raise AudienceConfigError(
                f"invalid audiences config:\n{source}:{line}: audiences[{i}].name: "
                f"audience name {name!r} is used twice"
            )
        seen.add(name)


def load_config(path: str | Path) -> AudiencesConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AudienceConfigError(f"{path}: cannot read the audiences config: {exc}") from None
    return parse_config(text, str(path))
