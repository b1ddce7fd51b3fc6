"""The pipeline's per-event work as plain functions, for the reference implementations.

The bare confluent-kafka loop (scenario b) and the Quix Streams app (scenario c)
call these, so that they decode, validate, stitch, enrich and encode exactly as
cdpflow's worker does: the serde, the rules and the enrichment are cdpflow's own
functions (:mod:`streams.serde`, :mod:`streams.events`, :mod:`streams.profiles.enrich`).

The few pieces that live in modules importing Faust (the routing key of the
ingest agent, the identity resolution of the stitch agent, the recommendation
check) are restated here over the decoded record instead of routing headers, so
the Quix virtualenv needs no Faust; ``tests/bench`` checks them against the
originals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from streams.events import check_recommendation as check_recommendation  # re-export
from streams.events import to_ms
from streams.profiles.enrich import build_enriched, merge_traits, recommendation_state

PIPELINE_VERSION = "0.1.0"
ANON_PREFIX = "anon:"
#: CustomerEvent fields fastavro hands back as datetimes (``timestamp-millis``).
TIMESTAMP_FIELDS = ("timestamp", "originalTimestamp", "sentAt", "receivedAt")

LinkGet = Callable[[str], Any]
LinkSet = Callable[[str, str], None]


def identity_routing_key(record: Mapping[str, Any]) -> str:
    """Key of the identity hop (as ``streams.ingest.agents.identity_routing_key``)."""
    if record["type"] == "alias":
        return str(record["previousId"])
    return str(record.get("anonymousId") or record.get("userId"))


def resolve_profile(
    record: Mapping[str, Any], get_link: LinkGet, set_link: LinkSet
) -> tuple[str, bool]:
    """(profile id, stitched), recording new links (as ``streams.identity.agents``).

    Every link read or written is under :func:`identity_routing_key` of the record,
    which is what lets a keyed state store (Quix) hold the links.
    """
    user = record.get("userId")
    anon = record.get("anonymousId")
    if record["type"] == "alias":
        previous = str(record["previousId"])
        user_id = user or ""
        if get_link(previous) != user_id:
            set_link(previous, user_id)
        return user_id, False
    if user:
        if anon and get_link(anon) != user:
            set_link(anon, user)
        return str(user), False
    anon_id = anon or ""
    linked = get_link(anon_id)
    if linked:
        return str(linked), True
    return ANON_PREFIX + anon_id, False


def newer_recommendations(
    current: Mapping[str, Any] | None, update: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The state to keep for an update, or None when ``current`` is newer (profiles agent)."""
    if current is None or current["generatedAt"] <= to_ms(update["generatedAt"]):
        return recommendation_state(dict(update))
    return None


def update_traits(
    record: Mapping[str, Any], traits: dict[str, Any] | None
) -> tuple[dict[str, Any] | None, bool]:
    """(traits after this event, changed): identify calls merge their traits in."""
    if record["type"] == "identify" and record.get("traits") not in (None, "{}"):
        return merge_traits(traits, record["traits"]), True
    return traits, False


def enrich(
    record: dict[str, Any],
    *,
    profile_id: str,
    stitched: bool,
    traits: dict[str, Any] | None,
    recommendations: dict[str, Any] | None,
    worker_id: str,
    processed_at_ms: int,
    source_partition: int | None,
    source_offset: int | None,
) -> dict[str, Any]:
    """The EnrichedEvent record (``streams.profiles.enrich.build_enriched``)."""
    return build_enriched(
        record,
        profile_id=profile_id,
        stitched=stitched,
        traits=traits,
        recommendations=recommendations,
        worker_id=worker_id,
        pipeline_version=PIPELINE_VERSION,
        processed_at_ms=processed_at_ms,
        source_partition=source_partition,
        source_offset=source_offset,
    )


def timestamps_to_ms(record: dict[str, Any]) -> dict[str, Any]:
    """Datetimes from fastavro to epoch millis, in place (for JSON internal topics)."""
    for field in TIMESTAMP_FIELDS:
        value = record.get(field)
        if isinstance(value, datetime):
            record[field] = to_ms(value)
    return record
