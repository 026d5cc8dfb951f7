"""Zipf-distributed choice of popular keys, with a precomputed CDF and bisect."""

from __future__ import annotations

import bisect
import itertools
import random


class ZipfSampler:
    """Sampler of ranks ``0 .. count - 1`` where rank ``r`` has probability
    proportional to ``1 / (r + 1) ** exponent``.

    Rank 0 is the most popular key. An exponent of 0 gives a uniform choice.
    """

    def __init__(self, count: int, exponent: float, *, rng: random.Random) -> None:
        """Precompute the cumulative weights.

        :param count: number of ranks, at least 1.
        :param exponent: Zipf exponent (alpha), at least 0.
        :param rng: source of uniform random numbers; seed it for repeatable runs.
        :raises ValueError: if ``count`` or ``exponent`` is out of range.
        """
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        if exponent < 0:
            raise ValueError(f"exponent must be at least 0, got {exponent}")
        weights = (float(rank) ** -exponent for rank in range(1, count + 1))
        self._cdf: list[float] = list(itertools.accumulate(weights))
        self._total = self._cdf[-1]
        self._rng = rng

    @property
    def count(self) -> int:
        """Number of ranks."""
        return len(self._cdf)

    def probability(self, rank: int) -> float:
        """Return the probability of drawing ``rank``."""
        previous = self._cdf[rank - 1] if rank > 0 else 0.0
        return (self._cdf[rank] - previous) / self._total

    def sample(self) -> int:
        """Draw one rank."""
        # random() is in [0, 1), so the point is below the last CDF entry and
        # bisect_left returns at most count - 1.
        point = self._rng.random() * self._total
        return bisect.bisect_left(self._cdf, point)


def rank_subscribers(count: int, seed: int) -> list[int]:
    """Return subscriber ids ``1 .. count`` in popularity order for ``seed``.

    The order is shuffled so that the popular subscribers are spread over the
    id range instead of being the oldest rows.
    """
    ids = list(range(1, count + 1))
    random.Random(f"popularity-{seed}").shuffle(ids)
    return ids
