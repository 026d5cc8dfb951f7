"""HTML email templates: generated ones, or real ones loaded from a directory."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from tiercache.demo.render import Template, TemplateSyntaxError

GENERATED_TEMPLATE_COUNT = 36
MIN_TEMPLATE_BYTES = 10_000
MAX_TEMPLATE_BYTES = 30_000
# load_template_dir rejects larger files. Real email templates are tens of
# kilobytes, and Gmail clips message bodies larger than about 100 KB.
MAX_LOADED_TEMPLATE_BYTES = 1_000_000

_PALETTES = (
    ("#1f4e3d", "#f4f1ea", "#e07a2f"),
    ("#22313f", "#ffffff", "#2a9d8f"),
    ("#5b2333", "#f7f4f3", "#d4a373"),
    ("#283618", "#fefae0", "#bc6c25"),
    ("#003049", "#fdf0d5", "#c1121f"),
    ("#3d405b", "#f4f1de", "#e07a5f"),
)
_ADJECTIVES = (
    "lightweight",
    "waterproof",
    "packable",
    "breathable",
    "insulated",
    "recycled",
    "rugged",
    "four-season",
    "ultralight",
    "merino",
)
_PRODUCTS = (
    "trail runner",
    "rain shell",
    "down jacket",
    "daypack",
    "tent",
    "sleeping bag",
    "headlamp",
    "water filter",
    "trekking poles",
    "camp stove",
)
_SENTENCES = (
    "Built for long days on rough ground and tested by our own staff.",
    "It packs down small enough to live in your bag all season.",
    "Reviewers call it the most comfortable one we have made so far.",
    "Every purchase plants a tree through our partner programme.",
    "Free returns for 60 days, even if you have used it outside.",
    "Made with recycled fabrics and a PFC-free water-repellent finish.",
    "Pair it with a warm layer and you are ready for shoulder season.",
    "Members earn double points on this item until the end of the month.",
)


@dataclass(frozen=True, slots=True)
class TemplateRow:
    """One template as stored in the origin: id, name and HTML source."""

    id: int
    name: str
    html: str


def generate_templates(
    seed: int, count: int = GENERATED_TEMPLATE_COUNT
) -> list[TemplateRow]:
    """Generate ``count`` HTML email templates of 10 to 30 KB each.

    Each template uses the merge tags ``*|FNAME|*``, ``*|LNAME|*``,
    ``*|EMAIL|*``, ``*|UNSUB|*``, ``*|MC:SUBJECT|*`` and a nested
    ``*|IF:REWARDS|*`` ... ``*|ELSE:|*`` ... ``*|END:IF|*`` block. The same
    seed gives the same templates.
    """
    rng = random.Random(f"templates-{seed}")
    return [_generate_template(template_id, rng) for template_id in range(1, count + 1)]


def load_template_dir(directory: Path) -> list[TemplateRow]:
    """Load every ``*.html`` file in ``directory`` as a template, sorted by name.

    :raises ValueError: if the directory has no ``*.html`` file, or a file is
        not UTF-8, is larger than 1 MB or has unbalanced IF blocks.
    """
    paths = sorted(directory.glob("*.html"))
    if not paths:
        raise ValueError(f"no *.html file found in {directory}")
    rows = []
    for template_id, path in enumerate(paths, start=1):
        data = path.read_bytes()
        if len(data) > MAX_LOADED_TEMPLATE_BYTES:
            raise ValueError(
                f"template {path} is {len(data)} bytes, larger than the "
                f"{MAX_LOADED_TEMPLATE_BYTES} byte limit; remove it from the directory"
            )
        try:
            html = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"template {path} is not valid UTF-8 ({exc}); convert it to UTF-8"
            ) from exc
        try:
            Template(html)
        except TemplateSyntaxError as exc:
            raise ValueError(f"template {path} has invalid merge tags: {exc}") from exc
        rows.append(TemplateRow(template_id, path.stem, html))
    return rows


def _generate_template(template_id: int, rng: random.Random) -> TemplateRow:
    dark, light, accent = rng.choice(_PALETTES)
    target_bytes = rng.randint(MIN_TEMPLATE_BYTES, MAX_TEMPLATE_BYTES - 2_000)
    name = f"generated-{template_id:02d}-{rng.choice(_PRODUCTS).replace(' ', '-')}"
    head = _head(dark, light, accent)
    footer = _footer()
    cards: list[str] = []
    size = len(head) + len(footer)
    while size < target_bytes:
        card = _product_card(rng, accent, template_id, len(cards) + 1)
        cards.append(card)
        size += len(card)
    html = head + "".join(cards) + _rewards_block(accent) + footer
    return TemplateRow(template_id, name, html)


def _head(dark: str, light: str, accent: str) -> str:
    return f"""<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN"
  "http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">
<html xmlns="http://www.w3.org/1999/xhtml">
<head>
<meta http-equiv="Content-Type" content="text/html; charset=UTF-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>*|MC:SUBJECT|*</title>
<style type="text/css">
  body, #bodyTable {{ margin: 0; padding: 0; width: 100% !important;
    background-color: {light}; }}
  table {{ border-collapse: collapse; mso-table-lspace: 0pt; mso-table-rspace: 0pt; }}
  img {{ border: 0; height: auto; line-height: 100%; outline: none;
    text-decoration: none; -ms-interpolation-mode: bicubic; }}
  .preheader {{ display: none !important; visibility: hidden; opacity: 0;
    color: transparent; height: 0; width: 0; }}
  #templateHeader {{ background-color: {dark}; color: {light}; padding: 24px; }}
  #templateHeader h1 {{ font-family: Georgia, serif; font-size: 28px;
    margin: 0; letter-spacing: 0.5px; }}
  .greeting {{ font-family: Helvetica, Arial, sans-serif; font-size: 18px;
    color: {dark}; padding: 24px 24px 0 24px; }}
  .card {{ font-family: Helvetica, Arial, sans-serif; font-size: 15px;
    line-height: 150%; color: #333333; padding: 16px 24px;
    border-bottom: 1px solid #e5e5e5; }}
  .card h2 {{ font-size: 20px; color: {dark}; margin: 0 0 8px 0; }}
  .price {{ font-weight: bold; color: {accent}; }}
  .button {{ display: inline-block; background-color: {accent}; color: #ffffff;
    padding: 10px 18px; border-radius: 4px; text-decoration: none;
    font-weight: bold; }}
  .rewards {{ background-color: {light}; border: 2px dashed {accent};
    padding: 16px 24px; font-family: Helvetica, Arial, sans-serif; }}
  #templateFooter {{ font-family: Helvetica, Arial, sans-serif; font-size: 12px;
    line-height: 150%; color: #707070; padding: 24px; }}
  #templateFooter a {{ color: #707070; text-decoration: underline; }}
  @media only screen and (max-width: 480px) {{
    #templateContainer {{ width: 100% !important; }}
    .card h2 {{ font-size: 18px !important; }}
    .button {{ display: block !important; text-align: center; }}
  }}
</style>
</head>
<body>
<span class="preheader">*|MC:PREVIEW_TEXT|*</span>
<table border="0" cellpadding="0" cellspacing="0" width="100%" id="bodyTable">
<tr><td align="center" valign="top">
<table border="0" cellpadding="0" cellspacing="0" width="600" id="templateContainer">
*|IFNOT:ARCHIVE_PAGE|*
<tr><td class="card" style="font-size: 12px; text-align: center;">
  Email not displaying correctly?
  <a href="*|ARCHIVE|*" target="_blank">View it in your browser</a>.
</td></tr>
*|END:IF|*
<tr><td id="templateHeader"><h1>*|LIST:COMPANY|*</h1></td></tr>
<tr><td class="greeting">
  *|IF:FNAME|*<p>Hi *|FNAME|* *|LNAME|*,</p>*|ELSE:|*<p>Hi there,</p>*|END:IF|*
  *|IF:CITY|*<p>Here is what is new near *|CITY|* this week.</p>*|END:IF|*
</td></tr>
"""


def _product_card(
    rng: random.Random, accent: str, template_id: int, position: int
) -> str:
    title = f"{rng.choice(_ADJECTIVES).capitalize()} {rng.choice(_PRODUCTS)}"
    price = f"{rng.randint(19, 349)}.{rng.choice(('00', '50', '95', '99'))}"
    sku = f"{template_id:02d}{position:03d}{rng.randint(100, 999)}"
    text = " ".join(rng.sample(_SENTENCES, k=rng.randint(2, 4)))
    link = (
        f"https://shop.example.com/p/{sku}?utm_source=email&amp;"
        f"utm_campaign=t{template_id}&amp;utm_content=card{position}"
    )
    return f"""<tr><td class="card">
  <table border="0" cellpadding="0" cellspacing="0" width="100%"><tr>
    <td width="180" valign="top">
      <a href="{link}"><img src="https://img.example.com/p/{sku}.jpg" width="160"
        alt="{title}" style="max-width: 160px; border: 1px solid {accent};"></a>
    </td>
    <td valign="top">
      <h2>{title}</h2>
      <p>{text}</p>
      <p><span class="price">{price} EUR</span></p>
      <p><a class="button" href="{link}">Shop now</a></p>
    </td>
  </tr></table>
</td></tr>
"""


def _rewards_block(accent: str) -> str:
    return f"""<tr><td class="rewards">
*|IF:REWARDS|*
  <p>*|FNAME|*, thank you for being an Example Rewards member.</p>
  *|IF:POINTS>=1000|*
    <p style="color: {accent};">Gold status: you have *|POINTS|* points. Your next
    order ships free.</p>
  *|ELSEIF:POINTS|*
    <p>You have *|POINTS|* points. Reach 1000 for free shipping.</p>
  *|ELSE:|*
    <p>Earn your first points with your next order.</p>
  *|END:IF|*
  *|HTML:REWARDS|*
*|ELSE:|*
  <p>Join Example Rewards and earn points on every order.
  <a href="https://rewards.example.com/join">Join for free</a>.</p>
*|END:IF|*
</td></tr>
"""


def _footer() -> str:
    return """<tr><td id="templateFooter">
  *|IFNOT:ARCHIVE_PAGE|*
  <p>*|LIST:DESCRIPTION|*</p>
  <p>This email was sent to <a href="mailto:*|EMAIL|*">*|EMAIL|*</a>.</p>
  *|END:IF|*
  <p><strong>Our mailing address is:</strong><br>*|HTML:LIST_ADDRESS_HTML|*</p>
  <p><a href="*|UNSUB|*">Unsubscribe from this list</a> |
    <a href="*|UPDATE_PROFILE|*">Update subscription preferences</a> |
    <a href="*|FORWARD|*">Forward to a friend</a></p>
  <p>Copyright &copy; *|CURRENT_YEAR|* *|LIST:COMPANY|*, All rights reserved.</p>
</td></tr>
</table>
</td></tr>
</table>
</body>
</html>
"""
