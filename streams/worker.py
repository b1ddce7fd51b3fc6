"""Running the Faust worker (``cdpflow worker``)."""

from __future__ import annotations

import gc

import faust

from streams.app import (
    IDENTITY_LINKS_TABLE,
    PROFILE_RECOMMENDATIONS_TABLE,
    PROFILE_TRAITS_TABLE,
)
from streams.audiences.settings import AUDIENCE_REPARTITION_SUFFIX, AUDIENCE_STATE_TABLE
from streams.logs import logging_dict_config
from streams.pipeline import build_pipeline
from streams.settings import Settings
from streams.topics import (
    INTERNAL_IDENTITY_SUFFIX,
    INTERNAL_PROFILE_SUFFIX,
    TopicSpec,
    ensure_topics,
    internal_topic,
    pipeline_topic_specs,
)

TABLES = (
    IDENTITY_LINKS_TABLE,
    PROFILE_TRAITS_TABLE,
    PROFILE_RECOMMENDATIONS_TABLE,
    AUDIENCE_STATE_TABLE,
)


def worker_topic_specs(settings: Settings) -> list[TopicSpec]:
    """Pipeline topics plus the worker group's repartition topics and table changelogs.

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
    p = settings.cdp_topic_partitions
    wid = settings.cdp_worker_id
    repartition = [
        TopicSpec(internal_topic(wid, suffix), p, {})
        for suffix in (
            INTERNAL_IDENTITY_SUFFIX,
            INTERNAL_PROFILE_SUFFIX,
            AUDIENCE_REPARTITION_SUFFIX,
        )
    ]
    return pipeline_topic_specs(settings) + repartition + changelogs


def run_worker(settings: Settings, *, loglevel: str = "info") -> None:
    """Create topics if missing, build the topology and run until SIGTERM/SIGINT."""
    ensure_topics(settings, worker_topic_specs(settings))
    pipeline = build_pipeline(settings, web_enabled=settings.cdp_worker_web_enabled)
    worker = faust.Worker(
        pipeline.app,
        loglevel=loglevel,
        quiet=True,
        logging_config=logging_dict_config(loglevel),
    )
    # Modules, schemas, the topology and ua-parser's regexes live as long as the
    # process: move them out of the collector's generations so that full
    # collections only walk what the stream allocates.
    gc.freeze()
    worker.execute_from_commandline()


if __name__ == "__main__":
    run_worker(Settings())
