"""Orchestration of the local stack: start, reuse, stop and describe it.

The CLI process exits while the servers keep running, so everything ``down``
and ``status`` need later is written to ``state.json`` (PIDs, ports, versions,
start times). A PID is only ever signalled after its command line proves it is
one of ours (see :attr:`StackPaths.owner_marker`): PIDs get recycled, and other
engineers may run their own stacks on the same machine.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from streams.stack import (
    HOST,
    KAFKA_VERSION,
    StackError,
    StackPaths,
    StackSettings,
    kafka,
    maven,
    registry,
)

__all__ = [
    "ComponentStatus",
    "JavaRuntime",
    "StackError",
    "StackInfo",
    "StackManager",
    "StackSettings",
    "StackStatus",
]

Progress = Callable[[str], None]

STATE_VERSION = 1
_POLL_S = 0.25
_LOG_TAIL_LINES = 40
#: A cold JVM can take seconds to serve its first request; a shorter timeout
#: only makes the readiness loop retry (and look slower) on a busy machine.
_HTTP_READY_S = 5.0
_LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})

#: Popen handles of servers started by this Python process. Keeping them lets
#: ``down`` reap its own children (tests run up and down in one process);
#: otherwise they would linger as zombies that still look "alive" to kill(0).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def _noop(_: str) -> None:
    return None


# --------------------------------------------------------------------------- java


@dataclass(frozen=True)
class JavaRuntime:
    path: Path
    major: int


_VERSION_RE = re.compile(r'version "(\d+)(?:\.(\d+))?')


@lru_cache(maxsize=32)
def java_major(java: Path) -> int | None:
    """Major version from ``java -version`` (1.8 -> 8), or None if it does not run."""
    try:
        proc = subprocess.run(
            [str(java), "-version"],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = _VERSION_RE.search(proc.stderr + proc.stdout)
    if proc.returncode != 0 or m is None:
        return None
    major = int(m.group(1))
    if major == 1 and m.group(2) is not None:
        major = int(m.group(2))
    return major


def _java_candidates() -> list[Path]:
    """JAVA_HOME, then PATH, then every JDK under /usr/lib/jvm, without duplicates."""
    raw: list[Path] = []
    if home := os.environ.get("JAVA_HOME"):
        raw.append(Path(home) / "bin" / "java")
    if on_path := shutil.which("java"):
        raw.append(Path(on_path))
    raw.extend(sorted(Path("/usr/lib/jvm").glob("*/bin/java")))
    seen: set[Path] = set()
    out: list[Path] = []
    for p in raw:
        try:
            real = p.resolve(strict=True)
        except OSError:
            continue
        if real not in seen and os.access(real, os.X_OK):
            seen.add(real)
            out.append(real)
    return out


def _explicit_java(path: Path, env_name: str) -> JavaRuntime:
    major = java_major(path)
    if major is None:
        raise StackError(f"{env_name}={path} does not run `java -version`; point it at bin/java")
    return JavaRuntime(path, major)


def select_kafka_java(settings: StackSettings) -> JavaRuntime:
    """The default JDK if it is >= 17 (what Kafka 4 is tested on), else any JDK >= 17."""
    if settings.kafka_java is not None:
        rt = _explicit_java(settings.kafka_java, "CDP_STACK_KAFKA_JAVA")
        if rt.major < 17:
            raise StackError(f"Kafka {KAFKA_VERSION} needs Java >= 17; {rt.path} is {rt.major}")
        return rt
    found = [(p, java_major(p)) for p in _java_candidates()]
    usable = [JavaRuntime(p, m) for p, m in found if m is not None and m >= 17]
    if not usable:
        raise StackError(
            f"Kafka {KAFKA_VERSION} needs Java >= 17 and none was found (JAVA_HOME, PATH, "
            "/usr/lib/jvm). Install one (e.g. `apt-get install openjdk-17-jre-headless`) or set "
            "CDP_STACK_KAFKA_JAVA."
        )
    return usable[0]


def select_registry_java(settings: StackSettings) -> JavaRuntime:
    """The newest JDK found, so Apicurio 3.x runs whenever a Java 21+ is installed."""
    if settings.registry_java is not None:
        return _explicit_java(settings.registry_java, "CDP_STACK_REGISTRY_JAVA")
    found = [JavaRuntime(p, m) for p in _java_candidates() if (m := java_major(p)) is not None]
    if not found:
        raise StackError(
            "no Java found for the registry; install a JDK 21+ or set CDP_STACK_REGISTRY_JAVA"
        )
    return max(found, key=lambda rt: rt.major)


# ------------------------------------------------------------------- processes


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        if Path("/proc/self").exists():
            return None
        proc = subprocess.run(
            ["ps", "-ww", "-o", "args=", "-p", str(pid)],
            capture_output=True,
            text=True,
            check=False,
        )
        return proc.stdout.split() if proc.returncode == 0 and proc.stdout.strip() else None
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a] or None


def _reap(pid: int) -> None:
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is not None:
            _CHILDREN.pop(pid, None)
        return
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _alive(pid: int) -> bool:
    """Running (not a zombie) -- a zombie still answers kill(0)."""
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return not Path("/proc/self").exists()
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in {"Z", "X"}


def _owned(pid: int, paths: StackPaths) -> bool:
    args = _cmdline(pid)
    return args is not None and paths.owner_marker in args


def _port_in_use(port: int) -> bool:
    """True if something listens on 127.0.0.1:port (TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError as exc:
            return exc.errno in (errno.EADDRINUSE, errno.EACCES)
    return False


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read().decode(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(data.splitlines()[-lines:])


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------------------ state


@dataclass
class ProcessRecord:
    """One server this stack started; enough to find, check and stop it later."""

    pid: int
    version: str
    address: str
    java: str
    started_at: str
    log: str
    ports: dict[str, int]
    ready_after_s: float | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ProcessRecord:
        return cls(
            pid=int(raw["pid"]),
            version=str(raw["version"]),
            address=str(raw["address"]),
            java=str(raw.get("java", "")),
            started_at=str(raw.get("started_at", "")),
            log=str(raw.get("log", "")),
            ports={str(k): int(v) for k, v in dict(raw.get("ports", {})).items()},
            ready_after_s=raw.get("ready_after_s"),
            extra={str(k): str(v) for k, v in dict(raw.get("extra", {})).items()},
        )


@dataclass
class StackState:
    kafka: ProcessRecord | None = None
    registry: ProcessRecord | None = None

    @classmethod
    def load(cls, path: Path) -> StackState:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            raise StackError(
                f"{path} is unreadable ({exc}); check for leftover java processes with "
                f"`ps aux | grep cdpflow.stack.dir`, stop them, then delete the file"
            ) from exc
        state = cls()
        if raw.get("kafka"):
            state.kafka = ProcessRecord.from_json(raw["kafka"])
        if raw.get("registry"):
            state.registry = ProcessRecord.from_json(raw["registry"])
        return state

    def save(self, path: Path, paths: StackPaths) -> None:
        if self.kafka is None and self.registry is None:
            path.unlink(missing_ok=True)
            return
        doc = {
            "state_version": STATE_VERSION,
            "stack_dir": str(paths.root),
            "cache_dir": str(paths.cache),
            "updated_at": _now(),
            "kafka": asdict(self.kafka) if self.kafka else None,
            "registry": asdict(self.registry) if self.registry else None,
        }
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        tmp.replace(path)


# ----------------------------------------------------------------- public types


@dataclass(frozen=True)
class StackInfo:
    """Where clients connect, and whether this call had to start anything."""

    bootstrap_servers: str
    registry_url: str
    kafka_version: str
    registry_version: str
    started: bool
    #: True when KAFKA_BOOTSTRAP_SERVERS/SCHEMA_REGISTRY_URL name another stack;
    #: the addresses are then those, and nothing local was started.
    external: bool = False
    registry_storage: str = ""

    def env(self) -> dict[str, str]:
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "SCHEMA_REGISTRY_URL": self.registry_url,
        }


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    pid: int | None
    running: bool
    answering: bool
    address: str
    version: str
    started_at: str
    log: str
    detail: str = ""


@dataclass(frozen=True)
class StackStatus:
    kafka: ComponentStatus
    registry: ComponentStatus

    @property
    def components(self) -> tuple[ComponentStatus, ComponentStatus]:
        return (self.kafka, self.registry)

    @property
    def running(self) -> bool:
        """Both servers are up and answering clients."""
        return all(c.running and c.answering for c in self.components)


# ---------------------------------------------------------------------- manager


class StackManager:
    """Start, reuse, stop and describe the local Kafka + registry for one stack dir."""

    def __init__(self, settings: StackSettings | None = None, progress: Progress = _noop) -> None:
        self.settings = settings if settings is not None else StackSettings()
        self.paths = StackPaths.from_settings(self.settings)
        self.progress = progress

    # -- helpers ------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise up/down on one stack dir, so two callers never double-start."""
        self.paths.root.mkdir(parents=True, exist_ok=True)
        with self.paths.lock_file.open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _load(self) -> StackState:
        return StackState.load(self.paths.state_file)

    def _save(self, state: StackState) -> None:
        state.save(self.paths.state_file, self.paths)

    def _ours(self, rec: ProcessRecord | None) -> bool:
        return rec is not None and _alive(rec.pid) and _owned(rec.pid, self.paths)

    def _external_endpoints(self) -> tuple[str, str] | None:
        """The env's endpoints when both are set and name something other than this stack."""
        bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
        url = os.environ.get("SCHEMA_REGISTRY_URL", "").strip()
        if not bootstrap or not url:
            return None
        kafka_here = True
        for server in bootstrap.split(","):
            host, _, port = server.strip().rpartition(":")
            if host not in _LOCAL_HOSTS or port != str(self.settings.kafka_port):
                kafka_here = False
        parsed = urlparse(url)
        registry_here = (
            parsed.hostname in _LOCAL_HOSTS and parsed.port == self.settings.registry_port
        )
        if kafka_here and registry_here:
            return None
        return bootstrap, url

    def _unrecorded_pids(self, state: StackState) -> list[int]:
        """Live JVMs of this stack dir that state.json does not know (e.g. it was deleted)."""
        known = {rec.pid for rec in (state.kafka, state.registry) if rec is not None}
        proc = Path("/proc")
        if not proc.is_dir():
            return []
        return sorted(
            int(d.name)
            for d in proc.iterdir()
            if d.name.isdigit() and int(d.name) not in known and _owned(int(d.name), self.paths)
        )

    def _check_ports(self, ports: dict[str, int]) -> None:
        for env_name, port in ports.items():
            if _port_in_use(port):
                hint = ""
                if orphans := self._unrecorded_pids(self._load()):
                    hint = (
                        f" Processes of this stack that its state file lost track of: pids "
                        f"{', '.join(map(str, orphans))}; check them with `ps -p` and kill them."
                    )
                raise StackError(
                    f"port {port} ({env_name}) is already in use by another process (another "
                    f"stack or service?). Stop it, or pick a free port, e.g. {env_name}="
                    f"{port + 10000 if port < 55535 else port - 10000}.{hint}"
                )

    def _spawn(self, name: str, cmd: list[str], cwd: Path) -> subprocess.Popen[bytes]:
        self.paths.logs.mkdir(parents=True, exist_ok=True)
        log = self.paths.log(name)
        if log.exists():
            log.replace(log.with_name(log.name + ".1"))  # keep the previous run for post-mortems
        cwd.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as fh:
            proc = subprocess.Popen(
                cmd,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                # Own session: the servers outlive the CLI and ignore its Ctrl-C.
                start_new_session=True,
                close_fds=True,
            )
        _CHILDREN[proc.pid] = proc
        return proc

    def _wait_ready(
        self,
        name: str,
        proc: subprocess.Popen[bytes] | None,
        pid: int,
        check: Callable[[], bool],
    ) -> float:
        """Seconds until ``check`` passed; fails fast (with the log tail) if the JVM dies."""
        t0 = time.monotonic()
        deadline = t0 + self.settings.start_timeout_s
        log = self.paths.log(name)
        while True:
            died = proc.poll() is not None if proc is not None else not _alive(pid)
            if died:
                code = f" with exit code {proc.returncode}" if proc is not None else ""
                raise StackError(
                    f"{name} (pid {pid}) exited during start-up{code}. Last lines of {log}:\n"
                    f"{_tail(log)}\n-> fix the cause above, or `cdpflow stack up --fresh` if "
                    "its data dir is damaged."
                )
            if check():
                return time.monotonic() - t0
            if time.monotonic() >= deadline:
                raise StackError(
                    f"{name} (pid {pid}) did not answer within {self.settings.start_timeout_s:.0f}s"
                    f" (CDP_STACK_START_TIMEOUT_S). Last lines of {log}:\n{_tail(log)}"
                )
            time.sleep(_POLL_S)

    def _stop_pid(self, name: str, pid: int, cds_archive: str = "") -> None:
        """SIGTERM (clean shutdown flushes Kafka's logs), then SIGKILL after the timeout."""
        if not _alive(pid):
            return
        if not _owned(pid, self.paths):
            self.progress(f"{name}: pid {pid} is no longer a process of this stack; left alone")
            return
        self.progress(f"stopping {name} (pid {pid})...")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.stop_timeout_s
        while time.monotonic() < deadline:
            if not _alive(pid):
                break
            time.sleep(_POLL_S)
        else:
            self.progress(
                f"{name} ignored SIGTERM for {self.settings.stop_timeout_s:.0f}s; killing"
            )
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if cds_archive:
                # It may have been killed mid-way through writing its archive;
                # Java 17 would then keep loading a broken one forever.
                Path(cds_archive).unlink(missing_ok=True)
            kill_deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < kill_deadline:
                time.sleep(_POLL_S)
        child = _CHILDREN.pop(pid, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5)
        if _alive(pid):
            raise StackError(f"{name} (pid {pid}) survived SIGKILL; check `ps -p {pid}`")

    def _stop_rec(self, name: str, rec: ProcessRecord) -> None:
        self._stop_pid(name, rec.pid, rec.extra.get("cds_archive", ""))

    def _cds_flags(
        self, component: str, version: str, java: JavaRuntime, classpath: Path
    ) -> tuple[list[str], str]:
        """AppCDS: classes parsed once are mapped from an archive on later starts.

        Measured here it cuts start-up CPU by ~40% (Kafka ~11 -> ~7 s, the
        registry ~9 -> ~6 s), which matters on a busy dev box. The JVM writes
        the archive at its first clean exit (so the first ``down`` takes a few
        seconds longer). The name carries the JDK's identity and the classpath
        because an archive from another JDK build or jar location is useless.
        """
        if java.major < 13:
            return [], ""
        st = java.path.stat()
        key = f"{java.path}:{st.st_mtime_ns}:{st.st_size}:{classpath}"
        tag = hashlib.sha256(key.encode()).hexdigest()
        archive = self.paths.jvm_cache / f"{component}-{version}-java{java.major}-{tag[:10]}.jsa"
        self.paths.jvm_cache.mkdir(parents=True, exist_ok=True)
        if java.major >= 19:  # validates and regenerates the archive by itself
            flags = ["-XX:+AutoCreateSharedArchive", f"-XX:SharedArchiveFile={archive}"]
            return flags, str(archive)
        if archive.is_file():
            return [f"-XX:SharedArchiveFile={archive}"], str(archive)
        return [f"-XX:ArchiveClassesAtExit={archive}"], str(archive)

    def _registry_label_file(self) -> Path:
        return self.paths.registry_data / "written-by"

    def _choose_registry(
        self, quiet: bool = False
    ) -> tuple[JavaRuntime, registry.RegistryRelease, registry.Storage]:
        java = select_registry_java(self.settings)
        release = registry.release_for_java(java.major)
        label_file = self._registry_label_file()
        previous = label_file.read_text().strip() if label_file.is_file() else None
        fallback_label = registry.data_label(
            registry.FALLBACK, registry.resolve_storage(registry.FALLBACK, "auto")
        )
        if (
            previous == fallback_label
            and release is registry.PREFERRED
            and self.settings.registry_storage == "auto"
            and java.major >= registry.FALLBACK.min_java
        ):
            # Keep serving the schemas this data dir already holds; moving to
            # 3.x needs `up --fresh` (2.x and 3.x storage are incompatible).
            release = registry.FALLBACK
            if not quiet:
                self.progress(
                    f"keeping Apicurio {release.version}: this stack's registry data was written "
                    f"by it (`cdpflow stack up --fresh` moves to {registry.PREFERRED.version})"
                )
        storage = registry.resolve_storage(release, self.settings.registry_storage)
        label = registry.data_label(release, storage)
        if previous is not None and previous != label:
            raise StackError(
                f"the registry data in {self.paths.data} was written by {previous}, but this run "
                f"would use {label} (Java {java.major} at {java.path}); its schema ids would not "
                "resolve. Run `cdpflow stack up --fresh` to start empty, or set "
                "CDP_STACK_REGISTRY_JAVA / CDP_STACK_REGISTRY_STORAGE to match."
            )
        return java, release, storage

    # -- kafka / registry start ---------------------------------------------

    def _start_kafka(self, state: StackState) -> None:
        s, p = self.settings, self.paths
        java = select_kafka_java(s)
        lib = maven.ensure_kafka_lib(p.cache, self.progress)
        self._check_ports(
            {"CDP_STACK_KAFKA_PORT": s.kafka_port, "CDP_STACK_CONTROLLER_PORT": s.controller_port}
        )
        server, log4j = kafka.write_config(s, p)
        cluster_id = kafka.format_storage(java.path, lib, server, log4j, p)
        self.progress(f"starting Kafka {KAFKA_VERSION} on {kafka.bootstrap_servers(s)}...")
        cds, archive = self._cds_flags("kafka", KAFKA_VERSION, java, lib)
        cmd = kafka.command(java.path, lib, server, log4j, s, p, cds)
        proc = self._spawn("kafka", cmd, p.root)
        state.kafka = ProcessRecord(
            pid=proc.pid,
            version=KAFKA_VERSION,
            address=kafka.bootstrap_servers(s),
            java=str(java.path),
            started_at=_now(),
            log=str(p.log("kafka")),
            ports={"kafka": s.kafka_port, "controller": s.controller_port},
            extra={"cluster_id": cluster_id, "java_major": str(java.major), "cds_archive": archive},
        )
        self._save(state)  # before waiting: a failed start must still be stoppable
        client = kafka.admin_client(kafka.bootstrap_servers(s))
        state.kafka.ready_after_s = round(
            self._wait_ready("kafka", proc, proc.pid, lambda: kafka.is_answering(client)), 1
        )
        self._save(state)

    def _start_registry(self, state: StackState) -> None:
        s, p = self.settings, self.paths
        java, release, storage = self._choose_registry()
        home = maven.ensure_registry(p.cache, release.version, self.progress)
        ports = {"CDP_STACK_REGISTRY_PORT": s.registry_port}
        if release is registry.PREFERRED:
            ports["CDP_STACK_REGISTRY_MGMT_PORT"] = s.registry_mgmt_port
        self._check_ports(ports)
        p.registry_data.mkdir(parents=True, exist_ok=True)
        url = registry.registry_url(s)
        self.progress(
            f"starting Apicurio Registry {release.version} ({storage} storage, Java "
            f"{java.major}) on {url}..."
        )
        cds, archive = self._cds_flags("registry", release.version, java, home)
        cmd = registry.command(java.path, home, release, storage, s, p, cds)
        proc = self._spawn("registry", cmd, p.registry_data)
        state.registry = ProcessRecord(
            pid=proc.pid,
            version=release.version,
            address=url,
            java=str(java.path),
            started_at=_now(),
            log=str(p.log("registry")),
            ports={"http": s.registry_port, "management": s.registry_mgmt_port},
            extra={"storage": storage, "java_major": str(java.major), "cds_archive": archive},
        )
        self._save(state)
        state.registry.ready_after_s = round(
            self._wait_ready(
                "registry", proc, proc.pid, lambda: registry.is_answering(url, _HTTP_READY_S)
            ),
            1,
        )
        self._registry_label_file().write_text(registry.data_label(release, storage) + "\n")
        self._save(state)

    def _reusable(self, name: str, rec: ProcessRecord | None, ports: dict[str, int]) -> bool:
        """True if ``rec`` is our live process on the configured ports."""
        if rec is None or not self._ours(rec):
            return False
        if rec.ports != ports:
            raise StackError(
                f"{name} of this stack already runs (pid {rec.pid}) on ports {rec.ports}, "
                f"not the configured {ports}. Run `cdpflow stack down` first, or use the same "
                "CDP_STACK_* ports."
            )
        return True

    # -- public API ---------------------------------------------------------

    def up(self, fresh: bool = False, force_local: bool = False) -> StackInfo:
        """Start whatever is not running yet; a no-op (``started=False``) when all is up.

        ``fresh`` stops the stack and deletes Kafka's and the registry's data
        first. Unless ``force_local``, an environment that already names another
        Kafka + registry (KAFKA_BOOTSTRAP_SERVERS and SCHEMA_REGISTRY_URL) wins,
        so tests and the demo never silently talk to a different cluster than
        the user configured.
        """
        if not force_local and (ext := self._external_endpoints()) is not None:
            self.progress(
                f"KAFKA_BOOTSTRAP_SERVERS={ext[0]} and SCHEMA_REGISTRY_URL={ext[1]} point at "
                "another stack; starting nothing (use --force-local to start the local one)."
            )
            return StackInfo(ext[0], ext[1], "external", "external", started=False, external=True)
        s = self.settings
        with self._locked():
            state = self._load()
            if fresh:
                self._down_locked(state)
                self.progress(f"wiping {self.paths.data}...")
                shutil.rmtree(self.paths.data, ignore_errors=True)
            if not self._ours(state.registry):
                self._choose_registry(quiet=True)  # fail before spending time on Kafka
            started_now: list[str] = []
            try:
                kafka_ports = {"kafka": s.kafka_port, "controller": s.controller_port}
                if self._reusable("kafka", state.kafka, kafka_ports):
                    assert state.kafka is not None
                    client = kafka.admin_client(state.kafka.address)
                    self._wait_ready(
                        "kafka", None, state.kafka.pid, lambda: kafka.is_answering(client)
                    )
                else:
                    if state.registry is not None and self._ours(state.registry):
                        # A registry journaling into a broker that went away is stale.
                        self._stop_rec("registry", state.registry)
                    state.registry = None
                    state.kafka = None
                    started_now.append("kafka")
                    self._start_kafka(state)
                assert state.kafka is not None
                reg_ports = {"http": s.registry_port, "management": s.registry_mgmt_port}
                if self._reusable("registry", state.registry, reg_ports):
                    assert state.registry is not None
                    url = state.registry.address
                    self._wait_ready(
                        "registry",
                        None,
                        state.registry.pid,
                        lambda: registry.is_answering(url, _HTTP_READY_S),
                    )
                else:
                    state.registry = None
                    started_now.append("registry")
                    self._start_registry(state)
            except BaseException:
                # Roll back what this call started: a half-started stack that
                # nobody will `down` would hold the ports and the heap.
                for name in reversed(started_now):
                    rec = getattr(state, name)
                    if rec is not None:
                        with contextlib.suppress(StackError):
                            self._stop_rec(name, rec)
                        setattr(state, name, None)
                self._save(state)
                raise
            assert state.registry is not None
            return StackInfo(
                bootstrap_servers=state.kafka.address,
                registry_url=state.registry.address,
                kafka_version=state.kafka.version,
                registry_version=state.registry.version,
                started=bool(started_now),
                registry_storage=state.registry.extra.get("storage", ""),
            )

    def _down_locked(self, state: StackState) -> None:
        for name in ("registry", "kafka"):  # the registry is a Kafka client: stop it first
            rec: ProcessRecord | None = getattr(state, name)
            if rec is not None:
                self._stop_rec(name, rec)
                setattr(state, name, None)
                self._save(state)

    def down(self) -> None:
        """Stop exactly the processes this stack started; data stays for the next ``up``."""
        with self._locked():
            state = self._load()
            if state.kafka is None and state.registry is None:
                self.progress("the local stack is not running")
            self._down_locked(state)
            self._save(state)

    def status(self) -> StackStatus:
        state = self._load()
        kafka_rec, reg_rec = state.kafka, state.registry

        def describe(
            name: str, rec: ProcessRecord | None, check: Callable[[str], bool]
        ) -> ComponentStatus:
            if rec is None:
                return ComponentStatus(name, None, False, False, "", "", "", "", "not started")
            running = self._ours(rec)
            answering = running and check(rec.address)
            detail = ", ".join(f"{k}={v}" for k, v in rec.extra.items())
            if not running:
                detail = f"pid {rec.pid} is gone; run `cdpflow stack up`"
            return ComponentStatus(
                name,
                rec.pid,
                running,
                answering,
                rec.address,
                rec.version,
                rec.started_at,
                rec.log,
                detail,
            )

        return StackStatus(
            kafka=describe(
                "kafka", kafka_rec, lambda a: kafka.is_answering(kafka.admin_client(a), 3.0)
            ),
            registry=describe("registry", reg_rec, lambda a: registry.is_answering(a, 3.0)),
        )

    def env(self) -> dict[str, str]:
        """KAFKA_BOOTSTRAP_SERVERS and SCHEMA_REGISTRY_URL of the running stack."""
        state = self._load()
        if not (self._ours(state.kafka) and self._ours(state.registry)):
            raise StackError(
                f"the local stack in {self.paths.root} is not running; start it with "
                "`cdpflow stack up`"
            )
        assert state.kafka is not None and state.registry is not None
        return {
            "KAFKA_BOOTSTRAP_SERVERS": state.kafka.address,
            "SCHEMA_REGISTRY_URL": state.registry.address,
        }

    def log_path(self, component: str) -> Path:
        if component not in ("kafka", "registry"):
            raise StackError(f"unknown component {component!r}; use kafka or registry")
        return self.paths.log(component)
