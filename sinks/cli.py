"""``cdpflow sink`` and ``cdpflow dlq``: run destinations, read and replay their dead letters.

``streams.cli`` mounts :data:`sink_app` and :data:`dlq_app`; ``python -m sinks.cli
sink run --all`` works on its own too (tests and the demo start sinks that way).
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from streams.settings import Settings, UnknownSettingError

sink_app = typer.Typer(
    help="Deliver cdp.events.enriched to destinations (Segment, Mixpanel, ...).",
    no_args_is_help=True,
)
dlq_app = typer.Typer(help="Inspect and replay a destination's dead letters.", no_args_is_help=True)

_out = Console(highlight=False, soft_wrap=True)
_err = Console(stderr=True, highlight=False, soft_wrap=True)

EXIT_CONFIG = 2


def _settings() -> Settings:
    try:
        return Settings()
    except (ValidationError, UnknownSettingError) as exc:
        _err.print(f"[red]invalid configuration:[/red] {exc}")
        raise typer.Exit(EXIT_CONFIG) from exc


def _logging(settings: Settings) -> None:
    from streams.logs import configure_logging

    configure_logging(settings.cdp_log_level)


def _configs(names: list[str] | None) -> Any:
    from sinks.engine import load_destinations
    from sinks.registry import UnknownDestination

    try:
        return load_destinations(names)
    except (UnknownSettingError, UnknownDestination, ValueError) as exc:
        _err.print(f"[red]invalid configuration:[/red] {exc}")
        raise typer.Exit(EXIT_CONFIG) from exc


def _one_destination(name: str) -> Any:
    configs = _configs([name])
    config = configs[0]
    if config.destination is None:
        _err.print(f"[red]{config.name}: {config.problem}[/red]")
        raise typer.Exit(EXIT_CONFIG)
    return config.destination


# --------------------------------------------------------------------------- sink


@sink_app.command("run")
def sink_run(
    destinations: Annotated[
        list[str] | None, typer.Argument(help="Destination name(s), e.g. segment mixpanel.")
    ] = None,
    all_: Annotated[
        bool, typer.Option("--all", help="Every configured destination, in one process.")
    ] = False,
) -> None:
    """Consume cdp.events.enriched and deliver it, until SIGTERM/SIGINT.

    Each destination has its own consumer group (cdpflow-sink-<name>), so a slow
    one never holds back another. With --all, destinations that are not
    configured are left out (and said why); a named one must be configured.
    """
    settings = _settings()
    _logging(settings)
    if bool(destinations) == all_:
        _err.print("[red]name one or more destinations, or pass --all[/red]")
        raise typer.Exit(EXIT_CONFIG)
    from sinks.engine import SinkEngineSettings, run_forever

    configs = _configs(destinations if not all_ else None)
    runnable = []
    for config in configs:
        if config.destination is not None:
            runnable.append(config.destination)
        elif config.invalid or not all_:
            _err.print(f"[red]{config.name}: {config.problem}[/red]")
            raise typer.Exit(EXIT_CONFIG)
        else:
            _err.print(f"[yellow]{config.name}: not started: {config.problem}[/yellow]")
    if not runnable:
        _err.print("[red]no destination is configured (see `cdpflow sink list`)[/red]")
        raise typer.Exit(EXIT_CONFIG)
    try:
        engine = SinkEngineSettings()
    except ValidationError as exc:
        _err.print(f"[red]invalid configuration:[/red] {exc}")
        raise typer.Exit(EXIT_CONFIG) from exc
    _err.print(f"starting sinks: {', '.join(d.name for d in runnable)}")
    raise typer.Exit(run_forever(runnable, settings, engine))


@sink_app.command("list")
def sink_list() -> None:
    """Registered destinations and whether they are configured."""
    _settings()
    table = Table(title="destinations")
    table.add_column("destination")
    table.add_column("status")
    table.add_column("consumer group")
    from sinks.engine import SinkEngineSettings

    prefix = SinkEngineSettings().group_prefix
    for config in _configs(None):
        status = "[green]configured[/green]" if config.destination else f"[yellow]{config.problem}"
        table.add_row(config.name, status, f"{prefix}{config.name}")
    _out.print(table)


# --------------------------------------------------------------------------- dlq

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_time(value: str | None, option: str) -> int | None:
    """ISO-8601 (naive = UTC), ``now``, or a look-back like ``90m`` / ``2h`` / ``7d``."""
    if value is None:
        return None
    text = value.strip()
    now = datetime.now(UTC)
    if text.lower() == "now":
        return int(now.timestamp() * 1000)
    match = _RELATIVE.match(text.lower())
    if match:
        delta = timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
        return int((now - delta).timestamp() * 1000)
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        _err.print(f"[red]{option}: {value!r} is not ISO-8601, 'now' or like '2h'[/red]")
        raise typer.Exit(EXIT_CONFIG) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def _when(value: Any) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, int):
        return datetime.fromtimestamp(value / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
    return "-"


def _summary(record: dict[str, Any]) -> str:
    what = record.get("eventType") or "?"
    if record.get("eventName"):
        what += f" {record['eventName']!r}"
    message = str(record.get("message") or "")
    if record.get("replayOf"):
        message += f" (replay of {record['replayOf']})"
    return f"{what}: {message}"[:160]


@dlq_app.command("show")
def dlq_show(
    destination: Annotated[str, typer.Argument(help="Destination name, e.g. segment.")],
    limit: Annotated[int, typer.Option(help="Most recent dead letters to print.")] = 50,
    since: Annotated[str | None, typer.Option(help="ISO-8601, 'now' or e.g. '2h'.")] = None,
    until: Annotated[str | None, typer.Option(help="ISO-8601, 'now' or e.g. '10m'.")] = None,
    reason: Annotated[str | None, typer.Option(help="Only this reason code.")] = None,
) -> None:
    """Print cdp.sink.dlq.<destination> readably: time, reason, status, messageId, summary."""
    from sinks import registry
    from sinks.dlq import DlqCodec, dlq_bounds, read_dead_letters
    from streams.serde import AvroSerde
    from streams.topics import sink_dlq_topic

    settings = _settings()
    try:
        name = registry.get(destination).name
    except registry.UnknownDestination as exc:
        _err.print(f"[red]{exc.args[0]}[/red]")
        raise typer.Exit(EXIT_CONFIG) from None
    since_ms, until_ms = parse_time(since, "--since"), parse_time(until, "--until")
    bounds = dlq_bounds(settings, name, since_ms, until_ms)
    if since_ms is None:  # only the tail: the last `limit` per partition is enough
        bounds = {p: (max(lo, hi - limit), hi) for p, (lo, hi) in bounds.items()}
    codec = DlqCodec(AvroSerde.from_url(settings.schema_registry_url))
    entries = [
        e
        for e in read_dead_letters(settings, codec, name, bounds)
        if reason is None or e.record["reasonCode"] == reason
    ]
    entries.sort(key=lambda e: (_when(e.record["failedAt"]), e.partition, e.offset))
    shown = entries[-limit:]
    table = Table(title=f"{sink_dlq_topic(name)}: {len(shown)} of {len(entries)} dead letters")
    for column in ("time (UTC)", "reason", "status", "messageId", "summary", "at"):
        table.add_column(column, overflow="fold")
    for e in shown:
        r = e.record
        table.add_row(
            _when(r["failedAt"]),
            r["reasonCode"],
            str(r["responseStatus"]) if r.get("responseStatus") is not None else "-",
            r.get("messageId") or "-",
            _summary(r),
            e.ref,
        )
    _out.print(table)
    counts = Counter(e.record["reasonCode"] for e in entries)
    if counts:
        _out.print("by reason: " + ", ".join(f"{k} x{v}" for k, v in counts.most_common()))


@dlq_app.command("replay")
def dlq_replay(
    destination: Annotated[str, typer.Argument(help="Destination name, e.g. segment.")],
    since: Annotated[str | None, typer.Option(help="ISO-8601, 'now' or e.g. '2h'.")] = None,
    until: Annotated[str | None, typer.Option(help="ISO-8601, 'now' or e.g. '10m'.")] = None,
    reason: Annotated[str | None, typer.Option(help="Only this reason code.")] = None,
) -> None:
    """Re-deliver dead letters through the destination (re-map and re-send the originals).

    Still failing ones are dead-lettered again as new records (replayOf points to
    the old one). Exit code 0 when nothing is still failing, 1 otherwise.
    """
    from sinks.engine import SinkEngineSettings
    from sinks.replay import replay_dead_letters

    settings = _settings()
    _logging(settings)
    dest = _one_destination(destination)
    since_ms, until_ms = parse_time(since, "--since"), parse_time(until, "--until")
    if until_ms is None:
        until_ms = parse_time("now", "--until")
    columns = (
        TextColumn("[bold]replay {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=_err, transient=False) as bar:
        task = bar.add_task(dest.name, total=None)
        summary = asyncio.run(
            replay_dead_letters(
                dest,
                settings=settings,
                since_ms=since_ms,
                until_ms=until_ms,
                reason=reason,
                engine=SinkEngineSettings(),
                on_total=lambda n: bar.update(task, total=n),
                progress=lambda n: bar.advance(task, n),
            )
        )
    table = Table(title=f"replay of {dest.name} dead letters")
    table.add_column("outcome")
    table.add_column("events", justify="right")
    table.add_column("detail")
    table.add_row("read", str(summary.total), "")
    table.add_row("[green]delivered", str(summary.delivered), "")
    table.add_row(
        "[red]still failing (dead-lettered again)",
        str(summary.dead_lettered),
        ", ".join(f"{k} x{v}" for k, v in summary.still_failing.most_common()),
    )
    table.add_row(
        "skipped (routing/consent)",
        str(summary.skipped),
        ", ".join(f"{k} x{v}" for k, v in summary.skipped_reasons.most_common()),
    )
    _out.print(table)
    _out.print(
        f"delivered={summary.delivered} still_failing={summary.dead_lettered} "
        f"skipped={summary.skipped} read={summary.total}"
    )
    raise typer.Exit(0 if summary.dead_lettered == 0 else 1)


# --------------------------------------------------------------------------- standalone

main_app = typer.Typer(no_args_is_help=True, add_completion=False)
main_app.add_typer(sink_app, name="sink")
main_app.add_typer(dlq_app, name="dlq")


def main() -> None:
    main_app()


if __name__ == "__main__":
    sys.exit(main())  # type: ignore[func-returns-value]
