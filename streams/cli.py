"""``cdpflow``: one command for the stack, the collector, the worker and the tools."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console

from sinks.cli import dlq_app, sink_app
from streams.analytics_cli import register as register_analytics
from streams.audiences.cli import audiences_app
from streams.settings import Settings, UnknownSettingError
from streams.stack.cli import stack_app

app = typer.Typer(
    name="cdpflow",
    help="Kafka-native customer-data pipeline: Segment-spec events, Avro, Faust, sinks.",
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(stack_app, name="stack")
topics_app = typer.Typer(help="Create and inspect cdpflow's topics.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")
register_analytics(app)
app.add_typer(sink_app, name="sink")
app.add_typer(dlq_app, name="dlq")
app.add_typer(audiences_app, name="audiences")

_out = Console(highlight=False, soft_wrap=True)
_err = Console(stderr=True, highlight=False, soft_wrap=True)


def load_settings() -> Settings:
    """Settings from the environment; a bad or unknown variable exits with a clear message."""
    try:
        return Settings()
    except (ValidationError, UnknownSettingError) as exc:
        _err.print(f"[red]invalid configuration:[/red] {exc}")
        raise typer.Exit(2) from exc


def _logging(level: str) -> None:
    from streams.logs import configure_logging

    configure_logging(level)


@topics_app.command("create")
def topics_create() -> None:
    """Create the public topics (idempotent) with CDP_TOPIC_PARTITIONS partitions."""
    from streams.topics import ensure_topics

    created = ensure_topics(load_settings())
    _out.print(f"created: {', '.join(created) if created else 'nothing (all exist)'}")


@app.command()
def collector() -> None:
    """Serve the Segment-compatible HTTP collector on CDP_COLLECTOR_HOST:CDP_COLLECTOR_PORT."""
    settings = load_settings()
    _logging(settings.cdp_log_level)
    from sources.collector import run_collector
    from streams.topics import ensure_topics

    ensure_topics(settings)
    run_collector(settings)


@app.command()
def worker() -> None:
    """Run the Faust worker (validate, stitch, enrich). Scale out by starting more."""
    settings = load_settings()
    from streams.worker import run_worker

    run_worker(settings, loglevel=settings.cdp_log_level.lower())


@app.command()
def produce(
    path: Annotated[Path, typer.Argument(help="Segment-spec JSON lines file ('-' = stdin).")],
) -> None:
    """Send a JSONL file of Segment-spec events straight to cdp.events.raw."""
    from sources.jsonl import produce_file
    from sources.publisher import EventPublisher

    settings = load_settings()
    source = Path("/dev/stdin") if str(path) == "-" else path
    if not source.exists():
        _err.print(f"[red]no such file:[/red] {path}")
        raise typer.Exit(2)
    with EventPublisher(settings, source_id="cdpflow-produce") as publisher:
        report = produce_file(source, publisher)
    for line_no, code, message in report.problems:
        _err.print(f"line {line_no}: [yellow]{code}[/yellow] {message}")
    _out.print(
        f"lines={report.lines} delivered={report.delivered} rejected={report.rejected} "
        f"failed={report.failed} pending={report.pending}"
    )
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def generate(
    count: Annotated[int, typer.Option(help="Events to send.")] = 1000,
    users: Annotated[int, typer.Option(help="Distinct shoppers.")] = 100,
    rate: Annotated[float, typer.Option(help="Events per second; 0 = as fast as possible.")] = 0,
    seed: Annotated[int, typer.Option(help="Seed: same seed, same events.")] = 42,
    bad_ratio: Annotated[float, typer.Option(help="Share of deliberately invalid events.")] = 0.0,
    recommendations: Annotated[
        bool, typer.Option(help="Also publish recommendation lists for the shoppers.")
    ] = True,
) -> None:
    """Send realistic synthetic shoppers (identify, pages, products, carts, orders) to Kafka."""
    from sources.generator import generate_recommendations, run_generator
    from sources.publisher import EventPublisher

    settings = load_settings()
    with EventPublisher(settings, source_id="cdpflow-generate") as publisher:
        if recommendations:
            for rec in generate_recommendations(users, seed):
                publisher.publish_recommendations(**rec)
        stats = run_generator(
            publisher, count, users, rate=rate or None, seed=seed, bad_ratio=bad_ratio
        )
    _out.print(
        f"sent={stats.sent} acked={stats.acked} failed={stats.failed} "
        f"rejected(invalid, on purpose)={stats.rejected} rate={stats.events_per_s:,.0f}/s"
    )
    raise typer.Exit(0 if stats.failed == 0 else 1)


@app.command()
def recommend(
    customer_id: Annotated[str, typer.Argument(help="The customer's userId.")],
    product: Annotated[
        list[str], typer.Option("--product", "-p", help="PRODUCT_ID:SCORE, best first.")
    ],
    model_version: Annotated[str, typer.Option(help="Model that produced the list.")] = "manual",
) -> None:
    """Publish one RecommendationUpdate to cdp.recommendations.updates."""
    from sources.publisher import EventPublisher

    products: list[tuple[str, float]] = []
    for item in product:
        pid, _, score = item.rpartition(":")
        try:
            products.append((pid, float(score)))
        except ValueError:
            _err.print(f"[red]--product must be PRODUCT_ID:SCORE, got {item!r}[/red]")
            raise typer.Exit(2) from None
    with EventPublisher(load_settings(), source_id="cdpflow-recommend") as publisher:
        update_id = publisher.publish_recommendations(customer_id, products, model_version).result(
            30
        )
    _out.print(f"published update {update_id}")


@app.command()
def consume(
    topic: Annotated[str, typer.Argument(help="Topic to read, e.g. cdp.events.enriched.")],
    limit: Annotated[int, typer.Option(help="Records to print (from the end).")] = 5,
) -> None:
    """Print the last records of a cdpflow topic, decoded through the registry."""
    from streams.inspect import last_records

    settings = load_settings()
    for record in last_records(settings, topic, limit):
        _out.print_json(json.dumps(record, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


@app.command()
def status(
    worker_url: Annotated[
        str, typer.Option(help="Worker web base URL.", envvar="CDP_STATUS_WORKER_URL")
    ] = "http://127.0.0.1:6066",
    collector_url: Annotated[
        str, typer.Option(help="Collector base URL.", envvar="CDP_STATUS_COLLECTOR_URL")
    ] = "",
    watch: Annotated[bool, typer.Option(help="Refresh until Ctrl-C.")] = False,
    all_groups: Annotated[bool, typer.Option(help="Also list idle cdpflow groups.")] = False,
) -> None:
    """Stages, rates, lag and health in one table (from /metrics and the broker)."""
    from rich.live import Live

    from streams.status import render

    settings = load_settings()
    collector_url = collector_url or f"http://127.0.0.1:{settings.cdp_collector_port}"
    endpoints = {"worker": f"{worker_url}/metrics", "collector": f"{collector_url}/metrics"}
    if not watch:
        _out.print(render(settings, endpoints, all_groups=all_groups))
        return
    with Live(
        render(settings, endpoints, all_groups=all_groups), console=_out, auto_refresh=False
    ) as live:
        try:
            while True:
                live.update(render(settings, endpoints, all_groups=all_groups), refresh=True)
        except KeyboardInterrupt:
            pass


@app.command()
def demo(
    keep: Annotated[
        bool, typer.Option(help="Leave the stack, collector and worker running afterwards.")
    ] = False,
    events: Annotated[int, typer.Option(help="Generator events to send.")] = 2000,
) -> None:
    """Start everything, send a realistic burst (Segment SDK + generator + bad events), report."""
    from streams.demo import run_demo

    raise typer.Exit(run_demo(keep=keep, generated=events))


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    app()


if __name__ == "__main__":
    main()
