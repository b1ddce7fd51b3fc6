"""Helpers shared by the emulator and destination tests (no Kafka involved)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import aiohttp

from sinks.base import HttpRequest, HttpResponse
from streams.events import from_segment
from streams.profiles.enrich import build_enriched

TRAITS = {
    "email": "Jane.Doe@Gmail.com",
    "phone": "+1 (555) 010-9999",
    "firstName": "Jane",
    "lastName": "Doe",
    "address": {"city": "Berlin", "country": "de", "postalCode": "10115"},
}

PRODUCT = {
    "product_id": "507f1f77bcf86cd799439011",
    "sku": "G-32",
    "category": "Games",
    "name": "Monopoly: 3rd Edition",
    "brand": "Hasbro",
    "variant": "200 pieces",
    "price": 18.99,
    "quantity": 2,
    "currency": "usd",
    "position": 3,
}
PRODUCTS = [
    {"product_id": "p1", "sku": "S-1", "name": "Shoe", "price": 50.0, "quantity": 1},
    {"product_id": "p2", "sku": "S-2", "name": "Sock", "price": 5.5, "quantity": 4},
]

#: Segment e-commerce spec v2 events with realistic properties.
ECOMMERCE: dict[str, dict[str, Any]] = {
    "Product Viewed": dict(PRODUCT),
    "Product Added": {**PRODUCT, "cart_id": "c-1"},
    "Product Removed": {**PRODUCT, "cart_id": "c-1"},
    "Cart Viewed": {"cart_id": "c-1", "products": PRODUCTS},
    "Checkout Started": {
        "order_id": "o-1",
        "value": 72.0,
        "revenue": 72.0,
        "currency": "EUR",
        "coupon": "SPRING",
        "products": PRODUCTS,
    },
    "Order Completed": {
        "checkout_id": "chk-1",
        "order_id": "o-1",
        "affiliation": "Web",
        "total": 81.5,
        "revenue": 72.0,
        "shipping": 4.5,
        "tax": 5.0,
        "coupon": "SPRING",
        "currency": "EUR",
        "products": PRODUCTS,
    },
    "Products Searched": {"query": "blue hotpants"},
}


def now_ms() -> int:
    return int(time.time() * 1000)


def segment_message(
    kind: str = "track",
    event: str | None = "Product Viewed",
    *,
    properties: dict[str, Any] | None = None,
    user_id: str | None = "user-42",
    anonymous_id: str | None = "5b0f2d14-6c87-4bd8-9f40-9f3e2d1b7a11",
    message_id: str | None = None,
    timestamp_ms: int | None = None,
    context: dict[str, Any] | None = None,
    integrations: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    msg: dict[str, Any] = {"type": kind, **extra}
    if event is not None and kind == "track":
        msg["event"] = event
    if properties is not None:
        msg["properties"] = properties
    elif kind == "track" and event in ECOMMERCE:
        msg["properties"] = ECOMMERCE[event]
    if user_id is not None:
        msg["userId"] = user_id
    if anonymous_id is not None:
        msg["anonymousId"] = anonymous_id
    if message_id is not None:
        msg["messageId"] = message_id
    ts = timestamp_ms if timestamp_ms is not None else now_ms() - 60_000
    msg["timestamp"] = datetime.fromtimestamp(ts / 1000, UTC).isoformat()
    msg["context"] = (
        context
        if context is not None
        else {
            "ip": "203.0.113.7",
            "userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
            "Chrome/126.0 Safari/537.36",
            "page": {"url": "https://shop.example/p/monopoly", "title": "Monopoly"},
        }
    )
    if integrations is not None:
        msg["integrations"] = integrations
    return msg


def enriched(
    msg: dict[str, Any],
    *,
    traits: dict[str, Any] | None = None,
    profile_id: str | None = None,
    decoded: bool = False,
) -> dict[str, Any]:
    """An EnrichedEvent dict as the pipeline builds it (``decoded``: timestamps as datetimes,
    as fastavro returns them from Kafka)."""
    received = now_ms()
    record = from_segment(msg, received_at_ms=received)
    if decoded:
        for key in ("timestamp", "receivedAt", "originalTimestamp", "sentAt"):
            if record.get(key) is not None:
                record[key] = datetime.fromtimestamp(record[key] / 1000, UTC)
    pid = profile_id or record.get("userId") or f"anon:{record.get('anonymousId')}"
    return build_enriched(
        record,
        profile_id=pid,
        stitched=False,
        traits=traits,
        recommendations=None,
        worker_id="test-worker",
        pipeline_version="test",
        processed_at_ms=received,
        source_partition=0,
        source_offset=0,
    )


async def send(session: aiohttp.ClientSession, request: HttpRequest) -> HttpResponse:
    """What the engine does with a request, minus retries: one HTTP exchange."""
    started = time.monotonic()
    async with session.request(
        request.method, request.url, data=request.body, headers=request.headers
    ) as resp:
        body = await resp.read()
        return HttpResponse(resp.status, resp.headers, body, time.monotonic() - started)
