"""Per-profile audience state: what the rules need to know about one profile, and how
inputs update it. Pure (no Faust, no I/O); the state is a JSON-serialisable dict so
the Faust table's changelog stores it as is.

Shape (short keys: one state per profile lives in a compacted changelog)::

    {
      "pid": "user-1",                        # canonical profile id
      "ev": [{"t": ts, "n": name, "id": messageId, "p": {prop: value}}, ...],
      "recs": {"at": generatedAt, "id": updateId,
               "products": [[productId, score, rank, category], ...]} | None,
      "consent": {"v": granted, "t": ts, "id": messageId} | None,
      "del": False,                           # suppressed after a deletion request
      "traits": {...} | None, "tpos": position of the record the traits came from,
      "m": {"audience|platform": {"v": membershipVersion, "ids": {...} | None}},
    }

Every update is idempotent, so replaying inputs (a worker restarted mid-batch,
the same event produced twice) changes nothing:

* stored events are deduplicated by messageId;
* consent is the latest by event timestamp (ties: the larger messageId), so the
  result does not depend on arrival order;
* traits come from the newest identify by position in ``cdp.events.enriched``
  (the profile's records are in one partition, so offsets order them; the
  enriched record carries the profile's merged traits up to that point);
* recommendations are the latest by (generatedAt, updateId);
* a deletion request suppresses the profile for good and clears its events,
  traits and recommendations.

Stored events are bounded: older than the config's largest window, or beyond
``max_events_per_name`` per name (newest kept), they can no longer change any
rule's result and are dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from streams.audiences.config import AudiencesConfig, EventCondition, iter_conditions
from streams.audiences.config import ViewedRecommendedCondition as _Viewed
from streams.events import to_ms

ProfileState = dict[str, Any]


def new_state(profile_id: str) -> ProfileState:
    return {
        "pid": profile_id,
        "ev": [],
        "recs": None,
        "consent": None,
        "del": False,
        "traits": None,
        "tpos": None,
        "m": {},
    }


def stored_properties(config: AudiencesConfig) -> frozenset[str]:
    """Event properties a rule reads (only these are kept with a stored event)."""
    keys: set[str] = set()
    for audience in config.audiences:
        for cond in iter_conditions(audience.rule):
            if isinstance(cond, EventCondition):
                keys.update(cond.properties)
            elif isinstance(cond, _Viewed):
                keys.add(cond.product_property)
    return frozenset(keys)


def consent_value(context: Mapping[str, Any] | None, category: str) -> bool | None:
    """The explicit grant (True) / denial (False) of ``category``; None when not stated.

    Same reading as the sinks' consent check (``sinks.routing.consent_granted``):
    case-insensitive category names, only ``true`` grants.
    """
    consent = (context or {}).get("consent") or {}
    prefs = consent.get("categoryPreferences") or {}
    wanted = category.lower()
    for key, value in prefs.items():
        if str(key).lower() == wanted:
            return value is True
    return None


def consent_granted(state: ProfileState) -> bool:
    consent = state["consent"]
    return bool(consent and consent["v"])


class StateUpdater:
    """Applies inputs to profile states for one config (precomputed lookups)."""

    def __init__(self, config: AudiencesConfig) -> None:
        self.config = config
        self.referenced = config.referenced_events
        self.deletions = frozenset(config.deletion_events)
        self.props = stored_properties(config)
        self.max_window = config.max_window_ms
        self.max_per_name = config.max_events_per_name
        self.consent_category = config.consent

    def is_relevant(self, enriched: Mapping[str, Any]) -> bool:
        """Whether an enriched event can change any profile's audience state at all."""
        event = enriched["event"]
        kind = event["type"]
        if kind == "identify":
            return True
        if kind == "track":
            name = event.get("event")
            if name in self.referenced or name in self.deletions:
                return True
        return consent_value(event.get("context"), self.consent_category) is not None

    def apply_event(
        self,
        state: ProfileState,
        enriched: Mapping[str, Any],
        now_ms: int,
        position: int,
    ) -> bool:
        """Fold one decoded EnrichedEvent into ``state``; False when the state is unchanged.

        ``position`` orders the profile's enriched records (their offset in
        ``cdp.events.enriched``; any increasing number in tests).
        """
        if state["del"]:
            return False
        event = enriched["event"]
        mid = event["messageId"]
        ts = to_ms(event["timestamp"])
        kind = event["type"]
        name = event.get("event") if kind == "track" else None
        if name is not None and name in self.deletions:
            state["del"] = True
            state["ev"] = []
            state["traits"] = None
            state["recs"] = None
            return True
        changed = False
        granted = consent_value(event.get("context"), self.consent_category)
        if granted is not None:
            current = state["consent"]
            if current is None or (ts, mid) > (current["t"], current["id"]):
                changed = True
                state["consent"] = {"v": granted, "t": ts, "id": mid}
        if kind == "identify" and (state["tpos"] is None or position >= state["tpos"]):
            traits = orjson.loads(enriched.get("profileTraits") or "{}")
            if not isinstance(traits, dict):
                traits = {}
            changed = True
            state["traits"] = traits
            state["tpos"] = position
        if name is not None and name in self.referenced:
            events = state["ev"]
            if not any(e["id"] == mid for e in events):
                props = self._props(event.get("properties"))
                events.append({"t": ts, "n": name, "id": mid, "p": props})
                changed = True
        if self.prune(state, now_ms):
            changed = True
        return changed

    def _props(self, properties_json: str | None) -> dict[str, Any]:
        if not self.props or not properties_json or properties_json == "{}":
            return {}
        try:
            props = orjson.loads(properties_json)
        except orjson.JSONDecodeError:
            return {}
        if not isinstance(props, dict):
            return {}
        return {k: props[k] for k in self.props if k in props}

    def prune(self, state: ProfileState, now_ms: int) -> bool:
        """Drop events no window can see any more, and all but the newest per name."""
        events: list[dict[str, Any]] = state["ev"]
        if not events:
            return False
        horizon = now_ms - self.max_window
        kept = [e for e in events if e["t"] > horizon]
        per_name: dict[str, int] = {}
        for e in kept:
            per_name[e["n"]] = per_name.get(e["n"], 0) + 1
        if any(n > self.max_per_name for n in per_name.values()):
            kept.sort(key=lambda e: (e["t"], e["id"]), reverse=True)
            seen: dict[str, int] = {}
            bounded = []
            for e in kept:
                seen[e["n"]] = seen.get(e["n"], 0) + 1
                if seen[e["n"]] <= self.max_per_name:
                    bounded.append(e)
            kept = bounded
        if len(kept) == len(events):
            return False
        kept.sort(key=lambda e: (e["t"], e["id"]))
        state["ev"] = kept
        return True

    @staticmethod
    def apply_recommendation(state: ProfileState, rec: Mapping[str, Any]) -> bool:
        """Replace the current recommendations with a newer RecommendationUpdate."""
        if state["del"]:
            return False
        at = to_ms(rec["generatedAt"])
        current = state["recs"]
        if current is not None and (at, rec["updateId"]) <= (current["at"], current["id"]):
            return False
        state["recs"] = {
            "at": at,
            "id": rec["updateId"],
            "products": [
                [p["productId"], float(p["score"]), int(p["rank"]), p.get("category")]
                for p in rec["products"]
            ],
        }
        return True
