"""Encoding an EnrichedEvent around the original CustomerEvent bytes instead of re-encoding.

Avro's binary encoding of a record is the concatenation of its fields'
encodings, and the EnrichedEvent's first field is the CustomerEvent. When a raw
event was written with exactly the schema the EnrichedEvent embeds (same
parsing canonical form), its Avro body *is* the encoding of that first field:

    EnrichedEvent = [CustomerEvent body, as produced]
                    [profileId, stitched, profileTraits]            per profile state
                    [recommendations, ...ModelVersion, ...GeneratedAt] per update (cached)
                    [userAgent, campaign]                           per event, from ingest
                    [enrichment]                                    per processing

Each bracket is encoded (by fastavro) as a record made of those EnrichedEvent
fields, so the parts are exactly what a full encode writes for them; a unit test
checks the concatenation byte for byte against fastavro's full encode.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from fastavro import parse_schema, schemaless_writer

from streams import schemas

#: Field groups of the EnrichedEvent after ``event``, in schema order.
PROFILE_FIELDS = ("profileId", "stitched", "profileTraits")
RECOMMENDATION_FIELDS = (
    "recommendations",
    "recommendationsModelVersion",
    "recommendationsGeneratedAt",
)
CONTEXT_FIELDS = ("userAgent", "campaign")
ENRICHMENT_FIELDS = ("enrichment",)
PARTS = (PROFILE_FIELDS, RECOMMENDATION_FIELDS, CONTEXT_FIELDS, ENRICHMENT_FIELDS)


class LayoutMismatch(RuntimeError):
    """The EnrichedEvent schema no longer has the layout this module splices."""


def _part_writer(fields: list[dict[str, Any]], index: int, named: dict[str, Any]) -> Any:
    return parse_schema(
        {"type": "record", "name": f"cdpflow.internal.EnrichedEventPart{index}", "fields": fields},
        named_schemas=named,
    )


class EnrichedLayout:
    """Encoders for the EnrichedEvent's parts after the embedded CustomerEvent."""

    def __init__(self, recommendation_cache_size: int = 100_000) -> None:
        schema = schemas.schema_dict(schemas.ENRICHED_EVENT)
        fields = list(schema["fields"])
        names = [f["name"] for f in fields]
        if names[0] != "event" or tuple(names[1:]) != tuple(n for part in PARTS for n in part):
            raise LayoutMismatch(f"unexpected EnrichedEvent fields {names}")
        named: dict[str, Any] = {}
        # Named types defined inside the CustomerEvent (e.g. Campaign) are referenced later.
        parse_schema(fields[0]["type"], named_schemas=named)
        by_name = {f["name"]: f for f in fields}
        self._writers = [
            _part_writer([by_name[n] for n in part], i, named) for i, part in enumerate(PARTS)
        ]
        self._no_recommendations = self._write(1, _recommendation_fields(None))
        self._recs: dict[int, tuple[Mapping[str, Any], bytes]] = {}
        self._recs_cache_size = recommendation_cache_size

    def _write(self, part: int, record: Mapping[str, Any]) -> bytes:
        buf = io.BytesIO()
        schemaless_writer(buf, self._writers[part], record)
        return buf.getvalue()

    def profile(self, profile_id: str, stitched: bool, traits_json: str) -> bytes:
        return self._write(
            0, {"profileId": profile_id, "stitched": stitched, "profileTraits": traits_json}
        )

    def recommendations(self, state: Mapping[str, Any] | None) -> bytes:
        """The recommendation fields for a profile's stored state.

        Encoded once per state object: the profile table hands back the same object
        until an update replaces it (states are never mutated in place). The cache
        holds the object itself, so its id cannot be reused while cached.
        """
        if not state:
            return self._no_recommendations
        entry = self._recs.get(id(state))
        if entry is not None and entry[0] is state:
            return entry[1]
        encoded = self._write(1, _recommendation_fields(state))
        if len(self._recs) >= self._recs_cache_size:
            self._recs.clear()
        self._recs[id(state)] = (state, encoded)
        return encoded

    def context(self, user_agent: Mapping[str, Any] | None, campaign: Any) -> bytes:
        return self._write(2, {"userAgent": user_agent, "campaign": campaign})

    def enrichment(self, metadata: Mapping[str, Any]) -> bytes:
        return self._write(3, {"enrichment": metadata})


def _recommendation_fields(state: Mapping[str, Any] | None) -> dict[str, Any]:
    """As :func:`streams.profiles.enrich.build_enriched` fills them."""
    return {
        "recommendations": state["products"] if state else [],
        "recommendationsModelVersion": state["modelVersion"] if state else None,
        "recommendationsGeneratedAt": state["generatedAt"] if state else None,
    }
