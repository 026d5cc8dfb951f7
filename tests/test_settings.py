"""Tests of Settings: parsing every TIERCACHE_* variable and rejecting bad values."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from tiercache import ConfigurationError, Settings
from tiercache.settings import ENV_PREFIX

FIELDS = {field.name: field for field in dataclasses.fields(Settings)}

# A valid raw value and its parsed form for the fields whose type alone
# doesn't tell what a valid value is.
SPECIAL_VALID: dict[str, tuple[str, Any]] = {
    "memcached_servers": (
        "127.0.0.1:11311, [::1]:11312,/tmp/mc.sock",
        ("127.0.0.1:11311", "[::1]:11312", "/tmp/mc.sock"),
    ),
    "namespace": (" shop-2.eu_west ", "shop-2.eu_west"),
    "ttl_jitter": ("0.25", 0.25),
    "on_channel_loss": ("flush", "flush"),
    "channel_url": ("redis://127.0.0.1:6390/0", "redis://127.0.0.1:6390/0"),
    "origin_url": ("sqlite:///tmp/origin.db", "sqlite:///tmp/origin.db"),
}

VALID_BY_TYPE: dict[str, tuple[str, Any]] = {
    "int": ("1_234", 1234),
    "float": ("2.5", 2.5),
    "float | None": ("7.5", 7.5),
    "bool": ("off", False),
}


def valid_case(name: str) -> tuple[str, Any]:
    if name in SPECIAL_VALID:
        return SPECIAL_VALID[name]
    return VALID_BY_TYPE[str(FIELDS[name].type)]


def variable(name: str) -> str:
    return ENV_PREFIX + name.upper()


# parsing


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_from_env_parses_variable(name: str) -> None:
    raw, expected = valid_case(name)
    settings = Settings.from_env({variable(name): raw})
    assert getattr(settings, name) == expected


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_from_env_override_beats_variable(name: str) -> None:
    raw, expected = valid_case(name)
    default = getattr(Settings(), name)
    settings = Settings.from_env({variable(name): raw}, **{name: default})
    assert getattr(settings, name) == default


def test_from_env_empty_is_defaults() -> None:
    assert Settings.from_env({}) == Settings()


def test_from_env_reads_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERCACHE_NAMESPACE", "campaigns")
    monkeypatch.setenv("TIERCACHE_LOCAL_TTL", "12")
    settings = Settings.from_env()
    assert settings.namespace == "campaigns"
    assert settings.local_ttl == 12.0


def test_from_env_ignores_other_variables() -> None:
    assert Settings.from_env({"LOCAL_TTL": "nonsense", "PATH": "/bin"}) == Settings()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", True), ("TRUE", True), ("yes", True), (" on ", True)]
    + [("0", False), ("False", False), ("no", False), ("OFF", False)],
)
def test_from_env_bool_spellings(raw: str, expected: bool) -> None:
    settings = Settings.from_env({"TIERCACHE_LOCAL_COPY": raw})
    assert settings.local_copy is expected


@pytest.mark.parametrize("raw", ["none", "None", "", "  "])
def test_from_env_remote_ttl_none(raw: str) -> None:
    settings = Settings.from_env({"TIERCACHE_REMOTE_TTL": raw})
    assert settings.remote_ttl is None


def test_from_env_empty_servers_no_remote() -> None:
    settings = Settings.from_env({"TIERCACHE_MEMCACHED_SERVERS": " , "})
    assert settings.memcached_servers == ()


def test_from_env_int_type() -> None:
    settings = Settings.from_env({"TIERCACHE_LOCAL_MAX_ENTRIES": "64"})
    assert type(settings.local_max_entries) is int


def test_from_env_float_from_int_text() -> None:
    settings = Settings.from_env({"TIERCACHE_LOCAL_TTL": "5"})
    assert settings.local_ttl == 5.0


def test_from_env_unknown_override_raises() -> None:
    with pytest.raises(TypeError, match="local_tll"):
        Settings.from_env({}, local_tll=5)


# rejecting bad values

BAD_BY_TYPE: dict[str, list[str]] = {
    "int": ["abc", "1.5", "0", "-3", "1e3", ""],
    "float": ["abc", "0", "-1", "nan", "inf", "-inf", "1e400", ""],
    "bool": ["maybe", "2", "", "truth"],
}

SPECIAL_BAD: dict[str, list[str]] = {
    "memcached_servers": ["127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", ":11211"]
    + ["127.0.0.1:port", "127.0.0.1:11211,localhost"],
    "namespace": ["", "a b", "a|b", "ü", "x" * 65, "tc:1"],
    "remote_ttl": ["abc", "0", "-5", "nan", "inf"],
    "ttl_jitter": ["1", "1.5", "-0.1", "nan", "abc"],
    "on_channel_loss": ["drop", "", "FLUSH"],
    "channel_url": ["http://127.0.0.1", "redis", "127.0.0.1:6379", "mysql://x"],
    "origin_url": ["mysql://x", "sqlite", "memory://x", "/tmp/origin.db"],
    "stale_ttl": ["abc", "-1", "nan", "inf"],
    "early_refresh_beta": ["abc", "-1", "nan", "inf"],
}


def bad_cases() -> list[tuple[str, str]]:
    cases: list[tuple[str, str]] = []
    for name, field in FIELDS.items():
        if name in SPECIAL_BAD:
            values = SPECIAL_BAD[name]
        else:
            values = BAD_BY_TYPE[str(field.type)]
        cases.extend((name, value) for value in values)
    return cases


@pytest.mark.parametrize(("name", "raw"), bad_cases())
def test_from_env_rejects_bad_value(name: str, raw: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({variable(name): raw})
    message = str(info.value)
    assert variable(name) in message
    assert repr(raw) in message
    assert "expected" in message


@pytest.mark.parametrize(("name", "raw"), bad_cases())
def test_from_env_error_is_value_error(name: str, raw: str) -> None:
    with pytest.raises(ValueError):
        Settings.from_env({variable(name): raw})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("local_ttl", -1),
        ("local_ttl", "5"),
        ("local_ttl", True),
        ("local_max_entries", 1.5),
        ("local_max_entries", 0),
        ("local_copy", 1),
        ("remote_ttl", float("inf")),
        ("namespace", 5),
        ("memcached_servers", "127.0.0.1:11211"),
        ("channel_url", None),
    ],
)
def test_settings_rejects_bad_field(name: str, value: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings(**{name: value})
    message = str(info.value)
    assert name in message
    assert repr(value) in message
    assert "expected" in message


def test_replace_validates() -> None:
    with pytest.raises(ConfigurationError, match="local_ttl"):
        Settings().replace(local_ttl=0)


def test_from_env_error_names_variable() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({"TIERCACHE_LOCAL_TTL": "-2"})
    assert "TIERCACHE_LOCAL_TTL='-2'" in str(info.value)


def test_from_env_override_error_names_field() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({"TIERCACHE_LOCAL_TTL": "5"}, local_ttl=-2)
    assert "local_ttl=-2" in str(info.value)
