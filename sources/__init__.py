"""Event sources: the Segment-compatible collector, producers and generators."""
