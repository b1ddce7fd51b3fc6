"""Profiles domain: profile traits, recommendation joins and event enrichment."""
