"""Machinery shared by the local destination emulators.

The emulators exist so that every destination module can be tested against the
vendor's *contract* (auth, limits, status codes, partial failures, silent drops,
dedupe) without network access or vendor accounts, and so that the delivery
engine's retry / circuit-breaker / DLQ paths can be exercised on demand through
fault injection. What a real API does silently (Segment's and GA4's drops,
Adobe's asynchronous failures) is made visible here through the recorded state.

Control surface, identical for every emulator (never subject to faults):

``GET  /__emulator/state[?items=0]``  what was accepted, rejected, dropped, deduped,
                                       which PII rules were broken, faults applied
``POST /__emulator/faults``            JSON plan ``{"faults": [...], "replace": false}``
``DELETE /__emulator/faults``          clear pending faults and outages
``POST /__emulator/reset``             forget everything (state, dedupe, faults)
``GET  /__emulator/health``            liveness for process mode

A fault is ``{"kind": ..., ...}`` with kind one of ``status`` (next ``count``
requests answer ``status``), ``throttle`` (429 with ``Retry-After:
retry_after_s``), ``delay`` (answer normally after ``delay_s``), ``timeout``
(never answer within any sane client timeout, then drop), ``drop`` (close the
connection without a response) and ``outage`` (every request answers ``status``
for ``duration_s`` seconds from injection). ``timeout`` and ``drop`` take
``"process": true`` to handle the request first — the vendor *did* take the data
but the client never hears so — which is how at-least-once duplicates arise.
``path_prefix`` limits a fault to matching paths.

Access logging is off on purpose: vendor URLs carry secrets (GA4 ``api_secret``)
and bodies carry PII; nothing here logs either.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import re
import threading
import time
import zlib
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, cast, get_args

import orjson
from aiohttp import web

CONTROL_PREFIX = "/__emulator"

FaultKind = Literal["status", "throttle", "delay", "timeout", "drop", "outage"]
FAULT_KINDS: frozenset[str] = frozenset(get_args(FaultKind))

#: Default hang for ``timeout`` faults: far beyond any client timeout we configure.
DEFAULT_HANG_S = 3600.0

#: The lookbehind makes it linear: a match may only start where a local part starts.
EMAIL_RE = re.compile(
    r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}"
)
SHA256_HEX_RE = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------- faults


@dataclass(slots=True)
class Fault:
    """One injected misbehaviour. ``count`` is how many requests it still applies to."""

    kind: FaultKind
    count: int = 1
    status: int | None = None
    retry_after_s: float | None = None
    delay_s: float | None = None
    duration_s: float = 0.0
    process: bool = False
    path_prefix: str | None = None
    body: Any = None
    #: monotonic end of an outage window (set on injection)
    until: float | None = None

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Fault:
        kind = raw.get("kind")
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {sorted(FAULT_KINDS)}")
        known = {
            "kind",
            "count",
            "status",
            "retry_after_s",
            "delay_s",
            "duration_s",
            "process",
            "path_prefix",
            "body",
        }
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"unknown fault keys: {sorted(unknown)}")
        count = int(raw.get("count", 1))
        if count < 1:
            raise ValueError("count must be >= 1")
        status = raw.get("status")
        retry_after = raw.get("retry_after_s")
        delay = raw.get("delay_s")
        return cls(
            kind=cast(FaultKind, kind),
            count=count,
            status=int(status) if status is not None else None,
            retry_after_s=float(retry_after) if retry_after is not None else None,
            delay_s=float(delay) if delay is not None else None,
            duration_s=float(raw.get("duration_s", 0.0)),
            process=bool(raw.get("process", False)),
            path_prefix=raw.get("path_prefix"),
            body=raw.get("body"),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "count": self.count}
        for key in ("status", "retry_after_s", "delay_s", "path_prefix"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.kind == "outage":
            out["duration_s"] = self.duration_s
            out["remaining_s"] = max(0.0, (self.until or 0.0) - time.monotonic())
        if self.process:
            out["process"] = True
        return out

    def applies_to(self, path: str) -> bool:
        return self.path_prefix is None or path.startswith(self.path_prefix)


# --------------------------------------------------------------------------- dedupe


class Deduper:
    """Remembers keys for a window, like the vendors' dedupe stores (Segment: >= 24 h)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._seen: dict[str, float] = {}

    def seen(self, key: str, now: float) -> bool:
        """True when ``key`` was seen within the window; records it either way."""
        first = self._seen.get(key)
        if len(self._seen) > 200_000:
            self._prune(now)
        if first is not None and now - first <= self.window_s:
            return True
        self._seen[key] = now
        return False

    def _prune(self, now: float) -> None:
        self._seen = {k: t for k, t in self._seen.items() if now - t <= self.window_s}

    def clear(self) -> None:
        self._seen.clear()


# --------------------------------------------------------------------------- PII


@dataclass(frozen=True, slots=True)
class HashRule:
    """Leaves matching ``pattern`` (``a.b[*].c``, ``*`` = anything) must match ``regex``.

    Ad-platform emulators declare where the vendor requires hashed identifiers;
    a value that is not a hash there is raw PII that must never have left us.
    """

    pattern: str
    regex: re.Pattern[str] = SHA256_HEX_RE
    kind: str = "not_hashed"


def iter_leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(path, scalar) pairs with list indices written as ``[*]`` for pattern matching."""
    stack: list[tuple[str, Any]] = [(path, value)]
    while stack:
        p, node = stack.pop()
        if isinstance(node, dict):
            for k, v in node.items():
                stack.append((f"{p}.{k}" if p else str(k), v))
        elif isinstance(node, list):
            for v in node:
                stack.append((f"{p}[*]", v))
        else:
            yield p, node


@functools.lru_cache(maxsize=256)
def _pattern(pattern: str) -> re.Pattern[str]:
    """``*`` matches anything; ``[*]`` is a literal list step (not an fnmatch class)."""
    steps = pattern.split("[*]")
    body = r"\[\*\]".join(re.escape(step).replace(r"\*", ".*") for step in steps)
    return re.compile(f"^{body}$")


def find_pii(
    payload: Any, *, raw_email: bool, hash_rules: Sequence[HashRule] = ()
) -> list[tuple[str, str]]:
    """``(field path, kind)`` for every PII rule the payload breaks. Values are never kept."""
    found: list[tuple[str, str]] = []
    for path, leaf in iter_leaves(payload):
        if not isinstance(leaf, str):
            continue
        matched_rule = False
        for rule in hash_rules:
            if _pattern(rule.pattern).match(path):
                matched_rule = True
                if not rule.regex.match(leaf):
                    found.append((path, rule.kind))
                break
        if raw_email and not matched_rule and EMAIL_RE.search(leaf):
            found.append((path, "raw_email"))
    return found


# --------------------------------------------------------------------------- state


class EmulatorState:
    """Everything an emulator saw. Mutated only on the emulator's event loop."""

    def __init__(self, name: str, dedupe_window_s: float) -> None:
        self.name = name
        self.dedupe = Deduper(dedupe_window_s)
        self.pending_faults: list[Fault] = []
        self.outages: list[Fault] = []
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.accepted: list[dict[str, Any]] = []
        self.rejected_requests: list[dict[str, Any]] = []
        self.rejected_items: list[dict[str, Any]] = []
        self.dropped: list[dict[str, Any]] = []
        self.pii_violations: list[dict[str, Any]] = []
        self.faults_applied: list[dict[str, Any]] = []
        self.counters: dict[str, int] = {}
        self.dedupe.clear()
        self.pending_faults.clear()
        self.outages.clear()

    # -- recording

    def accept(
        self, item: Any, *, path: str, key: str | None = None, duplicate: bool | None = None
    ) -> bool:
        """Record an accepted item; returns whether its dedupe key was already seen."""
        dup = duplicate
        if dup is None:
            dup = key is not None and self.dedupe.seen(key, time.time())
        self.accepted.append(
            {"item": item, "key": key, "duplicate": dup, "path": path, "at": time.time()}
        )
        return dup

    def reject_request(self, path: str, status: int, reason: str, message: str = "") -> None:
        self.rejected_requests.append(
            {"path": path, "status": status, "reason": reason, "message": message[:500]}
        )

    def reject_item(
        self, path: str, index: int, reason: str, message: str = "", key: str | None = None
    ) -> None:
        self.rejected_items.append(
            {"path": path, "index": index, "reason": reason, "message": message[:500], "key": key}
        )

    def drop(
        self,
        path: str,
        reason: str,
        message: str = "",
        *,
        item: Any = None,
        key: str | None = None,
    ) -> None:
        """An item the vendor answers 2xx for but never processes (the silent failures)."""
        self.dropped.append(
            {"path": path, "reason": reason, "message": message[:500], "key": key, "item": item}
        )

    def record_pii(self, path: str, violations: Sequence[tuple[str, str]]) -> None:
        for field_path, kind in violations:
            self.pii_violations.append({"path": path, "field": field_path, "kind": kind})

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    # -- reading

    @property
    def duplicates(self) -> int:
        return sum(1 for a in self.accepted if a["duplicate"])

    def accepted_items(self) -> list[Any]:
        return [a["item"] for a in self.accepted]

    def unique_items(self) -> list[Any]:
        """Last write wins per dedupe key: what the vendor would show in queries."""
        by_key: dict[str, Any] = {}
        keyless: list[Any] = []
        for a in self.accepted:
            if a["key"] is None:
                keyless.append(a["item"])
            else:
                by_key.pop(a["key"], None)
                by_key[a["key"]] = a["item"]
        return keyless + list(by_key.values())

    def snapshot(self, *, items: bool = True) -> dict[str, Any]:
        """JSON-ready view for ``GET /__emulator/state`` and cross-thread readers."""
        snap: dict[str, Any] = {
            "name": self.name,
            "requests": self.requests,
            "acceptedCount": len(self.accepted),
            "uniqueCount": len(self.unique_items()),
            "duplicates": self.duplicates,
            "rejectedRequestCount": len(self.rejected_requests),
            "rejectedItemCount": len(self.rejected_items),
            "droppedCount": len(self.dropped),
            "rejectedRequests": list(self.rejected_requests),
            "rejectedItems": list(self.rejected_items),
            "piiViolations": list(self.pii_violations),
            "faultsApplied": list(self.faults_applied),
            "pendingFaults": [f.to_json() for f in self.pending_faults],
            "outages": [f.to_json() for f in self.active_outages()],
            "counters": dict(self.counters),
        }
        if items:
            snap["accepted"] = [dict(a) for a in self.accepted]
            snap["dropped"] = list(self.dropped)
        else:
            snap["dropped"] = [{k: v for k, v in d.items() if k != "item"} for d in self.dropped]
        return snap

    # -- faults

    def add_fault(self, fault: Fault) -> None:
        if fault.kind == "outage":
            fault.until = time.monotonic() + fault.duration_s
            self.outages.append(fault)
        else:
            self.pending_faults.append(fault)

    def clear_faults(self) -> None:
        self.pending_faults.clear()
        self.outages.clear()

    def active_outages(self) -> list[Fault]:
        now = time.monotonic()
        self.outages = [o for o in self.outages if (o.until or 0.0) > now]
        return self.outages

    def take_fault(self, path: str) -> Fault | None:
        """The fault the next request on ``path`` suffers, consuming one use of it."""
        for outage in self.active_outages():
            if outage.applies_to(path):
                return outage
        for i, fault in enumerate(self.pending_faults):
            if fault.applies_to(path):
                fault.count -= 1
                if fault.count <= 0:
                    del self.pending_faults[i]
                return fault
        return None


# --------------------------------------------------------------------------- body helpers


class BodyError(Exception):
    """The request body could not be decoded (bad gzip, not JSON)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


async def read_body(request: web.Request) -> bytes:
    """The request body, uncompressed.

    aiohttp's server already inflates ``Content-Encoding: gzip/deflate`` bodies;
    this only inflates what is still compressed (a server started with
    ``auto_decompress=False``). Vendors measure size limits on the uncompressed body
    (Mixpanel says so explicitly), so callers check limits on what this returns.
    """
    raw = await request.read()
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    try:
        if encoding == "gzip" and raw[:2] == b"\x1f\x8b":
            return gzip.decompress(raw)
    except (OSError, zlib.error, EOFError) as exc:
        raise BodyError("invalid_encoding", "the body is not valid " + encoding) from exc
    return raw


def parse_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BodyError("invalid_json", "the body is not valid JSON") from exc


def json_response(
    payload: Any, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload),
        status=status,
        content_type="application/json",
        headers=dict(headers or {}),
    )


# --------------------------------------------------------------------------- emulator


class Emulator:
    """A vendor API stand-in: subclasses add routes and render vendor-shaped errors."""

    name: ClassVar[str]
    #: Where the vendor requires hashed identifiers (the PII hook for ad platforms).
    hash_rules: ClassVar[tuple[HashRule, ...]] = ()

    def __init__(
        self,
        *,
        forbid_raw_email: bool = False,
        dedupe_window_s: float = 24 * 3600.0,
        client_max_size: int = 64 * 1024 * 1024,
    ) -> None:
        self.forbid_raw_email = forbid_raw_email
        self.client_max_size = client_max_size
        self.state = EmulatorState(self.name, dedupe_window_s)
        self.url: str | None = None

    # -- what subclasses provide

    def add_routes(self, router: web.UrlDispatcher) -> None:
        raise NotImplementedError

    def error_response(
        self, status: int, *, retry_after_s: float | None = None, body: Any = None
    ) -> web.Response:
        """A vendor-shaped error (used by fault injection). Subclasses override the body."""
        payload = body if body is not None else {"status": status, "error": "injected fault"}
        return json_response(payload, status, self.retry_headers(retry_after_s))

    def credentials(self) -> dict[str, str]:
        """The (fake) credentials this instance accepts, for wiring sinks to it."""
        return {}

    def sink_env(self, url: str) -> dict[str, str]:
        """``CDP_SINK_<NAME>_*`` variables pointing a destination at this emulator."""
        return {f"CDP_SINK_{self.name.upper()}_ENDPOINT": url}

    # -- helpers for subclasses

    @staticmethod
    def retry_headers(retry_after_s: float | None) -> dict[str, str]:
        if retry_after_s is None:
            return {}
        return {"Retry-After": str(max(0, round(retry_after_s)))}

    def check_pii(self, path: str, payload: Any) -> list[tuple[str, str]]:
        """Record (never reject) PII that reached the vendor where it must not."""
        if not self.forbid_raw_email and not self.hash_rules:
            return []
        found = find_pii(payload, raw_email=self.forbid_raw_email, hash_rules=self.hash_rules)
        self.state.record_pii(path, found)
        return found

    # -- fault API (Python side; the HTTP side posts the same shapes as JSON)

    def inject(self, *faults: Fault | Mapping[str, Any]) -> None:
        for f in faults:
            self.state.add_fault(f if isinstance(f, Fault) else Fault.from_json(f))

    def fail_next(self, count: int = 1, status: int = 503, path_prefix: str | None = None) -> None:
        self.inject(Fault("status", count=count, status=status, path_prefix=path_prefix))

    def throttle_next(
        self,
        count: int = 1,
        retry_after_s: float | None = 1.0,
        status: int = 429,
        path_prefix: str | None = None,
    ) -> None:
        self.inject(
            Fault(
                "throttle",
                count=count,
                status=status,
                retry_after_s=retry_after_s,
                path_prefix=path_prefix,
            )
        )

    def slow_next(self, count: int = 1, delay_s: float = 1.0) -> None:
        self.inject(Fault("delay", count=count, delay_s=delay_s))

    def hang_next(
        self, count: int = 1, seconds: float = DEFAULT_HANG_S, process: bool = False
    ) -> None:
        self.inject(Fault("timeout", count=count, delay_s=seconds, process=process))

    def drop_next(self, count: int = 1, process: bool = False) -> None:
        self.inject(Fault("drop", count=count, process=process))

    def outage(self, seconds: float, status: int = 503) -> None:
        self.inject(Fault("outage", status=status, duration_s=seconds))

    def clear_faults(self) -> None:
        self.state.clear_faults()

    def reset(self) -> None:
        self.state.reset()

    # -- app

    def build_app(self) -> web.Application:
        @web.middleware
        async def faults(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.path.startswith(CONTROL_PREFIX):
                return cast(web.StreamResponse, await handler(request))
            self.state.requests += 1
            fault = self.state.take_fault(request.path)
            if fault is None:
                return cast(web.StreamResponse, await handler(request))
            self.state.faults_applied.append(
                {"kind": fault.kind, "path": request.path, "at": time.time()}
            )
            return await self._apply_fault(fault, request, handler)

        app = web.Application(client_max_size=self.client_max_size, middlewares=[faults])
        app.router.add_get(f"{CONTROL_PREFIX}/state", self._h_state)
        app.router.add_post(f"{CONTROL_PREFIX}/faults", self._h_faults)
        app.router.add_delete(f"{CONTROL_PREFIX}/faults", self._h_clear_faults)
        app.router.add_post(f"{CONTROL_PREFIX}/reset", self._h_reset)
        app.router.add_get(f"{CONTROL_PREFIX}/health", self._h_health)
        self.add_routes(app.router)
        return app

    async def _apply_fault(
        self, fault: Fault, request: web.Request, handler: Any
    ) -> web.StreamResponse:
        if fault.kind in ("status", "outage", "throttle"):
            await request.read()  # drain, so the client is not reset mid-upload
            status = fault.status or (429 if fault.kind == "throttle" else 503)
            return self.error_response(status, retry_after_s=fault.retry_after_s, body=fault.body)
        if fault.kind == "delay":
            await asyncio.sleep(fault.delay_s if fault.delay_s is not None else 1.0)
            return cast(web.StreamResponse, await handler(request))
        if fault.process:
            await handler(request)  # the vendor took it; the client will never know
        else:
            await request.read()
        transport = request.transport
        if fault.kind == "timeout":
            deadline = time.monotonic() + (
                fault.delay_s if fault.delay_s is not None else DEFAULT_HANG_S
            )
            # Poll rather than sleep once: aiohttp does not cancel handlers when the
            # client goes away, and a forgotten hour-long sleep would stall shutdown.
            while time.monotonic() < deadline and transport is not None:
                if transport.is_closing():
                    break
                await asyncio.sleep(0.02)
        if transport is not None:
            transport.close()
        return web.Response(status=500)

    async def _h_state(self, request: web.Request) -> web.Response:
        items = request.query.get("items", "1") not in ("0", "false", "no")
        return json_response(self.state.snapshot(items=items))

    async def _h_faults(self, request: web.Request) -> web.Response:
        try:
            plan = orjson.loads(await request.read() or b"{}")
            if isinstance(plan, list):
                plan = {"faults": plan}
            if not isinstance(plan, dict) or not isinstance(plan.get("faults", []), list):
                raise ValueError('plan must be {"faults": [...]} or a list of faults')
            parsed = [Fault.from_json(f) for f in plan.get("faults", [])]
        except (ValueError, TypeError, orjson.JSONDecodeError) as exc:
            return json_response({"error": str(exc)}, 400)
        if plan.get("replace"):
            self.state.clear_faults()
        for f in parsed:
            self.state.add_fault(f)
        return json_response(
            {
                "pendingFaults": [f.to_json() for f in self.state.pending_faults],
                "outages": [f.to_json() for f in self.state.active_outages()],
            }
        )

    async def _h_clear_faults(self, request: web.Request) -> web.Response:
        self.state.clear_faults()
        return json_response({"pendingFaults": [], "outages": []})

    async def _h_reset(self, request: web.Request) -> web.Response:
        self.state.reset()
        return json_response({"reset": True})

    async def _h_health(self, request: web.Request) -> web.Response:
        return json_response({"name": self.name, "ok": True})

    # -- running

    @asynccontextmanager
    async def serve(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
        """Serve on ``host:port`` (0 = a free port) in the current loop; yields the base URL."""
        runner = web.AppRunner(
            self.build_app(), handle_signals=False, access_log=None, shutdown_timeout=0.5
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
            bound_host, bound_port = runner.addresses[0][:2]
            self.url = f"http://{bound_host}:{bound_port}"
            yield self.url
        finally:
            await runner.cleanup()


# --------------------------------------------------------------------------- background thread


@dataclass
class ThreadedEmulators:
    """Emulators serving on their own event loop in a daemon thread (for the demo / sync code)."""

    emulators: dict[str, Emulator]
    urls: dict[str, str] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _stop: asyncio.Event | None = None

    def start(self, host: str = "127.0.0.1", ports: Mapping[str, int] | None = None) -> None:
        ready = threading.Event()
        failure: list[BaseException] = []

        async def main() -> None:
            self._stop = asyncio.Event()
            try:
                async with serve_many(self.emulators, host, ports or {}) as urls:
                    self.urls.update(urls)
                    ready.set()
                    await self._stop.wait()
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                raise

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(main())
            except BaseException:  # noqa: S110 - reported through ``failure``
                pass
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="cdpflow-emulators", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("emulators did not start within 30 s")
        if failure:
            raise RuntimeError(f"emulators failed to start: {failure[0]!r}")

    def call(self, fn: Any, timeout: float = 10.0) -> Any:
        """Run ``fn()`` on the emulators' loop (state is only touched there) and return it."""
        if self._loop is None:
            raise RuntimeError("not started")

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)
        self._loop = None
        self._thread = None


@asynccontextmanager
async def serve_many(
    emulators: Mapping[str, Emulator], host: str, ports: Mapping[str, int]
) -> AsyncIterator[dict[str, str]]:
    from contextlib import AsyncExitStack

    async with AsyncExitStack() as stack:
        urls: dict[str, str] = {}
        for name, emulator in emulators.items():
            urls[name] = await stack.enter_async_context(emulator.serve(host, ports.get(name, 0)))
        yield urls
