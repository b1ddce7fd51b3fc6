"""Membership computed from scratch: the oracle the incremental agent is tested against.

Folds every input into fresh profile states, in order, then evaluates each profile
once at ``now_ms``. No transitions, no clock ticks, no stored membership: if the
agent's stream of ADD/REMOVE deltas, folded into sets, equals this, the agent
emitted exactly the membership changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from streams.audiences.config import AudiencesConfig
from streams.audiences.rules import AudienceRules, IdentifiersFn
from streams.audiences.state import ProfileState, new_state

#: ("event", decoded EnrichedEvent, position) or ("recommendation", RecommendationUpdate, 0)
Input = tuple[Literal["event", "recommendation"], Mapping[str, Any], int]
Membership = dict[tuple[str, str], dict[str, dict[str, str]]]


def fold_states(
    inputs: Iterable[Input], rules: AudienceRules, now_ms: int
) -> dict[str, ProfileState]:
    states: dict[str, ProfileState] = {}
    updater = rules.updater
    for kind, record, position in inputs:
        if kind == "recommendation":
            pid = record["customerId"]
            state = states.setdefault(pid, new_state(pid))
            updater.apply_recommendation(state, record)
        else:
            if not updater.is_relevant(record):
                continue
            pid = record["profileId"]
            state = states.setdefault(pid, new_state(pid))
            updater.apply_event(state, record, now_ms, position)
    return states


def compute_membership(
    inputs: Iterable[Input],
    config: AudiencesConfig,
    now_ms: int,
    identify: IdentifiersFn | None = None,
) -> Membership:
    """(audience, platform) -> {profileId: identifiers}, for every configured target."""
    rules = AudienceRules(config, identify)
    out: Membership = {(a, p): {} for a, p, _ in rules.targets}
    for pid, state in fold_states(inputs, rules, now_ms).items():
        for target, identifiers in rules.membership(state, now_ms).items():
            out[target][pid] = identifiers
    return out
