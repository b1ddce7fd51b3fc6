"""The collector's accepted events/s: ``/v1/batch`` bodies of 100 over several connections.

``python -m bench.collector_load serve`` runs :func:`sources.collector.create_app`
(through ``run_collector``) in its own process from the environment; the
benchmark drives it with :func:`drive`, an aiohttp client holding
``connections`` keep-alive connections, each posting its next batch as soon as
the previous one was answered. Every answer is a broker-acknowledged batch
(acks=all): accepted events/s is the sum of ``accepted`` over the run's wall time.
"""

from __future__ import annotations

import asyncio
import base64
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import count

import aiohttp
import orjson

from sources.generator import generate_events

BATCH_PATH = "/v1/batch"


def batch_bodies(events: int, users: int, seed: int, batch: int = 100) -> list[bytes]:
    """Segment ``/v1/batch`` JSON bodies of ``batch`` messages each (as analytics SDKs send)."""
    bodies: list[bytes] = []
    messages = list(generate_events(events, users, seed))
    for i in range(0, len(messages), batch):
        chunk = messages[i : i + batch]
        bodies.append(orjson.dumps({"batch": chunk}))
    return bodies


def basic_auth(write_key: str) -> str:
    return "Basic " + base64.b64encode(f"{write_key}:".encode()).decode()


@dataclass
class LoadResult:
    requests: int = 0
    accepted: int = 0
    rejected: int = 0
    failed_requests: int = 0
    elapsed_s: float = 0.0
    request_ms: list[float] = field(default_factory=list)

    @property
    def accepted_per_s(self) -> float:
        return self.accepted / self.elapsed_s if self.elapsed_s else 0.0


async def drive(
    base_url: str,
    write_key: str,
    bodies: Sequence[bytes],
    *,
    connections: int,
    duration_s: float,
) -> LoadResult:
    """Post batches on ``connections`` connections for ``duration_s`` (in-flight ones finish)."""
    result = LoadResult()
    headers = {"Authorization": basic_auth(write_key), "Content-Type": "application/json"}
    next_body = count()
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        deadline = started + duration_s

        async def client() -> None:
            while time.perf_counter() < deadline:
                body = bodies[next(next_body) % len(bodies)]
                sent = time.perf_counter()
                async with session.post(base_url + BATCH_PATH, data=body, headers=headers) as r:
                    payload = await r.json(content_type=None)
                result.request_ms.append((time.perf_counter() - sent) * 1000)
                result.requests += 1
                if r.status != 200:
                    result.failed_requests += 1
                    continue
                result.accepted += int(payload.get("accepted", 0))
                result.rejected += int(payload.get("rejected", 0))

        await asyncio.gather(*(client() for _ in range(connections)))
        result.elapsed_s = time.perf_counter() - started
    return result


async def wait_ready(base_url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(base_url + "/health/ready") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"collector at {base_url} not ready after {timeout_s} s")
            await asyncio.sleep(0.2)


def serve() -> None:
    """The collector, configured from the environment (run as a separate process)."""
    import logging

    from sources.collector import run_collector
    from streams.settings import Settings

    logging.basicConfig(level=logging.WARNING)
    run_collector(Settings())


if __name__ == "__main__":
    if sys.argv[1:] != ["serve"]:
        sys.exit("usage: python -m bench.collector_load serve")
    serve()
