"""Identifier normalisation and hashing for Meta, Google Ads and LinkedIn audiences.

Vendor-published examples (input -> normalised -> SHA-256) are pinned with their
source next to each case; the rest are properties checked with hypothesis.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import phonenumbers
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.audiences.identifiers import (
    CLEAR_KEYS,
    HASHED_KEYS,
    PLATFORMS,
    PROBLEM_CODES,
    InvalidDefaultCountryError,
    UnknownPlatformError,
    country_code,
    google_name,
    google_postal_code,
    identifier_problems,
    identifiers_for,
    is_sha256_hex,
    is_sha512_hex,
    meta_letters,
    meta_state,
    meta_zip,
    normalize_email,
    normalize_phone,
    sha256_hex,
)

META_DOC = (
    "https://developers.facebook.com/docs/marketing-api/conversions-api/parameters/"
    "customer-information-parameters"
)
GOOGLE_FORMATTER_TESTS = (
    "https://github.com/googleads/data-manager-python/blob/main/tests/formatter_test.py"
)
GOOGLE_FORMATTING_DOC = (
    "https://developers.google.com/data-manager/api/devguides/concepts/formatting"
)
GOOGLE_QUICKSTART = "https://developers.google.com/data-manager/api/get-started/quickstart"


def h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


FULL_PROFILE: dict[str, Any] = {
    "email": "Jane.Doe+news@Gmail.com",
    "phone": "+1 (650) 555-1212",
    "firstName": "Jane",
    "lastName": "Doe",
    "gender": "female",
    "birthday": "1990-05-17",
    "address": {
        "city": "Menlo Park",
        "state": "CA",
        "postalCode": "94025",
        "country": "US",
    },
}


# ------------------------------------------------------------ documented vendor examples


class TestMetaDocumentedExamples:
    def test_email(self) -> None:
        # Source: META_DOC, "em": Input John_Smith@gmail.com -> john_smith@gmail.com
        out = identifiers_for("meta", {"email": "John_Smith@gmail.com"})
        assert out["EMAIL"] == "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f"

    def test_phone(self) -> None:
        # Source: META_DOC, "ph": US phone number (650)555-1212 -> 16505551212
        out = identifiers_for("meta", {"phone": "(650)555-1212"}, default_country="US")
        assert out["PHONE"] == "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176"

    @pytest.mark.parametrize(
        ("name", "expected"),
        [
            # Source: META_DOC, "fn": Mary -> mary
            ("Mary", "6915771be1c5aa0c886870b6951b03d7eafc121fea0e80a5ea83beb7c449f4ec"),
            # Source: META_DOC, "fn": 정 -> UTF-8 "정"
            ("정", "8fa8cd9c440be61d0151429310034083132b35975c4bea67fdd74158eb51db14"),
            # Source: META_DOC, "fn": Valéry -> valéry (accent kept)
            ("Valéry", "08e1996b5dd49e62a4b4c010d44e4345592a863bb9f8e3976219bac29417149c"),
            # Same example, accent written decomposed (e + U+0301): NFC makes it match.
            ("Vale\u0301ry", "08e1996b5dd49e62a4b4c010d44e4345592a863bb9f8e3976219bac29417149c"),
        ],
    )
    def test_first_and_last_name(self, name: str, expected: str) -> None:
        # Source: META_DOC, "ln": "See First Name (fn) for examples" -> same rules.
        out = identifiers_for("meta", {"firstName": name, "lastName": name})
        assert out["FN"] == expected
        assert out["LN"] == expected

    def test_no_gmail_rewriting_for_meta(self) -> None:
        # Meta's rule is trim + lowercase only (META_DOC keeps john_smith@gmail.com as is).
        out = identifiers_for("meta", {"email": " John.Smith+x@Gmail.com "})
        assert out["EMAIL"] == h("john.smith+x@gmail.com")


class TestGoogleDocumentedExamples:
    @pytest.mark.parametrize(
        "variant",
        # Source: GOOGLE_FORMATTER_TESTS, test_process_email_address_valid_inputs_hex_encoding
        [
            "alexz@example.com",
            "  alexz@example.com",
            "  ALEXZ@example.com   ",
            "  alexz@EXAMPLE.com   ",
        ],
    )
    def test_email(self, variant: str) -> None:
        out = identifiers_for("google_ads", {"email": variant})
        assert (
            out["hashedEmail"] == "509e933019bb285a134a9334b8bb679dff79d0ce023d529af4bd744d47b4fd8a"
        )

    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            # Source: GOOGLE_QUICKSTART, "hashed and encoded data", members 1 and 2.
            (
                "dana@example.com",
                "07e2f1394b0ea80e2adca010ea8318df697001a005ba7452720edda4b0ce57b3",
            ),
            (
                "DanaM@example.com",
                "1df6b43bc68dd38eca94e6a65b4f466ae537b796c81a526918b40ac4a7b906c7",
            ),
            (
                "ALEXJ@example.com",
                "2ef46c4214c3fc1b277a2d976d55194e12b899aa50d721f28da858c7689756e3",
            ),
        ],
    )
    def test_quickstart_emails(self, raw: str, expected: str) -> None:
        assert identifiers_for("google_ads", {"email": raw})["hashedEmail"] == expected

    @pytest.mark.parametrize("variant", ["+18005550100", "   +1-800-555-0100", "1-800-555-0100   "])
    def test_phone(self, variant: str) -> None:
        # Source: GOOGLE_FORMATTER_TESTS, test_process_phone_number_valid_inputs_hex_encoding.
        # The last variant has no "+": read with the default country (US).
        out = identifiers_for("google_ads", {"phone": variant}, default_country="US")
        assert (
            out["hashedPhoneNumber"]
            == "fb4f73a6ec5fdb7077d564cdd22c3554b43ce49168550c3b12c547b78c517b30"
        )

    def test_phone_e164_with_plus(self) -> None:
        # Source: GOOGLE_FORMATTING_DOC, phone_number: US (800)555-0100 -> +18005550100
        assert normalize_phone("(800)555-0100", "US") == "+18005550100"

    def test_names_and_clear_address_parts(self) -> None:
        # Source: GOOGLE_FORMATTER_TESTS: "  GivenName  " -> hash of "givenname",
        # "  FamilyName " -> hash of "familyname", " uS " -> "US", " 1229-076  " -> "1229-076".
        traits = {
            "firstName": "  GivenName  ",
            "lastName": "  FamilyName ",
            "address": {"country": " uS ", "postalCode": "94025"},
        }
        out = identifiers_for("google_ads", traits)
        assert (
            out["addressInfo.hashedFirstName"]
            == "128a07bfe2df877c52076e60d7774cf5baaa046c5a6c48daf30ff43ecca2f814"
        )
        assert (
            out["addressInfo.hashedLastName"]
            == "77762c287e61ce065bee5c15464012c6fbe088398b8057627d5577249430d574"
        )
        assert out["addressInfo.countryCode"] == "US"
        assert google_postal_code(" 1229-076  ", "PT") == "1229-076"

    @pytest.mark.parametrize(
        ("raw", "normalised"),
        [
            # Source: GOOGLE_FORMATTER_TESTS, test_format_email_address_valid_inputs, and
            # GOOGLE_FORMATTING_DOC, email_address (gmail.com / googlemail.com rule).
            ("Jefferson.Loves.hiking@gmail.com", "jeffersonloveshiking@gmail.com"),
            ("Jefferson.LOVES.Hiking@googlemail.com", "jeffersonloveshiking@googlemail.com"),
            ("Cloudy.SanFrancisco+shopping@gmail.com", "cloudysanfrancisco@gmail.com"),
            ("Cloudy.SanFrancisco+shopping@googlemail.com", "cloudysanfrancisco@googlemail.com"),
            ("user.name+NYC@Example.com", "user.name+nyc@example.com"),
        ],
    )
    def test_gmail_rule(self, raw: str, normalised: str) -> None:
        assert identifiers_for("google_ads", {"email": raw})["hashedEmail"] == h(normalised)

    def test_customer_match_sample_profile(self) -> None:
        # Inputs of Google's Customer Match sample (google-ads-python
        # examples/remarketing/add_customer_match_user_list.py): customer@example.com,
        # John, Doe, "US", "10011"; the sample hashes strip().lower() of each.
        # Hashes computed here: the sample publishes no digests.
        traits = {
            "email": "customer@example.com",
            "firstName": "John",
            "lastName": "Doe",
            "address": {"country": "US", "postalCode": "10011"},
        }
        assert identifiers_for("google_ads", traits) == {
            "hashedEmail": h("customer@example.com"),
            "addressInfo.hashedFirstName": h("john"),
            "addressInfo.hashedLastName": h("doe"),
            "addressInfo.countryCode": "US",
            "addressInfo.postalCode": "10011",
        }


# --------------------------------------------------------------------- key sets


class TestKeySets:
    def test_tables_cover_exactly_the_platforms(self) -> None:
        assert set(HASHED_KEYS) == set(PLATFORMS) == set(CLEAR_KEYS)
        for platform in PLATFORMS:
            assert not HASHED_KEYS[platform] & CLEAR_KEYS[platform]

    def test_only_google_sends_anything_in_clear(self) -> None:
        assert CLEAR_KEYS["meta"] == frozenset()
        assert CLEAR_KEYS["linkedin"] == frozenset()
        assert CLEAR_KEYS["google_ads"] == {"addressInfo.countryCode", "addressInfo.postalCode"}

    def test_meta_full_profile(self) -> None:
        out = identifiers_for("meta", FULL_PROFILE, user_id="user-42")
        assert set(out) == {
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
        }
        assert out["EMAIL"] == h("jane.doe+news@gmail.com")
        assert out["PHONE"] == h("16505551212")
        assert out["FN"] == h("jane")
        assert out["GEN"] == h("f")
        assert (out["DOBY"], out["DOBM"], out["DOBD"]) == (h("1990"), h("05"), h("17"))
        assert out["CT"] == h("menlopark")
        assert out["ST"] == h("ca")
        assert out["ZIP"] == h("94025")
        assert out["COUNTRY"] == h("us")

    def test_meta_never_sends_extern_id(self) -> None:
        assert "EXTERN_ID" not in identifiers_for("meta", FULL_PROFILE, user_id="user-42")
        assert "EXTERN_ID" not in HASHED_KEYS["meta"] | CLEAR_KEYS["meta"]

    def test_google_full_profile(self) -> None:
        out = identifiers_for("google_ads", FULL_PROFILE)
        assert out == {
            "hashedEmail": h("janedoe@gmail.com"),
            "hashedPhoneNumber": h("+16505551212"),
            "addressInfo.hashedFirstName": h("jane"),
            "addressInfo.hashedLastName": h("doe"),
            "addressInfo.countryCode": "US",
            "addressInfo.postalCode": "94025",
        }

    def test_linkedin_full_profile_is_hashed_email_only(self) -> None:
        out = identifiers_for("linkedin", FULL_PROFILE)
        assert out == {"SHA256_EMAIL": h("jane.doe+news@gmail.com")}
        assert identifier_problems("linkedin", FULL_PROFILE) == []

    def test_unknown_platform_is_a_typed_error(self) -> None:
        with pytest.raises(UnknownPlatformError):
            identifiers_for("tiktok", FULL_PROFILE)
        with pytest.raises(UnknownPlatformError):
            identifier_problems("tiktok", FULL_PROFILE)

    def test_bad_default_country_is_a_typed_error(self) -> None:
        with pytest.raises(InvalidDefaultCountryError):
            identifiers_for("meta", {"phone": "6505551212"}, default_country="USA")


# ------------------------------------------------------------------ specific rules


class TestGoogleAddressGroup:
    @pytest.mark.parametrize("missing", ["firstName", "lastName", "country", "postalCode"])
    def test_group_is_all_or_nothing(self, missing: str) -> None:
        traits: dict[str, Any] = {
            "email": "a@example.com",
            "firstName": "Jane",
            "lastName": "Doe",
            "address": {"country": "DE", "postalCode": "10115"},
        }
        if missing in ("firstName", "lastName"):
            del traits[missing]
        else:
            del traits["address"][missing]
        out = identifiers_for("google_ads", traits)
        assert set(out) == {"hashedEmail"}
        assert identifier_problems("google_ads", traits) == ["ADDRESS_INCOMPLETE"]

    def test_invalid_part_drops_group_and_names_the_part(self) -> None:
        traits = {"firstName": "Jane", "lastName": "Doe", "country": "Germany", "postalCode": "1"}
        assert identifiers_for("google_ads", traits) == {}
        assert identifier_problems("google_ads", traits) == [
            "COUNTRY_INVALID",
            "ADDRESS_INCOMPLETE",
            "NO_IDENTIFIERS",
        ]

    def test_us_postal_code_must_be_zip_or_zip4(self) -> None:
        assert google_postal_code("94025-1234", "US") == "94025-1234"
        assert google_postal_code("9402", "US") is None

    def test_top_level_address_fields_and_name_split(self) -> None:
        traits = {"name": "Jean  Paul Sartre", "country": "fr", "postalCode": "75006"}
        out = identifiers_for("google_ads", traits)
        assert out["addressInfo.hashedFirstName"] == h("jean")
        assert out["addressInfo.hashedLastName"] == h("sartre")
        assert out["addressInfo.countryCode"] == "FR"

    def test_address_object_wins_over_top_level(self) -> None:
        traits = {
            "firstName": "A",
            "lastName": "B",
            "country": "FR",
            "address": {"country": "DE", "postalCode": "10115"},
        }
        assert identifiers_for("google_ads", traits)["addressInfo.countryCode"] == "DE"

    def test_google_keeps_accents_and_inner_spaces(self) -> None:
        assert google_name("  Zoë   Ann ") == "zoë ann"


class TestPhones:
    def test_without_country_code_and_no_country_is_dropped(self) -> None:
        traits = {"phone": "650 555 1212"}
        for platform in ("meta", "google_ads"):
            assert identifiers_for(platform, traits) == {}
            assert identifier_problems(platform, traits) == ["PHONE_NO_COUNTRY", "NO_IDENTIFIERS"]

    def test_profile_country_beats_default_country(self) -> None:
        traits = {"phone": "030 901820", "address": {"country": "DE"}}
        out = identifiers_for("google_ads", traits, default_country="US")
        assert out["hashedPhoneNumber"] == h("+4930901820")

    def test_international_prefix_of_the_region(self) -> None:
        assert normalize_phone("0044 113 496 0987", "GB") == "+441134960987"

    def test_plus_numbers_ignore_the_region(self) -> None:
        assert normalize_phone("+44 113 496 0987", "US") == "+441134960987"

    @pytest.mark.parametrize("raw", ["+1 123", "+999 12345678", "not a phone", "+"])
    def test_invalid_numbers_are_dropped_not_hashed(self, raw: str) -> None:
        assert identifiers_for("meta", {"phone": raw}, default_country="US") == {}
        assert identifier_problems("meta", {"phone": raw}, default_country="US") == [
            "PHONE_INVALID",
            "NO_IDENTIFIERS",
        ]

    def test_meta_hashes_digits_without_plus_google_with(self) -> None:
        traits = {"phone": "+44 7911 123456"}
        assert identifiers_for("meta", traits)["PHONE"] == h("447911123456")
        assert identifiers_for("google_ads", traits)["hashedPhoneNumber"] == h("+447911123456")


class TestMetaRules:
    @pytest.mark.parametrize(
        ("raw", "code"),
        [("M", "m"), (" male ", "m"), ("Woman", "f"), ("F", "f")],
    )
    def test_gender(self, raw: str, code: str) -> None:
        assert identifiers_for("meta", {"gender": raw})["GEN"] == h(code)

    def test_unmappable_gender_is_reported(self) -> None:
        assert identifier_problems("meta", {"gender": "nonbinary"}) == [
            "GENDER_UNMAPPED",
            "NO_IDENTIFIERS",
        ]

    def test_birthday_timestamp_uses_its_date(self) -> None:
        out = identifiers_for("meta", {"birthday": "1985-01-09T00:00:00.000Z"})
        assert (out["DOBY"], out["DOBM"], out["DOBD"]) == (h("1985"), h("01"), h("09"))

    @pytest.mark.parametrize(
        "raw", ["1899-12-31", "1990-02-30", "17/05/1990", f"{datetime.now(UTC).year + 1}-01-01"]
    )
    def test_bad_birthdays_are_dropped(self, raw: str) -> None:
        assert identifiers_for("meta", {"birthday": raw}) == {}
        assert "BIRTHDAY_INVALID" in identifier_problems("meta", {"birthday": raw})

    def test_names_keep_letters_only(self) -> None:
        assert meta_letters("  Mary-Jane O'Neil ") == "maryjaneoneil"
        assert meta_letters("123 !!") is None
        assert meta_letters("\u0301\u0308") is None  # combining marks but no letter

    def test_city_and_state(self) -> None:
        assert meta_letters("South San Francisco") == "southsanfrancisco"
        assert meta_state("New York", "US") == "ny"
        assert meta_state("TX", "US") == "tx"
        assert meta_state("Atlantis", "US") is None
        assert meta_state("Île-de-France", "FR") == "îledefrance"

    @pytest.mark.parametrize(
        ("raw", "country", "expected"),
        [
            ("94025-1234", "US", "94025"),
            ("SW1A 1AA", "GB", "sw1a1"),
            ("10115", "DE", "10115"),
            ("K1A 0B1", "CA", "k1a0b1"),
        ],
    )
    def test_zip(self, raw: str, country: str, expected: str) -> None:
        assert meta_zip(raw, country) == expected

    def test_country_names_are_not_guessed(self) -> None:
        assert country_code("Germany") is None
        assert country_code("USA") is None
        assert country_code(" gb ") == "GB"
        assert country_code("UK") == "GB"

    def test_one_token_name_is_not_split(self) -> None:
        assert identifiers_for("meta", {"name": "Cher"}) == {}
        assert identifier_problems("meta", {"name": "Cher"}) == [
            "NAME_UNSPLITTABLE",
            "NO_IDENTIFIERS",
        ]

    def test_name_fills_only_the_absent_part(self) -> None:
        out = identifiers_for("meta", {"firstName": "Ann", "name": "Annabel Lee"})
        assert (out["FN"], out["LN"]) == (h("ann"), h("lee"))


class TestEmails:
    @pytest.mark.parametrize(
        "raw", ["nope", "a@b", "a b@example.com", "@example.com", "a@@example.com", "a@.com"]
    )
    def test_invalid_emails_are_dropped_and_reported(self, raw: str) -> None:
        for platform in PLATFORMS:
            assert identifiers_for(platform, {"email": raw}) == {}
            assert identifier_problems(platform, {"email": raw}) == [
                "EMAIL_INVALID",
                "NO_IDENTIFIERS",
            ]

    def test_gmail_local_part_of_only_dots_is_empty_for_google(self) -> None:
        assert identifiers_for("google_ads", {"email": "...@gmail.com"}) == {}
        assert identifiers_for("meta", {"email": "...@gmail.com"}) == {"EMAIL": h("...@gmail.com")}

    def test_non_string_values_are_invalid_not_crashes(self) -> None:
        traits: dict[str, Any] = {"email": 42, "phone": ["x"], "firstName": {"a": 1}}
        assert identifiers_for("meta", traits) == {}
        assert identifier_problems("meta", traits) == [
            "EMAIL_INVALID",
            "PHONE_INVALID",
            "FIRST_NAME_INVALID",
            "NO_IDENTIFIERS",
        ]

    def test_absent_values_are_not_problems(self) -> None:
        assert identifier_problems("meta", {"email": "a@example.com", "phone": " "}) == []


def test_sha_hex_checks() -> None:
    assert is_sha256_hex(sha256_hex("x"))
    assert not is_sha256_hex(sha256_hex("x").upper())
    assert not is_sha256_hex(sha256_hex("x") + "\n")
    assert not is_sha256_hex(sha256_hex("x")[:63])
    assert is_sha512_hex(hashlib.sha512(b"x").hexdigest())
    assert not is_sha512_hex(sha256_hex("x"))


# ------------------------------------------------------------------- properties

NOT_HEX_LETTERS = "ghijklmnopqrstuvwxyz"  # no raw substring of these can occur in a hex digest
COUNTRIES = ["US", "GB", "DE", "FR", "CA", "BR", "IN", "JP", "KR", "AU", "ZA", "PT"]

anything: st.SearchStrategy[Any] = st.one_of(
    st.none(), st.text(max_size=40), st.integers(), st.booleans(), st.lists(st.text(max_size=3))
)
traits_strategy = st.fixed_dictionaries(
    {},
    optional={
        "email": anything,
        "phone": st.one_of(anything, st.from_regex(r"\+?[0-9 ()-]{4,18}", fullmatch=True)),
        "firstName": anything,
        "lastName": anything,
        "name": anything,
        "gender": anything,
        "birthday": st.one_of(anything, st.dates().map(str)),
        "city": anything,
        "state": anything,
        "postalCode": anything,
        "country": st.one_of(anything, st.sampled_from(COUNTRIES)),
        "address": st.one_of(
            anything,
            st.fixed_dictionaries(
                {},
                optional={
                    "city": anything,
                    "state": anything,
                    "postalCode": anything,
                    "country": st.one_of(anything, st.sampled_from(COUNTRIES)),
                },
            ),
        ),
    },
)

local_part = st.text(NOT_HEX_LETTERS + "._+", min_size=1, max_size=20).filter(
    lambda s: any(c in NOT_HEX_LETTERS for c in s)
)
domain = st.builds(
    lambda a, b: f"{a}.{b}",
    st.text(NOT_HEX_LETTERS, min_size=1, max_size=12),
    st.sampled_from(["com", "org", "io", "net"]),
)
emails = st.builds(lambda local, dom: f"{local}@{dom}", local_part, domain)
names = st.text(NOT_HEX_LETTERS + string.ascii_uppercase[6:] + " -'", min_size=1, max_size=24)


def _case_and_space_variant(text: str, flips: list[bool], pad: tuple[str, str]) -> str:
    cased = "".join(c.upper() if flips[i % len(flips)] else c.lower() for i, c in enumerate(text))
    return pad[0] + cased + pad[1]


def _check_output(platform: str, out: Mapping[str, str]) -> None:
    for key, value in out.items():
        if key in HASHED_KEYS[platform]:
            assert is_sha256_hex(value), key
        else:
            assert key in CLEAR_KEYS[platform], key
            assert not is_sha256_hex(value)


@settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(traits=traits_strategy, platform=st.sampled_from(PLATFORMS))
def test_any_traits_give_hex_hashes_and_only_allowed_clear_keys(
    traits: dict[str, Any], platform: str
) -> None:
    out = identifiers_for(platform, traits, default_country="US")
    _check_output(platform, out)
    problems = identifier_problems(platform, traits, default_country="US")
    assert set(problems) <= PROBLEM_CODES
    assert ("NO_IDENTIFIERS" in problems) == (out == {})
    if platform == "google_ads":
        group = {k for k in out if k.startswith("addressInfo.")}
        full_group = {
            "addressInfo.hashedFirstName",
            "addressInfo.hashedLastName",
            "addressInfo.countryCode",
            "addressInfo.postalCode",
        }
        assert group in (set(), full_group)
        if group:
            country = out["addressInfo.countryCode"]
            assert len(country) == 2 and country.isupper()


@settings(deadline=None)
@given(
    email=emails,
    flips=st.lists(st.booleans(), min_size=1, max_size=5),
    pad=st.tuples(st.sampled_from(["", " ", "\t", "  \n"]), st.sampled_from(["", " ", "\r\n"])),
)
def test_whitespace_and_case_variants_of_one_email_hash_alike(
    email: str, flips: list[bool], pad: tuple[str, str]
) -> None:
    variant = _case_and_space_variant(email, flips, pad)
    for platform in PLATFORMS:
        assert identifiers_for(platform, {"email": variant}) == identifiers_for(
            platform, {"email": email}
        )


@settings(deadline=None)
@given(text=st.text(max_size=40), country=st.sampled_from([*COUNTRIES, None]))
def test_normalisers_are_idempotent(text: str, country: str | None) -> None:
    single: list[Any] = [
        normalize_email,
        lambda v: normalize_email(v, canonical_gmail=True),
        meta_letters,
        google_name,
        country_code,
        lambda v: meta_state(v, country),
        lambda v: meta_zip(v, country),
        lambda v: google_postal_code(v, country),
    ]
    for normalise in single:
        once = normalise(text)
        if once is not None:
            assert normalise(once) == once


@settings(deadline=None)
@given(email=emails)
def test_email_normalisation_is_idempotent_on_valid_addresses(email: str) -> None:
    for gmail in (False, True):
        once = normalize_email(email, canonical_gmail=gmail)
        assert once is not None
        assert normalize_email(once, canonical_gmail=gmail) == once


@settings(deadline=None)
@given(region=st.sampled_from(COUNTRIES))
def test_phone_normalisation_is_idempotent(region: str) -> None:
    example = phonenumbers.example_number(region)
    assert example is not None
    national = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.NATIONAL)
    once = normalize_phone(national, region)
    assert once is not None
    assert normalize_phone(once, None) == once
    assert normalize_phone(once, region) == once


@settings(deadline=None, max_examples=200)
@given(
    email=emails,
    first=names,
    last=names,
    full=names,
    region=st.sampled_from(COUNTRIES),
    platform=st.sampled_from(PLATFORMS),
)
def test_no_raw_input_leaks_into_any_output_value(
    email: str, first: str, last: str, full: str, region: str, platform: str
) -> None:
    # Names and emails are drawn from letters that are not hex digits, so any raw
    # substring found in an output value is a real leak, not a digest coincidence.
    example = phonenumbers.example_number(region)
    assert example is not None
    phone = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.INTERNATIONAL)
    traits = {
        "email": email,
        "phone": phone,
        "firstName": first,
        "lastName": last,
        "name": full,
        "address": {"country": region, "postalCode": "12345"},
    }
    out = identifiers_for(platform, traits)
    _check_output(platform, out)
    raws = [email, first, last, full]
    for value in out.values():
        low = value.lower()
        for raw in raws:
            raw = raw.lower()
            for i in range(len(raw) - 3):
                piece = raw[i : i + 4]
                if any(c in NOT_HEX_LETTERS for c in piece):
                    assert piece not in low
        digits = str(example.national_number)
        assert digits not in value  # >= 7 digits: a chance match in 64 hex chars is ~1e-7
