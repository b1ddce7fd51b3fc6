"""Rendering the results: a markdown table for the terminal and the JSON document."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sinks.bench import render_destinations_table

SCENARIO_LABELS: dict[str, str] = {
    "a": "(a) cdpflow worker, 1 process",
    "b": "(b) bare confluent-kafka loop",
    "c": "(c) Quix Streams app",
    "d": "(d) cdpflow worker, 2 processes",
}


def _num(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int | float):
        return f"{value:,.{digits}f}"
    return str(value)


def ratio(results: dict[str, Any], top: str, bottom: str) -> float | None:
    """Throughput ratio top/bottom of two scenarios of the same run (None if either is missing)."""
    scenarios = results.get("scenarios", {})
    a, b = scenarios.get(top), scenarios.get(bottom)
    if not a or not b or a.get("error") or b.get("error"):
        return None
    x, y = a.get("events_per_s"), b.get("events_per_s")
    if not x or not y:
        return None
    return float(x) / float(y)


def ratios(results: dict[str, Any]) -> dict[str, float | None]:
    return {
        "a/b": ratio(results, "a", "b"),
        "a/c": ratio(results, "a", "c"),
        "d/a": ratio(results, "d", "a"),
    }


def targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Where we stand against the issue's targets (nothing here is hard-coded to pass)."""
    r = ratios(results)
    a = results.get("scenarios", {}).get("a") or {}
    p99 = a.get("latency_p99_ms")

    def verdict(value: float | None, ok: bool) -> str:
        return "n/a" if value is None else ("met" if ok else "NOT met")

    return {
        "(a) >= 1.2x (c) throughput": {
            "value": r["a/c"],
            "status": verdict(r["a/c"], (r["a/c"] or 0) >= 1.2),
        },
        "(a) >= 0.8x (b) throughput": {
            "value": r["a/b"],
            "status": verdict(r["a/b"], (r["a/b"] or 0) >= 0.8),
        },
        "(a) p99 < 50 ms at the fixed rate": {
            "value": p99,
            "status": verdict(p99, p99 is not None and p99 < 50),
        },
    }


def render_markdown(results: dict[str, Any]) -> str:
    lines: list[str] = []
    cfg = results.get("config", {})
    rate = results.get("latency_rate")
    lines.append(
        f"## cdpflow bench — {cfg.get('events', '?'):,} events, {cfg.get('users', '?'):,} users, "
        f"seed {cfg.get('seed', '?')}, {cfg.get('partitions', '?')} partitions"
    )
    lines.append("")
    lines.append(
        "| scenario | procs | events measured | events/s | CPU s / 10k ev | "
        "broker CPU s / 10k ev | peak RSS MiB | latency p50 ms | "
        f"latency p99 ms (at {_num(rate)} ev/s) |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    overloaded: list[str] = []
    for name, res in results.get("scenarios", {}).items():
        label = SCENARIO_LABELS.get(name, name)
        if res.get("error"):
            lines.append(f"| {label} | - | failed: {res['error'][:80]} | | | | | | |")
            continue
        eps = res.get("events_per_s")
        if rate and eps and rate > eps and res.get("latency_p99_ms") is not None:
            overloaded.append(label)
        lines.append(
            f"| {label} | {res.get('processes', '-')} | {_num(res.get('outputs'))} | "
            f"{_num(eps)} | "
            f"{_num(res.get('cpu_s_per_10k'), 2)} | {_num(res.get('broker_cpu_s_per_10k'), 2)} | "
            f"{_num(res.get('peak_rss_mib'))} | {_num(res.get('latency_p50_ms'), 1)} | "
            f"{_num(res.get('latency_p99_ms'), 1)} |"
        )
    if overloaded:
        lines.append("")
        lines.append(
            f"The fixed rate ({_num(rate)} ev/s) is above the throughput of "
            + ", ".join(overloaded)
            + ": their latency is the queue that builds up over the paced window."
        )
    col = results.get("collector")
    if col:
        lines.append("")
        if col.get("error"):
            lines.append(f"Collector: failed: {col['error']}")
        else:
            lines.append(
                f"Collector (`/v1/batch`, 100 events per batch, {col.get('connections')} "
                f"connections, {_num(col.get('duration_s'), 0)} s): "
                f"**{_num(col.get('accepted_per_s'))} accepted events/s**, "
                f"request p50 {_num(col.get('request_p50_ms'), 1)} ms / "
                f"p99 {_num(col.get('request_p99_ms'), 1)} ms, "
                f"CPU {_num(col.get('cpu_s_per_10k'), 2)} s / 10k ev, "
                f"peak RSS {_num(col.get('peak_rss_mib'))} MiB"
            )
    sinks = results.get("sinks")
    if sinks:
        lines += ["", render_destinations_table(sinks)]
    lines.append("")
    r = ratios(results)
    lines.append(
        "Ratios (throughput, same run): " + ", ".join(f"{k} = {_num(v, 2)}" for k, v in r.items())
    )
    lines.append("")
    lines.append("| target | value | status |")
    lines.append("|---|---:|---|")
    for target, t in targets(results).items():
        lines.append(f"| {target} | {_num(t['value'], 2)} | {t['status']} |")
    m = results.get("machine", {})
    lines.append("")
    lines.append(
        f"Machine: {m.get('cores')} cores ({m.get('cpu_model', '?')}), "
        f"{_num(m.get('memory_gib'), 1)} GiB; load average before "
        f"{m.get('load_before')} / after {m.get('load_after')}"
    )
    v = results.get("versions", {})
    lines.append("Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()))
    notes = results.get("notes") or []
    for note in notes:
        lines.append(f"* {note}")
    if "total_s" in results:
        lines.append(f"Bench wall time: {results['total_s']:.0f} s")
    return "\n".join(lines)


def write_json(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {**results, "ratios": ratios(results), "targets": targets(results)}
    path.write_text(json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n")
