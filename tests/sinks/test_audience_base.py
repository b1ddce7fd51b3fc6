"""The audience destinations' shared rules: identifier checks and order-keeping grouping."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sinks.audience_base import (
    NO_IDENTIFIERS,
    UNHASHED_IDENTIFIER,
    UNKNOWN_IDENTIFIER,
    Action,
    AudienceItem,
    check_identifiers,
    group_by_audience,
)
from sinks.base import MappedEvent, Permanent
from streams.audiences.identifiers import sha256_hex


def mapped(audience: str, action: Action, profile: str, n: int) -> MappedEvent:
    item = AudienceItem(audience, action, profile, {"EMAIL": sha256_hex(profile)}, [profile])
    return MappedEvent(message_id=f"u{n}", order_key=profile, item=item, size=10)


changes = st.lists(
    st.tuples(
        st.sampled_from(["a1", "a2"]),
        st.sampled_from(["ADD", "REMOVE"]),
        st.sampled_from(["p1", "p2", "p3"]),
    ),
    max_size=30,
)


@given(changes)
def test_groups_apply_every_profiles_changes_in_their_order(seq: list[Any]) -> None:
    batch = [mapped(a, act, p, i) for i, (a, act, p) in enumerate(seq)]
    groups = group_by_audience(batch)
    # Same items, each group homogeneous.
    assert sorted(m.message_id for _, _, ms in groups for m in ms) == sorted(
        m.message_id for m in batch
    )
    for audience, action, items in groups:
        assert {(m.item.audience_id, m.item.action) for m in items} == {(audience, action)}
    # Sending the groups one after another keeps each (audience, profile)'s order.
    sent = [m.message_id for _, _, ms in groups for m in ms]
    for audience in ("a1", "a2"):
        for profile in ("p1", "p2", "p3"):
            original = [
                m.message_id
                for m in batch
                if (m.item.audience_id, m.item.profile_id) == (audience, profile)
            ]
            assert [i for i in sent if i in original] == original


def test_unordered_changes_share_a_request() -> None:
    batch = [mapped("a1", "ADD", f"p{i}", i) for i in range(5)]
    batch.append(mapped("a1", "REMOVE", "p9", 9))
    batch.append(mapped("a1", "ADD", "p7", 7))
    groups = group_by_audience(batch)
    assert [(a, act, len(ms)) for a, act, ms in groups] == [("a1", "ADD", 6), ("a1", "REMOVE", 1)]


def test_add_remove_add_of_one_profile_stays_three_steps() -> None:
    batch = [mapped("a1", act, "p1", i) for i, act in enumerate(["ADD", "REMOVE", "ADD"])]
    assert [act for _, act, _ in group_by_audience(batch)] == ["ADD", "REMOVE", "ADD"]


@pytest.mark.parametrize(
    ("identifiers", "reason"),
    [
        ({}, NO_IDENTIFIERS),
        ({"EMAIL": "jane@example.com"}, UNHASHED_IDENTIFIER),
        ({"EMAIL": sha256_hex("x").upper()}, UNHASHED_IDENTIFIER),
        ({"RAW_EMAIL": sha256_hex("x")}, UNKNOWN_IDENTIFIER),
    ],
)
def test_identifiers_are_checked_without_echoing_values(
    identifiers: dict[str, str], reason: str
) -> None:
    with pytest.raises(Permanent) as caught:
        check_identifiers("meta", identifiers)
    assert caught.value.reason == reason
    for value in identifiers.values():
        assert value not in str(caught.value)


def test_hashed_identifiers_pass() -> None:
    check_identifiers("meta", {"EMAIL": sha256_hex("jane@example.com")})
    check_identifiers("linkedin", {"SHA256_EMAIL": sha256_hex("jane@example.com")})
