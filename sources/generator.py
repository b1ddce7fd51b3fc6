"""Synthetic shoppers for demos, load tests and end-to-end tests.

The traffic has to look like what real clients send, or it exercises nothing:
anonymous browsing that later identifies (so identity stitching has work to
do), Segment e-commerce events with the spec's property shapes (so audiences
and recommendations have something to key on), a realistic mix of browsers,
apps and bots (so user-agent parsing is tested), UTM links and consent flags.

Everything is a pure function of ``(seed, count, users, bad_ratio)``: ids, names,
journeys and the relative timing. Only the absolute time moves with
``start_ms``, whose default anchors the timeline to the start of the current UTC
day so a default run always passes the pipeline's age/future checks. Because
messageIds are deterministic, replaying a seed produces duplicates that the
pipeline de-duplicates; use a new seed for fresh traffic.

Invalid events (``bad_ratio`` > 0) are ordinary-looking events broken in one
way each, marked with ``properties["_cdpflow_bad"] = <Reason code>`` (see
:data:`BAD_MARKER`, :func:`bad_reason`) so tests can count them. The marker is
the only hint: the pipeline must reject them on their own merits.
"""

from __future__ import annotations

import heapq
import math
import random
import sys
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Final
from urllib.parse import urlencode

from sources.kafka_producer import QueueFull
from sources.publisher import DeliveryTracker, EventPublisher
from streams.events import EventRejected, Reason

__all__ = [
    "BAD_MARKER",
    "BAD_REASONS",
    "CATALOGUE",
    "CATEGORIES",
    "GeneratorStats",
    "Product",
    "bad_reason",
    "generate_events",
    "generate_recommendations",
    "run_generator",
    "user_ids",
]

#: Key in ``properties`` carrying the Reason code an invalid event is meant to get.
BAD_MARKER: Final = "_cdpflow_bad"
#: The ways an invalid event is broken, one per event.
BAD_REASONS: Final[tuple[Reason, ...]] = (
    Reason.MISSING_IDENTITY,
    Reason.MISSING_EVENT,
    Reason.TIMESTAMP_IN_FUTURE,
    Reason.TIMESTAMP_TOO_OLD,
    Reason.INVALID_TIMESTAMP,
)

SHOP_URL: Final = "https://shop.example.com"
_MINUTE: Final = 60_000
_HOUR: Final = 60 * _MINUTE
_DAY: Final = 24 * _HOUR
#: Average good events per session (measured over many seeds); sizes the timeline.
_EVENTS_PER_SESSION: Final = 10.0


# --------------------------------------------------------------------------- catalogue


@dataclass(frozen=True, slots=True)
class Product:
    product_id: str
    sku: str
    name: str
    brand: str
    category: str
    price: float  # USD
    slug: str


#: category -> (sku code, brands, product nouns, (min, max) USD price)
CATEGORIES: Final[dict[str, tuple[str, tuple[str, ...], tuple[str, ...], tuple[int, int]]]] = {
    "Electronics": (
        "ELEC",
        ("Voltix", "Nordlys", "Kestrel Audio", "Pixelon"),
        (
            "Wireless Earbuds",
            "Bluetooth Speaker",
            "USB-C Charger",
            "Smartwatch",
            "4K Webcam",
            "Noise-Cancelling Headphones",
            "Power Bank",
            "Mechanical Keyboard",
        ),
        (15, 400),
    ),
    "Home & Kitchen": (
        "HOME",
        ("Casa Verde", "Ironleaf", "Lumen & Co"),
        (
            "Chef's Knife",
            "Cast Iron Skillet",
            "French Press",
            "Linen Duvet Cover",
            "Ceramic Vase",
            "Stand Mixer",
            "Table Lamp",
        ),
        (12, 350),
    ),
    "Apparel": (
        "APRL",
        ("Northwind", "Fjord & Pine", "Urban Thread"),
        (
            "Merino Sweater",
            "Denim Jacket",
            "Organic Cotton T-Shirt",
            "Rain Shell",
            "Chino Trousers",
            "Wool Scarf",
        ),
        (18, 220),
    ),
    "Shoes": (
        "SHOE",
        ("Stridewell", "Trailhawk", "Pavé"),
        ("Running Shoes", "Leather Boots", "Canvas Sneakers", "Hiking Boots", "Loafers"),
        (40, 260),
    ),
    "Beauty": (
        "BEAU",
        ("Aurelle", "Botanica Lab", "Glowhaus"),
        (
            "Vitamin C Serum",
            "Hydrating Cleanser",
            "Matte Lipstick",
            "Night Cream",
            "SPF 50 Sunscreen",
        ),
        (8, 90),
    ),
    "Sports & Outdoors": (
        "SPRT",
        ("Summit Gear", "Trailhawk", "Aquafin"),
        (
            "Yoga Mat",
            "Camping Tent",
            "Insulated Bottle",
            "Trekking Poles",
            "Dumbbell Set",
            "Cycling Helmet",
        ),
        (10, 450),
    ),
    "Toys & Games": (
        "TOYS",
        ("Brickly", "Puzzle Peak", "Little Fox"),
        ("Building Set", "Board Game", "1000-Piece Puzzle", "Plush Bear", "RC Car"),
        (9, 120),
    ),
    "Books": (
        "BOOK",
        ("Harbor Press", "Quill House", "Northlight Books"),
        ("Cookbook", "Mystery Novel", "Field Guide", "Sci-Fi Anthology", "Travel Atlas"),
        (8, 45),
    ),
    "Grocery": (
        "GROC",
        ("Green Valley", "Roast Republic", "Honeycomb Farms"),
        (
            "Single-Origin Coffee Beans",
            "Loose Leaf Tea",
            "Extra Virgin Olive Oil",
            "Dark Chocolate Bar",
            "Raw Honey",
            "Granola",
        ),
        (4, 40),
    ),
    "Garden": (
        "GRDN",
        ("Rootwell", "Sunpatch", "Ironleaf"),
        (
            "Pruning Shears",
            "Raised Bed Kit",
            "Watering Can",
            "Seed Starter Tray",
            "Solar Path Lights",
        ),
        (9, 180),
    ),
}
_ADJECTIVES: Final = ("Classic", "Pro", "Essential", "Everyday", "Premium", "Compact", "Eco")
_PRODUCTS_PER_CATEGORY: Final = 20


def _slug(text: str) -> str:
    out = "".join(c.lower() if c.isalnum() else "-" for c in text)
    return "-".join(p for p in out.split("-") if p)


def _build_catalogue() -> tuple[Product, ...]:
    rng = random.Random("cdpflow-catalogue-v1")
    products: list[Product] = []
    n = 0
    for category, (code, brands, nouns, (lo, hi)) in CATEGORIES.items():
        names: set[str] = set()
        while len(names) < _PRODUCTS_PER_CATEGORY:
            brand = rng.choice(brands)
            name = f"{brand} {rng.choice(_ADJECTIVES)} {rng.choice(nouns)}"
            if name in names:
                continue
            names.add(name)
            n += 1
            # Log-uniform prices look like a real shelf (many cheap, few expensive items).
            price = math.exp(rng.uniform(math.log(lo), math.log(hi)))
            price = round(math.floor(price) + 0.99, 2) if price > 5 else round(price, 2)
            products.append(
                Product(
                    product_id=f"prod_{n:04d}",
                    sku=f"{code}-{n:05d}",
                    name=name,
                    brand=brand,
                    category=category,
                    price=price,
                    slug=_slug(name),
                )
            )
    return tuple(products)


#: The fixed shop: 200 products over 10 categories, identical for every seed.
CATALOGUE: Final[tuple[Product, ...]] = _build_catalogue()
_BY_CATEGORY: Final[dict[str, tuple[Product, ...]]] = {
    c: tuple(p for p in CATALOGUE if p.category == c) for c in CATEGORIES
}
_CATEGORY_NAMES: Final = tuple(CATEGORIES)


# --------------------------------------------------------------------------- people


@dataclass(frozen=True, slots=True)
class _Country:
    code: str
    locale: str
    currency: str
    usd_rate: float
    dial: str
    cities: tuple[tuple[str, str], ...]  # (city, IANA timezone)
    first_names: tuple[str, ...]
    last_names: tuple[str, ...]


_COUNTRIES: Final[tuple[tuple[_Country, float], ...]] = (
    (
        _Country(
            "US",
            "en-US",
            "USD",
            1.0,
            "+1",
            (
                ("New York", "America/New_York"),
                ("Chicago", "America/Chicago"),
                ("Austin", "America/Chicago"),
                ("Seattle", "America/Los_Angeles"),
                ("San Francisco", "America/Los_Angeles"),
                ("Denver", "America/Denver"),
            ),
            ("James", "Olivia", "Liam", "Emma", "Noah", "Ava", "Mason", "Sophia", "Ethan", "Mia"),
            ("Smith", "Johnson", "Williams", "Brown", "Garcia", "Miller", "Davis", "Martinez"),
        ),
        0.42,
    ),
    (
        _Country(
            "GB",
            "en-GB",
            "GBP",
            0.79,
            "+44",
            (
                ("London", "Europe/London"),
                ("Manchester", "Europe/London"),
                ("Edinburgh", "Europe/London"),
                ("Bristol", "Europe/London"),
            ),
            ("Oliver", "Amelia", "Harry", "Isla", "George", "Poppy", "Jack", "Freya"),
            ("Taylor", "Jones", "Wilson", "Evans", "Thomas", "Roberts", "Walker"),
        ),
        0.12,
    ),
    (
        _Country(
            "DE",
            "de-DE",
            "EUR",
            0.92,
            "+49",
            (
                ("Berlin", "Europe/Berlin"),
                ("Munich", "Europe/Berlin"),
                ("Hamburg", "Europe/Berlin"),
                ("Cologne", "Europe/Berlin"),
            ),
            ("Lukas", "Mia", "Leon", "Hannah", "Finn", "Lea", "Jonas", "Lena"),
            ("Mueller", "Schmidt", "Schneider", "Fischer", "Weber", "Wagner", "Becker"),
        ),
        0.12,
    ),
    (
        _Country(
            "FR",
            "fr-FR",
            "EUR",
            0.92,
            "+33",
            (("Paris", "Europe/Paris"), ("Lyon", "Europe/Paris"), ("Marseille", "Europe/Paris")),
            ("Gabriel", "Louise", "Raphael", "Jade", "Arthur", "Alice", "Hugo", "Chloe"),
            ("Martin", "Bernard", "Dubois", "Thomas", "Robert", "Richard", "Petit"),
        ),
        0.09,
    ),
    (
        _Country(
            "ES",
            "es-ES",
            "EUR",
            0.92,
            "+34",
            (
                ("Madrid", "Europe/Madrid"),
                ("Barcelona", "Europe/Madrid"),
                ("Valencia", "Europe/Madrid"),
            ),
            ("Hugo", "Lucia", "Mateo", "Sofia", "Martin", "Martina", "Pablo", "Julia"),
            ("Garcia", "Fernandez", "Gonzalez", "Rodriguez", "Lopez", "Sanchez"),
        ),
        0.06,
    ),
    (
        _Country(
            "BR",
            "pt-BR",
            "BRL",
            5.0,
            "+55",
            (
                ("Sao Paulo", "America/Sao_Paulo"),
                ("Rio de Janeiro", "America/Sao_Paulo"),
                ("Belo Horizonte", "America/Sao_Paulo"),
            ),
            ("Miguel", "Helena", "Arthur", "Alice", "Heitor", "Laura", "Davi", "Valentina"),
            ("Silva", "Santos", "Oliveira", "Souza", "Lima", "Pereira", "Costa"),
        ),
        0.07,
    ),
    (
        _Country(
            "JP",
            "ja-JP",
            "JPY",
            150.0,
            "+81",
            (("Tokyo", "Asia/Tokyo"), ("Osaka", "Asia/Tokyo"), ("Kyoto", "Asia/Tokyo")),
            ("Haruto", "Yui", "Sota", "Hina", "Yuto", "Mei", "Riku", "Aoi"),
            ("Sato", "Suzuki", "Takahashi", "Tanaka", "Watanabe", "Ito", "Yamamoto"),
        ),
        0.05,
    ),
    (
        _Country(
            "CA",
            "en-CA",
            "CAD",
            1.36,
            "+1",
            (
                ("Toronto", "America/Toronto"),
                ("Vancouver", "America/Vancouver"),
                ("Montreal", "America/Toronto"),
            ),
            ("Liam", "Charlotte", "Lucas", "Emily", "Benjamin", "Chloe", "William"),
            ("Tremblay", "Roy", "Gagnon", "Wilson", "MacDonald", "Campbell", "Lee"),
        ),
        0.07,
    ),
)

_UA_DESKTOP: Final = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4.1 Safari/605.1.15",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:125.0) Gecko/20100101 Firefox/125.0",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36 Edg/124.0.2478.80",
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/123.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36",
)
_UA_MOBILE: Final = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4_1 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.6367.82 Mobile Safari/537.36",
    "Mozilla/5.0 (Linux; Android 14; SM-S921B) AppleWebKit/537.36 (KHTML, like Gecko) "
    "SamsungBrowser/24.0 Chrome/117.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (iPad; CPU OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Version/17.4 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) CriOS/124.0.6367.88 Mobile/15E148 Safari/604.1",
)
_UA_BOT: Final = (
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    "Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
    "Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)",
    "Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 "
    "(KHTML, like Gecko) Chrome/124.0.6367.91 Mobile Safari/537.36 "
    "(compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
)
#: (device kind, os name, os version, manufacturer, model, UA)
_APP_DEVICES: Final = (
    (
        "ios",
        "iOS",
        "17.4.1",
        "Apple",
        "iPhone15,2",
        "NorthwindShop/5.4.1 (com.example.northwind; build:541; iOS 17.4.1) Alamofire/5.8.0",
    ),
    (
        "ios",
        "iOS",
        "16.7.7",
        "Apple",
        "iPhone12,1",
        "NorthwindShop/5.3.0 (com.example.northwind; build:530; iOS 16.7.7) Alamofire/5.8.0",
    ),
    (
        "android",
        "Android",
        "14",
        "Google",
        "Pixel 8",
        "Dalvik/2.1.0 (Linux; U; Android 14; Pixel 8 Build/AP1A.240405.002)",
    ),
    (
        "android",
        "Android",
        "13",
        "samsung",
        "SM-A536B",
        "Dalvik/2.1.0 (Linux; U; Android 13; SM-A536B Build/TP1A.220624.014)",
    ),
)
_LIB_WEB: Final = ("analytics.js", "next-1.70.0")
_LIB_IOS: Final = ("analytics-ios", "4.1.8")
_LIB_ANDROID: Final = ("analytics-android", "4.11.3")
_EMAIL_DOMAINS: Final = ("example.com", "example.org", "example.net")
_PLANS: Final = (("free", 0.55), ("plus", 0.3), ("business", 0.15))
_REFERRERS: Final = (
    "https://www.google.com/",
    "https://www.bing.com/",
    "https://duckduckgo.com/",
    "https://www.facebook.com/",
    "https://www.instagram.com/",
    "https://news.ycombinator.com/",
    "",
)
#: (source, medium, campaign, term, content)
_CAMPAIGNS: Final = (
    ("google", "cpc", "spring_sale", "running shoes", "ad_variant_a"),
    ("google", "cpc", "brand_search", "northwind shop", None),
    ("facebook", "paid_social", "summer_collection", None, "carousel"),
    ("instagram", "paid_social", "influencer_q3", None, "story"),
    ("newsletter", "email", "weekly_digest", None, "hero_banner"),
    ("newsletter", "email", "cart_reminder", None, None),
    ("bing", "cpc", "black_friday", "wireless earbuds", None),
    ("partner_blog", "referral", "gift_guide", None, None),
)
_COUPONS: Final = (
    ("SPRING10", "Spring 10% off", 0.10),
    ("WELCOME15", "Welcome 15%", 0.15),
    ("FREESHIP", "Free shipping", 0.0),
)
_SCREENS_HOME: Final = ("Home", "Deals", "Account", "Wishlist")
_INDUSTRIES: Final = ("Retail", "Hospitality", "Education", "Software", "Healthcare")
_COMPANY_WORDS: Final = ("Blue", "River", "Summit", "Oak", "Harbor", "Nova", "Atlas", "Pine")
_COMPANY_SUFFIX: Final = ("Labs", "Group", "Studio", "Works", "Partners", "Collective")


def _weighted(rng: random.Random, items: tuple[tuple[Any, float], ...]) -> Any:
    r = rng.random() * sum(w for _, w in items)
    for item, w in items:
        r -= w
        if r <= 0:
            return item
    return items[-1][0]


_UUID_V4_CLEAR: Final = ~((0xF000 << 64) | (0xC000 << 48))
_UUID_V4_SET: Final = (0x4000 << 64) | (0x8000 << 48)


def _uuid(rng: random.Random) -> str:
    """A version-4 UUID from the seeded stream (uuid.UUID is 3x slower for the same text)."""
    h = f"{(rng.getrandbits(128) & _UUID_V4_CLEAR) | _UUID_V4_SET:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _ip(rng: random.Random) -> str:
    """Documentation-range addresses only: realistic shape, nobody's real address."""
    if rng.random() < 0.25:
        return f"2001:db8:{rng.getrandbits(16):x}:{rng.getrandbits(16):x}::{rng.getrandbits(16):x}"
    net = rng.choice(("192.0.2", "198.51.100", "203.0.113"))
    return f"{net}.{rng.randint(1, 254)}"


@dataclass(slots=True)
class _Profile:
    """Who a user is: a pure function of (seed, index), shared by events and recommendations."""

    index: int
    user_id: str
    anonymous_id: str
    kind: str  # desktop | mobile_web | app | bot
    user_agent: str
    ip: str
    country: _Country
    city: str
    timezone: str
    first_name: str
    last_name: str
    email: str
    phone: str
    plan: str
    consent: dict[str, bool]
    favourites: tuple[str, ...]
    will_identify: bool
    aliases: bool
    company: tuple[str, dict[str, Any]] | None
    app_device: tuple[str, str, str, str, str, str] | None
    device_id: str | None


def _profile(seed: int, index: int) -> _Profile:
    rng = random.Random(f"cdpflow:{seed}:user:{index}")
    user_id = f"usr_{rng.getrandbits(48):012x}"
    anonymous_id = _uuid(rng)
    kind = _weighted(rng, (("desktop", 0.5), ("mobile_web", 0.27), ("app", 0.16), ("bot", 0.07)))
    country: _Country = _weighted(rng, _COUNTRIES)
    city, tz = rng.choice(country.cities)
    first, last = rng.choice(country.first_names), rng.choice(country.last_names)
    app_device = rng.choice(_APP_DEVICES) if kind == "app" else None
    if kind == "desktop":
        ua = rng.choice(_UA_DESKTOP)
    elif kind == "mobile_web":
        ua = rng.choice(_UA_MOBILE)
    elif kind == "bot":
        ua = rng.choice(_UA_BOT)
    else:
        assert app_device is not None
        ua = app_device[5]
    plan = _weighted(rng, _PLANS)
    company = None
    if plan == "business":
        group_id = f"grp_{rng.getrandbits(32):08x}"
        company = (
            group_id,
            {
                "name": f"{rng.choice(_COMPANY_WORDS)} {rng.choice(_COMPANY_SUFFIX)}",
                "industry": rng.choice(_INDUSTRIES),
                "employees": rng.choice((5, 12, 40, 120, 600, 2500)),
                "plan": "business",
            },
        )
    favourites = tuple(rng.sample(_CATEGORY_NAMES, rng.randint(1, 3)))
    return _Profile(
        index=index,
        user_id=user_id,
        anonymous_id=anonymous_id,
        kind=kind,
        user_agent=ua,
        ip=_ip(rng),
        country=country,
        city=city,
        timezone=tz,
        first_name=first,
        last_name=last,
        email=(f"{first}.{last}{rng.randint(1, 999)}@{rng.choice(_EMAIL_DOMAINS)}".lower()),
        phone=f"{country.dial} 555 {rng.randint(100_0000, 999_9999)}",
        plan=plan,
        consent={"Advertising": rng.random() < 0.6, "Analytics": rng.random() < 0.85},
        favourites=favourites,
        will_identify=kind != "bot" and rng.random() < 0.85,
        aliases=rng.random() < 0.1,
        company=company,
        app_device=app_device,
        device_id=_uuid(rng) if kind == "app" else None,
    )


def user_ids(users: int, seed: int = 42) -> list[str]:
    """The userIds ``generate_events(..., users, seed)`` can emit (bots never identify)."""
    return [p.user_id for p in (_profile(seed, i) for i in range(users)) if p.will_identify]


# --------------------------------------------------------------------------- journeys


@dataclass(slots=True)
class _Step:
    """One planned call. ``identified`` is fixed at planning so rendering needs no state."""

    kind: str  # page | track | identify | group | alias
    identified: bool
    name: str | None = None
    category: str | None = None
    properties: dict[str, Any] | None = None
    path: str | None = None
    title: str | None = None
    utm: tuple[str, str, str, str | None, str | None] | None = None
    campaign_context: bool = False
    referrer: str | None = None
    first_identify: bool = False


@dataclass(slots=True)
class _User:
    profile: _Profile
    identified: bool = False
    sessions: int = 0
    orders: int = 0
    grouped: bool = False
    aliased: bool = False
    ever_identified: bool = False
    cart: list[tuple[Product, int]] = field(default_factory=list)
    cart_id: str = ""
    steps: deque[_Step] = field(default_factory=deque)
    last_url: str = ""
    #: (path, title, referrer) of the page the user is on while planning.
    page: tuple[str, str, str] = ("/", "Northwind Shop", "")


def _money(value: float) -> float:
    return round(value, 2)


class _Planner:
    """Turns a user's state into the next session's calls (stochastic, seeded)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def price(self, u: _User, product: Product) -> float:
        rate = u.profile.country.usd_rate
        value = product.price * rate
        return float(round(value)) if rate >= 100 else _money(value)

    def product_props(self, u: _User, product: Product, **extra: Any) -> dict[str, Any]:
        props: dict[str, Any] = {
            "product_id": product.product_id,
            "sku": product.sku,
            "category": product.category,
            "name": product.name,
            "brand": product.brand,
            "price": self.price(u, product),
            "currency": u.profile.country.currency,
        }
        props.update(extra)
        return props

    def cart_products(self, u: _User) -> list[dict[str, Any]]:
        return [
            {
                "product_id": p.product_id,
                "sku": p.sku,
                "name": p.name,
                "category": p.category,
                "brand": p.brand,
                "price": self.price(u, p),
                "quantity": q,
                "position": i + 1,
            }
            for i, (p, q) in enumerate(u.cart)
        ]

    def view(
        self,
        u: _User,
        steps: list[_Step],
        name: str,
        category: str | None,
        path: str,
        title: str,
        properties: dict[str, Any] | None = None,
        landing: bool = False,
    ) -> None:
        rng = self.rng
        utm = None
        campaign_context = False
        referrer = u.last_url
        if landing:  # crawlers never arrive through campaign links
            referrer = rng.choice(_REFERRERS)
            if u.profile.kind != "bot" and rng.random() < 0.35:
                utm = rng.choice(_CAMPAIGNS)
                referrer = "" if utm[1] == "email" else referrer
                # analytics.js fills context.campaign from the URL; some clients do not.
                campaign_context = rng.random() < 0.7
        if u.profile.kind == "app":
            props = dict(properties or {})
            steps.append(
                _Step(
                    "screen", u.identified, name=name, category=category, properties=props or None
                )
            )
            return
        steps.append(
            _Step(
                "page",
                u.identified,
                name=name,
                category=category,
                properties=properties,
                path=path,
                title=title,
                utm=utm,
                campaign_context=campaign_context,
                referrer=referrer,
            )
        )
        u.last_url = SHOP_URL + path
        u.page = (path, title, referrer)

    def call(self, u: _User, kind: str, **fields: Any) -> _Step:
        """A non-page call, carrying the page it happened on (analytics.js does the same)."""
        path, title, referrer = u.page
        return _Step(kind, u.identified, path=path, title=title, referrer=referrer, **fields)

    def track(self, u: _User, steps: list[_Step], event: str, props: dict[str, Any]) -> None:
        steps.append(self.call(u, "track", name=event, properties=props))

    def identify(self, u: _User, steps: list[_Step]) -> None:
        u.identified = True
        steps.append(self.call(u, "identify", first_identify=not u.ever_identified))
        u.ever_identified = True
        if u.profile.aliases and not u.aliased:
            u.aliased = True
            steps.append(self.call(u, "alias"))

    def plan_session(self, u: _User) -> deque[_Step]:
        rng = self.rng
        p = u.profile
        u.sessions += 1
        steps: list[_Step] = []
        if p.kind == "bot":
            for _ in range(rng.randint(1, 4)):
                prod = rng.choice(CATALOGUE)
                self.view(
                    u,
                    steps,
                    "Product",
                    "Shop",
                    f"/products/{prod.slug}",
                    f"{prod.name} | Northwind Shop",
                    landing=not steps,
                )
            return deque(steps)

        app = p.kind == "app"
        home = rng.choice(_SCREENS_HOME) if app else "Home"
        self.view(u, steps, home, None, "/", "Northwind Shop", landing=True)
        if u.identified and rng.random() < 0.2:
            self.identify(u, steps)  # a returning login refreshes traits
        if u.identified and p.company is not None and not u.grouped and rng.random() < 0.5:
            u.grouped = True
            steps.append(self.call(u, "group"))

        category = rng.choice(p.favourites) if rng.random() < 0.8 else rng.choice(_CATEGORY_NAMES)
        shelf = _BY_CATEGORY[category]
        if rng.random() < 0.5:
            query = rng.choice(shelf).name.split(" ", 1)[1].lower()
            self.track(u, steps, "Products Searched", {"query": query})
        cat_path = f"/c/{_slug(category)}"
        self.view(
            u,
            steps,
            "Category",
            category,
            cat_path,
            f"{category} | Northwind Shop",
            properties={"category": category} if app else None,
        )

        first_anonymous = not u.identified and p.will_identify
        identify_at = rng.randint(0, 3) if first_anonymous and rng.random() < 0.5 else -1
        for i, prod in enumerate(rng.sample(shelf, rng.randint(1, 4))):
            if i == identify_at:
                self.identify(u, steps)  # signs up / logs in while browsing
            self.view(
                u,
                steps,
                "Product Detail" if app else "Product",
                category,
                f"/products/{prod.slug}",
                f"{prod.name} | Northwind Shop",
                properties={"product_id": prod.product_id} if app else None,
            )
            self.track(
                u,
                steps,
                "Product Viewed",
                self.product_props(u, prod, url=f"{SHOP_URL}/products/{prod.slug}", position=i + 1),
            )
            if u.profile.kind != "bot" and rng.random() < 0.35:
                if not u.cart:
                    u.cart_id = f"cart_{rng.getrandbits(40):010x}"
                qty = 1 if rng.random() < 0.85 else rng.randint(2, 3)
                u.cart.append((prod, qty))
                self.track(
                    u,
                    steps,
                    "Product Added",
                    self.product_props(u, prod, cart_id=u.cart_id, quantity=qty),
                )

        if u.cart and rng.random() < 0.12:
            prod, qty = u.cart.pop(rng.randrange(len(u.cart)))
            self.track(
                u,
                steps,
                "Product Removed",
                self.product_props(u, prod, cart_id=u.cart_id, quantity=qty),
            )

        if u.cart and rng.random() < 0.7:
            self.view(u, steps, "Cart", None, "/cart", "Your cart | Northwind Shop")
            self.track(
                u, steps, "Cart Viewed", {"cart_id": u.cart_id, "products": self.cart_products(u)}
            )
            if rng.random() < 0.6:
                self.checkout(u, steps)
        elif first_anonymous and not u.identified and rng.random() < 0.4:
            self.identify(u, steps)  # creates an account without buying
        return deque(steps)

    def checkout(self, u: _User, steps: list[_Step]) -> None:
        rng = self.rng
        p = u.profile
        if not u.identified and (p.will_identify or rng.random() < 0.3):
            if p.will_identify:
                self.identify(u, steps)  # login at checkout
            else:
                return  # guest without an account leaves
        order_id = f"ord_{rng.getrandbits(40):010x}"
        products = self.cart_products(u)
        subtotal = _money(sum(item["price"] * item["quantity"] for item in products))
        coupon = rng.choice(_COUPONS) if rng.random() < 0.15 else None
        discount = _money(subtotal * coupon[2]) if coupon else 0.0
        shipping = 0.0 if (coupon and coupon[0] == "FREESHIP") or subtotal > 75 else 4.99
        tax = _money((subtotal - discount) * 0.08)
        revenue = _money(subtotal - discount)
        total = _money(revenue + shipping + tax)
        currency = p.country.currency
        self.view(u, steps, "Checkout", None, "/checkout", "Checkout | Northwind Shop")
        self.track(
            u,
            steps,
            "Checkout Started",
            {
                "order_id": order_id,
                "value": subtotal,
                "revenue": revenue,
                "shipping": shipping,
                "tax": tax,
                "discount": discount,
                "currency": currency,
                "products": products,
            },
        )
        if coupon:
            self.track(
                u,
                steps,
                "Coupon Applied",
                {
                    "order_id": order_id,
                    "cart_id": u.cart_id,
                    "coupon_id": coupon[0],
                    "coupon_name": coupon[1],
                    "discount": discount,
                },
            )
        if rng.random() < 0.8:
            props: dict[str, Any] = {
                "checkout_id": f"chk_{rng.getrandbits(32):08x}",
                "order_id": order_id,
                "affiliation": "Northwind Online",
                "total": total,
                "subtotal": subtotal,
                "revenue": revenue,
                "shipping": shipping,
                "tax": tax,
                "discount": discount,
                "currency": currency,
                "products": products,
            }
            if coupon:
                props["coupon"] = coupon[0]
            self.track(u, steps, "Order Completed", props)
            u.orders += 1
            u.cart = []
            u.cart_id = ""


# --------------------------------------------------------------------------- rendering


@lru_cache(maxsize=64)
def _iso_date(day: int) -> str:
    return datetime.fromtimestamp(day * 86_400, UTC).date().isoformat()


def _iso(ms: int) -> str:
    """Epoch millis as analytics.js writes them (``2026-11-27T10:15:02.123Z``), fast."""
    day, rem = divmod(ms, _DAY)
    hours, rem = divmod(rem, _HOUR)
    minutes, rem = divmod(rem, _MINUTE)
    seconds, millis = divmod(rem, 1000)
    return f"{_iso_date(day)}T{hours:02d}:{minutes:02d}:{seconds:02d}.{millis:03d}Z"


def _context(u: _User, step: _Step) -> dict[str, Any]:
    p = u.profile
    ctx: dict[str, Any] = {
        "ip": p.ip,
        "userAgent": p.user_agent,
        "locale": p.country.locale,
        "timezone": p.timezone,
    }
    if p.kind == "app":
        assert p.app_device is not None
        dev_type, os_name, os_version, manufacturer, model, _ = p.app_device
        lib = _LIB_IOS if dev_type == "ios" else _LIB_ANDROID
        ctx["library"] = {"name": lib[0], "version": lib[1]}
        ctx["device"] = {
            "id": p.device_id,
            "manufacturer": manufacturer,
            "model": model,
            "type": dev_type,
        }
        ctx["os"] = {"name": os_name, "version": os_version}
        ctx["app"] = {
            "name": "Northwind Shop",
            "version": "5.4.1",
            "build": "541",
            "namespace": "com.example.northwind",
        }
        ctx["network"] = {"wifi": (p.index % 3) != 0}
    else:
        ctx["library"] = {"name": _LIB_WEB[0], "version": _LIB_WEB[1]}
        path = step.path or "/"
        page: dict[str, Any] = {"path": path, "title": step.title, "url": SHOP_URL + path}
        search = ""
        if step.utm is not None:
            source, medium, name, term, content = step.utm
            query = {"utm_source": source, "utm_medium": medium, "utm_campaign": name}
            if term:
                query["utm_term"] = term
            if content:
                query["utm_content"] = content
            search = "?" + urlencode(query)
            page["url"] += search
            if step.campaign_context:
                camp = {"name": name, "source": source, "medium": medium}
                if term:
                    camp["term"] = term
                if content:
                    camp["content"] = content
                ctx["campaign"] = camp
        page["search"] = search
        page["referrer"] = step.referrer or ""
        ctx["page"] = page
    if p.kind != "bot":
        ctx["consent"] = {"categoryPreferences": dict(p.consent)}
    return ctx


def _traits(u: _User, step: _Step, ts_ms: int) -> dict[str, Any]:
    p = u.profile
    traits: dict[str, Any] = {
        "email": p.email,
        "firstName": p.first_name,
        "lastName": p.last_name,
        "phone": p.phone,
        "city": p.city,
        "country": p.country.code,
        "plan": p.plan,
    }
    if step.first_identify:
        traits["createdAt"] = _iso(ts_ms)  # the account is created by the first identify
    return traits


def _render(u: _User, step: _Step, ts_ms: int, rng: random.Random) -> dict[str, Any]:
    p = u.profile
    ev: dict[str, Any] = {"type": step.kind, "messageId": _uuid(rng)}
    ev["anonymousId"] = p.anonymous_id
    if step.identified:
        ev["userId"] = p.user_id
    ev["timestamp"] = _iso(ts_ms)
    ev["context"] = _context(u, step)
    kind = step.kind
    if kind == "track":
        ev["event"] = step.name
        ev["properties"] = step.properties or {}
    elif kind in ("page", "screen"):
        ev["name"] = step.name
        if step.category:
            ev["category"] = step.category
        if kind == "page":
            page = ev["context"]["page"]
            props = {k: page[k] for k in ("path", "referrer", "search", "title", "url")}
            props.update(step.properties or {})
            ev["properties"] = props
        elif step.properties:
            ev["properties"] = step.properties
    elif kind == "identify":
        ev["traits"] = _traits(u, step, ts_ms)
    elif kind == "group":
        assert p.company is not None
        ev["groupId"] = p.company[0]
        ev["traits"] = dict(p.company[1])
    elif kind == "alias":
        ev["previousId"] = p.anonymous_id
    if rng.random() < 0.05:
        ev["integrations"] = {"All": True, "Google Analytics": p.consent["Analytics"]}
    return ev


def _bad_event(u: _User, ts_ms: int, rng: random.Random, reason: Reason) -> dict[str, Any]:
    """A realistic track call broken in exactly one way."""
    prod = rng.choice(CATALOGUE)
    path, title, referrer = u.page
    step = _Step(
        "track", u.identified, name="Product Viewed", path=path, title=title, referrer=referrer
    )
    ev = _render(u, step, ts_ms, rng)
    ev["properties"] = {
        "product_id": prod.product_id,
        "sku": prod.sku,
        "name": prod.name,
        "price": prod.price,
        "currency": "USD",
        BAD_MARKER: str(reason),
    }
    if reason is Reason.MISSING_IDENTITY:
        ev.pop("userId", None)
        ev.pop("anonymousId", None)
    elif reason is Reason.MISSING_EVENT:
        if rng.random() < 0.5:
            ev.pop("event")
        else:
            ev["event"] = ""
    elif reason is Reason.TIMESTAMP_IN_FUTURE:
        ev["timestamp"] = _iso(ts_ms + rng.randint(3, 30) * 365 * _DAY)
    elif reason is Reason.TIMESTAMP_TOO_OLD:
        ev["timestamp"] = _iso(rng.randint(0, 20) * 365 * _DAY)  # 1970s-1980s
    elif reason is Reason.INVALID_TIMESTAMP:
        ev["timestamp"] = rng.choice(
            ("yesterday", "31/12/2024 10:00", "not-a-date", "2024-13-45T25:61:00Z")
        )
    return ev


def bad_reason(event: Mapping[str, Any]) -> Reason | None:
    """The reason a generated event was broken for, or None for a good one."""
    props = event.get("properties")
    if isinstance(props, Mapping) and BAD_MARKER in props:
        return Reason(props[BAD_MARKER])
    return None


# --------------------------------------------------------------------------- timeline


@dataclass(frozen=True, slots=True)
class _Timeline:
    span_ms: int
    arrival_ms: int
    in_gap_ms: float
    session_gap_ms: float

    @classmethod
    def for_load(cls, count: int, users: int) -> _Timeline:
        """Size gaps so ~count/users events per user fit in at most about a month."""
        per_user = max(count, 1) / users
        sessions = max(1.0, per_user / _EVENTS_PER_SESSION)
        span = min(max(sessions * _DAY, _DAY), 30 * _DAY)
        cycle = span / sessions
        session_len = min(6 * _MINUTE, cycle / 3)
        return cls(
            span_ms=int(span),
            arrival_ms=int(span * 0.25),
            in_gap_ms=session_len / _EVENTS_PER_SESSION,
            session_gap_ms=cycle - session_len,
        )

    def default_start(self, now_ms: int) -> int:
        """Deterministic within a UTC day, and ending before that day started."""
        midnight = now_ms - now_ms % _DAY
        back = math.ceil((self.span_ms + self.arrival_ms) * 1.3 / _HOUR) * _HOUR
        return midnight - back


def generate_events(
    count: int,
    users: int,
    seed: int = 42,
    start_ms: int | None = None,
    bad_ratio: float = 0.0,
) -> Iterator[dict[str, Any]]:
    """Yield ``count`` Segment-spec messages from ``users`` simulated people, in time order.

    Users interleave as they would in a live stream; each one's events have
    strictly increasing timestamps. Invalid events (``bad_ratio``) carry
    ``properties[BAD_MARKER]`` and count towards ``count``.
    """
    if count < 0:
        raise ValueError("count must be >= 0")
    if users < 1:
        raise ValueError("users must be >= 1")
    if not 0.0 <= bad_ratio <= 1.0:
        raise ValueError("bad_ratio must be within [0, 1]")
    timeline = _Timeline.for_load(count, users)
    if start_ms is None:
        start_ms = timeline.default_start(time.time_ns() // 1_000_000)
    rng = random.Random(f"cdpflow:{seed}:stream")
    planner = _Planner(rng)
    heap = [(start_ms + int(rng.random() * timeline.arrival_ms), i) for i in range(users)]
    heapq.heapify(heap)
    states: dict[int, _User] = {}
    in_gap, session_gap = timeline.in_gap_ms, timeline.session_gap_ms
    for _ in range(count):
        ts, i = heapq.heappop(heap)
        u = states.get(i)
        if u is None:
            u = states[i] = _User(_profile(seed, i))
        if bad_ratio and rng.random() < bad_ratio:
            yield _bad_event(u, ts, rng, rng.choice(BAD_REASONS))
        else:
            if not u.steps:
                u.steps = planner.plan_session(u)
            yield _render(u, u.steps.popleft(), ts, rng)
        gap = in_gap * rng.uniform(0.2, 1.8) if u.steps else session_gap * rng.uniform(0.3, 1.7)
        heapq.heappush(heap, (ts + max(1, int(gap)), i))


_REC_REASONS: Final = (
    ("viewed_similar", 0.35),
    ("bought_together", 0.25),
    ("trending_in_category", 0.15),
    ("because_you_searched", 0.15),
    ("top_rated", 0.1),
)


def generate_recommendations(
    users: int,
    seed: int = 42,
    *,
    per_user: int = 10,
    model_version: str = "als-2026.11.1",
    generated_at_ms: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield one ranked list per user who identifies in ``generate_events(.., users, seed)``.

    Each item is keyword arguments for :meth:`EventPublisher.publish_recommendations`
    (``customer_id``, ``products`` as ``{productId, score, reason, category}`` best
    first, ``model_version``, ``generated_at``, ``update_id``). Lists lean on the
    user's favourite categories, so recommendations and browsing agree.
    """
    if generated_at_ms is None:
        now = time.time_ns() // 1_000_000
        generated_at_ms = now - now % _DAY
    for i in range(users):
        p = _profile(seed, i)
        if not p.will_identify:
            continue
        rng = random.Random(f"cdpflow:{seed}:recs:{i}")
        pool = [prod for c in p.favourites for prod in _BY_CATEGORY[c]]
        n_fav = min(len(pool), max(1, round(per_user * 0.7)))
        chosen = rng.sample(pool, n_fav)
        others = [prod for prod in CATALOGUE if prod.category not in p.favourites]
        chosen += rng.sample(others, min(len(others), max(0, per_user - n_fav)))
        scores = sorted((rng.uniform(0.05, 0.99) for _ in chosen), reverse=True)
        yield {
            "customer_id": p.user_id,
            "products": [
                {
                    "productId": prod.product_id,
                    "score": round(score, 4),
                    "reason": _weighted(rng, _REC_REASONS),
                    "category": prod.category,
                }
                for prod, score in zip(chosen, scores, strict=True)
            ],
            "model_version": model_version,
            "generated_at": generated_at_ms,
            "update_id": _uuid(rng),
        }


# --------------------------------------------------------------------------- running


@dataclass(frozen=True, slots=True)
class GeneratorStats:
    """What a run did. ``events_per_s`` is sent events over the whole run, final flush included."""

    sent: int
    acked: int
    failed: int
    rejected: int
    dropped: int
    pending: int
    elapsed_s: float
    events_per_s: float


class _TokenBucket:
    """Paces to ``rate``/s, sleeping in batches so a high rate is not a sleep per event."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate / 20)  # ~50 ms of burst
        self.tokens = self.capacity
        self.last = time.monotonic()

    def take(self) -> None:
        self.tokens -= 1.0
        if self.tokens >= 0:
            return
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 0:
            # Sleep until half the bucket is back: at most ~40 sleeps per second.
            want = max(-self.tokens, self.capacity / 2)
            time.sleep(want / self.rate)
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
            self.last = now


def run_generator(
    publisher: EventPublisher,
    count: int,
    users: int,
    rate: float | None = None,
    seed: int = 42,
    *,
    bad_ratio: float = 0.0,
    start_ms: int | None = None,
    progress: bool | None = None,
    flush_timeout: float = 60.0,
) -> GeneratorStats:
    """Publish ``generate_events(count, users, seed)`` at ``rate`` events/s (None = flat out).

    Invalid events are counted as ``rejected`` (the publisher refuses them at the
    call site); ``dropped`` counts local-queue overflows of a non-blocking publisher.
    A progress bar is drawn when stderr is a terminal (or ``progress=True``).
    """
    if rate is not None and rate <= 0:
        raise ValueError("rate must be > 0 or None")
    show = sys.stderr.isatty() if progress is None else progress
    outcomes = DeliveryTracker()
    bucket = _TokenBucket(rate) if rate is not None else None
    sent = rejected = dropped = 0
    started = time.monotonic()
    events = generate_events(count, users, seed=seed, start_ms=start_ms, bad_ratio=bad_ratio)

    bar: Any = None
    task: Any = None
    if show:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        bar = Progress(
            TextColumn("[bold]publishing"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            transient=False,
        )
        bar.start()
        task = bar.add_task("events", total=count)
    try:
        for n, ev in enumerate(events, 1):
            if bucket is not None:
                bucket.take()
            try:
                fut = publisher.send(ev)
            except EventRejected:
                rejected += 1
            except QueueFull:
                dropped += 1
            else:
                sent += 1
                outcomes.watch(fut, ev["messageId"])
            if bar is not None and n % 1000 == 0:
                bar.update(task, completed=n)
        # Wait for this run's records only: publisher.flush() would consume the flush
        # window of whoever else shares the publisher.
        outcomes.wait(flush_timeout)
        result = outcomes.take()
        if bar is not None:
            bar.update(task, completed=count)
    finally:
        if bar is not None:
            bar.stop()
    elapsed = time.monotonic() - started
    return GeneratorStats(
        sent=sent,
        acked=result.delivered,
        failed=result.failed,
        rejected=rejected,
        dropped=dropped,
        pending=result.pending,
        elapsed_s=elapsed,
        events_per_s=sent / elapsed if elapsed > 0 else 0.0,
    )
