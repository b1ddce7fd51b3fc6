"""Identity stitching: one canonical profile id per person.

The table ``identity_links`` maps an anonymousId (or an alias's previousId) to
the userId it was linked to by identify/alias or any event carrying both ids.
Events arrive keyed by that id, so the link a worker needs is always in the
table partitions it owns. The canonical profile id is the userId once known,
else ``anon:<anonymousId>`` (a prefix, so it can never collide with a userId).
"""

from __future__ import annotations

from collections.abc import Sequence
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


def resolve_profile(headers: dict[str, bytes], links: Any) -> tuple[str, bool]:
    """Return (profile id, stitched) and record any new link in ``links``."""
    user = headers.get(H_USER)
    anon = headers.get(H_ANON)
    if headers.get(H_TYPE) == b"alias":
        previous = headers[H_PREVIOUS].decode()
        user_id = user.decode() if user else ""
        if links.get(previous) != user_id:
            links[previous] = user_id
        return user_id, False
    if user:
        user_id = user.decode()
        if anon:
            anon_id = anon.decode()
            if links.get(anon_id) != user_id:
                links[anon_id] = user_id
        return user_id, False
    anon_id = anon.decode() if anon else ""
    linked = links.get(anon_id)
    if linked:
        return str(linked), True
    return ANON_PREFIX + anon_id, False


def register(p: Pipeline) -> None:
    links = p.identity_links

    async def handle(stream: Any, events: Sequence[Any]) -> list[OutRecord]:
        out: list[OutRecord] = []
        for event in events:
            bind_event(stream, event)
            headers = header_map(event.headers)
            profile_id, stitched = resolve_profile(headers, links)
            forwarded: Headers = [
                (k, v) for k, v in headers.items() if k not in (H_PROFILE, H_STITCHED)
            ]
            forwarded += [
                (H_PROFILE, profile_id.encode()),
                (H_STITCHED, b"1" if stitched else b"0"),
                (H_KIND, KIND_EVENT),
            ]
            out.append((p.profile_topic_name, event.value, profile_id.encode(), forwarded))
        return out

    @p.app.agent(p.identity_topic, name="cdpflow.identity.stitch")
    async def stitch(stream: Any) -> None:
        await run_batches(p, stream, "identity", handle)
