"""What the three ad-audience destinations (Meta, Google Ads, LinkedIn) share.

They read ``cdp.audiences.updates`` (AudienceUpdate records, one membership change
of one profile in one audience on one platform) instead of enriched events, and
their APIs take one audience and one action (add or remove) per request. This
base class does the parts that must be identical for all three:

* only this platform's updates are taken (the others are skipped, not failed);
* identifiers are checked before anything is sent: every key the platform
  matches on hashed must be SHA-256 hex, and no key outside the platform's
  hashed and clear sets may pass. The agent hashes upstream; this is the last
  line of defence that keeps raw PII from ever leaving toward an ad platform;
* a batch is cut into requests per (audience, action) without reordering a
  profile's changes (an ADD then a REMOVE of the same person must not become a
  REMOVE then an ADD).

A subclass supplies the platform's row for one update, the requests for one
audience/action group, the response classifier, and the full re-sync requests.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import orjson

from sinks.base import Destination, HttpRequest, MappedEvent, Permanent, S
from streams.audiences.identifiers import CLEAR_KEYS, HASHED_KEYS, is_sha256_hex

Action = Literal["ADD", "REMOVE"]

#: Reason codes of updates refused before any request (dead-lettered).
NO_IDENTIFIERS = "NO_IDENTIFIERS"
UNHASHED_IDENTIFIER = "UNHASHED_IDENTIFIER"
UNKNOWN_IDENTIFIER = "UNKNOWN_IDENTIFIER"
NO_AUDIENCE_ID = "NO_AUDIENCE_ID"


@dataclass(frozen=True, slots=True)
class AudienceItem:
    """``MappedEvent.item`` of an audience destination: the platform's row and where it goes."""

    audience_id: str
    action: Action
    profile_id: str
    identifiers: Mapping[str, str]
    #: The platform's JSON-ready representation of this person (a Meta data row, a
    #: Google UserData, a LinkedIn element); what the request body carries.
    row: Any


@dataclass(frozen=True, slots=True)
class FullSyncMember:
    """One current member handed to a full re-sync (``cdpflow audiences sync --full``)."""

    profile_id: str
    identifiers: dict[str, str]


def check_identifiers(platform: str, identifiers: Mapping[str, str]) -> None:
    """Raise :class:`Permanent` unless every identifier is allowed and hashed as required.

    The message names the offending keys, never their values.
    """
    if not identifiers:
        raise Permanent(NO_IDENTIFIERS, "the update carries no identifiers")
    hashed, clear = HASHED_KEYS[platform], CLEAR_KEYS[platform]
    unknown = sorted(k for k in identifiers if k not in hashed and k not in clear)
    if unknown:
        raise Permanent(UNKNOWN_IDENTIFIER, f"keys not sent to {platform}: {', '.join(unknown)}")
    bad = sorted(k for k, v in identifiers.items() if k in hashed and not is_sha256_hex(v))
    if bad:
        raise Permanent(
            UNHASHED_IDENTIFIER,
            f"values of {', '.join(bad)} are not SHA-256 hex; refusing to send them",
        )


def audience_item(mapped: MappedEvent) -> AudienceItem:
    item = mapped.item
    assert isinstance(item, AudienceItem), "audience destinations map to AudienceItem"
    return item


def group_by_audience(batch: Sequence[MappedEvent]) -> list[tuple[str, Action, list[MappedEvent]]]:
    """Cut a batch into (audience, action) groups that can be sent in the returned order.

    Groups keep first-seen order. An update joins the newest group of its
    (audience, action) unless that would move it before a change of the same
    profile in the same audience that came earlier in the batch (e.g. ADD p,
    REMOVE p, ADD p): then a new group starts. Sending the groups one after
    another therefore applies every profile's changes in their original order.
    """
    groups: list[tuple[str, Action, list[MappedEvent]]] = []
    open_group: dict[tuple[str, Action], int] = {}
    #: (audience, profile) -> index of the group holding its latest change
    last_change: dict[tuple[str, str], int] = {}
    for mapped in batch:
        item = audience_item(mapped)
        key = (item.audience_id, item.action)
        index = open_group.get(key)
        previous = last_change.get((item.audience_id, item.profile_id))
        if index is None or (previous is not None and previous > index):
            index = len(groups)
            groups.append((item.audience_id, item.action, []))
            open_group[key] = index
        groups[index][2].append(mapped)
        last_change[(item.audience_id, item.profile_id)] = index
    return groups


class AudienceDestination(Destination[S]):
    """Base of the ad-audience destinations (see the module docstring)."""

    source: ClassVar[Literal["enriched", "audience"]] = "audience"
    integration_names: ClassVar[tuple[str, ...]] = ()

    def map(self, enriched: Mapping[str, Any]) -> MappedEvent | None:
        """``enriched`` is an AudienceUpdate here (the engine decodes this source's records)."""
        update = enriched
        if update["platform"] != self.name:
            return None
        audience_id = str(update.get("platformAudienceId") or "")
        if not audience_id:
            raise Permanent(NO_AUDIENCE_ID, "the update names no platform audience id")
        identifiers = dict(update.get("identifiers") or {})
        check_identifiers(self.name, identifiers)
        action: Action = "ADD" if update["action"] == "ADD" else "REMOVE"
        row = self.row(identifiers)
        encoded = orjson.dumps(row)
        item = AudienceItem(audience_id, action, str(update["profileId"]), identifiers, row)
        return MappedEvent(
            message_id=str(update["updateId"]),
            order_key=str(update["profileId"]),
            item=item,
            size=len(encoded),
            encoded=encoded,
        )

    def build_requests(self, batch: Sequence[MappedEvent]) -> list[HttpRequest]:
        requests: list[HttpRequest] = []
        for audience_id, action, items in group_by_audience(batch):
            requests.extend(self.build_group_requests(audience_id, action, items))
        return requests

    @abstractmethod
    def row(self, identifiers: Mapping[str, str]) -> Any:
        """The platform's JSON-ready representation of one person from checked identifiers."""

    @abstractmethod
    def build_group_requests(
        self, audience_id: str, action: Action, items: list[MappedEvent]
    ) -> list[HttpRequest]:
        """Requests adding or removing ``items`` (already within :attr:`limits`)."""

    @abstractmethod
    def build_full_sync(
        self, audience_id: str, members: Sequence[MappedEvent]
    ) -> list[HttpRequest]:
        """Requests that make the platform audience hold exactly ``members`` (ADD items).

        Meta: a ``usersreplace`` session; Google Ads: a job starting with
        ``removeAll``; a platform without replace semantics adds everyone and says
        so in its docstring. The requests are sent in order, one at a time.
        """

    def member_item(self, audience_id: str, member: FullSyncMember) -> MappedEvent:
        """A full-sync member as the MappedEvent the request builders take."""
        check_identifiers(self.name, member.identifiers)
        row = self.row(member.identifiers)
        encoded = orjson.dumps(row)
        item = AudienceItem(audience_id, "ADD", member.profile_id, member.identifiers, row)
        return MappedEvent(
            message_id=f"full-sync:{member.profile_id}",
            order_key=member.profile_id,
            item=item,
            size=len(encoded),
            encoded=encoded,
        )
