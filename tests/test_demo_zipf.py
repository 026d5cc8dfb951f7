"""Tests of the demo's Zipf sampler."""

from __future__ import annotations

import collections
import math
import random

import pytest

from tiercache.demo.zipf import ZipfSampler, rank_subscribers

SAMPLES = 200_000


def harmonic(count: int, exponent: float) -> float:
    return math.fsum(math.pow(rank, -exponent) for rank in range(1, count + 1))


def draw(sampler: ZipfSampler, samples: int = SAMPLES) -> collections.Counter[int]:
    return collections.Counter(sampler.sample() for _ in range(samples))


@pytest.mark.parametrize("exponent", [0.7, 1.0, 1.14, 2.0])
def test_zipf_top_key_frequency(exponent: float) -> None:
    sampler = ZipfSampler(1000, exponent, rng=random.Random(3))
    expected = 1.0 / harmonic(1000, exponent)
    # Five standard deviations of a binomial share.
    tolerance = 5 * math.sqrt(expected * (1 - expected) / SAMPLES)

    counts = draw(sampler)

    assert abs(counts[0] / SAMPLES - expected) < tolerance
    assert sampler.probability(0) == pytest.approx(expected)


def test_zipf_rank_ratio_follows_exponent() -> None:
    sampler = ZipfSampler(1000, 1.0, rng=random.Random(4))

    counts = draw(sampler)

    # With exponent 1, rank r is drawn about r times less often than rank 0.
    assert counts[0] / counts[1] == pytest.approx(2.0, rel=0.05)
    assert counts[0] / counts[9] == pytest.approx(10.0, rel=0.1)


def test_zipf_exponent_zero_is_uniform() -> None:
    sampler = ZipfSampler(10, 0.0, rng=random.Random(5))

    counts = draw(sampler, 100_000)

    assert sorted(counts) == list(range(10))
    assert max(counts.values()) / min(counts.values()) < 1.1


def test_zipf_samples_stay_in_range() -> None:
    sampler = ZipfSampler(3, 1.5, rng=random.Random(6))

    assert {sampler.sample() for _ in range(10_000)} == {0, 1, 2}
    assert sampler.count == 3
    assert sum(sampler.probability(rank) for rank in range(3)) == pytest.approx(1.0)


def test_zipf_is_repeatable() -> None:
    first = ZipfSampler(500, 1.0, rng=random.Random(9))
    second = ZipfSampler(500, 1.0, rng=random.Random(9))

    assert [first.sample() for _ in range(100)] == [second.sample() for _ in range(100)]


def test_zipf_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="count"):
        ZipfSampler(0, 1.0, rng=random.Random())
    with pytest.raises(ValueError, match="exponent"):
        ZipfSampler(10, -0.5, rng=random.Random())


def test_rank_subscribers_is_seeded_permutation() -> None:
    ranking = rank_subscribers(1000, seed=1)

    assert sorted(ranking) == list(range(1, 1001))
    assert ranking == rank_subscribers(1000, seed=1)
    assert ranking != rank_subscribers(1000, seed=2)
    assert ranking[:10] != list(range(1, 11))
