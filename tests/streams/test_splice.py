"""An EnrichedEvent spliced around the raw CustomerEvent bytes is byte for byte the
EnrichedEvent a full fastavro encode writes (no Kafka needed)."""

from __future__ import annotations

import io
from typing import Any

import pytest
from fastavro import schemaless_reader, schemaless_writer
from hypothesis import HealthCheck, assume, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from streams import schemas
from streams.events import EventRejected, dumps_json, from_segment
from streams.profiles.enrich import build_enriched, merge_traits
from streams.profiles.splice import EnrichedLayout, LayoutMismatch

LAYOUT = EnrichedLayout()
UAS = [
    "",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36",
    "Googlebot/2.1 (+http://www.google.com/bot.html)",
    "curl/8.4.0",
]

text = st.text(max_size=12)
scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | text
scalars |= st.floats(allow_nan=False, allow_infinity=False)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)
json_objects = st.dictionaries(text, json_values, max_size=4)
ids = st.text(min_size=1, max_size=20)
contexts = st.fixed_dictionaries(
    {},
    optional={
        "userAgent": st.sampled_from(UAS),
        "ip": st.text(max_size=15),
        "page": st.fixed_dictionaries(
            {},
            optional={
                "url": st.sampled_from(
                    ["https://x.example/p?utm_source=news&utm_campaign=bf", "https://x.example/"]
                ),
                "search": st.sampled_from(["", "?utm_medium=cpc&utm_term=shoes", "?q=1"]),
                "title": text,
            },
        ),
        "campaign": st.fixed_dictionaries({}, optional={"name": text, "source": text}),
        "library": st.fixed_dictionaries({"name": text, "version": text}),
        "extra": json_values,
    },
)
messages = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["track", "identify", "page", "screen", "group", "alias"]),
        "userId": ids,
        "previousId": ids,
        "groupId": ids,
        "event": ids,
        "name": ids,
    },
    optional={
        "anonymousId": ids,
        "messageId": st.text(min_size=1, max_size=30),
        "timestamp": st.sampled_from(["2026-11-27T10:00:00.123Z", "2026-11-27T10:00:00+02:00"]),
        "sentAt": st.sampled_from(["2026-11-27T10:00:01.5Z"]),
        "properties": json_objects,
        "traits": json_objects,
        "context": contexts,
        "integrations": st.dictionaries(text, st.booleans(), max_size=2),
    },
)
products = st.lists(
    st.fixed_dictionaries(
        {
            "productId": st.text(min_size=1, max_size=10),
            "score": st.floats(allow_nan=False),
            "rank": st.integers(-(2**31), 2**31 - 1),
            "reason": st.none() | text,
            "category": st.none() | text,
        }
    ),
    max_size=4,
)
recommendation_states = st.none() | st.fixed_dictionaries(
    {
        "products": products,
        "modelVersion": text,
        "generatedAt": st.integers(0, 2**62),
        "updateId": st.uuids().map(str),
    }
)


def _encode(full_name: str, record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    schemaless_writer(buf, schemas.parsed(full_name), record)
    return buf.getvalue()


@hsettings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(
    msg=messages,
    profile_id=st.text(max_size=20),
    stitched=st.booleans(),
    traits=st.none() | json_objects,
    recs=recommendation_states,
    processed_at=st.integers(0, 2**62),
    source=st.tuples(st.none() | st.integers(0, 2**31 - 1), st.none() | st.integers(0, 2**62)),
)
def test_spliced_enriched_event_equals_full_encode(
    msg: dict[str, Any],
    profile_id: str,
    stitched: bool,
    traits: dict[str, Any] | None,
    recs: dict[str, Any] | None,
    processed_at: int,
    source: tuple[int | None, int | None],
) -> None:
    try:
        built = from_segment(msg, received_at_ms=1_764_237_600_000)
    except EventRejected:
        assume(False)
        raise
    raw_body = _encode(schemas.CUSTOMER_EVENT, built)
    # The worker enriches what fastavro decoded (timestamps come back as datetimes).
    record = schemaless_reader(io.BytesIO(raw_body), schemas.parsed(schemas.CUSTOMER_EVENT))
    if record["type"] == "identify" and record["traits"] not in (None, "", "{}"):
        traits = merge_traits(traits, record["traits"])
    meta = {
        "processedAt": processed_at,
        "workerId": "w@h:1",
        "pipelineVersion": "0.1.0",
        "sourcePartition": source[0],
        "sourceOffset": source[1],
    }
    full = _encode(
        schemas.ENRICHED_EVENT,
        build_enriched(
            record,
            profile_id=profile_id,
            stitched=stitched,
            traits=traits,
            recommendations=recs,
            worker_id=meta["workerId"],
            pipeline_version=meta["pipelineVersion"],
            processed_at_ms=processed_at,
            source_partition=source[0],
            source_offset=source[1],
        ),
    )
    spliced = (
        raw_body
        + LAYOUT.profile(profile_id, stitched, dumps_json(traits) if traits else "{}")
        + LAYOUT.recommendations(recs)
        + LAYOUT.context(record)
        + LAYOUT.enrichment(meta)
    )
    assert spliced == full
    assert LAYOUT.recommendations(recs) == LAYOUT.recommendations(recs)  # cached: same bytes


def test_small_parts_use_the_hand_written_writers() -> None:
    """Guards the fast path: a schema edit that changes a part's shape makes that part
    fall back to fastavro (still correct, slower) — this says so."""
    kinds = [getattr(w, "__qualname__", "") for w in LAYOUT._writers]
    assert not kinds[0].endswith("with_fastavro"), kinds  # profile
    assert not kinds[3].endswith("with_fastavro"), kinds  # campaign
    assert not kinds[4].endswith("with_fastavro"), kinds  # enrichment


def test_a_changed_part_shape_falls_back_to_fastavro(monkeypatch: pytest.MonkeyPatch) -> None:
    original = schemas.schema_dict(schemas.ENRICHED_EVENT)
    fields = [dict(f) for f in original["fields"]]
    fields[2] = {**fields[2], "type": ["null", "boolean"]}  # stitched becomes optional
    monkeypatch.setattr(schemas, "schema_dict", lambda name: {**original, "fields": fields})
    layout = EnrichedLayout()
    assert layout._writers[0].__qualname__.endswith("with_fastavro")
    assert layout.profile("u", True, "{}") == b"\x02u\x02\x01\x04{}"


def test_layout_checks_the_schema(monkeypatch: pytest.MonkeyPatch) -> None:
    original = schemas.schema_dict(schemas.ENRICHED_EVENT)
    swapped = {**original, "fields": [original["fields"][0], *original["fields"][:0:-1]]}
    monkeypatch.setattr(schemas, "schema_dict", lambda name: swapped)
    with pytest.raises(LayoutMismatch):
        EnrichedLayout()
