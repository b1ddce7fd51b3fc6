"""Rule semantics and transition reasons, case by case (the property test covers the folding)."""

from __future__ import annotations

import hashlib
from typing import Any

from streams.audiences.rules import AudienceRules, Trigger, update_id
from streams.audiences.state import ProfileState, new_state
from tests.streams.audiences.factories import audience_test_config, enriched, recommendation

T0 = 1_800_000_000_000
S = 1000


def fake_identify(
    platform: str, traits: Any, *, user_id: str | None = None, default_country: str | None = None
) -> dict[str, str]:
    """Stand-in for identifiers_for: one hashed key per platform from the email trait."""
    email = traits.get("email")
    if not email:
        return {}
    return {f"{platform}-EMAIL": hashlib.sha256(email.strip().lower().encode()).hexdigest()}


class Profile:
    def __init__(self, pid: str = "u1") -> None:
        self.rules = AudienceRules(audience_test_config(), fake_identify)
        self.state: ProfileState = new_state(pid)
        self.pid = pid
        self.seq = 0
        self.no_ids: list[str] = []

    def event(self, now: int, **kwargs: Any) -> list[dict[str, Any]]:
        self.seq += 1
        kwargs.setdefault("timestamp", now)
        record = enriched(self.pid, f"m{self.seq}", **kwargs)
        if not self.rules.updater.is_relevant(record):
            return []
        self.rules.updater.apply_event(self.state, record, now, self.seq)
        trigger = Trigger("event", kwargs["timestamp"], f"m{self.seq}", kwargs["timestamp"])
        return self.rules.transition(self.state, now, trigger, self.no_ids.append)

    def rec(self, now: int, products: list[tuple[str, float, str | None]]) -> list[dict[str, Any]]:
        self.seq += 1
        rec = recommendation(self.pid, f"r{self.seq}", now, products)
        self.rules.updater.apply_recommendation(self.state, rec)
        return self.rules.transition(
            self.state, now, Trigger("recommendation", now, f"r{self.seq}")
        )

    def tick(self, now: int) -> list[dict[str, Any]]:
        return self.rules.transition(self.state, now, Trigger.clock(now))

    def consented(self, now: int, email: str = "a@example.com") -> None:
        assert self.event(now, type_="identify", traits={"email": email}, consent=True) == []


def summary(updates: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    return [(u["audience"], u["platform"], u["action"], u["reason"]) for u in updates]


def test_cart_abandoner_joins_leaves_on_order_and_on_expiry() -> None:
    p = Profile()
    p.consented(T0)
    adds = p.event(T0, event="Product Added", properties={"product_id": "p1"})
    assert {(a, act, r) for a, _, act, r in summary(adds)} == {("cart", "ADD", "RULE_MATCHED")}
    assert {u["platform"] for u in adds} == {"meta", "google_ads", "linkedin"}
    # An order after the last add: no longer abandoned.
    removes = p.event(T0 + 2 * S, event="Order Completed")
    assert {(a, act, r) for a, _, act, r in summary(removes)} == {
        ("cart", "REMOVE", "RULE_UNMATCHED")
    }
    assert all(r["identifiers"] == a["identifiers"] for r, a in zip(removes, adds, strict=True))
    # A new add after that order: abandoned again (since_last), until 30 s pass.
    again = p.event(T0 + 3 * S, event="Product Added")
    assert {u["action"] for u in again} == {"ADD"}
    assert (
        p.rules.next_change_at(p.state, T0 + 3 * S) == T0 + 2 * S + 15 * S
    )  # the order's expiry (repeat-buyers)
    assert p.tick(T0 + 32 * S) == []  # the first add expired, the second has not
    expired = p.tick(T0 + 33 * S)
    assert {(a, act, r) for a, _, act, r in summary(expired)} == {
        ("cart", "REMOVE", "WINDOW_EXPIRED")
    }
    assert p.rules.next_change_at(p.state, T0 + 33 * S) is None


def test_no_consent_no_add_and_withdrawal_removes_everywhere() -> None:
    p = Profile()
    assert p.event(T0, type_="identify", traits={"email": "a@example.com"}) == []
    assert p.event(T0, event="Product Added") == []  # rule holds, but no explicit grant
    assert p.event(T0, event="Page Seen", consent=False) == []
    adds = p.event(T0 + S, event="Product Viewed", consent=True, properties={"product_id": "p1"})
    assert {u["audience"] for u in adds} == {"cart", "pro-or-p1"}
    # An older denial does not override the newer grant (latest by event timestamp).
    assert p.event(T0 + 2 * S, event="Page Seen", timestamp=T0, consent=False) == []
    removes = p.event(
        T0 + 3 * S, type_="identify", traits={"email": "a@example.com"}, consent=False
    )
    assert len(removes) == len(adds)
    assert {u["reason"] for u in removes} == {"CONSENT_WITHDRAWN"}
    assert {u["action"] for u in removes} == {"REMOVE"}


def test_deletion_removes_everything_clears_state_and_suppresses() -> None:
    p = Profile()
    p.consented(T0)
    assert p.rec(T0, [("p1", 0.9, "shoes")])
    assert p.event(T0, event="Product Added")
    removes = p.event(T0 + S, event="Deletion Requested")
    assert {u["reason"] for u in removes} == {"DELETION_REQUESTED"}
    assert {(u["audience"], u["platform"]) for u in removes} == {
        ("cart", "meta"),
        ("cart", "google_ads"),
        ("cart", "linkedin"),
        ("shoes", "linkedin"),
        ("shoes", "meta"),
    }
    assert p.state["ev"] == [] and p.state["traits"] is None and p.state["recs"] is None
    # Suppressed for good: a new grant and a matching event add nothing.
    assert (
        p.event(T0 + 2 * S, type_="identify", traits={"email": "b@example.com"}, consent=True) == []
    )
    assert p.event(T0 + 2 * S, event="Product Added") == []


def test_identifiers_change_while_member_is_remove_then_add() -> None:
    p = Profile()
    p.consented(T0, "old@example.com")
    adds = p.rec(T0, [("p1", 0.9, "shoes")])
    assert len(adds) == 2
    changed = p.event(T0 + S, type_="identify", traits={"email": "new@example.com"})
    assert summary(changed) == [
        ("shoes", "meta", "REMOVE", "IDENTIFIERS_CHANGED"),
        ("shoes", "meta", "ADD", "IDENTIFIERS_CHANGED"),
        ("shoes", "linkedin", "REMOVE", "IDENTIFIERS_CHANGED"),
        ("shoes", "linkedin", "ADD", "IDENTIFIERS_CHANGED"),
    ]
    assert changed[0]["identifiers"] == adds[0]["identifiers"]
    assert changed[1]["identifiers"] != adds[0]["identifiers"]
    assert [u["membershipVersion"] for u in changed] == [2, 3, 2, 3]
    # Losing every identifier removes (nothing to send an ADD with).
    gone = p.event(T0 + 2 * S, type_="identify", traits={"email": None})
    assert {(u["action"], u["reason"]) for u in gone} == {("REMOVE", "IDENTIFIERS_CHANGED")}


def test_recommendation_rules_use_current_top_n() -> None:
    p = Profile()
    p.consented(T0)
    # shoes at rank 3 is outside top_n=2
    assert p.rec(T0, [("p1", 0.9, "hats"), ("p2", 0.9, "hats"), ("p3", 0.9, "shoes")]) == []
    adds = p.rec(T0 + S, [("p3", 0.7, "shoes")])
    assert {u["audience"] for u in adds} == {"shoes"}
    # An older update arriving late changes nothing.
    stale = recommendation("u1", "r-old", T0 - S, [("p9", 0.1, None)])
    assert p.rules.updater.apply_recommendation(p.state, stale) is False
    # viewed_recommended: viewing p3 (recommended now) within 20 s
    viewed = p.event(T0 + 2 * S, event="Product Viewed", properties={"product_id": "p3"})
    assert {u["audience"] for u in viewed} == {"viewed-rec"}
    # p3 no longer recommended: no longer "viewed a recommended product"
    left = p.rec(T0 + 3 * S, [("p1", 0.9, "hats")])
    assert {(u["audience"], u["action"]) for u in left} == {
        ("viewed-rec", "REMOVE"),
        ("shoes", "REMOVE"),
        ("shoes", "REMOVE"),
    }


def test_anonymous_profile_without_identifiers_is_counted_not_added() -> None:
    p = Profile("anon:device-1")
    p.event(T0, event="Page Seen", consent=True)
    assert p.event(T0, event="Product Added") == []
    assert sorted(p.no_ids) == ["google_ads", "linkedin", "meta"]


def test_duplicates_are_ignored_and_update_ids_are_deterministic() -> None:
    p = Profile()
    p.consented(T0)
    record = enriched("u1", "dup-1", event="Product Added", timestamp=T0)
    assert p.rules.updater.apply_event(p.state, record, T0, 100) is True
    first = p.rules.transition(p.state, T0, Trigger("event", T0, "dup-1"))
    assert p.rules.updater.apply_event(p.state, record, T0, 100) is False
    assert first[0]["updateId"] == update_id("cart", "meta", "u1", "ADD", 1)
    assert first[0]["updateId"] == hashlib.sha256(b"cart|meta|u1|ADD|1").hexdigest()
    assert first[0]["triggerMessageId"] == "dup-1" and first[0]["audienceVersion"] == "test-1"


def test_property_filters_and_trait_rules() -> None:
    p = Profile()
    p.consented(T0)
    assert p.event(T0, event="Product Viewed", properties={"product_id": "p2"}) == []
    assert [
        u["audience"] for u in p.event(T0, event="Product Viewed", properties={"product_id": "p1"})
    ] == ["pro-or-p1"]
    assert [u["reason"] for u in p.tick(T0 + 5 * S)] == ["WINDOW_EXPIRED"]
    assert [
        u["audience"]
        for u in p.event(
            T0 + 6 * S, type_="identify", traits={"email": "a@example.com", "plan": "pro"}
        )
    ] == ["pro-or-p1"]


def test_state_is_bounded_by_window_and_count() -> None:
    p = Profile()
    p.consented(T0)
    for i in range(10):
        p.event(
            T0 + i, event="Product Viewed", properties={"product_id": f"x{i}", "other": "dropped"}
        )
    viewed = [e for e in p.state["ev"] if e["n"] == "Product Viewed"]
    assert [e["p"]["product_id"] for e in viewed] == ["x6", "x7", "x8", "x9"]  # max 4 per name
    assert all(set(e["p"]) == {"product_id"} for e in viewed)  # only properties rules read
    p.event(T0 + 31 * S, event="Page Seen", consent=True)
    assert p.state["ev"] == []  # past the largest window (30 s)
