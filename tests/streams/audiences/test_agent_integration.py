"""The audience agent in a real worker process on the real broker and registry.

Raw events go through the whole topology (ingest, profiles, enrichment) into the
audience agent; recommendation updates through the recommendations route agent.
Asserts the ADDs, the window-expiry REMOVE driven by clock ticks, the consent
withdrawal, order and deletion REMOVEs, that identifiers are hashed, and that
replaying identical input emits nothing new. "Nothing new" is proven without
sleeping: after the replay, one sentinel input per replayed profile (same key,
so same partitions, processed after the replay) yields a known update, and every
update that appears before the sentinels' must be absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from streams import topics
from streams.audiences.members import members_of, read_states
from streams.audiences.settings import AUDIENCE_REPARTITION_SUFFIX
from streams.events import now_ms
from streams.serde import AvroSerde
from streams.settings import Settings
from streams.worker import worker_topic_specs
from tests.conftest import StackEndpoints
from tests.kafka_helpers import (
    REPO,
    TopicReader,
    WorkerProcess,
    audience_worker_process,
    end_offsets,
    worker_env,
)
from tests.streams.audiences.factories import assert_hashed
from tests.streams.pipeline_helpers import RawProducer

WINDOW_S = 20  # it-browse: expires during the test
CART_WINDOW = "10m"  # it-cart: does not
CONFIG = f"""\
version: "it-1"
consent: Advertising
deletion_events: [User Deleted]
default_country: US
audiences:
  - name: it-cart
    platforms:
      meta: {{audience_id: "501"}}
      linkedin: {{segment_id: "601"}}
    rule:
      all:
        - event: {{name: Product Added, within: {CART_WINDOW}}}
        - not:
            event: {{name: Order Completed, within: {CART_WINDOW}, since_last: Product Added}}
  - name: it-browse
    platforms:
      meta: {{audience_id: "502"}}
    rule:
      event: {{name: Product Viewed, within: {WINDOW_S}s}}
  - name: it-shoes
    platforms:
      google_ads: {{user_list: "customers/1/userLists/9"}}
    rule:
      recommendation: {{category: shoes, min_score: 0.5}}
  - name: it-sync
    platforms:
      meta: {{audience_id: "503"}}
    rule:
      trait: {{name: plan, equals: sync-test}}
"""


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


class Script:
    """Segment messages with fixed messageIds and timestamps, so they can be replayed."""

    def __init__(self, out: RawProducer, tag: str) -> None:
        self.out = out
        self.tag = tag
        self.sent: list[dict[str, Any]] = []
        self.n = 0

    def send(
        self,
        user: str,
        kind: str,
        *,
        event: str | None = None,
        traits: dict[str, Any] | None = None,
        consent: bool | None = None,
    ) -> str:
        self.n += 1
        msg: dict[str, Any] = {
            "type": kind,
            "userId": user,
            "messageId": f"{self.tag}-{self.n}",
            "timestamp": iso(now_ms()),
        }
        if event:
            msg["event"] = event
        if kind == "page":
            msg["name"] = "Home"
        if traits is not None:
            msg["traits"] = traits
        if consent is not None:
            msg["context"] = {"consent": {"categoryPreferences": {"Advertising": consent}}}
        self.sent.append(msg)
        self.out.segment(msg)
        return str(msg["messageId"])


@pytest.fixture(scope="module")
def audience_worker(
    stack: StackEndpoints, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    tmp = tmp_path_factory.mktemp("audiences")
    config = tmp / "audiences.yaml"
    config.write_text(CONFIG)
    proc = audience_worker_process(stack.bootstrap_servers, stack.registry_url, config, tmp).start()
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def _updates_reader(stack: StackEndpoints) -> TopicReader:
    return TopicReader(
        stack.bootstrap_servers,
        stack.registry_url,
        topics.AUDIENCES_UPDATES,
        end_offsets(stack.bootstrap_servers, topics.AUDIENCES_UPDATES),
    )


def _mine(values: list[dict[str, Any]], users: set[str]) -> list[dict[str, Any]]:
    return [v for v in values if v["profileId"] in users]


def _keys(values: list[dict[str, Any]]) -> set[tuple[str, str, str, str, str]]:
    return {
        (v["profileId"], v["audience"], v["platform"], v["action"], v["reason"]) for v in values
    }


def test_membership_changes_reach_cdp_audiences_updates(
    audience_worker: WorkerProcess, stack: StackEndpoints, settings: Settings, serde: AvroSerde
) -> None:
    tag = uuid.uuid4().hex[:8]
    a, b, c, d, e, f = (f"{x}-{tag}" for x in "abcdef")
    users = {a, b, c, d, e, f}
    reader = _updates_reader(stack)
    out = RawProducer(settings, serde)
    script = Script(out, tag)
    for user in (a, b, d, f):
        script.send(user, "identify", traits={"email": f"{user}@Example.com"}, consent=True)
    script.send(c, "identify", traits={"email": f"{c}@example.com"}, consent=False)
    script.send(e, "identify", traits={"plan": "pro"}, consent=True)  # no identifiers
    for user in sorted(users):
        script.send(user, "track", event="Product Added")
    script.send(b, "track", event="Product Viewed")
    rec = {
        "updateId": f"rec-{tag}",
        "customerId": a,
        "products": [
            {"productId": "shoe-1", "score": 0.9, "rank": 1, "reason": None, "category": "shoes"}
        ],
        "modelVersion": "m1",
        "generatedAt": now_ms(),
    }
    rec_bytes = out.encode_rec(rec)
    out.pending.append(out.producer.produce(topics.RECOMMENDATIONS_UPDATES, rec_bytes, key=a))
    out.flush()

    expected_adds = {
        (u, "it-cart", platform, "ADD", "RULE_MATCHED")
        for u in (a, b, d, f)
        for platform in ("meta", "linkedin")
    } | {
        (a, "it-shoes", "google_ads", "ADD", "RULE_MATCHED"),
        (b, "it-browse", "meta", "ADD", "RULE_MATCHED"),
    }
    values = reader.poll_until(lambda vs: expected_adds <= _keys(_mine(vs, users)))
    assert _keys(_mine(values, users)) == expected_adds, audience_worker.tail()
    for v in _mine(values, users):
        assert_hashed(v["platform"], v["identifiers"])
        assert "example.com" not in str(v["identifiers"]).lower()
        assert v["audienceVersion"] == "it-1" and v["membershipVersion"] == 1
    shoes = next(v for v in values if v["audience"] == "it-shoes" and v["profileId"] == a)
    assert set(shoes["identifiers"]) == {"hashedEmail"}
    assert shoes["platformAudienceId"] == "customers/1/userLists/9"

    # a withdraws consent, d orders, f asks for deletion; b's view expires with the clock.
    withdraw = script.send(a, "page", consent=False)
    script.send(d, "track", event="Order Completed")
    script.send(f, "track", event="User Deleted")
    out.flush()
    expected_removes = {
        (a, "it-cart", "meta", "REMOVE", "CONSENT_WITHDRAWN"),
        (a, "it-cart", "linkedin", "REMOVE", "CONSENT_WITHDRAWN"),
        (a, "it-shoes", "google_ads", "REMOVE", "CONSENT_WITHDRAWN"),
        (d, "it-cart", "meta", "REMOVE", "RULE_UNMATCHED"),
        (d, "it-cart", "linkedin", "REMOVE", "RULE_UNMATCHED"),
        (f, "it-cart", "meta", "REMOVE", "DELETION_REQUESTED"),
        (f, "it-cart", "linkedin", "REMOVE", "DELETION_REQUESTED"),
        (b, "it-browse", "meta", "REMOVE", "WINDOW_EXPIRED"),
    }
    values = reader.poll_until(
        lambda vs: expected_removes <= _keys(_mine(vs, users)), timeout=WINDOW_S + 120
    )
    assert _keys(_mine(values, users)) == expected_adds | expected_removes
    added = {
        (v["profileId"], v["audience"], v["platform"]): v for v in values if v["action"] == "ADD"
    }
    for v in _mine(values, users):
        if v["action"] == "REMOVE":
            assert (
                v["identifiers"]
                == added[(v["profileId"], v["audience"], v["platform"])]["identifiers"]
            )
            assert v["membershipVersion"] == 2
    a_removal = next(v for v in values if v["profileId"] == a and v["action"] == "REMOVE")
    assert a_removal["triggerMessageId"] == withdraw and a_removal["triggerReceivedAt"] is not None

    # Identical replay (same messageIds, timestamps, recommendation bytes): nothing new.
    before = len(_mine(values, users))
    replay = list(script.sent)
    for msg in replay:
        out.segment(msg)
    out.pending.append(out.producer.produce(topics.RECOMMENDATIONS_UPDATES, rec_bytes, key=a))
    out.flush()
    # Sentinels, one per profile, each with a known outcome.
    sentinel_ids = {
        script.send(a, "identify", traits={"email": f"{a}@Example.com"}, consent=True),
        script.send(b, "track", event="Product Viewed"),
        script.send(c, "track", event="Product Added", consent=True),
        script.send(d, "track", event="Product Added"),
        script.send(e, "identify", traits={"email": f"{e}@example.com"}),
        script.send(e, "track", event="Product Added"),
        script.send(f, "identify", traits={"email": f"{f}@example.com"}, consent=True),
    }
    out.close()
    expected_sentinels = {
        (a, "it-shoes", "google_ads", "ADD", "RULE_MATCHED"),
        (a, "it-cart", "meta", "ADD", "RULE_MATCHED"),
        (a, "it-cart", "linkedin", "ADD", "RULE_MATCHED"),
        (b, "it-browse", "meta", "ADD", "RULE_MATCHED"),
        (c, "it-cart", "meta", "ADD", "RULE_MATCHED"),
        (c, "it-cart", "linkedin", "ADD", "RULE_MATCHED"),
        (d, "it-cart", "meta", "ADD", "RULE_MATCHED"),
        (d, "it-cart", "linkedin", "ADD", "RULE_MATCHED"),
        (e, "it-cart", "meta", "ADD", "RULE_MATCHED"),
        (e, "it-cart", "linkedin", "ADD", "RULE_MATCHED"),
    }
    values = reader.poll_until(lambda vs: expected_sentinels <= _keys(_mine(vs, users)[before:]))
    reader.close()
    after = _mine(values, users)[before:]
    assert _keys(after) == expected_sentinels  # f stays suppressed
    assert len(after) == len(expected_sentinels)
    for v in after:
        assert v["triggerMessageId"] in sentinel_ids, v
        # c and e had never been added; a, b, d were added, removed, and are back
        assert v["membershipVersion"] == (1 if v["profileId"] in (c, e) else 3), v


def test_worker_refuses_an_invalid_config(stack: StackEndpoints, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        'version: "1"\naudiences:\n  - name: x\n'
        '    platforms: {meta: {audience_id: "1"}}\n'
        "    rule: {event: {name: A, within: soon}}\n"
    )
    group = f"cdpflow-aud-bad-{uuid.uuid4().hex[:8]}"
    proc = WorkerProcess(
        worker_env(
            stack.bootstrap_servers,
            stack.registry_url,
            group,
            tmp_path / "data",
            CDP_AUDIENCES_CONFIG=str(bad),
        ),
        tmp_path / "w.log",
    ).start()
    assert proc.proc is not None
    code = proc.proc.wait(120)
    proc.stop()
    log = proc.log_path.read_text()
    assert code != 0
    assert f"{bad}:5: audiences[0].rule.event.within" in log, log[-2000:]


def test_topics_include_the_audience_repartition_and_changelog() -> None:
    names = {s.name for s in worker_topic_specs(Settings(cdp_worker_id="g1"))}
    assert f"g1-{AUDIENCE_REPARTITION_SUFFIX}" in names
    assert "g1-audience_state-changelog" in names


@pytest.fixture
def meta_emulator() -> Iterator[dict[str, Any]]:
    """The Meta Custom Audiences emulator in its own process; yields its announce record."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sinks.emulators", "meta", "--announce"],
        stdout=subprocess.PIPE,
        cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "the Meta emulator did not start"
        yield json.loads(line)["meta"]
    finally:
        proc.terminate()
        proc.wait(30)


def test_members_and_full_sync_cli_read_the_changelog(
    audience_worker: WorkerProcess,
    stack: StackEndpoints,
    settings: Settings,
    serde: AvroSerde,
    meta_emulator: dict[str, Any],
) -> None:
    tag = uuid.uuid4().hex[:8]
    users = [f"sync-{i}-{tag}" for i in range(3)]
    reader = _updates_reader(stack)
    out = RawProducer(settings, serde)
    script = Script(out, tag)
    for user in users:
        script.send(
            user,
            "identify",
            traits={"email": f"{user}@x.example", "plan": "sync-test"},
            consent=True,
        )
    script.send(f"nosync-{tag}", "identify", traits={"email": "n@x.example", "plan": "sync-test"})
    out.close()
    want = {(u, "it-sync", "meta", "ADD", "RULE_MATCHED") for u in users}
    reader.poll_until(lambda vs: want <= _keys(vs))
    reader.close()
    group = audience_worker.env["CDP_WORKER_ID"]
    # The agent writes a state after its updates were acknowledged: wait for the changelog.
    deadline = time.monotonic() + 60
    while True:
        found = members_of(read_states(settings, group), "it-sync", "meta")
        if {m.profile_id for m in found} == set(users) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {m.profile_id for m in found} == set(users)
    config = Path(audience_worker.env["CDP_AUDIENCES_CONFIG"])
    env = {**os.environ, "CDP_WORKER_ID": group, **meta_emulator["env"]}
    env["CDP_SINK_META_ACCESS_TOKEN"] = meta_emulator["credentials"]["access_token"]
    cli = [sys.executable, "-m", "streams.cli", "audiences"]
    listed = subprocess.run(
        [*cli, "members", "it-sync", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    assert all(u in listed.stdout for u in users)
    synced = subprocess.run(
        [*cli, "sync", "--full", "it-sync", "--platform", "meta", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert synced.returncode == 0, synced.stdout + synced.stderr
    assert "full sync of it-sync" in synced.stdout
    state = httpx.get(f"{meta_emulator['url']}/__emulator/state", timeout=10).json()
    assert state["piiViolations"] == [] and state["rejectedRequestCount"] == 0, state
    assert state["uniqueCount"] == len(users), state
    refused = subprocess.run(
        [*cli, "sync", "it-sync", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert refused.returncode == 2 and "only --full" in refused.stderr
