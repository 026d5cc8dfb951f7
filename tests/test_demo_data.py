"""Tests of the demo's data set generation, seeding and SQLite origin."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tiercache import MISSING
from tiercache.contracts import Origin
from tiercache.demo.data import EMAIL_DOMAINS, generate_dataset
from tiercache.demo.database import (
    DataSetIdentity,
    copy_database,
    digest_templates,
    is_demo_database,
    read_identity,
    seed_database,
)
from tiercache.demo.origin import CampaignOrigin, parse_key
from tiercache.demo.templates import TemplateRow, generate_templates

SUBSCRIBERS = 500


@pytest.fixture(scope="module")
def templates() -> list[TemplateRow]:
    return generate_templates(seed=5, count=4)


@pytest.fixture(scope="module")
def seeded_database(
    tmp_path_factory: pytest.TempPathFactory, templates: list[TemplateRow]
) -> Path:
    path = tmp_path_factory.mktemp("seeded") / "campaign.sqlite3"
    identity = DataSetIdentity(5, SUBSCRIBERS, digest_templates([]))
    seed_database(path, generate_dataset(SUBSCRIBERS, 5, templates), identity)
    return path


@pytest.fixture
def database(seeded_database: Path, tmp_path: Path) -> Path:
    """A fresh copy of the seeded database for one test."""
    path = tmp_path / "campaign.sqlite3"
    copy_database(seeded_database, path)
    return path


@pytest.fixture
def origin(database: Path) -> Iterator[CampaignOrigin]:
    origin = CampaignOrigin(database)
    yield origin
    origin.close()


def test_dataset_is_deterministic(templates: list[TemplateRow]) -> None:
    first = generate_dataset(SUBSCRIBERS, 11, templates)
    second = generate_dataset(SUBSCRIBERS, 11, templates)

    assert first == second


def test_dataset_depends_on_seed(templates: list[TemplateRow]) -> None:
    first = generate_dataset(SUBSCRIBERS, 11, templates)
    other = generate_dataset(SUBSCRIBERS, 12, templates)

    assert first.subscribers != other.subscribers


def test_dataset_subscribers_look_real(templates: list[TemplateRow]) -> None:
    dataset = generate_dataset(5000, 1, templates)
    emails = [str(row[1]) for row in dataset.subscribers]
    names = [f"{row[2]} {row[3]}" for row in dataset.subscribers]
    statuses = {row[5] for row in dataset.subscribers}

    assert len(dataset.subscribers) == 5000
    assert len(set(emails)) == len(emails)
    assert all(email.isascii() for email in emails)
    assert {email.rsplit("@", 1)[1] for email in emails} == set(EMAIL_DOMAINS)
    assert any(not name.isascii() for name in names)
    assert statuses == {"subscribed", "unsubscribed"}
    assert len(dataset.preferences) == 5000
    assert len(dataset.custom_fields) > 2 * 5000
    assert len(dataset.segment_members) >= 5000


def test_dataset_rejects_bad_arguments(templates: list[TemplateRow]) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        generate_dataset(0, 1, templates)
    with pytest.raises(ValueError, match="templates is empty"):
        generate_dataset(10, 1, [])


def test_seeded_database_is_wal_with_identity(database: Path) -> None:
    connection = sqlite3.connect(database)
    (mode,) = connection.execute("PRAGMA journal_mode").fetchone()
    connection.close()

    assert mode == "wal"
    assert is_demo_database(database)
    assert read_identity(database) == DataSetIdentity(
        5, SUBSCRIBERS, digest_templates([])
    )


def test_read_identity_of_other_files(tmp_path: Path) -> None:
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a database")

    assert read_identity(tmp_path / "absent.sqlite3") is None
    assert read_identity(text_file) is None
    assert not is_demo_database(text_file)


def test_origin_implements_protocol(origin: CampaignOrigin) -> None:
    assert isinstance(origin, Origin)


def test_origin_loads_profile(origin: CampaignOrigin) -> None:
    profile = origin.load("subscriber:1")

    assert profile["id"] == 1
    assert profile["version"] == 1
    assert profile["status"] in ("subscribed", "unsubscribed")
    assert set(profile["preferences"]) == {
        "frequency",
        "content_format",
        "rewards_member",
        "timezone",
    }
    assert "CITY" in profile["fields"]
    assert profile["segments"]


def test_origin_missing_rows(origin: CampaignOrigin) -> None:
    assert origin.load("subscriber:999999") is MISSING
    assert origin.load("template:999") is MISSING
    assert origin.load("segment:999") is MISSING


def test_origin_load_many(origin: CampaignOrigin, templates: list[TemplateRow]) -> None:
    keys = ["subscriber:2", "subscriber:3", "template:1", "segment:1", "segment:999"]

    values = origin.load_many(keys)

    assert sorted(values) == sorted(keys[:4])
    assert values["template:1"]["html"] == templates[0].html
    assert values["segment:1"]["name"]
    assert values["subscriber:2"] == origin.load("subscriber:2")


def test_origin_store_bumps_version(origin: CampaignOrigin, database: Path) -> None:
    profile = origin.load("subscriber:4")
    changed = dict(profile, status="unsubscribed", first_name="Zoë")
    changed["fields"] = dict(profile["fields"], POINTS="77")

    origin.store("subscriber:4", changed)
    origin.store("subscriber:4", changed)
    stored = CampaignOrigin(database).load("subscriber:4")

    assert stored["version"] == profile["version"] + 2
    assert stored["status"] == "unsubscribed"
    assert stored["first_name"] == "Zoë"
    assert stored["fields"]["POINTS"] == "77"
    assert stored["segments"] == profile["segments"]
    assert stored["updated_at"] != profile["updated_at"]


def test_origin_store_inserts_new_subscriber(origin: CampaignOrigin) -> None:
    profile = dict(origin.load("subscriber:1"), email="new@example.net", segments=[2])

    origin.store("subscriber:100000", profile)
    stored = origin.load("subscriber:100000")

    assert stored["version"] == 1
    assert stored["email"] == "new@example.net"
    assert stored["segments"] == [2]


def test_origin_store_rejects_invalid_profile(origin: CampaignOrigin) -> None:
    profile = origin.load("subscriber:5")

    with pytest.raises(ValueError, match="status"):
        origin.store("subscriber:5", dict(profile, status="bounced"))
    with pytest.raises(ValueError, match="missing email"):
        origin.store("subscriber:5", {k: v for k, v in profile.items() if k != "email"})
    with pytest.raises(ValueError, match="must be a dict"):
        origin.store("subscriber:5", ["not", "a", "dict"])
    assert origin.load("subscriber:5") == profile


def test_origin_store_template_and_segment(origin: CampaignOrigin) -> None:
    origin.store("template:1", {"name": "changed", "html": "<p>*|FNAME|*</p>"})
    origin.store("segment:1", {"name": "n", "description": "d", "rule": "r"})

    assert origin.load("template:1")["html"] == "<p>*|FNAME|*</p>"
    assert origin.load("template:1")["version"] == 2
    assert origin.load("segment:1")["description"] == "d"


def test_origin_delete(origin: CampaignOrigin) -> None:
    origin.delete("subscriber:6")
    origin.delete("subscriber:6")

    assert origin.load("subscriber:6") is MISSING
    with pytest.raises(sqlite3.IntegrityError):
        origin.delete("template:1")


def test_origin_counts_loads_and_queries(origin: CampaignOrigin) -> None:
    origin.load("subscriber:7")
    origin.load_many(["template:1", "segment:2"])

    assert origin.counters.loads == 3
    assert origin.counters.queries == 7


@pytest.mark.parametrize(
    "key",
    [
        "subscriber",
        "subscriber:",
        "subscriber:x",
        "campaign:1",
        "segment:-1",
        "template:١",
    ],
)
def test_parse_key_rejects(key: str) -> None:
    with pytest.raises(ValueError, match="invalid key"):
        parse_key(key)


def test_copy_database(database: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.sqlite3"
    CampaignOrigin(database).store(
        "segment:1", {"name": "n", "description": "d", "rule": "r"}
    )

    copy_database(database, copy)

    assert CampaignOrigin(copy).load("segment:1")["description"] == "d"
    assert CampaignOrigin(copy).count_subscribers() == SUBSCRIBERS
