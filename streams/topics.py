"""Topic names (a pinned interface) and their creation.

Internal topics are co-partitioned with each other so that a worker owning
partition *p* of a repartition topic also owns partition *p* of the tables
keyed the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from streams.settings import Settings

EVENTS_RAW = "cdp.events.raw"
EVENTS_ENRICHED = "cdp.events.enriched"
EVENTS_DLQ = "cdp.events.dlq"
RECOMMENDATIONS_UPDATES = "cdp.recommendations.updates"
AUDIENCES_UPDATES = "cdp.audiences.updates"
SINK_DLQ_PREFIX = "cdp.sink.dlq."

#: Repartition topics belong to one worker group (like Kafka Streams'
#: ``<application.id>-...-repartition``), so two pipelines never read each other's.
#: Validated events re-keyed by the identity key (anonymousId, else userId):
INTERNAL_IDENTITY_SUFFIX = "identity-repartition"
#: Events and recommendation updates re-keyed by canonical profile id:
INTERNAL_PROFILE_SUFFIX = "profile-repartition"

PUBLIC_TOPICS = (
    EVENTS_RAW,
    EVENTS_ENRICHED,
    EVENTS_DLQ,
    RECOMMENDATIONS_UPDATES,
    AUDIENCES_UPDATES,
)


def internal_topic(worker_id: str, suffix: str) -> str:
    return f"{worker_id}-{suffix}"


def sink_dlq_topic(destination: str) -> str:
    return f"{SINK_DLQ_PREFIX}{destination}"


def subject_for(topic: str) -> str:
    """TopicNameStrategy: the registry subject of a topic's values."""
    return f"{topic}-value"


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: dict[str, str]


def pipeline_topic_specs(settings: Settings) -> list[TopicSpec]:
    p = settings.cdp_topic_partitions
    specs = [TopicSpec(t, p, {}) for t in PUBLIC_TOPICS]
    # Dead letters are evidence: keep them for 30 days regardless of broker default.
    return [
        TopicSpec(s.name, s.partitions, {"retention.ms": str(30 * 24 * 3600 * 1000)})
        if s.name == EVENTS_DLQ
        else s
        for s in specs
    ]


def ensure_topics(
    settings: Settings, specs: list[TopicSpec] | None = None, timeout: float = 30.0
) -> list[str]:
    """Create missing topics; return the names created. Existing topics are left as they are."""
    specs = pipeline_topic_specs(settings) if specs is None else specs
    admin = AdminClient(settings.librdkafka_common())
    existing = set(admin.list_topics(timeout=timeout).topics)
    missing = [s for s in specs if s.name not in existing]
    if not missing:
        return []
    futures = admin.create_topics(
        [
            NewTopic(
                s.name,
                num_partitions=s.partitions,
                replication_factor=settings.cdp_topic_replication,
                config=s.config,
            )
            for s in missing
        ],
        operation_timeout=timeout,
    )
    created = []
    for name, fut in futures.items():
        try:
            fut.result()
            created.append(name)
        except Exception as exc:  # another process may have created it meanwhile
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    return created
