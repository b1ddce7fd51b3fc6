"""Audience rules over a profile state: evaluation at a given time, the next time a
window expiry can change the result, and membership transitions as AudienceUpdate
records. Pure (no Faust, no I/O): the agent, the reference oracle and the tests
share it.

Membership of a profile in (audience, platform) is decided by:

1. the profile is not suppressed (deletion request) and has an explicit grant of
   the config's consent category;
2. the audience's rule holds at ``now`` (windows are ``(now - within, ...]``
   over event timestamps);
3. the platform has at least one identifier for the profile (normalised and
   hashed by :func:`streams.audiences.identifiers.identifiers_for`).

:meth:`AudienceRules.transition` compares that with the membership stored in the
state and emits ADD/REMOVE only on a change. A REMOVE carries exactly the
identifiers that were added; identifiers changing while a member become a REMOVE
of the old and an ADD of the new ones. Every update bumps the
(profile, audience, platform) ``membershipVersion``, and ``updateId`` is the
SHA-256 of ``audience|platform|profileId|action|membershipVersion``: the same
input on the same state yields the same ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from streams.audiences.config import (
    AllRule,
    AnyRule,
    AudiencesConfig,
    EventCondition,
    EventRule,
    NotRule,
    RecommendationCondition,
    RecommendationRule,
    TraitCondition,
    TraitRule,
    ViewedRecommendedCondition,
    ViewedRecommendedRule,
)
from streams.audiences.state import ProfileState, StateUpdater, consent_granted

#: identifiers_for(platform, traits, user_id=..., default_country=...) -> {key: value}
IdentifiersFn = Callable[..., dict[str, str]]

RULE_MATCHED = "RULE_MATCHED"
RULE_UNMATCHED = "RULE_UNMATCHED"
WINDOW_EXPIRED = "WINDOW_EXPIRED"
CONSENT_WITHDRAWN = "CONSENT_WITHDRAWN"
DELETION_REQUESTED = "DELETION_REQUESTED"
IDENTIFIERS_CHANGED = "IDENTIFIERS_CHANGED"

ANON_PREFIX = "anon:"
#: Memoised identifier sets (one per profile and platform, roughly); dropped when full.
IDENTIFIER_CACHE_SIZE = 100_000


@dataclass(frozen=True, slots=True)
class Trigger:
    """What made the agent look at a profile (goes into the update's trigger fields)."""

    kind: Literal["event", "recommendation", "clock"]
    occurred_at: int
    message_id: str | None = None
    received_at: int | None = None

    @classmethod
    def clock(cls, now_ms: int) -> Trigger:
        return cls("clock", now_ms)


def update_id(audience: str, platform: str, profile_id: str, action: str, version: int) -> str:
    return hashlib.sha256(
        f"{audience}|{platform}|{profile_id}|{action}|{version}".encode()
    ).hexdigest()


def _same(a: Any, b: Any) -> bool:
    """Equality that does not let ``True == 1`` match (JSON types differ)."""
    return bool(a == b) and isinstance(a, bool) == isinstance(b, bool)


def _trait(traits: Mapping[str, Any] | None, path: str) -> Any:
    value: Any = traits or {}
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _top_products(state: ProfileState, top_n: int) -> list[list[Any]]:
    recs = state["recs"]
    if not recs:
        return []
    products = sorted(recs["products"], key=lambda p: p[2])
    return products[:top_n]


def _event_matches(cond: EventCondition, state: ProfileState, now_ms: int) -> bool:
    names = cond.names
    horizon = now_ms - cond.within
    anchor: int | None = None
    events = state["ev"]
    if cond.since_last is not None:
        for e in events:
            if e["n"] == cond.since_last and (anchor is None or e["t"] > anchor):
                anchor = e["t"]
    count = 0
    for e in events:
        if e["n"] not in names or e["t"] <= horizon:
            continue
        if anchor is not None and e["t"] <= anchor:
            continue
        props = e["p"]
        if any(not _same(props.get(k), v) for k, v in cond.properties.items()):
            continue
        count += 1
        if count >= cond.min_count:
            return True
    return False


def _rec_matches(cond: RecommendationCondition, state: ProfileState) -> bool:
    for _pid, score, _rank, category in _top_products(state, cond.top_n):
        if cond.category is not None and category != cond.category:
            continue
        if cond.min_score is not None and score < cond.min_score:
            continue
        return True
    return False


def _viewed_matches(cond: ViewedRecommendedCondition, state: ProfileState, now_ms: int) -> bool:
    recommended = {p[0] for p in _top_products(state, cond.top_n)}
    if not recommended:
        return False
    horizon = now_ms - cond.within
    for e in state["ev"]:
        if e["n"] != cond.event or e["t"] <= horizon:
            continue
        product = e["p"].get(cond.product_property)
        if (
            isinstance(product, str | int)
            and not isinstance(product, bool)
            and str(product) in recommended
        ):
            return True
    return False


def _trait_matches(cond: TraitCondition, state: ProfileState) -> bool:
    value = _trait(state["traits"], cond.name)
    if cond.exists is not None:
        return (value is not None) == cond.exists
    if cond.in_ is not None:
        return any(_same(value, v) for v in cond.in_)
    return value is not None and _same(value, cond.equals)


def rule_matches(rule: Any, state: ProfileState, now_ms: int) -> bool:
    """Whether a rule holds for the profile at ``now_ms`` (consent not considered)."""
    if isinstance(rule, AllRule):
        return all(rule_matches(r, state, now_ms) for r in rule.all)
    if isinstance(rule, AnyRule):
        return any(rule_matches(r, state, now_ms) for r in rule.any)
    if isinstance(rule, NotRule):
        return not rule_matches(rule.not_, state, now_ms)
    if isinstance(rule, EventRule):
        return _event_matches(rule.event, state, now_ms)
    if isinstance(rule, RecommendationRule):
        return _rec_matches(rule.recommendation, state)
    if isinstance(rule, ViewedRecommendedRule):
        return _viewed_matches(rule.viewed_recommended, state, now_ms)
    if isinstance(rule, TraitRule):
        return _trait_matches(rule.trait, state)
    raise TypeError(f"not a rule: {type(rule).__name__}")


def _default_identifiers() -> IdentifiersFn:
    from streams.audiences.identifiers import identifiers_for

    return identifiers_for


class AudienceRules:
    """Evaluation and transitions for one audiences config.

    ``identify`` is :func:`streams.audiences.identifiers.identifiers_for` unless a
    test passes another function with the same signature.
    """

    def __init__(self, config: AudiencesConfig, identify: IdentifiersFn | None = None) -> None:
        self.config = config
        self.updater = StateUpdater(config)
        self.identify = identify or _default_identifiers()
        self.targets: list[tuple[str, str, str]] = [
            (a.name, platform, target)
            for a in config.audiences
            for platform, target in a.platforms.targets().items()
        ]
        self._rules = {a.name: a.rule for a in config.audiences}
        self._windows = config.windows
        self._identifiers: dict[tuple[str, str | None, bytes], dict[str, str]] = {}

    # ---------------------------------------------------------------- evaluation

    def eligible(self, state: ProfileState) -> bool:
        return not state["del"] and consent_granted(state)

    def matching(self, state: ProfileState, now_ms: int) -> set[str]:
        """Audiences whose rule holds and whose consent/suppression allows membership."""
        if not self.eligible(state):
            return set()
        return {name for name, rule in self._rules.items() if rule_matches(rule, state, now_ms)}

    def identifiers(self, state: ProfileState, platform: str) -> dict[str, str]:
        """The platform's identifiers for the profile's traits (memoised by traits content:
        normalising and hashing cost more than the rest of an evaluation)."""
        pid: str = state["pid"]
        user_id = None if pid.startswith(ANON_PREFIX) else pid
        key = (platform, user_id, orjson.dumps(state["traits"] or {}, option=orjson.OPT_SORT_KEYS))
        cached = self._identifiers.get(key)
        if cached is None:
            cached = self.identify(
                platform,
                state["traits"] or {},
                user_id=user_id,
                default_country=self.config.default_country,
            )
            if len(self._identifiers) >= IDENTIFIER_CACHE_SIZE:
                self._identifiers.clear()
            self._identifiers[key] = cached
        return dict(cached)

    def membership(self, state: ProfileState, now_ms: int) -> dict[tuple[str, str], dict[str, str]]:
        """(audience, platform) -> identifiers, for every place the profile belongs now."""
        matched = self.matching(state, now_ms)
        out: dict[tuple[str, str], dict[str, str]] = {}
        cache: dict[str, dict[str, str]] = {}
        for audience, platform, _target in self.targets:
            if audience not in matched:
                continue
            if platform not in cache:
                cache[platform] = self.identifiers(state, platform)
            if cache[platform]:
                out[(audience, platform)] = cache[platform]
        return out

    def next_change_at(self, state: ProfileState, now_ms: int) -> int | None:
        """Earliest time after ``now_ms`` at which a window expiry can change membership.

        Conservative: the earliest expiry of any stored event from any window
        that counts it (an expiry may turn out to change nothing). None when no
        expiry can matter (no events, or the profile cannot be a member anyway:
        no consent, suppressed).
        """
        if not self.eligible(state):
            return None
        best: int | None = None
        for e in state["ev"]:
            for w in self._windows.get(e["n"], ()):
                at = e["t"] + w
                if at > now_ms and (best is None or at < best):
                    best = at
        return best

    # --------------------------------------------------------------- transitions

    def transition(
        self,
        state: ProfileState,
        now_ms: int,
        trigger: Trigger,
        on_no_identifiers: Callable[[str], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Bring the stored membership in line with the rules at ``now_ms``.

        Returns the AudienceUpdate records (dicts for the Avro encoder), in
        order; mutates ``state["m"]``. ``on_no_identifiers(platform)`` is
        called when a matching, consenting profile cannot be added because the
        platform has no identifier for it.
        """
        members: dict[str, dict[str, Any]] = state["m"]
        matched = self.matching(state, now_ms)
        cache: dict[str, dict[str, str]] = {}
        out: list[dict[str, Any]] = []
        for audience, platform, target in self.targets:
            key = f"{audience}|{platform}"
            entry = members.get(key)
            current: dict[str, str] | None = entry["ids"] if entry else None
            desired: dict[str, str] | None = None
            if audience in matched:
                if platform not in cache:
                    cache[platform] = self.identifiers(state, platform)
                desired = cache[platform] or None
                if desired is None and on_no_identifiers is not None and current is None:
                    on_no_identifiers(platform)
            if current == desired:
                continue
            if entry is None:
                entry = members[key] = {"v": 0, "ids": None}
            if current is not None:
                if desired is not None or audience in matched:
                    reason = IDENTIFIERS_CHANGED
                elif state["del"]:
                    reason = DELETION_REQUESTED
                elif not consent_granted(state):
                    reason = CONSENT_WITHDRAWN
                elif trigger.kind == "clock":
                    reason = WINDOW_EXPIRED
                else:
                    reason = RULE_UNMATCHED
                out.append(
                    self._update(
                        state,
                        entry,
                        audience,
                        platform,
                        target,
                        "REMOVE",
                        reason,
                        current,
                        now_ms,
                        trigger,
                    )
                )
                entry["ids"] = None
            if desired is not None:
                reason = RULE_MATCHED if current is None else IDENTIFIERS_CHANGED
                out.append(
                    self._update(
                        state,
                        entry,
                        audience,
                        platform,
                        target,
                        "ADD",
                        reason,
                        desired,
                        now_ms,
                        trigger,
                    )
                )
                entry["ids"] = desired
        return out

    def _update(
        self,
        state: ProfileState,
        entry: dict[str, Any],
        audience: str,
        platform: str,
        target: str,
        action: str,
        reason: str,
        identifiers: dict[str, str],
        now_ms: int,
        trigger: Trigger,
    ) -> dict[str, Any]:
        entry["v"] += 1
        version = entry["v"]
        profile_id = state["pid"]
        return {
            "updateId": update_id(audience, platform, profile_id, action, version),
            "audience": audience,
            "audienceVersion": self.config.version,
            "platform": platform,
            "platformAudienceId": target,
            "profileId": profile_id,
            "action": action,
            "reason": reason,
            "identifiers": dict(identifiers),
            "membershipVersion": version,
            "occurredAt": trigger.occurred_at,
            "triggerMessageId": trigger.message_id,
            "triggerReceivedAt": trigger.received_at,
            "emittedAt": now_ms,
        }
