"""The official analytics-python SDK, unchanged but for its host, against the collector.

The SDK posts every call to /v1/batch with the write key both in the body and
(since 2.4) as Basic auth, and treats only 2xx (200 in 2.3.x) as success. It
runs synchronously, so it is driven from a worker thread while the collector
serves on a real TCP port in the test's event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import pytest
from aiohttp import web
from segment.analytics import Client
from segment.analytics.request import APIError

from sources.collector import create_app
from streams import topics
from streams.settings import Settings, write_key_id
from streams.topics import ensure_topics
from tests.conftest import StackEndpoints
from tests.sources import TopicTail

KEY = "test-write-key"


@pytest.fixture(scope="module")
def pipeline_topics(stack: StackEndpoints) -> None:
    ensure_topics(
        Settings(
            kafka_bootstrap_servers=stack.bootstrap_servers,
            schema_registry_url=stack.registry_url,
        )
    )


@pytest.fixture
async def collector_url(settings: Settings, pipeline_topics: None) -> AsyncIterator[str]:
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
def raw(stack: StackEndpoints, pipeline_topics: None) -> Iterator[TopicTail]:
    tail = TopicTail(stack.bootstrap_servers, stack.registry_url, topics.EVENTS_RAW)
    yield tail
    tail.close()


def send_all_calls(client: Client, user: str) -> dict[str, str]:
    """One call of each type; returns messageId -> type (ids assigned by the SDK)."""
    sent: dict[str, str] = {}

    def keep(result: tuple[bool, dict[str, object]]) -> None:
        ok, msg = result
        assert ok
        sent[str(msg["messageId"])] = str(msg["type"])

    keep(client.track(user, "Order Completed", {"total": 12.5, "items": [{"sku": "a", "n": 2}]}))
    keep(client.identify(user, {"email": f"{user}@example.com", "vip": True}))
    keep(client.page(user, category="Docs", name="Install", properties={"path": "/install"}))
    keep(client.screen(user, name="Settings", properties={"tab": "privacy"}))
    keep(client.group(user, "acme", {"plan": "enterprise", "seats": 40}))
    keep(client.alias(f"anon-{user}", user))
    return sent


@pytest.mark.parametrize("gzip", [False, True])
async def test_sdk_sync_mode_all_calls(
    collector_url: str, raw: TopicTail, unique: str, gzip: bool
) -> None:
    user = f"sdk-user-{unique}"
    client = Client(KEY, host=collector_url, sync_mode=True, gzip=gzip)
    sent = await asyncio.to_thread(send_all_calls, client, user)
    assert sorted(sent.values()) == ["alias", "group", "identify", "page", "screen", "track"]

    found = await asyncio.to_thread(raw.by_message_id, set(sent))
    assert set(found) == set(sent)
    for message_id, record in found.items():
        value = record.value
        assert value["type"] == sent[message_id]
        assert value["context"]["library"]["name"] == "analytics-python"
        assert value["sourceId"] == write_key_id(KEY)
        assert value["userId"] == user
        assert record.key == user.encode()
        assert abs(value["timestamp"] - datetime.now(UTC)).total_seconds() < 60
    by_type = {r.value["type"]: r.value for r in found.values()}
    assert by_type["track"]["event"] == "Order Completed"
    assert by_type["page"]["name"] == "Install" and by_type["page"]["category"] == "Docs"
    assert by_type["group"]["groupId"] == "acme"
    assert by_type["alias"]["previousId"] == f"anon-{user}"


async def test_sdk_background_batching(collector_url: str, raw: TopicTail, unique: str) -> None:
    """The default (queued) mode: several messages per /v1/batch request, then flush()."""
    errors: list[Exception] = []
    client = Client(
        KEY,
        host=collector_url,
        upload_size=25,
        on_error=lambda exc, batch: errors.append(exc),
    )

    def send() -> set[str]:
        ids = set()
        for n in range(60):
            ok, msg = client.track(f"bg-{unique}", "Tick", {"n": n})
            assert ok
            ids.add(str(msg["messageId"]))
        client.flush()
        client.join()
        return ids

    ids = await asyncio.to_thread(send)
    assert errors == []
    found = await asyncio.to_thread(raw.by_message_id, ids)
    assert set(found) == ids


async def test_sdk_sees_unknown_key_as_api_error(collector_url: str) -> None:
    client = Client("not-a-key", host=collector_url, sync_mode=True)
    with pytest.raises(APIError) as caught:
        await asyncio.to_thread(client.track, "u", "E")
    assert caught.value.status == 401
    assert caught.value.code == "unauthorized"
