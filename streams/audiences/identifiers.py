"""Customer identifiers for ad platforms: normalised the way each platform matches, then hashed.

Meta Custom Audiences, Google Ads Customer Match and LinkedIn Matched Audiences
match people on SHA-256 hashes of *normalised* contact data. A hash is only
useful if our normalisation is byte-for-byte the platform's: ``Jane@X.com`` and
``jane@x.com`` hash to unrelated values, and only one of them matches. This
module is the single place that knows those rules, so the audience agent (which
writes ``cdp.audiences.updates``) and the full re-sync produce identical keys.
It is pure (no Faust, no I/O); the only outside input is the clock's current
year, used to reject birth years in the future.

Principles
----------
* Raw PII never leaves toward an ad platform: every value is SHA-256 hex except
  the two keys Google documents as sent in clear (``addressInfo.countryCode``
  and ``addressInfo.postalCode``). :data:`HASHED_KEYS` / :data:`CLEAR_KEYS` say
  which is which; the sinks re-check them before sending.
* Invalid values are dropped, never hashed. A hash of garbage matches nobody
  and hides the data problem. :func:`identifier_problems` returns
  machine-readable reasons (``"PHONE_INVALID"``, ...) that never contain the
  raw value, so they may be logged and counted.
* Nothing is guessed: a phone number without a country code is parsed with the
  profile's country, else the caller's ``default_country``, else dropped
  (``PHONE_NO_COUNTRY``). Country names ("Germany", "USA") are not mapped to
  codes; only ISO 3166-1 alpha-2 codes are accepted (plus ``UK`` -> ``GB``, the
  ISO exceptional reservation).

Inputs are Segment-spec identify traits: ``email``, ``phone``, ``firstName``,
``lastName`` (``first_name``/``last_name`` accepted), ``name`` (split on
whitespace, first token -> first name, last token -> last name, used only for
the part that is absent), ``gender``, ``birthday`` (ISO date, or an ISO
timestamp whose date part is used), ``address`` {``city``, ``state``,
``postalCode``, ``country``} and the same four at top level (the ``address``
object wins).

Per-platform rules and their sources
------------------------------------
Meta (``meta``) — keys ``EMAIL PHONE FN LN GEN DOBY DOBM DOBD CT ST ZIP
COUNTRY``, all SHA-256 hex. Sources: the normalisation table in
https://developers.facebook.com/docs/marketing-api/audiences/guides/custom-audiences
(restated in destinations.md section 4.4), the worked examples in
https://developers.facebook.com/docs/marketing-api/conversions-api/parameters/customer-information-parameters
and Meta's SDK ``facebook_business/adobjects/serverside/normalize.py``.

* EMAIL: trim, lowercase. No Gmail-specific rewriting (Meta's own example keeps
  ``john_smith@gmail.com`` as is).
* PHONE: E.164 digits without ``+`` (country code included, no leading zeros).
* FN / LN: lowercase, letters only: punctuation, digits and spaces removed;
  accented and non-Latin letters kept (Meta's examples: ``Valéry`` -> ``valéry``,
  ``정`` kept). Unicode NFC first so composed and decomposed accents hash alike.
* FI is not sent: FN carries strictly more, and Meta's own examples treat a
  one-character first name (``정``) as FN, so there is no reliable way to tell an
  initial from a name.
* GEN: ``m`` / ``f`` (from m/male/man, f/female/woman); other values are not
  representable (``GENDER_UNMAPPED``).
* DOBY / DOBM / DOBD: ``YYYY`` (1900..current year), ``MM``, ``DD``.
* CT: lowercase letters only (no spaces, no punctuation).
* ST: US: the 2-letter ANSI code, lowercase (full state names mapped);
  elsewhere lowercase letters only.
* ZIP: lowercase, no spaces; US: first 5 digits; GB: area/district/sector
  (``SW1A 1AA`` -> ``sw1a1``); elsewhere cut at ``-`` like Meta's SDK.
* COUNTRY: ISO 3166-1 alpha-2, lowercase, hashed like every other Meta key.
* EXTERN_ID is deliberately **not** sent, although ``user_id`` is accepted. Meta
  can match an EXTERN_ID only against the same id sent earlier as
  ``external_id`` through its pixel or Conversions API, and cdpflow sends no such
  events, so it would never add a match. It would, however, hand Meta a stable
  identifier of ours for every person (data minimisation says no), and Meta
  takes EXTERN_ID unhashed, which breaks the "hashed or documented-clear" rule.

Google Ads Customer Match (``google_ads``) — keys ``hashedEmail``,
``hashedPhoneNumber`` and the address group ``addressInfo.hashedFirstName``,
``addressInfo.hashedLastName``, ``addressInfo.countryCode`` (clear, upper-case
alpha-2) and ``addressInfo.postalCode`` (clear). Sources:
https://developers.google.com/data-manager/api/devguides/concepts/formatting
(Google's current formatting rules for Customer Match audience members),
Google's ``googleads/data-manager-python`` ``Formatter`` and its tests,
``googleads/google-ads-python`` ``examples/remarketing/add_customer_match_user_list.py``
and https://support.google.com/google-ads/answer/7659867.

* hashedEmail: trim, lowercase. **Gmail rule applied**: for ``gmail.com`` and
  ``googlemail.com`` every ``.`` in the local part is removed and a ``+tag`` is
  cut off (``Cloudy.SanFrancisco+shopping@gmail.com`` ->
  ``cloudysanfrancisco@gmail.com``). Why: the Google Ads API's Customer Match
  sample only trims and lowercases, and destinations.md left the question
  open, but Google's Data Manager API formatting guide, which covers Customer
  Match audience members and is where Google now steers Customer Match uploads,
  requires it, and Google's official formatter implements it. Gmail ignores dots
  and ``+tags``, so the canonical form names the same Google account; sending it
  can only raise the match rate. Other domains are left alone
  (``user.name+NYC@Example.com`` -> ``user.name+nyc@example.com``).
* hashedPhoneNumber: E.164 **with** ``+`` (``(800)555-0100`` in the US ->
  ``+18005550100``).
* hashedFirstName / hashedLastName: trim, lowercase (whitespace runs inside
  collapsed to one space); accents and punctuation kept (Google says trim and
  lowercase, nothing more; its formatter does exactly that).
* countryCode: upper-case alpha-2 in clear; postalCode in clear, trimmed (US:
  5 digits or ZIP+4).
* The address group is emitted only when all four parts are valid: Google needs
  all four to match on an address, and a partial group is rejected
  (``ADDRESS_INCOMPLETE`` otherwise, when any part was given).

LinkedIn (``linkedin``) — ``SHA256_EMAIL`` only: trim, lowercase, SHA-256
(https://learn.microsoft.com/en-us/linkedin/marketing/matched-audiences/create-and-manage-segment-users;
LinkedIn's exact normalisation wording is unconfirmed, see destinations.md
section 6.3). The optional unhashed ``firstName``/``lastName``/``company`` match
hints are never produced: raw PII must not leave toward an ad platform.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from types import MappingProxyType
from typing import Any, Final

import phonenumbers

__all__ = [
    "CLEAR_KEYS",
    "HASHED_KEYS",
    "PLATFORMS",
    "PROBLEM_CODES",
    "InvalidDefaultCountryError",
    "UnknownPlatformError",
    "country_code",
    "google_name",
    "google_postal_code",
    "identifier_problems",
    "identifiers_for",
    "is_sha256_hex",
    "is_sha512_hex",
    "meta_letters",
    "meta_state",
    "meta_zip",
    "normalize_email",
    "normalize_phone",
    "sha256_hex",
]

PLATFORMS: tuple[str, ...] = ("meta", "google_ads", "linkedin")

#: Google's address group, all four parts needed for a match.
GOOGLE_FIRST_NAME: Final = "addressInfo.hashedFirstName"
GOOGLE_LAST_NAME: Final = "addressInfo.hashedLastName"
GOOGLE_COUNTRY: Final = "addressInfo.countryCode"
GOOGLE_POSTAL_CODE: Final = "addressInfo.postalCode"

#: Meta's multi-key schema keys this module produces, in the order requests lay them out.
META_KEYS: tuple[str, ...] = (
    "EMAIL",
    "PHONE",
    "FN",
    "LN",
    "GEN",
    "DOBY",
    "DOBM",
    "DOBD",
    "CT",
    "ST",
    "ZIP",
    "COUNTRY",
)

#: per platform, the identifier keys whose values must be SHA-256 hex, and the keys sent in clear
HASHED_KEYS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "meta": frozenset(META_KEYS),
        "google_ads": frozenset(
            {"hashedEmail", "hashedPhoneNumber", GOOGLE_FIRST_NAME, GOOGLE_LAST_NAME}
        ),
        "linkedin": frozenset({"SHA256_EMAIL"}),
    }
)
CLEAR_KEYS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "meta": frozenset(),
        "google_ads": frozenset({GOOGLE_COUNTRY, GOOGLE_POSTAL_CODE}),
        "linkedin": frozenset(),
    }
)

# Reasons reported by identifier_problems (never carrying the raw value).
EMAIL_INVALID: Final = "EMAIL_INVALID"
PHONE_INVALID: Final = "PHONE_INVALID"
PHONE_NO_COUNTRY: Final = "PHONE_NO_COUNTRY"
FIRST_NAME_INVALID: Final = "FIRST_NAME_INVALID"
LAST_NAME_INVALID: Final = "LAST_NAME_INVALID"
NAME_UNSPLITTABLE: Final = "NAME_UNSPLITTABLE"
GENDER_UNMAPPED: Final = "GENDER_UNMAPPED"
BIRTHDAY_INVALID: Final = "BIRTHDAY_INVALID"
CITY_INVALID: Final = "CITY_INVALID"
STATE_INVALID: Final = "STATE_INVALID"
POSTAL_CODE_INVALID: Final = "POSTAL_CODE_INVALID"
COUNTRY_INVALID: Final = "COUNTRY_INVALID"
ADDRESS_INCOMPLETE: Final = "ADDRESS_INCOMPLETE"
NO_IDENTIFIERS: Final = "NO_IDENTIFIERS"
PROBLEM_CODES: frozenset[str] = frozenset(
    {
        EMAIL_INVALID,
        PHONE_INVALID,
        PHONE_NO_COUNTRY,
        FIRST_NAME_INVALID,
        LAST_NAME_INVALID,
        NAME_UNSPLITTABLE,
        GENDER_UNMAPPED,
        BIRTHDAY_INVALID,
        CITY_INVALID,
        STATE_INVALID,
        POSTAL_CODE_INVALID,
        COUNTRY_INVALID,
        ADDRESS_INCOMPLETE,
        NO_IDENTIFIERS,
    }
)


class UnknownPlatformError(ValueError):
    """The platform is not one of :data:`PLATFORMS`."""

    def __init__(self, platform: str) -> None:
        super().__init__(f"unknown ad platform {platform!r}; expected one of {PLATFORMS}")
        self.platform = platform


class InvalidDefaultCountryError(ValueError):
    """``default_country`` is configuration: a bad one fails loudly instead of dropping phones."""

    def __init__(self, value: str) -> None:
        super().__init__(f"default_country {value!r} is not an ISO 3166-1 alpha-2 code")
        self.value = value


# ---------------------------------------------------------------------------- hashing


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_SHA512_HEX = re.compile(r"[0-9a-f]{128}")


def sha256_hex(text: str) -> str:
    """Lowercase hex SHA-256 of the UTF-8 bytes of ``text`` (what all three platforms expect)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_sha256_hex(value: str) -> bool:
    """``^[0-9a-f]{64}$`` (no trailing newline accepted)."""
    return isinstance(value, str) and _SHA256_HEX.fullmatch(value) is not None


def is_sha512_hex(value: str) -> bool:
    """``^[0-9a-f]{128}$`` (LinkedIn's ``SHA512_EMAIL``)."""
    return isinstance(value, str) and _SHA512_HEX.fullmatch(value) is not None


# ----------------------------------------------------------------------- normalisers
# Each returns the normalised text, or None when the value is unusable. Each is
# idempotent: normalising its own output returns it unchanged.

_EMAIL_LOCAL = re.compile(r"[^\s@]+")
_EMAIL_DOMAIN = re.compile(r"[^\s@.]+(?:\.[^\s@.]+)+")
_GMAIL_DOMAINS = frozenset({"gmail.com", "googlemail.com"})


def normalize_email(value: object, *, canonical_gmail: bool = False) -> str | None:
    """Trim and lowercase; None unless it looks like ``local@domain.tld``.

    ``canonical_gmail`` applies Google's Gmail rule (dots and ``+tag`` removed in
    the local part of gmail.com / googlemail.com addresses). Whitespace inside
    the address makes it invalid (Google's formatter rejects it too): such a
    value is broken data, not a formatting variant.
    """
    if not isinstance(value, str):
        return None
    email = unicodedata.normalize("NFC", value.strip()).lower()
    local, sep, domain = email.partition("@")
    if not sep or not _EMAIL_LOCAL.fullmatch(local) or not _EMAIL_DOMAIN.fullmatch(domain):
        return None
    if canonical_gmail and domain in _GMAIL_DOMAINS:
        local = local.split("+", 1)[0].replace(".", "")
        if not local:
            return None
    return f"{local}@{domain}"


#: Region codes libphonenumber knows: ISO 3166-1 alpha-2 plus a few exceptionally
#: reserved ones (AC, TA, XK). "UK" is ISO's exceptional reservation for GB.
_COUNTRY_ALIASES: Final = MappingProxyType({"UK": "GB"})
_COUNTRIES: frozenset[str] = frozenset(phonenumbers.SUPPORTED_REGIONS)


def country_code(value: object) -> str | None:
    """Upper-case ISO 3166-1 alpha-2 code, or None. Names and alpha-3 codes are not guessed."""
    if not isinstance(value, str):
        return None
    code = value.strip().upper()
    code = _COUNTRY_ALIASES.get(code, code)
    return code if code in _COUNTRIES else None


class _NoCountry(Exception):
    """A national-format phone number and no country to read it with."""


def normalize_phone(value: object, region: str | None) -> str | None:
    """E.164 with ``+`` (``+16505551212``), or None when not a valid number.

    Numbers written with ``+`` are read as international; others are read in
    ``region``'s national format (which also understands its international
    dialling prefix, e.g. ``00`` in Europe). Raises :class:`_NoCountry` for a
    national-format number when ``region`` is None: dropping it is right, but it
    is a different data problem than a malformed number.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        return None
    text = value.strip()
    if not text.startswith("+") and region is None:
        raise _NoCountry
    try:
        number = phonenumbers.parse(text, None if text.startswith("+") else region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _has_letter(text: str) -> bool:
    return any(unicodedata.category(ch).startswith("L") for ch in text)


def meta_letters(value: object) -> str | None:
    """Meta's FN/LN/CT form: NFC, lowercase, Unicode letters (and their combining marks) only."""
    if not isinstance(value, str):
        return None
    lowered = unicodedata.normalize("NFC", value).lower()
    kept = unicodedata.normalize(
        "NFC", "".join(ch for ch in lowered if unicodedata.category(ch)[0] in "LM")
    )
    return kept if _has_letter(kept) else None


_WHITESPACE_RUN = re.compile(r"\s+")


def google_name(value: object) -> str | None:
    """Google's first/last name form: NFC, trimmed, lowercase, inner whitespace runs collapsed."""
    if not isinstance(value, str):
        return None
    text = unicodedata.normalize(
        "NFC", unicodedata.normalize("NFC", _WHITESPACE_RUN.sub(" ", value).strip()).lower()
    )
    return text if _has_letter(text) else None


# fmt: off
_US_STATES: Final = MappingProxyType(
    {
        "alabama": "al", "alaska": "ak", "arizona": "az", "arkansas": "ar", "california": "ca",
        "colorado": "co", "connecticut": "ct", "delaware": "de", "florida": "fl", "georgia": "ga",
        "hawaii": "hi", "idaho": "id", "illinois": "il", "indiana": "in", "iowa": "ia",
        "kansas": "ks", "kentucky": "ky", "louisiana": "la", "maine": "me", "maryland": "md",
        "massachusetts": "ma", "michigan": "mi", "minnesota": "mn", "mississippi": "ms",
        "missouri": "mo", "montana": "mt", "nebraska": "ne", "nevada": "nv",
        "newhampshire": "nh", "newjersey": "nj", "newmexico": "nm", "newyork": "ny",
        "northcarolina": "nc", "northdakota": "nd", "ohio": "oh", "oklahoma": "ok",
        "oregon": "or", "pennsylvania": "pa", "rhodeisland": "ri", "southcarolina": "sc",
        "southdakota": "sd", "tennessee": "tn", "texas": "tx", "utah": "ut", "vermont": "vt",
        "virginia": "va", "washington": "wa", "westvirginia": "wv", "wisconsin": "wi",
        "wyoming": "wy", "districtofcolumbia": "dc", "puertorico": "pr", "guam": "gu",
        "americansamoa": "as", "northernmarianaislands": "mp", "usvirginislands": "vi",
        "virginislands": "vi",
    }
)
# fmt: on
_US_STATE_CODES: frozenset[str] = frozenset(_US_STATES.values())


def meta_state(value: object, country: str | None) -> str | None:
    """Meta's ST form: US -> lowercase ANSI code (names mapped); elsewhere letters only."""
    letters = meta_letters(value)
    if letters is None or country != "US":
        return letters
    if letters in _US_STATE_CODES:
        return letters
    return _US_STATES.get(letters)


_US_ZIP = re.compile(r"(\d{5})(?:-?\d{4})?")
_UK_POSTCODE = re.compile(r"([a-z]{1,2}\d[a-z\d]?)(\d)[a-z]{2}")
_UK_SECTOR = re.compile(r"[a-z]{1,2}\d[a-z\d]?\d")
_PLAIN_ZIP = re.compile(r"[0-9a-z]+")


def _postal_text(value: object) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value if isinstance(value, str) else None


def meta_zip(value: object, country: str | None) -> str | None:
    """Meta's ZIP form: lowercase, no spaces; US first 5 digits; GB area/district/sector."""
    text = _postal_text(value)
    if text is None:
        return None
    compact = "".join(text.split()).lower()
    if country == "US":
        us = _US_ZIP.fullmatch(compact)
        return us.group(1) if us else None
    if country == "GB":
        full = _UK_POSTCODE.fullmatch(compact)
        if full:
            return full.group(1) + full.group(2)
        return compact if _UK_SECTOR.fullmatch(compact) else None
    head = compact.split("-", 1)[0]  # as Meta's SDK: US-style "+4" suffixes cut
    return head if _PLAIN_ZIP.fullmatch(head) else None


_GOOGLE_POSTAL = re.compile(r"[0-9A-Za-z](?:[0-9A-Za-z -]*[0-9A-Za-z])?")
_US_ZIP_CLEAR = re.compile(r"\d{5}(?:-\d{4})?")


def google_postal_code(value: object, country: str | None) -> str | None:
    """Google's clear postal code: trimmed, inner whitespace collapsed; US: 5 or 5+4 digits."""
    text = _postal_text(value)
    if text is None:
        return None
    code = _WHITESPACE_RUN.sub(" ", text).strip()
    if country == "US":
        return code if _US_ZIP_CLEAR.fullmatch(code) else None
    return code if len(code) <= 16 and _GOOGLE_POSTAL.fullmatch(code) else None


_GENDERS: Final = MappingProxyType(
    {"m": "m", "male": "m", "man": "m", "f": "f", "female": "f", "woman": "f"}
)


def _gender(value: object) -> str | None:
    return _GENDERS.get(value.strip().lower()) if isinstance(value, str) else None


_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _birthday(value: object) -> date | None:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    if not isinstance(value, str):
        return None
    text = value.strip()
    if len(text) > 10 and text[10] in "T ":
        text = text[:10]
    if not _ISO_DATE.fullmatch(text):
        return None
    try:
        day = date.fromisoformat(text)
    except ValueError:
        return None
    # Meta accepts birth years from 1900 to the current year.
    return day if 1900 <= day.year <= datetime.now(UTC).year else None


# ----------------------------------------------------------------------------- traits


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _first_present(*values: object) -> object:
    for value in values:
        if not _missing(value):
            return value
    return None


@dataclass(frozen=True, slots=True)
class _Traits:
    """The identify traits this module reads, located but not yet normalised."""

    email: object
    phone: object
    first: object
    last: object
    name_unsplittable: bool
    gender: object
    birthday: object
    city: object
    state: object
    postal: object
    country: object

    @classmethod
    def read(cls, traits: Mapping[str, Any]) -> _Traits:
        raw_address = traits.get("address")
        address: Mapping[str, Any] = raw_address if isinstance(raw_address, Mapping) else {}

        def located(*keys: str) -> object:
            return _first_present(*(address.get(k) for k in keys), *(traits.get(k) for k in keys))

        first = _first_present(traits.get("firstName"), traits.get("first_name"))
        last = _first_present(traits.get("lastName"), traits.get("last_name"))
        unsplittable = False
        name = traits.get("name")
        if (_missing(first) or _missing(last)) and isinstance(name, str) and name.strip():
            tokens = name.split()
            if len(tokens) >= 2:
                first = tokens[0] if _missing(first) else first
                last = tokens[-1] if _missing(last) else last
            elif _missing(first) and _missing(last):
                unsplittable = True
        return cls(
            email=traits.get("email"),
            phone=traits.get("phone"),
            first=first,
            last=last,
            name_unsplittable=unsplittable,
            gender=traits.get("gender"),
            birthday=traits.get("birthday"),
            city=located("city"),
            state=located("state"),
            postal=located("postalCode", "postal_code"),
            country=located("country"),
        )


@dataclass(slots=True)
class _Result:
    identifiers: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def problem(self, code: str) -> None:
        if code not in self.problems:
            self.problems.append(code)

    def normalised(
        self, raw: object, normalise: Callable[[object], str | None], code: str
    ) -> str | None:
        """``normalise(raw)``; a present-but-unusable value is reported as ``code``."""
        if _missing(raw):
            return None
        value = normalise(raw)
        if value is None:
            self.problem(code)
        return value


def _phone(result: _Result, raw: object, region: str | None) -> str | None:
    if _missing(raw):
        return None
    try:
        e164 = normalize_phone(raw, region)
    except _NoCountry:
        result.problem(PHONE_NO_COUNTRY)
        return None
    if e164 is None:
        result.problem(PHONE_INVALID)
    return e164


def _meta(result: _Result, t: _Traits, country: str | None, region: str | None) -> None:
    out = result.identifiers
    if email := result.normalised(t.email, normalize_email, EMAIL_INVALID):
        out["EMAIL"] = sha256_hex(email)
    if phone := _phone(result, t.phone, region):
        out["PHONE"] = sha256_hex(phone.removeprefix("+"))
    if t.name_unsplittable:
        result.problem(NAME_UNSPLITTABLE)
    if first := result.normalised(t.first, meta_letters, FIRST_NAME_INVALID):
        out["FN"] = sha256_hex(first)
    if last := result.normalised(t.last, meta_letters, LAST_NAME_INVALID):
        out["LN"] = sha256_hex(last)
    if gender := result.normalised(t.gender, _gender, GENDER_UNMAPPED):
        out["GEN"] = sha256_hex(gender)
    if not _missing(t.birthday):
        if born := _birthday(t.birthday):
            out["DOBY"] = sha256_hex(f"{born.year:04d}")
            out["DOBM"] = sha256_hex(f"{born.month:02d}")
            out["DOBD"] = sha256_hex(f"{born.day:02d}")
        else:
            result.problem(BIRTHDAY_INVALID)
    if city := result.normalised(t.city, meta_letters, CITY_INVALID):
        out["CT"] = sha256_hex(city)
    if state := result.normalised(t.state, lambda v: meta_state(v, country), STATE_INVALID):
        out["ST"] = sha256_hex(state)
    if zip_ := result.normalised(t.postal, lambda v: meta_zip(v, country), POSTAL_CODE_INVALID):
        out["ZIP"] = sha256_hex(zip_)
    if country:
        out["COUNTRY"] = sha256_hex(country.lower())


def _google_ads(result: _Result, t: _Traits, country: str | None, region: str | None) -> None:
    out = result.identifiers
    gmail = lambda v: normalize_email(v, canonical_gmail=True)  # noqa: E731
    if email := result.normalised(t.email, gmail, EMAIL_INVALID):
        out["hashedEmail"] = sha256_hex(email)
    if phone := _phone(result, t.phone, region):
        out["hashedPhoneNumber"] = sha256_hex(phone)
    if t.name_unsplittable:
        result.problem(NAME_UNSPLITTABLE)
    first = result.normalised(t.first, google_name, FIRST_NAME_INVALID)
    last = result.normalised(t.last, google_name, LAST_NAME_INVALID)
    postal = result.normalised(
        t.postal, lambda v: google_postal_code(v, country), POSTAL_CODE_INVALID
    )
    if first and last and country and postal:
        out[GOOGLE_FIRST_NAME] = sha256_hex(first)
        out[GOOGLE_LAST_NAME] = sha256_hex(last)
        out[GOOGLE_COUNTRY] = country
        out[GOOGLE_POSTAL_CODE] = postal
    elif not all(_missing(v) for v in (t.first, t.last, t.country, t.postal)):
        result.problem(ADDRESS_INCOMPLETE)


def _linkedin(result: _Result, t: _Traits) -> None:
    if email := result.normalised(t.email, normalize_email, EMAIL_INVALID):
        result.identifiers["SHA256_EMAIL"] = sha256_hex(email)


def _build(platform: str, traits: Mapping[str, Any], default_country: str | None) -> _Result:
    if platform not in PLATFORMS:
        raise UnknownPlatformError(platform)
    fallback: str | None = None
    if default_country is not None:
        fallback = country_code(default_country)
        if fallback is None:
            raise InvalidDefaultCountryError(default_country)
    t = _Traits.read(traits)
    result = _Result()
    if platform == "linkedin":
        _linkedin(result, t)
    else:
        country = result.normalised(t.country, country_code, COUNTRY_INVALID)
        region = country or fallback
        if platform == "meta":
            _meta(result, t, country, region)
        else:
            _google_ads(result, t, country, region)
    if not result.identifiers:
        result.problem(NO_IDENTIFIERS)
    return result


def identifiers_for(
    platform: str,
    traits: Mapping[str, Any],
    *,
    user_id: str | None = None,
    default_country: str | None = None,
) -> dict[str, str]:
    """The platform's identifier keys for one profile, normalised and hashed (see module doc).

    Keys whose value is missing or invalid are omitted; an empty dict means the
    profile cannot be matched on this platform. ``user_id`` is accepted for a
    stable signature but not sent (see "EXTERN_ID" in the module docstring).
    ``default_country`` (ISO alpha-2) reads phone numbers written without a
    country code when the profile has no country; it is never sent as the
    person's country. Raises :class:`UnknownPlatformError` /
    :class:`InvalidDefaultCountryError` for bad arguments.
    """
    del user_id  # deliberately unused, see the module docstring
    return _build(platform, traits, default_country).identifiers


def identifier_problems(
    platform: str,
    traits: Mapping[str, Any],
    *,
    user_id: str | None = None,
    default_country: str | None = None,
) -> list[str]:
    """Why values were dropped for ``platform``: codes from :data:`PROBLEM_CODES`, first-seen order.

    Absent traits are not problems; present but unusable ones are. The codes
    name the field and the reason, never the value, so they can be logged and
    counted. ``NO_IDENTIFIERS`` means :func:`identifiers_for` returns ``{}``.
    """
    del user_id
    return _build(platform, traits, default_country).problems
