"""Destination name -> class, the one place the engine, the CLI and the contract suite look.

A destination module registers its class with :func:`register` at import time;
:func:`load_all` imports every known module. Modules that do not exist (yet) are
skipped, but a module that exists and fails to import is an error: a broken
destination must not silently vanish from ``cdpflow sink run --all``.

To add a destination: write ``sinks/<name>.py`` with a :class:`~sinks.base.Destination`
subclass decorated with ``@register``, and add ``"sinks.<name>"`` to :data:`MODULES`
(or register it from any module imported before the engine starts).
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any, TypeVar

from sinks.base import Destination

#: Modules holding the built-in destinations, imported by :func:`load_all`.
MODULES: tuple[str, ...] = (
    "sinks.segment",
    "sinks.mixpanel",
    "sinks.aep",
    "sinks.ga4",
    "sinks.meta",
    "sinks.google_ads",
    "sinks.linkedin",
)

_REGISTRY: dict[str, type[Destination[Any]]] = {}

D = TypeVar("D", bound=type[Destination[Any]])


class UnknownDestination(KeyError):
    """A destination name nobody registered."""


def register(cls: D) -> D:
    """Class decorator: make a destination known under ``cls.name``."""
    name = cls.name
    if not name or not name.isidentifier() or name.lower() != name:
        raise ValueError(f"destination name {name!r} must be a lowercase identifier")
    existing = _REGISTRY.get(name)
    # Re-registering the same class (a module reloaded in tests) is fine; two classes are not.
    if existing is not None and _qualified(existing) != _qualified(cls):
        raise ValueError(f"destination {name!r} registered twice ({existing} and {cls})")
    _REGISTRY[name] = cls
    return cls


def _qualified(cls: type[Any]) -> tuple[str, str]:
    return cls.__module__, cls.__qualname__


def load_all() -> dict[str, type[Destination[Any]]]:
    """Import every known destination module and return the registry (sorted by name)."""
    for module in MODULES:
        if importlib.util.find_spec(module) is None:
            continue
        importlib.import_module(module)
    return dict(sorted(_REGISTRY.items()))


def get(name: str) -> type[Destination[Any]]:
    registry = load_all()
    try:
        return registry[name.lower()]
    except KeyError:
        known = ", ".join(registry) or "none"
        raise UnknownDestination(f"unknown destination {name!r} (known: {known})") from None
