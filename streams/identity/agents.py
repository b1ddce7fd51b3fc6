"""Identity stitching: one canonical profile id per person.

The table ``identity_links`` maps an anonymousId (or an alias's previousId) to
the userId it was linked to by identify/alias or any event carrying both ids.
A link lives in the table partition of its id's key (Kafka's default
partitioner), which is the partition of ``cdp.events.raw`` the collector
writes that id's events to. So most events are stitched by the ingest stage
straight from the raw partition it consumes (:mod:`streams.ingest.agents`);
only records whose identity key points at another partition (an alias, whose
link is under its previousId, or an event a third party keyed differently) are
re-keyed through ``<group>-identity-repartition`` and stitched here.

The canonical profile id is the userId once known, else ``anon:<anonymousId>``
(a prefix, so it can never collide with a userId).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sources.kafka_producer import Headers, OutRecord
from streams.pipeline import (
    H_ANON,
    H_KIND,
    H_PREVIOUS,
    H_PROFILE,
    H_STITCHED,
    H_TYPE,
    H_USER,
    KIND_EVENT,
    Pipeline,
    bind_event,
    header_map,
    run_batches,
)

ANON_PREFIX = "anon:"
STAGE = "identity"


def stitch(
    event_type: str, user: str | None, anon: str | None, previous: str | None, links: Any
) -> tuple[str, bool]:
    """Return (profile id, stitched) and record any new link in ``links``.

    Every link read or written is under the record's identity key (previousId
    for an alias, else anonymousId when present), so the caller must own that
    key's table partition.
    """
    if event_type == "alias":
        prev = previous or ""
        user_id = user or ""
        if links.get(prev) != user_id:
            links[prev] = user_id
        return user_id, False
    if user:
        if anon and links.get(anon) != user:
            links[anon] = user
        return user, False
    anon_id = anon or ""
    linked = links.get(anon_id)
    if linked:
        return str(linked), True
    return ANON_PREFIX + anon_id, False


def resolve_record(record: Mapping[str, Any], links: Any) -> tuple[str, bool]:
    """:func:`stitch` for a decoded CustomerEvent."""
    return stitch(
        record["type"],
        record.get("userId") or None,
        record.get("anonymousId") or None,
        record.get("previousId") or None,
        links,
    )


def resolve_profile(headers: dict[str, bytes], links: Any) -> tuple[str, bool]:
    """:func:`stitch` for a record of the identity repartition topic (ids in headers)."""
    user = headers.get(H_USER)
    anon = headers.get(H_ANON)
    previous = headers.get(H_PREVIOUS)
    return stitch(
        (headers.get(H_TYPE) or b"").decode(),
        user.decode() if user else None,
        anon.decode() if anon else None,
        previous.decode() if previous else None,
        links,
    )


def profile_headers(forwarded: Headers, profile_id: str, stitched: bool) -> Headers:
    """The headers of a record on the profile repartition topic."""
    return [
        *forwarded,
        (H_PROFILE, profile_id.encode()),
        (H_STITCHED, b"1" if stitched else b"0"),
        (H_KIND, KIND_EVENT),
    ]


def register(p: Pipeline) -> None:
    links = p.identity_links

    async def handle(stream: Any, events: Sequence[Any]) -> list[OutRecord]:
        out: list[OutRecord] = []
        for event in events:
            bind_event(stream, event)
            headers = header_map(event.headers)
            profile_id, stitched = resolve_profile(headers, links)
            forwarded: Headers = [
                (k, v) for k, v in headers.items() if k not in (H_PROFILE, H_STITCHED, H_KIND)
            ]
            out.append(
                (
                    p.profile_topic_name,
                    event.value,
                    profile_id.encode(),
                    profile_headers(forwarded, profile_id, stitched),
                )
            )
        return out

    @p.app.agent(p.identity_topic, name="cdpflow.identity.stitch")
    async def stitch_agent(stream: Any) -> None:
        await run_batches(p, stream, STAGE, handle)
