"""Property: the agent's incremental ADD/REMOVE deltas, folded into sets, equal the
membership computed from scratch, at every checkpoint, for random input histories.

Pure (no Kafka): drives the same StateUpdater / AudienceRules.transition the agent
uses, with the agent's scheduling (a transition after each changed state, and on
clock advances only for profiles whose next_change_at has come), and the real
identifiers_for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.audiences.reference import Input, compute_membership
from streams.audiences.rules import AudienceRules, Trigger
from streams.audiences.state import ProfileState, consent_granted, new_state
from tests.streams.audiences.factories import (
    assert_hashed,
    audience_test_config,
    enriched,
    recommendation,
)

CONFIG = audience_test_config()
T0 = 1_800_000_000_000
PROFILES = ["u1", "u2", "anon:a1"]
PRODUCTS = ["p1", "p2", "p3"]
TRAIT_SETS: list[dict[str, Any]] = [
    {},
    {"email": " Jane.Doe@Example.com "},
    {"phone": "(650) 555-1212"},
    {"email": "bob@example.org", "phone": "+44 20 7946 0958"},
    {"plan": "pro"},
    {"plan": "pro", "email": "pro@example.com"},
    {"firstName": "Ann", "lastName": "Lee", "country": "US", "postalCode": "94105"},
    {"email": "not-an-email"},
    {"email": "ann@example.com", "plan": "basic"},
    {"email": "ANN@example.com "},
]

track_names = st.sampled_from(
    ["Product Viewed", "Product Added", "Order Completed", "Page Seen"] * 4 + ["User Deleted"]
)
event_step = st.tuples(
    st.just("event"),
    st.sampled_from(PROFILES),
    st.one_of(track_names, st.just("identify"), st.just("identify")),
    st.sampled_from(PRODUCTS),
    st.integers(-40, 3),  # timestamp offset from now, seconds
    st.sampled_from([None, True, True, True, False]),  # consent in context
    st.integers(0, len(TRAIT_SETS) - 1),
)
rec_step = st.tuples(
    st.just("rec"),
    st.sampled_from(PROFILES),
    st.lists(
        st.tuples(
            st.sampled_from(PRODUCTS),
            st.sampled_from([0.2, 0.6, 0.9]),
            st.sampled_from(["shoes", "hats", None]),
        ),
        max_size=3,
        unique_by=lambda t: t[0],
    ),
    st.integers(-30, 0),
)
advance_step = st.tuples(st.just("advance"), st.integers(0, 40_000))
dup_step = st.tuples(st.just("dup"), st.integers(0, 1000))
steps = st.lists(
    st.one_of(event_step, event_step, event_step, rec_step, advance_step, dup_step),
    min_size=10,
    max_size=60,
)


@dataclass
class Simulation:
    rules: AudienceRules = field(default_factory=lambda: AudienceRules(CONFIG))
    now: int = T0
    states: dict[str, ProfileState] = field(default_factory=dict)
    next_change: dict[str, int] = field(default_factory=dict)
    folded: dict[tuple[str, str], dict[str, dict[str, str]]] = field(default_factory=dict)
    inputs: list[Input] = field(default_factory=list)
    merged_traits: dict[str, dict[str, Any]] = field(default_factory=dict)
    update_ids: set[str] = field(default_factory=set)
    seq: int = 0

    def __post_init__(self) -> None:
        self.folded = {(a, p): {} for a, p, _ in self.rules.targets}

    # --- what the agent does per input
    def feed(self, item: Input) -> list[dict[str, Any]]:
        kind, record, position = item
        updater = self.rules.updater
        if kind == "recommendation":
            pid = record["customerId"]
            state = self.states.setdefault(pid, new_state(pid))
            changed = updater.apply_recommendation(state, record)
            trigger = Trigger("recommendation", record["generatedAt"], record["updateId"])
        else:
            if not updater.is_relevant(record):
                return []
            pid = record["profileId"]
            state = self.states.setdefault(pid, new_state(pid))
            changed = updater.apply_event(state, record, self.now, position)
            ev = record["event"]
            trigger = Trigger("event", ev["timestamp"], ev["messageId"], ev["receivedAt"])
        if not changed:
            return []
        return self._transition(pid, trigger)

    def _transition(self, pid: str, trigger: Trigger) -> list[dict[str, Any]]:
        state = self.states[pid]
        updates = self.rules.transition(state, self.now, trigger)
        for u in updates:
            self._fold(state, u)
        nca = self.rules.next_change_at(state, self.now)
        if nca is None:
            self.next_change.pop(pid, None)
        else:
            self.next_change[pid] = nca
        return updates

    def advance(self, ms: int) -> None:
        self.now += ms
        due = sorted(p for p, at in self.next_change.items() if at <= self.now)
        for pid in due:
            self._transition(pid, Trigger.clock(self.now))

    def _fold(self, state: ProfileState, u: dict[str, Any]) -> None:
        target = (u["audience"], u["platform"])
        members = self.folded[target]
        pid = u["profileId"]
        assert u["updateId"] not in self.update_ids, "an updateId was reused"
        self.update_ids.add(u["updateId"])
        assert_hashed(u["platform"], u["identifiers"])
        if u["action"] == "ADD":
            assert consent_granted(state) and not state["del"], "ADD without consent"
            assert pid not in members, "ADD of a member"
            members[pid] = u["identifiers"]
        else:
            assert members.get(pid) == u["identifiers"], "REMOVE does not carry the added ids"
            del members[pid]

    # --- building inputs
    def event_input(self, step: tuple[Any, ...]) -> Input:
        _, pid, name, product, offset_s, consent, traits_i = step
        self.seq += 1
        traits = self.merged_traits.setdefault(pid, {})
        if name == "identify":
            traits.update(TRAIT_SETS[traits_i])
            record = enriched(
                pid,
                f"m{self.seq}",
                type_="identify",
                timestamp=self.now + offset_s * 1000,
                traits=traits,
                consent=consent,
            )
        else:
            record = enriched(
                pid,
                f"m{self.seq}",
                event=name,
                timestamp=self.now + offset_s * 1000,
                properties={"product_id": product},
                traits=traits,
                consent=consent,
            )
        return ("event", record, self.seq)

    def rec_input(self, step: tuple[Any, ...]) -> Input:
        _, pid, products, offset_s = step
        self.seq += 1
        rec = recommendation(pid, f"r{self.seq}", self.now + offset_s * 1000, products)
        return ("recommendation", rec, 0)

    def check(self) -> None:
        expected = compute_membership(self.inputs, CONFIG, self.now)
        assert self.folded == expected


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(steps)
def test_incremental_deltas_equal_membership_from_scratch(script: list[tuple[Any, ...]]) -> None:
    sim = Simulation()
    for step in script:
        kind = step[0]
        if kind == "advance":
            sim.advance(step[1])
        else:
            if kind == "event":
                item = sim.event_input(step)
            elif kind == "rec":
                item = sim.rec_input(step)
            else:  # a duplicate delivery of an earlier input (same bytes, same position)
                if not sim.inputs:
                    continue
                item = sim.inputs[step[1] % len(sim.inputs)]
            sim.inputs.append(item)
            sim.feed(item)
        sim.check()
    # Replaying the whole history changes nothing and emits nothing.
    for item in list(sim.inputs):
        assert sim.feed(item) == [], "a replayed input emitted an update"
    sim.check()
    # Time running out: every window expires, membership still matches from-scratch.
    sim.advance(120_000)
    sim.check()
