"""Building decoded EnrichedEvent / RecommendationUpdate dicts for the pure audience tests."""

from __future__ import annotations

import re
from typing import Any

import orjson

from streams.audiences.config import AudiencesConfig, parse_config

SHA256_HEX = re.compile(r"[0-9a-f]{64}")
#: The only identifier values allowed in clear (AudienceUpdate schema doc: Google's address group).
CLEAR_KEYS = frozenset({"addressInfo.countryCode", "addressInfo.postalCode"})

TEST_CONFIG = """\
version: "test-1"
consent: Advertising
deletion_events: [User Deleted, Deletion Requested]
default_country: US
max_events_per_name: 4
audiences:
  - name: cart
    platforms:
      meta: {audience_id: "1001"}
      google_ads: {user_list: "customers/1/userLists/1"}
      linkedin: {segment_id: "2001"}
    rule:
      all:
        - event: {name: Product Added, within: 30s}
        - not:
            event: {name: Order Completed, within: 30s, since_last: Product Added}
  - name: viewed-rec
    platforms:
      meta: {audience_id: "1002"}
    rule:
      all:
        - viewed_recommended: {within: 20s, top_n: 2}
        - not:
            event: {name: Order Completed, within: 20s}
  - name: repeat-buyers
    platforms:
      google_ads: {user_list: "customers/1/userLists/2"}
      linkedin: {segment_id: "2002"}
    rule:
      event: {name: Order Completed, within: 15s, min_count: 2}
  - name: shoes
    platforms:
      linkedin: {segment_id: "2003"}
      meta: {audience_id: "1003"}
    rule:
      recommendation: {category: shoes, min_score: 0.5, top_n: 2}
  - name: pro-or-p1
    platforms:
      meta: {audience_id: "1004"}
    rule:
      any:
        - trait: {name: plan, equals: pro}
        - event: {name: Product Viewed, within: 5s, properties: {product_id: p1}}
"""


def audience_test_config() -> AudiencesConfig:
    return parse_config(TEST_CONFIG, "test-config.yaml")


def enriched(
    profile_id: str,
    message_id: str,
    *,
    type_: str = "track",
    event: str | None = None,
    timestamp: int,
    received_at: int | None = None,
    properties: dict[str, Any] | None = None,
    traits: dict[str, Any] | None = None,
    consent: bool | None = None,
    consent_category: str = "Advertising",
) -> dict[str, Any]:
    """A decoded EnrichedEvent with what the audience state reads (profileTraits = merged)."""
    context: dict[str, Any] = {"extraJson": "{}"}
    if consent is not None:
        context["consent"] = {"categoryPreferences": {consent_category: consent}}
    return {
        "event": {
            "type": type_,
            "messageId": message_id,
            "event": event,
            "timestamp": timestamp,
            "receivedAt": received_at if received_at is not None else timestamp,
            "properties": orjson.dumps(properties or {}).decode(),
            "traits": "{}",
            "context": context,
        },
        "profileId": profile_id,
        "profileTraits": orjson.dumps(traits or {}).decode(),
    }


def recommendation(
    customer: str, update_id: str, generated_at: int, products: list[tuple[str, float, str | None]]
) -> dict[str, Any]:
    return {
        "updateId": update_id,
        "customerId": customer,
        "products": [
            {"productId": pid, "score": score, "rank": i + 1, "reason": None, "category": cat}
            for i, (pid, score, cat) in enumerate(products)
        ],
        "modelVersion": "m1",
        "generatedAt": generated_at,
    }


def assert_hashed(platform: str, identifiers: dict[str, str]) -> None:
    assert identifiers, "an update without identifiers"
    for key, value in identifiers.items():
        if platform == "google_ads" and key in CLEAR_KEYS:
            continue
        assert SHA256_HEX.fullmatch(value), f"{platform} {key} is not a SHA-256 hex digest"
