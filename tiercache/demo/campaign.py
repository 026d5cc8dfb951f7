"""Campaigns and the merge fields that personalize one email for one subscriber."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from tiercache.demo.render import render

LIST_COMPANY = "Example Outfitters"
LIST_ADDRESS = "Example Outfitters, 1 Harbour Street, Springfield 01234"
LIST_ADDRESS_HTML = "Example Outfitters<br>1 Harbour Street<br>Springfield 01234"
LIST_ID = "a1b2c3d4e5"
LINK_BASE = "https://lists.example.com"
REWARDS_BADGE_HTML = (
    '<a href="https://rewards.example.com/"><img alt="Example Rewards member" '
    'src="https://rewards.example.com/badge.png" width="140" height="40"></a>'
)


@dataclass(frozen=True, slots=True)
class Campaign:
    """One email campaign: subject, preview text, template and segment."""

    id: int
    name: str
    subject: str
    preview_text: str
    template_id: int
    segment_id: int

    @property
    def template_key(self) -> str:
        """Cache key of the campaign's template."""
        return f"template:{self.template_id}"

    @property
    def segment_key(self) -> str:
        """Cache key of the campaign's segment."""
        return f"segment:{self.segment_id}"


def build_merge_fields(
    profile: Mapping[str, Any],
    campaign: Campaign,
    segment: Mapping[str, Any],
    *,
    year: int,
) -> dict[str, object]:
    """Return the merge field values for one subscriber and one campaign.

    Subscriber fields (``FNAME``, ``LNAME``, ``EMAIL``, custom fields such as
    ``POINTS``) come from ``profile``. List and campaign fields (``UNSUB``,
    ``ARCHIVE``, ``MC:SUBJECT``, ``LIST:COMPANY``...) have the values a
    sending platform would fill, with links under ``lists.example.com``.
    ``ARCHIVE_PAGE`` is false because the result is an email, not the web
    archive page.

    :param year: value of ``CURRENT_YEAR``.
    """
    subscriber_id = profile["id"]
    preferences = profile.get("preferences") or {}
    is_rewards_member = bool(preferences.get("rewards_member"))
    subscriber_query = urlencode({"u": LIST_ID, "id": subscriber_id, "c": campaign.id})
    fields: dict[str, object] = {
        "FNAME": profile.get("first_name", ""),
        "LNAME": profile.get("last_name", ""),
        "EMAIL": profile.get("email", ""),
        "LOCALE": profile.get("locale", ""),
        "MC:PREVIEW_TEXT": campaign.preview_text,
        "UNSUB": f"{LINK_BASE}/unsubscribe?{subscriber_query}",
        "UPDATE_PROFILE": f"{LINK_BASE}/profile?{subscriber_query}",
        "FORWARD": f"{LINK_BASE}/forward?{subscriber_query}",
        "ARCHIVE": f"{LINK_BASE}/archive/{LIST_ID}/{campaign.id}",
        "ARCHIVE_PAGE": False,
        "LIST:COMPANY": LIST_COMPANY,
        "LIST:DESCRIPTION": segment.get("description", ""),
        "LIST:ADDRESS": LIST_ADDRESS,
        "LIST_ADDRESS_HTML": LIST_ADDRESS_HTML,
        "LIST:NAME": segment.get("name", ""),
        "CURRENT_YEAR": year,
        "TWITTER:PROFILEURL": "https://social.example.com/twitter/exampleoutfitters",
        "FACEBOOK:PROFILEURL": "https://social.example.com/facebook/exampleoutfitters",
        "REWARDS": REWARDS_BADGE_HTML if is_rewards_member else "",
    }
    for name, value in (profile.get("fields") or {}).items():
        fields.setdefault(name.upper(), value)
    # Subject lines carry merge tags too, e.g. "Your year outdoors, *|FNAME|*".
    fields["MC:SUBJECT"] = render(campaign.subject, fields, escape=False)
    return fields


def render_email(
    template: Mapping[str, Any],
    profile: Mapping[str, Any],
    campaign: Campaign,
    segment: Mapping[str, Any],
    *,
    year: int,
) -> str:
    """Return the HTML body of ``campaign`` personalized for ``profile``."""
    fields = build_merge_fields(profile, campaign, segment, year=year)
    return render(template["html"], fields)
