"""Audiences: rule-based membership of profiles, synced to ad platforms (Faust-free parts)."""
