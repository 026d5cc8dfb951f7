"""Tests of the demo with real HTML email templates (MailChimp's Email Blueprints).

The templates are not part of the repository. They are read from the
directory in ``TIERCACHE_TEMPLATES_DIR``, by default
``../shared/data/email-templates`` next to the repository root, and the
tests are skipped when it does not exist.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tiercache import Settings, TieredCache
from tiercache.demo.__main__ import main
from tiercache.demo.campaign import Campaign, render_email
from tiercache.demo.data import generate_dataset
from tiercache.demo.database import DataSetIdentity, seed_database
from tiercache.demo.origin import CampaignOrigin
from tiercache.demo.render import TAG_PATTERN
from tiercache.demo.templates import TemplateRow, load_template_dir
from tiercache.testing import MemcachedServer, RedisServer

REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATES_DIR = Path(
    os.environ.get(
        "TIERCACHE_TEMPLATES_DIR",
        REPO_ROOT.parent / "shared" / "data" / "email-templates",
    )
)
TEMPLATE_PATHS = sorted(TEMPLATES_DIR.glob("*.html")) if TEMPLATES_DIR.is_dir() else []
SKIP_REASON = (
    f"no *.html templates in {TEMPLATES_DIR}; set TIERCACHE_TEMPLATES_DIR to a "
    "directory of MailChimp Email Blueprints templates"
)
requires_templates = pytest.mark.skipif(not TEMPLATE_PATHS, reason=SKIP_REASON)

CAMPAIGN = Campaign(1, "Spring", "Spring trail collection, *|FNAME|*", "New.", 1, 1)
SEGMENT = {"id": 1, "name": "Weekly digest readers", "description": "You opted in."}
PROFILE = {
    "id": 901,
    "email": "siobhan.osuilleabhain901@example.net",
    "first_name": "Siobhán",
    "last_name": "Ó Súilleabháin",
    "locale": "en_GB",
    "status": "subscribed",
    "version": 1,
    "preferences": {"rewards_member": True},
    "fields": {"CITY": "Cardiff"},
    "segments": [1],
}


@pytest.fixture(scope="module")
def real_templates() -> list[TemplateRow]:
    if not TEMPLATE_PATHS:
        pytest.skip(SKIP_REASON)
    return load_template_dir(TEMPLATES_DIR)


@requires_templates
@pytest.mark.parametrize("path", TEMPLATE_PATHS, ids=lambda path: path.stem)
def test_real_template_fills_every_tag(path: Path) -> None:
    template = {"html": path.read_text(encoding="utf-8")}

    output = render_email(template, PROFILE, CAMPAIGN, SEGMENT, year=2031)

    assert TAG_PATTERN.search(output) is None
    assert "unsubscribe?u=a1b2c3d4e5&amp;id=901&amp;c=1" in output
    assert "2031" in output
    assert "Example Outfitters" in output


@requires_templates
def test_real_templates_rewards_branch(real_templates: list[TemplateRow]) -> None:
    non_member = dict(PROFILE, preferences={"rewards_member": False})
    with_rewards = [row for row in real_templates if "*|IF:REWARDS|*" in row.html]

    assert with_rewards
    for row in with_rewards:
        template = {"html": row.html}
        member_output = render_email(template, PROFILE, CAMPAIGN, SEGMENT, year=2031)
        other_output = render_email(template, non_member, CAMPAIGN, SEGMENT, year=2031)
        assert "rewards.example.com/badge.png" in member_output, row.name
        assert "rewards.example.com/badge.png" not in other_output, row.name


@requires_templates
def test_real_templates_load_sorted(real_templates: list[TemplateRow]) -> None:
    assert [row.name for row in real_templates] == [
        path.stem for path in TEMPLATE_PATHS
    ]
    assert [row.id for row in real_templates] == list(range(1, len(TEMPLATE_PATHS) + 1))


@pytest.fixture
def template_origin(
    tmp_path: Path, real_templates: list[TemplateRow]
) -> Iterator[CampaignOrigin]:
    path = tmp_path / "campaign.sqlite3"
    dataset = generate_dataset(50, 1, real_templates)
    seed_database(path, dataset, DataSetIdentity(1, 50, "real-templates"))
    origin = CampaignOrigin(path)
    yield origin
    origin.close()


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


@requires_templates
def test_real_templates_every_tier_byte_identical(
    memcached: MemcachedServer,
    redis: RedisServer,
    template_origin: CampaignOrigin,
    real_templates: list[TemplateRow],
) -> None:
    settings = Settings.from_env(
        memcached_servers=[memcached.address],
        channel_url=redis.url,
        namespace=f"test-{uuid.uuid4().hex[:8]}",
    )
    first = TieredCache(settings, origin=template_origin)
    second = TieredCache(settings, origin=template_origin)
    try:
        assert wait_until(lambda: first.stats()["invalidations"]["trusted"])
        assert wait_until(lambda: second.stats()["invalidations"]["trusted"])
        for row in real_templates:
            key = f"template:{row.id}"
            expected = (TEMPLATES_DIR / f"{row.name}.html").read_bytes()

            from_origin = first.get(key)
            from_local = first.get(key)
            from_remote = second.get(key)

            assert from_origin["html"].encode("utf-8") == expected, row.name
            assert from_local["html"].encode("utf-8") == expected, row.name
            assert from_remote["html"].encode("utf-8") == expected, row.name

        count = len(real_templates)
        assert first.stats()["origin"]["loads"] == count
        assert first.stats()["local"]["hits"] == count
        assert second.stats()["remote"]["hits"] == count
        assert second.stats()["origin"]["loads"] == 0
    finally:
        first.close()
        second.close()


@requires_templates
def test_real_template_write_through_reaches_other_cache(
    memcached: MemcachedServer,
    redis: RedisServer,
    template_origin: CampaignOrigin,
    real_templates: list[TemplateRow],
) -> None:
    settings = Settings.from_env(
        memcached_servers=[memcached.address],
        channel_url=redis.url,
        namespace=f"test-{uuid.uuid4().hex[:8]}",
    )
    writer = TieredCache(settings, origin=template_origin)
    reader = TieredCache(settings, origin=template_origin)
    row = max(real_templates, key=lambda template: len(template.html))
    key = f"template:{row.id}"
    changed_html = row.html.replace("*|MC:SUBJECT|*", "*|MC:SUBJECT|* — Łódź 東京", 1)
    try:
        assert wait_until(lambda: reader.stats()["invalidations"]["trusted"])
        assert reader.get(key)["html"] == row.html

        writer.set(key, {"name": row.name, "html": changed_html})

        assert wait_until(lambda: reader.get(key)["html"] == changed_html)
        assert reader.get(key)["version"] == 2
    finally:
        writer.close()
        reader.close()


@requires_templates
@pytest.mark.slow
def test_demo_runs_with_real_templates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(
        [
            "--templates",
            str(TEMPLATES_DIR),
            "--subscribers",
            "2000",
            "--workers",
            "2",
            "--duration",
            "1.5",
            "--data-dir",
            str(tmp_path),
            "--quiet",
        ]
    )
    output = capsys.readouterr().out

    assert status == 0, output
    # The demo prints the directory with symbolic links resolved.
    assert f"{len(TEMPLATE_PATHS)} loaded from {TEMPLATES_DIR.resolve()}" in output
    assert "result: PASS" in output
