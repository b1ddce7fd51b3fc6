"""``make bench``: cdpflow's worker against the Python reference loop and Quix Streams.

On a dedicated local stack (``.bench/stack``, its own ports, wiped at start,
stopped at the end; downloads shared with ``.stack/cache``) this builds a fixed
corpus of ``CDP_BENCH_EVENTS`` seeded shoppers (validated with ``from_segment``,
Avro in the wire format, keyed like the collector) and runs, one after another:

(b) the bare confluent-kafka loop, (a) ``python -m streams.worker``, (c) the Quix
Streams app in ``.bench/quix-venv`` and (d) two worker processes in one group,
each with its own consumer group (and so its own repartition topics and tables).

Each scenario's processes first join their fresh group, positioned at the end of
``cdp.events.raw``. Once the group owns every partition, events are offered at a
fixed rate (``CDP_BENCH_LATENCY_FRACTION`` of (b)'s throughput) for
``CDP_BENCH_LATENCY_S`` seconds to measure end-to-end latency; then the corpus
(built and encoded before any scenario) is fed with a bounded backlog for at
most ``CDP_BENCH_SCENARIO_BUDGET_S`` seconds and its outputs are timed on the
broker's append times (see :mod:`bench.measure` and :func:`throughput_phase`).
(b), which sets the fixed rate, runs its two phases the other way round.
Finally the collector is loaded through HTTP. The table goes to stdout, everything to
``.bench/results.json``; progress goes to stderr.
"""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import confluent_kafka
from confluent_kafka.admin import AdminClient
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from bench import measure
from bench.collector_load import batch_bodies, drive
from bench.collector_load import wait_ready as collector_ready
from bench.corpus import Corpus, build_corpus, bulk_producer, paced_send, produce_all
from bench.report import render_markdown, write_json
from sinks.bench import bench_destinations
from streams import topics
from streams.serde import AvroSerde
from streams.settings import Settings, reject_unknown_env
from streams.stack.manager import StackInfo, StackManager, StackSettings
from streams.topics import TopicSpec, ensure_topics, pipeline_topic_specs

REPO = Path(__file__).resolve().parent.parent
ENV_PREFIX = "CDP_BENCH_"
SCENARIOS = ("b", "a", "c", "d")
WRITE_KEY = "bench-write-key"


class BenchConfig(BaseSettings):
    """Every knob is ``CDP_BENCH_<NAME>`` (e.g. ``CDP_BENCH_EVENTS=20000``)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, case_sensitive=False, extra="ignore")

    events: int = Field(200_000, ge=100, description="Corpus size N.")
    users: int = Field(0, ge=0, description="Simulated people; 0 = N / 20 (at least 50).")
    seed: int = 42
    partitions: int = Field(6, ge=1, le=64)
    scenarios: str = Field(
        "b,a,c,d,collector,sinks",
        description="Comma-separated subset of b,a,c,d,collector,sinks.",
    )
    latency_s: float = Field(10.0, ge=0, description="Seconds of paced input per scenario.")
    latency_fraction: float = Field(0.5, gt=0, le=2, description="Offered rate / (b) events/s.")
    latency_rate: float = Field(0, ge=0, description="Fixed offered rate; 0 = from (b).")
    collector_s: float = Field(15.0, ge=0)
    sink_events: int = Field(
        10_000, ge=10, description="Backlog per destination for the delivery-rate section."
    )
    sink_budget_s: float = Field(
        120.0, gt=0, description="Time for the whole delivery-rate section (all destinations)."
    )
    collector_connections: int = Field(8, ge=1, le=256)
    scenario_timeout_s: float = Field(300.0, gt=0, description="Readiness/drain limit.")
    scenario_budget_s: float = Field(
        120.0, gt=0, description="Seconds a throughput phase may feed the corpus."
    )
    backlog_s: float = Field(
        8.0, gt=0, description="Seconds of work kept waiting in the input while feeding."
    )
    dir: Path = Field(REPO / ".bench", description="Stack, venv, logs and results.json.")
    kafka_port: int = 29092
    controller_port: int = 29093
    registry_port: int = 28081
    registry_mgmt_port: int = 29001
    quix_spec: str = Field("quixstreams>=3.20,<4", description="pip requirement for (c).")
    worker_env: str = Field(
        "", description="Extra KEY=VALUE,... for the cdpflow workers (e.g. batch tuning)."
    )
    keep_stack: bool = Field(
        False, description="Reuse a running bench stack and leave it up (for iterating)."
    )

    @model_validator(mode="after")
    def _no_unknown(self) -> BenchConfig:
        reject_unknown_env(ENV_PREFIX, [ENV_PREFIX + name for name in type(self).model_fields])
        return self

    @property
    def user_count(self) -> int:
        return self.users or max(50, self.events // 20)

    @property
    def scenario_list(self) -> list[str]:
        return [s.strip() for s in self.scenarios.split(",") if s.strip()]


_T0 = time.monotonic()


def progress(message: str) -> None:
    print(f"[bench {time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------- environment


def machine_info() -> dict[str, Any]:
    mem_kib = 0
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "platform": platform.platform(),
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def versions(quix_python: Path | None, kafka_version: str, registry_version: str) -> dict[str, str]:
    quix = "not installed"
    if quix_python is not None and quix_python.exists():
        proc = subprocess.run(
            [str(quix_python), "-c", "import quixstreams; print(quixstreams.__version__)"],
            capture_output=True,
            text=True,
            check=False,
        )
        quix = proc.stdout.strip() or "not installed"
    return {
        "cdpflow": _version("cdpflow"),
        "faust-streaming": _version("faust-streaming"),
        "aiokafka": _version("aiokafka"),
        "confluent-kafka": f"{_version('confluent-kafka')} (librdkafka "
        f"{confluent_kafka.libversion()[0]})",
        "quixstreams": quix,
        "fastavro": _version("fastavro"),
        "orjson": _version("orjson"),
        "ua-parser": _version("ua-parser"),
        "Kafka": kafka_version,
        "registry": registry_version,
        "Python": platform.python_version(),
    }


class QuixVenv:
    """``.bench/quix-venv``: Quix Streams plus the libraries cdpflow's work uses, same versions.

    cdpflow itself is not installed there: the app runs with ``PYTHONPATH=<repo>``
    (Faust and the rest of cdpflow's dependencies are not needed by the code it imports).
    """

    def __init__(self, root: Path, spec: str) -> None:
        self.root = root
        self.python = root / "bin" / "python"
        self.requirements = [
            spec,
            f"fastavro=={_version('fastavro')}",
            f"orjson=={_version('orjson')}",
            f"ua-parser[regex]=={_version('ua-parser')}",
            "pydantic-settings>=2.3,<3",
        ]
        self.error: str | None = None
        self._thread: threading.Thread | None = None

    def _stamp(self) -> Path:
        return self.root / ".bench-requirements"

    def _prepare(self) -> None:
        wanted = "\n".join(self.requirements)
        try:
            if self._stamp().exists() and self._stamp().read_text() == wanted:
                return
            if not self.python.exists():
                subprocess.run([sys.executable, "-m", "venv", str(self.root)], check=True)
            proc = subprocess.run(
                [str(self.python), "-m", "pip", "install", "--quiet", *self.requirements],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-2000:])
            self._stamp().write_text(wanted)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._prepare, name="quix-venv", daemon=True)
        self._thread.start()

    def wait(self) -> bool:
        if self._thread is not None:
            self._thread.join()
        return self.error is None


# ------------------------------------------------------------------------- scenarios


@dataclass
class Context:
    cfg: BenchConfig
    settings: Settings
    info: StackInfo
    serde: AvroSerde
    corpus: Corpus
    run_id: str
    kafka_pid: int | None
    quix: QuixVenv
    admin: AdminClient
    enriched: measure.Offsets
    raw: measure.Offsets
    recs: measure.Offsets
    latency_rate: float | None = None
    latency_corpus: Corpus | None = None
    notes: list[str] = field(default_factory=list)
    running: list[measure.ManagedProcess] = field(default_factory=list)

    @property
    def logs(self) -> Path:
        return self.cfg.dir / "logs"

    def base_env(self) -> dict[str, str]:
        """The caller's environment without its Kafka/registry/cdpflow settings."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("CDP_", "KAFKA_")) and k != "SCHEMA_REGISTRY_URL"
        }
        env["KAFKA_BOOTSTRAP_SERVERS"] = self.info.bootstrap_servers
        env["SCHEMA_REGISTRY_URL"] = self.info.registry_url
        env["CDP_TOPIC_PARTITIONS"] = str(self.cfg.partitions)
        return env


Starter = Callable[[Context, str], list[measure.ManagedProcess]]


def start_workers(count: int) -> Starter:
    def start(ctx: Context, group: str) -> list[measure.ManagedProcess]:
        procs = []
        (ctx.cfg.dir / "work").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            env = {
                **ctx.base_env(),
                "CDP_WORKER_ID": group,
                "CDP_WORKER_WEB_ENABLED": "false",
                "CDP_WORKER_DATA_DIR": str(ctx.cfg.dir / "work" / f"{group}-{i}"),
            }
            for pair in filter(None, ctx.cfg.worker_env.split(",")):
                key, _, value = pair.partition("=")
                env[key.strip()] = value.strip()
            procs.append(
                measure.ManagedProcess(
                    f"worker-{i}",
                    [sys.executable, "-m", "streams.worker"],
                    env,
                    ctx.logs / f"{group}-worker-{i}.log",
                    REPO,
                ).start()
            )
        return procs

    return start


def start_bare(ctx: Context, group: str) -> list[measure.ManagedProcess]:
    argv = [
        sys.executable,
        "-m",
        "bench.bare_loop",
        "--bootstrap",
        ctx.info.bootstrap_servers,
        "--registry",
        ctx.info.registry_url,
        "--group",
        group,
    ]
    log = ctx.logs / f"{group}.log"
    return [measure.ManagedProcess("bare-loop", argv, ctx.base_env(), log, REPO).start()]


def start_quix(ctx: Context, group: str) -> list[measure.ManagedProcess]:
    if not ctx.quix.wait():
        raise RuntimeError(f"could not prepare {ctx.quix.root}: {ctx.quix.error}")
    state_dir = ctx.cfg.dir / "work" / f"{group}-state"
    argv = [
        str(ctx.quix.python),
        "-m",
        "bench.quix_app",
        "--bootstrap",
        ctx.info.bootstrap_servers,
        "--registry",
        ctx.info.registry_url,
        "--group",
        group,
        "--state-dir",
        str(state_dir),
        "--partitions",
        str(ctx.cfg.partitions),
    ]
    env = {**ctx.base_env(), "PYTHONPATH": str(REPO)}
    log = ctx.logs / f"{group}.log"
    return [measure.ManagedProcess("quix-app", argv, env, log, REPO).start()]


def wait_ready(
    ctx: Context, name: str, group: str, procs: list[measure.ManagedProcess], timeout: float
) -> None:
    """Faust workers log Ready after recovery; every kind must then own all raw partitions."""
    deadline = time.monotonic() + timeout
    faust = name in ("a", "d")
    while True:
        for proc in procs:
            proc.check_alive()
        logs_ok = not faust or all("[^Worker]: Ready" in p.log_text() for p in procs)
        if logs_ok and measure.group_assigned(
            ctx.admin, group, topics.EVENTS_RAW, ctx.cfg.partitions, len(procs)
        ):
            return
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}\n{p.tail()}" for p in procs)
            raise TimeoutError(f"{name}: group {group} not ready after {timeout} s\n{tails}")
        time.sleep(0.5)


def latency_phase(
    ctx: Context, procs: list[measure.ManagedProcess], corpus: Corpus, rate: float
) -> dict[str, Any]:
    start = ctx.enriched.ends()
    sent_at = paced_send(ctx.settings, corpus.events, corpus.message_ids, rate)
    n = len(corpus.events)
    _, end = measure.wait_for(
        measure.total(start) + n,
        ctx.enriched,
        timeout=ctx.cfg.scenario_timeout_s,
        check=procs,
    )
    out = measure.read_range(
        ctx.info.bootstrap_servers, topics.EVENTS_ENRICHED, start, end, message_ids=True
    )
    first_send = min(sent_at.values())
    warmup_ms = 1000
    arrived: dict[str, int] = {}
    for rec in out:
        if rec.message_id in sent_at and rec.message_id not in arrived:
            arrived[rec.message_id] = rec.timestamp_ms
    latencies = sorted(
        arrived[mid] - sent_at[mid] for mid in arrived if sent_at[mid] >= first_send + warmup_ms
    )
    return {
        "latency_rate": rate,
        "latency_events": n,
        "latency_samples": len(latencies),
        "latency_p50_ms": measure.percentile(latencies, 50),
        "latency_p99_ms": measure.percentile(latencies, 99),
        "latency_max_ms": float(latencies[-1]) if latencies else None,
    }


def throughput_phase(
    ctx: Context, name: str, procs: list[measure.ManagedProcess]
) -> dict[str, Any]:
    """Feed the corpus with a bounded backlog; time the outputs of everything fed.

    The recommendation updates go first. Events are then appended in chunks so that
    ``CDP_BENCH_BACKLOG_S`` seconds of work (at the rate measured so far, at least
    2,000 events) are always waiting in ``cdp.events.raw``: the pipeline never runs
    dry, and a multi-hop pipeline is never handed a backlog so large that its first
    hop runs far ahead of its last (which would charge the CPU of half-processed
    events to the few that came out). Feeding stops when the corpus is exhausted or
    ``CDP_BENCH_SCENARIO_BUDGET_S`` has passed; every event fed is then waited for.
    """
    cfg = ctx.cfg
    corpus = ctx.corpus
    n = len(corpus.events)
    pids = [p.pid for p in procs]
    out_start = ctx.enriched.ends()
    base = measure.total(out_start)
    cpu0 = measure.total_cpu(pids)
    broker0 = measure.cpu_seconds(ctx.kafka_pid) if ctx.kafka_pid else 0.0
    producer = bulk_producer(ctx.settings)
    produce_all(producer, topics.RECOMMENDATIONS_UPDATES, corpus.recommendations)
    if producer.flush(60):
        raise RuntimeError("recommendation updates were not acknowledged within 60 s")
    started = time.monotonic()
    deadline = started + cfg.scenario_budget_s
    fed = 0
    first_out: float | None = None
    while fed < n and time.monotonic() < deadline:
        done = measure.total(ctx.enriched.ends()) - base
        now = time.monotonic()
        if done > 0 and first_out is None:
            first_out = now
        rate = done / (now - first_out) if first_out and now > first_out + 1 else 0.0
        backlog_target = max(2000, int(rate * cfg.backlog_s))
        if fed - done < backlog_target:
            chunk = min(n - fed, max(1000, backlog_target - (fed - done)))
            produce_all(producer, topics.EVENTS_RAW, corpus.events[fed : fed + chunk])
            fed += chunk
        for proc in procs:
            proc.check_alive()
        time.sleep(0.25)
    if producer.flush(120):
        raise RuntimeError("corpus events were not acknowledged within 120 s")
    feeding_s = time.monotonic() - started
    progress(f"fed {fed:,} of {n:,} events in {feeding_s:.0f} s; waiting for their outputs")
    _, out_end = measure.wait_for(
        base + fed, ctx.enriched, timeout=cfg.scenario_timeout_s, check=procs
    )
    cpu1 = measure.total_cpu(pids)
    broker1 = measure.cpu_seconds(ctx.kafka_pid) if ctx.kafka_pid else 0.0
    out = measure.read_range(ctx.info.bootstrap_servers, topics.EVENTS_ENRICHED, out_start, out_end)
    processed = len(out)
    stamps = sorted(r.timestamp_ms for r in out)
    wall_s = (stamps[-1] - stamps[0]) / 1000 if len(stamps) > 1 else float("nan")
    complete = fed == n
    result: dict[str, Any] = {
        "events": n,
        "fed": fed,
        "outputs": processed,
        "complete": complete,
        "wall_s": round(wall_s, 3),
        "events_per_s": (processed - 1) / wall_s if wall_s > 0 else None,
        "cpu_s": round(cpu1 - cpu0, 2),
        "cpu_s_per_10k": (cpu1 - cpu0) / processed * 10_000 if processed else None,
        "broker_cpu_s_per_10k": (broker1 - broker0) / processed * 10_000
        if ctx.kafka_pid and processed
        else None,
    }
    if not complete:
        ctx.notes.append(
            f"({name}): {fed:,} of {n:,} corpus events fed "
            f"({cfg.scenario_budget_s:g} s budget, CDP_BENCH_SCENARIO_BUDGET_S)"
        )
    progress(
        f"{processed:,} events at {result['events_per_s'] or 0:,.0f} events/s, "
        f"{result['cpu_s_per_10k'] or 0:.2f} CPU s / 10k events"
    )
    return result


def ensure_latency_corpus(ctx: Context) -> Corpus:
    if ctx.latency_corpus is None:
        assert ctx.latency_rate is not None
        m = max(100, int(ctx.latency_rate * ctx.cfg.latency_s))
        progress(f"building the latency corpus ({m:,} events)")
        ctx.latency_corpus = build_corpus(
            ctx.serde, m, ctx.cfg.user_count, ctx.cfg.seed + 1, recommendations=False
        )
    return ctx.latency_corpus


def run_latency(ctx: Context, procs: list[measure.ManagedProcess]) -> dict[str, Any]:
    assert ctx.latency_rate is not None
    corpus = ensure_latency_corpus(ctx)
    progress(f"offering {ctx.latency_rate:,.0f} events/s for {ctx.cfg.latency_s:g} s")
    result = latency_phase(ctx, procs, corpus, ctx.latency_rate)
    progress(
        f"latency p50 {result['latency_p50_ms']:.0f} ms, p99 {result['latency_p99_ms']:.0f} ms"
    )
    return result


def start_ready(
    ctx: Context, name: str, starter: Starter, group: str
) -> tuple[list[measure.ManagedProcess], float]:
    """A fresh group positioned at the end of the inputs, its processes started and ready."""
    measure.commit_at_end(
        ctx.info.bootstrap_servers,
        group,
        {topics.EVENTS_RAW: ctx.raw.ends(), topics.RECOMMENDATIONS_UPDATES: ctx.recs.ends()},
    )
    started = time.monotonic()
    procs = starter(ctx, group)
    ctx.running.extend(procs)
    try:
        wait_ready(ctx, name, group, procs, timeout=180)
    except BaseException:
        stop_all(ctx, procs)
        raise
    time.sleep(1.0)
    return procs, time.monotonic() - started


def stop_all(ctx: Context, procs: list[measure.ManagedProcess]) -> None:
    for proc in procs:
        proc.stop()
        if proc in ctx.running:
            ctx.running.remove(proc)


def run_scenario(ctx: Context, name: str, starter: Starter) -> dict[str, Any]:
    """Latency at the fixed rate, then throughput on the corpus, with the same processes.

    The scenario that sets the fixed rate (the first, normally (b)) measures its
    throughput first (every event fed has come out by then, so no backlog is left).
    """
    cfg = ctx.cfg
    group = f"bench-{ctx.run_id}-{name}"
    procs, ready_s = start_ready(ctx, name, starter, group)
    result: dict[str, Any] = {"processes": len(procs), "group": group, "ready_s": round(ready_s, 1)}
    progress(f"{name}: {len(procs)} process(es) ready in {ready_s:.1f} s")
    try:
        if ctx.latency_rate is None or cfg.latency_s <= 0:
            result.update(throughput_phase(ctx, name, procs))
            if cfg.latency_s > 0:
                ctx.latency_rate = cfg.latency_rate or cfg.latency_fraction * float(
                    result["events_per_s"] or 0
                )
                source = (
                    "CDP_BENCH_LATENCY_RATE"
                    if cfg.latency_rate
                    else f"{cfg.latency_fraction:g} x scenario ({name})'s throughput"
                )
                ctx.notes.append(
                    f"latency offered rate {ctx.latency_rate:,.0f} events/s = {source}"
                )
                result.update(run_latency(ctx, procs))
        else:
            result.update(run_latency(ctx, procs))
            result.update(throughput_phase(ctx, name, procs))
        peaks = [measure.peak_rss_mb(p.pid) for p in procs]
        result["peak_rss_mib_per_process"] = [round(x, 1) for x in peaks]
        result["peak_rss_mib"] = sum(peaks)
        return result
    finally:
        stop_all(ctx, procs)


def run_collector(ctx: Context) -> dict[str, Any]:
    cfg = ctx.cfg
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **ctx.base_env(),
        "CDP_WRITE_KEYS": WRITE_KEY,
        "CDP_COLLECTOR_HOST": "127.0.0.1",
        "CDP_COLLECTOR_PORT": str(port),
        "CDP_LOG_LEVEL": "WARNING",
    }
    proc = measure.ManagedProcess(
        "collector",
        [sys.executable, "-m", "bench.collector_load", "serve"],
        env,
        ctx.logs / f"bench-{ctx.run_id}-collector.log",
        REPO,
    ).start()
    ctx.running.append(proc)
    base_url = f"http://127.0.0.1:{port}"
    try:
        bodies = batch_bodies(min(20_000, cfg.events), cfg.user_count, cfg.seed + 2)
        asyncio.run(collector_ready(base_url))
        cpu0 = measure.cpu_seconds(proc.pid)
        load = asyncio.run(
            drive(
                base_url,
                WRITE_KEY,
                bodies,
                connections=cfg.collector_connections,
                duration_s=cfg.collector_s,
            )
        )
        cpu1 = measure.cpu_seconds(proc.pid)
        latencies = sorted(load.request_ms)
        return {
            "connections": cfg.collector_connections,
            "batch_size": 100,
            "duration_s": load.elapsed_s,
            "requests": load.requests,
            "failed_requests": load.failed_requests,
            "accepted": load.accepted,
            "rejected": load.rejected,
            "accepted_per_s": load.accepted_per_s,
            "request_p50_ms": measure.percentile(latencies, 50),
            "request_p99_ms": measure.percentile(latencies, 99),
            "cpu_s_per_10k": (cpu1 - cpu0) / load.accepted * 10_000 if load.accepted else None,
            "peak_rss_mib": measure.peak_rss_mb(proc.pid),
        }
    finally:
        proc.stop()
        ctx.running.remove(proc)


def create_topics(settings: Settings, partitions: int) -> None:
    """Public topics, with the output stamped by the broker (LogAppendTime) for timing."""
    specs = []
    for spec in pipeline_topic_specs(settings):
        if spec.name == topics.EVENTS_ENRICHED:
            spec = TopicSpec(
                spec.name, partitions, {**spec.config, "message.timestamp.type": "LogAppendTime"}
            )
        specs.append(spec)
    ensure_topics(settings, specs)


# ----------------------------------------------------------------------------- main


def run(cfg: BenchConfig) -> dict[str, Any]:
    started = time.monotonic()
    load_before = load_average()
    cfg.dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(cfg.dir / "work", ignore_errors=True)
    shutil.rmtree(cfg.dir / "logs", ignore_errors=True)
    (cfg.dir / "logs").mkdir(parents=True)
    wanted = cfg.scenario_list
    unknown = set(wanted) - {*SCENARIOS, "collector", "sinks"}
    if unknown:
        raise SystemExit(f"unknown CDP_BENCH_SCENARIOS entries: {', '.join(sorted(unknown))}")
    quix = QuixVenv(cfg.dir / "quix-venv", cfg.quix_spec)
    if "c" in wanted:
        progress(f"preparing {quix.root} in the background")
        quix.start()
    stack = StackManager(
        StackSettings(
            dir=cfg.dir / "stack",
            cache_dir=REPO / ".stack" / "cache",
            kafka_port=cfg.kafka_port,
            controller_port=cfg.controller_port,
            registry_port=cfg.registry_port,
            registry_mgmt_port=cfg.registry_mgmt_port,
        ),
        progress=progress,
    )
    progress(f"starting a {'' if cfg.keep_stack else 'fresh '}bench stack in {cfg.dir / 'stack'}")
    up: dict[str, Any] = {}

    def start_stack() -> None:
        try:
            up["info"] = stack.up(fresh=not cfg.keep_stack, force_local=True)
        except BaseException as exc:
            up["error"] = exc

    stack_thread = threading.Thread(target=start_stack, name="bench-stack", daemon=True)
    stack_thread.start()
    # The corpus does not need the registry: built while the JVMs start, stamped after.
    progress(f"building the corpus: {cfg.events:,} events from {cfg.user_count:,} users")
    corpus = build_corpus(None, cfg.events, cfg.user_count, cfg.seed)
    progress(
        f"corpus: {len(corpus.events):,} events ({corpus.value_bytes / 2**20:.0f} MiB Avro), "
        f"{len(corpus.recommendations):,} recommendation lists, {corpus.rejected} rejected, "
        f"built in {corpus.build_s:.1f} s"
    )
    stack_thread.join()
    if "error" in up:
        raise up["error"]
    info: StackInfo = up["info"]
    results: dict[str, Any] = {
        "config": {
            "events": cfg.events,
            "users": cfg.user_count,
            "seed": cfg.seed,
            "partitions": cfg.partitions,
            "latency_s": cfg.latency_s,
            "latency_fraction": cfg.latency_fraction,
            "scenarios": wanted,
        },
        "machine": {**machine_info(), "load_before": load_before},
        "scenarios": {},
    }
    ctx: Context | None = None
    try:
        settings = Settings(
            kafka_bootstrap_servers=info.bootstrap_servers,
            schema_registry_url=info.registry_url,
            cdp_topic_partitions=cfg.partitions,
        )
        create_topics(settings, cfg.partitions)
        serde = AvroSerde.from_url(info.registry_url)
        corpus.stamp(serde)
        status = stack.status()
        ctx = Context(
            cfg=cfg,
            settings=settings,
            info=info,
            serde=serde,
            corpus=corpus,
            run_id=uuid.uuid4().hex[:8],
            kafka_pid=status.kafka.pid,
            quix=quix,
            admin=AdminClient(settings.librdkafka_common()),
            enriched=measure.Offsets(info.bootstrap_servers, topics.EVENTS_ENRICHED),
            raw=measure.Offsets(info.bootstrap_servers, topics.EVENTS_RAW),
            recs=measure.Offsets(info.bootstrap_servers, topics.RECOMMENDATIONS_UPDATES),
        )
        results["corpus"] = {
            "events": len(corpus.events),
            "recommendation_updates": len(corpus.recommendations),
            "rejected_by_from_segment": corpus.rejected,
            "avro_mib": round(corpus.value_bytes / 2**20, 1),
            "build_s": round(corpus.build_s, 1),
        }
        starters: dict[str, Starter] = {
            "a": start_workers(1),
            "b": start_bare,
            "c": start_quix,
            "d": start_workers(2),
        }
        for name in [s for s in wanted if s in SCENARIOS]:
            progress(f"scenario {name}")
            try:
                results["scenarios"][name] = run_scenario(ctx, name, starters[name])
            except Exception as exc:
                progress(f"{name} failed: {type(exc).__name__}: {exc}")
                results["scenarios"][name] = {"error": f"{type(exc).__name__}: {exc}"}
        results["latency_rate"] = ctx.latency_rate
        if "collector" in wanted:
            progress("collector over HTTP")
            try:
                results["collector"] = run_collector(ctx)
            except Exception as exc:
                progress(f"collector failed: {type(exc).__name__}: {exc}")
                results["collector"] = {"error": f"{type(exc).__name__}: {exc}"}
        if "sinks" in wanted:
            progress("sinks: delivery per destination against the emulators")
            results["sinks"] = bench_destinations(
                settings,
                events_per_destination=cfg.sink_events,
                budget_s=cfg.sink_budget_s,
                partitions=cfg.partitions,
                progress=progress,
            )
    finally:
        if ctx is not None:
            for proc in list(ctx.running):
                proc.stop()
            for offsets in (ctx.enriched, ctx.raw, ctx.recs):
                offsets.close()
            results["notes"] = ctx.notes
        if not cfg.keep_stack:
            progress("stopping the bench stack")
            stack.down()
    results["machine"]["load_after"] = load_average()
    results["versions"] = versions(
        quix.python if "c" in wanted else None, info.kafka_version, info.registry_version
    )
    results["method"] = {
        "throughput": "once the group owns all partitions, the pre-encoded corpus is fed to "
        "cdp.events.raw in chunks keeping CDP_BENCH_BACKLOG_S seconds of work queued, for at "
        "most CDP_BENCH_SCENARIO_BUDGET_S; events/s = (outputs - 1) / (last - first "
        "LogAppendTime on cdp.events.enriched) over every event fed",
        "cpu": "utime+stime of the scenario's processes (/proc/<pid>/stat) from the start of "
        "feeding to the last output, per 10k events; broker likewise",
        "rss": "VmHWM of each process at the end of the scenario (summed for 2 workers)",
        "latency": "paced producer (linger.ms=0) records each event's produce-call time; "
        "latency = output LogAppendTime - that; the first second is warm-up",
    }
    results["total_s"] = round(time.monotonic() - started, 1)
    return results


def main() -> None:
    cfg = BenchConfig()
    results = run(cfg)
    path = cfg.dir / "results.json"
    write_json(results, path)
    print(render_markdown(results))
    print(f"\n(results: {path})")


if __name__ == "__main__":
    main()
