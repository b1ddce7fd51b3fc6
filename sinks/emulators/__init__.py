"""Local emulators of the destination APIs, for contract tests, fault tests and the demo.

In a test (same event loop)::

    emu = GA4Emulator()                      # or SegmentEmulator(write_keys=[...]) ...
    async with emu.serve() as url:           # a free port on 127.0.0.1
        emu.throttle_next(2, retry_after_s=1)
        ...                                  # point the destination at ``url``
        assert emu.state.pii_violations == []

From the demo (synchronous code, emulators on a background thread or process)::

    with start_all() as cluster:             # all four, free ports
        env = cluster.env()                  # CDP_SINK_<DEST>_* for the sinks
        cluster.urls["aep"]                  # base URLs
        cluster.state("ga4")                 # GET /__emulator/state as a dict
        cluster.inject("mixpanel", [{"kind": "outage", "duration_s": 5}])

Standalone: ``python -m sinks.emulators ga4 --port 8090`` (or ``all``); then
``curl localhost:8090/__emulator/state``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

from sinks.emulators.aep import AepEmulator
from sinks.emulators.base import (
    CONTROL_PREFIX,
    Emulator,
    EmulatorState,
    Fault,
    HashRule,
    ThreadedEmulators,
)
from sinks.emulators.ga4 import Ga4Emulator
from sinks.emulators.google_ads import GoogleAdsEmulator
from sinks.emulators.linkedin import LinkedInEmulator
from sinks.emulators.meta import MetaEmulator
from sinks.emulators.mixpanel import MixpanelEmulator
from sinks.emulators.segment import SegmentEmulator

GA4Emulator = Ga4Emulator

EMULATORS: dict[str, type[Emulator]] = {
    "segment": SegmentEmulator,
    "mixpanel": MixpanelEmulator,
    "aep": AepEmulator,
    "ga4": Ga4Emulator,
    "google_ads": GoogleAdsEmulator,
    "meta": MetaEmulator,
    "linkedin": LinkedInEmulator,
}

__all__ = [
    "CONTROL_PREFIX",
    "EMULATORS",
    "AepEmulator",
    "Emulator",
    "EmulatorCluster",
    "EmulatorState",
    "Fault",
    "GA4Emulator",
    "Ga4Emulator",
    "GoogleAdsEmulator",
    "HashRule",
    "LinkedInEmulator",
    "MetaEmulator",
    "MixpanelEmulator",
    "SegmentEmulator",
    "create",
    "start_all",
]


def create(name: str, config: Mapping[str, Any] | None = None) -> Emulator:
    """An emulator by name with constructor keyword arguments (JSON-friendly)."""
    try:
        cls = EMULATORS[name]
    except KeyError:
        raise ValueError(f"unknown emulator {name!r}; known: {', '.join(EMULATORS)}") from None
    return cls(**dict(config or {}))


def _http_json(method: str, url: str, payload: Any = None, timeout: float = 10.0) -> Any:
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(  # noqa: S310 - our own emulator on localhost
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
        return json.loads(resp.read() or b"null")


@dataclass
class EmulatorCluster:
    """Running emulators: their URLs, credentials, and access to their state over HTTP.

    Reading state over HTTP works the same whether they run on a thread or in a
    child process, and never races the emulators' event loop.
    """

    urls: dict[str, str]
    credentials: dict[str, dict[str, str]]
    sink_envs: dict[str, dict[str, str]]
    mode: Literal["thread", "process"]
    _threaded: ThreadedEmulators | None = None
    _process: subprocess.Popen[bytes] | None = None
    emulators: dict[str, Emulator] = field(default_factory=dict)

    def state(self, name: str, *, items: bool = True) -> dict[str, Any]:
        query = "" if items else "?items=0"
        result: dict[str, Any] = _http_json(
            "GET", f"{self.urls[name]}{CONTROL_PREFIX}/state{query}"
        )
        return result

    def inject(self, name: str, faults: Sequence[Mapping[str, Any]], replace: bool = False) -> Any:
        return _http_json(
            "POST",
            f"{self.urls[name]}{CONTROL_PREFIX}/faults",
            {"faults": list(faults), "replace": replace},
        )

    def clear_faults(self, name: str) -> None:
        _http_json("DELETE", f"{self.urls[name]}{CONTROL_PREFIX}/faults")

    def reset(self, name: str | None = None) -> None:
        for n in [name] if name else list(self.urls):
            _http_json("POST", f"{self.urls[n]}{CONTROL_PREFIX}/reset")

    def env(self) -> dict[str, str]:
        """``CDP_SINK_<DEST>_*`` for every running emulator.

        AEP and GA4 get endpoint plus credentials (their settings are defined
        alongside). Segment and Mixpanel get only the endpoint; their
        credentials are in :attr:`credentials` for the demo to map onto those
        destinations' own setting names.
        """
        merged: dict[str, str] = {}
        for env in self.sink_envs.values():
            merged.update(env)
        return merged

    def stop(self) -> None:
        if self._threaded is not None:
            self._threaded.stop()
            self._threaded = None
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5)
            self._process = None

    def __enter__(self) -> EmulatorCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_all(
    names: Iterable[str] = tuple(EMULATORS),
    *,
    mode: Literal["thread", "process"] = "thread",
    host: str = "127.0.0.1",
    ports: Mapping[str, int] | None = None,
    configs: Mapping[str, Mapping[str, Any]] | None = None,
) -> EmulatorCluster:
    """Start emulators on free ports (or ``ports``) in a daemon thread or a child process.

    ``configs`` holds constructor keyword arguments per emulator (credentials,
    limits). Stop with :meth:`EmulatorCluster.stop` or use it as a context manager.
    """
    wanted = list(names)
    configs = dict(configs or {})
    if mode == "thread":
        emulators = {n: create(n, configs.get(n)) for n in wanted}
        threaded = ThreadedEmulators(emulators)
        threaded.start(host, ports)
        return EmulatorCluster(
            urls=dict(threaded.urls),
            credentials={n: e.credentials() for n, e in emulators.items()},
            sink_envs={n: e.sink_env(threaded.urls[n]) for n, e in emulators.items()},
            mode="thread",
            _threaded=threaded,
            emulators=emulators,
        )
    cmd = [sys.executable, "-m", "sinks.emulators", *wanted, "--host", host, "--announce"]
    if configs:
        cmd += ["--config", json.dumps(configs)]
    if ports:
        cmd += ["--ports", json.dumps(dict(ports))]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.wait(5)
        raise RuntimeError(f"emulator process exited with {proc.returncode} before announcing")
    announced = json.loads(line)
    return EmulatorCluster(
        urls={n: a["url"] for n, a in announced.items()},
        credentials={n: a["credentials"] for n, a in announced.items()},
        sink_envs={n: a["env"] for n, a in announced.items()},
        mode="process",
        _process=proc,
    )
