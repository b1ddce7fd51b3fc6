"""Running the Faust worker (``cdpflow worker``)."""

from __future__ import annotations

import faust

from streams.app import (
    IDENTITY_LINKS_TABLE,
    PROFILE_RECOMMENDATIONS_TABLE,
    PROFILE_TRAITS_TABLE,
)
from streams.pipeline import build_pipeline
from streams.settings import Settings
from streams.topics import TopicSpec, ensure_topics, pipeline_topic_specs

TABLES = (IDENTITY_LINKS_TABLE, PROFILE_TRAITS_TABLE, PROFILE_RECOMMENDATIONS_TABLE)


def worker_topic_specs(settings: Settings) -> list[TopicSpec]:
    """Pipeline topics plus the worker group's compacted table changelogs.

    Created before Faust starts: Faust's own creation races its metadata check
    and crashes the agent with PartitionsMismatch on a fresh cluster.
    """
    changelogs = [
        TopicSpec(
            f"{settings.cdp_worker_id}-{table}-changelog",
            settings.cdp_topic_partitions,
            {"cleanup.policy": "compact"},
        )
        for table in TABLES
    ]
    return pipeline_topic_specs(settings) + changelogs


def run_worker(settings: Settings, *, web_enabled: bool = True, loglevel: str = "info") -> None:
    """Create topics if missing, build the topology and run until SIGTERM/SIGINT."""
    ensure_topics(settings, worker_topic_specs(settings))
    pipeline = build_pipeline(settings, web_enabled=web_enabled)
    worker = faust.Worker(pipeline.app, loglevel=loglevel, quiet=True)
    worker.execute_from_commandline()


if __name__ == "__main__":
    run_worker(Settings())
