"""``cdpflow demo``: the whole path on the local stack, with numbers at the end.

Starts (or reuses) the stack, a collector and a worker as real processes, sends
a burst through the official Segment SDK, the generator (straight to Kafka) and
some deliberately bad input, then reports what reached raw, enriched and the
DLQ and prints one enriched record. Everything it started is stopped again.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from streams import topics
from streams.inspect import end_offsets, read_from
from streams.settings import Settings

DEMO_WRITE_KEY = "demo-write-key"
#: The shipped example audiences; the demo runs the audience agent with them.
EXAMPLE_AUDIENCES = Path(__file__).resolve().parents[1] / "audiences.example.yaml"
console = Console(highlight=False)


def _free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])


class Child:
    """A cdpflow subprocess with its log in a file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"demo-{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams.cli", *args],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 30) -> str:
        lines = self.log_path.read_bytes().decode(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def _wait(what: str, ready: Any, child: Child, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{what} exited early:\n{child.tail()}")
        if ready():
            return
        time.sleep(0.3)
    raise RuntimeError(f"{what} not ready after {timeout:.0f}s:\n{child.tail()}")


def _publish_recommendations(settings: Settings, user: str) -> None:
    from sources.publisher import EventPublisher

    with EventPublisher(settings, source_id="demo-recommender") as publisher:
        publisher.publish_recommendations(
            user, [("sku-2", 0.93), ("sku-7", 0.71), ("sku-9", 0.42)], "demo-model"
        ).result(30)


def _run_generator(settings: Settings, count: int) -> Any:
    """Realistic shoppers straight to Kafka, with their recommendation lists first."""
    from sources.generator import generate_recommendations, run_generator
    from sources.publisher import EventPublisher

    with EventPublisher(settings, source_id="demo-generator") as publisher:
        for rec in generate_recommendations(50, seed=7):
            publisher.publish_recommendations(**rec)
        return run_generator(publisher, count, 50, seed=7, bad_ratio=0.0)


def _send_with_segment_sdk(host: str, user: str, tag: str) -> int:
    """A small shopping journey through the official analytics-python SDK."""
    from segment.analytics import Client

    errors: list[Any] = []
    client = Client(DEMO_WRITE_KEY, host=host, on_error=lambda e, batch: errors.append(e))
    anon = f"sdk-anon-{tag}"
    ua = (
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_1) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/17.1 Safari/605.1.15"
    )
    context = {
        "userAgent": ua,
        "ip": "203.0.113.7",
        "locale": "en-GB",
        "page": {"url": "https://shop.example/?utm_source=newsletter&utm_campaign=winter"},
        "consent": {"categoryPreferences": {"Advertising": True, "Analytics": True}},
    }
    client.page(anonymous_id=anon, name="Home", context=context)
    client.track(
        anonymous_id=anon,
        event="Product Viewed",
        properties={"product_id": "sku-1", "price": 49.9, "currency": "EUR", "tags": ["new"]},
        context=context,
    )
    client.identify(
        user_id=user,
        anonymous_id=anon,
        traits={"email": "jane.doe@example.com", "firstName": "Jane", "plan": "gold"},
        context=context,
    )
    client.track(
        user_id=user,
        anonymous_id=anon,
        event="Order Completed",
        properties={
            "order_id": f"o-{tag}",
            "total": 49.9,
            "currency": "EUR",
            "products": [{"product_id": "sku-1", "quantity": 1}],
        },
        context=context,
    )
    client.screen(user_id=user, name="Order Confirmation")
    client.group(user_id=user, group_id=f"org-{tag}", traits={"name": "Acme"})
    client.alias(previous_id=f"legacy-{tag}", user_id=user)
    client.flush()
    client.join()
    if errors:
        raise RuntimeError(f"Segment SDK reported errors: {errors}")
    return 7


def _send_bad_input(collector_url: str, settings: Settings) -> dict[str, int]:
    """Invalid events through HTTP (DLQ'd by the collector) and garbage straight to Kafka."""
    bad = {
        "batch": [
            {"type": "track", "event": "No Identity"},
            {"type": "track", "userId": "bad-1"},
            {
                "type": "track",
                "userId": "bad-2",
                "event": "From The Future",
                "timestamp": "2099-01-01T00:00:00Z",
            },
            {"type": "teleport", "userId": "bad-3"},
        ],
        "writeKey": DEMO_WRITE_KEY,
    }
    resp = httpx.post(f"{collector_url}/v1/batch", json=bad, timeout=30)
    resp.raise_for_status()
    body = resp.json()
    from sources.kafka_producer import ReliableProducer

    with ReliableProducer(settings) as producer:
        producer.produce(topics.EVENTS_RAW, b"not avro at all", key=b"garbage").result(30)
    return {"http_rejected": int(body.get("rejected", 0)), "kafka_garbage": 1}


def run_demo(*, keep: bool = False, generated: int = 2000) -> int:
    from streams.stack.manager import StackManager, StackSettings

    manager = StackManager(StackSettings(), progress=lambda m: console.print(f"[dim]{m}[/dim]"))
    t0 = time.monotonic()
    console.rule("[bold]cdpflow demo")
    info = manager.up()
    console.print(f"Kafka {info.bootstrap_servers} · registry {info.registry_url}")
    env = {
        **os.environ,
        **info.env(),
        "CDP_WRITE_KEYS": os.environ.get("CDP_WRITE_KEYS") or DEMO_WRITE_KEY,
        "CDP_WORKER_WEB_ENABLED": "false",
    }
    if not env.get("CDP_AUDIENCES_CONFIG") and EXAMPLE_AUDIENCES.exists():
        env["CDP_AUDIENCES_CONFIG"] = str(EXAMPLE_AUDIENCES)
    if DEMO_WRITE_KEY not in env["CDP_WRITE_KEYS"].split(","):
        env["CDP_WRITE_KEYS"] += f",{DEMO_WRITE_KEY}"
    port = _free_port(int(os.environ.get("CDP_COLLECTOR_PORT", "8088")))
    env["CDP_COLLECTOR_PORT"] = str(port)
    os.environ.update({k: env[k] for k in ("KAFKA_BOOTSTRAP_SERVERS", "SCHEMA_REGISTRY_URL")})
    settings = Settings()
    log_dir = manager.paths.logs
    log_dir.mkdir(parents=True, exist_ok=True)
    children: list[Child] = []
    cluster: Any = None
    try:
        from streams.topics import ensure_topics

        ensure_topics(settings)
        start = {
            t: end_offsets(settings, t)
            for t in (
                topics.EVENTS_RAW,
                topics.EVENTS_ENRICHED,
                topics.EVENTS_DLQ,
                topics.AUDIENCES_UPDATES,
            )
        }
        worker = Child("worker", ["worker"], env, log_dir)
        children.append(worker)
        cluster, sink_names = _start_sinks(settings, env, log_dir, children)
        collector = Child("collector", ["collector"], env, log_dir)
        children.append(collector)
        collector_url = f"http://127.0.0.1:{port}"

        def collector_ready() -> bool:
            try:
                return httpx.get(f"{collector_url}/health/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        _wait("collector", collector_ready, collector)
        _wait("worker", lambda: b"[^Worker]: Ready" in worker.log_path.read_bytes(), worker)
        console.print(
            f"collector on {collector_url}, worker ready ({time.monotonic() - t0:.1f}s since start)"
        )

        tag = uuid.uuid4().hex[:6]
        sdk_user = f"sdk-user-{tag}"
        _publish_recommendations(settings, sdk_user)
        sdk_sent = _send_with_segment_sdk(collector_url, sdk_user, tag)
        console.print(f"Segment SDK: sent {sdk_sent} events as {sdk_user}")
        bad = _send_bad_input(collector_url, settings)
        console.print(
            f"bad input: {bad['http_rejected']} invalid events over HTTP, "
            f"{bad['kafka_garbage']} garbage record straight to Kafka"
        )

        stats = _run_generator(settings, generated)
        console.print(
            f"generator: {stats.acked} events straight to Kafka ({stats.events_per_s:,.0f}/s)"
        )

        expected = sdk_sent + stats.acked
        deadline = time.monotonic() + 180
        enriched: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            enriched = read_from(settings, topics.EVENTS_ENRICHED, start[topics.EVENTS_ENRICHED])
            if len(enriched) >= expected:
                break
            if not worker.alive():
                raise RuntimeError(f"worker died:\n{worker.tail()}")
            time.sleep(1)
        raw = read_from(settings, topics.EVENTS_RAW, start[topics.EVENTS_RAW])
        dead = read_from(settings, topics.EVENTS_DLQ, start[topics.EVENTS_DLQ])
        _report(raw, enriched, dead, expected)
        delivered = _await_destinations(cluster, sink_names, len(enriched))
        _report_audiences(settings, start[topics.AUDIENCES_UPDATES])
        sample = next(
            (
                e
                for e in reversed(enriched)
                if e.get("profileId") == sdk_user and e["event"]["type"] == "track"
            ),
            enriched[-1] if enriched else None,
        )
        if sample is not None:
            console.rule("one enriched record (cdp.events.enriched, decoded)")
            console.print_json(data=sample, default=str)
        ok = (
            len(enriched) >= expected
            and len(dead) >= bad["http_rejected"] + 1
            and all(n > 0 for n in delivered.values())
        )
        console.rule(
            f"[{'green' if ok else 'red'}]demo {'passed' if ok else 'FAILED'} "
            f"in {time.monotonic() - t0:.0f}s"
        )
        return 0 if ok else 1
    finally:
        if keep:
            console.print(
                f"left running: collector and worker (logs in {log_dir}); "
                "stop with `cdpflow stack down` and kill the processes"
            )
        else:
            for child in reversed(children):
                child.stop()
            if cluster is not None:
                cluster.stop()
            gc.collect()  # close our Kafka clients before the broker goes away
            if info.started:
                manager.down()


def _start_sinks(
    settings: Settings, env: dict[str, str], log_dir: Path, children: list[Child]
) -> tuple[Any, list[str]]:
    """Destination emulators in a child process and `cdpflow sink run --all` against them.

    The demo's sink groups start at the current end of the enriched topic, so the
    demo delivers what it sends, not the topic's whole history.
    """
    from confluent_kafka import Consumer, TopicPartition

    from sinks import registry
    from sinks.emulators import start_all
    from sinks.engine import emulator_env

    cluster = start_all(mode="process", configs=_emulator_configs(env))
    env.update(emulator_env(cluster))
    prefix = "cdpflow-demo-sink-"
    env["CDP_SINK_GROUP_PREFIX"] = prefix
    names = sorted(cluster.urls)
    classes = registry.load_all()
    ends = {t: end_offsets(settings, t) for t in (topics.EVENTS_ENRICHED, topics.AUDIENCES_UPDATES)}
    for name in names:
        source = (
            topics.AUDIENCES_UPDATES
            if name in classes and classes[name].source == "audience"
            else topics.EVENTS_ENRICHED
        )
        consumer = Consumer({**settings.librdkafka_common(), "group.id": prefix + name})
        consumer.commit(
            offsets=[TopicPartition(source, p, o) for p, o in ends[source].items()],
            asynchronous=False,
        )
        consumer.close()
    children.append(Child("sinks", ["sink", "run", "--all"], env, log_dir))
    console.print(f"sinks → emulators: {', '.join(f'{n} {u}' for n, u in cluster.urls.items())}")
    return cluster, names


def _emulator_configs(env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The ad emulators know exactly the audiences the demo's audience config names."""
    path = env.get("CDP_AUDIENCES_CONFIG")
    if not path:
        return {}
    from streams.audiences.config import load_config

    targets: dict[str, list[str]] = {"meta": [], "google_ads": [], "linkedin": []}
    for audience in load_config(path).audiences:
        for platform, audience_id in audience.platforms.targets().items():
            targets[platform].append(audience_id)
    return {
        "meta": {"audiences": targets["meta"]},
        "google_ads": {"user_lists": targets["google_ads"]},
        "linkedin": {"segments": targets["linkedin"]},
    }


def _report_audiences(settings: Settings, start: dict[int, int]) -> None:
    """What the audience agent emitted during the run, per audience, platform and action."""
    updates = read_from(settings, topics.AUDIENCES_UPDATES, start)
    counts = Counter((u["audience"], u["platform"], u["action"]) for u in updates)
    table = Table(title=f"{topics.AUDIENCES_UPDATES}: {len(updates)} membership changes")
    for column in ("audience", "platform", "action", "updates"):
        table.add_column(column, justify="right" if column == "updates" else "left")
    for (audience, platform, action), n in sorted(counts.items()):
        table.add_row(audience, platform, action, str(n))
    console.print(table)


def _await_destinations(cluster: Any, names: list[str], enriched: int) -> dict[str, int]:
    """Wait until every emulator stops growing, then show what each one accepted."""
    counts: dict[str, int] = {}
    deadline = time.monotonic() + 120
    stable = 0
    while time.monotonic() < deadline and stable < 3:
        now = {n: int(cluster.state(n, items=False)["uniqueCount"]) for n in names}
        stable = stable + 1 if now == counts and all(now.values()) else 0
        counts = now
        time.sleep(1)
    table = Table(title="what each destination emulator accepted (unique dedupe keys)")
    table.add_column("destination")
    table.add_column("accepted", justify="right")
    table.add_column("note")
    notes = {
        "ga4": "web events inside GA4's 72 h window (older ones: DLQ GA4_TOO_OLD)",
        "mixpanel": "alias/group are skipped (Simplified ID Merge)",
        "meta": "hashed audience rows added/removed (from cdp.audiences.updates)",
        "google_ads": "hashed audience rows added/removed (from cdp.audiences.updates)",
        "linkedin": "hashed audience rows added/removed (from cdp.audiences.updates)",
    }
    for name in names:
        table.add_row(name, str(counts.get(name, 0)), notes.get(name, f"of {enriched} enriched"))
    console.print(table)
    return counts


def _report(
    raw: list[dict[str, Any]],
    enriched: list[dict[str, Any]],
    dead: list[dict[str, Any]],
    expected: int,
) -> None:
    table = Table(title="what reached each topic during this run")
    table.add_column("topic")
    table.add_column("records", justify="right")
    table.add_column("detail")
    table.add_row(topics.EVENTS_RAW, str(len(raw)), "valid events + 1 garbage record")
    stitched = sum(1 for e in enriched if e.get("stitched"))
    table.add_row(
        topics.EVENTS_ENRICHED,
        str(len(enriched)),
        f"expected ≥ {expected}; {stitched} stitched via identify",
    )
    reasons = Counter(f"{d.get('stage')}:{d.get('reasonCode')}" for d in dead)
    detail = ", ".join(f"{k} x{v}" for k, v in sorted(reasons.items()))
    table.add_row(topics.EVENTS_DLQ, str(len(dead)), detail)
    console.print(table)
