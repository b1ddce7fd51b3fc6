"""Avro schemas of cdpflow's topics (``*.avsc``), shipped with the package.

Files reference each other's named types (``cdpflow.CustomerEvent`` inside
``EnrichedEvent``); :func:`streams.schemas.load` expands them into standalone
schemas before registering, so consumers never need schema references.
"""

from pathlib import Path

SCHEMA_DIR = Path(__file__).resolve().parent
