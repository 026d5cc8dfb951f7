"""Tests of the demo's merge-tag renderer and of the email personalization."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tiercache.demo.campaign import Campaign, build_merge_fields, render_email
from tiercache.demo.render import TAG_PATTERN, Template, TemplateSyntaxError, render
from tiercache.demo.templates import (
    GENERATED_TEMPLATE_COUNT,
    MAX_TEMPLATE_BYTES,
    MIN_TEMPLATE_BYTES,
    generate_templates,
    load_template_dir,
)

CAMPAIGN = Campaign(
    id=3,
    name="Year in review",
    subject="Your year outdoors, *|FNAME|*",
    preview_text="Thanks for joining us.",
    template_id=1,
    segment_id=2,
)
SEGMENT = {"id": 2, "name": "Rewards members", "description": "You joined us."}


def make_profile(**changes: object) -> dict[str, object]:
    profile: dict[str, object] = {
        "id": 42,
        "email": "zoe.muller42@example.org",
        "first_name": "Zoë",
        "last_name": "Müller",
        "locale": "de_DE",
        "status": "subscribed",
        "version": 3,
        "preferences": {
            "frequency": "weekly",
            "content_format": "html",
            "rewards_member": True,
            "timezone": "Europe/Berlin",
        },
        "fields": {"CITY": "Köln", "POINTS": "1500", "PLAN": "pro"},
        "segments": [2],
    }
    profile.update(changes)
    return profile


def test_render_plain_field_is_escaped() -> None:
    output = render("<p>*|FNAME|*</p>", {"FNAME": "<b>O'Brien & Co</b>"})

    assert output == "<p>&lt;b&gt;O&#x27;Brien &amp; Co&lt;/b&gt;</p>"


def test_render_html_prefix_is_raw() -> None:
    output = render("*|HTML:BADGE|*", {"BADGE": "<img src='x.png'>"})

    assert output == "<img src='x.png'>"


def test_render_non_ascii_names() -> None:
    fields = {"FNAME": "Łukasz", "LNAME": "Nguyễn 山田 Παπαδόπουλος"}

    output = render("Hi *|FNAME|* *|LNAME|*!", fields)

    assert output == "Hi Łukasz Nguyễn 山田 Παπαδόπουλος!"


def test_render_unknown_tag_is_kept() -> None:
    output = render("a *|NO_SUCH_FIELD|* b *|MC:SUBJECT|*", {"MC:SUBJECT": "Hello"})

    assert output == "a *|NO_SUCH_FIELD|* b Hello"


def test_render_lowercase_tag_finds_field() -> None:
    assert render("*|fname|*", {"FNAME": "Ana"}) == "Ana"


def test_render_if_else() -> None:
    source = "*|IF:REWARDS|*member*|ELSE:|*guest*|END:IF|*"

    assert render(source, {"REWARDS": "yes"}) == "member"
    assert render(source, {"REWARDS": ""}) == "guest"
    assert render(source, {}) == "guest"


def test_render_ifnot() -> None:
    source = "*|IFNOT:ARCHIVE_PAGE|*email only*|END:IF|*"

    assert render(source, {"ARCHIVE_PAGE": False}) == "email only"
    assert render(source, {"ARCHIVE_PAGE": True}) == ""


def test_render_nested_if_blocks() -> None:
    source = (
        "*|IF:REWARDS|*"
        "[member "
        "*|IF:POINTS>=1000|*gold"
        "*|IF:CITY=Köln|* local*|ELSE:|* remote*|END:IF|*"
        "*|ELSEIF:POINTS|*silver"
        "*|ELSE:|*new"
        "*|END:IF|*]"
        "*|ELSE:|*[guest]"
        "*|END:IF|*"
    )
    cases = [
        ({"REWARDS": "x", "POINTS": "1500", "CITY": "Köln"}, "[member gold local]"),
        ({"REWARDS": "x", "POINTS": "1500", "CITY": "Berlin"}, "[member gold remote]"),
        ({"REWARDS": "x", "POINTS": "200"}, "[member silver]"),
        ({"REWARDS": "x"}, "[member new]"),
        ({"REWARDS": "", "POINTS": "5000"}, "[guest]"),
    ]

    for fields, expected in cases:
        assert render(source, fields) == expected, fields


def test_render_comparisons() -> None:
    cases: list[tuple[str, dict[str, object], str]] = [
        ("*|IF:N=10|*y*|END:IF|*", {"N": "10.0"}, "y"),
        ("*|IF:N!=10|*y*|END:IF|*", {"N": 10}, ""),
        ("*|IF:N>9|*y*|END:IF|*", {"N": "10"}, "y"),
        ("*|IF:N<9|*y*|END:IF|*", {"N": "10"}, ""),
        ("*|IF:N<=10|*y*|END:IF|*", {"N": 10}, "y"),
        ("*|IF:LOCALE=de_DE|*y*|END:IF|*", {"LOCALE": "de_DE"}, "y"),
        ("*|IF:LOCALE!=de_DE|*y*|END:IF|*", {"LOCALE": "fr_FR"}, "y"),
        ("*|IF:MISSING=|*y*|END:IF|*", {}, "y"),
    ]

    for source, fields, expected in cases:
        assert render(source, fields) == expected, source


def test_render_zero_is_true() -> None:
    assert render("*|IF:POINTS|*has points*|END:IF|*", {"POINTS": 0}) == "has points"


def test_render_without_escape() -> None:
    assert render("*|FNAME|*", {"FNAME": "O'Brien"}, escape=False) == "O'Brien"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("*|IF:A|*never closed", "never closed"),
        ("stray *|END:IF|*", "no open"),
        ("*|ELSE:|*", "no open"),
        ("*|IF:A|*x*|ELSE:|*y*|ELSE:|*z*|END:IF|*", "follows"),
        ("*|IF:A|*x*|ELSE:|*y*|ELSEIF:B|*z*|END:IF|*", "follows"),
        ("*|IF:A|*x*|ELSEIF:|*y*|END:IF|*", "no condition"),
    ],
)
def test_template_syntax_errors(source: str, message: str) -> None:
    with pytest.raises(TemplateSyntaxError, match=message):
        Template(source)


def test_generated_templates_are_deterministic() -> None:
    first = generate_templates(seed=7)
    second = generate_templates(seed=7)
    other = generate_templates(seed=8)

    assert first == second
    assert [row.html for row in first] != [row.html for row in other]


def test_generated_templates_sizes_and_tags() -> None:
    templates = generate_templates(seed=1)

    assert len(templates) == GENERATED_TEMPLATE_COUNT
    for row in templates:
        size = len(row.html.encode("utf-8"))
        assert MIN_TEMPLATE_BYTES <= size <= MAX_TEMPLATE_BYTES, row.name
        for tag in ("FNAME", "LNAME", "EMAIL", "UNSUB", "MC:SUBJECT", "IF:REWARDS"):
            assert f"*|{tag}|*" in row.html, (row.name, tag)
        assert "*|ELSE:|*" in row.html, row.name
        assert "*|END:IF|*" in row.html, row.name


def test_generated_templates_fill_every_tag() -> None:
    profiles = [
        make_profile(),
        make_profile(preferences={"rewards_member": False}, fields={}),
        make_profile(first_name="", last_name="O'Brien", fields={"POINTS": "20"}),
    ]

    for row in generate_templates(seed=1):
        for profile in profiles:
            output = render_email(
                {"html": row.html}, profile, CAMPAIGN, SEGMENT, year=2030
            )
            assert TAG_PATTERN.search(output) is None, (row.name, profile)


def test_render_email_personalizes() -> None:
    template = {"html": generate_templates(seed=1)[0].html}

    output = render_email(template, make_profile(), CAMPAIGN, SEGMENT, year=2030)

    assert "Hi Zoë Müller," in output
    assert "zoe.muller42@example.org" in output
    assert "Gold status: you have 1500 points" in output
    assert "new near Köln" in output
    assert "<title>Your year outdoors, Zoë</title>" in output
    assert "2030" in output
    assert "unsubscribe?u=a1b2c3d4e5&amp;id=42&amp;c=3" in output


def test_render_email_guest_branch() -> None:
    template = {"html": generate_templates(seed=1)[0].html}
    profile = make_profile(preferences={"rewards_member": False}, first_name="")

    output = render_email(template, profile, CAMPAIGN, SEGMENT, year=2030)

    assert "Join Example Rewards" in output
    assert "Gold status" not in output
    assert "Hi there," in output


def test_subject_is_not_double_escaped() -> None:
    fields = build_merge_fields(
        make_profile(first_name="O'Brien"), CAMPAIGN, SEGMENT, year=2030
    )

    assert fields["MC:SUBJECT"] == "Your year outdoors, O'Brien"
    assert render("*|MC:SUBJECT|*", fields) == "Your year outdoors, O&#x27;Brien"


def test_tag_pattern_matches_mailchimp_tags() -> None:
    text = "*|FNAME|* *|IF:POINTS>=1000|* *|ELSE:|* *|END:IF|* *|HTML:REWARDS|*"

    names = [match.group(1) for match in TAG_PATTERN.finditer(text)]

    assert names == ["FNAME", "IF:POINTS>=1000", "ELSE:", "END:IF", "HTML:REWARDS"]
    assert re.search(TAG_PATTERN, "a | b * c") is None


def test_load_template_dir_rejects_bad_tags(tmp_path: Path) -> None:
    (tmp_path / "good.html").write_text("<p>*|FNAME|*</p>", encoding="utf-8")
    (tmp_path / "broken.html").write_text("*|IF:REWARDS|* open", encoding="utf-8")

    with pytest.raises(ValueError, match="broken.html has invalid merge tags"):
        load_template_dir(tmp_path)


def test_load_template_dir_rejects_non_utf8(tmp_path: Path) -> None:
    (tmp_path / "latin1.html").write_bytes("<p>Zoë</p>".encode("latin-1"))

    with pytest.raises(ValueError, match="not valid UTF-8"):
        load_template_dir(tmp_path)
