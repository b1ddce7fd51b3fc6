"""Loading cdpflow's Avro schemas and mapping topics to them."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from fastavro import parse_schema
from fastavro.schema import load_schema

from schemas import SCHEMA_DIR
from streams import topics

CUSTOMER_EVENT = "cdpflow.CustomerEvent"
ENRICHED_EVENT = "cdpflow.EnrichedEvent"
RECOMMENDATION_UPDATE = "cdpflow.RecommendationUpdate"
DEAD_LETTER = "cdpflow.DeadLetter"
AUDIENCE_UPDATE = "cdpflow.AudienceUpdate"

#: The value schema of each public topic (subject ``<topic>-value``).
TOPIC_SCHEMAS: dict[str, str] = {
    topics.EVENTS_RAW: CUSTOMER_EVENT,
    topics.EVENTS_ENRICHED: ENRICHED_EVENT,
    topics.EVENTS_DLQ: DEAD_LETTER,
    topics.RECOMMENDATIONS_UPDATES: RECOMMENDATION_UPDATE,
    topics.AUDIENCES_UPDATES: AUDIENCE_UPDATE,
}


@cache
def schema_dict(full_name: str) -> dict[str, Any]:
    """The schema as a standalone dict, with referenced named types inlined."""
    loaded = load_schema(str(SCHEMA_DIR / f"{full_name}.avsc"), _write_hint=False)
    return dict(json.loads(json.dumps(loaded)))


@cache
def schema_text(full_name: str) -> str:
    """Canonical text to register: standalone, so any Confluent client can read it."""
    return json.dumps(schema_dict(full_name), separators=(",", ":"))


@cache
def parsed(full_name: str) -> Any:
    return parse_schema(schema_dict(full_name))
