"""``make bench``: cdpflow's worker against a bare confluent-kafka loop and Quix Streams.

Entry point: ``python -m bench.run`` (see :mod:`bench.run` for what is measured and how).
Nothing here is imported by the pipeline; the benchmark only drives it from outside.
"""
