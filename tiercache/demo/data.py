"""Generation of the demo's email-marketing data set, deterministic from a seed.

The data set is what an email platform keeps per list: subscribers with
names in many scripts, per-subscriber preferences and custom merge fields,
segments with their memberships, templates and the campaigns that send
them. The same seed and sizes always give the same rows.
"""

from __future__ import annotations

import math
import random
import re
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from tiercache.demo.campaign import Campaign
from tiercache.demo.templates import TemplateRow
from tiercache.demo.zipf import rank_subscribers

# Timestamps in the data set are before this instant, so they do not depend
# on the day the demo runs.
DATA_EPOCH = datetime(2025, 1, 1, tzinfo=UTC)
EMAIL_DOMAINS = ("example.com", "example.org", "example.net")
INITIAL_UNSUBSCRIBED_SHARE = 0.08
REWARDS_MEMBER_SHARE = 0.35
CAMPAIGN_COUNT = 12
# Engagement events (opens, clicks, purchases) of the subscriber at
# popularity rank r (0 = most popular): EVENTS_AT_TOP / sqrt(r + 1). Active
# subscribers receive the most email, so the popular profiles carry the
# longest histories: about 21 events per subscriber on average at 20,000
# subscribers, and 1,500 for the most popular one.
EVENTS_AT_TOP = 1500
HISTORIC_CAMPAIGNS = 400
_EVENT_KINDS = ("open", "click", "purchase")
_EVENT_WEIGHTS = (0.70, 0.25, 0.05)


@dataclass(frozen=True, slots=True)
class _Locale:
    code: str
    weight: float
    timezone: str
    first_names: tuple[str, ...]
    last_names: tuple[str, ...]
    cities: tuple[str, ...]


_LOCALES = (
    _Locale(
        "en_US",
        0.32,
        "America/New_York",
        ("James", "Mary", "Olivia", "Liam", "Emma", "Noah", "Ava", "Ethan", "Mia"),
        ("Smith", "Johnson", "Williams", "Brown", "Davis", "García", "O'Brien"),
        ("Portland", "Denver", "Austin", "Boston", "Seattle"),
    ),
    _Locale(
        "en_GB",
        0.09,
        "Europe/London",
        ("Oliver", "Amelia", "George", "Isla", "Harry", "Freya", "Siobhán"),
        ("Taylor", "Evans", "Roberts", "Walker", "O'Connor", "Ó Súilleabháin"),
        ("Manchester", "Leeds", "Bristol", "Edinburgh", "Cardiff"),
    ),
    _Locale(
        "de_DE",
        0.10,
        "Europe/Berlin",
        ("Jürgen", "Lukas", "Sophie", "Maximilian", "Lea", "Björn", "Käthe"),
        ("Müller", "Schmidt", "Schneider", "Fischer", "Schäfer", "Groß"),
        ("München", "Köln", "Düsseldorf", "Berlin", "Nürnberg"),
    ),
    _Locale(
        "fr_FR",
        0.07,
        "Europe/Paris",
        ("François", "Chloé", "Léa", "Hélène", "Jérôme", "Zoë", "Anaïs", "Noël"),
        ("Martin", "Dubois", "Lefèvre", "Girard", "Rousseau", "Lemaître"),
        ("Paris", "Lyon", "Besançon", "Nîmes", "Orléans"),
    ),
    _Locale(
        "es_ES",
        0.07,
        "Europe/Madrid",
        ("José", "María", "Lucía", "Álvaro", "Iñaki", "Sofía", "Begoña"),
        ("García", "Fernández", "López", "Martínez", "Muñoz", "Ibáñez"),
        ("Madrid", "Málaga", "Córdoba", "León", "Cádiz"),
    ),
    _Locale(
        "pt_BR",
        0.06,
        "America/Sao_Paulo",
        ("João", "Ana", "Conceição", "Luís", "Gabriel", "Letícia"),
        ("Silva", "Santos", "Oliveira", "Araújo", "Gonçalves"),
        ("São Paulo", "Brasília", "Belém", "Goiânia", "Maceió"),
    ),
    _Locale(
        "pl_PL",
        0.05,
        "Europe/Warsaw",
        ("Łukasz", "Małgorzata", "Zofia", "Wojciech", "Michał", "Grażyna"),
        ("Nowak", "Kowalski", "Wiśniewski", "Wójcik", "Zieliński"),
        ("Kraków", "Łódź", "Wrocław", "Gdańsk", "Poznań"),
    ),
    _Locale(
        "sv_SE",
        0.03,
        "Europe/Stockholm",
        ("Björn", "Åsa", "Linnéa", "Göran", "Märta", "Søren"),
        ("Andersson", "Löfgren", "Ström", "Åberg", "Nyström"),
        ("Göteborg", "Malmö", "Västerås", "Örebro", "Umeå"),
    ),
    _Locale(
        "tr_TR",
        0.03,
        "Europe/Istanbul",
        ("İpek", "Çağla", "Ömer", "Şule", "Emre", "Gülşen"),
        ("Yılmaz", "Kaya", "Şahin", "Çelik", "Öztürk"),
        ("İstanbul", "İzmir", "Muğla", "Eskişehir", "Şanlıurfa"),
    ),
    _Locale(
        "vi_VN",
        0.03,
        "Asia/Ho_Chi_Minh",
        ("Thảo", "Minh", "Hương", "Dũng", "Phương", "Tuấn"),
        ("Nguyễn", "Trần", "Lê", "Phạm", "Đặng"),
        ("Hà Nội", "Đà Nẵng", "Huế", "Cần Thơ", "Hải Phòng"),
    ),
    _Locale(
        "ja_JP",
        0.05,
        "Asia/Tokyo",
        ("翔太", "さくら", "陽菜", "蓮", "美咲", "大輝"),
        ("佐藤", "鈴木", "高橋", "田中", "山田"),
        ("東京", "大阪", "札幌", "福岡", "京都"),
    ),
    _Locale(
        "zh_CN",
        0.04,
        "Asia/Shanghai",
        ("伟", "芳", "娜", "秀英", "敏", "静"),
        ("王", "李", "张", "刘", "陈"),
        ("上海", "北京", "成都", "杭州", "深圳"),
    ),
    _Locale(
        "ru_RU",
        0.03,
        "Europe/Moscow",
        ("Дмитрий", "Ольга", "Анна", "Сергей", "Наталья", "Алексей"),
        ("Смирнова", "Иванов", "Кузнецова", "Попов", "Соколова"),
        ("Москва", "Казань", "Новосибирск", "Самара", "Пермь"),
    ),
    _Locale(
        "el_GR",
        0.02,
        "Europe/Athens",
        ("Νίκος", "Μαρία", "Γιώργος", "Ελένη"),
        ("Παπαδόπουλος", "Παπαδοπούλου", "Οικονόμου"),
        ("Αθήνα", "Θεσσαλονίκη", "Πάτρα"),
    ),
    _Locale(
        "ar_EG",
        0.01,
        "Africa/Cairo",
        ("محمد", "فاطمة", "أحمد", "مريم"),
        ("حسن", "علي", "إبراهيم"),
        ("القاهرة", "الإسكندرية", "أسوان"),
    ),
)
_LOCALE_WEIGHTS = [locale.weight for locale in _LOCALES]
FIRST_NAMES = tuple(name for locale in _LOCALES for name in locale.first_names)

# (name, permission reminder shown in the footer, share of subscribers who
# are members)
_SEGMENTS = (
    ("Weekly digest readers", "you subscribed to the weekly digest", 0.45),
    ("Rewards members", "you joined Example Rewards", 0.30),
    ("Bought in the last 90 days", "you bought from us recently", 0.20),
    ("Lapsed: no open in 180 days", "you signed up on our website", 0.15),
    ("Trail running", "you asked for trail running news", 0.20),
    ("Cycling", "you asked for cycling news", 0.15),
    ("Camping weekenders", "you asked for camping news", 0.20),
    ("Gift guide clickers", "you opened our gift guide", 0.10),
    ("Top 5% spend", "you are one of our best customers", 0.05),
    ("Joined this month", "you signed up this month", 0.08),
    ("Store events", "you asked to hear about store events", 0.12),
    ("Product reviewers", "you reviewed a product with us", 0.06),
)

_CAMPAIGN_SUBJECTS = (
    (
        "Spring trail collection",
        "New trail shoes are here, *|FNAME|*",
        "Light, fast, grippy.",
    ),
    ("Members weekend", "Double points this weekend only", "Members save more."),
    ("Gear check", "Is your tent ready for the season?", "A 5-minute checklist."),
    (
        "Frühjahrsputz",
        "Jetzt neu: Wanderschuhe für den Frühling",
        "Leicht und griffig.",
    ),
    ("Rentrée", "Prêts pour la rentrée ? Découvrez nos sacs", "Légers et solides."),
    ("Summer sale", "Up to 40% off summer camping", "Ends Sunday."),
    ("Trail report", "This month's best trails", "Maps, tips and photos."),
    ("新作のお知らせ", "新作トレイルシューズが登場しました", "軽くて滑りにくい。"),
    ("Bike week", "Tune-up kits for every ride", "Free shipping over 50."),
    ("Back in stock", "Your favourites are back in stock", "Grab them fast."),
    ("Ofertas de otoño", "Ofertas de otoño: mochilas y más", "Sólo esta semana."),
    ("Year in review", "Your year outdoors, *|FNAME|*", "Thanks for joining us."),
)

_PLANS = ("free", "plus", "pro")
_FREQUENCIES = ("daily", "weekly", "monthly")
_FOLD_EXTRA = str.maketrans(
    {
        "ł": "l",
        "Ł": "L",
        "ø": "o",
        "Ø": "O",
        "ß": "ss",
        "æ": "ae",
        "đ": "d",
        "Đ": "D",
        "ı": "i",
    }
)


@dataclass(slots=True)
class DataSet:
    """Rows of every table, in insertion order.

    Each row is a tuple in the column order of the table in
    :mod:`tiercache.demo.database`.
    """

    subscribers: list[tuple[object, ...]] = field(default_factory=list)
    preferences: list[tuple[object, ...]] = field(default_factory=list)
    custom_fields: list[tuple[object, ...]] = field(default_factory=list)
    segments: list[tuple[object, ...]] = field(default_factory=list)
    segment_members: list[tuple[object, ...]] = field(default_factory=list)
    events: list[tuple[object, ...]] = field(default_factory=list)
    templates: list[TemplateRow] = field(default_factory=list)
    campaigns: list[Campaign] = field(default_factory=list)


def generate_dataset(
    subscriber_count: int, seed: int, templates: list[TemplateRow]
) -> DataSet:
    """Generate subscribers, segments and campaigns for ``templates``.

    :param subscriber_count: number of subscribers, at least 1.
    :param seed: the same seed gives the same rows.
    :param templates: the templates the campaigns use, at least one.
    :raises ValueError: if ``subscriber_count`` is below 1 or ``templates``
        is empty.
    """
    if subscriber_count < 1:
        raise ValueError(f"subscriber_count must be at least 1, got {subscriber_count}")
    if not templates:
        raise ValueError("templates is empty; give at least one template")
    rng = random.Random(f"dataset-{seed}")
    dataset = DataSet(templates=list(templates))
    _add_segments(dataset)
    for subscriber_id in range(1, subscriber_count + 1):
        _add_subscriber(dataset, subscriber_id, rng)
    ranking = rank_subscribers(subscriber_count, seed)
    for rank, subscriber_id in enumerate(ranking):
        event_count = int(EVENTS_AT_TOP / math.sqrt(rank + 1))
        _add_events(dataset, subscriber_id, event_count, rng)
    _add_campaigns(dataset)
    return dataset


def _add_segments(dataset: DataSet) -> None:
    for segment_id, (name, reminder, share) in enumerate(_SEGMENTS, start=1):
        description = f"You are receiving this email because {reminder}."
        rule = f"random share {share:.2f}"
        updated_at = _timestamp(DATA_EPOCH - timedelta(days=segment_id))
        dataset.segments.append((segment_id, name, description, rule, 1, updated_at))


def _add_subscriber(dataset: DataSet, subscriber_id: int, rng: random.Random) -> None:
    locale = rng.choices(_LOCALES, weights=_LOCALE_WEIGHTS)[0]
    first_name = rng.choice(locale.first_names)
    last_name = rng.choice(locale.last_names)
    email = _email_address(first_name, last_name, subscriber_id, rng)
    is_unsubscribed = rng.random() < INITIAL_UNSUBSCRIBED_SHARE
    status = "unsubscribed" if is_unsubscribed else "subscribed"
    created_at = DATA_EPOCH - timedelta(seconds=rng.randrange(1, 5 * 365 * 86400))
    updated_at = created_at + (DATA_EPOCH - created_at) * rng.random()
    dataset.subscribers.append(
        (
            subscriber_id,
            email,
            first_name,
            last_name,
            locale.code,
            status,
            1,
            _timestamp(created_at),
            _timestamp(updated_at),
        )
    )

    is_rewards_member = rng.random() < REWARDS_MEMBER_SHARE
    dataset.preferences.append(
        (
            subscriber_id,
            rng.choice(_FREQUENCIES),
            "html" if rng.random() < 0.9 else "text",
            int(is_rewards_member),
            locale.timezone,
        )
    )

    fields = {"CITY": rng.choice(locale.cities), "PLAN": rng.choice(_PLANS)}
    if is_rewards_member:
        fields["POINTS"] = str(int(rng.paretovariate(1.2) * 100))
    if rng.random() < 0.5:
        fields["BIRTHDAY"] = f"{rng.randint(1, 12):02d}/{rng.randint(1, 28):02d}"
    if rng.random() < 0.3:
        fields["COMPANY"] = f"{last_name} & Co."
    for name, value in fields.items():
        dataset.custom_fields.append((subscriber_id, name, value))

    segment_ids = [
        segment_id
        for segment_id, (_, _, share) in enumerate(_SEGMENTS, start=1)
        if rng.random() < share
    ]
    if not segment_ids:
        segment_ids = [1]
    added_at = _timestamp(created_at)
    for segment_id in segment_ids:
        dataset.segment_members.append((segment_id, subscriber_id, added_at))


def _add_events(
    dataset: DataSet, subscriber_id: int, count: int, rng: random.Random
) -> None:
    created_at = dataset.subscribers[subscriber_id - 1][7]
    assert isinstance(created_at, str)
    first = int(datetime.fromisoformat(created_at).timestamp())
    last = int(DATA_EPOCH.timestamp())
    kinds = rng.choices(_EVENT_KINDS, weights=_EVENT_WEIGHTS, k=count)
    for kind in kinds:
        amount = int(rng.lognormvariate(8.3, 0.6)) if kind == "purchase" else None
        dataset.events.append(
            (
                subscriber_id,
                rng.randint(first, last),
                kind,
                rng.randint(1, HISTORIC_CAMPAIGNS),
                amount,
            )
        )


def _add_campaigns(dataset: DataSet) -> None:
    template_count = len(dataset.templates)
    for index, (name, subject, preview) in enumerate(
        _CAMPAIGN_SUBJECTS[:CAMPAIGN_COUNT]
    ):
        template = dataset.templates[(index * 3) % template_count]
        segment_id = index % len(dataset.segments) + 1
        dataset.campaigns.append(
            Campaign(
                id=index + 1,
                name=name,
                subject=subject,
                preview_text=preview,
                template_id=template.id,
                segment_id=segment_id,
            )
        )


def _email_address(
    first_name: str, last_name: str, subscriber_id: int, rng: random.Random
) -> str:
    first = _ascii_slug(first_name)
    last = _ascii_slug(last_name)
    if not first or not last:
        local_part = f"subscriber{subscriber_id}"
    else:
        pattern = rng.randrange(3)
        if pattern == 0:
            local_part = f"{first}.{last}{subscriber_id}"
        elif pattern == 1:
            local_part = f"{first[0]}.{last}{subscriber_id}"
        else:
            local_part = f"{first}{last}+{subscriber_id}"
    return f"{local_part}@{rng.choice(EMAIL_DOMAINS)}"


def _ascii_slug(name: str) -> str:
    decomposed = unicodedata.normalize("NFKD", name.translate(_FOLD_EXTRA))
    ascii_only = decomposed.encode("ascii", "ignore").decode("ascii")
    return re.sub(r"[^a-z0-9]", "", ascii_only.lower())


def _timestamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now_timestamp() -> str:
    """Return the current UTC time in the data set's timestamp format."""
    return _timestamp(datetime.now(UTC))
