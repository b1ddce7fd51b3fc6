"""Secrets and raw PII never reach the log output."""

from __future__ import annotations

import base64
import io
import json
import logging
from collections.abc import Iterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from sources.collector import create_app
from streams.logs import JsonFormatter, redact
from streams.settings import Settings
from tests.conftest import StackEndpoints

WRITE_KEY = "wk-super-secret-0123456789"
API_SECRET = "ga4-api-secret-ABCDEFGH"
EMAIL = "jane.doe+vip@example.com"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Every log record of the process, at DEBUG, through the production formatter."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield buf
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def test_formatter_redacts_secrets_and_emails(captured: io.StringIO) -> None:
    log = logging.getLogger("cdpflow.test")
    basic = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    log.warning("POST https://mp.example/collect?api_secret=%s failed", API_SECRET)
    log.warning("headers: Authorization: Basic %s", basic)
    log.warning("rejected %s", json.dumps({"writeKey": WRITE_KEY, "email": EMAIL}))
    try:
        raise ValueError(f"user {EMAIL} token={API_SECRET}")
    except ValueError:
        log.exception("boom")
    out = captured.getvalue()
    for secret in (WRITE_KEY, API_SECRET, EMAIL, basic):
        assert secret not in out
    lines = [json.loads(line) for line in out.splitlines()]
    assert all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    assert "<redacted>" in out and "<email>" in out
    assert redact("contact a.b@c.io") == "contact <email>"


async def test_collector_logs_no_key_and_no_pii(
    stack: StackEndpoints, captured: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", stack.bootstrap_servers)
    monkeypatch.setenv("SCHEMA_REGISTRY_URL", stack.registry_url)
    settings = Settings(cdp_write_keys=WRITE_KEY)  # type: ignore[arg-type]
    async with TestClient(TestServer(create_app(settings))) as client:
        auth = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
        batch = {
            "batch": [
                {"type": "identify", "userId": "u-log", "traits": {"email": EMAIL}},
                {"type": "track", "traits": {"email": EMAIL}, "event": "No Identity"},
            ]
        }
        resp = await client.post("/v1/batch", json=batch, headers={"Authorization": auth})
        assert resp.status == 200
        bad = await client.post("/v1/track", json={"writeKey": WRITE_KEY + "x", "userId": "u"})
        assert bad.status == 401
        garbage = await client.post(
            "/v1/batch", data=b"{not json " + EMAIL.encode(), headers={"Authorization": auth}
        )
        assert garbage.status == 400
    out = captured.getvalue()
    assert WRITE_KEY not in out
    assert EMAIL not in out
