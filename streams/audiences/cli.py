"""``cdpflow audiences``: check the config, list current members, full re-sync to a platform."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from streams.audiences.config import (
    AllRule,
    AnyRule,
    AudienceConfigError,
    AudiencesConfig,
    EventRule,
    NotRule,
    RecommendationRule,
    TraitRule,
    ViewedRecommendedRule,
    load_config,
)
from streams.audiences.settings import AudienceSettings
from streams.settings import Settings, UnknownSettingError

audiences_app = typer.Typer(
    help="Audience definitions, current membership and full re-syncs to ad platforms.",
    no_args_is_help=True,
)
_out = Console(highlight=False, soft_wrap=True)
_err = Console(stderr=True, highlight=False, soft_wrap=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", help="Audiences YAML (default: CDP_AUDIENCES_CONFIG)."),
]


def _fail(message: str, code: int = 2) -> typer.Exit:
    _err.print(f"[red]error:[/red] {message}", markup=True)
    return typer.Exit(code)


def _config(path: Path | None) -> AudiencesConfig:
    if path is None:
        try:
            configured = AudienceSettings().config
        except ValidationError as exc:
            raise _fail(str(exc)) from exc
        if not configured:
            raise _fail("no config file: pass one or set CDP_AUDIENCES_CONFIG")
        path = Path(configured)
    try:
        return load_config(path)
    except AudienceConfigError as exc:
        _err.print(str(exc), markup=False)
        raise typer.Exit(1) from exc


def _settings() -> Settings:
    try:
        return Settings()
    except (ValidationError, UnknownSettingError) as exc:
        raise _fail(f"invalid configuration: {exc}") from exc


def _ms(ms: int) -> str:
    for unit, size in (("w", 604_800_000), ("d", 86_400_000), ("h", 3_600_000), ("m", 60_000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms / 1000:g}s"


def describe(rule: Any) -> str:
    """A one-line reading of a rule, for the validate table."""
    if isinstance(rule, AllRule):
        return "(" + " AND ".join(describe(r) for r in rule.all) + ")"
    if isinstance(rule, AnyRule):
        return "(" + " OR ".join(describe(r) for r in rule.any) + ")"
    if isinstance(rule, NotRule):
        return "NOT " + describe(rule.not_)
    if isinstance(rule, EventRule):
        c = rule.event
        text = f"{'/'.join(c.names)} x{c.min_count} in {_ms(c.within)}"
        if c.properties:
            text += " where " + ", ".join(f"{k}={v!r}" for k, v in c.properties.items())
        if c.since_last:
            text += f" since last {c.since_last}"
        return text
    if isinstance(rule, RecommendationRule):
        r = rule.recommendation
        parts = [f"category={r.category}"] if r.category is not None else []
        if r.min_score is not None:
            parts.append(f"score>={r.min_score:g}")
        return f"recommended ({', '.join(parts)}) in top {r.top_n}"
    if isinstance(rule, ViewedRecommendedRule):
        v = rule.viewed_recommended
        return f"viewed a recommended product in {_ms(v.within)}"
    if isinstance(rule, TraitRule):
        t = rule.trait
        if t.exists is not None:
            return f"trait {t.name} {'exists' if t.exists else 'absent'}"
        if t.in_ is not None:
            return f"trait {t.name} in {t.in_!r}"
        return f"trait {t.name} = {t.equals!r}"
    return type(rule).__name__


@audiences_app.command("validate")
def validate(
    file: Annotated[
        Path | None, typer.Argument(help="Audiences YAML (default: CDP_AUDIENCES_CONFIG).")
    ] = None,
) -> None:
    """Check an audiences file (errors name file and line) and print its audiences."""
    config = _config(file)
    table = Table(title=f"audiences (version {config.version}, consent {config.consent})")
    table.add_column("audience")
    table.add_column("platforms")
    table.add_column("rule")
    for audience in config.audiences:
        targets = "\n".join(f"{p}: {t}" for p, t in audience.platforms.targets().items())
        table.add_row(audience.name, targets, describe(audience.rule))
    _out.print(table)
    _out.print(
        f"ok: {len(config.audiences)} audience(s); deletion events: "
        f"{', '.join(config.deletion_events) or '-'}; longest window {_ms(config.max_window_ms)}"
    )


def _read_members(
    config: AudiencesConfig, audience_name: str, platform: str | None, worker_id: str | None
) -> tuple[dict[str, str], dict[str, list[Any]]]:
    from streams.audiences.members import ChangelogMissing, members_of, read_states

    try:
        audience = config.audience(audience_name)
    except KeyError:
        names = ", ".join(a.name for a in config.audiences)
        raise _fail(f"no audience {audience_name!r} in the config (have: {names})") from None
    targets = audience.platforms.targets()
    if platform is not None:
        if platform not in targets:
            raise _fail(f"{audience_name} has no {platform} target (has: {', '.join(targets)})")
        targets = {platform: targets[platform]}
    settings = _settings()
    try:
        with _err.status("reading the audience_state changelog..."):
            states = read_states(settings, worker_id)
    except ChangelogMissing as exc:
        raise _fail(str(exc)) from exc
    return targets, {p: members_of(states, audience_name, p) for p in targets}


WorkerOption = Annotated[
    str | None, typer.Option("--worker-id", help="Worker group (default: CDP_WORKER_ID).")
]
PlatformOption = Annotated[
    str | None, typer.Option("--platform", help="meta, google_ads or linkedin (default: all).")
]


@audiences_app.command("members")
def members(
    audience: Annotated[str, typer.Argument(help="Audience name from the config.")],
    platform: PlatformOption = None,
    config: ConfigOption = None,
    worker_id: WorkerOption = None,
    show: Annotated[int, typer.Option(help="Profile ids to list per platform.")] = 20,
) -> None:
    """Current members per platform, from the compacted audience_state changelog."""
    cfg = _config(config)
    targets, found = _read_members(cfg, audience, platform, worker_id)
    table = Table(title=f"{audience} members")
    table.add_column("platform")
    table.add_column("platform audience")
    table.add_column("members", justify="right")
    table.add_column(f"profiles (first {show})")
    for name, target in targets.items():
        listed = [m.profile_id for m in found[name][:show]]
        table.add_row(name, target, str(len(found[name])), ", ".join(listed))
    _out.print(table)


@audiences_app.command("sync")
def sync(
    audience: Annotated[str, typer.Argument(help="Audience name from the config.")],
    full: Annotated[
        bool, typer.Option("--full", help="Replace the platform audience with current members.")
    ] = False,
    platform: PlatformOption = None,
    config: ConfigOption = None,
    worker_id: WorkerOption = None,
) -> None:
    """Re-send an audience's current membership to its platforms (a new platform audience,
    or after drift). Exit 1 when a platform refused members."""
    if not full:
        raise _fail("only --full is supported (the streaming sinks send changes as they happen)")
    from sinks.audience_base import FullSyncMember
    from sinks.audience_sync import full_sync

    cfg = _config(config)
    targets, found = _read_members(cfg, audience, platform, worker_id)
    results = []
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    for name, target in targets.items():
        batch = [
            FullSyncMember(profile_id=m.profile_id, identifiers=m.identifiers) for m in found[name]
        ]
        with Progress(*columns, console=_err, transient=False) as bar:
            task = bar.add_task(f"{audience} -> {name}", total=len(batch))

            def advance(n: int, task: Any = task, bar: Progress = bar) -> None:
                bar.advance(task, n)

            try:
                outcome = full_sync(name, target, batch, advance)
                result = asyncio.run(outcome) if inspect.isawaitable(outcome) else outcome
            except Exception as exc:  # configuration or credentials: name it, stop
                raise _fail(f"{name}: {type(exc).__name__}: {exc}", 1) from exc
        results.append((name, target, result))
    table = Table(title=f"full sync of {audience}")
    for column in ("platform", "platform audience", "members", "sent", "requests", "refused"):
        table.add_column(
            column, justify="right" if column in ("members", "sent", "requests") else "left"
        )
    ok = True
    for name, target, result in results:
        refused = ", ".join(f"{k} x{v}" for k, v in result.refused.most_common()) or "-"
        ok = ok and result.ok
        table.add_row(
            name, target, str(result.members), str(result.sent), str(result.requests), refused
        )
    _out.print(table)
    raise typer.Exit(0 if ok else 1)
