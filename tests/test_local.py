"""Tests of the local tier (L1): bounds, LRU order, expiry and the fill guard."""

from __future__ import annotations

import gc
import random
import sys
import threading
import tracemalloc
from collections import OrderedDict
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tiercache import MISSING
from tiercache.local import _PRUNE_AT, ENTRY_OVERHEAD, LocalTier, _touched_by_get


class FakeClock:
    """A monotonic clock that moves only when a test advances it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_tier(
    max_entries: int = 100, max_bytes: int = 10**9, clock: FakeClock | None = None
) -> LocalTier:
    return LocalTier(
        max_entries=max_entries, max_bytes=max_bytes, clock=clock or FakeClock()
    )


def put(tier: LocalTier, key: str, item: Any, size: int = 10, ttl: float = 60) -> bool:
    return tier.fill(key, item, size, ttl, tier.begin_fill())


# storing and bounds


def test_fill_then_get() -> None:
    tier = make_tier()
    put(tier, "k", b"v")
    assert tier.get("k") == b"v"


def test_get_unknown_missing() -> None:
    assert make_tier().get("k") is MISSING


def test_get_stored_none_not_missing() -> None:
    tier = make_tier()
    put(tier, "k", None)
    assert tier.get("k") is None


def test_bound_by_entries() -> None:
    tier = make_tier(max_entries=10)
    for index in range(50):
        put(tier, f"k{index}", index)
    assert len(tier) == 10


def test_bound_by_entries_keeps_newest() -> None:
    tier = make_tier(max_entries=10)
    for index in range(50):
        put(tier, f"k{index}", index)
    assert [tier.get(f"k{index}") for index in range(40, 50)] == list(range(40, 50))


def key_bytes(key: str) -> int:
    return sys.getsizeof(key)


def test_bound_by_bytes() -> None:
    per_entry = 1000 + key_bytes("k00") + ENTRY_OVERHEAD
    max_bytes = per_entry * 5 + 2000
    tier = make_tier(max_bytes=max_bytes)
    for index in range(20):
        put(tier, f"k{index:02}", index, size=1000)
    assert tier.current_bytes <= max_bytes
    # Only as many entries as needed are evicted: one more would not fit.
    assert tier.current_bytes + per_entry > max_bytes
    assert len(tier) >= 3
    for index in range(20 - len(tier), 20):
        assert f"k{index:02}" in tier


def test_bytes_charge_key_overhead_and_tables() -> None:
    tier = make_tier()
    put(tier, "key", b"x", size=100)
    entry_bytes = 100 + key_bytes("key") + ENTRY_OVERHEAD
    assert tier._lru.currsize == entry_bytes
    assert tier.current_bytes == entry_bytes + tier._lru.table_bytes()
    assert tier._lru.table_bytes() > 0


def test_bytes_released_on_invalidate() -> None:
    tier = make_tier()
    put(tier, "key", b"x", size=100)
    tier.invalidate(["key"])
    assert tier._lru.currsize == 0
    assert tier.current_bytes == tier._lru.table_bytes()


def test_bytes_released_on_expiry() -> None:
    clock = FakeClock()
    tier = make_tier(clock=clock)
    put(tier, "key", b"x", size=100, ttl=5)
    clock.now += 10
    assert tier.get("key") is MISSING
    assert tier._lru.currsize == 0


def test_refill_charges_once() -> None:
    tier = make_tier()
    put(tier, "key", b"x", size=100)
    put(tier, "key", b"y", size=300)
    assert tier._lru.currsize == 300 + key_bytes("key") + ENTRY_OVERHEAD


def test_entry_overhead_covers_entry_objects() -> None:
    entry = (1000.0 + 0.5, b"", 2**20 + 1)
    objects = sys.getsizeof(entry) + sys.getsizeof(entry[0]) + sys.getsizeof(entry[2])
    assert ENTRY_OVERHEAD >= objects


def traced_growth_of_fill(tier: LocalTier, sizes: list[tuple[str, int]]) -> int:
    """Fill ``tier`` with a new bytes item per ``(key prefix, length)``.

    :returns: the bytes that tracemalloc counts as still allocated after the
        fill, which the tier alone keeps.
    """
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for index, (prefix, length) in enumerate(sizes):
            item = b"x" * length
            put(tier, f"{prefix}:{index}", item, size=sys.getsizeof(item))
        del item
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("item_bytes", [0, 40, 600, 5000])
def test_memory_within_bound_by_item_size(item_bytes: int) -> None:
    max_bytes = 2 * 1024 * 1024
    tier = make_tier(max_entries=10**9, max_bytes=max_bytes)
    count = 3 * max_bytes // (item_bytes + 100)
    growth = traced_growth_of_fill(tier, [("key", item_bytes)] * count)
    assert tier.evictions > 0
    assert tier.current_bytes <= max_bytes
    assert growth <= max_bytes
    assert growth >= max_bytes * 0.7


def test_memory_within_bound_after_small_items() -> None:
    # Small items grow the LRU's hash tables, which evictions don't shrink.
    # The large items that follow must fit beside them.
    max_bytes = 2 * 1024 * 1024
    tier = make_tier(max_entries=10**9, max_bytes=max_bytes)
    sizes = [("small", 0)] * 40_000 + [("big", 300_000)] * 10
    growth = traced_growth_of_fill(tier, sizes)
    assert f"big:{len(sizes) - 1}" in tier
    assert tier.current_bytes <= max_bytes
    assert growth <= max_bytes


def test_oversized_not_stored() -> None:
    tier = make_tier(max_bytes=10_000)
    stored = put(tier, "big", b"x", size=20_000)
    assert stored is False
    assert tier.get("big") is MISSING
    assert tier.oversized == 1


def test_oversized_keeps_others() -> None:
    tier = make_tier(max_bytes=10_000)
    put(tier, "small", b"s", size=10)
    put(tier, "big", b"x", size=20_000)
    assert tier.get("small") == b"s"


def test_oversized_drops_older_copy() -> None:
    tier = make_tier(max_bytes=10_000)
    put(tier, "k", b"old", size=10)
    put(tier, "k", b"new", size=20_000)
    assert tier.get("k") is MISSING


def test_evicts_least_recently_used() -> None:
    tier = make_tier(max_entries=3)
    for key in ("a", "b", "c"):
        put(tier, key, key)
    tier.get("a")
    put(tier, "d", "d")
    assert "b" not in tier
    assert "a" in tier
    assert "c" in tier
    assert "d" in tier


def test_lookup_reads_cachetools_directly() -> None:
    # Fails when a cachetools release renames the private attributes that
    # the fast lookup reads; the public fallback then serves, more slowly.
    tier = make_tier()
    assert tier._lru.direct


def test_public_lookup_keeps_lru_order() -> None:
    tier = make_tier(max_entries=3)
    tier._peek = tier._lru.get
    tier._touch = _touched_by_get
    for key in ("a", "b", "c"):
        put(tier, key, key)
    assert tier.get("a") == "a"
    assert tier.get("zz") is MISSING
    put(tier, "d", "d")
    assert "b" not in tier
    assert "a" in tier
    assert tier.invalidate(["a", "zz"]) == 1
    assert "a" not in tier


def test_invalidate_absent_keys() -> None:
    tier = make_tier()
    put(tier, "a", "a")
    assert tier.invalidate(["x", "y"]) == 0
    assert tier.get("a") == "a"


def test_refill_counts_as_use() -> None:
    tier = make_tier(max_entries=3)
    for key in ("a", "b", "c"):
        put(tier, key, key)
    put(tier, "a", "a2")
    put(tier, "d", "d")
    assert "b" not in tier
    assert tier.get("a") == "a2"


def test_evictions_counted() -> None:
    tier = make_tier(max_entries=3)
    for index in range(10):
        put(tier, f"k{index}", index)
    assert tier.evictions == 7


# expiry


def test_expires_at_ttl_not_before() -> None:
    clock = FakeClock()
    tier = make_tier(clock=clock)
    put(tier, "k", "v", ttl=5)
    clock.now += 4.999
    assert tier.get("k") == "v"
    clock.now += 0.001
    assert tier.get("k") is MISSING


def test_expired_entry_removed() -> None:
    clock = FakeClock()
    tier = make_tier(clock=clock)
    put(tier, "k", "v", ttl=5)
    clock.now += 10
    tier.get("k")
    assert len(tier) == 0
    assert tier.expirations == 1


# fill guard


def test_fill_after_invalidate_dropped() -> None:
    tier = make_tier()
    token = tier.begin_fill()
    tier.invalidate(["k"])
    stored = tier.fill("k", "old", 10, 60, token)
    assert stored is False
    assert tier.get("k") is MISSING
    assert tier.dropped_fills == 1


def test_fill_other_key_after_invalidate_kept() -> None:
    tier = make_tier()
    token = tier.begin_fill()
    tier.invalidate(["other"])
    stored = tier.fill("k", "v", 10, 60, token)
    assert stored is True


def test_fill_begun_after_invalidate_kept() -> None:
    tier = make_tier()
    tier.invalidate(["k"])
    late = tier.begin_fill()
    stored = tier.fill("k", "new", 10, 60, late)
    assert stored is True


def test_fill_after_idle_invalidate_kept() -> None:
    tier = make_tier()
    tier.invalidate(["k"])
    assert put(tier, "k", "new") is True


def test_clear_voids_fills_in_flight() -> None:
    tier = make_tier()
    token = tier.begin_fill()
    tier.clear()
    stored = tier.fill("k", "old", 10, 60, token)
    assert stored is False
    assert tier.get("k") is MISSING


def test_clear_then_new_fill_kept() -> None:
    tier = make_tier()
    tier.clear()
    assert put(tier, "k", "v") is True


def test_clear_drops_entries() -> None:
    tier = make_tier()
    put(tier, "a", 1)
    put(tier, "b", 2)
    tier.clear()
    assert len(tier) == 0
    assert tier._lru.currsize == 0


def test_invalidated_record_bounded() -> None:
    tier = make_tier()
    for index in range(3 * _PRUNE_AT):
        tier.invalidate([f"k{index}"])
    assert len(tier._invalidated) <= _PRUNE_AT


def test_prune_voids_fills_older_than_cutoff() -> None:
    tier = make_tier()
    old = tier.begin_fill()
    tier.invalidate(["k"])
    for index in range(_PRUNE_AT):
        tier.invalidate([f"other{index}"])
    assert "k" not in tier._invalidated
    assert tier.fill("k", "old", 10, 60, old) is False
    assert tier.fill("unrelated", "v", 10, 60, old) is False


def test_prune_keeps_fills_after_cutoff() -> None:
    tier = make_tier()
    for index in range(_PRUNE_AT + 1):
        tier.invalidate([f"other{index}"])
    token = tier.begin_fill()
    tier.invalidate(["b"])
    assert tier.fill("a", "new", 10, 60, token) is True
    assert tier.fill("b", "old", 10, 60, token) is False


def test_one_large_invalidation_pruned() -> None:
    tier = make_tier()
    token = tier.begin_fill()
    tier.invalidate([f"k{index}" for index in range(_PRUNE_AT + 5)])
    assert len(tier._invalidated) <= _PRUNE_AT
    assert tier.fill("k1", "old", 10, 60, token) is False
    assert tier.fill("k1", "new", 10, 60, tier.begin_fill()) is True


def test_invalidate_returns_present_count() -> None:
    tier = make_tier()
    put(tier, "a", 1)
    put(tier, "b", 2)
    assert tier.invalidate(["a", "b", "c"]) == 2


# threads


def test_thread_stress_bounds_and_values() -> None:
    tier = make_tier(max_entries=64, max_bytes=64 * 1024 * 1024)
    keys = [f"k{index}" for index in range(500)]
    errors: list[BaseException] = []
    wrong: list[tuple[str, Any]] = []
    start = threading.Barrier(32)

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            start.wait()
            for step in range(5000):
                key = rng.choice(keys)
                operation = rng.random()
                if operation < 0.4:
                    item = tier.get(key)
                    if item is not MISSING and item[0] != key:
                        wrong.append((key, item))
                elif operation < 0.7:
                    put(tier, key, (key, seed, step), size=rng.randrange(1, 5000))
                elif operation < 0.85:
                    tier.invalidate(rng.sample(keys, 3))
                else:
                    for other in rng.sample(keys, 8):
                        item = tier.get(other)
                        if item is not MISSING and item[0] != other:
                            wrong.append((other, item))
        except BaseException as exc:  # noqa: BLE001 - reported by the asserts below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert wrong == []
    assert len(tier) <= 64
    assert tier.current_bytes <= tier.max_bytes
    assert len(tier._invalidated) <= _PRUNE_AT


# model check


class LocalTierModel(RuleBasedStateMachine):
    """Compare the local tier with an LRU built on an OrderedDict.

    Every entry is charged the same size and the byte bound is never
    reached, so only the entry bound, recency and expiry decide what stays.
    """

    MAX_ENTRIES = 5
    KEYS = st.sampled_from([f"k{index}" for index in range(8)])

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.tier = make_tier(max_entries=self.MAX_ENTRIES, clock=self.clock)
        self.model: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self.counter = 0

    @rule(key=KEYS, ttl=st.sampled_from([1.0, 5.0, 60.0]))
    def fill(self, key: str, ttl: float) -> None:
        self.counter += 1
        put(self.tier, key, self.counter, size=10, ttl=ttl)
        self.model[key] = (self.clock.now + ttl, self.counter)
        self.model.move_to_end(key)
        while len(self.model) > self.MAX_ENTRIES:
            self.model.popitem(last=False)

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        expected: Any = MISSING
        entry = self.model.get(key)
        if entry is not None:
            if entry[0] <= self.clock.now:
                del self.model[key]
            else:
                self.model.move_to_end(key)
                expected = entry[1]
        assert self.tier.get(key) == expected

    @rule(keys=st.lists(KEYS, max_size=3))
    def invalidate(self, keys: list[str]) -> None:
        present = {key for key in keys if key in self.model}
        assert self.tier.invalidate(keys) == len(present)
        for key in present:
            del self.model[key]

    @rule()
    def clear(self) -> None:
        self.tier.clear()
        self.model.clear()

    @rule(seconds=st.sampled_from([0.5, 1.0, 4.0, 30.0]))
    def advance(self, seconds: float) -> None:
        self.clock.now += seconds

    @invariant()
    def same_size(self) -> None:
        assert len(self.tier) == len(self.model)


LocalTierModel.TestCase.settings = settings(max_examples=60, deadline=None)
test_local_tier_matches_model = LocalTierModel.TestCase
