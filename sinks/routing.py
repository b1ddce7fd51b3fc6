"""Whether an enriched event goes to a destination at all: Segment's integrations object
and consent. Skips are counted per reason and their offsets committed, never dead-lettered:
they are the user's and the customer's choice, not a failure.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson

INTEGRATION_DISABLED = "INTEGRATION_DISABLED"
CONSENT_NOT_GRANTED = "CONSENT_NOT_GRANTED"
NOT_APPLICABLE = "NOT_APPLICABLE"


def integration_enabled(integrations_json: str | None, names: Iterable[str]) -> bool:
    """Segment's rule: a destination's own key wins, else ``All`` (default true).

    A value that is an object (destination options) counts as enabled, like
    Segment. Names are matched exactly first (they are case-sensitive in the
    spec), then case-insensitively so "mixpanel" from a hand-written event works.
    """
    if not integrations_json or integrations_json == "{}":
        return True
    try:
        value = orjson.loads(integrations_json)
    except orjson.JSONDecodeError:
        return True
    if not isinstance(value, dict) or not value:
        return True
    names = tuple(names)
    for name in names:
        if name in value:
            return _truthy(value[name])
    lowered = {str(k).lower(): v for k, v in value.items()}
    for name in names:
        if name.lower() in lowered:
            return _truthy(lowered[name.lower()])
    return _truthy(value.get("All", lowered.get("all", True)))


def _truthy(value: Any) -> bool:
    if isinstance(value, dict):
        return True
    return bool(value)


def consent_granted(context: Mapping[str, Any] | None, required: Iterable[str]) -> bool:
    """Every required category is granted in ``context.consent.categoryPreferences``.

    No consent object means nothing was granted. Category names compare
    case-insensitively (``CDP_SINK_X_CONSENT_CATEGORIES=advertising`` matches
    Segment's ``Advertising``).
    """
    required = [c.lower() for c in required]
    if not required:
        return True
    consent = (context or {}).get("consent") or {}
    prefs = consent.get("categoryPreferences") or {}
    granted = {str(k).lower() for k, v in prefs.items() if v is True}
    return all(c in granted for c in required)


def skip_reason(
    enriched: Mapping[str, Any], integration_names: Iterable[str], consent_categories: list[str]
) -> str | None:
    """Why the event must not go to the destination, or None when it should."""
    event = enriched["event"]
    if not integration_enabled(event.get("integrations"), integration_names):
        return INTEGRATION_DISABLED
    if not consent_granted(event.get("context"), consent_categories):
        return CONSENT_NOT_GRANTED
    return None
