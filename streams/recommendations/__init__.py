"""Recommendations domain: validate recommendation updates and route them to profiles."""
