"""Destination delivery: the engine and one module per destination."""
