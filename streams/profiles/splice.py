"""Encoding an EnrichedEvent around the original CustomerEvent bytes instead of re-encoding.

Avro's binary encoding of a record is the concatenation of its fields'
encodings, and the EnrichedEvent's first field is the CustomerEvent. When a raw
event was written with exactly the schema the EnrichedEvent embeds (same
parsing canonical form), its Avro body *is* the encoding of that first field:

    EnrichedEvent = [CustomerEvent body, as produced]
                    [profileId, stitched, profileTraits]                per profile state
                    [recommendations, ...ModelVersion, ...GeneratedAt]   per update (cached)
                    [userAgent]                                         per UA string (cached)
                    [campaign]                                          per event
                    [enrichment]                                        per processing

Each bracket is the encoding of a record made of those EnrichedEvent fields.
fastavro costs 5-30 µs even for such small records (union resolution), so the
profile, campaign and enrichment parts are written by a few lines here, each
used only while the schema has exactly the shape it writes (else fastavro writes
that part); the user agent and recommendation parts are cached fastavro output.
The writers are compared with fastavro at start-up and, byte for byte against
a full encode, by a property test.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from typing import Any

from fastavro import parse_schema, schemaless_writer

from streams import schemas
from streams.profiles.enrich import campaign_of, parse_user_agent

#: Field groups of the EnrichedEvent after ``event``, in schema order.
PROFILE_FIELDS = ("profileId", "stitched", "profileTraits")
RECOMMENDATION_FIELDS = (
    "recommendations",
    "recommendationsModelVersion",
    "recommendationsGeneratedAt",
)
USER_AGENT_FIELDS = ("userAgent",)
CAMPAIGN_FIELDS = ("campaign",)
ENRICHMENT_FIELDS = ("enrichment",)
PARTS = (
    PROFILE_FIELDS,
    RECOMMENDATION_FIELDS,
    USER_AGENT_FIELDS,
    CAMPAIGN_FIELDS,
    ENRICHMENT_FIELDS,
)
_PROFILE, _RECOMMENDATIONS, _USER_AGENT, _CAMPAIGN, _ENRICHMENT = range(len(PARTS))

Writer = Callable[[Any], bytes]


class LayoutMismatch(RuntimeError):
    """The EnrichedEvent schema no longer has the layout this module splices."""


# ------------------------------------------------------------------ Avro primitives


def _long(n: int) -> bytes:
    """Zig-zag varint (Avro int and long)."""
    n = (n << 1) ^ (n >> 63)
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1


def _checked_long(n: int, low: int = _LONG_MIN, high: int = _LONG_MAX) -> bytes:
    """An Avro long (or int, with its bounds); like fastavro, nothing else is accepted."""
    if type(n) is not int or n < low or n > high:
        raise ValueError(f"{n!r} is not an Avro {'int' if high == _INT_MAX else 'long'}")
    return _long(n)


def _string(s: str) -> bytes:
    data = s.encode()
    return _long(len(data)) + data


def _opt_string(s: str | None) -> bytes:
    return b"\x00" if s is None else b"\x02" + _string(s)


# Hand-written writers for the small parts. Each is used only if the part's schema has
# exactly the shape it encodes (see _shape), else fastavro writes that part.

_STR = "string"
_OPT_STR = ("null", "string")
_TIMESTAMP = ("long", "timestamp-millis")


def _write_profile(r: Mapping[str, Any]) -> bytes:
    return b"".join(
        (
            _string(r["profileId"]),
            b"\x01" if r["stitched"] else b"\x00",
            _string(r["profileTraits"]),
        )
    )


_PROFILE_SHAPE = (_STR, "boolean", _STR)


def _campaign_writer(keys: tuple[str, ...]) -> Writer:
    def write(r: Mapping[str, Any]) -> bytes:
        campaign = r["campaign"]
        if campaign is None:
            return b"\x00"
        get = campaign.get
        return b"\x02" + b"".join([_opt_string(get(k)) for k in keys])

    return write


def _write_enrichment(r: Mapping[str, Any]) -> bytes:
    m = r["enrichment"]
    partition, offset = m.get("sourcePartition"), m.get("sourceOffset")
    return b"".join(
        (
            _checked_long(m["processedAt"]),
            _string(m["workerId"]),
            _string(m["pipelineVersion"]),
            b"\x00"
            if partition is None
            else b"\x02" + _checked_long(partition, _INT_MIN, _INT_MAX),
            b"\x00" if offset is None else b"\x02" + _checked_long(offset),
        )
    )


_ENRICHMENT_SHAPE = (
    (
        "record",
        (
            ("processedAt", _TIMESTAMP),
            ("workerId", _STR),
            ("pipelineVersion", _STR),
            ("sourcePartition", ("null", "int")),
            ("sourceOffset", ("null", "long")),
        ),
    ),
)


def _shape(schema: Any, named: Mapping[str, Any]) -> Any:
    """A schema reduced to what its binary encoding depends on (names and docs dropped,
    named references resolved), for comparison with the writers' expectations."""
    if isinstance(schema, str):
        return _shape(named[schema], named) if schema in named else schema
    if isinstance(schema, list):
        return tuple(_shape(s, named) for s in schema)
    kind = schema["type"]
    if kind == "record":
        return ("record", tuple((f["name"], _shape(f["type"], named)) for f in schema["fields"]))
    if isinstance(kind, str) and kind not in ("array", "map", "enum", "fixed"):
        return (kind, schema["logicalType"]) if "logicalType" in schema else kind
    return ("other", str(schema))


def _hand_writer(part: int, parsed: Any, named: Mapping[str, Any]) -> Writer | None:
    """The hand-written writer for a part if its schema has the expected shape."""
    shape = tuple(s for _, s in _shape(parsed, named)[1])
    if part == _PROFILE and shape == _PROFILE_SHAPE:
        return _write_profile
    if part == _ENRICHMENT and shape == _ENRICHMENT_SHAPE:
        return _write_enrichment
    if part == _CAMPAIGN and len(shape) == 1 and shape[0][:1] == ("null",):
        record = shape[0][1]
        if record[0] == "record" and all(t == _OPT_STR for _, t in record[1]):
            return _campaign_writer(tuple(name for name, _ in record[1]))
    return None


# ------------------------------------------------------------------------ the layout


class EnrichedLayout:
    """Encoders for the EnrichedEvent's parts after the embedded CustomerEvent."""

    def __init__(self, cache_size: int = 100_000) -> None:
        schema = schemas.schema_dict(schemas.ENRICHED_EVENT)
        fields = list(schema["fields"])
        names = [f["name"] for f in fields]
        if names[0] != "event" or tuple(names[1:]) != tuple(n for part in PARTS for n in part):
            raise LayoutMismatch(f"unexpected EnrichedEvent fields {names}")
        named: dict[str, Any] = {}
        # Named types defined inside the CustomerEvent (e.g. Campaign) are referenced later.
        parse_schema(fields[0]["type"], named_schemas=named)
        by_name = {f["name"]: f for f in fields}
        self._fastavro: list[Any] = []
        self._writers: list[Writer] = []
        for i, part in enumerate(PARTS):
            record = {
                "type": "record",
                "name": f"cdpflow.internal.EnrichedEventPart{i}",
                "fields": [by_name[n] for n in part],
            }
            parsed = parse_schema(record, named_schemas=named)
            self._fastavro.append(parsed)
            self._writers.append(self._writer_for(i, parsed, named))
        self._recs: dict[int, tuple[Mapping[str, Any], bytes]] = {}
        self._user_agents: dict[str, bytes] = {}
        self._cache_size = cache_size
        self._no_recommendations = self._write(_RECOMMENDATIONS, _recommendation_fields(None))

    def _writer_for(self, part: int, parsed: Any, named: Mapping[str, Any]) -> Writer:
        def with_fastavro(record: Any) -> bytes:
            buf = io.BytesIO()
            schemaless_writer(buf, parsed, record)
            return buf.getvalue()

        compiled = _hand_writer(part, parsed, named)
        if compiled is None:
            return with_fastavro
        for sample in _SAMPLES[part]:
            if compiled(sample) != with_fastavro(sample):
                raise LayoutMismatch(f"compiled writer of part {part} disagrees with fastavro")
        return compiled

    def _write(self, part: int, record: Mapping[str, Any]) -> bytes:
        return self._writers[part](record)

    def profile(self, profile_id: str, stitched: bool, traits_json: str) -> bytes:
        return self._write(
            _PROFILE, {"profileId": profile_id, "stitched": stitched, "profileTraits": traits_json}
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
        encoded = self._write(_RECOMMENDATIONS, _recommendation_fields(state))
        if len(self._recs) >= self._cache_size:
            self._recs.clear()
        self._recs[id(state)] = (state, encoded)
        return encoded

    def context(self, record: Mapping[str, Any]) -> bytes:
        """The userAgent and campaign fields of an event (as ``build_enriched`` fills them)."""
        context = record.get("context") or {}
        user_agent = context.get("userAgent") or ""
        ua_part = self._user_agents.get(user_agent)
        if ua_part is None:
            ua_part = self._write(_USER_AGENT, {"userAgent": parse_user_agent(user_agent)})
            if len(self._user_agents) >= self._cache_size:
                self._user_agents.clear()
            self._user_agents[user_agent] = ua_part
        return ua_part + self._write(_CAMPAIGN, {"campaign": campaign_of(context)})

    def enrichment(self, metadata: Mapping[str, Any]) -> bytes:
        return self._write(_ENRICHMENT, {"enrichment": metadata})


def _recommendation_fields(state: Mapping[str, Any] | None) -> dict[str, Any]:
    """As :func:`streams.profiles.enrich.build_enriched` fills them."""
    return {
        "recommendations": state["products"] if state else [],
        "recommendationsModelVersion": state["modelVersion"] if state else None,
        "recommendationsGeneratedAt": state["generatedAt"] if state else None,
    }


_CAMPAIGN_SAMPLE = {"name": "n", "source": "s", "medium": None, "term": "t\u00e9", "content": None}
#: Values each compiled writer is compared with fastavro on at start-up.
_SAMPLES: tuple[tuple[Mapping[str, Any], ...], ...] = (
    (
        {"profileId": "u-1", "stitched": True, "profileTraits": '{"a":"\u00e9"}'},
        {"profileId": "", "stitched": False, "profileTraits": "{}" * 100},
    ),
    (_recommendation_fields(None),),
    ({"userAgent": None},),
    ({"campaign": None}, {"campaign": _CAMPAIGN_SAMPLE}),
    (
        {
            "enrichment": {
                "processedAt": 1_764_300_000_000,
                "workerId": "w@h:1",
                "pipelineVersion": "0.1.0",
                "sourcePartition": 3,
                "sourceOffset": 2**40,
            }
        },
        {
            "enrichment": {
                "processedAt": -1,
                "workerId": "",
                "pipelineVersion": "",
                "sourcePartition": None,
                "sourceOffset": None,
            }
        },
    ),
)
