"""Ingest domain: decode and validate raw events; route the good ones, dead-letter the rest."""
