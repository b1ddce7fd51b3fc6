"""``cdpflow export`` and ``cdpflow profile``: analytics access from the command line.

Mount with :func:`register` (``register(app)`` in ``streams/cli.py``). The
library functions underneath (:func:`export_topic`, :func:`profile_from_api`,
:func:`profile_from_topic`, :func:`audience_memberships`) are usable without
the CLI.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final
from urllib.parse import quote

import orjson
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from streams import topics
from streams.settings import Settings, UnknownSettingError

if TYPE_CHECKING:  # pandas, pyarrow and faust make `cdpflow --help` seconds slower
    import pyarrow as pa  # type: ignore[import-untyped]

    from streams.analytics import RawRecord, TopicScan

#: streams.identity.agents.ANON_PREFIX, without importing the Faust topology.
ANON_PREFIX: Final = "anon:"
DEFAULT_CHUNK_SIZE: Final = 50_000  # streams.analytics.DEFAULT_CHUNK_SIZE

_out = Console(highlight=False, soft_wrap=True)
_err = Console(stderr=True, highlight=False, soft_wrap=True)

#: Fields that name the audience in an audience update (its schema is not pinned yet).
_AUDIENCE_FIELDS: Final = ("audienceId", "audience", "audienceName", "segmentId", "segment")


class ExportFormat(StrEnum):
    parquet = "parquet"
    csv = "csv"
    jsonl = "jsonl"


# --------------------------------------------------------------------------- export


@dataclass(frozen=True)
class ExportResult:
    path: Path
    records: int
    skipped: int
    bytes_read: int
    file_bytes: int
    seconds: float

    @property
    def records_per_s(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0


def jsonable(value: Any) -> Any:
    """orjson ``default`` for exports: bytes as base64 text."""
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _json_text(value: Any) -> str:
    return orjson.dumps(value, default=jsonable).decode()


def _to_text_columns(table: pa.Table) -> pa.Table:
    """What CSV cannot hold natively (lists, maps, bytes) as JSON / base64 text."""
    import pyarrow as pa

    for i, f in enumerate(table.schema):
        t = f.type
        if pa.types.is_list(t) or pa.types.is_map(t) or pa.types.is_struct(t):
            values = table.column(i).to_pylist(maps_as_pydicts="strict")
            text = [
                None if v is None else orjson.dumps(v, default=jsonable).decode() for v in values
            ]
        elif pa.types.is_binary(t) or pa.types.is_fixed_size_binary(t):
            text = [None if v is None else jsonable(v) for v in table.column(i).to_pylist()]
        else:
            continue
        table = table.set_column(i, pa.field(f.name, pa.string()), pa.array(text, pa.string()))
    return table


def _json_lines(table: pa.Table, json_paths: Iterable[tuple[str, ...]]) -> Iterator[bytes]:
    """Nested rows as JSON; JSON text fields embedded as JSON, not as escaped strings."""
    paths = list(json_paths)
    for row in table.to_pylist(maps_as_pydicts="strict"):
        for path in paths:
            parent: Any = row
            for part in path[:-1]:
                parent = parent.get(part) if isinstance(parent, dict) else None
            if isinstance(parent, dict) and isinstance(parent.get(path[-1]), str):
                parent[path[-1]] = orjson.Fragment(parent[path[-1]])
        yield orjson.dumps(
            row, default=jsonable, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_UTC_Z
        )


def export_topic(
    scan: TopicScan,
    out: Path,
    fmt: ExportFormat,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    compression: str = "zstd",
    progress: Callable[[int, int], None] | None = None,
) -> ExportResult:
    """Write a scan to ``out`` chunk by chunk; the file appears only once complete.

    Parquet and CSV get the flat columns (dotted names, JSON fields as JSON text,
    which keeps a fixed schema whatever keys events carry); Parquet's Arrow
    schema comes from the Avro schema, with each field's doc and a
    ``cdpflow.json`` flag on JSON text columns. JSONL keeps the Avro nesting.
    """
    import pyarrow.csv as pa_csv  # type: ignore[import-untyped]
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    started = time.perf_counter()
    partial = out.with_name(out.name + ".partial")
    written = 0
    schema = scan.schema
    try:
        if fmt is ExportFormat.parquet:
            with pq.ParquetWriter(partial, schema.flat, compression=compression) as writer:
                for table in scan.tables(chunk_size, progress):
                    writer.write_table(table)
                    written += table.num_rows
        elif fmt is ExportFormat.csv:
            csv_schema = _to_text_columns(schema.flat.empty_table()).schema
            with pa_csv.CSVWriter(partial, csv_schema) as writer:
                for table in scan.tables(chunk_size, progress):
                    writer.write_table(_to_text_columns(table))
                    written += table.num_rows
        else:
            with open(partial, "wb") as fh:
                for table in scan.nested_tables(chunk_size, progress):
                    fh.writelines(_json_lines(table, schema.json_paths))
                    written += table.num_rows
        os.replace(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return ExportResult(
        path=out,
        records=written,
        skipped=scan.skipped,
        bytes_read=scan.bytes_read,
        file_bytes=out.stat().st_size,
        seconds=time.perf_counter() - started,
    )


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} GB"


class _ExportProgress:
    """Records against the plan's total; bytes against an estimate from the average so far."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.total = total
        self.records = 0
        self.bytes = 0
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("records · {task.fields[size]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=_err,
            disable=not enabled,
        )
        self.task: TaskID = self.bar.add_task(label, total=max(total, 1), size="0 B")

    def __call__(self, records: int, nbytes: int) -> None:
        self.records += records
        self.bytes += nbytes
        estimate = self.bytes / self.records * self.total if self.records else 0
        size = f"{_size(self.bytes)} of ~{_size(max(estimate, self.bytes))}"
        self.bar.update(self.task, completed=self.records, size=size)


def _load_settings() -> Settings:
    try:
        return Settings()
    except (ValidationError, UnknownSettingError) as exc:
        _err.print(f"[red]invalid configuration:[/red] {exc}")
        raise typer.Exit(2) from exc


def _format_for(out: Path, fmt: ExportFormat | None) -> ExportFormat:
    if fmt is not None:
        return fmt
    suffix = out.suffix.lower().lstrip(".")
    if suffix in ("csv", "jsonl"):
        return ExportFormat(suffix)
    if suffix in ("json", "ndjson"):
        return ExportFormat.jsonl
    return ExportFormat.parquet


def export(
    topic: Annotated[
        str, typer.Argument(help="cdp.events.enriched, cdp.events.dlq, cdp.recommendations...")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="File to write.")],
    since: Annotated[
        str | None,
        typer.Option(help="Start (inclusive): ISO-8601 (UTC if no offset), -2h, 7d, now."),
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="End (exclusive); default: the end of the topic now.")
    ] = None,
    last: Annotated[
        int | None, typer.Option(help="Instead of a time range: the N newest records.")
    ] = None,
    fmt: Annotated[
        ExportFormat | None,
        typer.Option("--format", "-f", help="Default: from --out's suffix, else parquet."),
    ] = None,
    chunk_size: Annotated[int, typer.Option(help="Records per chunk (bounds memory).")] = (
        DEFAULT_CHUNK_SIZE
    ),
    skip_undecodable: Annotated[
        bool, typer.Option(help="Skip records that do not decode instead of failing.")
    ] = False,
    compression: Annotated[str, typer.Option(help="Parquet codec.")] = "zstd",
) -> None:
    """Export a topic's records for a time range to Parquet, CSV or JSON lines.

    Reads a snapshot (up to the end of the topic at start), without joining or
    committing any consumer group.
    """
    from streams.analytics import AnalyticsError, TopicScan

    settings = _load_settings()
    fmt = _format_for(out, fmt)
    try:
        scan = TopicScan(
            topic,
            since=since,
            until=until,
            last=last,
            settings=settings,
            errors="skip" if skip_undecodable else "raise",
        )
        scan.schema  # noqa: B018 - fail before the progress bar on an unknown schema
        total = scan.plan.expected_records
        bar = _ExportProgress(total, f"{topic} → {out.name}", _err.is_terminal)
        with bar.bar:
            result = export_topic(
                scan, out, fmt, chunk_size=chunk_size, compression=compression, progress=bar
            )
    except AnalyticsError as exc:
        _err.print(f"[red]export failed:[/red] {exc}")
        raise typer.Exit(1) from exc
    _out.print(
        f"wrote {result.records:,} records to {result.path} ({fmt}, {_size(result.file_bytes)}) "
        f"in {result.seconds:.1f}s: {result.records_per_s:,.0f} records/s, "
        f"{_size(result.bytes_read)} read"
        + (f", {result.skipped:,} undecodable skipped" if result.skipped else "")
    )


# --------------------------------------------------------------------------- profile


def _iso(ms: Any) -> str | None:
    if not isinstance(ms, int):
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _partition_for(key: str, partitions: int) -> int:
    """The partition a cdpflow producer (murmur2, like Java clients) puts ``key`` in."""
    from aiokafka.partitioner import murmur2

    return int((murmur2(key.encode()) & 0x7FFFFFFF) % partitions)


class ProfileApiError(RuntimeError):
    """The worker API could not answer (unreachable, refused, misconfigured)."""


def profile_from_api(
    url: str, token: str, profile_id: str, timeout_s: float = 10.0
) -> dict[str, Any] | None:
    """The worker's ``GET /profiles/{id}``; None for 404."""
    import httpx

    endpoint = f"{url.rstrip('/')}/profiles/{quote(profile_id, safe='')}"
    try:
        resp = httpx.get(endpoint, headers={"Authorization": f"Bearer {token}"}, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise ProfileApiError(f"worker API {url} unreachable: {exc}") from exc
    if resp.status_code == 404:
        return None
    if resp.status_code != 200:
        raise ProfileApiError(f"worker API {url} answered {resp.status_code}: {resp.text[:200]}")
    body = resp.json()
    if not isinstance(body, dict):
        raise ProfileApiError(f"worker API {url} answered an unexpected body")
    return body


def _mentions(record: dict[str, Any], requested: str, anon: str) -> bool:
    event = record["event"]
    return (
        record["profileId"] in (requested, ANON_PREFIX + anon)
        or event.get("userId") == requested
        or event.get("anonymousId") == anon
        or (event.get("type") == "alias" and event.get("previousId") == anon)
    )


def _by_time(record: dict[str, Any]) -> tuple[int, int, int]:
    k = record["kafka"]
    return (k["timestamp"] or 0, k["partition"], k["offset"])


def _contains(tokens: Iterable[str]) -> Callable[[RawRecord], bool]:
    needles = [t.encode() for t in tokens if t]

    def match(rec: RawRecord) -> bool:
        value = rec.value or b""
        return any(n in value for n in needles)

    return match


def profile_from_topic(
    profile_id: str, settings: Settings, *, since: str | None = None
) -> dict[str, Any] | None:
    """A profile as of its latest enriched event, found by scanning the topic.

    Without a worker the tables are not reachable, but every enriched event
    carries its profile's traits snapshot and recommendations. Pass 1 reads the
    whole range (or from ``since``) and decodes only values containing the id's
    bytes, to find which profile the id belongs to now; pass 2 reads that
    profile's partition (the topic is keyed by profile id) for its events.
    """
    from streams.analytics import TopicScan, loads_json

    anon = profile_id[len(ANON_PREFIX) :] if profile_id.startswith(ANON_PREFIX) else profile_id
    first = TopicScan(topics.EVENTS_ENRICHED, since=since, settings=settings, errors="skip")
    matched = [
        r
        for r in first.records(match=_contains({profile_id, anon}))
        if _mentions(r, profile_id, anon)
    ]
    scanned = first.records_read
    if not matched:
        return None
    linked = [r for r in matched if not r["profileId"].startswith(ANON_PREFIX)]
    if linked:
        canonical = max(linked, key=_by_time)["profileId"]
    elif profile_id.startswith(ANON_PREFIX):
        canonical = profile_id
    else:
        canonical = max(matched, key=_by_time)["profileId"]
    records = [r for r in matched if r["profileId"] == canonical]
    if canonical not in (profile_id, anon):
        # Events of the profile that do not mention the requested id (other devices).
        partition = _partition_for(canonical, len(first.plan.ranges))
        for parts in ([partition], None):
            second = TopicScan(
                topics.EVENTS_ENRICHED,
                since=since,
                partitions=parts,
                settings=settings,
                errors="skip",
            )
            found = [
                r
                for r in second.records(match=_contains({canonical}))
                if r["profileId"] == canonical
            ]
            scanned += second.records_read
            if found:
                records = found
                break
    latest = max(records, key=_by_time)
    anonymous = {r["event"]["anonymousId"] for r in records if r["event"].get("anonymousId")}
    anonymous |= {
        r["event"]["previousId"]
        for r in records
        if r["event"].get("type") == "alias" and r["event"].get("previousId")
    }
    if canonical.startswith(ANON_PREFIX):
        anonymous.add(canonical[len(ANON_PREFIX) :])
    anonymous.discard(canonical)
    kafka = latest["kafka"]
    return {
        "profileId": canonical,
        "requestedId": profile_id,
        "identities": {
            "userId": None if canonical.startswith(ANON_PREFIX) else canonical,
            "anonymousIds": sorted(anonymous),
        },
        "traits": loads_json(latest["profileTraits"] or "{}"),
        "recommendations": {
            "products": latest["recommendations"],
            "modelVersion": latest["recommendationsModelVersion"],
            "generatedAt": _iso(latest["recommendationsGeneratedAt"]),
            "updateId": None,
        },
        "asOf": {
            "partition": kafka["partition"],
            "offset": kafka["offset"],
            "timestamp": _iso(kafka["timestamp"]),
            "messageId": latest["event"]["messageId"],
        },
        "recordsScanned": scanned,
        "eventsOfProfile": len(records),
    }


def audience_memberships(
    ids: Iterable[str], settings: Settings, *, since: str | None = None
) -> list[dict[str, Any]]:
    """The latest ``cdp.audiences.updates`` record per audience for any of ``ids``.

    Best effort while the audiences schema is not pinned: a record belongs to
    the profile when its key, or any top-level text field, is one of the ids.
    """
    from streams.analytics import TopicScan

    wanted = {i for i in ids if i}
    keys = {i.encode() for i in wanted}
    bytes_match = _contains(wanted)
    scan = TopicScan(topics.AUDIENCES_UPDATES, since=since, settings=settings, errors="skip")
    if scan.plan.max_records == 0:
        return []

    def match(rec: RawRecord) -> bool:
        return rec.key in keys or bytes_match(rec)

    latest: dict[str, dict[str, Any]] = {}
    for record in scan.records(match=match):
        top = {k: v for k, v in record.items() if k != "kafka"}
        if record["kafka"]["key"] not in wanted and not any(v in wanted for v in top.values()):
            continue
        name = next((str(top[f]) for f in _AUDIENCE_FIELDS if top.get(f) is not None), "?")
        if name not in latest or _by_time(record) >= _by_time(latest[name]):
            latest[name] = record
    return [
        {
            "audience": name,
            "at": _iso(r["kafka"]["timestamp"]),
            **{k: v for k, v in r.items() if k != "kafka" and not isinstance(v, dict | list)},
        }
        for name, r in sorted(latest.items())
    ]


def _print_profile(view: dict[str, Any], source: str) -> None:
    ids = view["identities"]
    _out.print(f"[bold]profile[/bold] {view['profileId']}  (asked for {view['requestedId']})")
    _out.print(f"source: {source}")
    _out.print(
        f"userId: {ids.get('userId') or '-'}   "
        f"anonymousIds: {', '.join(ids.get('anonymousIds') or []) or '-'}"
    )
    _out.print("[bold]traits[/bold]")
    _out.print_json(orjson.dumps(view.get("traits") or {}, default=jsonable).decode())
    recs = view.get("recommendations") or {}
    products = recs.get("products") or []
    _out.print(
        f"[bold]recommendations[/bold] ({len(products)}; model "
        f"{recs.get('modelVersion') or '-'}, generated {recs.get('generatedAt') or '-'})"
    )
    if products:
        table = Table("rank", "productId", "score", "reason", "category")
        for p in products:
            table.add_row(
                str(p.get("rank")),
                str(p.get("productId")),
                f"{p.get('score', 0):.3f}",
                str(p.get("reason") or ""),
                str(p.get("category") or ""),
            )
        _out.print(table)
    audiences = view.get("audiences") or []
    _out.print(f"[bold]audiences[/bold] ({len(audiences)}, from {topics.AUDIENCES_UPDATES})")
    for a in audiences:
        rest = {k: v for k, v in a.items() if k not in ("audience", "at")}
        _out.print(
            f"  {a['audience']} at {a['at']}: {orjson.dumps(rest, default=jsonable).decode()}"
        )


def profile(
    profile_id: Annotated[
        str, typer.Argument(help="userId, anon:<anonymousId> or a bare anonymousId.")
    ],
    worker_url: Annotated[
        str | None,
        typer.Option(help="Worker web URL; default CDP_PROFILE_API_URL. Unset: scan the topic."),
    ] = None,
    scan: Annotated[
        bool, typer.Option("--scan", help="Scan cdp.events.enriched even if a worker is set.")
    ] = False,
    since: Annotated[
        str | None, typer.Option(help="Bound the topic scans (ISO-8601 or -7d...).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print a profile's stitched identities, traits, recommendations and audiences.

    From the worker's profile API (CDP_PROFILE_API_URL + CDP_PROFILE_API_TOKEN)
    when configured, else from the latest enriched event of the profile.
    """
    from streams.analytics import AnalyticsError
    from streams.profiles.api import ProfileApiSettings

    settings = _load_settings()
    try:
        api = ProfileApiSettings()
    except (ValidationError, UnknownSettingError) as exc:
        _err.print(f"[red]invalid configuration:[/red] {exc}")
        raise typer.Exit(2) from exc
    url = None if scan else (worker_url or api.url)
    try:
        if url:
            token = api.token.get_secret_value()
            if not token:
                _err.print("[red]CDP_PROFILE_API_TOKEN is not set (needed for the worker API)")
                raise typer.Exit(2)
            view = profile_from_api(url, token, profile_id, api.timeout_s)
            source = f"worker API {url} (live tables, served by {view and view.get('servedBy')})"
        else:
            view = profile_from_topic(profile_id, settings, since=since)
            source = (
                f"scan of {topics.EVENTS_ENRICHED}: latest event of the profile "
                f"({view['asOf']['timestamp']}, partition {view['asOf']['partition']} "
                f"offset {view['asOf']['offset']}; {view['recordsScanned']:,} records read)"
                if view
                else f"scan of {topics.EVENTS_ENRICHED}"
            )
        if view is None:
            _err.print(f"no profile for {profile_id!r} ({source})")
            raise typer.Exit(1)
        ids = {view["profileId"], *view["identities"]["anonymousIds"]}
        ids |= {ANON_PREFIX + a for a in view["identities"]["anonymousIds"]}
        view["audiences"] = audience_memberships(ids, settings, since=since)
    except (AnalyticsError, ProfileApiError) as exc:
        _err.print(f"[red]profile lookup failed:[/red] {exc}")
        raise typer.Exit(1) from exc
    view["source"] = source
    if as_json:
        _out.print_json(orjson.dumps(view, default=jsonable).decode())
    else:
        _print_profile(view, source)


def register(app: typer.Typer) -> None:
    """Mount ``export`` and ``profile`` on the ``cdpflow`` app."""
    app.command("export")(export)
    app.command("profile")(profile)


__all__ = [
    "ExportFormat",
    "ExportResult",
    "ProfileApiError",
    "audience_memberships",
    "export",
    "export_topic",
    "profile",
    "profile_from_api",
    "profile_from_topic",
    "register",
]
