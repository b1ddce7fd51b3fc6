"""The audiences config: the shipped example loads; every error names file and line."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from streams.audiences.config import (
    AudienceConfigError,
    EventRule,
    NotRule,
    load_config,
    parse_config,
    parse_duration,
)
from streams.audiences.settings import AudienceSettings

REPO = Path(__file__).resolve().parents[3]

GOOD_HEAD = """\
version: "1"
audiences:
  - name: a
    platforms:
      meta: {audience_id: "1"}
"""


def test_example_file_loads_with_the_four_documented_audiences() -> None:
    config = load_config(REPO / "audiences.example.yaml")
    names = {a.name for a in config.audiences}
    assert {
        "high-intent-running",
        "viewed-recommended-not-bought",
        "cart-abandoners",
        "recent-purchasers",
    } <= names
    cart = config.audience("cart-abandoners")
    assert cart.platforms.targets() == {
        "meta": "23850000000000003",
        "google_ads": "customers/1234567890/userLists/112",
        "linkedin": "1003",
    }
    assert isinstance(cart.rule.all[1], NotRule)  # type: ignore[union-attr]
    inner = cart.rule.all[1].not_  # type: ignore[union-attr]
    assert isinstance(inner, EventRule) and inner.event.since_last == "Product Added"
    assert config.consent == "Advertising"
    assert config.deletion_events == ["User Deleted", "Deletion Requested"]
    assert config.max_window_ms == 90 * 86_400_000


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("7d", 604_800_000),
        ("36h", 129_600_000),
        ("5s", 5000),
        ("30m", 1_800_000),
        ("2w", 1_209_600_000),
    ],
)
def test_durations(text: str, value: int) -> None:
    assert parse_duration(text) == value


@pytest.mark.parametrize(
    ("body", "line", "fragment"),
    [
        ("    rule: {event: {name: A, within: 7x}}\n", 6, "not a duration"),
        ("    rule: {event: {name: A, within: 1d, colour: red}}\n", 6, "colour"),
        ("    rule:\n      all:\n        - trait: {name: plan}\n", 8, "exactly one of"),
        (
            "    rule:\n      any:\n        - {event: {name: A, within: 1d}}\n        - bogus: 1\n",
            9,
            "exactly one key",
        ),
        ("    rule: {recommendation: {top_n: 3}}\n", 6, "category and/or min_score"),
        ("    rule: {trait: {name: plan, equals: pro}}\n    colour: red\n", 7, "colour"),
    ],
)
def test_errors_name_file_and_line(body: str, line: int, fragment: str, tmp_path: Path) -> None:
    path = tmp_path / "aud.yaml"
    path.write_text(GOOD_HEAD + body)
    with pytest.raises(AudienceConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert f"{path}:{line}:" in message, message
    assert fragment in message


def test_platform_ids_duplicates_and_yaml_syntax_errors_have_lines() -> None:
    text = """\
version: "1"
audiences:
  - name: a
    platforms:
      google_ads: {user_list: "userLists/1"}
    rule: {trait: {name: plan, exists: true}}
  - name: Not A Slug
    platforms: {}
    rule: {trait: {name: plan, exists: true}}
"""
    with pytest.raises(AudienceConfigError) as err:
        parse_config(text, "x.yaml")
    message = str(err.value)
    assert "x.yaml:5: audiences[0].platforms.google_ads.user_list" in message
    assert "x.yaml:7: audiences[1].name" in message
    assert "x.yaml:8: audiences[1].platforms" in message
    dup = (
        GOOD_HEAD
        + "    rule: {trait: {name: p, exists: true}}\n"
        + GOOD_HEAD.split("audiences:\n")[1]
    )
    dup += "    rule: {trait: {name: p, exists: true}}\n"
    with pytest.raises(AudienceConfigError, match=r"d\.yaml:7: audiences\[1\]\.name: .*used twice"):
        parse_config(dup, "d.yaml")
    with pytest.raises(AudienceConfigError, match=r"s\.yaml:4: not valid YAML"):
        parse_config('version: "1"\naudiences:\n  - name: [a\n', "s.yaml")


def test_settings_reject_unknown_audience_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CDP_AUDIENCES_CONFIG", "x.yaml")
    monkeypatch.setenv("CDP_AUDIENCES_TICK_S", "0.5")
    s = AudienceSettings()
    assert s.config == "x.yaml" and s.tick_s == 0.5
    monkeypatch.setenv("CDP_AUDIENCE_CONFIG", "typo.yaml")
    with pytest.raises(ValidationError, match="CDP_AUDIENCE_CONFIG"):
        AudienceSettings()
