"""``cdpflow status``: a compact live view of the pipeline from the broker and the metrics.

Lag comes from the broker (committed offsets of every cdpflow consumer group
against the high watermarks), so it is right even when a process is down;
rates and health come from the processes' /metrics endpoints when reachable.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

import httpx
from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient
from prometheus_client.parser import text_string_to_metric_families
from rich.table import Table

from streams.settings import Settings

CDP_GROUP_PREFIXES = ("cdpflow",)


@dataclass
class GroupLag:
    group: str
    state: str
    members: int
    lag_by_topic: dict[str, int] = field(default_factory=dict)


def _watermarks(consumer: Consumer, tps: list[TopicPartition]) -> dict[tuple[str, int], int]:
    return {
        (tp.topic, tp.partition): consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in tps
    }


def consumer_lag(settings: Settings) -> list[GroupLag]:
    """Lag per cdpflow consumer group and topic (high watermark - committed offset)."""
    admin = AdminClient(settings.librdkafka_common())
    listing = admin.list_consumer_groups(request_timeout=10).result()
    groups = sorted(g.group_id for g in listing.valid if g.group_id.startswith(CDP_GROUP_PREFIXES))
    if not groups:
        return []
    described = admin.describe_consumer_groups(groups, request_timeout=10)
    probe = Consumer({**settings.librdkafka_common(), "group.id": f"cdpflow-status-{uuid.uuid4()}"})
    result: list[GroupLag] = []
    try:
        for group in groups:
            desc = described[group].result()
            offsets = admin.list_consumer_group_offsets(
                [ConsumerGroupTopicPartitions(group)], request_timeout=10
            )[group].result()
            tps = [
                tp
                for tp in offsets.topic_partitions
                if tp.offset >= 0 and "-changelog" not in tp.topic
            ]
            ends = _watermarks(probe, tps)
            lag = GroupLag(group, str(desc.state).rsplit(".", 1)[-1], len(desc.members))
            for tp in tps:
                behind = max(0, ends[(tp.topic, tp.partition)] - tp.offset)
                lag.lag_by_topic[tp.topic] = lag.lag_by_topic.get(tp.topic, 0) + behind
            result.append(lag)
    finally:
        probe.close()
    return result


def scrape(url: str) -> dict[str, float]:
    """Sum of each counter/gauge sample by name+labels; empty when the endpoint is down."""
    try:
        text = httpx.get(url, timeout=2).text
    except httpx.HTTPError:
        return {}
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}"] = sample.value
    return values


def rates(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    return {
        key: (after[key] - before.get(key, 0.0)) / seconds
        for key in after
        if key.endswith("}") and "_total" in key
    }


def _interesting(lag: GroupLag, settings: Settings) -> bool:
    """Live groups, plus the configured worker and sink groups even when they are down."""
    return (
        lag.members > 0
        or lag.group == settings.cdp_worker_id
        or lag.group.startswith("cdpflow-sink-")
    )


def render(
    settings: Settings,
    endpoints: dict[str, str],
    interval: float = 2.0,
    all_groups: bool = False,
) -> Table:
    """One snapshot: per group lag from the broker; per stage rates from /metrics."""
    first = {name: scrape(url) for name, url in endpoints.items()}
    time.sleep(interval)
    second = {name: scrape(url) for name, url in endpoints.items()}
    table = Table(title=f"cdpflow · {settings.kafka_bootstrap_servers}", expand=False)
    table.add_column("component")
    table.add_column("state")
    table.add_column("rate /s", justify="right")
    table.add_column("lag", justify="right")
    table.add_column("detail")
    for name, url in endpoints.items():
        if not second[name]:
            table.add_row(name, "[red]down[/red]", "-", "-", url)
            continue
        r = rates(first[name], second[name], interval)
        top = sorted(((v, k) for k, v in r.items() if v > 0), reverse=True)[:3]
        detail = ", ".join(f"{k.split('{')[0].removeprefix('cdp_')} {v:,.0f}" for v, k in top)
        dlq = sum(v for k, v in second[name].items() if k.startswith("cdp_dlq_records_total"))
        table.add_row(
            name,
            "[green]up[/green]",
            f"{sum(v for v, _ in top):,.0f}",
            "-",
            f"{detail or 'idle'}; dlq total {dlq:,.0f}",
        )
    for lag in consumer_lag(settings):
        if not (all_groups or _interesting(lag, settings)):
            continue
        public = {t: n for t, n in lag.lag_by_topic.items() if t.startswith("cdp.")}
        internal = sum(n for t, n in lag.lag_by_topic.items() if t not in public)
        colour = "green" if lag.state.upper() == "STABLE" else "yellow"
        table.add_row(
            f"group {lag.group}",
            f"[{colour}]{lag.state.lower()}[/{colour}] ({lag.members} members)",
            "-",
            f"{sum(lag.lag_by_topic.values()):,}",
            ", ".join(f"{t} {n:,}" for t, n in sorted(public.items()))
            + (f"; internal {internal:,}" if internal else ""),
        )
    return table
