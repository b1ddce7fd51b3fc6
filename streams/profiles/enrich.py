"""Pure enrichment functions (no Kafka): user agent, campaign, traits, the EnrichedEvent."""

from __future__ import annotations

from functools import lru_cache
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
from ua_parser import parse as parse_ua

from streams.events import dumps_json, to_ms

_UTM = {
    "utm_campaign": "name",
    "utm_source": "source",
    "utm_medium": "medium",
    "utm_term": "term",
    "utm_content": "content",
}


@lru_cache(maxsize=8192)
def parse_user_agent(ua: str) -> dict[str, Any] | None:
    """Browser, OS and device from a User-Agent string (cached: real traffic repeats UAs)."""
    if not ua:
        return None
    result = parse_ua(ua)
    agent, os_, device = result.user_agent, result.os, result.device

    def version(part: Any) -> str | None:
        if part is None or part.major is None:
            return None
        return ".".join(str(v) for v in (part.major, part.minor, part.patch) if v is not None)

    return {
        "browserFamily": agent.family if agent else None,
        "browserVersion": version(agent),
        "osFamily": os_.family if os_ else None,
        "osVersion": version(os_),
        "deviceFamily": device.family if device else None,
        "deviceBrand": device.brand if device else None,
        "deviceModel": device.model if device else None,
        "isBot": bool(device and device.family == "Spider"),
    }


def campaign_of(context: dict[str, Any] | None) -> dict[str, Any] | None:
    """UTM fields: context.campaign when the client sent it, else the page URL's query."""
    if not context:
        return None
    campaign = context.get("campaign")
    if campaign and any(v is not None for v in campaign.values()):
        return dict(campaign)
    page = context.get("page") or {}
    query = page.get("search") or ""
    if not query and page.get("url"):
        query = urlsplit(page["url"]).query
    if "utm_" not in query:
        return None
    params = parse_qs(query.lstrip("?"))
    found = {field: params[key][0] for key, field in _UTM.items() if params.get(key)}
    if not found:
        return None
    return {field: found.get(field) for field in _UTM.values()}


def context_enrichment(
    record: dict[str, Any],
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(userAgent, campaign) of the EnrichedEvent: they depend on the event alone."""
    context = record.get("context") or {}
    return parse_user_agent(context.get("userAgent") or ""), campaign_of(context)


def merge_traits(existing: dict[str, Any] | None, traits_json: str) -> dict[str, Any]:
    """Later identify calls overwrite earlier values key by key (Segment's semantics)."""
    traits = orjson.loads(traits_json or "{}")
    merged = dict(existing or {})
    if isinstance(traits, dict):
        merged.update(traits)
    return merged


def recommendation_state(record: dict[str, Any]) -> dict[str, Any]:
    """What the profile table keeps of a RecommendationUpdate (JSON-friendly)."""
    return {
        "products": [dict(p) for p in record["products"]],
        "modelVersion": record["modelVersion"],
        "generatedAt": to_ms(record["generatedAt"]),
        "updateId": record["updateId"],
    }


def build_enriched(
    record: dict[str, Any],
    *,
    profile_id: str,
    stitched: bool,
    traits: dict[str, Any] | None,
    recommendations: dict[str, Any] | None,
    worker_id: str,
    pipeline_version: str,
    processed_at_ms: int,
    source_partition: int | None,
    source_offset: int | None,
) -> dict[str, Any]:
    user_agent, campaign = context_enrichment(record)
    return {
        "event": record,
        "profileId": profile_id,
        "stitched": stitched,
        "profileTraits": dumps_json(traits) if traits else "{}",
        "recommendations": recommendations["products"] if recommendations else [],
        "recommendationsModelVersion": recommendations["modelVersion"] if recommendations else None,
        "recommendationsGeneratedAt": recommendations["generatedAt"] if recommendations else None,
        "userAgent": user_agent,
        "campaign": campaign,
        "enrichment": {
            "processedAt": processed_at_ms,
            "workerId": worker_id,
            "pipelineVersion": pipeline_version,
            "sourcePartition": source_partition,
            "sourceOffset": source_offset,
        },
    }
