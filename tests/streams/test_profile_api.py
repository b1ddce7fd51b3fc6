"""The worker's profile API on real worker processes, the broker and the registry.

Two workers share one group, so each owns half the table partitions: every
profile must answer from either worker under any of its ids, which only works
when lookups reach the owner of each key.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import typer
from typer.testing import CliRunner

import streams.settings as settings_module
from sources.publisher import EventPublisher
from streams import topics
from streams.analytics_cli import register
from streams.settings import Settings
from streams.topics import ensure_topics
from streams.worker import worker_topic_specs
from tests.conftest import StackEndpoints
from tests.kafka_helpers import (
    REPO,
    TopicReader,
    WorkerProcess,
    end_offsets,
    start_group_at_end,
    worker_env,
)

TOKEN = "profile-api-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PREFIX = "CDP_PROFILE_API"

#: Runs the worker with CDP_PROFILE_API_* accepted by the core settings even
#: before streams.settings.DELEGATED_PREFIXES lists the prefix (a no-op after).
_LAUNCH = f"""
import streams.settings as s
if not any("{PREFIX}_TOKEN".startswith(p) for p in s.DELEGATED_PREFIXES):
    s.DELEGATED_PREFIXES = (*s.DELEGATED_PREFIXES, "{PREFIX}")
from streams.worker import run_worker
run_worker(s.Settings())
"""


class ApiWorker(WorkerProcess):
    def start(self) -> ApiWorker:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCH],
            env={**os.environ, **self.env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        return self


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Person:
    anon: str
    user: str
    index: int


@dataclass(frozen=True)
class World:
    urls: list[str]
    people: list[Person]
    old_id: str
    tag: str
    started: datetime


@pytest.fixture(scope="module")
def world(stack: StackEndpoints, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("profile-api")
    tag = uuid.uuid4().hex[:8]
    group = f"cdpflow-profile-api-{tag}"
    ensure_topics(Settings(), worker_topic_specs(Settings(cdp_worker_id=group)))
    start_group_at_end(
        stack.bootstrap_servers, group, [topics.EVENTS_RAW, topics.RECOMMENDATIONS_UPDATES]
    )
    ports = [_free_port(), _free_port()]
    workers = [
        ApiWorker(
            worker_env(
                stack.bootstrap_servers,
                stack.registry_url,
                group,
                tmp / f"data{i}",
                CDP_WORKER_WEB_ENABLED="true",
                CDP_WORKER_WEB_PORT=str(port),
                CDP_WORKER_SESSION_TIMEOUT_S="10",
                CDP_PROFILE_API_TOKEN=TOKEN,
            ),
            tmp / f"worker{i}.log",
        )
        for i, port in enumerate(ports)
    ]
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.wait_ready(120)
        started = datetime.now(UTC) - timedelta(seconds=1)
        people = [Person(f"anon-{tag}-{i}", f"user-{tag}-{i}", i) for i in range(8)]
        old_id = f"old-{tag}"
        with EventPublisher(Settings(), source_id="profile-api-test") as pub:
            for p in people:
                pub.publish_recommendations(
                    p.user, [(f"sku-{tag}-{p.index}-a", 0.9), (f"sku-{tag}-{p.index}-b", 0.4)], "m1"
                )
                pub.identify(
                    p.user,
                    {"plan": "pro", "n": p.index, "email": f"{p.user}@example.com"},
                    anonymous_id=p.anon,
                )
            pub.flush()
            for p in people:
                pub.track(None, "Product Viewed", {"sku": "x"}, anonymous_id=p.anon)
            pub.alias(old_id, people[0].user)
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        _wait_until_served(urls, people, old_id, workers)
        # One more event each, enriched now that the tables hold traits and
        # recommendations: the latest enriched event of a profile carries them.
        start = end_offsets(stack.bootstrap_servers, topics.EVENTS_ENRICHED)
        with EventPublisher(Settings(), source_id="profile-api-test") as pub:
            futures = [pub.track(None, "Cart Viewed", anonymous_id=p.anon) for p in people]
            latest = {f.result(30) for f in futures}
        reader = TopicReader(
            stack.bootstrap_servers, stack.registry_url, topics.EVENTS_ENRICHED, start
        )
        try:
            reader.poll_until(lambda vs: latest <= {v["event"]["messageId"] for v in vs}, 120)
        finally:
            reader.close()
        yield World(urls, people, old_id, tag, started)
    finally:
        for w in workers:
            w.stop()


def _get(url: str, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.get(url + path, headers=AUTH if headers is None else headers, timeout=30)


def _wait_until_served(
    urls: list[str], people: list[Person], old_id: str, workers: list[ApiWorker]
) -> None:
    """Both workers answer for every profile with its traits, recommendations and links."""
    deadline = time.monotonic() + 180
    last: Any = None
    while time.monotonic() < deadline:
        try:
            ok = True
            for url in urls:
                for p in people:
                    r = _get(url, f"/profiles/anon:{p.anon}?aliases=false")
                    last = (url, p, r.status_code, r.text[:300])
                    body = r.json() if r.status_code == 200 else {}
                    if not (
                        body.get("profileId") == p.user
                        and body.get("traits", {}).get("plan") == "pro"
                        and body.get("recommendations", {}).get("products")
                    ):
                        ok = False
                        break
                if ok:
                    r = _get(url, f"/profiles/{old_id}?aliases=false")
                    last = (url, old_id, r.status_code, r.text[:300])
                    ok = r.status_code == 200 and r.json()["profileId"] == people[0].user
                if not ok:
                    break
            if ok:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(1.0)
    tails = "\n".join(w.tail(30) for w in workers)
    raise AssertionError(f"profiles not served in time; last: {last}\n{tails}")


def test_profile_answers_under_every_id_from_every_worker(world: World) -> None:
    read_from: set[str] = set()
    for url in world.urls:
        for p in world.people:
            for requested in (p.user, f"anon:{p.anon}", p.anon):
                r = _get(url, f"/profiles/{requested}")
                assert r.status_code == 200, (url, requested, r.text)
                body = r.json()
                assert body["profileId"] == p.user
                assert body["requestedId"] == requested
                assert body["identities"]["userId"] == p.user
                assert p.anon in body["identities"]["anonymousIds"]
                assert body["traits"] == {
                    "plan": "pro",
                    "n": p.index,
                    "email": f"{p.user}@example.com",
                }
                recs = body["recommendations"]
                assert [x["productId"] for x in recs["products"]] == [
                    f"sku-{world.tag}-{p.index}-a",
                    f"sku-{world.tag}-{p.index}-b",
                ]
                assert recs["modelVersion"] == "m1"
                assert recs["generatedAt"].endswith("+00:00")
                assert body["servedBy"] == url
                read_from.update(body["readFrom"].values())
    # Each worker served some keys for the other one: the lookups were routed.
    assert read_from == set(world.urls)


def test_alias_links_an_old_id_and_lists_it(world: World) -> None:
    first = world.people[0]
    for url in world.urls:
        body = _get(url, f"/profiles/{world.old_id}").json()
        assert body["profileId"] == first.user
        assert body["resolvedVia"] == "identity_links"
        aliases = _get(url, f"/profiles/{first.user}").json()["identities"]["anonymousIds"]
        assert set(aliases) == {first.anon, world.old_id}


def test_recommendations_endpoint(world: World) -> None:
    p = world.people[3]
    for url in world.urls:
        for requested in (p.user, p.anon):
            r = _get(url, f"/profiles/{requested}/recommendations")
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["profileId"] == p.user
            assert [x["rank"] for x in body["products"]] == [1, 2]
            assert body["products"][0]["score"] == pytest.approx(0.9)
            assert body["modelVersion"] == "m1"


def test_unknown_profiles_are_404(world: World) -> None:
    for url in world.urls:
        for requested in (f"nobody-{world.tag}", f"anon:nobody-{world.tag}"):
            for suffix in ("", "/recommendations"):
                r = _get(url, f"/profiles/{requested}{suffix}")
                assert r.status_code == 404, r.text
                assert "unknown profile" in r.json()["error"]


def test_token_is_required(world: World) -> None:
    p = world.people[1]
    url = world.urls[0]
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer"},
    ):
        for path in (f"/profiles/{p.user}", f"/profiles/{p.user}/recommendations"):
            r = _get(url, path, headers)
            assert r.status_code == 401, (headers, r.text)
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
    # Worker-to-worker reads are behind the same token.
    r = _get(url, f"/internal/profiles/profile_traits/{p.user}", {})
    assert r.status_code == 401


def test_cli_profile_from_the_api_and_from_the_topic(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not any(f"{PREFIX}_TOKEN".startswith(p) for p in settings_module.DELEGATED_PREFIXES):
        monkeypatch.setattr(
            settings_module,
            "DELEGATED_PREFIXES",
            (*settings_module.DELEGATED_PREFIXES, PREFIX),
        )
    monkeypatch.setenv("CDP_PROFILE_API_TOKEN", TOKEN)
    monkeypatch.setenv("CDP_PROFILE_API_URL", world.urls[1])
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    p = world.people[2]

    via_api = runner.invoke(app, ["profile", f"anon:{p.anon}"])
    assert via_api.exit_code == 0, via_api.output
    assert "source: worker API" in via_api.output
    assert p.user in via_api.output and p.anon in via_api.output
    assert f"sku-{world.tag}-{p.index}-a" in via_api.output

    since = world.started.isoformat()
    scanned = runner.invoke(app, ["profile", p.anon, "--scan", "--since", since, "--json"])
    assert scanned.exit_code == 0, scanned.output
    assert "scan of cdp.events.enriched" in scanned.output
    assert f'"profileId": "{p.user}"' in scanned.output
    assert f'"{p.user}@example.com"' in scanned.output
    assert f'"sku-{world.tag}-{p.index}-a"' in scanned.output

    missing = runner.invoke(app, ["profile", f"nobody-{world.tag}"])
    assert missing.exit_code == 1
    assert "no profile" in missing.output
