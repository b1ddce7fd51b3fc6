"""Audiences end to end: raw events -> worker (audience agent) -> sinks -> the three ad emulators.

A property-based test on the real stack: hypothesis draws sequences of identifies
(with or without an email), cart and order events, recommendation updates,
consent grants and withdrawals, deletion requests and clock advances (real
sleeps; one audience has a 6-second window). Once the clock has moved past
every short window, each platform emulator's membership must equal the
membership computed from scratch (``streams.audiences.reference``) from the
enriched records the worker actually produced. Along the way, no emulator may
ever receive an unhashed identifier, and a profile that never granted consent
must never have been sent at all.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from sinks.emulators import EmulatorCluster, start_all
from sinks.emulators.google_ads import DEFAULT_CUSTOMER_ID
from sinks.engine import emulator_env
from streams import topics
from streams.audiences.config import load_config
from streams.audiences.identifiers import identifiers_for
from streams.audiences.reference import Input, compute_membership
from streams.events import now_ms
from streams.serde import AvroSerde
from streams.settings import Settings
from tests.conftest import StackEndpoints
from tests.kafka_helpers import (
    TopicReader,
    WorkerProcess,
    audience_worker_process,
    end_offsets,
)
from tests.sinks.contract import SinkProcess, start_groups_at_end, wait_until
from tests.streams.pipeline_helpers import RawProducer

pytestmark = pytest.mark.timeout(900)

SHORT_WINDOW_S = 6
LISTS = {"cart": "7002", "shoes": "7012", "buyers": "7022"}
CONFIG = f"""\
version: "e2e-1"
consent: Advertising
deletion_events: [User Deleted]
default_country: US
audiences:
  - name: e2e-cart
    platforms:
      meta: {{audience_id: "7001"}}
      google_ads: {{user_list: "customers/{DEFAULT_CUSTOMER_ID}/userLists/{LISTS["cart"]}"}}
      linkedin: {{segment_id: "7003"}}
    rule:
      all:
        - event: {{name: Product Added, within: {SHORT_WINDOW_S}s}}
        - not:
            event: {{name: Order Completed, within: {SHORT_WINDOW_S}s, since_last: Product Added}}
  - name: e2e-shoes
    platforms:
      meta: {{audience_id: "7011"}}
      google_ads: {{user_list: "customers/{DEFAULT_CUSTOMER_ID}/userLists/{LISTS["shoes"]}"}}
    rule:
      recommendation: {{category: shoes, min_score: 0.5}}
  - name: e2e-buyers
    platforms:
      google_ads: {{user_list: "customers/{DEFAULT_CUSTOMER_ID}/userLists/{LISTS["buyers"]}"}}
      linkedin: {{segment_id: "7023"}}
    rule:
      event: {{name: Order Completed, within: 1h}}
"""
#: The identifier each platform's membership is compared by (every profile here has an email).
EMAIL_KEY = {"meta": "EMAIL", "google_ads": "hashedEmail", "linkedin": "SHA256_EMAIL"}
PLATFORMS = tuple(EMAIL_KEY)
PROFILES = 3


@dataclass
class Rig:
    emulators: EmulatorCluster
    worker: WorkerProcess
    sinks: SinkProcess
    config_path: Path


@pytest.fixture(scope="module")
def rig(stack: StackEndpoints, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("audience-e2e")
    config_path = tmp / "audiences.yaml"
    config_path.write_text(CONFIG)
    emulators = start_all(
        PLATFORMS, mode="thread", configs={"google_ads": {"user_lists": list(LISTS.values())}}
    )
    sink_prefix = f"cdpflow-aud-e2e-sink-{uuid.uuid4().hex[:6]}-"
    start_groups_at_end(
        stack.bootstrap_servers, [sink_prefix + p for p in PLATFORMS], topics.AUDIENCES_UPDATES
    )
    worker = audience_worker_process(
        stack.bootstrap_servers, stack.registry_url, config_path, tmp
    ).start()
    sinks = SinkProcess(
        {
            "KAFKA_BOOTSTRAP_SERVERS": stack.bootstrap_servers,
            "SCHEMA_REGISTRY_URL": stack.registry_url,
            "CDP_SINK_GROUP_PREFIX": sink_prefix,
            **emulator_env(emulators),
        },
        tmp / "sinks.log",
        list(PLATFORMS),
    )
    try:
        worker.wait_ready()
        asyncio.run(sinks.wait_assigned(list(PLATFORMS)))
        yield Rig(emulators, worker, sinks, config_path)
    finally:
        sinks.stop()
        worker.stop()
        emulators.stop()


# ----------------------------------------------------------------------------- scripts

Step = tuple[Any, ...]
steps = st.one_of(
    st.tuples(
        st.just("identify"),
        st.integers(0, PROFILES - 1),
        st.booleans(),
        st.sampled_from([True, False, None]),
    ),
    st.tuples(
        st.just("track"),
        st.integers(0, PROFILES - 1),
        st.sampled_from(["Product Added", "Order Completed"]),
        st.sampled_from([None, None, True, False]),
    ),
    st.tuples(st.just("delete"), st.integers(0, PROFILES - 1)),
    st.tuples(
        st.just("rec"),
        st.integers(0, PROFILES - 1),
        st.sampled_from(["shoes", "hats"]),
        st.sampled_from([0.3, 0.9]),
    ),
    st.tuples(st.just("sleep"), st.sampled_from([0.5, 2.0, 4.0])),
)
#: Every profile starts with an identify carrying an email and (mostly) a consent
#: grant, so that random steps move real members in and out of the audiences.
openings = st.tuples(
    *(
        st.tuples(
            st.just("identify"), st.just(i), st.just(True), st.sampled_from([True, True, None])
        )
        for i in range(PROFILES)
    )
)
scripts = st.builds(lambda head, tail: [*head, *tail], openings, st.lists(steps, max_size=12))
#: Always run: members in every audience on every platform, an unconsented buyer, an
#: expiry, a withdrawal and a deletion.
KNOWN_SCRIPT: list[Step] = [
    ("identify", 0, True, True),
    ("identify", 1, True, True),
    ("identify", 2, True, None),
    ("track", 0, "Order Completed", None),
    ("rec", 0, "shoes", 0.9),
    ("track", 1, "Product Added", None),
    ("track", 2, "Order Completed", None),
    ("rec", 2, "shoes", 0.9),
    ("sleep", 2.0),
    ("track", 1, "Order Completed", None),
    ("track", 1, "Product Added", None),
    ("identify", 1, False, False),
    ("identify", 1, False, True),
    ("rec", 1, "shoes", 0.9),
    ("delete", 0),
]


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def email(user: str) -> str:
    return f"  {user}@Example.COM "


class Runner:
    """Plays one script into cdp.events.raw / cdp.recommendations.updates."""

    def __init__(self, settings: Settings, serde: AvroSerde, tag: str) -> None:
        self.out = RawProducer(settings, serde)
        self.tag = tag
        self.users = [f"e2e-{tag}-{i}" for i in range(PROFILES)]
        self.message_ids: list[str] = []
        self.recs: list[dict[str, Any]] = []
        self.consented: set[str] = set()
        self.n = 0

    def _msg(self, user: str, kind: str, consent: bool | None, **fields: Any) -> None:
        self.n += 1
        msg: dict[str, Any] = {
            "type": kind,
            "userId": user,
            "messageId": f"{self.tag}-{self.n}",
            "timestamp": iso(now_ms()),
            **fields,
        }
        if consent is not None:
            msg["context"] = {"consent": {"categoryPreferences": {"Advertising": consent}}}
            if consent:
                self.consented.add(user)
        self.message_ids.append(self.out.segment(msg))

    def play(self, script: list[Step]) -> None:
        for step in script:
            kind = step[0]
            if kind == "sleep":
                self.out.flush()
                time.sleep(step[1])
                continue
            user = self.users[step[1]]
            if kind == "identify":
                traits = {"email": email(user), "plan": "pro"} if step[2] else {"plan": "pro"}
                self._msg(user, "identify", step[3], traits=traits)
            elif kind == "track":
                self._msg(user, "track", step[3], event=step[2])
            elif kind == "delete":
                self._msg(user, "track", None, event="User Deleted")
            elif kind == "rec":
                self.n += 1
                rec = {
                    "updateId": f"{self.tag}-rec-{self.n}",
                    "customerId": user,
                    "products": [
                        {
                            "productId": f"sku-{self.n}",
                            "score": step[3],
                            "rank": 1,
                            "reason": None,
                            "category": step[2],
                        }
                    ],
                    "modelVersion": "m1",
                    "generatedAt": now_ms(),
                }
                self.out.pending.append(
                    self.out.producer.produce(
                        topics.RECOMMENDATIONS_UPDATES, self.out.encode_rec(rec), key=user
                    )
                )
                self.recs.append(rec)
        self.out.flush()

    def close(self) -> None:
        self.out.close()


def emulator_emails(rig: Rig, audience: str, platform: str) -> set[str]:
    """Hashed emails the platform emulator holds for one configured audience."""
    emulator: Any = rig.emulators.emulators[platform]
    target = {
        "meta": {"e2e-cart": "7001", "e2e-shoes": "7011"},
        "linkedin": {"e2e-cart": "7003", "e2e-buyers": "7023"},
        "google_ads": {
            "e2e-cart": LISTS["cart"],
            "e2e-shoes": LISTS["shoes"],
            "e2e-buyers": LISTS["buyers"],
        },
    }[platform][audience]
    key = EMAIL_KEY[platform]
    return {value for row in emulator.members(target) for k, value in row if k == key}


def expected_emails(membership: dict[tuple[str, str], dict[str, dict[str, str]]]) -> Any:
    return {
        (audience, platform): {ids[EMAIL_KEY[platform]] for ids in members.values()}
        for (audience, platform), members in membership.items()
    }


def every_value_sent(rig: Rig) -> str:
    """Everything the emulators ever accepted or refused, as text (for never-sent checks)."""
    parts = []
    for platform in PLATFORMS:
        state = rig.emulators.emulators[platform].state
        parts.append(repr(state.accepted_items()))
        parts.append(repr(state.rejected_requests))
    return "\n".join(parts)


# ----------------------------------------------------------------------------- the property


@hypothesis_settings(
    max_examples=4,
    deadline=None,
    # Each example takes ~30 s on the real stack: report the drawn script, do not shrink.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(script=scripts)
@example(script=KNOWN_SCRIPT)
def test_platform_membership_equals_membership_from_scratch(
    rig: Rig, stack: StackEndpoints, settings: Settings, serde: AvroSerde, script: list[Step]
) -> None:
    config = load_config(rig.config_path)
    tag = uuid.uuid4().hex[:8]
    enriched = TopicReader(
        stack.bootstrap_servers,
        stack.registry_url,
        topics.EVENTS_ENRICHED,
        end_offsets(stack.bootstrap_servers, topics.EVENTS_ENRICHED),
    )
    runner = Runner(settings, serde, tag)
    try:
        runner.play(script)
    finally:
        runner.close()
    mine = set(runner.message_ids)
    records = enriched.poll_until(
        lambda vs: mine <= {v["event"]["messageId"] for v in vs}, timeout=120
    )
    enriched.close()
    inputs: list[Input] = [
        ("event", r, i) for i, r in enumerate(records) if r["event"]["messageId"] in mine
    ]
    inputs += [("recommendation", rec, 0) for rec in runner.recs]
    # Let every short window pass (and the agent's clock tick notice it).
    last_ms = max(
        [now_ms()]
        + [r["event"]["timestamp"].timestamp() * 1000 for kind, r, _ in inputs if kind == "event"]
    )
    settle_s = (last_ms + SHORT_WINDOW_S * 1000 + 2500 - now_ms()) / 1000
    if settle_s > 0:
        time.sleep(settle_s)
    expected = expected_emails(compute_membership(inputs, config, now_ms()))
    ours = {
        identifiers_for(p, {"email": email(u)})[EMAIL_KEY[p]]
        for p in PLATFORMS
        for u in runner.users
    }

    def actual() -> Any:
        return {
            key: emulator_emails(rig, *key) & ours
            for key in expected  # every configured (audience, platform)
        }

    try:
        asyncio.run(wait_until(lambda: actual() == expected, 90, "emulators to converge"))
    except AssertionError:
        raise AssertionError(
            f"script {script}\nexpected {expected}\nactual {actual()}\n"
            f"worker:\n{rig.worker.tail()}\nsinks:\n{rig.sinks.tail()}"
        ) from None
    # Nothing unhashed ever arrived anywhere, and nothing was refused.
    for platform in PLATFORMS:
        state = rig.emulators.emulators[platform].state
        assert state.pii_violations == [], (platform, state.pii_violations)
        assert state.rejected_requests == [], (platform, state.rejected_requests)
    # A profile that never granted consent was never sent to any platform.
    sent = every_value_sent(rig)
    for user in runner.users:
        if user not in runner.consented:
            for platform in PLATFORMS:
                hashed = identifiers_for(platform, {"email": email(user)})[EMAIL_KEY[platform]]
                assert hashed not in sent, f"{user} reached {platform} without consent"
        assert "example.com" not in sent.lower()
