"""``cdpflow stack``: run the local Kafka + registry from a shell.

Progress and errors go to stderr so that stdout carries only results, which
keeps ``eval "$(cdpflow stack env)"`` safe.
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from streams.settings import UnknownSettingError
from streams.stack import StackError
from streams.stack.manager import StackManager, StackSettings

stack_app = typer.Typer(
    name="stack",
    help="A local single-node Kafka (KRaft) and Apicurio schema registry, without Docker.",
    no_args_is_help=True,
    add_completion=False,
)

# Piped output would otherwise be cut to 80 columns, truncating addresses.
_out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
_err = Console(stderr=True, highlight=False, soft_wrap=True)


class Component(StrEnum):
    kafka = "kafka"
    registry = "registry"


def _manager() -> StackManager:
    try:
        settings = StackSettings()
    except ValidationError as exc:
        problems = "; ".join(
            (f"{'.'.join(map(str, e['loc']))}: " if e["loc"] else "") + e["msg"]
            for e in exc.errors()
        )
        _err.print(f"[red]invalid CDP_STACK_* setting:[/red] {escape(problems)}")
        raise typer.Exit(2) from exc
    except UnknownSettingError as exc:
        _err.print(f"[red]invalid CDP_STACK_* setting:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from exc
    return StackManager(settings, progress=lambda msg: _err.print(f"[dim]{escape(msg)}[/dim]"))


def _fail(exc: StackError) -> typer.Exit:
    _err.print(f"[red]error:[/red] {escape(str(exc))}")
    return typer.Exit(1)


@stack_app.command()
def up(
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Stop the stack and delete its Kafka + registry data.")
    ] = False,
    force_local: Annotated[
        bool,
        typer.Option(
            "--force-local",
            help="Start the local stack even if KAFKA_BOOTSTRAP_SERVERS/SCHEMA_REGISTRY_URL "
            "name another one.",
        ),
    ] = False,
) -> None:
    """Start Kafka and the registry (downloads them on first use); no-op if already up."""
    manager = _manager()
    t0 = time.monotonic()
    try:
        info = manager.up(fresh=fresh, force_local=force_local)
    except StackError as exc:
        raise _fail(exc) from exc
    if info.external:
        _out.print(f"Kafka:    {info.bootstrap_servers} (external, from KAFKA_BOOTSTRAP_SERVERS)")
        _out.print(f"Registry: {info.registry_url} (external, from SCHEMA_REGISTRY_URL)")
        return
    verb = f"started in {time.monotonic() - t0:.1f}s" if info.started else "already running"
    _out.print(f"Kafka {info.kafka_version}:     {info.bootstrap_servers}")
    _out.print(
        f"Apicurio {info.registry_version}: {info.registry_url} ({info.registry_storage} storage)"
    )
    _out.print(f'Stack {verb}. Use it with: eval "$(cdpflow stack env)"')


@stack_app.command()
def down() -> None:
    """Stop the processes this stack started (data is kept for the next `up`)."""
    try:
        _manager().down()
    except StackError as exc:
        raise _fail(exc) from exc


def _uptime(started_at: str) -> str:
    try:
        started = datetime.fromisoformat(started_at)
    except ValueError:
        return "?"
    secs = int((datetime.now(UTC) - started).total_seconds())
    hours, rest = divmod(max(secs, 0), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


@stack_app.command()
def status() -> None:
    """Show what runs, where, and whether it answers clients (exit 3 if not all up)."""
    manager = _manager()
    try:
        st = manager.status()
    except StackError as exc:
        raise _fail(exc) from exc
    table = Table(title=f"stack in {manager.paths.root}", title_justify="left")
    for col in ("component", "pid", "state", "address", "version", "uptime"):
        table.add_column(col, no_wrap=True)
    for c in st.components:
        if c.running and c.answering:
            state = "[green]up[/green]"
        elif c.running:
            state = "[yellow]not answering[/yellow]"
        else:
            state = "[red]down[/red]"
        table.add_row(
            c.name,
            str(c.pid or "-"),
            state,
            c.address or "-",
            c.version or "-",
            _uptime(c.started_at) if c.running else "-",
        )
    _out.print(table)
    for c in st.components:
        if c.detail:
            _out.print(f"{c.name}: {escape(c.detail)}")
        if c.log:
            _out.print(f"{c.name} log: {c.log}")
    if not st.running:
        raise typer.Exit(3)


@stack_app.command()
def env() -> None:
    """Print eval-able exports for the running stack (and nothing else on stdout)."""
    try:
        values = _manager().env()
    except StackError as exc:
        raise _fail(exc) from exc
    for key, value in values.items():
        print(f"export {key}={value}")


def _print_tail(path: Path, lines: int) -> int:
    """Print the last ``lines`` lines; return the file offset reached."""
    if not path.exists():
        _err.print(f"{path} does not exist yet (start the stack with `cdpflow stack up`)")
        return 0
    data = path.read_bytes()
    text = data.decode(errors="replace")
    tail = text.splitlines()[-lines:] if lines > 0 else []
    for line in tail:
        print(line)
    return len(data)


@stack_app.command()
def logs(
    component: Annotated[Component, typer.Argument(help="Which server's log.")] = Component.kafka,
    lines: Annotated[int, typer.Option("--lines", "-n", help="Lines from the end.")] = 50,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing.")] = False,
) -> None:
    """Show a server's log (logs/kafka.log or logs/registry.log in the stack dir)."""
    manager = _manager()
    try:
        path = manager.log_path(component.value)
    except StackError as exc:
        raise _fail(exc) from exc
    offset = _print_tail(path, lines)
    if not follow:
        return
    try:
        while True:
            time.sleep(0.5)
            if not path.exists():
                continue
            size = path.stat().st_size
            if size < offset:  # rotated by a restart
                offset = 0
            if size > offset:
                with path.open("rb") as fh:
                    fh.seek(offset)
                    chunk = fh.read()
                offset += len(chunk)
                print(chunk.decode(errors="replace"), end="", flush=True)
    except KeyboardInterrupt:
        return


if __name__ == "__main__":
    stack_app()
