"""Full re-sync of one platform audience: make it hold exactly the current members.

Used by ``cdpflow audiences sync --full`` for a new platform audience, or after
drift (someone edited the audience in the ad platform's UI, a retention window
dropped members). The caller reads the current membership (the audience
table's changelog); this module turns it into the platform's replace requests
(``AudienceDestination.build_full_sync``: Meta's ``usersreplace`` session, a
Google Ads job starting with ``removeAll``, LinkedIn ADDs) and sends them in
order through the same Deliverer as the streaming sink: same rate limits,
retries, Retry-After handling and error taxonomy.

Nothing is dead-lettered here: a full sync has no Kafka record to point at, so
members the platform refuses are reported in the result (with reason codes,
never identifiers) and the command's exit status says the sync was partial.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sinks.audience_base import AudienceDestination, FullSyncMember
from sinks.base import DeliveryError, MappedEvent
from sinks.engine import (
    SinkEngineSettings,
    load_destinations,
    make_session,
    standalone_deliverer,
)


class FullSyncError(RuntimeError):
    """The sync could not run at all (destination not configured, not an audience sink)."""


@dataclass
class FullSyncResult:
    platform: str
    audience_id: str
    members: int = 0
    sent: int = 0
    requests: int = 0
    #: Members refused before any request (identifiers) or by the platform, by reason code.
    refused: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.refused


def audience_destination(platform: str) -> AudienceDestination[Any]:
    """The configured destination for ``platform`` (env ``CDP_SINK_<PLATFORM>_*``)."""
    (config,) = load_destinations([platform])
    if config.destination is None:
        raise FullSyncError(f"{platform}: {config.problem}")
    if not isinstance(config.destination, AudienceDestination):
        raise FullSyncError(f"{platform} is not an audience destination")
    return config.destination


async def full_sync(
    platform: str,
    platform_audience_id: str,
    members: Sequence[FullSyncMember],
    progress: Callable[[int], None] | None = None,
    *,
    destination: AudienceDestination[Any] | None = None,
    engine: SinkEngineSettings | None = None,
) -> FullSyncResult:
    """Replace the platform audience's members with ``members``; ``progress(n)`` per request.

    Raises :class:`FullSyncError` when it cannot start and
    :class:`~sinks.engine.DestinationFailed` when the platform refuses the
    credentials; everything else ends up in the result.
    """
    if destination is None:
        destination = await asyncio.to_thread(audience_destination, platform)
    engine = engine or SinkEngineSettings()
    result = FullSyncResult(platform, platform_audience_id, members=len(members))
    items: list[MappedEvent] = []
    for member in members:
        try:
            items.append(destination.member_item(platform_audience_id, member))
        except DeliveryError as exc:
            result.refused[exc.reason] += 1
    requests = destination.build_full_sync(platform_audience_id, items)
    async with make_session(destination) as session:
        deliverer = standalone_deliverer(destination, session, engine)
        for request in requests:
            failures = await deliverer.deliver_requests([request])
            result.requests += 1
            for failure in failures:
                result.refused[failure.error.reason] += 1
            result.sent += len(request.items) - len(failures)
            if progress is not None:
                progress(len(request.items))
    return result
